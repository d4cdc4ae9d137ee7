"""Sender and AsyncSender over real HTTP against tests/stub_server.py, on SQLite and Postgres.

Every test runs for Sender and AsyncSender. Tests whose outcome is stored (round trips,
failures leaving the user message, cut streams, concurrency, the key scan) run on both
backends (the ``store`` fixture of conftest.py; Postgres needs
GILAS_CONV_TEST_POSTGRES_URL); tests of HTTP faults alone run on SQLite (``sqlite_store``),
since each Postgres test database costs a slow DROP DATABASE at the end of the session.
The server's faults are scripted per test; sleeps between retries are recorded, not slept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from _sender_fixtures import API_KEY, Driver, assert_valid
from sqlalchemy import text
from stub_server import StubServer

from gilas_conv import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    ConversationStore,
    GilasConvError,
    InternalServerError,
    StreamInterrupted,
)
from gilas_conv.sender import AsyncSender

pytest_plugins = ["_sender_fixtures"]

STUB_SCRIPT = Path(__file__).resolve().parent / "stub_server.py"


@pytest.fixture
def driver(make_driver: Any, store: ConversationStore, stub: StubServer) -> Driver:
    return make_driver(store, base_url=stub.base_url)  # type: ignore[no-any-return]


@pytest.fixture
def http_driver(make_driver: Any, sqlite_store: ConversationStore, stub: StubServer) -> Driver:
    """For HTTP faults, where the backend makes no difference."""
    return make_driver(sqlite_store, base_url=stub.base_url)  # type: ignore[no-any-return]


def history(store: ConversationStore, conv_id: str) -> list[tuple[str, str, Any]]:
    return [(m.role, m.status, m.content) for m in store.get(conv_id).messages()]


# ---------------------------------------------------------------------------------------------


def test_send_stream_and_tools_round_trip(driver: Driver, store: ConversationStore, stub: StubServer) -> None:
    conv = store.create(system="Be brief.")
    reply = driver.send(conv.id, "Who won?", temperature=0)
    assert reply.content == "echo: Who won?" and reply.reply_to == 2 and reply.usage["total_tokens"] > 0
    chunks, streamed = driver.stream(conv.id, "Where was it played?")
    assert "".join(c.delta for c in chunks) == "echo: Where was it played?"
    assert streamed.content == "echo: Where was it played?" and streamed.status == "complete"
    assert streamed.usage is not None and streamed.reply_to == 4 and streamed.finish_reason == "stop"
    stub.script({"tool_calls": [{"name": "lookup", "arguments": '{"q": "final"}', "id": "call_9"}]})
    _, asked = driver.stream(conv.id, "Look it up")
    assert asked.tool_calls == [
        {"id": "call_9", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "final"}'}}
    ]
    store.get(conv.id).append("tool", "Paris, 1998", tool_call_id="call_9")
    answer = driver.retry(conv.id)
    assert answer.reply_to == 6
    sent = stub.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
    ]
    assert [m.role for m in store.get(conv.id).messages()] == [
        "system", "user", "assistant", "user", "assistant", "user", "assistant", "tool", "assistant",
    ]  # fmt: skip
    for request in stub.requests:
        assert_valid("CreateChatCompletionRequest", request["body"])
        assert request["headers"]["authorization"] == f"Bearer {API_KEY}"
        assert request["headers"]["user-agent"].startswith("gilas-conv/")


def test_the_stub_answers_like_the_api(stub: StubServer) -> None:
    """The stub's answers validate against OpenAI's response schemas, so tests on it mean something."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    messages = [{"role": "user", "content": "hi there"}]
    url = f"{stub.base_url}/chat/completions"
    stub.script({}, {"tool_calls": [{"name": "f", "arguments": "{}"}]}, {}, {"tool_calls": [{"name": "f"}]})
    with httpx.Client(headers=headers) as client:
        for n in (2, 1):
            data = client.post(url, json={"model": "m", "messages": messages, "n": n}).json()
            assert_valid("CreateChatCompletionResponse", data, openapi_nullable=True)
        for n in (2, 1):
            body = {
                "model": "m",
                "messages": messages,
                "stream": True,
                "n": n,
                "stream_options": {"include_usage": True},
            }
            lines = client.post(url, json=body).text.split("\n\n")
            events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            for event in events[:-1]:
                assert_valid("CreateChatCompletionStreamResponse", json.loads(event), openapi_nullable=True)
        assert (
            client.post(
                url, json={"messages": messages}, headers={"Authorization": "Bearer nope"}
            ).status_code
            == 401
        )


