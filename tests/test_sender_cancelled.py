"""An AsyncSender whose caller is cancelled while a store call waits for a worker thread.

The gateway cancels the task reading a stream when its client leaves; if that happens as the
reply ends, the call that stores the reply (and releases the conversation's lease) may still
be queued for a free worker thread. It must run all the same.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from stub_server import StubServer

from gilas_conv import ConversationStore
from gilas_conv.sender import AsyncSender, Sender

API_KEY = "sk-sender-cancelled"


class _CountingExecutor(ThreadPoolExecutor):
    """One worker thread; counts the calls submitted to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_a_reply_whose_reader_is_cancelled_while_its_store_call_is_queued_is_stored(
    store: ConversationStore, stub: StubServer
) -> None:
    conv = store.create(model="gpt-4o-mini")
    gate = threading.Event()

    async def main() -> None:
        executor = _CountingExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        async with AsyncSender(store, base_url=stub.base_url, api_key=API_KEY) as sender:
            stream = await sender.stream(conv, "hi")
            busy = asyncio.get_running_loop().run_in_executor(None, gate.wait)  # the one thread is taken
            submitted = executor.submitted
            reader = asyncio.ensure_future(stream.final_message())
            while executor.submitted == submitted:  # the reply arrived; its store call is queued
                await asyncio.sleep(0)
            reader.cancel()  # the client leaves just then
            await asyncio.gather(reader, return_exceptions=True)
            gate.set()
            await busy
        executor.shutdown(wait=True)  # every call submitted has run

    asyncio.run(main())
    stored = [(m.role, m.content, m.status) for m in store.get(conv.id).messages()]
    assert stored == [("user", "hi", "complete"), ("assistant", "echo: hi", "complete")]
    # The lease went with the stored reply: the next turn is not refused as busy.
    with Sender(store, base_url=stub.base_url, api_key=API_KEY) as sender:
        assert sender.send(conv.id, "again").content == "echo: again"
