"""The usage ledger and its reports: every request's usage recorded with the reply or summary
that carried it, kept when conversations are deleted, priced only with a price table, and
reported by day, month, model, owner or conversation in the quota time zone."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text

from gilas_conv import ConfigurationError, ConversationStore, Prices, load_prices
from gilas_conv._prices import parse_prices
from gilas_conv.store._engine import create_engine_for_url
from gilas_conv.store._migrate import upgrade_database
from gilas_conv.store._usage import ledger_row, periods, record_events, rollup_rows

MODEL = "gpt-4o-mini"
PRICES = parse_prices(
    {
        "currency": "IRR",
        "models": {MODEL: {"input": 150_000, "cached_input": 75_000, "output": 600_000}},
    }
)


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


class Clock:
    """A controllable clock for the store."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now


def test_a_reply_with_usage_is_recorded_and_survives_deleting_its_conversation(
    store: ConversationStore,
) -> None:
    conv = store.create(model=MODEL, owner="alice")
    conv.append("user", "hello")
    conv.append("assistant", "hi there", usage=_usage(20, 5), model=MODEL, response_id="r1")
    # The same reply appended again (a retried store) is neither stored nor charged twice.
    conv.append("assistant", "hi there", usage=_usage(20, 5), model=MODEL, response_id="r1")
    conv.append("user", "no usage here", usage=None)
    [row] = store.usage(by="conversation")
    assert (row.key, row.requests, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        conv.id,
        1,
        20,
        5,
        25,
    )
    assert row.cost is None  # no price table: tokens only, never an invented figure
    store.delete(conv.id, owner="alice")
    [after] = store.usage(by="owner")
    assert (after.key, after.total_tokens, after.requests) == ("alice", 25, 1)


def test_summary_usage_is_recorded_as_a_summary_request(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, owner="bob")
    for i in range(3):
        conv.append("user", f"q{i}")
    conv.add_summary("short", from_seq=1, to_seq=2, model=MODEL, usage=_usage(100, 30))
    # Another process's summary of the same range won: ours was paid for all the same.
    conv.add_summary("other", from_seq=1, to_seq=2, model=MODEL, usage=_usage(90, 20))
    [row] = store.usage(by="model")
    assert (row.key, row.requests, row.total_tokens) == (MODEL, 2, 240)


def test_costs_are_fixed_when_recorded_and_reports_can_reprice(db_url: str) -> None:
    with ConversationStore(db_url, prices=PRICES) as store:
        conv = store.create(model=MODEL, owner="alice")
        # A dated snapshot name takes the prices of its base name.
        conv.append("assistant", "a", usage=_usage(1000, 100, cached=400), model=f"{MODEL}-2024-07-18")
        conv.append("assistant", "b", usage=_usage(10, 10), model="unpriced-model")
        rows = {r.key: r for r in store.usage(by="model")}
    # 600 x 150000 + 400 x 75000 + 100 x 600000 millionths = 180 rials
    assert rows[f"{MODEL}-2024-07-18"].cost == Decimal(180)
    assert rows[f"{MODEL}-2024-07-18"].currency == "IRR"
    assert rows["unpriced-model"].cost is None
    # Prices changed later do not move what was recorded ...
    with ConversationStore(db_url) as store:
        assert store.usage(by="owner")[0].cost == Decimal(180)
        # ... unless the report is asked to price the tokens itself.
        doubled = parse_prices(
            {
                "currency": "USD",
                "models": {MODEL: {"input": 2, "output": 4}, "unpriced-model": {"input": 1, "output": 1}},
            }
        )
        [row] = store.usage(by="owner", prices=doubled)
    assert row.currency == "USD"
    assert row.cost == Decimal(1000 * 2 + 100 * 4 + 20) / 1_000_000


