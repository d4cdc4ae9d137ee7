"""The only things the async and sync senders do differently, besides ``await``.

:mod:`._async` calls :class:`AsyncBackend`; ``scripts/unasync.py`` renames it
:class:`SyncBackend` in the generated :mod:`._sync`. Each backend has the same two
operations:

``sleep(seconds)``
    Wait before a retry.
``run_blocking(function, *args, **kwargs)``
    Make a blocking call (the store, choosing the context). Async: in a worker thread
    (``asyncio.to_thread``), so the event loop never waits on the database and turns of
    different conversations run at once in one loop. Sync: directly.

Nothing running in ``run_blocking`` calls back into the sender: a request the store work
needs (the summarize policy's summary) is returned to the sender, which makes it between
two blocking calls, so no worker thread ever waits on the network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class AsyncBackend:
    @staticmethod
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    @staticmethod
    async def run_blocking(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(function, *args, **kwargs)


class SyncBackend:
    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)

    @staticmethod
    def run_blocking(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return function(*args, **kwargs)
