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
    assert decision.reason == f"HTTP {status} is not retryable"


def test_connection_errors_are_retried_until_max_retries() -> None:
    decisions = [decide(retries_done=n, max_retries=2, error="ConnectError") for n in range(3)]
    assert [d.retry for d in decisions] == [True, True, False]
    assert decisions[2].reason == "ConnectError; giving up after 2 retries"
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


def test_decision_honours_the_server_and_caps_it() -> None:
    asked = decide(retries_done=0, max_retries=2, status=429, headers={"retry-after": "2"})
    assert (asked.retry, asked.delay) == (True, 2.0)
    assert "as the server asked" in asked.reason
    capped = decide(retries_done=0, max_retries=2, status=503, headers={"retry-after": "3600"})
    assert capped.delay == MAX_RETRY_AFTER
    assert "capped" in capped.reason
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
    assert decision.reason == f"HTTP 500; retry 2 of 3 in {INITIAL_RETRY_DELAY * 2:.3f} s (backoff)"


def test_constants_are_named_and_sane() -> None:
    assert _retry.DEFAULT_MAX_RETRIES == 2
    assert 0 < INITIAL_RETRY_DELAY < MAX_RETRY_DELAY <= MAX_RETRY_AFTER
    assert 0 <= JITTER < 1
