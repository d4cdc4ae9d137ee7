"""The retry policy, as pure functions: which failures are retried, and how long to wait."""

from __future__ import annotations

import email.utils

import pytest

from gilas_conv import _retry
from gilas_conv._retry import (
    INITIAL_RETRY_DELAY,
    JITTER,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
    backoff_delay,
    decide,
    is_retryable_status,
    parse_retry_after,
)

NOW = 1_700_000_000.0


def assert_one_line(reason: str, *mentions: str) -> None:
    """What a user relies on in a decision's reason: one line that names what it is about."""
    assert reason and "\n" not in reason
    for mention in mentions:
        assert mention in reason, (mention, reason)


def now() -> float:
    return NOW


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 599])
def test_retryable_statuses(status: int) -> None:
    assert is_retryable_status(status)
    assert decide(retries_done=0, max_retries=2, status=status).retry


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 413, 422, 418])
def test_client_errors_are_never_retried(status: int) -> None:
    decision = decide(retries_done=0, max_retries=100, status=status, headers={"retry-after": "1"})
    assert not decision.retry
    assert_one_line(decision.reason, f"HTTP {status}")


def test_connection_errors_are_retried_until_max_retries() -> None:
    decisions = [decide(retries_done=n, max_retries=2, error="ConnectError") for n in range(3)]
    assert [d.retry for d in decisions] == [True, True, False]
    for decision in decisions:
        assert_one_line(decision.reason, "ConnectError")
    assert not decide(retries_done=0, max_retries=0, status=500).retry


def test_backoff_doubles_then_caps() -> None:
    no_jitter = [backoff_delay(n, rand=lambda: 0.0) for n in range(8)]
    assert no_jitter[:4] == [INITIAL_RETRY_DELAY * 2**n for n in range(4)]
    assert max(no_jitter) == MAX_RETRY_DELAY
    assert no_jitter == sorted(no_jitter)


@pytest.mark.parametrize("retries_done", [0, 1, 5])
def test_jitter_shortens_by_at_most_its_fraction(retries_done: int) -> None:
    full = backoff_delay(retries_done, rand=lambda: 0.0)
    assert backoff_delay(retries_done, rand=lambda: 1.0) == pytest.approx(full * (1 - JITTER))
    for _ in range(50):
        assert full * (1 - JITTER) <= backoff_delay(retries_done) <= full


def test_retry_after_seconds() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"Retry-After": " 1.5 "}) == 1.5
    assert parse_retry_after({"retry-after": "0"}) == 0.0


def test_retry_after_ms_wins() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "9"}) == 9.0


def test_retry_after_http_date() -> None:
    date = email.utils.formatdate(NOW + 7, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(7.0)
    past = email.utils.formatdate(NOW - 60, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0.0


@pytest.mark.parametrize("value", ["", "soon", "-1", "nan", "inf", "Mon, 99 Foo 2024 00:00:00 GMT"])
def test_retry_after_nonsense_is_ignored(value: str) -> None:
    assert parse_retry_after({"retry-after": value}, now=now) is None


def test_decision_honours_the_server_up_to_a_minute() -> None:
    asked = decide(retries_done=0, max_retries=2, status=429, headers={"retry-after": "2"})
    assert (asked.retry, asked.delay, asked.server_asked) == (True, 2.0, 2.0)
    assert_one_line(asked.reason, "HTTP 429", "2 s")
    longest = decide(retries_done=0, max_retries=2, status=429, headers={"retry-after": str(MAX_RETRY_AFTER)})
    assert longest.delay == MAX_RETRY_AFTER
    dated = decide(
        retries_done=1,
        max_retries=2,
        status=429,
        headers={"retry-after": email.utils.formatdate(NOW + 4, usegmt=True)},
        now=now,
    )
    assert dated.delay == pytest.approx(4.0)


def test_decision_without_hint_backs_off() -> None:
    decision = decide(retries_done=1, max_retries=3, status=500, rand=lambda: 0.0)
    assert decision.delay == INITIAL_RETRY_DELAY * 2
    assert decision.server_asked is None
    assert_one_line(decision.reason, "HTTP 500", f"{INITIAL_RETRY_DELAY * 2:g} s")


@pytest.mark.parametrize("asked", ["3600", "61", "86400"])
def test_a_longer_server_wait_falls_back_to_backoff_and_says_so(asked: str) -> None:
    # openai-python's policy: more than a minute asked is not honoured, and not cut to a
    # minute either (the CLI sat silent for two minutes): the usual backoff applies.
    for retries_done in (0, 1, 4):
        decision = decide(
            retries_done=retries_done,
            max_retries=5,
            status=429,
            headers={"retry-after": asked},
            rand=lambda: 0.0,
        )
        assert decision.retry
        assert decision.delay == backoff_delay(retries_done, rand=lambda: 0.0) <= MAX_RETRY_DELAY
        assert decision.server_asked == float(asked)
        assert_one_line(decision.reason, "HTTP 429", f"{float(asked):.0f} s")


@pytest.mark.parametrize("asked", ["0", "-0"])
def test_a_zero_wait_asked_falls_back_to_backoff(asked: str) -> None:
    decision = decide(
        retries_done=0, max_retries=2, status=503, headers={"retry-after": asked}, rand=lambda: 0.0
    )
    assert decision.delay == INITIAL_RETRY_DELAY


def test_a_wait_longer_than_the_deadline_gives_up_at_once() -> None:
    # The server asks for longer than is left: give up now, whatever the backoff would be.
    asked = decide(
        retries_done=0, max_retries=2, status=429, headers={"retry-after": "3600"}, deadline_remaining=300
    )
    assert (asked.retry, asked.deadline, asked.delay) == (False, True, 0.0)
    assert_one_line(asked.reason, "HTTP 429", "3600 s", "deadline")
    within = decide(
        retries_done=0, max_retries=2, status=429, headers={"retry-after": "20"}, deadline_remaining=30
    )
    assert (within.retry, within.delay, within.deadline) == (True, 20.0, False)
    short = decide(
        retries_done=0, max_retries=2, status=429, headers={"retry-after": "20"}, deadline_remaining=5
    )
    assert (short.retry, short.deadline) == (False, True)
    # The backoff itself would pass the deadline.
    backoff = decide(
        retries_done=3, max_retries=5, error="ConnectError", deadline_remaining=1.0, rand=lambda: 0.0
    )
    assert (backoff.retry, backoff.deadline) == (False, True)
    assert_one_line(backoff.reason, "ConnectError", "deadline")
    spent = decide(retries_done=0, max_retries=5, status=500, deadline_remaining=-2.0)
    assert (spent.retry, spent.deadline) == (False, True)
    # No deadline, or plenty of time: the usual answer.
    assert decide(retries_done=0, max_retries=2, status=500, deadline_remaining=None).retry
    assert decide(retries_done=0, max_retries=2, status=500, deadline_remaining=100).retry
    # A failure that is not retried is not blamed on the deadline.
    assert not decide(retries_done=0, max_retries=2, status=400, deadline_remaining=0).deadline


def test_constants_are_named_and_sane() -> None:
    assert _retry.DEFAULT_MAX_RETRIES == 2
    assert 0 < INITIAL_RETRY_DELAY < MAX_RETRY_DELAY <= MAX_RETRY_AFTER
    assert 0 <= JITTER < 1
