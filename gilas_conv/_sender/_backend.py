"""The only things the async and sync senders do differently, besides ``await``.

:mod:`._async` calls :class:`AsyncBackend`; ``scripts/unasync.py`` renames it
:class:`SyncBackend` in the generated :mod:`._sync`. Each backend has the same three
operations:

``sleep(seconds)``
    Wait before a retry.
``run_blocking(function, *args, **kwargs)``
    Make a blocking call (the store, choosing the context). Async: in a worker thread
    (``asyncio.to_thread``), so the event loop never waits on the database and turns of
    different conversations run at once in one loop. Sync: directly.
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
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("gilas_conv.sender")


class AsyncBackend:
    @staticmethod
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    @staticmethod
    async def run_blocking(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(function, *args, **kwargs)

    @staticmethod
    async def run_claiming(
        release: Callable[[T], object], function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        future = loop.run_in_executor(None, call)
        try:
            # Shielded: cancelling the wait must not drop the result the thread will still produce.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(_release_unclaimed, release))
            raise


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
