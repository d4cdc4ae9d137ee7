"""The usage ledger, its reports, and quotas: the SQL behind :meth:`ConversationStore.usage`,
``set_quota`` / ``reserve_quota`` and the ledger rows written with replies and summaries.

Cost is fixed when a request is recorded
    A ledger row's ``cost_micros`` is computed from the store's price table at the moment
    the reply (or summary) is stored, and never changes: a bill must not move when the
    operator edits tomorrow's prices. A report may be asked to price tokens at other prices
    (``usage(prices=...)``, ``gilas-conv usage --prices FILE``): that recomputes every
    group's cost from its tokens per model, at report time, and says nothing of what was
    recorded.

Quotas
    A request first takes a *reservation* (prompt tokens about to be sent + the reply's
    ``max_tokens``, or :data:`DEFAULT_QUOTA_RESERVATION`), in one write transaction that
    also reads what the owner used: on SQLite ``BEGIN IMMEDIATE`` serializes all writers;
    on Postgres a transaction-scoped advisory lock keyed by the owner serializes that
    owner's reservations on every host. ``used`` is the period's ledger total (read from
    the rollup below) plus the reservations still held; a request is refused when
    ``used + its reservation`` would pass a limit, so requests in flight together can never
    pass it by more than the difference between one reservation and that request's real
    usage. A sender's turn takes its reservation in the turn's own transaction, sized from
    the conversation's running token total (see :class:`QuotaAsk`). The reservation is
    deleted in the transaction that writes the reply's ledger row (settled), deleted when
    the request fails (released), and stops counting after :data:`RESERVATION_TTL`
    (a process that died holding it).

The rollup (what a quota check reads)
    ``usage_rollup`` is the ledger summed per owner and UTC day, hour and quarter hour:
    :func:`settle` adds each ledger row to its three buckets with one upsert (``INSERT ...
    ON CONFLICT DO UPDATE``, the same on SQLite and Postgres) in the transaction that
    inserts the row, and nothing else writes either table (erasure and prune keep the
    ledger), so the rollup never drifts from it. A period (a calendar day or month of the
    quota time zone, which starts on a quarter hour in every zone in use) is covered by
    whole UTC days, then hours, then quarter hours at its two ends (:func:`_cover`): a
    check reads at most 31 + 2*23 + 2*3 rows for a month and 2*23 + 2*3 for a day, however
    much the owner used. UTC buckets make the zone irrelevant to what is stored, so
    ``quota set --timezone`` rewrites nothing. A period bound that is not on a quarter hour
    (a historical offset) is summed from the ledger instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    Table,
    bindparam,
    column,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    update,
)

from .._prices import MICROS, Prices
from ..exceptions import QuotaExceeded
from ._schema import (
    ROLLUP_SPANS,
    QuotaLimitRow,
    QuotaReservationRow,
    SettingRow,
    UsageEventRow,
    UsageRollupRow,
)

__all__ = [
    "DEFAULT_QUOTA_RESERVATION",
    "DEFAULT_QUOTA_TIMEZONE",
    "GROUPINGS",
    "RESERVATION_TTL",
    "QuotaLimits",
    "QuotaStatus",
    "Reservation",
    "UsageRow",
]

_events = cast(Table, UsageEventRow.__table__)
_limits = cast(Table, QuotaLimitRow.__table__)
_reservations = cast(Table, QuotaReservationRow.__table__)
_settings = cast(Table, SettingRow.__table__)
_rollup = cast(Table, UsageRollupRow.__table__)

# Completion tokens reserved for a request that gives no max_tokens: the quota bound holds
# exactly only when the reply is capped, so pass max_tokens when a quota matters.
DEFAULT_QUOTA_RESERVATION = 4096
# A reservation not settled or released within this time stops counting: its process died
# (a reply that streams longer than this is still charged in full when it is stored).
RESERVATION_TTL = dt.timedelta(minutes=30)
DEFAULT_QUOTA_TIMEZONE = "UTC"
TIMEZONE_SETTING = "quota_timezone"
# The quota_limits row of the default (an empty owner name is never a valid owner).
DEFAULT_OWNER_KEY = ""
GROUPINGS = ("day", "month", "model", "owner", "conversation")
USAGE_KINDS = ("reply", "summary")
_LIMIT_FIELDS = ("daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost")


# ---------------------------------------------------------------------------------------------
# Ledger rows


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_numbers(usage: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The ledger's token columns from an API ``usage`` object, or None when it reports none."""
    if not isinstance(usage, Mapping):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens")) or prompt + completion
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    if not (prompt or completion or total):
        return None
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "cached_tokens": cached,
    }


