"""The search index: its rows, kept in step with ``messages`` by the store, and the queries.

Both backends index the *normalized* words of a message (:mod:`gilas_conv.search`), never
its raw text: the folding that makes ي match ی and می‌خواهم match میخواهم happens in
Python, identically for what is indexed and what is asked, so neither engine's own
tokenizer decides what a word is.

SQLite
    ``message_search`` holds, per searchable message, its canonical words (``body``) and
    the parts of joined words (``parts``), space-separated, under an ``INTEGER PRIMARY KEY``
    (a stable rowid: the implicit rowid of ``messages`` may change on VACUUM).
    ``message_search_fts`` is an FTS5 index with ``message_search`` as its external
    content, tokenized with FTS5's ``ascii`` tokenizer: the words are already normalized
    and contain only letters and digits, and ``ascii`` splits at exactly the spaces between
    them, whatever Unicode version SQLite's own tables know. (The index is external-content
    over the normalized words, not over ``messages.content``: the raw text is not what is
    matched.) Its rows reference their message with ``ON DELETE CASCADE``, so deleting a
    conversation deletes its search rows and their index entries in the same transaction.

    FTS5 charges a price for every transaction that writes it (it flushes a new segment
    and rewrites its structure and totals: about 30 µs, as much as the rest of an append's
    indexing, and more the more distinct words; benchmarks/README.md), so rows are copied
    into it in batches (migration 0008). ``message_search_mark`` holds one number, ``indexed_to``: the rows
    with an id at or below it are in the FTS5 index, the ones above it (at most
    ``FTS5_BATCH - 1``, store-wide) are *pending*. Triggers keep that true: an insert that
    makes ``FTS5_BATCH`` rows pending copies them all into FTS5 and moves the mark, in the
    inserting transaction (an append, an import, a fork); a delete removes a row's index
    entry only when the row is at or below the mark (a pending row never reached FTS5, so
    it leaves no trace there); deleting the newest rows brings the mark down to the
    highest id left, so the ids SQLite then reuses are above it (the store never chooses
    a row's id). A search matches the pending rows in Python, exactly as FTS5 would, and
    ranks them with FTS5's ``bm25`` (see :mod:`gilas_conv.search._fts5` and
    :func:`_pending_hits`): a pure read, so it works on a read-only file and never waits
    for the write lock.

Postgres
    ``message_search`` holds a ``tsvector`` per searchable message, keyed by
    ``(conversation_id, seq)`` and cascading from ``messages``, with a GIN index. The
    ``tsvector`` is written literally from the Python tokens (canonical words at their
    positions with weight A, parts at their word's position with weight B), not made by
    ``to_tsvector``: Postgres's parser would split and fold Persian text by its own rules
    (and by the database's locale). Queries are ``tsquery`` literals, likewise.

The store writes a message and its search row in one transaction (append, import, fork);
a message with no searchable text (a system prompt, a bare tool call) has no search row.

Ranking is bounded on both: a word in hundreds of thousands of messages is ranked among
its recent matches, not all of them (SQLite: the newest ``SEARCH_CANDIDATES`` matches, which
FTS5 yields newest first; Postgres: see :func:`_pg_best`, since GIN yields matches in no
useful order and reading every match's row is what cost 0.4 s at a million messages).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text, text

from ..search import _fts5
from ..search._normalize import index_terms, index_text
from ..search._query import Query
from ..search._snippet import searchable_text
from ._schema import UTCDateTime

__all__ = [
    "SEARCH_TABLE",
    "compact_step",
    "copy_rows",
    "index_pending",
    "index_values",
    "insert_rows",
    "prepare_delete",
    "search_rows",
    "unmodeled_table",
]

SEARCH_TABLE = "message_search"
FTS_TABLE = "message_search_fts"
# SQLite: the one row holding the high-water mark (``indexed_to``): the search rows with an
# id at or below it are in the FTS5 index, those above it are pending (see the module doc).
MARK_TABLE = "message_search_mark"
# SQLite: how many pending rows make an insert copy them into FTS5. Written into the
# trigger by migration 0008 (changing it takes a migration); here for tests and the docs.
FTS5_BATCH = 128

# On SQLite, the newest this many matches are ranked (see _sqlite_matches_sql); on Postgres,
# up to this many matches found through the index are ranked (see _pg_best).
SEARCH_CANDIDATES = 2000
# Postgres: how many of the owner's newest messages a search looks at first, and how many
# matches among them make a word frequent enough to rank only those (see _pg_best).
PG_RECENT_WINDOW = 10_000
PG_FREQUENT_MATCHES = 500

# Postgres keeps at most 256 positions per lexeme and positions up to 16383.
_PG_MAX_POSITIONS = 255
_PG_MAX_POSITION = 16383


def unmodeled_table(name: str) -> bool:
    """True for the search tables, which the SQLAlchemy models do not describe (an FTS5
    virtual table and its shadow tables cannot be); Alembic's comparison skips them."""
    return name == SEARCH_TABLE or name.startswith(SEARCH_TABLE + "_")


