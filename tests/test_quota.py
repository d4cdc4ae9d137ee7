"""Quotas: limits per owner and a default, periods in the store's time zone, reservations
taken atomically (threads and processes of one owner never pass a limit together) and
settled by the reply's ledger row or released."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool
from stub_server import StubServer

from gilas_conv import ConversationStore, QuotaExceeded
from gilas_conv._prices import MICROS, parse_prices
from gilas_conv.store._schema import UsageEventRow
from gilas_conv.store._usage import RESERVATION_TTL, Reservation, periods

MODEL = "gpt-4o-mini"
API_KEY = "sk-quota-race"  # the stub server's
WORKER = Path(__file__).with_name("_quota_workers.py")
REPO = Path(__file__).resolve().parent.parent
TEHRAN_MIDNIGHT = dt.datetime(2026, 3, 9, 20, 30, tzinfo=dt.timezone.utc)  # 10 March 00:00 in Tehran


class Clock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now


def _reply(conv: object, tokens: int, **kwargs: object) -> None:
    usage = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
    conv.append("assistant", "ok", usage=usage, model=MODEL, **kwargs)  # type: ignore[attr-defined]


def test_limits_per_owner_and_default(store: ConversationStore) -> None:
    assert store.reserve_quota("alice", tokens=10**9) is None  # no limit: nothing held
    store.set_quota(default=True, daily_tokens=100, monthly_tokens=1000)
    store.set_quota("alice", daily_tokens=500)
    status = {(s.period, s.unit): s for s in store.quota("alice")}
    assert status["day", "tokens"].limit == 500 and not status["day", "tokens"].inherited
    assert status["month", "tokens"].limit == 1000 and status["month", "tokens"].inherited
    assert [s.limit for s in store.quota("bob")] == [100, 1000]
    assert [s.limit for s in store.quota(None)] == [100, 1000]  # the unowned scope: the default
    assert {(q.owner, q.default) for q in store.quota_limits()} == {(None, True), ("alice", False)}
    assert store.remove_quota("alice") is True and store.remove_quota("alice") is False
    assert [s.limit for s in store.quota("alice")] == [100, 1000]
    with pytest.raises(ValueError, match="at least one limit"):
        store.set_quota("alice")
    with pytest.raises(ValueError, match="not both"):
        store.set_quota("alice", default=True, daily_tokens=1)
    with pytest.raises(ValueError, match=">= 0"):
        store.set_quota("alice", daily_tokens=-1)
    with pytest.raises(ValueError, match=r"daily_cost must be a number >= 0, not -1"):
        store.set_quota("alice", daily_cost=-1)
    with pytest.raises(ValueError, match=r"monthly_cost must be a number, not True"):
        store.set_quota("alice", monthly_cost=True)


def test_a_reservation_is_refused_settled_and_released(store: ConversationStore) -> None:
    store.set_quota("alice", daily_tokens=100)
    conv = store.create(model=MODEL, owner="alice")
    held = store.reserve_quota("alice", tokens=60)
    assert held is not None
    with pytest.raises(QuotaExceeded) as info:
        store.reserve_quota("alice", tokens=50)  # 60 held + 50 > 100
    err = info.value
    assert (err.owner, err.period, err.unit, err.limit, err.used, err.requested) == (
        "alice",
        "day",
        "tokens",
        100,
        60,
        50,
    )
    assert err.resets_at > dt.datetime.now(dt.timezone.utc)
    # Settled: the reply's usage (30) replaces the 60 held.
    _reply(conv, 30, quota_reservation=held)
    [status] = store.quota("alice")
    assert (status.used, status.reserved) == (30, 0)
    again = store.reserve_quota("alice", tokens=70)  # 30 + 70 = 100: exactly the limit
    assert again is not None
    store.release_quota(again)  # the request failed: nothing charged
    [status] = store.quota("alice")
    assert (status.used, status.reserved) == (30, 0)


def test_cost_limits_use_recorded_costs(db_url: str) -> None:
    prices = parse_prices({"currency": "IRR", "models": {MODEL: {"input": 1_000_000, "output": 2_000_000}}})
    with ConversationStore(db_url, prices=prices) as store:
        store.set_quota("alice", monthly_cost=Decimal("10"))
        conv = store.create(model=MODEL, owner="alice")
        _reply(conv, 7)  # 7 input tokens at one rial each
        with pytest.raises(QuotaExceeded) as info:
            store.reserve_quota("alice", tokens=2, model=MODEL)  # held at the output price: 4
        assert (info.value.unit, info.value.used, info.value.requested) == ("IRR", 7, 4)
        assert store.reserve_quota("alice", tokens=1, model=MODEL) is not None


def test_periods_reset_at_midnight_in_tehran(db_url: str) -> None:
    clock = Clock(TEHRAN_MIDNIGHT - dt.timedelta(minutes=10))  # 23:50 on 9 March in Tehran
    with ConversationStore(db_url, clock=clock) as store:
        store.set_quota_timezone("Asia/Tehran")
        assert store.quota_timezone() == "Asia/Tehran"
        store.set_quota("alice", daily_tokens=100, monthly_tokens=150)
        conv = store.create(model=MODEL, owner="alice")
        _reply(conv, 90)
        with pytest.raises(QuotaExceeded) as info:
            store.reserve_quota("alice", tokens=20)
        assert info.value.period == "day"
        assert info.value.resets_at == TEHRAN_MIDNIGHT
        clock.now = TEHRAN_MIDNIGHT  # a new day in Tehran (still 9 March in UTC)
        held = store.reserve_quota("alice", tokens=20)
        assert held is not None
        store.release_quota(held)
        # The month has not turned: 90 used + 70 > 150.
        with pytest.raises(QuotaExceeded) as info:
            store.reserve_quota("alice", tokens=70)
        assert info.value.period == "month"
        # Tehran's April starts at 20:30 UTC on 31 March.
        assert info.value.resets_at == dt.datetime(2026, 3, 31, 20, 30, tzinfo=dt.timezone.utc)
        status = {s.period: s for s in store.quota("alice")}
        assert (status["day"].used, status["month"].used) == (0, 90)


def test_a_reservation_of_a_dead_process_expires(db_url: str) -> None:
    clock = Clock(dt.datetime(2026, 5, 5, 12, tzinfo=dt.timezone.utc))
    with ConversationStore(db_url, clock=clock) as store:
        store.set_quota("alice", daily_tokens=100)
        assert store.reserve_quota("alice", tokens=100) is not None  # never settled
        with pytest.raises(QuotaExceeded):
            store.reserve_quota("alice", tokens=1)
        clock.now += RESERVATION_TTL
        assert store.reserve_quota("alice", tokens=100) is not None


def _race(
    mode: str, db_url: str, target: str, owner: str, amount: int, processes: int = 3, threads: int = 3
) -> int:
    """Run ``processes`` workers of tests/_quota_workers.py, started together, each with
    ``threads`` threads; return how many replies they stored in all."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "GILAS_API_KEY": API_KEY,
    }
    command = [sys.executable, str(WORKER), mode, db_url, target, owner, str(amount), str(threads)]
    workers = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(processes)
    ]
    try:
        for worker in workers:
            assert json.loads(worker.stdout.readline()) == {"ready": True}  # type: ignore[union-attr]
        for worker in workers:
            worker.stdin.write("go\n")  # type: ignore[union-attr]
            worker.stdin.flush()  # type: ignore[union-attr]
        settled = 0
        for worker in workers:
            out, _ = worker.communicate(timeout=300)
            assert worker.returncode == 0
            settled += json.loads(out.strip().splitlines()[-1])["settled"]
        return settled
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def test_threads_and_processes_of_one_owner_never_pass_the_limit(db_url: str) -> None:
    limit, tokens = 1000, 30
    with ConversationStore(db_url) as store:
        store.set_quota("racer", daily_tokens=limit)
        conv = store.create(model=MODEL, owner="racer")
    settled = _race("reserve", db_url, conv.id, "racer", tokens)
    with ConversationStore(db_url) as store:
        [row] = store.usage(by="owner")
        [status] = store.quota("racer")
        stored = len(store.get(conv.id, owner="racer").messages())
    # Each reply used exactly what it reserved, so the bound is the limit itself; every
    # settled reply is charged once, and no reservation is left held.
    assert row.total_tokens == settled * tokens == stored * tokens
    assert limit - tokens < row.total_tokens <= limit
    assert status.reserved == 0


