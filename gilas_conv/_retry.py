"""When to retry a chat-completions request, and how long to wait first: pure functions.

The policy (openai-python's, ``_base_client._should_retry`` and
``_calculate_retry_timeout``), plus a deadline:

* Retried: connection errors and timeouts (no answer arrived), and the statuses in
  :data:`RETRYABLE_STATUSES` -- 408 Request Timeout, 409 Conflict (a lock on the
  server's side), 429 Too Many Requests and every 5xx. Anything else, notably 400, 401,
  403, 404 and 422, is the caller's problem and is raised at once: repeating the same
  request cannot succeed. At most ``max_retries`` retries.
* Waiting: the server's ``retry-after-ms`` header (milliseconds), else ``Retry-After``
  (seconds, or an HTTP date), is honoured when it asks for more than 0 and at most
  :data:`MAX_RETRY_AFTER` seconds. Otherwise -- no hint, a hint of 0 or less, or a longer
  one -- exponential backoff from :data:`INITIAL_RETRY_DELAY`, doubling per retry up to
  :data:`MAX_RETRY_DELAY`, less up to :data:`JITTER` of it at random so that clients
  which failed together do not come back together. A long ``Retry-After`` is therefore
  never slept in full (nor silently cut to a minute): the retry comes after the backoff,
  and the decision's reason says what the server asked.
* Deadline: given ``deadline_remaining`` (seconds left before the caller's overall
  deadline), the answer is "give up now" when the server asks for a wait longer than
  that, or when the chosen wait would itself pass it; the reason says so.

Nothing here sleeps or logs. A :class:`RetryDecision` carries the wait and a one-line
human reason; the senders log one debug line per decision, and a CLI can show the reason
to say that it is waiting and for how long.
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
# The longest server-asked wait that is honoured; a longer one falls back to the backoff
# (openai-python's limit: a caller would rather retry, or see the error, than hang).
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
    """Whether to retry, after how many seconds, and why.

    ``reason`` is one line for a human (what failed, and what happens next: the wait and
    the retry number, or why not). ``server_asked`` is the wait the server asked for, if
    it said; ``deadline`` is True when the decision is to give up because of the
    caller's deadline. ``number`` is the retry about to be made (1 for the first; 0 when
    not retrying) out of ``max_retries``.
    """

    retry: bool
    delay: float
    reason: str
    server_asked: float | None = None
    deadline: bool = False
    number: int = 0
    max_retries: int = 0


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 100 else f"{value:.0f} s"


def decide(
    *,
    retries_done: int,
    max_retries: int,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    error: str | None = None,
    deadline_remaining: float | None = None,
    rand: Callable[[], float] = random.random,
    now: Callable[[], float] = time.time,
) -> RetryDecision:
    """Decide about a failed attempt: an error ``status`` (with its ``headers``), or a
    connection ``error`` (its description) when no answer arrived.

    ``retries_done`` counts the retries already made, so the first failure passes 0.
    ``deadline_remaining``: seconds left before the caller's overall deadline (None: no
    deadline); a wait the server asks for, or the wait chosen, longer than that means
    giving up now (see the module docstring).
    """
    what = f"HTTP {status}" if status is not None else (error or "connection error")
    if status is not None and not is_retryable_status(status):
        return RetryDecision(False, 0.0, f"{what} is not retryable")
    asked = parse_retry_after(headers, now=now)
    if retries_done >= max_retries:
        return RetryDecision(False, 0.0, f"{what}; giving up after {retries_done} retries", asked)
    if asked is not None and 0 < asked <= MAX_RETRY_AFTER:
        delay = asked
        source = "as the server asked"
    else:
        delay = backoff_delay(retries_done, rand=rand)
        source = "backoff"
        if asked is not None and asked > MAX_RETRY_AFTER:
            source = (
                f"backoff: the server asked for {_seconds(asked)}, longer than the "
                f"{_seconds(MAX_RETRY_AFTER)} honoured"
            )
    if deadline_remaining is not None:
        left = max(0.0, deadline_remaining)
        if asked is not None and asked > left:
            return RetryDecision(
                False,
                0.0,
                f"{what}; the server asked to wait {_seconds(asked)}, longer than the "
                f"{_seconds(left)} left before the deadline: giving up",
                asked,
                deadline=True,
            )
        if delay >= left:
            return RetryDecision(
                False,
                0.0,
                f"{what}; waiting {_seconds(delay)} would pass the deadline "
                f"({_seconds(left)} left): giving up",
                asked,
                deadline=True,
            )
    return RetryDecision(
        True,
        delay,
        f"{what}; waiting {_seconds(delay)} ({source}) before retry {retries_done + 1} of {max_retries}",
        asked,
        number=retries_done + 1,
        max_retries=max_retries,
    )