def test_rate_limit_with_retry_after(
    http_driver: Driver, sqlite_store: ConversationStore, stub: StubServer
) -> None:
    conv = sqlite_store.create()
    stub.script(
        {"status": 429, "headers": {"Retry-After": "1"}}, {"status": 429, "headers": {"retry-after-ms": "20"}}
    )
    reply = http_driver.send(conv.id, "hi")
    assert reply.content == "echo: hi"
    assert http_driver.sleeps == [1.0, 0.02] and len(stub.requests) == 3


def test_server_errors_exhaust_retries_then_retry_answers(
    driver: Driver, store: ConversationStore, stub: StubServer
) -> None:
    conv = store.create()
    stub.script({"status": 500}, {"status": 503}, {"status": 500})
    with pytest.raises(InternalServerError) as caught:
        driver.send(conv.id, "hi", max_retries=2)
    assert caught.value.status_code == 500 and caught.value.request_id.startswith("req-")
    assert history(store, conv.id) == [("user", "complete", "hi")]
    assert len(driver.sleeps) == 2
    reply = driver.retry(conv.id)
    assert reply.reply_to == 1 and len(stub.requests) == 4
    assert history(store, conv.id)[-1] == ("assistant", "complete", "echo: hi")


def test_dropped_connections(http_driver: Driver, sqlite_store: ConversationStore, stub: StubServer) -> None:
    conv = sqlite_store.create()
    stub.script({"drop": True})
    assert http_driver.send(conv.id, "one").content == "echo: one"
    stub.script({"drop": True}, {"drop": True})
    with pytest.raises(APIConnectionError):
        http_driver.send(conv.id, "two", max_retries=1)
    assert history(sqlite_store, conv.id)[-1] == ("user", "complete", "two")


def test_stream_cut_in_the_middle(driver: Driver, store: ConversationStore, stub: StubServer) -> None:
    conv = store.create()
    stub.script({"reply": "one two three four five", "cut_after": 3})
    with pytest.raises(StreamInterrupted) as caught:
        driver.stream(conv.id, "count")
    partial = caught.value.message
    assert partial.content == "one two three " and partial.status == "incomplete" and partial.reply_to == 1
    assert isinstance(caught.value.__cause__, APIConnectionError)
    assert "".join(c.delta for c in driver.last_chunks) == "one two three "
    _, reply = driver.stream(conv.id, again=True)
    assert reply.content == "echo: count" and reply.reply_to == 1
    assert stub.requests[-1]["body"]["messages"] == [{"role": "user", "content": "count"}]  # not replayed
    assert [(m.role, m.status) for m in store.get(conv.id).messages()] == [
        ("user", "complete"),
        ("assistant", "incomplete"),
        ("assistant", "complete"),
    ]


def test_stream_ending_early_but_cleanly(driver: Driver, store: ConversationStore, stub: StubServer) -> None:
    conv = store.create()
    stub.script({"reply": "a b c", "end_after": 2, "line_ending": "\r\n"})
    with pytest.raises(StreamInterrupted, match="without \\[DONE\\]") as caught:
        driver.stream(conv.id, "q")
    assert caught.value.message.content == "a b "
    stub.script({"reply": "all of it", "no_done": True, "line_ending": "\r"})
    _, reply = driver.stream(conv.id, "q2")
    assert reply.content == "all of it" and reply.status == "complete" and reply.usage is not None


def test_html_error_page_from_a_proxy(
    http_driver: Driver, sqlite_store: ConversationStore, stub: StubServer
) -> None:
    conv = sqlite_store.create()
    stub.script({"html": True}, {"html": True})
    with pytest.raises(InternalServerError) as caught:
        http_driver.send(conv.id, "hi", max_retries=1)
    assert caught.value.status_code == 502
    assert "HTML" in str(caught.value) and "502 Bad Gateway" in str(caught.value)
    assert len(stub.requests) == 2


def test_slow_replies_time_out(make_driver: Any, sqlite_store: ConversationStore, stub: StubServer) -> None:
    driver = make_driver(sqlite_store, base_url=stub.base_url, timeout=httpx.Timeout(0.5, connect=5.0))
    conv = sqlite_store.create()
    stub.script({"delay": 2.0})
    with pytest.raises(APITimeoutError) as caught:
        driver.send(conv.id, "slow", max_retries=0)
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
    stub.script({"reply": "first then nothing", "stall_after": 1, "stall": 2.0})
    with pytest.raises(StreamInterrupted) as stalled:
        driver.stream(conv.id, "stall", max_retries=0)
    assert isinstance(stalled.value.__cause__, APITimeoutError)
    assert stalled.value.message.content == "first " and stalled.value.message.status == "incomplete"
    assert driver.send(conv.id, "fast").content == "echo: fast"