def test_senders_of_one_owner_racing_through_the_api_never_pass_the_limit(
    db_url: str, stub: StubServer
) -> None:
    # What a bot does: 3 processes x 3 threads, each thread a Sender with its own
    # conversation, sending turns to a real local API server until the quota refuses them.
    limit, max_tokens = 3000, 20
    with ConversationStore(db_url) as store:
        store.set_quota("racer", daily_tokens=limit)
    settled = _race("send", db_url, stub.base_url, "racer", max_tokens)
    with ConversationStore(db_url) as store:
        [row] = store.usage(by="owner")
        [status] = store.quota("racer")
        conversations = store.list(owner="racer", limit=100)
        stored = [m for conv in conversations for m in conv.messages()]
    replies = [m for m in stored if m.role == "assistant"]
    asked = [r for r in stub.requests if r["path"].endswith("/chat/completions")]
    # Each request was made once, stored once and charged once; a refused turn stored nothing.
    assert len(replies) == len(asked) == row.requests == settled > 0
    assert len(stored) == 2 * len(replies) and len(conversations) == 9
    # A reservation is the window sent plus max_tokens, and a reply's usage stays within its
    # own, so together they can pass the limit by less than one request's reservation.
    largest = max(m.usage["total_tokens"] for m in replies if m.usage)
    assert row.key == "racer" and row.total_tokens <= limit + largest
    # Each was refused only when its next reservation would not fit: they went up to it.
    assert row.total_tokens > limit - 2 * (largest + max_tokens)
    assert status.reserved == 0