def index_values(dialect: str, role: str, content: Any) -> dict[str, Any] | None:
    """The search row's columns for a message (None when it has nothing to search)."""
    searched = searchable_text(role, content)
    if not searched:
        return None
    if dialect == "sqlite":
        body, parts = index_text(searched)
        return {"body": body, "parts": parts} if body else None
    words, positioned = index_terms(searched)
    return {"document": _tsvector(words, positioned)} if words else None


def _tsvector(words: list[str], parts: list[tuple[int, str]]) -> str:
    positions: dict[str, list[str]] = defaultdict(list)
    for index, word in enumerate(words):
        positions[word].append(f"{min(index + 1, _PG_MAX_POSITION)}A")
    for index, part in parts:
        positions[part].append(f"{min(index + 1, _PG_MAX_POSITION)}B")
    return " ".join(
        "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "':" + ",".join(found[:_PG_MAX_POSITIONS])
        for lexeme, found in positions.items()
    )


_INSERT = {
    "sqlite": text(
        f"INSERT INTO {SEARCH_TABLE} (conversation_id, seq, body, parts) VALUES (:cid, :seq, :body, :parts)"
    ),
    "postgresql": text(
        f"INSERT INTO {SEARCH_TABLE} (conversation_id, seq, document)"
        " VALUES (:cid, :seq, CAST(:document AS tsvector))"
    ),
}

_COPY = {
    "sqlite": text(
        f"INSERT INTO {SEARCH_TABLE} (conversation_id, seq, body, parts)"
        f" SELECT :new, seq, body, parts FROM {SEARCH_TABLE} WHERE conversation_id = :source AND seq <= :at"
    ),
    "postgresql": text(
        f"INSERT INTO {SEARCH_TABLE} (conversation_id, seq, document)"
        f" SELECT :new, seq, document FROM {SEARCH_TABLE} WHERE conversation_id = :source AND seq <= :at"
    ),
}


# On SQLite the rows go straight to the driver (plain text and integers, nothing for
# SQLAlchemy to convert): its per-statement work would cost more than the insert.
_SQLITE_INSERT = f"INSERT INTO {SEARCH_TABLE} (conversation_id, seq, body, parts) VALUES (?, ?, ?, ?)"


def insert_rows(conn: Any, rows: list[dict[str, Any]]) -> None:
    """Insert search rows (each ``{"cid", "seq", **index_values(...)}``) in the caller's
    transaction. Driver errors are translated by the transaction (gilas_conv/store/_tx.py)."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        values = [(row["cid"], row["seq"], row["body"], row["parts"]) for row in rows]
        if len(values) == 1:
            driver.execute(_SQLITE_INSERT, values[0])
        else:
            driver.executemany(_SQLITE_INSERT, values)
        return
    conn.execute(_INSERT[conn.dialect.name], rows)


# Pages of FTS5 merge work per transaction when compacting (see compact_step).
COMPACT_PAGES = 1000
# The first SQLite whose FTS5 has a dependable ``secure-delete`` option (added in 3.42).
FTS5_SECURE_DELETE_SINCE = (3, 44, 0)


def compact_step(conn: Any, pages: int = COMPACT_PAGES) -> bool:
    """SQLite: one bounded step of merging the FTS5 index's segments into one; True while
    there is work left. Deleting a row from an FTS5 index only adds a delete marker (unless
    its ``secure-delete`` option is on, see :func:`prepare_delete`): the deleted words stay
    in the older segments until they are merged with the marker. A negative ``merge``
    merges every segment, whatever its level (an incremental ``optimize``); the old
    segments' pages are freed, and ``secure_delete`` zeroes them."""
    before = conn.exec_driver_sql("SELECT total_changes()").scalar()
    conn.exec_driver_sql(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rank) VALUES ('merge', -{int(pages)})")
    after = conn.exec_driver_sql("SELECT total_changes()").scalar()
    # FTS5's documented test: a delta of 2 or more means the command merged something.
    return int(after) - int(before) >= 2


