"""What quotas and the ledger cost: the quota check added to a turn, secure_delete on an
append, and `usage` over a large ledger.

    python benchmarks/quota.py [--rows 1000000] [--postgres URL] [--owner-rows-only]

Prints a table of medians. "turn (store side)" is the store's part of one turn: the lease
with the user message (whose statement also says whether a limit applies and returns the
conversation's running token total), then the reply with its usage (the ledger row); "not
checked" asks no quota; "with quota" reserves in the turn's transaction (one statement
reading limits, zone, usage and holds, one inserting the hold) and settles in the reply's.
"sender's turn" is a Sender's turn without the HTTP request (``_prepare``, ``_plan``,
``_store_reply``), CPU time, so anything a limit makes the sender do besides the store's
part (once: planning a window before the turn) is counted. "owner with N ledger rows this
month" is the limited turn for an owner who already has ``--rows`` ledger rows this month
(a check that sums the month grows with them; one that reads the rollup does not);
``--owner-rows-only`` measures just that. The script also runs against a checkout from
before the reservation was sized in the turn (``PYTHONPATH=CHECKOUT``). See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event

from gilas_conv import ConversationStore
from gilas_conv.store import _usage
from gilas_conv.truncation import plan_context

USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


# Since the reservation is sized in the turn's transaction (QuotaAsk.hold), every checked
# turn passes an ask; before, a limited owner's turn passed a planned one (tokens,
# last_seq) and an unlimited one none (check=True). The script measures both checkouts.
_SIZED_IN_TURN = "hold" in _usage.QuotaAsk.__dataclass_fields__


def _turn_kwargs(i: int, *, quota: bool, check: bool) -> dict[str, Any]:
    if _SIZED_IN_TURN:
        return {
            "quota": _usage.QuotaAsk(hold=lambda history: min(history, 100_000) + 1200, model=None)
            if check
            else None
        }
    if quota:
        return {"quota": _usage.QuotaAsk(tokens=1200, model=None, last_seq=2 * i)}  # type: ignore[call-arg]
    return {"quota": None, "check": check}


def turn(store: ConversationStore, owner: str, *, quota: bool, check: bool = True, n: int = 400) -> float:
    """The store side of a turn: the turn's transaction (lease, user message and, under a
    limit, the reservation: ``_take_turn``), then the reply with its ledger row, settling
    the reservation and releasing the lease. ``quota``: the owner is limited;
    ``check=False``: the quota is not asked about at all (as ``_begin_turn``). (What a
    sender does around this, any window planning included, is ``sender_turn``.)"""
    conv = store.create(owner=owner)
    times = []
    for i in range(n):
        start = time.perf_counter()
        lease, _, _, held = store._take_turn(
            conv.id,
            owner=owner,
            lease_seconds=60,
            messages=[{"role": "user", "content": f"question {i}"}],
            **_turn_kwargs(i, quota=quota, check=check),
        )
        conv.append(
            "assistant", f"answer {i}", usage=USAGE, model="gpt-4o-mini", lease=lease, quota_reservation=held
        )
        times.append(time.perf_counter() - start)
    return _median_ms(times[n // 10 :])


def _with_history(store: ConversationStore, owner: str) -> Any:
    """A conversation with a system message and 40 messages of about 25 tokens."""
    conv = store.create(owner=owner, system="Be brief.", model="gpt-4o-mini")
    for i in range(20):
        conv.append("user", f"question {i} " + "words " * 20)
        conv.append("assistant", f"answer {i} " + "words " * 20)
    return conv


def sender_turn(store: ConversationStore, owner: str, n: int = 150) -> float:
    """A sender's turn without the HTTP request, CPU time: ``_prepare`` (the turn's
    transaction, with whatever a limit makes the sender do before or in it), ``_plan``
    (the window sent) and ``_store_reply`` (the reply, its ledger row, the settle), on a
    conversation of 40 messages that grows by a turn each time. Any window planning a
    limited owner's turn adds is in here; it is what the limit costs a real turn."""
    from gilas_conv import _api
    from gilas_conv.sender import Sender

    sender = Sender(store, api_key="bench", base_url="http://127.0.0.1:9/v1")
    conv = _with_history(store, owner)
    times = []
    for i in range(n):
        start = time.process_time()
        call = sender._call(
            {"model": "gpt-4o-mini", "max_tokens": 200},
            max_retries=None,
            timeout=None,
            context_limit=None,
            policy=None,
        )
        prepared = sender._prepare(conv.id, f"question {i}", call, owner=owner)
        planned = sender._plan(prepared, call, stream=False)
        reply = _api.Reply(
            content=f"answer {i}",
            tool_calls=None,
            finish_reason="stop",
            response_id=f"{owner}-{i}",
            model="gpt-4o-mini",
            usage=USAGE,
            extra=None,
        )
        sender._store_reply(planned, reply, status="complete")
        times.append(time.process_time() - start)
    return _median_ms(times[n // 10 :])


def plan(store: ConversationStore, owner: str, n: int = 200) -> float:
    """One window read and plan (what a limited owner's turn used to add before its
    transaction), on a conversation of 40 messages."""
    conv = _with_history(store, owner)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        plan_context(conv, model="gpt-4o-mini", max_tokens=500, policy="truncate")
        times.append(time.perf_counter() - start)
    return _median_ms(times[n // 10 :])


def _event(owner: str, model: str, at: dt.datetime) -> dict[str, Any]:
    """A ledger row of 120 tokens, unpriced."""
    return {
        "owner": owner,
        "conversation_id": None,
        "model": model,
        "kind": "reply",
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "cached_tokens": 0,
        "cost_micros": None,
        "currency": None,
        "created_at": at,
    }


def fill_ledger(store: ConversationStore, rows: int) -> None:
    rng = random.Random(7)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    owners = [f"user{i}" for i in range(1000)]
    models = ["gpt-4o-mini", "gpt-4o", "o3-mini"]
    batch = []
    for i in range(rows):
        batch.append(_event(rng.choice(owners), rng.choice(models), start + dt.timedelta(seconds=i * 30)))
        if len(batch) == 50_000:
            _insert_events(store, batch)
            batch = []
    _insert_events(store, batch)


def _insert_events(store: ConversationStore, events: list[dict[str, Any]]) -> None:
    """Ledger rows, the way the store writes them (with the rollup where there is one: the
    same script measures a checkout without it)."""
    if not events:
        return
    record = getattr(_usage, "record_events", None)
    with store._write() as conn:
        if record is not None:
            record(conn, events)
        else:
            conn.execute(_usage.INSERT_EVENT, events)


def owner_rows(url: str, label: str, rows: int) -> list[tuple[str, str, str]]:
    """The limited turn of an owner with ``rows`` ledger rows this month (spread from the
    1st to the clock's now, the 15th at noon UTC) beside one with none."""
    now = dt.datetime(2026, 6, 15, 12, tzinfo=dt.timezone.utc)
    first = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
    step = (now - first) / rows
    with ConversationStore(url, clock=lambda: now) as store:
        for begin in range(0, rows, 50_000):
            events = [
                _event("heavy", "gpt-4o-mini", first + step * i)
                for i in range(begin, min(rows, begin + 50_000))
            ]
            _insert_events(store, events)
        for owner in ("heavy", "light"):
            store.set_quota(owner, daily_tokens=10**12, monthly_tokens=10**12)
        turn(store, "warm", quota=False, n=50)
        heavy, light = [], []
        for _ in range(3):  # alternated, as in run()
            light.append(turn(store, "light", quota=True, n=150))
            heavy.append(turn(store, "heavy", quota=True, n=150))
        light_ms, heavy_ms = statistics.median(light), statistics.median(heavy)
    return [
        (label, "turn with quota, owner with 0 ledger rows this month", f"{light_ms:.3f} ms"),
        (label, f"turn with quota, owner with {rows:,} ledger rows this month", f"{heavy_ms:.3f} ms"),
    ]


def timed(call: Any, repeat: int = 3) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return _median_ms(samples)


def run(url: str, label: str, rows: int) -> list[tuple[str, str, str]]:
    out = []
    with ConversationStore(url) as store:
        store.set_quota("limited", daily_tokens=10**12)
        turn(store, "warm", quota=False, n=50)
        # Alternated, so that a noisy neighbour falls on both sides alike.
        unchecked, plain, limited = [], [], []
        for _ in range(3):
            unchecked.append(turn(store, "free0", quota=False, check=False, n=200))
            plain.append(turn(store, "free", quota=False, n=200))
            limited.append(turn(store, "limited", quota=True, n=200))
        unchecked_ms, plain, limited = (statistics.median(x) for x in (unchecked, plain, limited))
        out.append((label, "turn (store side), quota not checked", f"{unchecked_ms:.3f} ms"))
        out.append((label, "turn (store side), checked, no limit applies", f"{plain:.3f} ms"))
        out.append((label, "added by the check when no limit applies", f"{plain - unchecked_ms:.3f} ms"))
        out.append((label, "turn with quota reserve + settle", f"{limited:.3f} ms"))
        out.append((label, "added by the quota check (transaction side)", f"{limited - plain:.3f} ms"))
        out.append((label, "one window read and plan (for comparison)", f"{plan(store, 'limited'):.3f} ms"))
        free, capped = [], []
        for r in range(5):  # a sender's turn, CPU time, alternated
            free.append(sender_turn(store, f"sender-free{r}"))
            capped.append(sender_turn(store, "limited"))
        free_ms, capped_ms = statistics.median(free), statistics.median(capped)
        out.append((label, "sender's turn (no HTTP, CPU), no limit", f"{free_ms:.3f} ms"))
        out.append((label, "sender's turn (no HTTP, CPU), a limit applies", f"{capped_ms:.3f} ms"))
        out.append((label, "added to a sender's turn by a limit", f"{capped_ms - free_ms:.3f} ms"))
        if store.dialect == "sqlite":
            store.engine.dispose()

            @event.listens_for(store.engine, "connect")
            def _off(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.execute("PRAGMA secure_delete = OFF")

            off = turn(store, "free2", quota=False)
            out.append((label, "turn with secure_delete OFF (for comparison)", f"{off:.3f} ms"))
    with ConversationStore(url) as store:
        start = time.perf_counter()
        fill_ledger(store, rows)
        out.append((label, f"fill {rows:,} ledger rows", f"{time.perf_counter() - start:.1f} s"))
        for by in ("day", "month", "model", "owner"):
            ms = timed(lambda by=by: store.usage(by=by))  # type: ignore[misc]
            out.append((label, f"usage(by={by!r}) over {rows:,} rows", f"{ms:.0f} ms"))
        out.append(
            (
                label,
                "usage(owner=one, by='day')",
                f"{timed(lambda: store.usage(owner='user7', by='day')):.1f} ms",
            )
        )
        store.set_quota("user7", monthly_tokens=10**12)
        store._clock = lambda: dt.datetime(2026, 6, 15, tzinfo=dt.timezone.utc)  # inside the filled range

        def reserve() -> None:
            held = store.reserve_quota("user7", tokens=100)
            assert held is not None
            store.release_quota(held)

        out.append((label, "reserve+release, owner with ~1,000 rows a month", f"{timed(reserve, 50):.3f} ms"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres")
    parser.add_argument("--owner-rows-only", action="store_true")
    args = parser.parse_args()
    measure = owner_rows if args.owner_rows_only else run
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results += measure(f"sqlite:///{Path(tmp) / 'quota.db'}", "SQLite", args.rows)
    if args.postgres:
        results += measure(args.postgres, "Postgres", args.rows)
    print("| backend | measurement | median |")
    print("|---|---|---|")
    for row in results:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