def test_a_reply_settling_while_a_reservation_reads_is_seen_once(db_url: str) -> None:
    """The cause of a once-flaky race on Postgres: under READ COMMITTED each statement has
    its own snapshot, so reading the ledger and the reservations in two statements could
    miss a reply that settled in between (its ledger row after the first read, its
    reservation gone before the second) and let a racing request pass the limit. Here that
    reply is committed exactly between the reservation's statements."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite's BEGIN IMMEDIATE serializes every writer: no statement runs in between")
    from sqlalchemy import event

    with ConversationStore(db_url) as store, ConversationStore(db_url) as other:
        store.set_quota("alice", daily_tokens=100)
        conv = other.create(model=MODEL, owner="alice")
        first = other.reserve_quota("alice", tokens=60)
        assert first is not None
        fired: list[str] = []

        def settle_now(conn: object, cursor: object, statement: str, *args: object) -> None:
            if not fired and "usage_rollup" in statement and "sum" in statement.lower():
                fired.append(statement)
                # Another host stores the reply of the first request: 60 used, 0 held.
                _reply(other.get(conv.id, owner="alice"), 60, quota_reservation=first)

        event.listen(store.engine, "after_cursor_execute", settle_now)
        with pytest.raises(QuotaExceeded) as info:
            store.reserve_quota("alice", tokens=50)
        assert fired and info.value.used == 60
        [status] = store.quota("alice")
        assert (status.used, status.reserved) == (60, 0)


def test_the_turn_asks_whether_a_limit_applies_in_its_lease_statement(db_url: str) -> None:
    """A turn's quota check costs no statement of its own (the lease statement says whether
    a limit applies), and is never stale: a limit set by another store (another process)
    counts from the next turn on, for the owner's own limit and for the default."""
    from sqlalchemy import event

    from gilas_conv.store import QuotaAsk

    with ConversationStore(db_url) as store, ConversationStore(db_url) as other:
        conv = store.create(model=MODEL, owner="alice")
        statements: list[str] = []
        histories: list[int] = []

        def hold(history: int) -> int:
            histories.append(history)
            return 7

        def turn() -> Reservation | None:
            token, _, _, held = store._take_turn(
                conv.id,
                owner="alice",
                lease_seconds=60,
                messages=[{"role": "user", "content": "hi"}],
                quota=QuotaAsk(hold=hold, model=None),
            )
            if held is not None:
                store.release_quota(held)
            assert store._end_turn(conv.id, token)
            return held

        def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            statements.append(statement)

        event.listen(store.engine, "before_cursor_execute", record)
        try:
            assert turn() is None
        finally:
            event.remove(store.engine, "before_cursor_execute", record)
        assert not [
            s
            for s in statements
            if "quota_limits" in s and not s.lstrip().upper().startswith(("UPDATE", "WITH"))
        ]
        assert any("quota_limits" in s for s in statements)
        assert histories == []  # asked only under a limit

        for owner, default in (("alice", False), (None, True)):
            other.set_quota(owner, default=default, daily_tokens=1000)
            held = turn()
            assert held is not None and held.tokens == 7
            other.remove_quota(owner, default=default)
            assert turn() is None
        # What the turn holds is asked with the history up to and including the turn's
        # message: the conversation's running token total.
        tokens = [m.tokens or 0 for m in conv.messages()]
        assert histories == [sum(tokens[:2]), sum(tokens[:4])] and histories[0] > 0
        assert [m.role for m in conv.messages()] == ["user"] * 5


