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
    matched.) Two triggers keep the FTS5 index in step with ``message_search``; its rows
    reference their message with ``ON DELETE CASCADE``, so deleting a conversation deletes
    its search rows and their index entries in the same transaction.

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

from ..search._normalize import index_terms, index_text
from ..search._query import Query
from ..search._snippet import searchable_text
from ._schema import UTCDateTime

__all__ = [
    "SEARCH_TABLE",
    "compact_step",
    "copy_rows",
    "index_values",
    "insert_rows",
    "prepare_delete",
    "search_rows",
    "unmodeled_table",
]

SEARCH_TABLE = "message_search"
FTS_TABLE = "message_search_fts"

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
    indexed = conn.exec_driver_sql(
        f"SELECT 1 FROM {SEARCH_TABLE} WHERE conversation_id = ? LIMIT 1", (conversation_id,)
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


def copy_rows(conn: Any, *, source: str, new: str, at: int) -> None:
    """Copy the search rows of messages 1..``at`` of ``source`` to the fork ``new``."""
    conn.execute(_COPY[conn.dialect.name], {"source": source, "new": new, "at": at})


def _owner_sql(owner: str | None) -> str:
    return "c.owner IS NULL" if owner is None else "c.owner = :owner"


def _sqlite_matches_sql(*, owner: str | None, conversation: str | None) -> str:
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
        f" ORDER BY {FTS_TABLE}.rowid DESC LIMIT {SEARCH_CANDIDATES})"
        " ORDER BY rank DESC, conversation_id, seq LIMIT :limit"
    )


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
    if dialect == "sqlite":
        hits = f"({_sqlite_matches_sql(owner=owner, conversation=conversation)}) AS h"
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
        " ORDER BY h.rank DESC, h.conversation_id, h.seq"
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