def test_price_files_toml_json_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "prices.toml"
    toml.write_text('currency = "toman"\n[models."gpt-4o"]\ninput = 2.5\noutput = 10\n')
    loaded = load_prices(toml)
    assert loaded.currency == "toman"
    assert loaded.cost_micros("gpt-4o", prompt_tokens=1_000_000, completion_tokens=0) == 2_500_000
    as_json = tmp_path / "prices.json"
    as_json.write_text(json.dumps({"currency": "USD", "models": {"m": {"input": 1, "output": 2}}}))
    assert load_prices(as_json).models["m"].cached_input == Decimal(1)
    monkeypatch.setenv("GILAS_CONV_PRICES", str(as_json))
    with ConversationStore(f"sqlite:///{tmp_path / 'p.db'}") as store:
        assert isinstance(store.prices, Prices) and store.prices.currency == "USD"
    bad = tmp_path / "bad.json"
    for content, message in (
        ("{", "not valid"),
        ('{"currency": "USD", "models": {"m": {"input": -1, "output": 1}}}', ">= 0"),
        ('{"models": {"m": {"input": 1, "output": 1}}}', "currency"),
        ('{"currency": "USD", "models": {"m": {"input": 1}}}', "'output'"),
    ):
        bad.write_text(content)
        with pytest.raises(ConfigurationError, match=message):
            load_prices(bad)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_prices(tmp_path / "missing.toml")


def test_days_and_months_follow_the_quota_time_zone(db_url: str) -> None:
    # 20:29 UTC on 31 January is 23:59 in Tehran (+03:30); 20:31 is already 1 February there.
    clock = Clock(dt.datetime(2026, 1, 31, 20, 29, tzinfo=dt.timezone.utc))
    with ConversationStore(db_url, clock=clock) as store:
        store.set_quota_timezone("Asia/Tehran")
        conv = store.create(model=MODEL, owner="alice")
        conv.append("assistant", "late", usage=_usage(10, 0), model=MODEL)
        clock.now += dt.timedelta(minutes=2)
        conv.append("assistant", "early", usage=_usage(1, 0), model=MODEL)
        by_day = [(r.key, r.total_tokens) for r in store.usage(by="day")]
        by_month = [(r.key, r.total_tokens) for r in store.usage(by="month")]
        # since/until are dates of that zone, both included.
        only_feb = store.usage(by="day", since=dt.date(2026, 2, 1))
        only_jan = store.usage(by="day", until=dt.date(2026, 1, 31), owner="alice")
        nobody = store.usage(by="day", owner="bob")
    assert by_day == [("2026-01-31", 10), ("2026-02-01", 1)]
    assert by_month == [("2026-01", 10), ("2026-02", 1)]
    assert [r.key for r in only_feb] == ["2026-02-01"]
    assert [r.key for r in only_jan] == ["2026-01-31"]
    assert nobody == []


def test_bad_report_arguments(store: ConversationStore) -> None:
    with pytest.raises(ValueError, match="by must be one of"):
        store.usage(by="week")
    with pytest.raises(ValueError, match="timezone-aware"):
        store.usage(since=dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="unknown time zone"):
        store.set_quota_timezone("Mars/Olympus")


