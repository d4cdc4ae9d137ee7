"""Retention and erasure: prune and erase_owner delete whole conversations in bounded
batches, leave other owners and the usage ledger alone, and on SQLite leave none of the
deleted text in the database file or its write-ahead log."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from gilas_conv import ConversationNotFound, ConversationStore

MODEL = "gpt-4o-mini"


class Clock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now


def _fill(store: ConversationStore, owner: str, secret: str, *, messages: int = 4) -> str:
    conv = store.create(model=MODEL, owner=owner, system=f"system {secret}")
    for i in range(messages):
        conv.append("user", f"{secret} question {i} " + "x" * 200)
        conv.append(
            "assistant",
            f"{secret} answer {i}",
            model=MODEL,
            usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        )
    conv.add_summary(f"{secret} summary", from_seq=1, to_seq=3, model=MODEL)
    return conv.id


def _file_bytes(db_url: str) -> bytes:
    path = Path(db_url.removeprefix("sqlite:///"))
    data = path.read_bytes()
    wal = Path(str(path) + "-wal")
    return data + (wal.read_bytes() if wal.exists() else b"")


def test_erase_owner_leaves_nothing_of_theirs_and_keeps_the_rest(db_url: str) -> None:
    with ConversationStore(db_url) as store:
        # One word of each is a single search term, so the scan covers the search index
        # (its FTS5 segments hold normalized words, not the raw text).
        # Enough messages that alice's words sit in FTS5 segments older than bob's.
        alice = [_fill(store, "alice", f"ALICE-SECRET-{n} quokkazanzibar{n}", messages=10) for n in range(3)]
        bob = _fill(store, "bob", "BOB-KEPT wombatkept", messages=10)
        assert [h.conversation_id for h in store.search("wombatkept", owner="bob")]
        before = {r.key: r.total_tokens for r in store.usage(by="owner")}
        assert store.erase_owner("alice", dry_run=True).conversations == 3
        assert store.count(owner="alice") == 3  # a dry run deletes nothing
        done = store.erase_owner("alice", batch_conversations=2)
        assert (done.conversations, done.messages) == (3, 3 * 21)
        for cid in alice:
            with pytest.raises(ConversationNotFound):
                store.get(cid, owner="alice")
        kept = store.get(bob, owner="bob")
        assert len(kept.messages()) == 21 and len(kept.summaries()) == 1
        # The ledger keeps the spending, deletion or not.
        assert {r.key: r.total_tokens for r in store.usage(by="owner")} == before
        assert store.erase_owner("alice").conversations == 0
        if db_url.startswith("sqlite"):
            # Scanned with the store still open: its -wal file exists and must not keep the
            # pages it logged when alice's messages were written.
            data = _file_bytes(db_url)
            assert b"ALICE-SECRET" not in data
            assert b"quokkazanzibar" not in data  # nor in the search index
            assert b"BOB-KEPT" in data and b"wombatkept" in data  # the scan sees what is kept
        assert store.search("quokkazanzibar0", owner="alice") == []
        assert len(store.search("wombatkept", owner="bob", limit=100)) == 20  # user and assistant


def test_prune_deletes_only_inactive_conversations(db_url: str) -> None:
    clock = Clock(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    with ConversationStore(db_url, clock=clock) as store:
        old_alice = _fill(store, "alice", "OLD-ALICE")
        old_bob = _fill(store, "bob", "OLD-BOB")
        clock.now += dt.timedelta(days=80)
        recent = _fill(store, "alice", "RECENT-ALICE")
        clock.now += dt.timedelta(days=20)  # old ones: 100 days idle; recent: 20
        with pytest.raises(ValueError, match="positive timedelta"):
            store.prune(inactive_for=dt.timedelta(0))
        only_bob = store.prune(inactive_for=dt.timedelta(days=90), owner="bob")
        assert (only_bob.conversations, only_bob.messages) == (1, 9)
        preview = store.prune(inactive_for=dt.timedelta(days=90), dry_run=True)
        assert (preview.conversations, preview.messages) == (1, 9)
        store.get(old_alice, owner="alice")
        done = store.prune(inactive_for=dt.timedelta(days=90), batch_messages=1)
        assert done.conversations == 1
        with pytest.raises(ConversationNotFound):
            store.get(old_alice, owner="alice")
        with pytest.raises(ConversationNotFound):
            store.get(old_bob, owner="bob")
        assert len(store.get(recent, owner="alice").messages()) == 9
        assert sum(r.requests for r in store.usage(by="owner")) == 12
    if db_url.startswith("sqlite"):
        data = _file_bytes(db_url)
        assert b"OLD-ALICE" not in data and b"OLD-BOB" not in data
        assert b"RECENT-ALICE" in data


def test_an_interrupted_prune_leaves_whole_conversations_and_resumes(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ConversationStore(db_url) as store:
        ids = [_fill(store, "carol", f"C{n}", messages=n + 1) for n in range(5)]
        calls = 0
        original = store._write

        def failing_write() -> object:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise KeyboardInterrupt  # the process is stopped between two batches
            return original()

        monkeypatch.setattr(store, "_write", failing_write)
        with pytest.raises(KeyboardInterrupt):
            store.erase_owner("carol", batch_conversations=1)
        monkeypatch.undo()
        left = [cid for cid in ids if store.count(owner="carol") and _exists(store, cid)]
        assert len(left) == 3
        for cid in left:  # every conversation still there is whole
            conv = store.get(cid, owner="carol")
            assert [m.seq for m in conv.messages()] == list(range(1, conv.message_count + 1))
            assert len(conv.summaries()) == 1
        assert store.erase_owner("carol").conversations == 3
        assert store.count(owner="carol") == 0


def _exists(store: ConversationStore, cid: str) -> bool:
    try:
        store.get(cid, owner="carol")
    except ConversationNotFound:
        return False
    return True


def test_delete_of_one_conversation_leaves_no_text_in_the_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    with ConversationStore(url) as store:
        cid = _fill(store, "dave", "DAVE-GONE", messages=30)
        store.delete(cid, owner="dave")
        store.erase_owner("nobody")  # nothing to erase: a no-op
    # secure_delete zeroes the freed pages at once; the log keeps them until a checkpoint,
    # which closing the last connection runs.
    assert b"DAVE-GONE" not in _file_bytes(url)


def test_the_byte_scan_finds_deleted_text_when_secure_delete_is_off(tmp_path: Path) -> None:
    """The control for the scans above: SQLite builds differ in their secure_delete default,
    so turn it off after the store's own setting and see the deleted text stay."""
    url = f"sqlite:///{tmp_path / 'control.db'}"
    with ConversationStore(url) as store:
        store.engine.dispose()
        with store._read() as conn:
            assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1

        @event.listens_for(store.engine, "connect")
        def _off(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA secure_delete = OFF")

        store.engine.dispose()
        _fill(store, "erin", "ERIN-LINGERS", messages=30)
        store.erase_owner("erin")
    assert b"ERIN-LINGERS" in _file_bytes(url)


def test_erased_words_leave_the_sqlite_search_index(tmp_path: Path) -> None:
    """FTS5 keeps a deleted row's words in its older segments (a delete only adds a marker)
    until they are merged: erasure merges them, so the words leave the file."""
    url = f"sqlite:///{tmp_path / 'fts.db'}"
    with ConversationStore(url) as store:
        for owner, word in (("alice", "quokkazanzibar"), ("bob", "wombatkept")):
            for n in range(3):
                conv = store.create(owner=owner)
                for i in range(20):
                    conv.append("user", f"{word}{n} other{i}")
        assert store.erase_owner("alice").messages == 60
        data = _file_bytes(url)
        assert b"quokkazanzibar" not in data
        assert b"wombatkept" in data
        assert len(store.search("wombatkept1", owner="bob")) == 20
