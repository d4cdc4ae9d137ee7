"""The sender against servers that misbehave, and the bounds it keeps: each test runs for
Sender and AsyncSender.

What a summary request may hold (issue 8.1), answers that are not the event stream asked
for (8.9, 9.1, 9.6), deadlines and streams that never end (9.5), waiting before a retry
(9.7, 8.10), a base URL with credentials (9.3) and the connection pool (9.9). HTTP is
faked with httpx.MockTransport or served by tests/stub_server.py; every test takes well
under a few seconds (small timeouts and deadlines).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _sender_fixtures import (
    API_KEY,
    Driver,
    FakeAPI,
    chunk,
    completion,
    error_response,
    sse,
    stream_response,
)
from stub_server import StubServer

from gilas_conv import (
    APIResponseValidationError,
    APITimeoutError,
    ConfigurationError,
    ConversationStore,
    RateLimitError,
    StreamInterrupted,
)
from gilas_conv._sse import MAX_EVENT_SIZE
from gilas_conv.sender import AsyncSender, RetryDecision, Sender

pytest_plugins = ["_sender_fixtures"]

Store = ConversationStore


@pytest.fixture
def api() -> FakeAPI:
    return FakeAPI()


@pytest.fixture
def driver(make_driver: Any, sqlite_store: Store, api: FakeAPI) -> Driver:
    return make_driver(sqlite_store, transport=api.transport())  # type: ignore[no-any-return]


def stored(store: Store, conv_id: str) -> list[tuple[str, str, Any]]:
    return [(m.role, m.status, m.content) for m in store.get(conv_id).messages()]


def long_history(store: Store) -> Any:
    conv = store.create(system="Be brief.")
    for i in range(6):
        conv.append("user", f"question {i} " + "about the weather " * 30)
        conv.append("assistant", f"answer {i} " + "it is sunny " * 30)
    return conv


def is_summary_request(request: httpx.Request) -> bool:
    return "condense" in json.loads(request.content)["messages"][0]["content"]


# ---------------------------------------------------------------------------------------------
# The summary request (8.1): no database connection, no worker thread, its usage kept


def test_summary_request_holds_no_database_connection_and_keeps_its_usage(
    make_driver: Any, sqlite_store: Store
) -> None:
    checked_out: list[int] = []
    usage = {"prompt_tokens": 321, "completion_tokens": 12, "total_tokens": 333}

    def answer(request: httpx.Request) -> httpx.Response:
        if is_summary_request(request):
            checked_out.append(sqlite_store.engine.pool.checkedout())
            return httpx.Response(200, json=completion("They talked about the weather.", usage=usage))
        return httpx.Response(200, json=completion("reply"))

    api = FakeAPI(default=answer)
    driver = make_driver(sqlite_store, transport=api.transport(), policy="summarize")
    conv = long_history(sqlite_store)
    driver.send(conv.id, "and tomorrow?", context_limit=700, max_tokens=100)
    assert checked_out == [0]
    (summary,) = sqlite_store.get(conv.id).summaries()
    assert summary.content == "They talked about the weather." and summary.usage == usage


def test_async_summary_requests_hold_no_worker_thread(sqlite_store: Store) -> None:
    """Two turns on a loop whose executor has one worker thread, each needing a summary that
    the server answers only once both summary requests have arrived: a turn that kept its
    worker thread waiting on its summary would keep the other from ever asking."""
    convs = [long_history(sqlite_store) for _ in range(2)]

    async def run() -> list[Any]:
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(executor)
        both = asyncio.Event()
        arrived = 0

        async def answer(request: httpx.Request) -> httpx.Response:
            nonlocal arrived
            if is_summary_request(request):
                arrived += 1
                if arrived == 2:
                    both.set()
                await asyncio.wait_for(both.wait(), timeout=3)
                return httpx.Response(200, json=completion("A summary."))
            return httpx.Response(200, json=completion("reply"))

        async with AsyncSender(
            sqlite_store, api_key=API_KEY, transport=httpx.MockTransport(answer), policy="summarize"
        ) as sender:
            return await asyncio.gather(
                *(sender.send(c.id, "and tomorrow?", context_limit=700, max_tokens=100) for c in convs)
            )

    replies = asyncio.run(run())
    assert [r.content for r in replies] == ["reply", "reply"]
    assert all(sqlite_store.get(c.id).summaries() for c in convs)


# ---------------------------------------------------------------------------------------------
# Answers that are not the event stream asked for (8.9), error frames (9.1), the size cap (9.6)


def test_a_json_completion_answering_a_streaming_request_is_the_reply(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    api.script(completion("Paris, whole.", response_id="chatcmpl-json"))
    chunks, reply = driver.stream(conv.id, "Where?")
    assert "".join(c.delta for c in chunks) == "Paris, whole." and chunks[-1].finish_reason == "stop"
    assert reply.content == "Paris, whole." and reply.status == "complete"
    assert reply.response_id == "chatcmpl-json" and reply.usage["total_tokens"] == 15
    assert stored(sqlite_store, conv.id)[-1] == ("assistant", "complete", "Paris, whole.")


def test_a_json_error_answering_a_streaming_request_is_the_apis_error(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    body = {"error": {"message": f"model overloaded (key {API_KEY})", "type": "server_error"}}
    api.script(httpx.Response(200, json=body))
    with pytest.raises(APIResponseValidationError, match="model overloaded") as caught:
        driver.stream(conv.id, "Where?")
    assert API_KEY not in str(caught.value) and "stream ended" not in str(caught.value)
    assert stored(sqlite_store, conv.id) == [("user", "complete", "Where?")]


def test_a_named_error_event_ends_the_stream_with_the_apis_message(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    escaped = API_KEY.replace("s", "\\u0073")  # the key as a JSON escape, decoded by the frame's reader
    body = sse(chunk({"content": "Par"}), done=False) + (
        b'event: error\ndata: {"error": {"message": "quota gone for ' + escaped.encode() + b'"}}\n\n'
    )
    api.script(stream_response(body))
    with pytest.raises(StreamInterrupted, match="quota gone") as caught:
        driver.stream(conv.id, "q")
    assert API_KEY not in str(caught.value) and API_KEY not in str(caught.value.__cause__)
    assert caught.value.message.content == "Par" and caught.value.message.status == "incomplete"
    # A frame that is not JSON is shown as an excerpt, not whole.
    api.script(
        stream_response(
            sse(chunk({"content": "Par"}), done=False) + b"event: error\ndata: " + b"z" * 10_000 + b"\n\n"
        )
    )
    with pytest.raises(StreamInterrupted) as caught:
        driver.stream(conv.id, "again")
    assert "zzz" in str(caught.value.__cause__) and len(str(caught.value.__cause__)) < 1000


def test_an_event_over_the_size_cap_cuts_the_stream_and_keeps_what_arrived(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    huge = b"data: " + b"x" * (MAX_EVENT_SIZE + 10)
    api.script(stream_response(sse(chunk({"content": "Par"}), done=False) + huge, split=1 << 20))
    with pytest.raises(StreamInterrupted, match="max_event_size") as caught:
        driver.stream(conv.id, "q")
    assert isinstance(caught.value.__cause__, APIResponseValidationError)
    assert stored(sqlite_store, conv.id)[-1] == ("assistant", "incomplete", "Par")


# ---------------------------------------------------------------------------------------------
# Streams that never end, and the deadline (9.5)


class EndlessStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that sends ``first``, then ``filler`` every ``every`` s, forever (until closed)."""

    def __init__(self, first: bytes, filler: bytes, every: float = 0.05) -> None:
        self.first, self.filler, self.every = first, filler, every

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        while True:
            time.sleep(self.every)
            yield self.filler

    async def __aiter__(self) -> Any:
        yield self.first
        while True:
            await asyncio.sleep(self.every)
            yield self.filler


