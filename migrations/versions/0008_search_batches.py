"""search: SQLite copies search rows into FTS5 in batches, behind a high-water mark

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

FTS5 charges a fixed price per transaction that writes it, about as much as the rest of
indexing an append (benchmarks/README.md), so the search rows of appends are no longer
copied into it one transaction at a time. ``message_search_mark`` holds ``indexed_to``:
the search rows with an id at or below it are in the FTS5 index, those above it are
pending. The insert trigger now copies the pending rows when there are ``BATCH`` of them
(in the inserting transaction); the delete trigger touches FTS5 only for rows at or below
the mark, and then, when the newest rows are deleted, brings the mark down to the highest id left, so
SQLite's reuse of their ids cannot put a new row at or below it (the store never chooses
a row's id). Every existing row is indexed (0004's trigger
wrote each), so the mark starts at the highest id. gilas_conv/store/_search.py explains
the design and how a search sees the pending rows. Postgres is unchanged (its index costs an append nothing
measurable). Downgrade copies the pending rows into FTS5 and restores 0004's triggers.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Pending rows that make an insert copy them into FTS5 (gilas_conv/store/_search.py's
# FTS5_BATCH; measured in benchmarks/README.md).
BATCH = 128

_MARK = "(SELECT indexed_to FROM message_search_mark)"

_UPGRADE = [
    """CREATE TABLE message_search_mark (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        indexed_to INTEGER NOT NULL
    )""",
    "INSERT INTO message_search_mark (id, indexed_to) SELECT 1, coalesce(max(id), 0) FROM message_search",
    "DROP TRIGGER message_search_ai",
    "DROP TRIGGER message_search_ad",
    f"""CREATE TRIGGER message_search_ai AFTER INSERT ON message_search
    WHEN new.id >= {_MARK} + {BATCH} BEGIN
        INSERT INTO message_search_fts (rowid, body, parts)
            SELECT id, body, parts FROM message_search WHERE id > {_MARK};
        UPDATE message_search_mark SET indexed_to = (SELECT max(id) FROM message_search);
    END""",
    # One trigger, its two statements in this order: the FTS5 entry of a deleted row at or
    # below the mark is deleted first, then the mark comes down. (Two triggers would run in
    # an order SQLite does not promise: lowering the mark first would leave the newest row's
    # entry in FTS5, its words found under the next row that reuses its id.) Deleting the
    # newest rows would let SQLite give their ids to the next rows, at or below the mark; the
    # mark comes down to the highest id left instead (every row at or below it is indexed),
    # so new rows are pending as they should be.
    f"""CREATE TRIGGER message_search_ad AFTER DELETE ON message_search BEGIN
        INSERT INTO message_search_fts (message_search_fts, rowid, body, parts)
            SELECT 'delete', old.id, old.body, old.parts WHERE old.id <= {_MARK};
        UPDATE message_search_mark
        SET indexed_to = min(indexed_to, coalesce((SELECT max(id) FROM message_search), 0))
        WHERE old.id >= indexed_to;
    END""",
]

_DOWNGRADE = [
    f"""INSERT INTO message_search_fts (rowid, body, parts)
        SELECT id, body, parts FROM message_search WHERE id > {_MARK}""",
    "DROP TRIGGER message_search_ai",
    "DROP TRIGGER message_search_ad",
    "DROP TABLE message_search_mark",
    # 0004's triggers, as it wrote them.
    """CREATE TRIGGER message_search_ai AFTER INSERT ON message_search BEGIN
        INSERT INTO message_search_fts (rowid, body, parts) VALUES (new.id, new.body, new.parts);
    END""",
    """CREATE TRIGGER message_search_ad AFTER DELETE ON message_search BEGIN
        INSERT INTO message_search_fts (message_search_fts, rowid, body, parts)
        VALUES ('delete', old.id, old.body, old.parts);
    END""",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in _UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in _DOWNGRADE:
            op.execute(statement)
