"""SQLite: search rows reach the FTS5 index in batches (migration 0008). The newest rows are
pending, matched and ranked in Python as FTS5 would; deleting them leaves no trace; the
index stays consistent with its content table through forks, imports, deletes and
migrations. (Postgres has no batches: its search index is written with each row.)"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from gilas_conv import ConversationStore, downgrade_database, upgrade_database
from gilas_conv.search import _fts5, parse_query
from gilas_conv.store import _search as store_search
from gilas_conv.store._engine import create_engine_for_url

MODEL = "gpt-4o-mini"
BATCH = store_search.FTS5_BATCH
VOCABULARY = [
    "تهران", "تهرانی", "کتاب", "می\u200cخواهم", "خواهم", "سفر", "بهار",
    "kiwi", "kiwis", "apple", "foo_bar", "bar", "x2", "IR۷۱۲", "the", "of",
]  # fmt: skip
QUERIES = [
    "تهران", "تهر*", "کتاب سفر", '"تهران سفر"', "میخواهم", "خواهم", "kiwi", "kiw*",
    "foo_bar", "bar", '"apple kiwi"', "ir712", "the of", "x2", "zzz",
]  # fmt: skip


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'batches.db'}"


@pytest.fixture
def opened(sqlite_url: str) -> Iterator[ConversationStore]:
    with ConversationStore(sqlite_url) as store:
        yield store


def _text(rng: random.Random) -> str:
    return " ".join(rng.choices(VOCABULARY, k=rng.randint(1, 12)))


def _mark(store: ConversationStore) -> tuple[int, int]:
    """(the high-water mark, how many search rows are above it)."""
    with store.engine.connect() as conn:
        mark = conn.execute(text("SELECT indexed_to FROM message_search_mark")).scalar_one()
        pending = conn.execute(
            text("SELECT count(*) FROM message_search WHERE id > :m"), {"m": mark}
        ).scalar_one()
    return mark, pending


def _pending_ids(store: ConversationStore) -> set[tuple[str, int]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT conversation_id, seq FROM message_search"
                " WHERE id > (SELECT indexed_to FROM message_search_mark)"
            )
        ).all()
    return {(row.conversation_id, row.seq) for row in rows}


def _index_pending(store: ConversationStore) -> None:
    with store._write() as conn:
        store_search.index_pending(conn)


def _check_fts5(store: ConversationStore) -> None:
    """FTS5's own check of its index against the content table (every row indexed)."""
    _index_pending(store)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO message_search_fts (message_search_fts) VALUES ('integrity-check')")


def _results(store: ConversationStore, query: str, **kwargs: object) -> list[tuple[str, int, float]]:
    return [(h.conversation_id, h.seq, h.rank) for h in store.search(query, **kwargs)]  # type: ignore[arg-type]


def test_appends_are_indexed_in_batches(opened: ConversationStore) -> None:
    conv = opened.create(model=MODEL)
    for n in range(BATCH - 1):
        conv.append("user", f"word{n}")
    assert _mark(opened) == (0, BATCH - 1)
    conv.append("system", "not searched: no search row")
    assert _mark(opened) == (0, BATCH - 1)
    conv.append("user", "the one that fills the batch")
    assert _mark(opened) == (BATCH, 0)
    conv.append("user", "pending again")
    assert _mark(opened) == (BATCH, 1)
    assert [h.seq for h in opened.search("word3")] == [4]
    _check_fts5(opened)


def test_a_pending_message_is_found_and_ranked_as_when_indexed(opened: ConversationStore) -> None:
    """Fewer appends than a batch: every row is pending, and the hits (ranks included) are
    those FTS5 gives once the rows are indexed."""
    rng = random.Random(3)
    ids = [opened.create(model=MODEL, owner=None if n % 3 else "alice").id for n in range(4)]
    for n in range(BATCH - 2):
        opened.get(ids[n % 4], owner=None if n % 4 % 3 else "alice").append("user", _text(rng))
    assert _mark(opened)[1] == BATCH - 2
    scopes: list[dict[str, object]] = [{}, {"owner": "alice"}, {"conversation": ids[1]}, {"limit": 3}]
    before = {(q, i): _results(opened, q, **scope) for q in QUERIES for i, scope in enumerate(scopes)}
    _index_pending(opened)
    assert _mark(opened)[1] == 0
    after = {(q, i): _results(opened, q, **scope) for q in QUERIES for i, scope in enumerate(scopes)}
    assert any(before.values())
    assert before == after


