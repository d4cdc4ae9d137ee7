"""Failed requests at the keep-alive boundary: an HTTP client's pool against a server that
closes idle connections as the client reuses them.

``--clients`` clients each send a streamed request (``gateway_stub.py``'s reply) every
0.97-1.03 keep-alive periods, for ``--seconds``, to the stub under uvicorn with a keep-alive
of ``--keep-alive`` seconds; the client's pool keeps idle connections as long (``--expiry``,
by default the same). A request sent on a connection the server is closing fails; the count
of such failures is what a gateway that does not retry its upstream passes on to clients
as 502s. ``--transport aiohttp`` puts aiohttp under the httpx client (``pip install
httpx-aiohttp``); the default is httpx's own.

    python benchmarks/keepalive.py [--transport httpx|aiohttp] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import socket
import time

import httpx
import uvicorn
from gateway_stub import make_app

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client(transport: str, connections: int, expiry: float) -> httpx.AsyncClient:
    if transport == "aiohttp":
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=expiry)
            return aiohttp.ClientSession(connector=connector)

        return httpx.AsyncClient(timeout=30, transport=AiohttpTransport(client=session))
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=expiry
    )
    return httpx.AsyncClient(timeout=30, limits=limits)


async def run(args: argparse.Namespace) -> None:
    port = free_port()
    config = uvicorn.Config(
        make_app(8),
        host="127.0.0.1",
        port=port,
        log_level="error",
        access_log=False,
        timeout_keep_alive=args.keep_alive,
        backlog=2048,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    failures: collections.Counter[str] = collections.Counter()
    done = 0
    end = time.monotonic() + args.seconds
    async with client(args.transport, args.clients, args.expiry or args.keep_alive) as http:

        async def one() -> None:
            nonlocal done
            while time.monotonic() < end:
                await asyncio.sleep(random.uniform(0.97, 1.03) * args.keep_alive)
                try:
                    async with http.stream(
                        "POST", url, json=BODY, headers={"Authorization": "Bearer sk-bench-upstream"}
                    ) as response:
                        async for _ in response.aiter_bytes():
                            pass
                    done += 1
                except httpx.HTTPError as err:
                    failures[f"{type(err).__name__}: {str(err)[:60]}"] += 1

        await asyncio.gather(*(one() for _ in range(args.clients)))
    server.should_exit = True
    await serving
    print(f"{args.transport}: {sum(failures.values())} failed of {done + sum(failures.values())} requests")
    for what, count in failures.most_common():
        print(f"  {count:5d}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=("httpx", "aiohttp"), default="httpx")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--keep-alive", type=int, default=1, help="the server's keep-alive (seconds)")
    parser.add_argument("--expiry", type=float, help="the client pool's keep-alive (default: the server's)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