def ledger_row(
    *,
    owner: str | None,
    conversation_id: str | None,
    model: str | None,
    kind: str,
    numbers: Mapping[str, int],
    prices: Prices | None,
    now: dt.datetime,
) -> dict[str, Any]:
    cost = None
    if prices is not None:
        cost = prices.cost_micros(
            model,
            prompt_tokens=numbers["prompt_tokens"],
            completion_tokens=numbers["completion_tokens"],
            cached_tokens=numbers["cached_tokens"],
        )
    return {
        "owner": owner,
        "conversation_id": conversation_id,
        "model": model,
        "kind": kind,
        **numbers,
        "cost_micros": cost,
        "currency": prices.currency if cost is not None and prices is not None else None,
        "created_at": now,
    }


INSERT_EVENT = insert(_events)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
# The rollup key of no owner (an empty owner name is never a valid owner).
UNOWNED_KEY = ""


def _minute(instant: dt.datetime) -> int:
    """Whole minutes since the Unix epoch (UTC) at or before ``instant``."""
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=dt.timezone.utc)
    return (instant - _EPOCH) // dt.timedelta(minutes=1)


# Adding to buckets, inserting those not there yet: the same text on SQLite (3.24+) and
# Postgres. A text statement, because SQLAlchemy does not cache the compiled form of its
# ON CONFLICT constructs (compiling it cost more than running it). _UPSERT_EVENT adds one
# ledger row to its three buckets, in one statement; _UPSERT_BUCKET one bucket a
# parameter set.
_ON_CONFLICT_ADD = (
    " ON CONFLICT (owner, span_minutes, start_minute) DO UPDATE SET"
    " total_tokens = usage_rollup.total_tokens + excluded.total_tokens,"
    " cost_micros = usage_rollup.cost_micros + excluded.cost_micros"
)
# One ledger row's three buckets, bound as rollup_increments names them.
_EVENT_BUCKETS = ", ".join(f"(:o, {span}, :s{span}, :t, :c)" for span in ROLLUP_SPANS)
_UPSERT_EVENT = text(
    "INSERT INTO usage_rollup (owner, span_minutes, start_minute, total_tokens, cost_micros) VALUES "
    + _EVENT_BUCKETS
    + _ON_CONFLICT_ADD
)
_UPSERT_BUCKET = text(
    "INSERT INTO usage_rollup (owner, span_minutes, start_minute, total_tokens, cost_micros) VALUES"
    " (:owner, :span_minutes, :start_minute, :total_tokens, :cost_micros)" + _ON_CONFLICT_ADD
)