def prepare_delete(conn: Any, conversation_id: str) -> bool:
    """Before deleting a conversation in ``conn``'s transaction: True when the search index
    must be compacted afterwards (:func:`compact_step` until done) for the conversation's
    words to leave it.

    On SQLite 3.44 or later, FTS5's ``secure-delete`` option is turned on (once; it is
    stored in the index), and FTS5 then removes a deleted row's words from its segments
    at once: no compaction is needed, except once when the option is first turned on, for
    words older deletions left. Older SQLite versions cannot read or write the index once
    the option is on, which is why it is only turned on by a SQLite that has it. Before
    3.44 the whole index is merged after the delete, which costs time in proportion to its
    size (see benchmarks/README.md). Postgres needs neither (see the README on VACUUM)."""
    if conn.dialect.name != "sqlite":
        return False
    # Pending rows (above the mark) are not in FTS5: deleting them leaves nothing to merge.
    indexed = conn.exec_driver_sql(
        f"SELECT 1 FROM {SEARCH_TABLE} WHERE conversation_id = ?"
        f" AND id <= (SELECT indexed_to FROM {MARK_TABLE}) LIMIT 1",
        (conversation_id,),
    ).first()
    if indexed is None:
        return False
    if tuple(conn.dialect.server_version_info or ()) < FTS5_SECURE_DELETE_SINCE:
        return True
    already = conn.exec_driver_sql(f"SELECT v FROM {FTS_TABLE}_config WHERE k = 'secure-delete'").scalar()
    if already is not None and int(already) == 1:
        return False
    conn.exec_driver_sql(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rank) VALUES ('secure-delete', 1)")
    return True


_INDEX_PENDING = (
    f"INSERT INTO {FTS_TABLE} (rowid, body, parts)"
    f" SELECT id, body, parts FROM {SEARCH_TABLE} WHERE id > (SELECT indexed_to FROM {MARK_TABLE})"
)
_MOVE_MARK = (
    f"UPDATE {MARK_TABLE} SET indexed_to = max(indexed_to, coalesce((SELECT max(id) FROM {SEARCH_TABLE}), 0))"
)


def index_pending(conn: Any) -> None:
    """SQLite: copy the pending search rows into the FTS5 index now, in ``conn``'s write
    transaction (what the insert trigger does every ``FTS5_BATCH`` rows; the tests use it)."""
    conn.exec_driver_sql(_INDEX_PENDING)
    conn.exec_driver_sql(_MOVE_MARK)


def copy_rows(conn: Any, *, source: str, new: str, at: int) -> None:
    """Copy the search rows of messages 1..``at`` of ``source`` to the fork ``new``."""
    conn.execute(_COPY[conn.dialect.name], {"source": source, "new": new, "at": at})


def _owner_sql(owner: str | None) -> str:
    return "c.owner IS NULL" if owner is None else "c.owner = :owner"


