"""usage rollup: the ledger's tokens and cost per owner and UTC day, hour and quarter hour

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

``usage_rollup`` holds ``sum(total_tokens)`` and ``sum(cost_micros)`` (NULL as 0) of
``usage_events`` per owner ('' for no owner) and UTC bucket (``span_minutes`` 1440, 60 or 15,
``start_minute`` in minutes since the Unix epoch), so a quota check reads a few dozen rows
instead of summing the owner's month of ledger rows (see gilas_conv/store/_schema.py).

The backfill groups the ledger by owner and UTC quarter hour in SQL (what Python holds is
those groups, at most one per owner and quarter, not the ledger's rows), and folds each
owner's quarters into hours and days before writing them. Downgrade drops the table; the ledger is untouched.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SPANS = (1440, 60, 15)
INSERT_BATCH = 5000
_EPOCH = dt.datetime(1970, 1, 1)

# The UTC quarter hour of created_at as 'YYYY-MM-DD HH:q' (q = 0..3), per dialect: SQLite
# stores 'YYYY-MM-DD HH:MM:SS[.ffffff]' in UTC.
_QUARTER = {
    "sqlite": "substr(created_at, 1, 14) || (CAST(substr(created_at, 15, 2) AS INTEGER) / 15)",
    "postgresql": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:') || "
    "(CAST(extract(minute FROM created_at AT TIME ZONE 'UTC') AS INTEGER) / 15)",
}


def upgrade() -> None:
    op.create_table(
        "usage_rollup",
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("span_minutes", sa.Integer(), nullable=False),
        sa.Column("start_minute", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("span_minutes IN (1440, 60, 15)", name=op.f("ck_usage_rollup_span_known")),
        sa.PrimaryKeyConstraint("owner", "span_minutes", "start_minute", name=op.f("pk_usage_rollup")),
        sqlite_with_rowid=False,
    )
    _backfill(op.get_bind())


def _backfill(conn: sa.Connection) -> None:
    quarter = _QUARTER[conn.dialect.name]
    rows = conn.execute(
        sa.text(
            f"SELECT coalesce(owner, '') AS owner, {quarter} AS q, "
            "coalesce(sum(total_tokens), 0) AS tokens, coalesce(sum(cost_micros), 0) AS cost "
            f"FROM usage_events GROUP BY coalesce(owner, ''), {quarter} ORDER BY 1"
        )
    )
    rollup = sa.table(
        "usage_rollup",
        sa.column("owner", sa.String()),
        sa.column("span_minutes", sa.Integer()),
        sa.column("start_minute", sa.BigInteger()),
        sa.column("total_tokens", sa.BigInteger()),
        sa.column("cost_micros", sa.BigInteger()),
    )
    owner: str | None = None
    buckets: dict[tuple[int, int], list[int]] = {}
    pending: list[dict[str, Any]] = []

    def flush_owner() -> None:
        for (span, start), (tokens, cost) in buckets.items():
            pending.append(
                {
                    "owner": owner,
                    "span_minutes": span,
                    "start_minute": start,
                    "total_tokens": tokens,
                    "cost_micros": cost,
                }
            )
        buckets.clear()
        if len(pending) >= INSERT_BATCH:
            conn.execute(sa.insert(rollup), pending)
            pending.clear()

    for row in rows.all():
        if row.owner != owner:
            flush_owner()
            owner = row.owner
        hour, q = row.q.rsplit(":", 1)
        start = dt.datetime.strptime(hour, "%Y-%m-%d %H") - _EPOCH
        minute = int(start.total_seconds()) // 60 + 15 * int(q)
        for span in SPANS:
            acc = buckets.setdefault((span, minute - minute % span), [0, 0])
            acc[0] += int(row.tokens)
            acc[1] += int(row.cost)
    flush_owner()
    if pending:
        conn.execute(sa.insert(rollup), pending)


def downgrade() -> None:
    op.drop_table("usage_rollup")