def rollup_increments(event: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of ``_UPSERT_EVENT`` (and of the reply statement's rollup upsert on
    Postgres, see ``_store._append_statement``): one ledger row's three bucket increments."""
    minute = _minute(event["created_at"])
    return {
        "o": event["owner"] if event["owner"] is not None else UNOWNED_KEY,
        "t": event["total_tokens"],
        "c": event["cost_micros"] or 0,
        **{f"s{span}": minute - minute % span for span in ROLLUP_SPANS},
    }


# Postgres: the rollup upsert of a ledger row written in the same statement (charge_ctes),
# once per row of the ``added`` WITH before it.
_ROLLED_CTE = (
    text(
        "INSERT INTO usage_rollup (owner, span_minutes, start_minute, total_tokens, cost_micros)"
        " SELECT v.owner, v.span_minutes, v.start_minute, v.total_tokens, v.cost_micros"
        f" FROM added, (VALUES {_EVENT_BUCKETS})"
        " AS v (owner, span_minutes, start_minute, total_tokens, cost_micros)" + _ON_CONFLICT_ADD
    )
    .columns()
    .cte("rolled")
)
_EVENT_COLUMNS = [c for c in _events.c if c.name != "id"]


def charge_ctes(added: Any) -> list[Any]:
    """Postgres: the WITHs that write a ledger row (bound as ``e_<column>``) and add it to the
    rollup (bound as :func:`rollup_increments` names them), in the statement that appends
    the reply (``_store._append_statement``), once per row of ``added``: so the rollup stays
    the ledger summed there too."""
    row = select(*[bindparam(f"e_{c.name}", type_=c.type) for c in _EVENT_COLUMNS]).select_from(added)
    charged = insert(_events).from_select([c.name for c in _EVENT_COLUMNS], row).cte("charged")
    return [charged, _ROLLED_CTE]


def rollup_rows(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``usage_rollup`` increments of ledger rows: one per owner and bucket, summed."""
    buckets: dict[tuple[str, int, int], list[int]] = {}
    for event in events:
        owner = event["owner"] if event["owner"] is not None else UNOWNED_KEY
        minute = _minute(event["created_at"])
        for span in ROLLUP_SPANS:
            acc = buckets.setdefault((owner, span, minute - minute % span), [0, 0])
            acc[0] += event["total_tokens"]
            acc[1] += event["cost_micros"] or 0
    return [
        {"owner": o, "span_minutes": span, "start_minute": start, "total_tokens": t, "cost_micros": c}
        for (o, span, start), (t, c) in buckets.items()
    ]


def record_events(conn: Any, events: Sequence[Mapping[str, Any]]) -> None:
    """Insert ledger rows and add them to the rollup, in the caller's transaction: the only
    way ledger rows are written, so the rollup is always the ledger summed. Many rows at
    once (a bulk load) are summed per bucket first: one statement must not update a
    bucket twice (Postgres refuses it)."""
    if not events:
        return
    if len(events) == 1:
        (event,) = events
        conn.execute(INSERT_EVENT, event)
        # Last in the transaction: on Postgres the upsert locks the owner's bucket rows
        # until commit, so one owner's concurrent replies queue on them only for the commit.
        conn.execute(_UPSERT_EVENT, rollup_increments(event))
    else:
        conn.execute(INSERT_EVENT, list(events))
        conn.execute(_UPSERT_BUCKET, rollup_rows(events))


def settle(conn: Any, event: Mapping[str, Any] | None, reservation: Reservation | None) -> None:
    """Write a ledger row (and its rollup increments) and delete the reservation it settles,
    in the caller's transaction. A reservation already expired and swept is simply gone:
    nothing is charged twice. (A reply's ledger row on Postgres is written by the reply's
    own statement, ``_store._append_statement``; only its reservation is deleted here.)"""
    if reservation is not None:
        conn.execute(_DELETE_RESERVATION, {"r_id": reservation.id})
    if event is not None:
        record_events(conn, [event])


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of a usage report. ``key`` is the day (``YYYY-MM-DD``), month
    (``YYYY-MM``), model, owner or conversation id; ``cost`` is None when no request of the
    group had a price (recorded, or given to the report), else in ``currency``."""

    by: str
    key: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    cost: Decimal | None
    currency: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            self.by: self.key,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "cost": float(self.cost) if self.cost is not None else None,
            "currency": self.currency,
        }


def _bucket(dialect: str) -> Any:
    """The UTC quarter hour of ``created_at`` as text: every time zone's day starts on a
    quarter hour, so quarters fold into local days and months exactly, in Python."""
    if dialect == "sqlite":  # stored as 'YYYY-MM-DD HH:MM:SS[.ffffff]' in UTC
        return literal_column(
            "substr(created_at, 1, 14) || (CAST(substr(created_at, 15, 2) AS INTEGER) / 15)"
        )
    return literal_column(
        "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:') || "
        "(CAST(extract(minute FROM created_at AT TIME ZONE 'UTC') AS INTEGER) / 15)"
    )


def usage_report(
    conn: Any,
    dialect: str,
    *,
    owner: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    by: str,
    zone: ZoneInfo,
    prices: Prices | None,
) -> list[UsageRow]:
    c = _events.c
    group: list[Any] = {
        "day": [_bucket(dialect)],
        "month": [_bucket(dialect)],
        "model": [],
        "owner": [c.owner],
        "conversation": [c.conversation_id],
    }[by]
    columns = [
        *(g.label("g") for g in group),
        c.model,
        c.currency,
        func.count().label("requests"),
        func.sum(c.prompt_tokens).label("prompt"),
        func.sum(c.completion_tokens).label("completion"),
        func.sum(c.total_tokens).label("total"),
        func.sum(c.cached_tokens).label("cached"),
        func.sum(c.cost_micros).label("cost"),
    ]
    query = select(*columns)
    if owner is not None:
        query = query.where(c.owner == owner)
    if since is not None:
        query = query.where(c.created_at >= since)
    if until is not None:
        query = query.where(c.created_at < until)
    query = query.group_by(*group, c.model, c.currency)
    groups: dict[Any, dict[str, Any]] = {}
    local: dict[str, str] = {}
    for row in conn.execute(query):
        if by in ("day", "month"):
            key = local.get(row.g)
            if key is None:
                start, quarter = row.g.rsplit(":", 1)
                instant = dt.datetime.strptime(start, "%Y-%m-%d %H").replace(tzinfo=dt.timezone.utc)
                day = (instant + dt.timedelta(minutes=15 * int(quarter))).astimezone(zone).date()
                key = local[row.g] = day.isoformat() if by == "day" else day.isoformat()[:7]
        elif by == "model":
            key = row.model
        else:
            key = row.g
        acc = groups.setdefault(
            key,
            {
                "requests": 0,
                "prompt": 0,
                "completion": 0,
                "total": 0,
                "cached": 0,
                "cost": None,
                "cur": set(),
            },
        )
        for name in ("requests", "prompt", "completion", "total", "cached"):
            acc[name] += int(getattr(row, name) or 0)
        if prices is not None:
            cost = prices.cost_micros(
                row.model,
                prompt_tokens=int(row.prompt or 0),
                completion_tokens=int(row.completion or 0),
                cached_tokens=int(row.cached or 0),
            )
            currency = prices.currency
        else:
            cost, currency = (int(row.cost) if row.cost is not None else None), row.currency
        if cost is not None:
            acc["cost"] = (acc["cost"] or 0) + cost
            acc["cur"].add(currency)
    result = []
    for key, acc in groups.items():
        currencies = sorted(acc["cur"])
        mixed = len(currencies) > 1  # the price table changed currency: no one sum is right
        result.append(
            UsageRow(
                by=by,
                key=key,
                requests=acc["requests"],
                prompt_tokens=acc["prompt"],
                completion_tokens=acc["completion"],
                total_tokens=acc["total"],
                cached_tokens=acc["cached"],
                cost=None if acc["cost"] is None or mixed else Decimal(acc["cost"]) / MICROS,
                currency=", ".join(currencies) if currencies else None,
            )
        )
    if by in ("day", "month"):
        result.sort(key=lambda r: r.key or "")
    else:
        result.sort(key=lambda r: (-r.total_tokens, r.key or ""))
    return result


# ---------------------------------------------------------------------------------------------
# Quotas


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """Limits of one owner (or the default, ``owner`` None and ``default`` True); None is
    no limit. Costs are in the currency of the store's price table."""

    owner: str | None
    default: bool
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    daily_cost: Decimal | None = None
    monthly_cost: Decimal | None = None


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """One limit of an owner now: ``limit``, ``used`` (recorded this period), ``reserved``
    (held by requests in flight) and ``resets_at`` (the period's end, aware)."""

    owner: str | None
    period: str  # "day" or "month"
    unit: str  # "tokens" or "cost"
    limit: int | Decimal
    used: int | Decimal
    reserved: int | Decimal
    resets_at: dt.datetime
    inherited: bool  # the default's limit, the owner having none of its own

    def to_json(self) -> dict[str, Any]:
        def number(value: int | Decimal) -> int | float:
            return float(value) if isinstance(value, Decimal) else value

        return {
            "owner": self.owner,
            "period": self.period,
            "unit": self.unit,
            "limit": number(self.limit),
            "used": number(self.used),
            "reserved": number(self.reserved),
            "resets_at": self.resets_at.isoformat(),
            "default": self.inherited,
        }


@dataclass(frozen=True, slots=True)
class Reservation:
    """Quota held by one request in flight: settle it by storing the reply with
    ``quota_reservation=``, or give it back with :meth:`ConversationStore.release_quota`."""

    id: int
    owner: str | None
    tokens: int
    cost_micros: int | None
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class QuotaAsk:
    """What a turn holds of its owner's quota when a limit applies (see
    ``ConversationStore._take_turn``): ``hold(history)`` tokens, priced at ``model``.
    ``history`` is the conversation's token total with the turn's new messages, as the
    turn's lease statement returns it; ``hold`` is called only when a limit applies, in
    the turn's write transaction, so it must be quick (the senders': the window about to
    be sent is at most that history, capped by the context budget, plus the tools' tokens,
    counted there, and the reply's room)."""

    hold: Callable[[int], int]
    model: str | None


def zone_named(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(f"unknown time zone {name!r}; use an IANA name such as Asia/Tehran or UTC") from err


_READ_ZONE = select(_settings.c.value).where(_settings.c.name == TIMEZONE_SETTING)
_ZONES: dict[str, ZoneInfo] = {}


def read_zone(conn: Any) -> ZoneInfo:
    return _zone_of(conn.execute(_READ_ZONE).scalar())


def _zone_of(name: str | None) -> ZoneInfo:
    name = name or DEFAULT_QUOTA_TIMEZONE
    zone = _ZONES.get(name)
    if zone is None:
        zone = _ZONES[name] = zone_named(name)
    return zone


def write_zone(conn: Any, name: str) -> None:
    conn.execute(delete(_settings).where(_settings.c.name == TIMEZONE_SETTING))
    conn.execute(insert(_settings).values(name=TIMEZONE_SETTING, value=name))


def periods(now: dt.datetime, zone: ZoneInfo) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """``{"day": (start, end), "month": (start, end)}`` in UTC: the calendar day and month of
    ``now`` in ``zone`` (a day across a DST change is 23 or 25 hours long)."""
    local = now.astimezone(zone)
    day = dt.datetime(local.year, local.month, local.day, tzinfo=zone)
    next_day_date = local.date() + dt.timedelta(days=1)
    next_day = dt.datetime(next_day_date.year, next_day_date.month, next_day_date.day, tzinfo=zone)
    month = dt.datetime(local.year, local.month, 1, tzinfo=zone)
    next_month = dt.datetime(local.year + local.month // 12, local.month % 12 + 1, 1, tzinfo=zone)
    utc = dt.timezone.utc
    return {
        "day": (day.astimezone(utc), next_day.astimezone(utc)),
        "month": (month.astimezone(utc), next_month.astimezone(utc)),
    }


def _owner_is(column: Any, owner: str | None) -> Any:
    return column.is_(None) if owner is None else column == owner


def lock_owner(conn: Any, dialect: str, owner: str | None) -> None:
    """Serialize this owner's quota transactions on Postgres until commit (SQLite's
    BEGIN IMMEDIATE already serializes every writer)."""
    if dialect != "postgresql":
        return
    digest = hashlib.blake2b(f"gilas-conv quota\0{owner!r}".encode(), digest_size=8).digest()
    conn.execute(_ADVISORY_LOCK, {"k": int.from_bytes(digest, "big", signed=True)})


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:k)")


def _limits_from(row: Any, owner: str | None) -> QuotaLimits:
    def cost(value: int | None) -> Decimal | None:
        return None if value is None else Decimal(value) / MICROS

    return QuotaLimits(
        owner=None if row.owner == DEFAULT_OWNER_KEY else owner,
        default=row.owner == DEFAULT_OWNER_KEY,
        daily_tokens=row.daily_tokens,
        monthly_tokens=row.monthly_tokens,
        daily_cost=cost(row.daily_cost_micros),
        monthly_cost=cost(row.monthly_cost_micros),
    )


# Built once (see the module docstring: a turn's quota check must cost next to nothing).
# The limits of an owner and the default, with the store's time zone on each row.
_LIMITS = select(
    *_limits.c, select(_settings.c.value).where(_settings.c.name == TIMEZONE_SETTING).scalar_subquery()
).where(_limits.c.owner.in_([bindparam("l_owner"), bindparam("l_default")]))
_LIMITS_UNOWNED = select(
    *_limits.c, select(_settings.c.value).where(_settings.c.name == TIMEZONE_SETTING).scalar_subquery()
).where(_limits.c.owner == bindparam("l_default"))


def limit_applies(owner: Any) -> Any:
    """SQL that is true when a limit applies to ``owner`` (a bound parameter or column; None
    for no owner): a row of its own or the default's. The turn's lease statement returns it
    (see ``ConversationStore._take_turn``), so an owner without limits costs a turn one
    probe of this small table's key, inside a statement the turn runs anyway."""
    keys = [literal(DEFAULT_OWNER_KEY)] if owner is None else [owner, literal(DEFAULT_OWNER_KEY)]
    return exists().where(_limits.c.owner.in_(keys)).label("quota_applies")


_ANY_LIMIT = select(limit_applies(bindparam("l_owner")))
_ANY_LIMIT_UNOWNED = select(limit_applies(None))


def _limit_rows(conn: Any, owner: str | None) -> tuple[Any, Any, str | None]:
    """(the owner's own row or None, the default row or None, the time zone's name)."""
    if owner is None:
        rows = conn.execute(_LIMITS_UNOWNED, {"l_default": DEFAULT_OWNER_KEY}).all()
    else:
        rows = conn.execute(_LIMITS, {"l_owner": owner, "l_default": DEFAULT_OWNER_KEY}).all()
    own = default = None
    zone = None
    for row in rows:
        zone = row[-1]
        if row.owner == DEFAULT_OWNER_KEY:
            default = row
        else:
            own = row
    return own, default, zone


def effective_limits(conn: Any, owner: str | None) -> tuple[Any, Any]:
    """(the owner's own row or None, the default row or None)."""
    own, default, _zone = _limit_rows(conn, owner)
    return own, default


def any_limit(conn: Any, owner: str | None) -> bool:
    """Whether a limit applies to ``owner``: one indexed read of a small table."""
    if owner is None:
        return bool(conn.execute(_ANY_LIMIT_UNOWNED).scalar())
    return bool(conn.execute(_ANY_LIMIT, {"l_owner": owner}).scalar())


@dataclass(frozen=True, slots=True)
class _Limits:
    """One quota_limits row's limits (all None: no row)."""

    daily_tokens: int | None
    monthly_tokens: int | None
    daily_cost_micros: int | None
    monthly_cost_micros: int | None


def _checks(own: Any, default: Any) -> list[tuple[str, str, int, bool]]:
    """(period, unit, limit, inherited) for each limit in force: the owner's own limits
    replace the default's one by one (an owner with only a daily limit keeps the default's
    monthly one)."""
    found = []
    for period, unit, field in (
        ("day", "tokens", "daily_tokens"),
        ("month", "tokens", "monthly_tokens"),
        ("day", "cost", "daily_cost_micros"),
        ("month", "cost", "monthly_cost_micros"),
    ):
        mine = getattr(own, field) if own is not None else None
        theirs = getattr(default, field) if default is not None else None
        if mine is not None:
            found.append((period, unit, mine, False))
        elif theirs is not None:
            found.append((period, unit, theirs, True))
    return found


# The rollup ranges a period's cover may use, per bucket span: one range of whole days,
# and at each end of it at most one range of hours and one of quarter hours.
_SLOTS = ((1440, 1), (60, 2), (15, 2))


def _cover(start: int, end: int, spans: Sequence[int] = ROLLUP_SPANS) -> list[tuple[int, int, int]]:
    """(span, first start, end) ranges of rollup buckets that cover the minutes
    ``[start, end)`` exactly, longest buckets first (both bounds on a quarter hour)."""
    span, shorter = spans[0], spans[1:]
    if not shorter:
        return [(span, start, end)] if start < end else []
    inner_start, inner_end = -(-start // span) * span, end // span * span
    if inner_start >= inner_end:
        return _cover(start, end, shorter)
    head, tail = _cover(start, inner_start, shorter), _cover(inner_end, end, shorter)
    return [(span, inner_start, inner_end), *head, *tail]


def _cover_params(period: str, start: dt.datetime, end: dt.datetime) -> dict[str, int]:
    """The bound parameters of :func:`_spent_in_rollup` for one period (unused slots get
    empty ranges)."""
    ranges = _cover(_minute(start), _minute(end))
    params = {}
    for span, slots in _SLOTS:
        mine = [(lo, hi) for s, lo, hi in ranges if s == span]
        mine += [(0, 0)] * (slots - len(mine))
        for i, (lo, hi) in enumerate(mine):
            params[f"{period}_{span}_{i}_lo"] = lo
            params[f"{period}_{span}_{i}_hi"] = hi
    return params


_SUMS = (
    "coalesce(sum(CASE WHEN {day} THEN total_tokens ELSE 0 END), 0) AS day_tokens,"
    " coalesce(sum({month_tokens}), 0) AS month_tokens,"
    " coalesce(sum(CASE WHEN {day} THEN cost_micros ELSE 0 END), 0) AS day_cost,"
    " coalesce(sum({month_cost}), 0) AS month_cost"
)


def _spent_in_rollup() -> str:
    """What the owner (``:u_key``: its name, or '' for none) used in the day and in the
    month, from the rollup buckets that cover each period (:func:`_cover_params`): one row,
    at most 2 * (1 + 2 + 2) range reads of the primary key."""
    parts = [
        f"SELECT {int(period == 'day')} AS in_day, total_tokens, cost_micros FROM usage_rollup"
        f" WHERE owner = :u_key AND span_minutes = {span}"
        f" AND start_minute >= :{period}_{span}_{i}_lo AND start_minute < :{period}_{span}_{i}_hi"
        for period in ("day", "month")
        for span, slots in _SLOTS
        for i in range(slots)
    ]
    sums = _SUMS.format(
        day="in_day = 1",
        month_tokens="CASE WHEN in_day = 0 THEN total_tokens ELSE 0 END",
        month_cost="CASE WHEN in_day = 0 THEN cost_micros ELSE 0 END",
    )
    return f"SELECT {sums} FROM ({' UNION ALL '.join(parts)}) AS found"


def _spent_in_ledger(*, owned: bool) -> str:
    """What the owner (``:u_owner``, or none) used from ``:u_month`` to ``:u_month_end``,
    and from ``:u_day`` to ``:u_day_end``, summed from the ledger: for period bounds not on
    a quarter hour, which the rollup cannot cover (see the module docstring)."""
    sums = _SUMS.format(
        day="created_at >= :u_day AND created_at < :u_day_end",
        month_tokens="total_tokens",
        month_cost="cost_micros",
    )
    owner = "owner = :u_owner" if owned else "owner IS NULL"
    return (
        f"SELECT {sums} FROM usage_events"
        f" WHERE {owner} AND created_at >= :u_month AND created_at < :u_month_end"
    )


def _reserve_read_statement(*, owned: bool, rollup: bool) -> Any:
    """What an owner used this month (and today) and holds in reservations, with all a
    reservation decides on, as ONE statement: on Postgres each statement of a READ
    COMMITTED transaction sees its own snapshot, and a reply settling between two separate
    reads (its ledger row in, its reservation out, committed together) would be missed by
    both, letting a racing request pass the limit. Also the owner's own limits and the
    default's (NULLs where there is no row), the store's time zone (the periods' bounds are
    computed with the zone the caller expects; it checks the one returned), and how many
    of the owner's reservations have expired (swept only when some have).

    A ``text()`` statement (the same on SQLite and Postgres): SQLAlchemy computes a cache
    key for every execution of a constructed statement, and for this one (ten unions) that
    cost more than running it."""
    spent = _spent_in_rollup() if rollup else _spent_in_ledger(owned=owned)
    held = (
        "SELECT coalesce(sum(CASE WHEN live = 1 THEN tokens ELSE 0 END), 0) AS tokens,"
        " coalesce(sum(CASE WHEN live = 1 THEN cost_micros ELSE 0 END), 0) AS cost,"
        " coalesce(sum(1 - live), 0) AS expired FROM (SELECT tokens, cost_micros,"
        " CASE WHEN expires_at > :u_now THEN 1 ELSE 0 END AS live FROM quota_reservations"
        f" WHERE {'owner = :u_owner' if owned else 'owner IS NULL'}) AS holds"
    )
    # An owner of None has no row of its own: the default's limits only.
    own = (
        ", ".join(f"own.{name} AS own_{name}" for name in _LIMIT_COLUMNS)
        if owned
        else ", ".join(f"NULL AS own_{name}" for name in _LIMIT_COLUMNS)
    )
    default = ", ".join(f"dflt.{name} AS dflt_{name}" for name in _LIMIT_COLUMNS)
    sql = (
        "SELECT spent.day_tokens, spent.month_tokens, spent.day_cost, spent.month_cost,"
        " held.tokens, held.cost, held.expired,"
        f" (SELECT value FROM settings WHERE name = '{TIMEZONE_SETTING}') AS zone, {own}, {default}"
        f" FROM ({spent}) AS spent CROSS JOIN ({held}) AS held"
        f" LEFT OUTER JOIN quota_limits AS dflt ON dflt.owner = '{DEFAULT_OWNER_KEY}'"
        + (" LEFT OUTER JOIN quota_limits AS own ON own.owner = :u_owner" if owned else "")
    )
    instants = ["u_now"] + ([] if rollup else ["u_day", "u_day_end", "u_month", "u_month_end"])
    # Typed result columns: the result's metadata is then built once, with the statement.
    names = ["day_tokens", "month_tokens", "day_cost", "month_cost", "tokens", "cost", "expired", "zone"]
    names += [f"{side}_{name}" for side in ("own", "dflt") for name in _LIMIT_COLUMNS]
    return (
        text(sql)
        .bindparams(*(bindparam(name, type_=_events.c.created_at.type) for name in instants))
        .columns(*(column(name) for name in names))
    )


_LIMIT_COLUMNS = ("daily_tokens", "monthly_tokens", "daily_cost_micros", "monthly_cost_micros")
_RESERVE_READ = {
    (owned, rollup): _reserve_read_statement(owned=owned, rollup=rollup)
    for owned in (True, False)
    for rollup in (True, False)
}
_QUARTER_HOUR = dt.timedelta(minutes=15)
# The zone the last reservation found: the next one computes its periods with it, and
# reads again only when the store's zone has changed since.
_expected_zone = DEFAULT_QUOTA_TIMEZONE


@dataclass(frozen=True, slots=True)
class _Periods:
    """The day and month of an instant in a zone, with the bound parameters of
    :func:`_reserve_read_statement` for them (the rollup's cover, or the ledger's bounds)."""

    zone: ZoneInfo
    bounds: dict[str, tuple[dt.datetime, dt.datetime]]
    rollup: bool
    params: dict[str, Any]


# The periods the last check used, per zone: a turn's check reuses them while its instant
# is in the same day (computing them and the rollup's cover costs more than the SQL).
_LAST_PERIODS: dict[ZoneInfo, _Periods] = {}


def _periods_at(now: dt.datetime, zone: ZoneInfo) -> _Periods:
    found = _LAST_PERIODS.get(zone)
    if found is not None and found.bounds["day"][0] <= now < found.bounds["day"][1]:
        return found
    bounds = periods(now, zone)
    rollup = all((b - _EPOCH) % _QUARTER_HOUR == _ZERO for b in (*bounds["day"], *bounds["month"]))
    params: dict[str, Any] = {}
    if rollup:
        params.update(_cover_params("day", *bounds["day"]))
        params.update(_cover_params("month", *bounds["month"]))
    else:
        params.update(
            u_day=bounds["day"][0],
            u_day_end=bounds["day"][1],
            u_month=bounds["month"][0],
            u_month_end=bounds["month"][1],
        )
    found = _LAST_PERIODS[zone] = _Periods(zone, bounds, rollup, params)
    return found


def _used(conn: Any, owner: str | None, now: dt.datetime, found: _Periods) -> Any:
    """The row of :func:`_reserve_read_statement` for the periods ``found``: from the rollup
    when their bounds are on quarter hours (always, for the zones in use), else from the
    ledger."""
    params: dict[str, Any] = {**found.params, "u_owner": owner, "u_now": now}
    if found.rollup:
        params["u_key"] = owner if owner is not None else UNOWNED_KEY
    return conn.execute(_RESERVE_READ[(owner is not None, found.rollup)], params).one()


_ZERO = dt.timedelta(0)


def _amounts(row: Any) -> dict[str, int]:
    """What :func:`_used` found, by period and unit."""
    return {
        "day tokens": int(row.day_tokens),
        "month tokens": int(row.month_tokens),
        "day cost": int(row.day_cost),
        "month cost": int(row.month_cost),
        "reserved tokens": int(row.tokens),
        "reserved cost": int(row.cost),
    }


def status(conn: Any, owner: str | None, now: dt.datetime, zone: ZoneInfo) -> list[QuotaStatus]:
    own, default = effective_limits(conn, owner)
    checks = _checks(own, default)
    if not checks:
        return []
    found = _periods_at(now, zone)
    bounds = found.bounds
    used = _amounts(_used(conn, owner, now, found))
    result = []
    for period, unit, limit, inherited in checks:
        scale = (lambda v: Decimal(v) / MICROS) if unit == "cost" else (lambda v: v)
        result.append(
            QuotaStatus(
                owner=owner,
                period=period,
                unit=unit,
                limit=scale(limit),
                used=scale(used[f"{period} {unit}"]),
                reserved=scale(used[f"reserved {unit}"]),
                resets_at=bounds[period][1],
                inherited=inherited,
            )
        )
    return result


def reserve(
    conn: Any,
    dialect: str,
    *,
    owner: str | None,
    tokens: int,
    cost_micros: int | None,
    now: dt.datetime,
    currency: str | None,
) -> Reservation | None:
    """Take a reservation or raise QuotaExceeded, in the caller's write transaction. None
    when no limit applies to ``owner`` (nothing is held).

    One statement reads the limits, the zone, what was used and what is held
    (:func:`_reserve_read_statement`), a second inserts the reservation; expired
    reservations are swept only when there are some, and the used amounts read again only
    when the store's time zone is not the one expected."""
    global _expected_zone
    lock_owner(conn, dialect, owner)
    zone_name = _expected_zone
    found = _periods_at(now, _zone_of(zone_name))
    row = _used(conn, owner, now, found)
    n = len(_LIMIT_COLUMNS)
    own = dict(zip(_LIMIT_COLUMNS, row[8 : 8 + n], strict=True))
    default = dict(zip(_LIMIT_COLUMNS, row[8 + n : 8 + 2 * n], strict=True))
    checks = _checks(_Limits(**own), _Limits(**default))
    if not checks:
        return None
    if row.expired:
        # Reservations of processes that died: swept here, where this owner's lock is held.
        conn.execute(_SWEEP_UNOWNED if owner is None else _SWEEP_OWNED, {"s_owner": owner, "s_now": now})
    if (row.zone or DEFAULT_QUOTA_TIMEZONE) != zone_name:
        zone_name = _expected_zone = row.zone or DEFAULT_QUOTA_TIMEZONE
        found = _periods_at(now, _zone_of(zone_name))
        row = _used(conn, owner, now, found)
    used = _amounts(row)
    for period, unit, limit, _inherited in checks:
        asked = tokens if unit == "tokens" else (cost_micros or 0)
        taken = used[f"{period} {unit}"] + used[f"reserved {unit}"]
        if taken + asked > limit:
            if unit == "cost":
                shown: tuple[Any, Any, Any] = tuple(Decimal(v) / MICROS for v in (limit, taken, asked))  # type: ignore[assignment]
                label = currency or "cost"
            else:
                shown, label = (limit, taken, asked), "tokens"
            raise QuotaExceeded(
                owner=owner,
                period=period,
                unit=label,
                limit=shown[0],
                used=shown[1],
                requested=shown[2],
                resets_at=found.bounds[period][1],
            )
    expires = now + RESERVATION_TTL
    new_id = conn.execute(
        _INSERT_RESERVATION,
        {
            "owner": owner,
            "tokens": tokens,
            "cost_micros": cost_micros,
            "created_at": now,
            "expires_at": expires,
        },
    ).scalar_one()
    return Reservation(
        id=int(new_id), owner=owner, tokens=tokens, cost_micros=cost_micros, expires_at=expires
    )


def grow(conn: Any, reservation: Reservation, tokens: int, cost_micros: int | None) -> None:
    """Raise a held reservation to ``tokens`` (and ``cost_micros``), in the caller's
    transaction (which has already checked the limit)."""
    conn.execute(
        update(_reservations)
        .where(_reservations.c.id == reservation.id)
        .values(tokens=tokens, cost_micros=cost_micros)
    )


_SWEEP_OWNED = delete(_reservations).where(
    _reservations.c.owner == bindparam("s_owner"),
    _reservations.c.expires_at <= bindparam("s_now", type_=_reservations.c.expires_at.type),
)
_SWEEP_UNOWNED = delete(_reservations).where(
    _reservations.c.owner.is_(None),
    _reservations.c.expires_at <= bindparam("s_now", type_=_reservations.c.expires_at.type),
)
_INSERT_RESERVATION = insert(_reservations).returning(_reservations.c.id)
_DELETE_RESERVATION = delete(_reservations).where(_reservations.c.id == bindparam("r_id"))


def release(conn: Any, reservation: Reservation) -> None:
    conn.execute(_DELETE_RESERVATION, {"r_id": reservation.id})


def set_limits(conn: Any, key: str, values: Mapping[str, int | None], now: dt.datetime) -> None:
    existing = conn.execute(select(_limits).where(_limits.c.owner == key)).first()
    if existing is None:
        conn.execute(insert(_limits).values(owner=key, updated_at=now, **values))
    else:
        conn.execute(update(_limits).where(_limits.c.owner == key).values(updated_at=now, **values))


def remove_limits(conn: Any, key: str) -> bool:
    return bool(conn.execute(delete(_limits).where(_limits.c.owner == key)).rowcount)


def all_limits(conn: Any) -> list[QuotaLimits]:
    rows = conn.execute(select(_limits).order_by(_limits.c.owner)).all()
    return [_limits_from(row, None if row.owner == DEFAULT_OWNER_KEY else row.owner) for row in rows]


def limits_of(conn: Any, key: str) -> QuotaLimits | None:
    row = conn.execute(select(_limits).where(_limits.c.owner == key)).first()
    return None if row is None else _limits_from(row, None if key == DEFAULT_OWNER_KEY else key)