def test_one_connection_pool_kept_alive(
    http_driver: Driver, sqlite_store: ConversationStore, stub: StubServer
) -> None:
    conv = sqlite_store.create()
    for word in ("a", "b", "c"):
        http_driver.send(conv.id, word)
    assert len({r["client_port"] for r in stub.requests}) == 1


def test_concurrent_turns_on_50_conversations(store: ConversationStore, stub: StubServer) -> None:
    convs = [store.create(title=f"c{i}") for i in range(50)]

    async def run() -> list[Any]:
        async with AsyncSender(store, api_key=API_KEY, base_url=stub.base_url) as sender:

            async def turn(i: int) -> Any:
                if i % 2:
                    return await sender.send(convs[i].id, f"question {i}")
                async with await sender.stream(convs[i].id, f"question {i}") as stream:
                    async for _ in stream:
                        pass
                return stream.message

            return await asyncio.gather(*(turn(i) for i in range(50)))

    replies = asyncio.run(run())
    for i, (conv, reply) in enumerate(zip(convs, replies, strict=True)):
        messages = store.get(conv.id).messages()
        assert [(m.role, m.content) for m in messages] == [
            ("user", f"question {i}"),
            ("assistant", f"echo: question {i}"),
        ]
        assert messages[1] == reply and reply.reply_to == 1 and reply.status == "complete"
    assert len(stub.requests) == 50


def test_the_api_key_is_never_stored_logged_or_shown(
    make_driver: Any,
    store: ConversationStore,
    stub: StubServer,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    wrong = "sk-wrong-AlsoSecret-55aa"
    conv = store.create()
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        driver = make_driver(store, base_url=stub.base_url)
        bad = make_driver(store, base_url=stub.base_url, api_key=wrong)
        with pytest.raises(AuthenticationError) as refused:
            bad.send(conv.id, "with the wrong key")
        errors.append(refused.value)
        assert "Incorrect API key provided: [REDACTED]" in str(refused.value)
        stub.script({"status": 500, "error": {"message": f"upstream got {API_KEY}"}}, {"drop": True})
        with pytest.raises(GilasConvError) as failed:
            driver.retry(conv.id, max_retries=1)
        errors.append(failed.value)
        stub.script({"cut_after": 1})
        with pytest.raises(StreamInterrupted) as cut:
            driver.stream(conv.id, again=True)
        errors.append(cut.value)
        driver.retry(conv.id)
        for sender in (driver.sender, bad.sender):
            assert API_KEY not in repr(sender) and wrong not in repr(sender)
    secrets = (API_KEY, wrong)
    for err in errors:
        chain: BaseException | None = err
        while isinstance(chain, GilasConvError):
            for shown in (str(chain), repr(chain), repr(getattr(chain, "body", None))):
                assert not any(s in shown for s in secrets), shown
            chain = chain.__cause__
    assert not any(s in r.getMessage() for r in caplog.records for s in secrets)
    with store.engine.connect() as conn:
        rows = [
            repr(tuple(row))
            for table in ("conversations", "messages", "summaries")
            for row in conn.execute(text(f"SELECT * FROM {table}"))
        ]
    assert len(rows) >= 4 and not any(s in row for row in rows for s in secrets)
    if store.dialect == "sqlite":
        store.close()
        files = [p for p in tmp_path.rglob("*.db*") if p.is_file()]
        assert files and not any(s.encode() in p.read_bytes() for p in files for s in secrets)


def test_stub_server_runs_as_a_script(tmp_path: Path) -> None:
    script = tmp_path / "faults.json"
    script.write_text(json.dumps([{"status": 503}]))
    process = subprocess.Popen(
        [sys.executable, str(STUB_SCRIPT), "--port", "0", "--api-key", API_KEY, "--script", str(script)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("stub server listening on http://127.0.0.1:")
        base_url = line.split()[-1]
        root = base_url.removesuffix("/v1")
        with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5) as client:
            client.post(f"{root}/_stub/script", json=[{"reply": "scripted"}])
            url = f"{base_url}/chat/completions"
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            assert client.post(url, json=body).status_code == 503
            assert client.post(url, json=body).json()["choices"][0]["message"]["content"] == "scripted"
            recorded = client.get(f"{root}/_stub/requests").json()
            assert [r["body"]["messages"][0]["content"] for r in recorded] == ["x", "x"]
            client.post(f"{root}/_stub/reset")
            assert client.get(f"{root}/_stub/requests").json() == []
    finally:
        process.terminate()
        process.wait(timeout=5)
        process.stdout.close()
