"""When to retry a chat-completions request, and how long to wait first: pure functions.

The policy (the one openai-python uses):

* Retried: connection errors and timeouts (no answer arrived), and the statuses in
  :data:`RETRYABLE_STATUSES` -- 408 Request Timeout, 409 Conflict (a lock on the
  server's side), 429 Too Many Requests and every 5xx. Anything else, notably 400, 401,
  403, 404 and 422, is the caller's problem and is raised at once: repeating the same
  request cannot succeed.
* Waiting: the server's ``retry-after-ms`` header (milliseconds), else ``Retry-After``
  (seconds, or an HTTP date), capped at :data:`MAX_RETRY_AFTER`; without either,
  exponential backoff from :data:`INITIAL_RETRY_DELAY`, doubling per retry up to
  :data:`MAX_RETRY_DELAY`, less up to :data:`JITTER` of it at random so that clients
  which failed together do not come back together.

Nothing here sleeps or logs; the senders do, one debug line per :class:`RetryDecision`.
"""

from __future__ import annotations

import datetime
import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "INITIAL_RETRY_DELAY",
    "JITTER",
    "MAX_RETRY_AFTER",
    "MAX_RETRY_DELAY",
    "RETRYABLE_STATUSES",
    "RetryDecision",
    "backoff_delay",
    "decide",
    "is_retryable_status",
    "parse_retry_after",
]

DEFAULT_MAX_RETRIES = 2
# Seconds before the first retry; each further retry waits twice as long ...
INITIAL_RETRY_DELAY = 0.5
# ... but never longer than this.
MAX_RETRY_DELAY = 8.0
# A server asking for a longer pause than this gets this long: a caller would rather see
# the error than hang for minutes.
MAX_RETRY_AFTER = 60.0
# Backoff delays are shortened by a random fraction up to this.
JITTER = 0.25

RETRYABLE_STATUSES = frozenset({408, 409, 429})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; httpx.Headers is not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value.strip() if value is not None else None


def parse_retry_after(
    headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time
) -> float | None:
    """Seconds the server asked us to wait, or None if it did not say (or said nonsense).

    ``retry-after-ms`` wins over ``Retry-After``; a date in the past means "now" (0).
    """
    millis = _header(headers, "retry-after-ms")
    if millis:
        try:
            value = float(millis) / 1000
        except ValueError:
            pass
        else:
            if value == value and value >= 0 and value != float("inf"):
                return value
    text = _header(headers, "retry-after")
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" means UTC with no claim about the sender's zone
            when = when.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, when.timestamp() - now())
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return None
    return seconds


def backoff_delay(retries_done: int, *, rand: Callable[[], float] = random.random) -> float:
    """The wait before retry number ``retries_done + 1`` when the server gave no hint."""
    delay = min(INITIAL_RETRY_DELAY * 2**retries_done, MAX_RETRY_DELAY)
    return delay * (1 - JITTER * rand())


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether to retry, after how many seconds, and why (the text the senders log)."""

    retry: bool
    delay: float
    reason: str


def decide(
    *,
    retries_done: int,
    max_retries: int,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    error: str | None = None,
    rand: Callable[[], float] = random.random,
    now: Callable[[], float] = time.time,
) -> RetryDecision:
    """Decide about a failed attempt: an error ``status`` (with its ``headers``), or a
    connection ``error`` (its description) when no answer arrived.

    ``retries_done`` counts the retries already made, so the first failure passes 0.
    """
    what = f"HTTP {status}" if status is not None else (error or "connection error")
    if status is not None and not is_retryable_status(status):
        return RetryDecision(False, 0.0, f"{what} is not retryable")
    if retries_done >= max_retries:
        return RetryDecision(False, 0.0, f"{what}; giving up after {retries_done} retries")
    asked = parse_retry_after(headers, now=now)
    if asked is not None:
        delay = min(asked, MAX_RETRY_AFTER)
        source = "as the server asked" if delay == asked else f"capped from the {asked:g} s asked"
    else:
        delay = backoff_delay(retries_done, rand=rand)
        source = "backoff"
    return RetryDecision(
        True,
        delay,
        f"{what}; retry {retries_done + 1} of {max_retries} in {delay:.3f} s ({source})",
    )
