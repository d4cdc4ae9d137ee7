"""running token totals: messages.tokens_total and conversations.tokens_total, backfilled

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

``messages.tokens_total`` is the running sum of ``tokens`` within the conversation up to and
including the message; ``conversations.tokens_total`` is the sum so far, advanced by the
append's ``UPDATE``. With the index on ``(conversation_id, tokens_total)`` the window reader
finds in one seek where the newest N tokens begin, and reads that range instead of reading
newest rows in batches until the budget is spent. The totals are a hint for how far to read
(see gilas_conv/store/_window.py), so stale values never change what is sent.

Existing messages are backfilled in batches of ``BACKFILL_BATCH`` rows, in (conversation,
seq) order, each conversation's running total carried from one batch to the next. Downgrade
drops the index and the columns in place (``ALTER TABLE ... DROP COLUMN``, never a batch
rebuild of ``conversations``, whose ``DROP TABLE`` would cascade-delete every message).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
# 0005 (usage ledger) is being written beside this one; the two are chained when merged.
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL_BATCH = 5000
_INDEX = "ix_messages_conversation_id_tokens_total"


def upgrade() -> None:
    op.add_column("messages", sa.Column("tokens_total", sa.Integer(), nullable=True))
    op.add_column(
        "conversations",
        sa.Column("tokens_total", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    _backfill(op.get_bind())
    op.create_index(_INDEX, "messages", ["conversation_id", "tokens_total"], unique=False)


def _backfill(conn: sa.Connection) -> None:
    messages = sa.table(
        "messages",
        sa.column("conversation_id", sa.String()),
        sa.column("seq", sa.Integer()),
        sa.column("tokens", sa.Integer()),
        sa.column("tokens_total", sa.Integer()),
    )
    conversations = sa.table(
        "conversations", sa.column("id", sa.String()), sa.column("tokens_total", sa.Integer())
    )
    c = messages.c
    set_total = (
        sa.update(messages)
        .where(c.conversation_id == sa.bindparam("m_cid"), c.seq == sa.bindparam("m_seq"))
        .values(tokens_total=sa.bindparam("m_total"))
    )
    set_conversation = (
        sa.update(conversations)
        .where(conversations.c.id == sa.bindparam("c_id"))
        .values(tokens_total=sa.bindparam("c_total"))
    )
    last: tuple[str, int] | None = None
    running = 0
    while True:
        query = (
            sa.select(c.conversation_id, c.seq, c.tokens)
            .order_by(c.conversation_id, c.seq)
            .limit(BACKFILL_BATCH)
        )
        if last is not None:
            query = query.where(sa.tuple_(c.conversation_id, c.seq) > sa.tuple_(*last))
        batch = conn.execute(query).all()
        if not batch:
            break
        updates = []
        ended: dict[str, int] = {}
        for row in batch:
            if last is None or row.conversation_id != last[0]:
                running = 0
            running += row.tokens or 0
            updates.append({"m_cid": row.conversation_id, "m_seq": row.seq, "m_total": running})
            ended[row.conversation_id] = running
            last = (row.conversation_id, row.seq)
        conn.execute(set_total, updates)
        conn.execute(set_conversation, [{"c_id": cid, "c_total": total} for cid, total in ended.items()])


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="messages")
    op.drop_column("messages", "tokens_total")
    op.drop_column("conversations", "tokens_total")
