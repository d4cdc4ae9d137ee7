"""The gateway as the tests run it: a real uvicorn server on a free loopback port, in a thread,
in front of the stub upstream (tests/stub_server.py), on the test's database; and what the
gateway tests do with it (an SDK client, a turn left running, the stored messages read
back). The ``gateway`` and ``alice_key`` fixtures are in conftest.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import uvicorn

from gilas_conv import ConversationStore
from gilas_conv.server import create_app

UPSTREAM_KEY = "sk-gateway-upstream"
MODEL = "gpt-4o-mini"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayServer:
    """``create_app(**options)`` served by uvicorn in a thread; ``url`` is its ``/v1``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ws="none",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)


@contextmanager
def running_gateway(store: ConversationStore, base_url: str, **options: Any) -> Iterator[GatewayServer]:
    app = create_app(store=store, base_url=base_url, api_key=UPSTREAM_KEY, **options)
    server = GatewayServer(app).start()
    try:
        yield server
    finally:
        server.stop()


def sdk_client(gateway: GatewayServer, key: str, **options: Any) -> openai.OpenAI:
    """The official SDK's client of ``gateway`` with ``key``; no retries unless asked."""
    return openai.OpenAI(base_url=gateway.url, api_key=key, **{"max_retries": 0, **options})


def stored(
    store: ConversationStore, conversation_id: str, owner: str = "alice"
) -> list[tuple[str, object, str]]:
    """The conversation's stored messages as (role, content, status), read as ``owner``."""
    return [(m.role, m.content, m.status) for m in store.get(conversation_id, owner=owner).messages()]


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def turn_in_background(client: openai.OpenAI, conversation_id: str, content: str) -> threading.Thread:
    """A turn of ``conversation_id`` sent from a thread (already started; join it)."""

    def turn() -> None:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            extra_body={"conversation": conversation_id},
        )

    worker = threading.Thread(target=turn)
    worker.start()
    return worker