FIRST = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Par"}), done=False)
FILLERS = {
    "keepalive": b": keep-alive\n\n",
    "empty": sse(chunk({}), done=False),
    "role only": sse(chunk({"role": "assistant", "content": ""}), done=False),
    "content": sse(chunk({"content": "."}), done=False),
}


@pytest.mark.parametrize("filler", ["keepalive", "empty", "role only"])
def test_a_stream_of_keepalives_ends_after_the_read_timeout(
    make_driver: Any, sqlite_store: Store, filler: str
) -> None:
    api = FakeAPI(
        lambda request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=EndlessStream(FIRST, FILLERS[filler])
        )
    )
    driver = make_driver(sqlite_store, transport=api.transport(), timeout=0.3)
    conv = sqlite_store.create()
    started = time.monotonic()
    with pytest.raises(StreamInterrupted, match="no content") as caught:
        driver.stream(conv.id, "q", max_retries=0)
    assert time.monotonic() - started < 2
    cause = caught.value.__cause__
    assert isinstance(cause, APITimeoutError) and cause.deadline is None and "0.3 s" in str(cause)
    assert stored(sqlite_store, conv.id)[-1] == ("assistant", "incomplete", "Par")


def test_a_stream_that_never_finishes_ends_at_the_deadline(make_driver: Any, sqlite_store: Store) -> None:
    api = FakeAPI(
        lambda request: httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=EndlessStream(FIRST, FILLERS["content"]),
        )
    )
    driver = make_driver(sqlite_store, transport=api.transport(), timeout=0.3, deadline=0.6)
    conv = sqlite_store.create()
    started = time.monotonic()
    with pytest.raises(StreamInterrupted, match="deadline") as caught:
        driver.stream(conv.id, "q")
    assert 0.6 <= time.monotonic() - started < 2
    cause = caught.value.__cause__
    assert isinstance(cause, APITimeoutError) and cause.deadline == 0.6 and "deadline of 0.6 s" in str(cause)
    message = caught.value.message
    assert message.status == "incomplete" and message.content.startswith("Par.")