def _sqlite_matches_sql(*, owner: str | None, conversation: str | None, candidates: str | None = None) -> str:
    only = " AND c.id = :cid" if conversation is not None else ""
    # bm25 is lower-is-better; parts count half as much as whole words. The inner query
    # walks the matches newest first (FTS5 iterates rowids in either order) and stops
    # after SEARCH_CANDIDATES of this owner: ranking every match of a frequent word
    # would cost time in proportion to the whole history.
    return (
        "SELECT conversation_id, seq, rank FROM ("
        f"SELECT d.conversation_id AS conversation_id, d.seq AS seq,"
        f" -bm25({FTS_TABLE}, 1.0, 0.5) AS rank"
        f" FROM {FTS_TABLE} JOIN {SEARCH_TABLE} d ON d.id = {FTS_TABLE}.rowid"
        f" JOIN conversations c ON c.id = d.conversation_id"
        f" WHERE {FTS_TABLE} MATCH :query AND {_owner_sql(owner)}{only}"
        f" ORDER BY {FTS_TABLE}.rowid DESC LIMIT {candidates or SEARCH_CANDIDATES})"
        " ORDER BY rank DESC, conversation_id, seq LIMIT :limit"
    )


_PENDING_ROWS = (
    f"SELECT s.id, s.conversation_id, s.seq, s.body, s.parts, c.owner FROM {SEARCH_TABLE} s"
    " JOIN conversations c ON c.id = s.conversation_id"
    f" WHERE s.id > (SELECT indexed_to FROM {MARK_TABLE}) ORDER BY s.id DESC"
)


def _pending_hits(
    conn: Any, query: Query, *, owner: str | None, conversation: str | None, limit: int
) -> tuple[list[tuple[str, int, float]], int] | None:
    """SQLite: the matches among the pending search rows (not yet in FTS5), or None when
    none of this owner's match (the FTS5 query alone is then the whole answer).

    Otherwise ``(hits, candidates)``: the best ``limit`` pending matches as
    ``(conversation_id, seq, rank)`` and how many of the FTS5 index's newest matches are
    still to be ranked with them. Pending rows are newer than every indexed row, so they
    are the first of the SEARCH_CANDIDATES newest matches. Each is ranked with the
    statistics FTS5 will rank it with once copied: the index's row and token totals and
    each phrase's matching rows, plus the pending rows' (at most FTS5_BATCH - 1, store-wide
    like FTS5's own statistics)."""
    rows = conn.exec_driver_sql(_PENDING_ROWS).all()
    if not rows:
        return None
    phrases = _fts5.compile_query(query)
    # Each row's tokens are made only when its text holds every token of a phrase (a
    # substring test): most rows, for most queries, are never tokenized.
    texts = [_fts5.folded(row.body, row.parts) for row in rows]
    docs: dict[int, _fts5.Row] = {}

    def doc(index: int) -> _fts5.Row:
        if index not in docs:
            docs[index] = _fts5.Row.of(rows[index].body, rows[index].parts)
        return docs[index]

    frequencies: dict[tuple[int, int], float] = {}

    def found(index: int, number: int) -> float:
        if (index, number) not in frequencies:
            phrase = phrases[number]
            frequencies[index, number] = (
                _fts5.frequency(phrase, doc(index)) if _fts5.may_contain(phrase, texts[index]) else 0.0
            )
        return frequencies[index, number]

    mine = [
        index
        for index, row in enumerate(rows)
        if row.owner == owner
        and (conversation is None or row.conversation_id == conversation)
        and all(found(index, number) > 0 for number in range(len(phrases)))
    ][:SEARCH_CANDIDATES]
    if not mine:
        return None
    indexed_rows, indexed_tokens = _fts5_totals(conn)
    matching = []
    for number, phrase in enumerate(phrases):
        count = sum(1 for index in range(len(rows)) if found(index, number) > 0)
        if indexed_rows:
            count += conn.exec_driver_sql(
                f"SELECT count(*) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ?", (phrase.expression,)
            ).scalar()
        matching.append(count)
    pending_tokens = sum(
        docs[index].size if index in docs else _fts5.count_tokens(row.body, row.parts)
        for index, row in enumerate(rows)
    )
    stats = _fts5.Stats(
        rows=indexed_rows + len(rows), tokens=indexed_tokens + pending_tokens, matching=tuple(matching)
    )
    found_hits = sorted(
        (
            (
                rows[i].conversation_id,
                rows[i].seq,
                _fts5.bm25(stats, [found(i, number) for number in range(len(phrases))], doc(i).size),
            )
            for i in mine
        ),
        key=lambda hit: (-hit[2], hit[0], hit[1]),
    )
    return found_hits[:limit], SEARCH_CANDIDATES - len(mine)


