"""The only things the async and sync senders do differently, besides ``await``.

:mod:`._async` calls :class:`AsyncBackend`; ``scripts/unasync.py`` renames it
:class:`SyncBackend` in the generated :mod:`._sync`. Each backend has the same four
operations:

``sleep(seconds)``
    Wait before a retry.
``run_blocking(function, *args, **kwargs)``
    Make a blocking call (the store, choosing the context). Async: in a worker thread
    (``asyncio.to_thread``), so the event loop never waits on the database and turns of
    different conversations run at once in one loop. Sync: directly.
``blocking_portal(function)``
    The plain callable that code running inside ``run_blocking`` uses to call back into
    the sender (the summarize policy's request, made while the context is chosen). Async:
    it runs the coroutine on the event loop that made the portal and waits for it in the
    worker thread. Sync: the function itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Coroutine
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

    @staticmethod
    def blocking_portal(function: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
        loop = asyncio.get_running_loop()  # made on the loop, called from a worker thread

        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return asyncio.run_coroutine_threadsafe(function(*args, **kwargs), loop).result()

        return call


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

    @staticmethod
    def blocking_portal(function: Callable[P, T]) -> Callable[P, T]:
        return function
