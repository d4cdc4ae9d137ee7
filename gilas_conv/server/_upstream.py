"""The gateway's connections to the upstream: several small pools instead of one large one.

httpx's pool (httpcore 1.0) examines every connection it holds each time a request is
added or a response closed: whether each has expired (for an idle one, a ``select`` on
its socket) and, for each idle one, how many are idle (quadratic). One sender streaming
100 replies at once holds 100 connections, so each turn paid for 100 to 10,000 checks on
the event loop: in profiles of 100 concurrent streams, a fifth of the gateway's CPU.
:class:`ShardedTransport` spreads the same number of connections over pools of
:data:`SHARD_CONNECTIONS` each and sends every request through the pool with the fewest
requests under way, so each of those scans sees a few connections. One request at a time
always goes through the first pool, as with one pool; at the limit, a request waits for a
free connection in its pool (the pool timeout applies), as it would in one pool.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable

import httpx

__all__ = ["SHARD_CONNECTIONS", "ShardedTransport"]

# Connections per pool: few enough that a pool's scans stay cheap.
SHARD_CONNECTIONS = 10


class _Released(httpx.AsyncByteStream):
    """A response body that calls ``release`` once when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()  # the body's own iterator: no generator per part

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class ShardedTransport(httpx.AsyncBaseTransport):
    """``max_connections`` connections as pools of at most :data:`SHARD_CONNECTIONS`
    (``httpx.AsyncHTTPTransport`` each), keeping ``max_keepalive_connections`` idle ones
    among them (spread evenly); a request goes to the pool with the fewest requests under
    way (a response counts until it is closed).

    Idle connections are kept no more than one pool would keep: a server closes one that
    stays idle past its keep-alive timeout, and a request sent on it just as that happens
    fails (ReadError); the more idle connections, the more often."""

    def __init__(self, *, max_connections: int, max_keepalive_connections: int) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        count = math.ceil(max_connections / SHARD_CONNECTIONS)
        size = math.ceil(max_connections / count)
        idle = min(size, math.ceil(max(0, max_keepalive_connections) / count))
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=idle)
        tls = httpx.create_ssl_context()  # one for all: each loads the CA certificates
        self._pools = [httpx.AsyncHTTPTransport(verify=tls, limits=limits) for _ in range(count)]
        self._busy = [0] * count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self._busy
        index = busy.index(min(busy))
        busy[index] += 1

        def release() -> None:
            busy[index] -= 1

        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, release)
        return response

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()