def _fts5_totals(conn: Any) -> tuple[int, int]:
    """The FTS5 index's row count and total tokens (all columns), as ``bm25`` reads them:
    FTS5 keeps them in its "averages" record (id 1 of its ``_data`` table), SQLite
    varints: the rows, then each column's tokens. (0, 0) for an index never written."""
    block = conn.exec_driver_sql(f"SELECT block FROM {FTS_TABLE}_data WHERE id = 1").scalar()
    if not block:
        return 0, 0
    values = []
    position = 0
    data = bytes(block)
    while position < len(data):
        value, position = _varint(data, position)
        values.append(value)
    return values[0], sum(values[1:])


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """An SQLite varint: big-endian 7-bit groups, the high bit saying more follow; a ninth
    byte gives 8 bits."""
    value = 0
    for index in range(9):
        byte = data[position + index]
        if index == 8:
            return (value << 8) | byte, position + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, position + index + 1
    raise AssertionError("unreachable")


def _pg_recent_sql(*, owner: str | None, conversation: str | None) -> str:
    """Postgres, first step: the owner's newest PG_RECENT_WINDOW search rows (most recently
    active conversation first, its newest message first), each with its rank when it
    matches (NULL when not), best first, with how many rows were walked and how many
    matched. A nested loop over the (owner, updated_at) index of conversations and the
    primary key of message_search: it reads those rows and no others, however many
    messages match in the whole history. ``ts_match_vq`` is ``@@`` written as a function,
    which the planner does not turn into a GIN scan (one per conversation would cost more
    than the walk)."""
    only = " AND c.id = :cid" if conversation is not None else ""
    # ORDER BY c.owner too: the index is (owner, updated_at), and "owner IS NULL" (unlike
    # "owner = x") does not tell the planner that the index is in updated_at order. Rows of
    # conversations last active at the same instant come in the index's order.
    walk = (
        "SELECT s.conversation_id, s.seq, s.document FROM conversations c CROSS JOIN LATERAL"
        f" (SELECT s.conversation_id, s.seq, s.document FROM {SEARCH_TABLE} s"
        " WHERE s.conversation_id = c.id ORDER BY s.seq DESC) s"
        f" WHERE {_owner_sql(owner)}{only}"
        f" ORDER BY c.owner DESC, c.updated_at DESC LIMIT {PG_RECENT_WINDOW}"
    )
    return (
        "WITH r AS (SELECT w.conversation_id, w.seq,"
        " CASE WHEN ts_match_vq(w.document, CAST(:query AS tsquery))"
        " THEN ts_rank(w.document, CAST(:query AS tsquery)) END AS rank"
        f" FROM ({walk}) w)"
        " SELECT b.conversation_id, b.seq, b.rank, t.walked, t.matched"
        " FROM (SELECT count(*) AS walked, count(rank) AS matched FROM r) t"
        " LEFT JOIN LATERAL (SELECT conversation_id, seq, rank FROM r WHERE rank IS NOT NULL"
        " ORDER BY rank DESC, conversation_id, seq LIMIT :limit) b ON true"
    )


def _pg_indexed_sql(*, owner: str | None, conversation: str | None) -> str:
    """Postgres, second step: matches found through the GIN index, at most
    SEARCH_CANDIDATES + 1 of them (in no particular order), best first, with their count."""
    only = " AND c.id = :cid" if conversation is not None else ""
    return (
        "SELECT conversation_id, seq, rank, count(*) OVER () AS matched FROM ("
        "SELECT s.conversation_id, s.seq, ts_rank(s.document, CAST(:query AS tsquery)) AS rank"
        f" FROM {SEARCH_TABLE} s JOIN conversations c ON c.id = s.conversation_id"
        f" WHERE s.document @@ CAST(:query AS tsquery) AND {_owner_sql(owner)}{only}"
        f" LIMIT {SEARCH_CANDIDATES + 1}) g"
        " ORDER BY rank DESC, conversation_id, seq LIMIT :limit"
    )


