"""Where the gateway's CPU per turn goes: py-spy samples of ``gilas-conv serve`` at one stream.

Starts the stub upstream and the gateway as ``benchmarks/gateway.py`` does, warms up, then
runs timed turns one after the other for ``--seconds`` while py-spy (``pip install py-spy``)
samples the gateway process, starting a new conversation every ``--turns-per-conversation``
turns (as long as a conversation of ``gateway.py`` at 1 stream, so per-message work weighs
as it does there). Prints the samples per turn by area (the first area a sample's stack
falls in, in the order listed), and leaves the raw collapsed stacks in ``--out``. py-spy
slows the process down (about 1.5x at 1000 Hz): compare the areas' shares, not their ms
with ``gateway.py``'s CPU per turn.

    python benchmarks/gateway_profile.py --db postgresql://... [--source SRC] [--seconds 25]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gateway as bench

# Samples whose innermost frame waits: counted apart (py-spy takes them for work).
WAITS = [
    ("idle worker thread (queue.get)", "_worker (concurrent/futures/thread.py"),
    ("psycopg wait (server round trips)", "Connection.wait (psycopg"),
]
# (area, a string of a frame that puts a sample in it); the first match wins.
AREAS = [
    ("window plan (read + build messages)", "plan_context ("),
    ("upstream request body (JSON)", "_build_request ("),
    ("lease + user message", "_take_turn ("),
    ("reply store", "_store_reply ("),
    ("upstream SSE decode + accumulate", "_StreamCore.feed ("),
    ("thread hop (submit)", "ThreadPoolExecutor.submit"),
    ("httpx send to upstream", "AsyncClient.send ("),
    ("httpx read upstream body", "Response.aiter_bytes ("),
    ("chunk rewrite (conversation)", "stream_event ("),
    ("uvicorn send to client", "RequestResponseCycle.send"),
    ("request body parse", "json_body ("),
    ("auth", "owner ("),
    ("starlette/uvicorn request", "RequestResponseCycle.run_asgi"),
    ("uvicorn protocol", "httptools_impl"),
    ("event loop (uvloop, C)", "Runner.run"),
]


def breakdown(raw: Path, turns: int) -> str:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        leaf = stack.rpartition(";")[2]
        area = next((name for name, key in WAITS if key in leaf), None)
        area = area or next((name for name, key in AREAS if key in stack), "other")
        counts[area] += int(n)
    rows = [f"{total / turns:.1f} ms sampled per turn ({turns} turns, 1 sample = 1 ms)"]
    rows += [f"{n / turns:6.2f} ms  {100 * n / total:4.1f}%  {area}" for area, n in counts.most_common()]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="the gateway's database URL")
    parser.add_argument("--source", type=Path, help="run the gateway from this source tree")
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--turns-per-conversation", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("gateway-profile.txt"), help="collapsed stacks")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = args.out.resolve()
    with (
        tempfile.TemporaryDirectory(prefix="gilas-gateway-profile-") as tmp,
        contextlib.ExitStack() as running,
    ):
        work = Path(tmp)
        port = bench.free_port()
        upstream = f"http://127.0.0.1:{port}/v1"
        stub = [sys.executable, str(bench.HERE / "gateway_stub.py"), "--port", str(port)]
        running.enter_context(bench.process(stub, ready=upstream + "/models", log=work / "stub.log"))
        url, key, pids = running.enter_context(bench.gateway(args.db, upstream, work, args.source))

        async def go() -> int:
            front = bench.Front("gateway", url, key, stateful=True, pids=pids)
            await front.round(1)  # warm up
            command = [py_spy, "record", "-r", "1000", "-d", str(int(args.seconds)), "-f", "raw"]
            command += ["-o", str(out), "--pid", str(pids[0])]
            spy = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            turns, began = 0, time.monotonic()
            while spy.poll() is None and time.monotonic() - began < args.seconds + 30:
                if turns and turns % args.turns_per_conversation == 0:
                    await front.aclose()
                    front = bench.Front("gateway", url, key, stateful=True, pids=pids)
                    await front.round(1)  # its first turn (untimed) creates the conversation
                    turns += len(front.levels[1].turns)
                    continue
                before = len(front.levels[1].turns)
                await front.round(1)
                turns += len(front.levels[1].turns) - before
            await front.aclose()
            spy.wait()
            return turns

        turns = asyncio.run(go())
    print(breakdown(out, turns))


if __name__ == "__main__":
    main()
