"""full-text search: message_search (FTS5 on SQLite, tsvector + GIN on Postgres), backfilled

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

The search tables are not described by the SQLAlchemy models (an FTS5 virtual table cannot
be), so this migration writes their DDL per dialect; gilas_conv/store/_search.py explains
the design. Existing messages are indexed in batches, with the normalization of the
gilas-conv version that runs the upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from gilas_conv.store._search import index_values, insert_rows

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL_BATCH = 2000

_SQLITE = [
    """CREATE TABLE message_search (
        id INTEGER PRIMARY KEY,
        conversation_id VARCHAR(36) NOT NULL,
        seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        parts TEXT NOT NULL,
        CONSTRAINT uq_message_search_conversation_id_seq UNIQUE (conversation_id, seq),
        CONSTRAINT fk_message_search_messages FOREIGN KEY (conversation_id, seq)
            REFERENCES messages (conversation_id, seq) ON DELETE CASCADE
    )""",
    """CREATE VIRTUAL TABLE message_search_fts USING fts5(
        body, parts, content='message_search', content_rowid='id', tokenize='ascii'
    )""",
    """CREATE TRIGGER message_search_ai AFTER INSERT ON message_search BEGIN
        INSERT INTO message_search_fts (rowid, body, parts) VALUES (new.id, new.body, new.parts);
    END""",
    """CREATE TRIGGER message_search_ad AFTER DELETE ON message_search BEGIN
        INSERT INTO message_search_fts (message_search_fts, rowid, body, parts)
        VALUES ('delete', old.id, old.body, old.parts);
    END""",
]

_POSTGRES = [
    """CREATE TABLE message_search (
        conversation_id VARCHAR(36) NOT NULL,
        seq INTEGER NOT NULL,
        document TSVECTOR NOT NULL,
        CONSTRAINT pk_message_search PRIMARY KEY (conversation_id, seq),
        CONSTRAINT fk_message_search_messages FOREIGN KEY (conversation_id, seq)
            REFERENCES messages (conversation_id, seq) ON DELETE CASCADE
    )""",
    "CREATE INDEX ix_message_search_document ON message_search USING gin (document)",
]


def upgrade() -> None:
    conn = op.get_bind()
    for statement in _SQLITE if conn.dialect.name == "sqlite" else _POSTGRES:
        op.execute(statement)
    _backfill(conn)


def _backfill(conn: sa.Connection) -> None:
    messages = sa.table(
        "messages",
        sa.column("conversation_id", sa.String()),
        sa.column("seq", sa.Integer()),
        sa.column("role", sa.String()),
        sa.column("content", sa.JSON(none_as_null=True)),
    )
    c = messages.c
    last: tuple[str, int] | None = None
    while True:
        query = (
            sa.select(c.conversation_id, c.seq, c.role, c.content)
            .where(c.role.in_(("user", "assistant", "tool")))
            .order_by(c.conversation_id, c.seq)
            .limit(BACKFILL_BATCH)
        )
        if last is not None:
            query = query.where(sa.tuple_(c.conversation_id, c.seq) > sa.tuple_(*last))
        batch = conn.execute(query).all()
        if not batch:
            return
        rows = []
        for row in batch:
            indexed = index_values(conn.dialect.name, row.role, row.content)
            if indexed is not None:
                rows.append({"cid": row.conversation_id, "seq": row.seq, **indexed})
        insert_rows(conn, rows)
        last = (batch[-1].conversation_id, batch[-1].seq)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER message_search_ad")
        op.execute("DROP TRIGGER message_search_ai")
        op.execute("DROP TABLE message_search_fts")
    op.execute("DROP TABLE message_search")