def test_the_migration_backfills_the_ledger_from_stored_replies(empty_db_url: str) -> None:
    upgrade_database(empty_db_url, "0001")
    engine = create_engine_for_url(empty_db_url)
    now = dt.datetime(2025, 5, 1, 12, tzinfo=dt.timezone.utc)
    # SQLite: the text the store writes (sqlite3's default datetime adapter is deprecated).
    stamp = now.strftime("%Y-%m-%d %H:%M:%S.%f") if engine.dialect.name == "sqlite" else now
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO conversations (id, owner, model, last_seq, created_at, updated_at)"
                    " VALUES ('c1', 'alice', :m, 3, :t, :t)"
                ),
                {"m": MODEL, "t": stamp},
            )
            for seq, role, usage in (
                (1, "user", None),
                (2, "assistant", json.dumps(_usage(12, 3, cached=2))),
                (3, "assistant", None),
            ):
                conn.execute(
                    text(
                        "INSERT INTO messages (conversation_id, seq, role, content, model, usage, created_at)"
                        " VALUES ('c1', :s, :r, '\"x\"', :m, :u, :t)"
                    ),
                    {"s": seq, "r": role, "m": MODEL, "u": usage, "t": stamp},
                )
            conn.execute(
                text(
                    "INSERT INTO summaries"
                    " (conversation_id, to_seq, from_seq, content, model, usage, created_at)"
                    " VALUES ('c1', 1, 1, '\"s\"', :m, :u, :t)"
                ),
                {"m": MODEL, "u": json.dumps(_usage(40, 8)), "t": stamp},
            )
    finally:
        engine.dispose()
    upgrade_database(empty_db_url)
    with ConversationStore(empty_db_url) as store:
        [row] = store.usage(by="owner")
        [day] = store.usage(by="day")
    assert (row.key, row.requests, row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (
        "alice",
        2,
        52,
        11,
        2,
    )
    assert row.cost is None and day.key == "2025-05-01"


def test_the_rollup_migration_backfills_what_the_quota_check_reads(empty_db_url: str) -> None:
    # Ledger rows written before 0007 (owned and not, priced and not, across quarter hours,
    # hours, a Tehran midnight and a month): after the upgrade each limit's `used` is the
    # ledger's sum for its period, in UTC and in Tehran.
    upgrade_database(empty_db_url, "0006")
    engine = create_engine_for_url(empty_db_url)
    start = dt.datetime(2026, 3, 30, 19, 7, 11, tzinfo=dt.timezone.utc)
    events = []
    for i in range(120):
        at = start + dt.timedelta(minutes=37 * i, seconds=i)
        owner = ("alice", "bob", None)[i % 3]
        events.append((owner, at, 10 + i, 1000 * i if i % 2 else None))
    try:
        with engine.begin() as conn:
            for owner, at, tokens, cost in events:
                stamp = at.strftime("%Y-%m-%d %H:%M:%S.%f") if engine.dialect.name == "sqlite" else at
                conn.execute(
                    text(
                        "INSERT INTO usage_events (owner, model, kind, prompt_tokens, completion_tokens,"
                        " total_tokens, cached_tokens, cost_micros, created_at)"
                        " VALUES (:o, :m, 'reply', :t, 0, :t, 0, :c, :at)"
                    ),
                    {"o": owner, "m": MODEL, "t": tokens, "c": cost, "at": stamp},
                )
    finally:
        engine.dispose()
    upgrade_database(empty_db_url)
    # Just after the last row, 3 minutes into a day in Tehran (20:30 UTC).
    now = start + dt.timedelta(minutes=37 * 119, seconds=200)
    with ConversationStore(empty_db_url, clock=lambda: now) as store:
        store.set_quota(
            default=True,
            daily_tokens=10**9,
            monthly_tokens=10**9,
            daily_cost=Decimal(9),
            monthly_cost=Decimal(9),
        )
        for zone in ("UTC", "Asia/Tehran"):
            store.set_quota_timezone(zone)
            bounds = periods(now, ZoneInfo(zone))
            for owner in ("alice", "bob", None):
                for status in store.quota(owner):
                    low, high = bounds[status.period]
                    mine = [(t, c or 0) for o, at, t, c in events if o == owner and low <= at < high]
                    tokens = sum(t for t, _ in mine)
                    cost = Decimal(sum(c for _, c in mine)) / 1_000_000
                    assert status.used == (tokens if status.unit == "tokens" else cost), (zone, owner, status)


def test_the_rollup_is_the_ledger_summed_into_its_buckets_to_the_minute(db_url: str) -> None:
    # Ledger rows at the edges of buckets (the last microsecond of a day, hour and quarter
    # hour, the first of the next), owned and not, priced and not, one at a time and many
    # at once: the rollup holds exactly the buckets Python sums them into. (Pins the bucket
    # arithmetic for any writer of the rollup that is not Python's: a SQLite trigger that
    # parsed created_at with strftime rounded 23:59:59.999999 into the next day.)
    edges = [
        dt.datetime(2026, 3, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 4, 1, 0, 0, 0, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 4, 1, 0, 14, 59, 500000, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 4, 1, 0, 15, 0, 1, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 4, 1, 13, 59, 0, tzinfo=dt.timezone.utc),
    ]
    events = []
    for i, at in enumerate(edges * 2):
        numbers = {"prompt_tokens": 3 + i, "completion_tokens": 1, "total_tokens": 4 + i, "cached_tokens": 0}
        event = ledger_row(
            owner=("alice", None)[i % 2],
            conversation_id=None,
            model=MODEL,
            kind="reply",
            numbers=numbers,
            prices=None,
            now=at,
        )
        events.append({**event, "cost_micros": 1000 * i if i % 3 else None})
    with ConversationStore(db_url) as store:
        with store._write() as conn:
            for event in events[: len(edges)]:
                record_events(conn, [event])
            record_events(conn, events[len(edges) :])
        with store.engine.connect() as conn:
            found = conn.execute(
                text("SELECT owner, span_minutes, start_minute, total_tokens, cost_micros FROM usage_rollup")
            ).all()
    expected = {}
    for row in rollup_rows(events):
        key = (row["owner"], row["span_minutes"], row["start_minute"])
        expected[key] = (row["total_tokens"], row["cost_micros"])
    assert {(o, s, m): (t, c) for o, s, m, t, c in found} == expected
