"""The gateway as the tests run it: a real uvicorn server on a free loopback port, in a thread,
in front of the stub upstream (tests/stub_server.py), on the test's database."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from gilas_conv import ConversationStore
from gilas_conv.server import create_app

UPSTREAM_KEY = "sk-gateway-upstream"


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
