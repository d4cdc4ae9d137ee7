"""Many writers on one conversation, and writers killed mid-append, on SQLite and Postgres.

The writers are real processes running ``tests/_store_workers.py`` (see its docstring for the
protocol); they open the store themselves, wait at a common start line, then append as fast
as they can. Afterwards the database itself is checked: every message stored exactly once,
sequence numbers contiguous and unique, ``conversations.last_seq`` equal to the newest seq,
every content exactly one the worker meant to write, and on SQLite ``PRAGMA
integrity_check``.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _store_workers import content_for, parse_marker
from sqlalchemy import text
from sqlalchemy.engine import make_url

from gilas_conv import ConversationStore, Message
from gilas_conv.store._engine import create_engine_for_url

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_SCRIPT = Path(__file__).with_name("_store_workers.py")
MODEL = "gpt-4o-mini"
# Generous: a worker that waits this long is stuck, and the test should say so, not hang.
WORKER_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# Driving the workers


_WORKERS: list[_Worker] = []


@pytest.fixture(autouse=True)
def _close_workers() -> Iterator[None]:
    """Every worker of a test is ended and its pipes closed when the test ends."""
    yield
    while _WORKERS:
        _WORKERS.pop().close()


class _Worker:
    """One worker process; its stdout and stderr are read by threads, so nothing blocks."""

    def __init__(self, mode: str, url: str, conversation_id: str, *, worker: int, count: int, size: int = 0):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        args = [
            mode,
            url,
            conversation_id,
            "--worker",
            str(worker),
            "--count",
            str(count),
            "--size",
            str(size),
        ]
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=lambda: self._stderr.append(self.proc.stderr.read()), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        _WORKERS.append(self)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WORKER_TIMEOUT_S)
        for reader in self._readers:
            reader.join(timeout=WORKER_TIMEOUT_S)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            # A killed worker may leave half a line behind; every whole line was flushed whole.
            if line.endswith("\n"):
                self._events.put(json.loads(line))
        self._events.put(None)

    @property
    def stderr(self) -> str:
        self.proc.wait(timeout=WORKER_TIMEOUT_S)
        for reader in self._readers:
            reader.join(timeout=WORKER_TIMEOUT_S)
        return "".join(self._stderr)

    def next_event(self) -> dict[str, Any]:
        try:
            event = self._events.get(timeout=WORKER_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"worker {self.proc.pid} said nothing for {WORKER_TIMEOUT_S} s") from None
        if event is None:
            raise AssertionError(f"worker exited with {self.proc.wait()}: {self.stderr}")
        return event

    def finish(self) -> list[dict[str, Any]]:
        """The events of a worker that ran to the end; it must have surfaced no error."""
        events = []
        while (event := self.next_event()) != {"done": True}:
            events.append(event)
        assert self.proc.wait(timeout=WORKER_TIMEOUT_S) == 0, self.stderr
        assert "Traceback" not in self.stderr and "Error" not in self.stderr, self.stderr
        return events

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WORKER_TIMEOUT_S)

    def events_after_kill(self) -> list[dict[str, Any]]:
        """The rest of what the killed worker reported (whole lines only)."""
        events = []
        while (event := self._events.get(timeout=WORKER_TIMEOUT_S)) is not None:
            events.append(event)
        return events


def _start_together(workers: list[_Worker]) -> None:
    """Wait until every worker is ready, then release them all at once."""
    for worker in workers:
        assert worker.next_event() == {"ready": True}
    for worker in workers:
        worker.proc.stdin.write("go\n")
        worker.proc.stdin.flush()


def _kill(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()


# ---------------------------------------------------------------------------------------------
# Checking the database


def _check_consistent(url: str, conversation_id: str) -> list[Message]:
    """Assert the invariants every crash and every race must keep; return the history."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # Straight after the kill, with a connection of our own (no pool, no hooks).
        raw = sqlite3.connect(parsed.database)
        try:
            assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        finally:
            raw.close()
    engine = create_engine_for_url(url)
    try:
        with engine.connect() as conn:
            seqs = (
                conn.execute(
                    text("SELECT seq FROM messages WHERE conversation_id = :id ORDER BY seq"),
                    {"id": conversation_id},
                )
                .scalars()
                .all()
            )
            last_seq = conn.execute(
                text("SELECT last_seq FROM conversations WHERE id = :id"), {"id": conversation_id}
            ).scalar_one()
            orphans = conn.execute(
                text(
                    "SELECT count(*) FROM messages m LEFT JOIN conversations c"
                    " ON c.id = m.conversation_id WHERE c.id IS NULL"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    assert seqs == list(range(1, len(seqs) + 1)), "seq must be contiguous and unique"
    assert last_seq == len(seqs), "conversations.last_seq must equal the newest seq"
    assert orphans == 0
    with ConversationStore(url) as store:
        conversation = store.get(conversation_id)
        assert conversation.message_count == last_seq
        return conversation.messages()


def _assert_intended(messages: list[Message], size: int) -> dict[tuple[int, int], int]:
    """Every stored content is exactly one a worker meant to write, at most once each.

    Returns ``{(worker, index): seq}``.
    """
    stored: dict[tuple[int, int], int] = {}
    for message in messages:
        key = parse_marker(message.content)
        assert key not in stored, f"{key} stored twice, at {stored[key]} and {message.seq}"
        assert message.content == content_for(*key, size), f"message {message.seq} was changed"
        assert message.tokens is not None and message.tokens > 0
        stored[key] = message.seq
    return stored


# ---------------------------------------------------------------------------------------------
# Many writers


def _run_workers(mode: str, url: str, conversation_id: str, *, workers: int, count: int) -> list[Any]:
    """Start ``workers`` worker processes at the same moment and return what each reported."""
    procs = [_Worker(mode, url, conversation_id, worker=w, count=count) for w in range(workers)]
    try:
        _start_together(procs)
        return [proc.finish() for proc in procs]
    finally:
        _kill(procs)


def test_processes_appending_to_one_conversation_store_every_message_once(db_url: str) -> None:
    workers, each = 4, 250
    with ConversationStore(db_url) as store:
        conversation = store.create(model=MODEL)
    events = _run_workers("append", db_url, conversation.id, workers=workers, count=each)

    messages = _check_consistent(db_url, conversation.id)
    assert len(messages) == workers * each
    stored = _assert_intended(messages, 0)
    assert sorted(stored) == [(w, i) for w in range(workers) for i in range(each)]
    for worker, worker_events in enumerate(events):
        assert [e["i"] for e in worker_events] == list(range(each))
        returned = [e["seq"] for e in worker_events]
        # What append returned is where the message really is, and one process's appends
        # keep their order.
        assert returned == [stored[(worker, i)] for i in range(each)]
        assert returned == sorted(returned)
    # The appends really overlapped (the test is about a race, so make sure there was one).
    order = [parse_marker(m.content)[0] for m in messages]
    switches = sum(1 for a, b in itertools.pairwise(order) if a != b)
    assert switches > workers, f"the workers ran one after another ({switches} switches)"


def test_threads_sharing_one_store_store_every_message_once(store: ConversationStore, db_url: str) -> None:
    threads, each = 8, 40
    conversation = store.create(model=MODEL)
    barrier = threading.Barrier(threads)
    returned: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            handle = store.get(conversation.id)
            barrier.wait(timeout=WORKER_TIMEOUT_S)
            returned[worker] = [handle.append("user", content_for(worker, i)).seq for i in range(each)]
        except BaseException as err:  # collected and asserted below
            errors.append(err)

    pool = [threading.Thread(target=run, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=WORKER_TIMEOUT_S)
    assert errors == []
    assert not any(thread.is_alive() for thread in pool)

    messages = _check_consistent(db_url, conversation.id)
    assert len(messages) == threads * each
    stored = _assert_intended(messages, 0)
    assert sorted(stored) == [(w, i) for w in range(threads) for i in range(each)]
    for worker, seqs in returned.items():
        assert seqs == [stored[(worker, i)] for i in range(each)]


def test_processes_racing_to_store_the_same_replies_store_each_once(db_url: str) -> None:
    """The reply dedupe under a race: every worker appends the same replies resp-0..resp-N
    (same id, same text) in order."""
    workers, replies = 3, 40
    with ConversationStore(db_url) as store:
        conversation = store.create(model=MODEL)
    events = _run_workers("replies", db_url, conversation.id, workers=workers, count=replies)

    messages = _check_consistent(db_url, conversation.id)
    # resp-i is only attempted once resp-(i-1) is stored, so seq i+1 holds resp-i.
    assert [m.response_id for m in messages] == [f"resp-{i}" for i in range(replies)]
    for worker_events in events:
        assert [e["i"] for e in worker_events] == list(range(replies))
        # Every worker got the stored message back: same seq, same content.
        assert [(e["seq"], e["content"]) for e in worker_events] == [(m.seq, m.content) for m in messages]
    assert [m.content for m in messages] == [f"reply {i}" for i in range(replies)]


@pytest.mark.parametrize("attempt", range(3))
def test_processes_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path: Path, attempt: int) -> None:
    """A SQLite file upgrades itself on first use; several processes may be that first use
    (workers of one app starting together), and none of them may fail: neither switching
    the new file to WAL ("database is locked" at once) nor finding another's migration
    half seen ("tables but no record of their schema revision"). A race, so run thrice."""
    workers, each = 6, 5
    url = f"sqlite:///{tmp_path / 'first-use.db'}"
    events = _run_workers("open", url, "-", workers=workers, count=each)
    assert [[e["seq"] for e in worker_events] for worker_events in events] == [
        list(range(1, each + 1))
    ] * workers
    with ConversationStore(url) as store:
        conversations = store.list()
    assert sorted(c.title for c in conversations) == [f"worker {w}" for w in range(workers)]
    for conversation in conversations:
        assert len(_check_consistent(url, conversation.id)) == each


# ---------------------------------------------------------------------------------------------
# Crash safety


def test_processes_killed_mid_append_leave_the_database_consistent(db_url: str) -> None:
    """SIGKILL two writers of large messages at a random moment, twice over.

    Whatever was mid-flight is either wholly there or not at all; everything a worker saw
    committed is there; the next process carries on from the right seq.
    """
    size = 128_000
    rng = random.Random()
    with ConversationStore(db_url) as store:
        conversation = store.create(model=MODEL, system="s")
    committed: dict[tuple[int, int], int] = {}
    next_worker = 0
    for round_ in range(2):
        procs = [
            _Worker("append", db_url, conversation.id, worker=next_worker + k, count=0, size=size)
            for k in range(2)
        ]
        seen: list[dict[str, Any]] = []
        target = rng.randint(2, 8)
        delay = rng.uniform(0.0, 0.05)
        try:
            _start_together(procs)
            while len(seen) < target:
                seen.append(procs[0].next_event())
            time.sleep(delay)
        finally:
            _kill(procs)
        for k, proc in enumerate(procs):
            assert proc.proc.returncode == -signal.SIGKILL, proc.stderr
            reported = (seen if k == 0 else []) + proc.events_after_kill()
            for event in reported:
                committed[(next_worker + k, event["i"])] = event["seq"]
        next_worker += 2

        messages = _check_consistent(db_url, conversation.id)
        assert messages[0].content == "s"
        stored = _assert_intended(messages[1:], size)
        # Durable: everything an append returned is stored where it said.
        missing = {key: seq for key, seq in committed.items() if stored.get(key) != seq}
        assert missing == {}, f"round {round_} (target {target}, delay {delay:.3f}s)"
        # Each worker's messages are a prefix of what it meant to write: no gap in the middle.
        for worker in {w for w, _ in stored}:
            indices = sorted(i for w, i in stored if w == worker)
            assert indices == list(range(len(indices)))

    with ConversationStore(db_url) as store:
        after = store.get(conversation.id).append("user", "after the crashes")
    assert after.seq == len(messages) + 1
    assert len(_check_consistent(db_url, conversation.id)) == after.seq
