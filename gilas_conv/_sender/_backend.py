"""The only things the async and sync senders do differently, besides ``await``.

:mod:`._async` calls :class:`AsyncBackend`; ``scripts/unasync.py`` renames it
:class:`SyncBackend` in the generated :mod:`._sync`. Each backend has the same three
operations:

``sleep(seconds)``
    Wait before a retry.
``run_blocking(function, *args, **kwargs)``
    Make a blocking call (the store, choosing the context). Async: in a worker thread
    (like ``asyncio.to_thread``), so the event loop never waits on the database and turns
    of different conversations run at once in one loop. Once made, the call runs to its end
    even if the caller is cancelled meanwhile (the caller is told at once): a reply stored
    or a lease released as a stream ends must not be dropped because the client left just
    then. (``asyncio.to_thread`` alone would drop a call still queued for a free thread.)
    Sync: directly.
``run_claiming(release, function, *args, **kwargs)``
    ``run_blocking`` for a call that takes something it must give back (the turn lease:
    ``_prepare`` returns a turn holding it). Async: if the caller is cancelled while the
    worker thread runs -- a client gone while its message is stored -- the thread still
    finishes, and ``release(result)`` is called (in a worker thread) as soon as it returns,
    since no one is left to use the result. Sync: directly (nothing can cancel the caller
    between the call and its return).

Nothing running in ``run_blocking`` calls back into the sender: a request the store work
needs (the summarize policy's summary) is returned to the sender, which makes it between
two blocking calls, so no worker thread ever waits on the network.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("gilas_conv.sender")


class AsyncBackend:
    @staticmethod
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    @staticmethod
    async def run_blocking(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await _in_thread(_log_unwaited_failure, function, *args, **kwargs)

    @staticmethod
    async def run_claiming(
        release: Callable[[T], object], function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await _in_thread(functools.partial(_release_unclaimed, release), function, *args, **kwargs)


async def _in_thread(
    abandoned: Callable[[asyncio.Future[T]], object],
    function: Callable[P, T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``function(*args, **kwargs)`` in one of the loop's worker threads, in this context.

    Shielded: cancelling the caller's wait cancels neither the call, queued or running, nor
    its result; ``abandoned`` gets the call's future when it is done if the caller was
    cancelled meanwhile (no one else will see its result or failure)."""
    call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
    future = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(abandoned)
        raise


def _log_unwaited_failure(done: asyncio.Future[Any]) -> None:
    """Log the failure of a call whose caller was cancelled (no one else will see it)."""
    if not done.cancelled() and done.exception() is not None:
        logger.warning("a blocking call whose caller was cancelled failed", exc_info=done.exception())


def _release_unclaimed(release: Callable[[T], object], done: asyncio.Future[T]) -> None:
    """``release`` the result of a call whose caller was cancelled (a call that failed took nothing)."""
    if done.cancelled() or done.exception() is not None:
        return
    try:
        done.get_loop().run_in_executor(None, release, done.result())
    except RuntimeError:  # the loop's executor is shutting down: release here, blocking
        try:
            release(done.result())
        except Exception:
            logger.warning("could not release what a cancelled call took", exc_info=True)


class SyncBackend:
    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)

    @staticmethod
    def run_blocking(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return function(*args, **kwargs)

    @staticmethod
    def run_claiming(
        release: Callable[[T], object], function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return function(*args, **kwargs)
