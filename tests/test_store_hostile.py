"""The store under hostile or unlucky conditions: locks held by others, forged handles,
malformed imports, bad database URLs, odd schema states, file permissions, huge messages."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gilas_conv import Conversation, ConversationNotFound, ConversationStore, StoreError
from gilas_conv.truncation import build_context, conversation_tokens

MODEL = "gpt-4o-mini"


def test_sqlite_lock_timeout_is_a_store_error(tmp_path: Path) -> None:
    """Another connection holds the write lock longer than the busy timeout: append and
    create fail with StoreError, not the driver's sqlite3.OperationalError."""
    path = tmp_path / "locked.db"
    with ConversationStore(f"sqlite:///{path}", sqlite_busy_timeout_ms=20) as store:
        conv = store.create(model=MODEL)
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="database is locked"):
                conv.append("user", "hi")
            with pytest.raises(StoreError, match="database is locked"):
                store.create(model=MODEL)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        conv.append("user", "hi")
        assert [m.content for m in conv.messages()] == ["hi"]


def test_sqlite_transactions_begin_as_they_should(tmp_path: Path) -> None:
    """A write transaction holds the write lock from its start (BEGIN IMMEDIATE), before
    any statement; a read begins a transaction (one snapshot) but takes no write lock; a
    single read begins none; the engine's own ``begin()`` still begins one."""
    path = tmp_path / "begin.db"
    with ConversationStore(f"sqlite:///{path}", sqlite_busy_timeout_ms=20) as store:
        other = sqlite3.connect(path, isolation_level=None, timeout=0.02)
        try:
            with store._write() as conn:
                assert conn.connection.driver_connection.in_transaction
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            with store._read() as conn:
                assert conn.connection.driver_connection.in_transaction
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
            with store._read_one() as conn:
                assert not conn.connection.driver_connection.in_transaction
            with store.engine.begin() as conn:
                assert conn.connection.driver_connection.in_transaction
        finally:
            other.close()


def _forged(store: ConversationStore) -> tuple[Conversation, Conversation]:
    """Alice's conversation, and Bob's handle with its id swapped for Alice's."""
    alice = store.create(model=MODEL, owner="alice")
    alice.append("user", "alice's secret")
    alice.append("assistant", "noted")
    bob = store.create(model=MODEL, owner="bob")
    return alice, dataclasses.replace(bob, id=alice.id)


FORGED_OPERATIONS = {
    "messages": lambda c: c.messages(),
    "iter_messages": lambda c: list(c.iter_messages()),
    "message": lambda c: c.message(1),
    "last_message": lambda c: c.last_message(),
    "pin": lambda c: c.pin(1),
    "summaries": lambda c: c.summaries(),
    "export": lambda c: c.export(),
    "build_context": lambda c: build_context(c),
    "conversation_tokens": lambda c: conversation_tokens(c),
    "append": lambda c: c.append("user", "x"),
    "fork": lambda c: c.fork(),
    "update": lambda c: c.update(title="x"),
}


@pytest.mark.parametrize("operation", list(FORGED_OPERATIONS))
def test_a_forged_handle_reads_and_changes_nothing_of_another_owner(
    store: ConversationStore, operation: str
) -> None:
    alice, forged = _forged(store)
    with pytest.raises(ConversationNotFound):
        FORGED_OPERATIONS[operation](forged)
    assert [(m.content, m.pinned) for m in alice.messages()] == [("alice's secret", False), ("noted", False)]
    assert store.get(alice.id, owner="alice").title is None
    assert store.count(owner="bob") == 1


@pytest.mark.parametrize("bad", ["\ud800", "a\udfffb"])
def test_lone_surrogate_ids_and_owners_are_simply_not_found(store: ConversationStore, bad: str) -> None:
    conv = store.create(model=MODEL)
    with pytest.raises(ConversationNotFound):
        store.get(bad)
    with pytest.raises(ConversationNotFound):
        store.get(conv.id, owner=bad)
    with pytest.raises(ConversationNotFound):
        store.delete(bad)
    with pytest.raises(ConversationNotFound):
        store.delete(conv.id, owner=bad)
    assert store.list(owner=bad) == []
    assert store.count(owner=bad) == 0
    assert store.get(conv.id).id == conv.id


# -- files ---------------------------------------------------------------------------------------


def test_new_database_files_are_private_to_their_user(tmp_path: Path) -> None:
    with ConversationStore() as store:  # the default: a file in the per-user data directory
        store.create(model=MODEL).append("user", "private")
        path = Path(store.engine.url.database or "")
        created = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert all(p.exists() for p in created)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in created} == {"0o600"}