@pytest.mark.parametrize("kind", ["keepalive", "empty"])
def test_keepalives_over_real_http_end_after_the_read_timeout(
    make_driver: Any, sqlite_store: Store, stub: StubServer, kind: str
) -> None:
    driver = make_driver(sqlite_store, base_url=stub.base_url, timeout=httpx.Timeout(0.5, connect=5.0))
    conv = sqlite_store.create()
    stub.script({"reply": "first then nothing", "endless": kind, "every": 0.1})
    started = time.monotonic()
    with pytest.raises(StreamInterrupted) as caught:
        driver.stream(conv.id, "q", max_retries=0)
    assert time.monotonic() - started < 3
    assert isinstance(caught.value.__cause__, APITimeoutError)
    assert stored(sqlite_store, conv.id)[-1] == ("assistant", "incomplete", "first ")
    assert driver.send(conv.id, "next").content == "echo: next"  # the sender is fine afterwards


def test_the_deadline_over_real_http_for_streams_and_sends(
    make_driver: Any, sqlite_store: Store, stub: StubServer
) -> None:
    driver = make_driver(sqlite_store, base_url=stub.base_url, timeout=httpx.Timeout(5.0), deadline=0.8)
    conv = sqlite_store.create()
    stub.script({"reply": "first then dots", "endless": "content", "every": 0.1})
    started = time.monotonic()
    with pytest.raises(StreamInterrupted, match="deadline") as caught:
        driver.stream(conv.id, "q", max_retries=0)
    assert time.monotonic() - started < 3
    assert caught.value.__cause__.deadline == 0.8
    assert caught.value.message.status == "incomplete"
    assert caught.value.message.content.startswith("first .")
    # A silent server: the read waits no longer than the deadline, not the 5 s read timeout.
    stub.script({"delay": 3.0})
    started = time.monotonic()
    with pytest.raises(APITimeoutError, match=r"deadline of 0\.5 s") as timed_out:
        driver.send(conv.id, "slow", deadline=0.5)
    assert time.monotonic() - started < 2 and timed_out.value.deadline == 0.5


