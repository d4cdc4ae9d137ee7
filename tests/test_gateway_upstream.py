"""The gateway's upstream connections (ShardedTransport), against the real stub server."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from stub_server import StubServer

from gilas_conv.server._upstream import SHARD_CONNECTIONS, ShardedTransport

API_KEY = None  # the module stub server checks no key


def test_requests_under_way_spread_over_the_pools_and_are_counted_until_closed(stub: StubServer) -> None:
    async def scenario() -> None:
        transport = ShardedTransport(max_connections=3 * SHARD_CONNECTIONS, max_keepalive_connections=6)
        async with httpx.AsyncClient(transport=transport) as client:
            one = await client.send(client.build_request("GET", stub.base_url + "/models"), stream=True)
            assert transport._busy == [1, 0, 0]
            await one.aclose()
            assert transport._busy == [0, 0, 0]
            opened = [
                await client.send(client.build_request("GET", stub.base_url + "/models"), stream=True)
                for _ in range(4)
            ]
            assert transport._busy == [2, 1, 1]
            assert all(r.status_code == 200 for r in opened)
            for response in opened:
                await response.aread()  # read to the end: the stream closes itself
            assert transport._busy == [0, 0, 0]
            with pytest.raises(httpx.ConnectError):  # a refused connection is not counted
                await client.get("http://127.0.0.1:9/")
            assert transport._busy == [0, 0, 0]

    asyncio.run(scenario())


def test_the_pools_together_hold_at_most_max_connections() -> None:
    for total, pools in ((1, 1), (10, 1), (11, 2), (100, 10), (101, 11)):
        transport = ShardedTransport(max_connections=total, max_keepalive_connections=20)
        assert len(transport._pools) == pools
        sizes = [pool._pool._max_connections for pool in transport._pools]
        assert max(sizes) <= SHARD_CONNECTIONS and total <= sum(sizes) < total + pools
        idle = [pool._pool._max_keepalive_connections for pool in transport._pools]
        assert min(20, total) <= sum(idle) < 20 + pools and all(
            i <= s for i, s in zip(idle, sizes, strict=True)
        )
    with pytest.raises(ValueError):
        ShardedTransport(max_connections=0, max_keepalive_connections=0)