def test_a_limit_committed_while_a_turn_waits_checks_the_next_turn(db_url: str) -> None:
    """Postgres: whether a limit applies is read in the lease UPDATE's RETURNING clause, with
    the snapshot the UPDATE took before it waited for the conversation's row lock. A turn
    already waiting when a limit is committed goes on unchecked, as if it had begun first
    (documented in _take_turn); every turn that starts after the commit is checked."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite's BEGIN IMMEDIATE serializes every writer")
    from gilas_conv.store import QuotaAsk

    raw = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=NullPool)
    with ConversationStore(db_url) as store, ConversationStore(db_url) as other:
        conv = store.create(model=MODEL, owner="alice")
        outcome: list[object] = []

        def take_turn(conversation_id: str) -> tuple[object, ...]:
            return store._take_turn(
                conversation_id,
                owner="alice",
                lease_seconds=60,
                messages=[{"role": "user", "content": "hi"}],
                quota=QuotaAsk(hold=lambda history: 10, model=None),
            )

        def turn() -> None:
            try:
                outcome.append(take_turn(conv.id))
            except Exception as err:  # reported to the main thread
                outcome.append(err)

        with raw.connect() as holder:
            # Another request's transaction holding the conversation's row (as an append does).
            holder.execute(text("SELECT 1 FROM conversations WHERE id = :id FOR UPDATE"), {"id": conv.id})
            worker = threading.Thread(target=turn)
            worker.start()
            with raw.connect() as watch:
                for _ in range(3000):
                    waiting = watch.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND datname = current_database() AND query LIKE '%UPDATE conversations%'"
                        )
                    ).scalar()
                    watch.commit()
                    if waiting:
                        break
                    worker.join(0.01)
                assert waiting, "the turn never waited for the row lock"
            other.set_quota("alice", daily_tokens=1000)  # committed while the turn waits
            holder.commit()
        worker.join()
        assert len(outcome) == 1
        assert not isinstance(outcome[0], Exception), outcome[0]
        assert isinstance(outcome[0], tuple) and outcome[0][3] is None  # unchecked: nothing held
        other_conv = store.create(model=MODEL, owner="alice")
        assert take_turn(other_conv.id)[3] is not None
    raw.dispose()


def _ledger_sums(
    store: ConversationStore, owner: str | None, period: tuple[dt.datetime, dt.datetime]
) -> tuple[int, Decimal]:
    """The oracle: (tokens, cost) of ``owner``'s ledger rows in ``period``, summed from
    ``usage_events`` itself."""
    e = UsageEventRow.__table__.c
    query = select(
        func.coalesce(func.sum(e.total_tokens), 0), func.coalesce(func.sum(e.cost_micros), 0)
    ).where(
        e.owner.is_(None) if owner is None else e.owner == owner,
        e.created_at >= period[0],
        e.created_at < period[1],
    )
    with store.engine.connect() as conn:
        tokens, micros = conn.execute(query).one()
    return int(tokens), Decimal(int(micros)) / MICROS


PRICES = parse_prices({"currency": "IRR", "models": {MODEL: {"input": 3, "output": 7}}})


def _set_every_default_limit(store: ConversationStore) -> None:
    """Default limits of every kind, too high to refuse anything."""
    store.set_quota(
        default=True,
        daily_tokens=10**9,
        monthly_tokens=10**9,
        daily_cost=Decimal(10**6),
        monthly_cost=Decimal(10**7),
    )


def _assert_quota_is_the_ledger(store: ConversationStore, clock: Clock, owners: list[str | None]) -> None:
    zone = ZoneInfo(store.quota_timezone())
    bounds = periods(clock.now, zone)
    for owner in owners:
        statuses = store.quota(owner)
        assert len(statuses) == 4
        for status in statuses:
            tokens, cost = _ledger_sums(store, owner, bounds[status.period])
            assert status.used == (tokens if status.unit == "tokens" else cost), (owner, status)


def test_the_quota_check_reads_a_rollup_that_never_drifts_from_the_ledger(db_url: str) -> None:
    # Replies (owned and not), summaries, a released and a settled reservation, erasure,
    # prune, and time zones whose days start on the hour, the half hour and the quarter
    # hour, with the clock walking across UTC and local quarter hours, hours, days and a
    # month: every limit's `used` is what the ledger sums to for its period.
    clock = Clock(dt.datetime(2026, 3, 30, 18, 5, 17, tzinfo=dt.timezone.utc))
    owners: list[str | None] = ["alice", "bob", None]
    with ConversationStore(db_url, prices=PRICES, clock=clock) as store:
        _set_every_default_limit(store)
        store.set_quota("alice", daily_tokens=10**8)  # its own, the rest the default's
        convs = {owner: store.create(model=MODEL, owner=owner) for owner in owners}
        zones = ["Asia/Tehran", "Asia/Kathmandu", "UTC"]
        for i in range(90):
            owner = owners[i % 3]
            conv = convs[owner]
            conv.append("user", f"q{i}")
            held = store.reserve_quota(owner, tokens=50, model=MODEL)
            if i % 7 == 3:
                store.release_quota(held)  # type: ignore[arg-type]  # the request failed
            else:
                _reply(conv, 10 + i, quota_reservation=held)
            if i % 11 == 5:
                seq = len(conv.messages())
                conv.add_summary(
                    "short",
                    from_seq=1,
                    to_seq=seq,
                    model=MODEL,
                    usage={"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49},
                )
                store.record_usage(
                    owner=owner,
                    conversation_id=None,
                    model=MODEL,
                    kind="summary",
                    usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                )
            if i % 15 == 0:
                store.set_quota_timezone(zones[(i // 15) % 3])
                _assert_quota_is_the_ledger(store, clock, owners)
            clock.now += dt.timedelta(minutes=47, seconds=13)  # about 2.9 days in all
        for zone in zones:
            store.set_quota_timezone(zone)
            _assert_quota_is_the_ledger(store, clock, owners)
        used = {owner: [s.used for s in store.quota(owner)] for owner in owners}
        assert all(u[0] > 0 for u in used.values())
        store.erase_owner("alice")
        clock.now += dt.timedelta(days=1)
        store.prune(inactive_for=dt.timedelta(hours=1))
        clock.now -= dt.timedelta(days=1)
        assert (
            store.list(owner="bob") == []
            and {owner: [s.used for s in store.quota(owner)] for owner in owners} == used
        )
        _assert_quota_is_the_ledger(store, clock, owners)


def test_a_zone_whose_days_do_not_start_on_a_quarter_hour_is_summed_from_the_ledger(db_url: str) -> None:
    # Liberia kept UTC-00:44:30 until 1972: its days start at 00:44:30 UTC, which no rollup
    # bucket covers, so the check sums the ledger itself (owned and unowned), and still
    # counts reservations and refuses what would pass a limit.
    clock = Clock(dt.datetime(1971, 5, 31, 0, 20, tzinfo=dt.timezone.utc))  # 30 May in Monrovia
    owners: list[str | None] = ["alice", None]
    usage = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    with ConversationStore(db_url, prices=PRICES, clock=clock) as store:
        store.set_quota_timezone("Africa/Monrovia")
        bounds = periods(clock.now, ZoneInfo("Africa/Monrovia"))
        assert bounds["day"][1] == dt.datetime(1971, 5, 31, 0, 44, 30, tzinfo=dt.timezone.utc)
        _set_every_default_limit(store)
        for _ in range(6):  # across the local midnight and, at the end, the month's end
            for owner in owners:
                store.record_usage(owner=owner, conversation_id=None, model=MODEL, usage=usage)
            _assert_quota_is_the_ledger(store, clock, owners)
            clock.now += dt.timedelta(minutes=9)
        clock.now = dt.datetime(1971, 6, 1, 0, 50, tzinfo=dt.timezone.utc)  # 1 June, 00:05:30 local
        store.record_usage(owner="alice", conversation_id=None, model=MODEL, usage=usage)
        _assert_quota_is_the_ledger(store, clock, owners)
        store.set_quota("alice", daily_tokens=35)  # 10 used today
        held = store.reserve_quota("alice", tokens=20)
        assert held is not None
        with pytest.raises(QuotaExceeded) as info:
            store.reserve_quota("alice", tokens=6)  # 10 + 20 + 6 > 35
        assert info.value.used == 30 and info.value.resets_at == dt.datetime(
            1971, 6, 2, 0, 44, 30, tzinfo=dt.timezone.utc
        )
        store.release_quota(held)
        assert store.reserve_quota("alice", tokens=25) is not None


def test_a_limit_removed_as_a_turn_is_refused_for_it_takes_the_turn_not_busy(db_url: str) -> None:
    """Postgres: a one-message turn is first one statement that takes nothing where a limit
    applies. If the limit is removed before the store looks at why nothing was taken, the
    conversation is free: the turn is taken (by the reserving transaction, which finds no
    limit), not refused as busy."""
    from sqlalchemy import event

    from gilas_conv.store import QuotaAsk

    with ConversationStore(db_url) as store, ConversationStore(db_url) as other:
        if store.dialect != "postgresql":
            pytest.skip("SQLite takes every turn in one transaction")
        conv = store.create(model=MODEL, owner="alice")
        other.set_quota("alice", daily_tokens=1000)
        removed: list[bool] = []

        def remove_the_limit(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            if not removed and statement.lstrip().startswith("SELECT conversations.lease_token"):
                removed.append(other.remove_quota("alice"))

        event.listen(store.engine, "before_cursor_execute", remove_the_limit)
        token, _, added, held = store._take_turn(
            conv.id,
            owner="alice",
            lease_seconds=60,
            messages=[{"role": "user", "content": "hi"}],
            quota=QuotaAsk(hold=lambda history: 7, model=None),
        )
        assert removed == [True]
        assert held is None and [m.seq for m in added] == [1]
        assert store._end_turn(conv.id, token)
        assert [m.content for m in conv.messages()] == ["hi"]
