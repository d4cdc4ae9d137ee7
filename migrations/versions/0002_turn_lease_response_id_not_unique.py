"""turn lease on conversations; a response id is no longer unique per conversation

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

``conversations`` gains ``lease_token`` and ``lease_expires_at`` (the turn lease: one request
answers a conversation at a time). The unique index ``uq_messages_response`` becomes the
plain index ``ix_messages_response``: servers reuse response ids, and the unique index made
a new reply with a reused id be dropped as "already stored".

Downgrade keeps every message. Where replies of one conversation share a response id, only
the earliest keeps it (the old unique index allows one) and the later ones lose the label,
not the reply. The lease columns are dropped in place (``ALTER TABLE ... DROP COLUMN``,
SQLite 3.35+, which the store's ``RETURNING`` already needs), never by batch-rebuilding
``conversations``: with foreign keys on, SQLite's ``DROP TABLE`` of the old table would
cascade-delete every message.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HAS_RESPONSE_ID = "response_id IS NOT NULL"


def upgrade() -> None:
    op.add_column("conversations", sa.Column("lease_token", sa.String(length=36), nullable=True))
    op.add_column("conversations", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_index(
        "uq_messages_response",
        table_name="messages",
        postgresql_where=sa.text(_HAS_RESPONSE_ID),
        sqlite_where=sa.text(_HAS_RESPONSE_ID),
    )
    op.create_index(
        "ix_messages_response",
        "messages",
        ["conversation_id", "response_id"],
        unique=False,
        postgresql_where=sa.text(_HAS_RESPONSE_ID),
        sqlite_where=sa.text(_HAS_RESPONSE_ID),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_messages_response",
        table_name="messages",
        postgresql_where=sa.text(_HAS_RESPONSE_ID),
        sqlite_where=sa.text(_HAS_RESPONSE_ID),
    )
    op.execute(
        "UPDATE messages SET response_id = NULL WHERE response_id IS NOT NULL AND EXISTS ("
        "SELECT 1 FROM messages AS earlier WHERE earlier.conversation_id = messages.conversation_id"
        " AND earlier.response_id = messages.response_id AND earlier.seq < messages.seq)"
    )
    op.create_index(
        "uq_messages_response",
        "messages",
        ["conversation_id", "response_id"],
        unique=True,
        postgresql_where=sa.text(_HAS_RESPONSE_ID),
        sqlite_where=sa.text(_HAS_RESPONSE_ID),
    )
    op.drop_column("conversations", "lease_expires_at")
    op.drop_column("conversations", "lease_token")