def _pg_best(conn: Any, params: dict[str, Any], *, owner: str | None, conversation: str | None) -> list[Any]:
    """Postgres: the best ``limit`` matches as (conversation_id, seq, rank) rows.

    GIN finds the messages that match but cannot order them, and ranking every match of a
    word in a tenth of a million messages reads each of their rows (0.4-0.5 s). So:

    1. Walk the owner's newest PG_RECENT_WINDOW messages and rank those that match. If that
       walked all of the owner's messages, or found at least PG_FREQUENT_MATCHES matches and
       at least ``limit`` (a frequent word: a full page of recent hits), those are the result.
    2. Otherwise find the matches through the GIN index, at most SEARCH_CANDIDATES + 1: if
       there are no more than SEARCH_CANDIDATES, all of them are ranked (exact).
    3. Otherwise (more matches than that, few of them recent) the recent matches and those
       the index found are ranked together, so a page is full whenever there are enough
       matches.
    """
    recent = conn.execute(text(_pg_recent_sql(owner=owner, conversation=conversation)), params).all()
    found = [row for row in recent if row.rank is not None]
    # A full page of recent hits: at least PG_FREQUENT_MATCHES, and never fewer than asked for.
    if recent[0].walked < PG_RECENT_WINDOW or recent[0].matched >= max(PG_FREQUENT_MATCHES, params["limit"]):
        return found
    indexed = conn.execute(text(_pg_indexed_sql(owner=owner, conversation=conversation)), params).all()
    if not indexed or indexed[0].matched <= SEARCH_CANDIDATES:
        return indexed
    both = {(row.conversation_id, row.seq): row for row in (*indexed, *found)}
    best = sorted(both.values(), key=lambda row: (-row.rank, row.conversation_id, row.seq))
    return best[: params["limit"]]


def search_rows(
    conn: Any, query: Query, *, owner: str | None, limit: int, conversation: str | None
) -> list[Any]:
    """The best ``limit`` matches, best first, with their message and conversation columns."""
    dialect = conn.dialect.name
    params: dict[str, Any] = {
        "query": query.fts5() if dialect == "sqlite" else query.tsquery(),
        "limit": limit,
    }
    if owner is not None:
        params["owner"] = owner
    if conversation is not None:
        params["cid"] = conversation
    order = ""
    if dialect == "sqlite":
        pending = _pending_hits(conn, query, owner=owner, conversation=conversation, limit=limit)
        if pending is None:
            hits = f"({_sqlite_matches_sql(owner=owner, conversation=conversation)}) AS h"
        else:
            found, candidates = pending
            parts = [
                f"SELECT :c{i} AS conversation_id, :s{i} AS seq, :r{i} AS rank" for i in range(len(found))
            ]
            for i, (cid, seq, rank) in enumerate(found):
                params.update({f"c{i}": cid, f"s{i}": seq, f"r{i}": rank})
            if candidates > 0:
                params["candidates"] = candidates
                indexed = _sqlite_matches_sql(
                    owner=owner, conversation=conversation, candidates=":candidates"
                )
                parts.insert(0, f"SELECT * FROM ({indexed})")
            hits = f"({' UNION ALL '.join(parts)}) AS h"
            order = " LIMIT :limit"
    else:
        best = _pg_best(conn, params, owner=owner, conversation=conversation)
        if not best:
            return []
        hits = (
            "unnest(CAST(:cids AS varchar[]), CAST(:seqs AS integer[]), CAST(:ranks AS float8[]))"
            " AS h (conversation_id, seq, rank)"
        )
        params = {
            "cids": [row.conversation_id for row in best],
            "seqs": [row.seq for row in best],
            "ranks": [row.rank for row in best],
        }
    statement = text(
        f"SELECT h.conversation_id, h.seq, h.rank, m.role, m.content, m.status, m.created_at, c.title"
        f" FROM {hits}"
        " JOIN messages m ON m.conversation_id = h.conversation_id AND m.seq = h.seq"
        " JOIN conversations c ON c.id = h.conversation_id"
        f" ORDER BY h.rank DESC, h.conversation_id, h.seq{order}"
    ).columns(
        conversation_id=String(),
        seq=Integer(),
        rank=Float(),
        role=String(),
        content=JSON(none_as_null=True),
        status=String(),
        created_at=UTCDateTime(),
        title=Text(),
    )
    return list(conn.execute(statement, params))
