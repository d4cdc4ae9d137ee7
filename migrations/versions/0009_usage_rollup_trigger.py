"""usage: SQLite adds each ledger row to the rollup by a trigger

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

On SQLite a reply's ledger row was added to ``usage_rollup`` by an upsert of its own, a
statement that cost a turn about as much again as the ledger row's insert (most of either
is SQLAlchemy's per-statement work, not SQLite's). An ``AFTER INSERT`` trigger on
``usage_events`` now does that upsert inside the insert: the same three buckets (UTC day,
hour and quarter hour of ``created_at``, whole minutes since the epoch; no owner as
``''``; no cost as 0), in the same transaction, so the rollup is still the ledger summed
(gilas_conv/store/_usage.py). ``created_at`` is stored as 'YYYY-MM-DD HH:MM:SS[.ffffff]'
in UTC; the fraction is cut off before ``strftime('%s')`` reads it (SQLite would round
it to the millisecond: 23:59:59.9999 would land in the next day), as Python's minute
floor drops it. The ledger
is never deleted from (erasure and prune keep it), so no other trigger is needed.
Postgres is unchanged: its reply statement writes the ledger row and its rollup in one
statement already. Downgrade drops the trigger (the rollup written so far stays right).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The rollup's bucket lengths in minutes (gilas_conv/store/_schema.py's ROLLUP_SPANS).
_SPANS = (1440, 60, 15)
_SPAN_ROWS = " UNION ALL ".join(f"SELECT {span} AS span" for span in _SPANS)

_UPGRADE = f"""CREATE TRIGGER usage_events_rollup AFTER INSERT ON usage_events BEGIN
    INSERT INTO usage_rollup (owner, span_minutes, start_minute, total_tokens, cost_micros)
        SELECT coalesce(new.owner, ''), s.span, m.minute - m.minute % s.span,
            new.total_tokens, coalesce(new.cost_micros, 0)
        FROM (SELECT CAST(strftime('%s', substr(new.created_at, 1, 19)) AS INTEGER) / 60 AS minute) AS m,
            ({_SPAN_ROWS}) AS s
        WHERE true
        ON CONFLICT (owner, span_minutes, start_minute) DO UPDATE SET
            total_tokens = usage_rollup.total_tokens + excluded.total_tokens,
            cost_micros = usage_rollup.cost_micros + excluded.cost_micros;
END"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(_UPGRADE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER usage_events_rollup")