def test_pending_and_indexed_rows_rank_together(opened: ConversationStore) -> None:
    """More than a batch: some rows indexed, some pending. Each pending row gets the rank
    FTS5 gives it once indexed (the same statistics: index and pending rows together),
    and the hits are the same messages."""
    rng = random.Random(11)
    conversations = [opened.create(model=MODEL) for _ in range(5)]
    for n in range(3 * BATCH + BATCH // 2):
        conversations[n % 5].append("user" if n % 2 else "assistant", _text(rng))
    mark, pending = _mark(opened)
    assert mark and pending
    pending_ids = _pending_ids(opened)
    checked = 0
    for query in QUERIES:
        before = _results(opened, query, limit=1000)
        _index_pending(opened)
        after = _results(opened, query, limit=1000)
        assert sorted(hit[:2] for hit in before) == sorted(hit[:2] for hit in after), query
        ranks = {hit[:2]: hit[2] for hit in after}
        for cid, seq, rank in before:
            if (cid, seq) in pending_ids:
                assert rank == pytest.approx(ranks[(cid, seq)], rel=1e-12), query
                checked += 1
        # A new pending tail for the next query.
        for n in range(BATCH // 2):
            conversations[n % 5].append("user", _text(rng))
        pending_ids = _pending_ids(opened)
    assert checked > 20


def test_python_matching_and_bm25_agree_with_fts5(opened: ConversationStore) -> None:
    """The Python half (gilas_conv.search._fts5) on indexed rows: the same matches and the
    same ranks as FTS5's MATCH and bm25."""
    rng = random.Random(5)
    conv = opened.create(model=MODEL)
    for _ in range(3 * BATCH):
        conv.append("user", _text(rng))
    _index_pending(opened)
    with opened.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, body, parts FROM message_search").all()
        totals = store_search._fts5_totals(conn)
        assert totals[0] == len(rows)
        for query in QUERIES:
            parsed = parse_query(query)
            phrases = _fts5.compile_query(parsed)
            expected = dict(
                conn.exec_driver_sql(
                    "SELECT rowid, -bm25(message_search_fts, 1.0, 0.5) FROM message_search_fts"
                    " WHERE message_search_fts MATCH ?",
                    (parsed.fts5(),),
                ).all()
            )
            counts = tuple(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM message_search_fts WHERE message_search_fts MATCH ?",
                    (phrase.expression,),
                ).scalar()
                for phrase in phrases
            )
            stats = _fts5.Stats(rows=totals[0], tokens=totals[1], matching=counts)
            found = {}
            for row in rows:
                doc = _fts5.Row.of(row.body, row.parts)
                frequency = _fts5.frequencies(phrases, doc)
                if all(f > 0 for f in frequency):
                    found[row.id] = _fts5.bm25(stats, frequency, doc.size)
            assert found.keys() == expected.keys(), query
            for rowid, rank in found.items():
                assert rank == pytest.approx(expected[rowid], rel=1e-12), query


def _fts5_blocks(path: Path) -> list[bytes]:
    raw = sqlite3.connect(path)
    try:
        return [bytes(row[0]) for row in raw.execute("SELECT block FROM message_search_fts_data")]
    finally:
        raw.close()


def test_deleting_pending_rows_leaves_no_trace(tmp_path: Path) -> None:
    path = tmp_path / "pending.db"
    with ConversationStore(f"sqlite:///{path}") as store:
        kept = store.create(model=MODEL, owner="bob")
        for n in range(BATCH):
            kept.append("user", f"kept words {n}")
        assert _mark(store) == (BATCH, 0)
        gone = store.create(model=MODEL)
        gone.append("user", "pendingsecret one")
        erased = store.create(model=MODEL, owner="eve")
        erased.append("user", "pendingsecret two")
        assert _mark(store)[1] == 2
        assert len(store.search("pendingsecret")) == 1
        assert len(store.search("pendingsecret", owner="eve")) == 1
        store.delete(gone.id)
        assert store.erase_owner("eve").conversations == 1
        assert store.search("pendingsecret") == []
        assert store.search("pendingsecret", owner="eve") == []
        assert _mark(store) == (BATCH, 0)
        assert [h.seq for h in store.search("kept 3", owner="bob")] == [4]
        _check_fts5(store)
    blocks = _fts5_blocks(path)
    assert any(b"kept" in block for block in blocks)  # the scan sees what is kept
    assert not any(b"pendingsecret" in block for block in blocks)
    assert b"pendingsecret" not in path.read_bytes()


def test_deleting_indexed_and_pending_rows_of_one_conversation(tmp_path: Path) -> None:
    """A conversation whose first rows are indexed and last ones pending: delete removes
    the indexed rows' entries (and merges) and the pending rows alike."""
    path = tmp_path / "mixed.db"
    with ConversationStore(f"sqlite:///{path}") as store:
        conv = store.create(model=MODEL)
        for n in range(BATCH + 5):
            conv.append("user", f"mixedsecret{n}")
        assert _mark(store) == (BATCH, 5)
        other = store.create(model=MODEL)
        other.append("user", "survivor")
        store.delete(conv.id)
        assert store.search("survivor")[0].conversation_id == other.id
        _check_fts5(store)
    assert not any(b"mixedsecret" in block for block in _fts5_blocks(path))
    assert b"mixedsecret" not in path.read_bytes()


def test_deleting_the_newest_rows_lowers_the_mark(opened: ConversationStore) -> None:
    """Deleting the newest rows lets SQLite reuse their ids: the mark comes down to the
    highest id left, so the next rows are pending, not taken for indexed ones."""
    first = opened.create(model=MODEL)
    first.append("user", "older words")
    last = opened.create(model=MODEL)
    for n in range(BATCH - 1):
        last.append("user", f"newest {n}")
    assert _mark(opened) == (BATCH, 0)
    opened.delete(last.id)
    assert _mark(opened) == (1, 0)
    again = opened.create(model=MODEL)
    again.append("user", "reused walrus")
    assert _mark(opened) == (1, 1)
    assert [h.conversation_id for h in opened.search("walrus")] == [again.id]
    # Pending rows deleted too: the mark stays at the highest indexed row left.
    opened.delete(again.id)
    assert _mark(opened) == (1, 0)
    opened.delete(first.id)
    assert _mark(opened) == (0, 0)
    _check_fts5(opened)


def test_the_newest_indexed_row_deleted_leaves_nothing_for_the_row_reusing_its_id(
    tmp_path: Path,
) -> None:
    """Right after a batch is copied (nothing pending), the newest row is deleted: its FTS5
    entry goes with it before the mark comes down. Before, the mark came down first and the
    entry stayed: the deleted words were found under the next row, which reuses the id,
    even by another owner."""
    path = tmp_path / "reuse.db"
    with ConversationStore(f"sqlite:///{path}") as store:
        filler = store.create(model=MODEL, owner="bob")
        for n in range(BATCH - 1):
            filler.append("user", f"filler {n}")
        eve = store.create(model=MODEL, owner="eve")
        eve.append("user", "topsecretword")
        assert _mark(store) == (BATCH, 0)
        store.delete(eve.id, owner="eve")
        assert _mark(store) == (BATCH - 1, 0)
        filler.append("user", "innocent")
        assert store.search("topsecretword", owner="bob") == []
        assert store.search("topsecretword") == []
        _index_pending(store)
        assert store.search("topsecretword", owner="bob") == []
        assert [h.seq for h in store.search("innocent", owner="bob")] == [BATCH]
        with store.engine.connect() as conn:
            stale = conn.execute(
                text(
                    "SELECT id FROM message_search_fts_docsize"
                    " WHERE id NOT IN (SELECT id FROM message_search)"
                )
            ).all()
        assert stale == []
        _check_fts5(store)
    assert not any(b"topsecretword" in block for block in _fts5_blocks(path))


def test_forks_and_imports_cross_batches(opened: ConversationStore) -> None:
    rng = random.Random(9)
    conv = opened.create(model=MODEL)
    for n in range(BATCH + 7):
        conv.append("user", f"forkword {n} {_text(rng)}")
    fork = conv.fork(BATCH + 3)
    imported = opened.import_conversations(
        [{"messages": [{"role": "user", "content": f"forkword imported {n}"} for n in range(2 * BATCH + 1)]}]
    )[0]
    hits = opened.search("forkword", limit=1000)
    assert len(hits) == (BATCH + 7) + (BATCH + 3) + (2 * BATCH + 1)
    assert {h.conversation_id for h in hits} == {conv.id, fork.id, imported.id}
    assert _mark(opened)[1] < BATCH
    _check_fts5(opened)


def test_a_read_only_file_searches_its_pending_rows(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    with ConversationStore(f"sqlite:///{path}") as store:
        conv = store.create(model=MODEL)
        conv.append("user", "readonly kiwi")
        assert _mark(store)[1] == 1
    path.chmod(0o444)
    try:
        with ConversationStore(f"sqlite:///{path}") as store:
            assert [h.conversation_id for h in store.search("kiwi")] == [conv.id]
    finally:
        path.chmod(0o644)


def test_upgrade_from_0007_keeps_indexed_rows_searchable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'upgrade.db'}"
    upgrade_database(url, "0003")
    engine = create_engine_for_url(url)
    try:
        with engine.begin() as conn:
            for number in range(3):
                cid = f"c{number}"
                conn.execute(
                    text(
                        "INSERT INTO conversations (id, model, title, last_seq, created_at, updated_at)"
                        " VALUES (:cid, :model, 'old', 20, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"cid": cid, "model": MODEL},
                )
                for seq in range(1, 21):
                    conn.execute(
                        text(
                            "INSERT INTO messages"
                            " (conversation_id, seq, role, content, status, pinned, created_at)"
                            " VALUES (:cid, :seq, 'user', :content, 'complete', false, CURRENT_TIMESTAMP)"
                        ),
                        {"cid": cid, "seq": seq, "content": f'"قديمي {number} {seq}"'},
                    )
    finally:
        engine.dispose()
    upgrade_database(url, "0007")  # 0004 indexes them, one FTS5 entry per row
    upgrade_database(url)
    with ConversationStore(url) as store:
        assert _mark(store) == (60, 0)
        assert len(store.search("قدیمی", limit=100)) == 60
        assert [h.seq for h in store.search("قدیمی 1 7", conversation="c1")] == [7]
        conv = store.get("c2")
        for n in range(BATCH + 3):
            conv.append("user", f"قديمي جديد {n}")
        assert _mark(store) == (60 + BATCH, 3)
        assert len(store.search("قدیمی", limit=1000)) == 60 + BATCH + 3
        store.delete("c0")
    # Down to 0007: the pending rows are copied into FTS5, and 0004's triggers are back.
    downgrade_database(url, "0007")
    raw = sqlite3.connect(tmp_path / "upgrade.db")
    try:
        raw.execute("INSERT INTO message_search_fts (message_search_fts) VALUES ('integrity-check')")
        count = raw.execute(
            "SELECT count(*) FROM message_search_fts WHERE message_search_fts MATCH ?", ('"قدیمی"',)
        ).fetchone()[0]
        assert count == 40 + BATCH + 3
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
        assert "message_search_mark" not in tables
    finally:
        raw.close()
    upgrade_database(url)
    with ConversationStore(url) as store:
        assert _mark(store)[1] == 0
        assert len(store.search("قدیمی", limit=1000)) == 40 + BATCH + 3
        _check_fts5(store)


def test_pending_rows_are_the_newest_of_the_ranked_matches(
    opened: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the newest SEARCH_CANDIDATES matches are ranked: the pending ones first, then
    the newest indexed ones, as once all are indexed."""
    monkeypatch.setattr(store_search, "SEARCH_CANDIDATES", 5)
    conv = opened.create(model=MODEL)
    for n in range(BATCH + 3):
        conv.append("user", "emu " * (1 + n % 4) + f"number {n}")
    assert _mark(opened) == (BATCH, 3)
    before = _results(opened, "emu", limit=10)
    assert sorted(hit[1] for hit in before) == list(range(BATCH - 1, BATCH + 4))
    _index_pending(opened)
    assert [hit[1] for hit in _results(opened, "emu", limit=10)] == [hit[1] for hit in before]
