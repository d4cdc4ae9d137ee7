"""What the gateway adds to a streamed turn, at 1, 10 and 100 concurrent conversations.

Every process runs on 127.0.0.1, each in its own process:

upstream
    ``benchmarks/gateway_stub.py``: an asyncio (uvicorn) OpenAI-compatible stub that streams
    a fixed reply of a few words at once, so what is measured is what sits in front of it.
direct
    The client calls the stub itself: the baseline every other figure is compared with.
gateway
    ``gilas-conv serve`` (one worker, a client key from ``gilas-conv keys create``) on
    SQLite, and on Postgres when ``--postgres URL`` is given. Each conversation gets one
    untimed first turn (which creates it); then every timed turn sends only its new user
    message with ``conversation``: the gateway stores it, builds the window from the stored
    history, streams the reply through and stores it.
litellm
    LiteLLM's proxy (``--litellm PATH`` to its ``litellm`` executable, installed apart from
    this project) in front of the same stub, as the anchor: it does less (no history, no
    window, nothing stored; it runs without a database here).

Every front runs at once, side by side (each gateway on its own SQLite file). Each
concurrency level runs ``N`` conversations at once, each doing turns one after the other
(see ``TURNS``), in ``--rounds`` rounds; a round runs the fronts one after the other, so
the fronts are interleaved and a change in the machine's load between rounds falls on all
of them alike (the figures of a level are over all its rounds). A turn is timed from the
request to ``data: [DONE]``; time to first token is to the first chunk with content. The
added latency of a front is its median turn minus the direct median at the same level.
Turns per second: all the level's turns over their wall time. CPU per turn: the front's
processes' CPU time (user and system, from /proc) over the level, per timed turn (for
"direct", the stub's): unlike the latencies, it hardly moves with the machine's load.
Memory: the resident set size (VmRSS) of the front's processes after the level, and its
peak (VmHWM).

    python benchmarks/gateway.py [--postgres URL] [--litellm /path/to/litellm] [--baseline SRC]

``--baseline SRC`` also runs the gateway from another source tree (a worktree of an
earlier commit) in the same run, as "gateway before": a change is compared at one load.
``benchmarks/README.md`` shows and explains the output. Speed is measured here, never in
the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
UPSTREAM_KEY = "sk-bench-upstream"
LITELLM_KEY = "sk-bench-litellm"
MODEL = "gpt-4o-mini"
# Concurrent conversations -> timed turns each per round (with the default 4 rounds: 40, 120
# and 400 turns per level and front).
TURNS = {1: 10, 10: 3, 100: 1}
ROUNDS = 4
START_TIMEOUT_S = 60.0
TURN_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pids: list[int]) -> Iterator[int]:
    """``pids`` and their children, grandchildren... (each once; those gone are skipped)."""
    seen, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
            yield pid


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of ``pids`` and their children so far (seconds)."""
    ticks = 0
    for pid in process_tree(pids):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kib(pids: list[int]) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB, summed over ``pids`` and their children."""
    now, peak = 0, 0
    for pid in process_tree(pids):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    now += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    peak += int(line.split()[1])
    return now, peak


@contextlib.contextmanager
def process(
    args: list[str], *, env: dict[str, str] | None = None, ready: str, log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``args``; wait until GET ``ready`` answers; terminate it afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited ({proc.returncode}); see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(
                        ready, timeout=2, headers={"Authorization": f"Bearer {LITELLM_KEY}"}
                    ).status_code
                    < 500
                ):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} did not start; see {log}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Level:
    turns: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0  # the front's CPU seconds over the level's timed turns
    rss: tuple[int, int] = (0, 0)
    errors: int = 0


async def one_turn(
    client: httpx.AsyncClient, url: str, key: str, body: dict[str, object]
) -> tuple[float, float, str | None]:
    """(seconds to [DONE], seconds to the first content, the conversation named).

    The response is read to its end after ``[DONE]``, as the openai SDK does, so the
    connection goes back to the pool and the next turn reuses it."""
    began = time.perf_counter()
    first = done = None
    conversation = None
    async with client.stream(
        "POST", url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = time.perf_counter() - began
                continue
            chunk = json.loads(line[6:])
            conversation = chunk.get("conversation", conversation)
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - began
    if done is None:
        raise RuntimeError("the stream ended without data: [DONE]")
    return done, first or 0.0, conversation


class Front:
    """One front under test; each level's client and conversations are kept from round to
    round (one event loop runs every round)."""

    def __init__(self, name: str, url: str, key: str, *, stateful: bool, pids: list[int]) -> None:
        self.name, self.url, self.key, self.stateful, self.pids = name, url, key, stateful, pids
        self.levels: dict[int, Level] = {}
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._conversations: dict[int, list[str | None]] = {}

    @staticmethod
    def _body(text: str, conversation: str | None) -> dict[str, object]:
        out: dict[str, object] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if conversation is not None:
            out["conversation"] = conversation
        return out

    async def round(self, concurrency: int) -> None:
        """``TURNS[concurrency]`` timed turns in each of ``concurrency`` conversations at
        once (each created, or for a stateless front warmed up, by an untimed turn in the
        level's first round)."""
        level = self.levels.setdefault(concurrency, Level())
        client = self._clients.get(concurrency)
        if client is None:
            # Idle connections are dropped after 2 s, before any front's server closes them
            # (uvicorn's keep-alive is 5 s, as is httpx's default): a request sent on a
            # connection as the server closes it fails with ReadError, whatever the front.
            limits = httpx.Limits(
                max_connections=concurrency + 10,
                max_keepalive_connections=concurrency + 10,
                keepalive_expiry=2.0,
            )
            client = self._clients[concurrency] = httpx.AsyncClient(timeout=TURN_TIMEOUT_S, limits=limits)

            async def first(index: int) -> str | None:
                text = f"hello from {index}" if self.stateful else "warm up"
                try:
                    _, _, cid = await one_turn(client, self.url, self.key, self._body(text, None))
                except (httpx.HTTPError, RuntimeError) as err:  # untimed, but the run needs it
                    raise RuntimeError(f"{self.name} c={concurrency}, first turn: {err}") from err
                return cid if self.stateful else None

            self._conversations[concurrency] = list(
                await asyncio.gather(*(first(i) for i in range(concurrency)))
            )

        async def conversation(index: int, cid: str | None) -> None:
            for turn in range(TURNS[concurrency]):
                try:
                    total, first, _ = await one_turn(
                        client, self.url, self.key, self._body(f"question {turn} of {index}", cid)
                    )
                except (httpx.HTTPError, RuntimeError) as err:
                    level.errors += 1
                    if level.errors == 1:
                        print(f"  {self.name}: {type(err).__name__}: {err}", file=sys.stderr)
                    continue
                level.turns.append(total)
                level.first_tokens.append(first)

        began, cpu = time.perf_counter(), cpu_seconds(self.pids)
        await asyncio.gather(*(conversation(i, c) for i, c in enumerate(self._conversations[concurrency])))
        level.wall += time.perf_counter() - began
        level.cpu += cpu_seconds(self.pids) - cpu
        level.rss = rss_kib(self.pids)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    def report(self, concurrency: int) -> None:
        level = self.levels[concurrency]
        print(
            f"  {self.name:<26} c={concurrency:<3} turn {1000 * statistics.median(level.turns):7.1f} ms"
            f"  ttft {1000 * statistics.median(level.first_tokens):7.1f} ms"
            f"  {len(level.turns) / level.wall:6.1f} turns/s"
            f"  cpu {1000 * level.cpu / len(level.turns):5.2f} ms/turn"
            f"  rss {level.rss[0] / 1024:6.1f} MiB"
            f"  errors {level.errors}",
            file=sys.stderr,
        )


async def run_interleaved(fronts: list[Front], levels: list[int], rounds: int) -> None:
    """Each level in ``rounds`` rounds; a round runs every front in turn, so that a change
    in the machine's load between rounds falls on all of them alike."""
    try:
        for concurrency in levels:
            for _ in range(rounds):
                for front in fronts:
                    await front.round(concurrency)
            for front in fronts:
                front.report(concurrency)
    finally:
        for front in fronts:
            await front.aclose()


def gilas(*args: str) -> list[str]:
    return [sys.executable, "-m", "gilas_conv", *args]


@contextlib.contextmanager
def gateway(
    database_url: str, upstream: str, work: Path, source: Path | None = None
) -> Iterator[tuple[str, str, list[int]]]:
    """``gilas-conv serve`` on ``database_url``; ``source``: a source tree to run it from
    instead of the installed package (e.g. a worktree of an earlier commit)."""
    env = {"GILAS_API_KEY": UPSTREAM_KEY}
    if source is not None:  # the working directory is ``work``, so PYTHONPATH comes first
        env["PYTHONPATH"] = str(source)
    for args in (("db", "upgrade"), ("keys", "create", "--owner", f"bench-{time.time_ns()}")):
        done = subprocess.run(
            gilas("--db", database_url, *args),
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            cwd=work,
        )
    key = done.stdout.strip()
    port = free_port()
    args = gilas(
        "--db", database_url, "--base-url", upstream, "serve", "--host", "127.0.0.1", "--port", str(port)
    )
    with process(
        args, env=env, ready=f"http://127.0.0.1:{port}/healthz", log=work / f"gateway-{port}.log", cwd=work
    ) as proc:
        yield f"http://127.0.0.1:{port}/v1", key, [proc.pid]


@contextlib.contextmanager
def litellm(executable: str, upstream: str, work: Path) -> Iterator[tuple[str, str, list[int]]]:
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}\n"
        f"      api_key: {UPSTREAM_KEY}\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True"}
    args = [
        executable,
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    with process(
        args, env=env, ready=f"http://127.0.0.1:{port}/health/liveliness", log=work / "litellm.log"
    ) as proc:
        yield f"http://127.0.0.1:{port}/v1", LITELLM_KEY, [proc.pid]


def table(results: dict[str, dict[int, Level]], levels: list[int]) -> str:
    direct = results["direct"]
    anchor = results.get("litellm")
    rows = [
        "| front | concurrent | turn (median) | added | TTFT (median) | added to TTFT | turns/s "
        "| CPU per turn | RSS (peak) | vs LiteLLM's added |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_level in results.items():
        for c in levels:
            level = by_level[c]
            turn = statistics.median(level.turns)
            ttft = statistics.median(level.first_tokens)
            added = turn - statistics.median(direct[c].turns)
            added_ttft = ttft - statistics.median(direct[c].first_tokens)
            versus = ""
            if anchor is not None and name not in ("direct", "litellm"):
                anchor_added = statistics.median(anchor[c].turns) - statistics.median(direct[c].turns)
                versus = f"{added / anchor_added:.2f}x" if anchor_added > 0 else "n/a"
            rss = f"{level.rss[0] / 1024:.0f} MiB ({level.rss[1] / 1024:.0f})" if name != "direct" else "-"
            dash = name == "direct"
            rows.append(
                f"| {name} | {c} | {1000 * turn:.1f} ms | {'-' if dash else f'{1000 * added:+.1f} ms'} "
                f"| {1000 * ttft:.1f} ms | {'-' if dash else f'{1000 * added_ttft:+.1f} ms'} "
                f"| {len(level.turns) / level.wall:.0f} | {1000 * level.cpu / len(level.turns):.2f} ms "
                f"| {rss} | {versus} |" + (f" ({level.errors} errors)" if level.errors else "")
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", help="a Postgres URL to run the gateway on too (its tables are used)")
    parser.add_argument(
        "--litellm", help="the litellm executable (pip install 'litellm[proxy]', in its own venv)"
    )
    parser.add_argument("--levels", default="1,10,100", help="concurrency levels among 1,10,100")
    parser.add_argument("--words", type=int, default=8, help="words per streamed reply")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds per level (fronts interleaved)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run the gateway from this source tree (e.g. a worktree of main), as 'gateway before'",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if any(c not in TURNS for c in levels):
        parser.error(f"levels must be among {sorted(TURNS)}")
    litellm_path = args.litellm or shutil.which("litellm")
    with tempfile.TemporaryDirectory(prefix="gilas-gateway-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        upstream = f"http://127.0.0.1:{port}/v1"
        stub = [
            sys.executable,
            str(HERE / "gateway_stub.py"),
            "--port",
            str(port),
            "--words",
            str(args.words),
        ]
        with contextlib.ExitStack() as running:
            stub_proc = running.enter_context(
                process(stub, ready=upstream + "/models", log=work / "stub.log")
            )
            fronts = [Front("direct", upstream, UPSTREAM_KEY, stateful=False, pids=[stub_proc.pid])]
            backends = [("SQLite", "sqlite:///{}")]
            if args.postgres:
                backends.append(("Postgres", args.postgres))
            builds: list[tuple[str, Path | None]] = [("gateway", None)]
            if args.baseline:
                builds.insert(0, ("gateway before", args.baseline.resolve()))
            for label, source in builds:
                for backend, url in backends:
                    # Each build its own SQLite file: the gateways run side by side.
                    url = url.format(work / f"bench-{len(fronts)}.db")
                    name = f"{label} ({backend})"
                    front, key, pids = running.enter_context(gateway(url, upstream, work, source))
                    fronts.append(Front(name, front, key, stateful=True, pids=pids))
            if litellm_path:
                try:
                    front, key, pids = running.enter_context(litellm(litellm_path, upstream, work))
                    fronts.append(Front("litellm", front, key, stateful=False, pids=pids))
                except RuntimeError as err:
                    print(f"LiteLLM not measured: {err}", file=sys.stderr)
                    print((work / "litellm.log").read_text()[-2000:], file=sys.stderr)
            else:
                print("LiteLLM not measured: pass --litellm PATH", file=sys.stderr)
            asyncio.run(run_interleaved(fronts, levels, args.rounds))
        results = {front.name: front.levels for front in fronts}
        print(table(results, levels))


if __name__ == "__main__":
    main()