def test_the_deadline_covers_retries_and_their_waits(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    # The server asks for longer than the deadline leaves: give up at once, no wait.
    api.script(error_response(429, "slow down", headers={"retry-after": "30"}))
    with pytest.raises(APITimeoutError, match=r"deadline of 10 s") as caught:
        driver.send(conv.id, "q", deadline=10)
    assert "30 s" in str(caught.value) and isinstance(caught.value.__cause__, RateLimitError)
    assert driver.sleeps == [] and len(api.requests) == 1
    # Within the deadline the same answer is waited for as usual.
    api.script(error_response(429, headers={"retry-after": "30"}), completion("ok"))
    assert driver.retry(conv.id, deadline=100).content == "ok"
    assert driver.sleeps == [30.0]
    # None lifts the deadline for the sender; math.inf for one call.
    with pytest.raises(ValueError, match="deadline"):
        driver.send(conv.id, "q", deadline=0)


def test_deadline_option_defaults_and_checks(sqlite_store: Store) -> None:
    from gilas_conv.sender import DEFAULT_DEADLINE

    for cls in (Sender, AsyncSender):
        assert cls(sqlite_store, api_key="k").deadline == DEFAULT_DEADLINE == 600
        assert cls(sqlite_store, api_key="k", deadline=None).deadline is None
        assert cls(sqlite_store, api_key="k", deadline=2).deadline == 2.0
        for bad in (0, -1, True, "10", float("nan")):
            with pytest.raises(ValueError, match="deadline"):
                cls(sqlite_store, api_key="k", deadline=bad)


# ---------------------------------------------------------------------------------------------
# Telling the caller about a wait before a retry (9.7, 8.10)


def test_on_retry_is_told_each_wait_before_it_starts(make_driver: Any, sqlite_store: Store) -> None:
    told: list[RetryDecision] = []
    per_call: list[RetryDecision] = []
    api = FakeAPI()
    driver = make_driver(sqlite_store, transport=api.transport(), on_retry=told.append)
    conv = sqlite_store.create()

    def sleep_after_telling(seconds: float) -> None:
        assert len(told) + len(per_call) == len(driver.sleeps) + 1  # told first, then the wait
        driver.sleeps.append(seconds)

    if driver.sync:
        driver.sender._sleep = sleep_after_telling
    else:

        async def asleep(seconds: float) -> None:
            sleep_after_telling(seconds)

        driver.sender._sleep = asleep
    api.script(error_response(429, headers={"retry-after": "2"}), error_response(503), completion("ok"))
    assert driver.send(conv.id, "q").content == "ok"
    assert told[0].delay == 2.0 and len(told) == 2
    assert told[0].server_asked == 2.0 and "429" in told[0].reason
    assert [(d.number, d.max_retries) for d in told] == [(1, 2), (2, 2)]
    assert told[1].retry and "503" in told[1].reason and told[1].delay == driver.sleeps[1]
    # Per call, another callback; no call when nothing is retried.
    api.script(httpx.ConnectError("down"), completion("ok"))
    driver.send(conv.id, "again", on_retry=per_call.append)
    assert len(per_call) == 1 and len(told) == 2
    driver.send(conv.id, "fine")
    assert len(told) == 2


# ---------------------------------------------------------------------------------------------
# Credentials in the base URL (9.3)


@pytest.mark.parametrize(
    "base_url", ["http://user:hunter2-secret@api.test/v1", "https://hunter2-secret@api.test/v1"]
)
def test_credentials_in_the_base_url_are_refused_unshown(
    make_driver: Any, sqlite_store: Store, base_url: str
) -> None:
    # They would reach the server as Basic auth in place of the key: refused, masked.
    api = FakeAPI()
    with pytest.raises(ConfigurationError, match="carries a user name or password") as caught:
        make_driver(sqlite_store, transport=api.transport(), base_url=base_url)
    assert "hunter2" not in str(caught.value) and "***@api.test" in str(caught.value)
    assert api.requests == []


def test_credentials_in_gilas_base_url_are_refused_naming_the_variable(
    make_driver: Any, sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GILAS_BASE_URL", "http://user:hunter2-secret@api.test/v1")
    with pytest.raises(ConfigurationError, match=r"\(from \$GILAS_BASE_URL\)") as caught:
        make_driver(sqlite_store, transport=FakeAPI().transport(), base_url=None)
    assert "hunter2" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# The connection pool (9.9)


def test_more_streams_than_connections_wait_for_a_free_one(sqlite_store: Store, stub: StubServer) -> None:
    convs = [sqlite_store.create() for _ in range(5)]
    stub.script(*({"chunk_delay": 0.05} for _ in convs))

    def turn(sender: Any, conv: Any) -> Any:
        with sender.stream(conv.id, "q") as stream:
            for _ in stream:
                pass
        return stream.message

    with Sender(sqlite_store, api_key=API_KEY, base_url=stub.base_url, max_connections=2) as sender:
        results: list[Any] = []
        threads = [threading.Thread(target=lambda c=c: results.append(turn(sender, c))) for c in convs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 5 and all(m.status == "complete" for m in results)
    assert len({r["client_port"] for r in stub.requests}) <= 2

    async def run() -> list[Any]:
        async with AsyncSender(
            sqlite_store, api_key=API_KEY, base_url=stub.base_url, max_connections=2
        ) as asender:

            async def aturn(conv: Any) -> Any:
                async with await asender.stream(conv.id, "again") as stream:
                    async for _ in stream:
                        pass
                return stream.message

            return await asyncio.gather(*(aturn(c) for c in convs))

    stub.reset()
    stub.script(*({"chunk_delay": 0.05} for _ in convs))
    assert all(m.status == "complete" for m in asyncio.run(run()))
    assert len({r["client_port"] for r in stub.requests}) <= 2


def test_a_pool_timeout_says_what_to_raise(make_driver: Any, sqlite_store: Store, stub: StubServer) -> None:
    driver = make_driver(
        sqlite_store, base_url=stub.base_url, max_connections=1, timeout=httpx.Timeout(5.0, pool=0.2)
    )
    conv, other = sqlite_store.create(), sqlite_store.create()
    stub.script({"reply": "a b c", "stall_after": 1, "stall": 1.0})
    if driver.sync:
        holding = driver.sender.stream(conv.id, "hold the only connection")
    else:
        holding = driver.run(driver.sender.stream(conv.id, "hold the only connection"))
    try:
        with pytest.raises(APITimeoutError, match="max_connections") as caught:
            driver.send(other.id, "q", max_retries=0)
        assert "free connection" in str(caught.value) and "all 1 connections" in str(caught.value)
    finally:
        driver.run(holding.aclose()) if not driver.sync else holding.close()


@pytest.mark.parametrize("cls", [Sender, AsyncSender])
def test_max_connections_is_checked(cls: Any, sqlite_store: Store) -> None:
    assert cls(sqlite_store, api_key="k").max_connections == 100
    with pytest.raises(ValueError, match="max_connections"):
        cls(sqlite_store, api_key="k", max_connections=0)
    client = httpx.Client() if cls is Sender else httpx.AsyncClient()
    with pytest.raises(ValueError, match="max_connections"):
        cls(sqlite_store, api_key="k", max_connections=5, http_client=client)
    if cls is Sender:
        client.close()
    else:
        asyncio.run(client.aclose())