def test_an_existing_file_keeps_the_permissions_its_owner_chose(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    path.touch()
    path.chmod(0o640)
    with ConversationStore(f"sqlite:///{path}") as store:
        store.create(model=MODEL)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@contextlib.contextmanager
def _read_only(*paths: Path) -> Iterator[None]:
    """Make files and directories unwritable, even for root (chattr +i) when run as root."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a file read-only")
        done = []
        try:
            for p in paths:
                if subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode != 0:
                    pytest.skip("chattr +i is not permitted here")
                done.append(p)
            yield
        finally:
            for p in done:
                subprocess.run(["chattr", "-i", str(p)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in paths}
        try:
            for p in paths:
                p.chmod(0o555 if p.is_dir() else 0o444)
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


@pytest.mark.parametrize("directory_writable", [True, False])
def test_a_read_only_sqlite_file_can_still_be_read(tmp_path: Path, directory_writable: bool) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "history.db"
    with ConversationStore(f"sqlite:///{path}") as store:
        conv = store.create(model=MODEL, title="kept")
        conv.append("user", "read me")
    for leftover in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    unwritable = [path, *([] if directory_writable else [folder])]
    with _read_only(*unwritable), ConversationStore(f"sqlite:///{path}") as store:
        [found] = store.list()
        assert found.title == "kept"
        assert [m.content for m in store.get(conv.id).messages()] == ["read me"]
        with pytest.raises(StoreError, match="readonly database"):
            found.append("user", "no room")


# -- size limits and pool ------------------------------------------------------------------------


def test_a_message_over_the_limit_is_refused_before_anything_is_stored(store: ConversationStore) -> None:
    limited = ConversationStore(store.engine.url.render_as_string(hide_password=False), max_message_chars=100)
    try:
        conv = limited.create(model=MODEL)
        conv.append("user", "x" * 100)
        too_long = "y" * 101
        with pytest.raises(
            ValueError, match=r"101 characters long; the store accepts at most 100 .*max_message_chars"
        ):
            conv.append("user", too_long)
        with pytest.raises(ValueError, match="at most 100"):
            conv.append("user", [{"type": "text", "text": too_long}])
        with pytest.raises(ValueError, match="at most 100"):
            limited.create(model=MODEL, system=too_long)
        with pytest.raises(ValueError, match=r"^message 2: the message is 101 characters"):
            limited.import_conversation(
                [{"role": "user", "content": "ok"}, {"role": "user", "content": too_long}]
            )
        assert [m.content for m in conv.messages()] == ["x" * 100]
        assert limited.count() == 1
    finally:
        limited.close()


def test_long_text_is_counted_exactly_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting a long message piece by piece (to bound memory) gives the whole count."""
    from gilas_conv import tokens

    lines = [
        "def f(x):\n",
        "    return x + 1\n\n",
        "سلام دنیا  \n",
        "  \n",
        "}\r\n",
        "x = '1234567'\n",
        "\n\n\n",
    ]
    text = "".join(lines[i * 7 % len(lines)] + "word " * (i % 5) for i in range(4000))
    for name in ("o200k_base", "cl100k_base"):
        whole = tokens.text_tokens(text, name)
        monkeypatch.setattr(tokens, "_COUNT_CHUNK_CHARS", 50)
        assert tokens.text_tokens(text, name) == whole
        monkeypatch.undo()


def test_pool_size_is_a_setting(store: ConversationStore) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    with ConversationStore(url, pool_size=3, max_overflow=7) as sized:
        assert (sized.engine.pool.size(), sized.engine.pool._max_overflow) == (3, 7)  # type: ignore[attr-defined]
        sized.create(model=MODEL)
    with pytest.raises(ValueError, match="pool_size"):
        ConversationStore(url, pool_size=-1)


# -- import: values both backends can store ------------------------------------------------------


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"created_at": "9999-12-31T23:59:59-05:00"}, r"created_at is out of range"),
        ({"created_at": "0001-01-01T00:00:00+05:00"}, r"created_at is out of range"),
        ({"reply_to": 2**31}, r"reply_to is 2147483648; at most 2147483647"),
        ({"reply_to": 2**64}, r"reply_to is .*; at most 2147483647"),
        ({"predicted_prompt_tokens": 2**63}, r"predicted_prompt_tokens is .*; at most"),
        ({"extra": _nested(990)}, r"extra nests deeper than 64 levels"),
        ({"usage": {"deep": _nested(200)}}, r"usage nests deeper than 64 levels"),
    ],
)
def test_import_refuses_values_either_backend_cannot_store(
    store: ConversationStore, message: dict[str, object], match: str
) -> None:
    data = {
        "title": "t",
        "messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "a", **message}],
    }
    with pytest.raises(ValueError, match=rf"^backup\.jsonl: message 2: {match}"):
        store.import_conversations([data], labels=["backup.jsonl"])
    assert store.count() == 0


def test_append_refuses_integers_postgres_cannot_store(store: ConversationStore) -> None:
    conv = store.create(model=MODEL)
    with pytest.raises(ValueError, match="at most 2147483647"):
        conv.append("assistant", "a", reply_to=2**31)
    assert conv.messages() == []
