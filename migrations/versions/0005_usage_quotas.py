"""usage ledger, quotas and settings; the ledger backfilled from stored replies and summaries

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows read and written per statement while backfilling, so a large history never sits in
# memory at once.
_BATCH = 5000

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("conversation_id", sa.String(length=36), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('reply', 'summary')", name=op.f("ck_usage_events_kind_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_events")),
    )
    op.create_index(op.f("ix_usage_events_owner_created_at"), "usage_events", ["owner", "created_at"])
    op.create_index(op.f("ix_usage_events_created_at"), "usage_events", ["created_at"])
    op.create_table(
        "quota_limits",
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("daily_tokens", sa.BigInteger(), nullable=True),
        sa.Column("monthly_tokens", sa.BigInteger(), nullable=True),
        sa.Column("daily_cost_micros", sa.BigInteger(), nullable=True),
        sa.Column("monthly_cost_micros", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_quota_limits")),
    )
    op.create_table(
        "quota_reservations",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_reservations")),
    )
    op.create_index(
        op.f("ix_quota_reservations_owner_expires_at"), "quota_reservations", ["owner", "expires_at"]
    )
    op.create_table(
        "settings",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_settings")),
    )
    _backfill(op.get_bind())


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_index(op.f("ix_quota_reservations_owner_expires_at"), table_name="quota_reservations")
    op.drop_table("quota_reservations")
    op.drop_table("quota_limits")
    op.drop_index(op.f("ix_usage_events_created_at"), table_name="usage_events")
    op.drop_index(op.f("ix_usage_events_owner_created_at"), table_name="usage_events")
    op.drop_table("usage_events")


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _numbers(usage: Any) -> dict[str, int] | None:
    """The ledger's token columns from a stored ``usage`` dict (None when it has none).
    Kept here, not imported from the package, so this migration never changes meaning."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens")) or prompt + completion
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    if not (prompt or completion or total):
        return None
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "cached_tokens": cached,
    }


def _backfill(conn: sa.Connection) -> None:
    """One ledger row per stored reply and summary that carries usage. Costs stay NULL:
    no price was recorded with them, and none is invented."""
    meta = sa.MetaData()
    conversations = sa.Table(
        "conversations", meta, sa.Column("id", sa.String(36)), sa.Column("owner", sa.String(255))
    )
    messages = sa.Table(
        "messages",
        meta,
        sa.Column("conversation_id", sa.String(36)),
        sa.Column("seq", sa.Integer),
        sa.Column("role", sa.String(16)),
        sa.Column("model", sa.String(255)),
        sa.Column("usage", sa.JSON(none_as_null=True)),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    summaries = sa.Table(
        "summaries",
        meta,
        sa.Column("conversation_id", sa.String(36)),
        sa.Column("to_seq", sa.Integer),
        sa.Column("model", sa.String(255)),
        sa.Column("usage", sa.JSON(none_as_null=True)),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    events = sa.Table(
        "usage_events",
        meta,
        sa.Column("owner", sa.String(255)),
        sa.Column("conversation_id", sa.String(36)),
        sa.Column("model", sa.String(255)),
        sa.Column("kind", sa.String(16)),
        sa.Column("prompt_tokens", sa.BigInteger),
        sa.Column("completion_tokens", sa.BigInteger),
        sa.Column("total_tokens", sa.BigInteger),
        sa.Column("cached_tokens", sa.BigInteger),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    for table, key, kind, extra in (
        (messages, messages.c.seq, "reply", messages.c.role == "assistant"),
        (summaries, summaries.c.to_seq, "summary", sa.true()),
    ):
        rows = []
        for row in _keyset(conn, table, key, conversations, extra):
            numbers = _numbers(row.usage)
            if numbers is None:
                continue
            rows.append(
                {
                    "owner": row.owner,
                    "conversation_id": row.conversation_id,
                    "model": row.model,
                    "kind": kind,
                    "created_at": row.created_at,
                    **numbers,
                }
            )
            if len(rows) >= _BATCH:
                conn.execute(sa.insert(events), rows)
                rows = []
        if rows:
            conn.execute(sa.insert(events), rows)


def _keyset(
    conn: sa.Connection, table: sa.Table, key: Any, conversations: sa.Table, extra: Any
) -> Iterator[Any]:
    """Rows with usage, in (conversation_id, key) order, read a batch at a time."""
    after: tuple[str, int] | None = None
    while True:
        query = (
            sa.select(
                table.c.conversation_id,
                key.label("k"),
                table.c.model,
                table.c.usage,
                table.c.created_at,
                conversations.c.owner,
            )
            .join(conversations, conversations.c.id == table.c.conversation_id)
            .where(table.c.usage.is_not(None), extra)
            .order_by(table.c.conversation_id, key)
            .limit(_BATCH)
        )
        if after is not None:
            query = query.where(sa.tuple_(table.c.conversation_id, key) > sa.tuple_(*after))
        batch = conn.execute(query).all()
        yield from batch
        if len(batch) < _BATCH:
            return
        after = (batch[-1].conversation_id, batch[-1].k)
