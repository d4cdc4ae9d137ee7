"""Sender and AsyncSender against httpx.MockTransport: each test runs for both senders.

The store is a real SQLite file; the API is a FakeAPI that records every request. The
integration tests (test_sender_integration.py) repeat the important paths over real HTTP,
on SQLite and Postgres.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import threading
from typing import Any

import httpx
import pytest
from _sender_fixtures import (
    API_KEY,
    Driver,
    FakeAPI,
    assert_valid,
    chunk,
    completion,
    error_response,
    sse,
    stream_response,
    text_stream,
)

from gilas_conv import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    ContextWindowExceeded,
    ConversationNotFound,
    ConversationStore,
    GilasConvError,
    InternalServerError,
    MissingAPIKeyError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StreamInterrupted,
    UnprocessableEntityError,
    _api,
)
from gilas_conv._retry import INITIAL_RETRY_DELAY, JITTER, MAX_RETRY_AFTER
from gilas_conv.sender import AsyncSender, Sender, StreamChunk, pending_reply_to
from gilas_conv.truncation import build_context

pytest_plugins = ["_sender_fixtures"]

Store = ConversationStore


def roles(store: Store, conv_id: str) -> list[tuple[str, str]]:
    return [(m.role, m.status) for m in store.get(conv_id).messages()]


# ---------------------------------------------------------------------------------------------
# Construction and configuration


@pytest.mark.parametrize("cls", [Sender, AsyncSender])
def test_missing_api_key_fails_in_the_constructor(cls: Any, sqlite_store: Store) -> None:
    api = FakeAPI()
    with pytest.raises(MissingAPIKeyError, match="GILAS_API_KEY"):
        cls(sqlite_store, transport=api.transport())
    with pytest.raises(MissingAPIKeyError):
        cls(sqlite_store, api_key="   ", transport=api.transport())
    assert api.requests == []


def test_api_key_argument_then_environment(
    make_driver: Any, sqlite_store: Store, api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GILAS_API_KEY", "sk-from-env")
    conv = sqlite_store.create()
    make_driver(sqlite_store, api_key=None, transport=api.transport()).send(conv.id, "a")
    make_driver(sqlite_store, api_key="sk-argument", transport=api.transport()).send(conv.id, "b")
    assert [r.headers["authorization"] for r in api.requests] == ["Bearer sk-from-env", "Bearer sk-argument"]


@pytest.mark.parametrize("cls", [Sender, AsyncSender])
def test_base_url_argument_then_environment_then_default(
    cls: Any, sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cls(sqlite_store, api_key="k").base_url == "https://api.gilas.io/v1"
    monkeypatch.setenv("GILAS_BASE_URL", "http://env.example/v1/")
    assert cls(sqlite_store, api_key="k").base_url == "http://env.example/v1"
    assert cls(sqlite_store, api_key="k", base_url="http://arg.example/x").base_url == "http://arg.example/x"
    with pytest.raises(ConfigurationError, match="GILAS_BASE_URL"):
        cls(sqlite_store, api_key="k", base_url="api.gilas.io/v1")


@pytest.mark.parametrize("cls", [Sender, AsyncSender])
def test_bad_options_are_refused(cls: Any, sqlite_store: Store) -> None:
    for bad in ({"timeout": 0}, {"timeout": "60"}, {"max_retries": -1}, {"max_retries": 1.5}):
        with pytest.raises(ValueError):
            cls(sqlite_store, api_key="k", **bad)
    with pytest.raises(ValueError, match="not both"):
        cls(sqlite_store, api_key="k", transport=httpx.MockTransport(FakeAPI()), http_client=object())


def test_request_url_and_headers(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    from gilas_conv import __version__

    conv = sqlite_store.create()
    driver.send(conv.id, "hi")
    request = api.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "http://api.test/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"gilas-conv/{__version__}"


def test_timeouts_float_or_httpx_timeout_and_per_call(
    make_driver: Any, sqlite_store: Store, api: FakeAPI
) -> None:
    conv = sqlite_store.create()
    make_driver(sqlite_store, transport=api.transport(), timeout=7.5).send(conv.id, "a")
    custom = httpx.Timeout(30.0, connect=2.0)
    driver = make_driver(sqlite_store, transport=api.transport(), timeout=custom)
    driver.send(conv.id, "b")
    driver.send(conv.id, "c", timeout=1.25)
    seen = [r.extensions["timeout"] for r in api.requests]
    assert seen[0] == {"connect": 7.5, "read": 7.5, "write": 7.5, "pool": 7.5}
    assert seen[1] == {"connect": 2.0, "read": 30.0, "write": 30.0, "pool": 30.0}
    assert seen[2]["read"] == 1.25


@pytest.mark.parametrize("owned", [True, False])
def test_sender_closes_only_its_own_client(sync: bool, sqlite_store: Store, owned: bool) -> None:
    transport = httpx.MockTransport(FakeAPI())
    if sync:
        client = None if owned else httpx.Client(transport=transport)
        with Sender(
            sqlite_store, api_key="k", http_client=client, transport=transport if owned else None
        ) as s:
            inner = s._client
        assert inner.is_closed is owned
        return

    async def run() -> bool:
        client = None if owned else httpx.AsyncClient(transport=transport)
        async with AsyncSender(
            sqlite_store, api_key="k", http_client=client, transport=transport if owned else None
        ) as s:
            inner = s._client
        return bool(inner.is_closed)

    assert asyncio.run(run()) is owned


# ---------------------------------------------------------------------------------------------
# send


def test_send_stores_the_user_message_before_the_request_and_the_reply_after(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create(system="Be brief.")
    seen_at_request: list[list[tuple[str, str]]] = []

    predicted: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen_at_request.append(roles(sqlite_store, conv.id))
        predicted.append(build_context(sqlite_store.get(conv.id)).prompt_tokens)
        body = completion(
            "In Paris.",
            response_id="chatcmpl-1",
            usage={"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24},
        )
        return httpx.Response(200, json=body)

    api.script(answer)
    reply = driver.send(conv.id, "Where was it played?")
    assert seen_at_request == [[("system", "complete"), ("user", "complete")]]
    assert api.bodies[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where was it played?"},
    ]
    assert reply.role == "assistant" and reply.content == "In Paris."
    assert reply.seq == 3 and reply.reply_to == 2
    assert reply.response_id == "chatcmpl-1"
    assert reply.model == "gpt-4o-mini-2024-07-18"
    assert reply.finish_reason == "stop"
    assert reply.usage == {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24}
    assert reply.status == "complete"
    # What we counted before sending, kept beside the API's figure.
    assert reply.predicted_prompt_tokens == predicted[0] > 0
    assert sqlite_store.get(conv.id).messages()[-1] == reply


def test_send_accepts_a_conversation_handle(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create(owner="alice")
    reply = driver.send(conv, "hi")
    assert reply.conversation_id == conv.id
    assert len(sqlite_store.get(conv.id, owner="alice").messages()) == 2


def test_params_pass_through_and_model_override(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create(model="gpt-4o")
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    params: dict[str, Any] = {
        "temperature": 0.2,
        "top_p": 0.9,
        "max_completion_tokens": 50,
        "stop": ["\n\n"],
        "seed": 7,
        "tools": tools,
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "user": "u-1",
        "frequency_penalty": None,
    }
    driver.send(conv.id, "one", context_limit=5000, **params)
    driver.send(conv.id, "two", model="gpt-4.1-mini", max_tokens=20)
    first, second = api.bodies
    assert first["model"] == "gpt-4o"
    for key, value in params.items():
        if value is None:
            assert key not in first  # None means "not given"
        else:
            assert first[key] == value
    assert "context_limit" not in first and "stream" not in first and "stream_options" not in first
    assert second["model"] == "gpt-4.1-mini" and second["max_tokens"] == 20


def test_the_window_follows_the_calls_model_budget_and_tools(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    for i in range(12):
        conv.append("user", f"question {i} " + "about the sea " * 20)
        conv.append("assistant", f"answer {i} " + "it is blue " * 20)
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "description": "a tool " * 40, "parameters": {"type": "object"}},
        }
    ]
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        # (the call's options, what the window must be planned with)
        ({"max_tokens": 5}, {"max_tokens": 5}),
        ({"max_tokens": 5, "max_completion_tokens": 400}, {"max_tokens": 400}),
        ({"max_tokens": 5, "tools": tools}, {"max_tokens": 5, "tools": tools}),
        ({"model": "gpt-4o", "max_tokens": 5}, {"model": "gpt-4o", "max_tokens": 5}),
    ]
    for number, (options, planned) in enumerate(cases):
        conv.append("user", "and now?")
        expected = build_context(conv, context_limit=1200, **planned)
        if number in (1, 2):  # the reply's reserve and the tools' definitions take room
            assert expected.dropped > build_context(conv, context_limit=1200, max_tokens=5).dropped
        driver.retry(conv.id, context_limit=1200, **options)
        body = api.bodies[-1]
        assert body["messages"] == expected.messages
        assert body["model"] == planned.get("model", conv.model)
    with pytest.raises(ValueError, match="policy"):
        driver.send(conv.id, "c", policy="forget")
    assert len(api.requests) == len(cases)


def test_summarize_policy_asks_the_api_for_a_summary(make_driver: Any, sqlite_store: Store) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "condense" in body["messages"][0]["content"]:
            return httpx.Response(200, json=completion("They talked about the weather."))
        return httpx.Response(200, json=completion(f"reply {len(body['messages'])}"))

    api = FakeAPI(default=answer)
    driver = make_driver(sqlite_store, transport=api.transport(), policy="summarize")
    conv = sqlite_store.create(system="Be brief.")
    for i in range(6):
        conv.append("user", f"question {i} " + "about the weather " * 30)
        conv.append("assistant", f"answer {i} " + "it is sunny " * 30)
    reply = driver.send(conv.id, "and tomorrow?", context_limit=700, max_tokens=100)
    summary_body, turn_body = api.bodies
    assert summary_body["max_tokens"] > 0 and "question 0" in summary_body["messages"][1]["content"]
    assert_valid("CreateChatCompletionRequest", summary_body)
    sent = turn_body["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert sent[1]["role"] == "system" and "They talked about the weather." in sent[1]["content"]
    assert sent[-1] == {"role": "user", "content": "and tomorrow?"}
    assert reply.content == f"reply {len(sent)}"
    assert [s.content for s in sqlite_store.get(conv.id).summaries()] == ["They talked about the weather."]
    # A long next turn drops more history: the stored summary is extended, not redone.
    driver.send(conv.id, "thanks " + "and the day after " * 60, context_limit=700, max_tokens=100)
    extension = api.bodies[2]["messages"][1]["content"]
    assert "Previous summary:\nThey talked about the weather." in extension
    assert "question 0" not in extension
    assert len(api.bodies) == 4
    # Per call, truncate overrides the sender's policy.
    driver.send(conv.id, "bye", context_limit=700, max_tokens=100, policy="truncate")
    assert not any("earlier part" in str(m["content"]) for m in api.bodies[-1]["messages"])


@pytest.mark.parametrize(
    "bad",
    [
        {"messages": []},
        {"stream": True},
        {"temperature": float("nan")},
        {"metadata": object()},
        {"model": ""},
        {"max_tokens": 0},
        {"context_limit": -5},
    ],
)
def test_bad_arguments_store_and_send_nothing(
    driver: Driver, api: FakeAPI, sqlite_store: Store, bad: Any
) -> None:
    conv = sqlite_store.create()
    with pytest.raises(ValueError):
        driver.send(conv.id, "hello", **bad)
    with pytest.raises(ValueError):
        driver.send(conv.id, 42)  # not a valid content
    assert sqlite_store.get(conv.id).messages() == [] and api.requests == []


def test_failure_leaves_the_user_message_and_retry_answers_it(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    api.script(error_response(400, "nope"))
    with pytest.raises(BadRequestError):
        driver.send(conv.id, "question")
    assert roles(sqlite_store, conv.id) == [("user", "complete")]
    reply = driver.retry(conv.id)
    assert reply.reply_to == 1 and reply.seq == 2
    assert api.bodies[1]["messages"] == [{"role": "user", "content": "question"}]
    with pytest.raises(ValueError, match="already a complete assistant reply"):
        driver.retry(conv.id)
    assert len(api.requests) == 2


def test_next_send_replays_the_unanswered_message(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    api.script(httpx.ConnectError("refused"))
    with pytest.raises(APIConnectionError):
        driver.send(conv.id, "first", max_retries=0)
    reply = driver.send(conv.id, "second")
    assert len(api.requests) == 2  # no extra request for the unanswered one
    assert [m["content"] for m in api.bodies[1]["messages"]] == ["first", "second"]
    assert reply.reply_to == 2
    assert roles(sqlite_store, conv.id) == [("user", "complete")] * 2 + [("assistant", "complete")]


def test_a_reply_reusing_an_earlier_response_id_is_stored(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    """Servers reuse response ids: a new reply carrying an earlier reply's id is still the
    answer to the new message, stored and returned (not the earlier reply)."""
    conv = sqlite_store.create()
    api.script(
        completion("4", response_id="chatcmpl-same"), completion("Tehran", response_id="chatcmpl-same")
    )
    first = driver.send(conv.id, "What is 2+2?")
    second = driver.send(conv.id, "What is the capital of Iran?")
    assert (first.content, first.seq, first.reply_to) == ("4", 2, 1)
    assert (second.content, second.seq, second.reply_to) == ("Tehran", 4, 3)
    assert [m.content for m in sqlite_store.get(conv.id).messages()] == [
        "What is 2+2?",
        "4",
        "What is the capital of Iran?",
        "Tehran",
    ]


def test_retry_needs_something_to_answer(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    empty = sqlite_store.create()
    with pytest.raises(ValueError, match="empty"):
        driver.retry(empty.id)
    only_system = sqlite_store.create(system="hi")
    with pytest.raises(ValueError, match="system message"):
        driver.retry(only_system.id)
    assert api.requests == []


def test_tool_calls_round_trip(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
    ]
    api.script(completion(None, tool_calls=calls, finish_reason="tool_calls"), completion("Sunny, noon."))
    asked = driver.send(conv.id, "Weather and time in Paris?")
    assert asked.content is None and asked.tool_calls == calls and asked.finish_reason == "tool_calls"
    with pytest.raises(ValueError, match="tool calls"):
        driver.retry(conv.id)
    stale = sqlite_store.get(conv.id)  # a handle made before the results are appended
    conv = sqlite_store.get(conv.id)
    conv.append("tool", "sunny", tool_call_id="call_a")
    with pytest.raises(ValueError, match="call_b"):
        driver.retry(conv.id)
    conv.append("tool", "12:00", tool_call_id="call_b")
    answer = driver.retry(stale)
    assert answer.content == "Sunny, noon." and answer.reply_to == 1
    sent = api.bodies[1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert sent[1]["tool_calls"] == calls
    assert [m["tool_call_id"] for m in sent[2:]] == ["call_a", "call_b"]


def test_pending_reply_to_rules(sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    user = conv.append("user", "q")
    partial = conv.append("assistant", "half", status="incomplete", reply_to=user.seq)
    assert pending_reply_to([user, partial]) == user.seq
    with pytest.raises(LookupError):
        pending_reply_to([partial], whole=False)
    tool = conv.append("tool", "r", tool_call_id="c1")
    with pytest.raises(ValueError, match="answer no tool call"):
        pending_reply_to([user, partial, tool])


def test_context_window_exceeded_sends_nothing(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create(system="You are helpful. " * 20)
    with pytest.raises(ContextWindowExceeded):
        driver.send(conv.id, "a long question " * 50, context_limit=200)
    assert api.requests == []
    # The message stays, unanswered; a larger window answers it.
    assert roles(sqlite_store, conv.id)[-1] == ("user", "complete")
    assert driver.retry(conv.id, context_limit=100_000).reply_to == 2


def test_n_greater_than_one_keeps_the_other_choices(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": f"answer {i}"},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in (1, 0, 2)
    ]
    api.script(completion(choices=choices))
    reply = driver.send(conv.id, "three ways", n=3)
    assert api.bodies[0]["n"] == 3
    assert reply.content == "answer 0"
    assert [c["index"] for c in reply.extra["choices"]] == [1, 2]
    assert reply.extra["choices"][1]["message"]["content"] == "answer 2"
    driver.send(conv.id, "next")
    assert [m["content"] for m in api.bodies[1]["messages"]] == ["three ways", "answer 0", "next"]


def test_refusal_is_stored_as_a_content_part(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    api.script(completion(None, refusal="I can't help with that."))
    reply = driver.send(conv.id, "bad idea")
    assert reply.content == [{"type": "refusal", "refusal": "I can't help with that."}]
    driver.send(conv.id, "ok then")
    assert api.bodies[1]["messages"][1]["content"] == reply.content


# ---------------------------------------------------------------------------------------------
# Owners


def _turn(driver: Driver, how: str, conversation: Any, **options: Any) -> Any:
    """One turn through ``how`` (send, retry, stream, stream_retry); the stored reply."""
    if how == "send":
        return driver.send(conversation, "hi", **options)
    if how == "retry":
        return driver.retry(conversation, **options)
    return driver.stream(conversation, "hi", again=how == "stream_retry", **options)[1]


@pytest.mark.parametrize("how", ["send", "retry", "stream", "stream_retry"])
def test_an_owned_conversation_is_found_only_for_its_owner(
    driver: Driver, api: FakeAPI, sqlite_store: Store, how: str
) -> None:
    conv = sqlite_store.create(owner="alice")
    if how.endswith("retry"):
        conv.append("user", "pending question")  # what retry answers
    before = conv.messages()
    for owner in (None, "bob"):
        with pytest.raises(ConversationNotFound):
            _turn(driver, how, conv.id, owner=owner)
    assert conv.messages() == before and api.requests == []

    for _ in range(2):
        api.script(stream_response(text_stream("ok")) if how.startswith("stream") else completion("ok"))
    reply = _turn(driver, how, conv.id, owner="alice")
    assert reply.conversation_id == conv.id and reply.content == "ok" and reply.status == "complete"
    if how.endswith("retry"):
        conv.append("user", "another")
    # A handle carries its own owner: it is used as it is.
    assert _turn(driver, how, sqlite_store.get(conv.id, owner="alice")).content == "ok"
    assert len(api.requests) == 2


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (503, InternalServerError),
        (418, APIStatusError),
    ],
)
def test_error_statuses_raise_typed_errors(
    driver: Driver, api: FakeAPI, sqlite_store: Store, status: int, cls: type[APIStatusError]
) -> None:
    conv = sqlite_store.create()
    api.script(error_response(status, "the API says no", error_type="some_type", code="some_code"))
    with pytest.raises(cls) as caught:
        driver.send(conv.id, "hi", max_retries=0)
    err = caught.value
    assert type(err) is cls
    assert err.status_code == status and err.request_id == f"req_{status}"
    assert err.message == "the API says no" and err.error_type == "some_type" and err.code == "some_code"
    assert str(err) == f"HTTP {status}: the API says no, request id req_{status}"


def test_context_length_error_is_recognised(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    api.script(
        error_response(
            400, "This model's maximum context length is 8192 tokens.", code="context_length_exceeded"
        ),
        error_response(400, "Invalid value for 'temperature'"),
    )
    with pytest.raises(BadRequestError) as first:
        driver.send(conv.id, "hi")
    with pytest.raises(BadRequestError) as second:
        driver.retry(conv.id)
    assert first.value.is_context_length_error and not second.value.is_context_length_error


def test_html_error_page_names_html(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    page = "<html><head><title>502 Bad Gateway</title></head><body><h1>502</h1></body></html>"
    api.script(httpx.Response(502, text=page, headers={"content-type": "text/html"}))
    with pytest.raises(InternalServerError) as caught:
        driver.send(conv.id, "hi", max_retries=0)
    assert "HTML" in caught.value.message and "not JSON" in caught.value.message
    assert "502 Bad Gateway" in caught.value.message


@pytest.mark.parametrize(
    "answer",
    [
        lambda: httpx.Response(200, text="<!DOCTYPE html><html><title>Login</title></html>"),
        lambda: httpx.Response(200, text="upstream said hello", headers={"content-type": "text/plain"}),
        lambda: httpx.Response(200, json={"object": "list", "data": []}),
        lambda: httpx.Response(200, json={"choices": [{"index": 0, "finish_reason": "stop"}]}),
        lambda: httpx.Response(200, text='{"id": "x", "choices": NaN}'),
        lambda: httpx.Response(
            200, json=completion(tool_calls=[{"type": "function", "function": {"name": "f"}}])
        ),
    ],
    ids=["html", "text", "not-a-completion", "no-message", "nan", "bad-tool-call"],
)
def test_a_2xx_that_is_not_a_completion(
    driver: Driver, api: FakeAPI, sqlite_store: Store, answer: Any
) -> None:
    conv = sqlite_store.create()
    api.script(answer())
    with pytest.raises(APIResponseValidationError) as caught:
        driver.send(conv.id, "hi")
    assert caught.value.status_code == 200
    assert len(api.requests) == 1  # not retried
    assert roles(sqlite_store, conv.id) == [("user", "complete")]


def test_connection_and_timeout_errors_are_translated(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    api.script(httpx.ConnectError("connection refused"))
    with pytest.raises(APIConnectionError) as refused:
        driver.send(conv.id, "a", max_retries=0)
    assert type(refused.value) is APIConnectionError
    assert isinstance(refused.value.__cause__, httpx.ConnectError)
    assert "connection refused" in str(refused.value)
    api.script(httpx.ReadTimeout("slow"))
    with pytest.raises(APITimeoutError) as slow:
        driver.retry(conv.id, max_retries=0)
    assert isinstance(slow.value.__cause__, httpx.ReadTimeout)


# ---------------------------------------------------------------------------------------------
# Retries


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried(
    driver: Driver, api: FakeAPI, sqlite_store: Store, status: int
) -> None:
    conv = sqlite_store.create()
    api.script(error_response(status), error_response(status))
    reply = driver.send(conv.id, "hi")
    assert reply.content == "Hello!"
    assert len(api.requests) == 3 and len(driver.sleeps) == 2
    assert api.requests[0].content == api.requests[2].content


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_never_retried(
    driver: Driver, api: FakeAPI, sqlite_store: Store, status: int
) -> None:
    conv = sqlite_store.create()
    api.script(error_response(status, headers={"retry-after": "1"}))
    with pytest.raises(APIStatusError):
        driver.send(conv.id, "hi", max_retries=5)
    assert len(api.requests) == 1 and driver.sleeps == []


def test_connection_errors_are_retried_then_raised(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    api.script(*(httpx.ConnectError("down") for _ in range(4)))
    with pytest.raises(APIConnectionError):
        driver.send(conv.id, "hi", max_retries=3)
    assert len(api.requests) == 4
    # Exponential backoff with jitter: each wait between 75 % and 100 % of 0.5 s, 1 s, 2 s.
    assert len(driver.sleeps) == 3
    for retry, slept in enumerate(driver.sleeps):
        full = INITIAL_RETRY_DELAY * 2**retry
        assert full * (1 - JITTER) <= slept <= full
    assert roles(sqlite_store, conv.id) == [("user", "complete")]


def test_retry_after_headers_are_honoured(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    api.script(
        error_response(429, headers={"retry-after": "3"}),
        error_response(429, headers={"retry-after-ms": "250"}),
        error_response(503, headers={"retry-after": "86400"}),
    )
    # No deadline: a day asked for is more than any deadline left (see the deadline tests).
    driver.send(conv.id, "hi", max_retries=3, deadline=math.inf)
    assert driver.sleeps[:2] == [3.0, 0.25]
    # More than MAX_RETRY_AFTER asked: the third retry's usual backoff, not a day (nor a minute).
    full = INITIAL_RETRY_DELAY * 2**2
    assert full * (1 - JITTER) <= driver.sleeps[2] <= full < MAX_RETRY_AFTER


def test_max_retries_default_and_per_call(make_driver: Any, sqlite_store: Store) -> None:
    api = FakeAPI(default=error_response(500))
    driver = make_driver(sqlite_store, transport=api.transport(), max_retries=1)
    conv = sqlite_store.create()
    with pytest.raises(InternalServerError):
        driver.send(conv.id, "a")
    assert len(api.requests) == 2
    with pytest.raises(InternalServerError):
        driver.retry(conv.id, max_retries=0)
    assert len(api.requests) == 3
    with pytest.raises(ValueError):
        driver.retry(conv.id, max_retries=-1)


def test_one_debug_line_per_retry_decision(
    driver: Driver, api: FakeAPI, sqlite_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    conv = sqlite_store.create()
    api.script(error_response(500), httpx.ConnectError("x"), error_response(400))
    with caplog.at_level(logging.DEBUG, logger="gilas_conv.sender"), pytest.raises(BadRequestError):
        driver.send(conv.id, "hi", max_retries=5)
    decisions = [
        r.getMessage() for r in caplog.records if r.name == "gilas_conv.sender" and "POST" in r.getMessage()
    ]
    # One line per decision, naming what failed (the wording is free).
    assert len(decisions) == 3
    for line, failure in zip(decisions, ["HTTP 500", "APIConnectionError", "HTTP 400"], strict=True):
        assert failure in line and "\n" not in line


# ---------------------------------------------------------------------------------------------
# Streaming


def test_stream_yields_deltas_and_stores_the_reply_at_the_end(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    seen_during: list[list[tuple[str, str]]] = []
    api.script(stream_response(text_stream("The final was in Paris.", response_id="chatcmpl-s1"), split=7))

    def look(chunks: list[StreamChunk]) -> None:
        if len(chunks) == 3:  # mid-stream: only the user message is stored
            seen_during.append(roles(sqlite_store, conv.id))

    if driver.sync:
        stream = driver.sender.stream(conv.id, "Where?")
        chunks: list[StreamChunk] = []
        for item in stream:
            chunks.append(item)
            look(chunks)
        reply = stream.message
    else:

        async def consume() -> tuple[list[StreamChunk], Any]:
            stream = await driver.sender.stream(conv.id, "Where?")
            chunks: list[StreamChunk] = []
            async for item in stream:
                chunks.append(item)
                look(chunks)
            return chunks, stream.message

        chunks, reply = driver.run(consume())
    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert "".join(c.delta for c in chunks) == "The final was in Paris."
    assert seen_during == [[("user", "complete")]]
    assert chunks[-1].usage == {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert reply.content == "The final was in Paris." and reply.status == "complete"
    assert reply.response_id == "chatcmpl-s1" and reply.finish_reason == "stop"
    assert reply.usage["total_tokens"] == 25 and reply.reply_to == 1
    body = api.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert api.requests[0].headers["accept"] == "text/event-stream"
    assert roles(sqlite_store, conv.id) == [("user", "complete"), ("assistant", "complete")]


def test_stream_tool_call_deltas_are_assembled_by_index(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    events = [
        chunk({"role": "assistant", "content": None}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "wea", "arguments": ""},
                    }
                ]
            }
        ),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "time", "arguments": "{}"},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "ther", "arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
        chunk({}, finish_reason="tool_calls"),
    ]
    api.script(stream_response(sse(*events), split=13))
    chunks, reply = driver.stream(conv.id, "weather and time?")
    assert reply.content is None and reply.finish_reason == "tool_calls"
    assert reply.tool_calls == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
        },
        {"id": "call_1", "type": "function", "function": {"name": "time", "arguments": "{}"}},
    ]
    assert sum(len(c.tool_calls or []) for c in chunks) == 4


def test_stream_cut_by_the_network_stores_what_arrived(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    body = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Half "}),
        chunk({"content": "an"}),
        done=False,
    )
    api.script(stream_response(body + b'data: {"choi', error=httpx.ReadError("connection reset")))
    with pytest.raises(StreamInterrupted) as caught:
        driver.stream(conv.id, "tell me")
    assert "".join(c.delta for c in driver.last_chunks) == "Half an"
    stored = caught.value.message
    assert stored.content == "Half an" and stored.status == "incomplete" and stored.reply_to == 1
    assert driver.last_stream.message == stored
    assert isinstance(caught.value.__cause__, APIConnectionError)
    assert isinstance(caught.value.__cause__.__cause__, httpx.ReadError)
    assert roles(sqlite_store, conv.id) == [("user", "complete"), ("assistant", "incomplete")]
    # Not replayed; retry answers the same user message.
    reply = driver.retry(conv.id)
    assert reply.reply_to == 1
    assert api.bodies[1]["messages"] == [{"role": "user", "content": "tell me"}]
    assert len(sqlite_store.get(conv.id).messages()) == 3


def test_stream_that_ends_cleanly_without_done_or_finish_is_cut_off(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    api.script(stream_response(sse(chunk({"content": "So far"}), done=False)))
    with pytest.raises(StreamInterrupted, match="without \\[DONE\\]") as caught:
        driver.stream(conv.id, "q")
    assert caught.value.message.status == "incomplete" and caught.value.message.content == "So far"


def test_finish_reason_without_done_is_complete(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    body = sse(chunk({"content": "Done."}), chunk({}, finish_reason="stop"), done=False)
    api.script(stream_response(body, error=httpx.ReadError("closed before usage")))
    _, reply = driver.stream(conv.id, "q")
    assert reply.status == "complete" and reply.content == "Done." and reply.usage is None


def test_stream_with_nothing_received_stores_nothing(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    api.script(
        stream_response(
            b": keep-alive\n\n" + sse(chunk({"role": "assistant", "content": ""}), done=False),
            error=httpx.RemoteProtocolError("peer closed"),
        ),
        stream_response(b""),
    )
    with pytest.raises(APIConnectionError) as caught:
        driver.stream(conv.id, "q")
    assert not isinstance(caught.value, StreamInterrupted)
    with pytest.raises(APIConnectionError, match="before the reply was finished"):
        driver.stream(conv.id, again=True)
    assert roles(sqlite_store, conv.id) == [("user", "complete")]
    api.script(stream_response(text_stream("Now it works")))
    _, reply = driver.stream(conv.id, again=True)
    assert reply.content == "Now it works" and reply.reply_to == 1


def test_stream_closed_early_by_the_caller_stores_quietly(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    # One byte per read: what has arrived when the caller stops is what it has seen.
    api.script(stream_response(text_stream("one two three four five six"), split=1))
    chunks, reply = driver.stream(conv.id, "count", take=3)
    assert "".join(c.delta for c in chunks) == "one two "
    assert reply.status == "incomplete" and reply.content == "one two "
    assert driver.last_stream.closed
    api.script(stream_response(text_stream("unused"), split=1))
    chunks, reply = driver.stream(conv.id, "again", take=1)  # only the role chunk: nothing of a reply
    assert reply is None
    assert roles(sqlite_store, conv.id) == [
        ("user", "complete"),
        ("assistant", "incomplete"),
        ("user", "complete"),
    ]


def test_breaking_out_of_the_loop_inside_with_stores_the_partial_reply(
    sync: bool, sqlite_store: Store, api: FakeAPI
) -> None:
    conv = sqlite_store.create()
    api.script(stream_response(text_stream("alpha beta gamma delta"), split=1))
    if sync:
        with (
            Sender(sqlite_store, api_key="k", transport=api.transport()) as sender,
            sender.stream(conv.id, "go") as stream,
        ):
            for item in stream:
                if item.delta == "beta ":
                    break
    else:

        async def run() -> None:
            async with (
                AsyncSender(sqlite_store, api_key="k", transport=api.transport()) as sender,
                await sender.stream(conv.id, "go") as stream,
            ):
                async for item in stream:
                    if item.delta == "beta ":
                        break

        asyncio.run(run())
    last = sqlite_store.get(conv.id).messages()[-1]
    assert (last.role, last.status, last.content) == ("assistant", "incomplete", "alpha beta ")


def test_a_stream_left_unclosed_warns_and_writes_nothing_when_collected(
    sync: bool, sqlite_store: Store, api: FakeAPI
) -> None:
    conv = sqlite_store.create()
    api.script(stream_response(text_stream("alpha beta gamma delta"), split=1))
    with pytest.warns(ResourceWarning, match="unclosed stream .*reply was not stored"):
        if sync:
            with Sender(sqlite_store, api_key="k", transport=api.transport()) as sender:
                for item in sender.stream(conv.id, "go"):
                    if item.delta == "beta ":
                        break
                gc.collect()
        else:

            async def run() -> None:
                async with AsyncSender(sqlite_store, api_key="k", transport=api.transport()) as sender:
                    async for item in await sender.stream(conv.id, "go"):
                        if item.delta == "beta ":
                            break
                    gc.collect()

            asyncio.run(run())
    assert roles(sqlite_store, conv.id) == [("user", "complete")]


def test_stream_error_event_mid_stream(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    body = sse(
        chunk({"content": "Par"}), {"error": {"message": "overloaded", "type": "server_error"}}, done=False
    )
    api.script(stream_response(body))
    with pytest.raises(StreamInterrupted, match="overloaded") as caught:
        driver.stream(conv.id, "q")
    assert caught.value.message.content == "Par"
    assert type(caught.value.__cause__) is APIError


def test_stream_with_crlf_comments_and_an_event_field(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    body = (
        b": ping\r\n\r\n"
        + sse(
            chunk({"content": "a"}),
            chunk({"content": "b"}),
            chunk({}, finish_reason="length"),
            newline="\r\n",
        )
        + b"event: ignored-kind\r\ndata: {}\r\n\r\n"
    )
    api.script(stream_response(body, split=1))
    _, reply = driver.stream(conv.id, "q")
    assert reply.content == "ab" and reply.finish_reason == "length"


def test_stream_n_greater_than_one(driver: Driver, api: FakeAPI, sqlite_store: Store) -> None:
    conv = sqlite_store.create()
    body = sse(
        chunk({"content": "zero"}, index=0),
        chunk({"content": "one"}, index=1),
        chunk({}, finish_reason="stop", index=0),
        chunk({}, finish_reason="stop", index=1),
    )
    api.script(stream_response(body))
    chunks, reply = driver.stream(conv.id, "q", n=2)
    assert "".join(c.delta for c in chunks) == "zero"  # deltas are choice 0's
    assert reply.content == "zero"
    assert reply.extra["choices"] == [
        {"index": 1, "message": {"role": "assistant", "content": "one"}, "finish_reason": "stop"}
    ]


def test_stream_errors_before_the_first_chunk_are_raised(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    api.script(error_response(401, "bad key"))
    with pytest.raises(AuthenticationError):
        driver.stream(conv.id, "q")
    api.script(error_response(503), stream_response(text_stream("ok")))
    _, reply = driver.stream(conv.id, again=True)
    assert reply.content == "ok" and len(driver.sleeps) == 1


def test_stream_starts_before_it_returns_and_final_message_reads_the_rest(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    api.script(stream_response(text_stream("whole thing")), stream_response(text_stream("second")))
    assert driver.run(driver.run(driver.sender.stream(conv.id, "q")).final_message()).content == "whole thing"
    stream = driver.run(driver.sender.stream(conv.id, "q2"))
    assert roles(sqlite_store, conv.id)[-1] == ("user", "complete")  # eager, for both senders
    assert len(api.requests) == 2 and stream.reply_to == 3
    assert stream.conversation.id == conv.id and not stream.closed
    assert driver.run(stream.final_message()).content == "second"
    assert stream.closed


# ---------------------------------------------------------------------------------------------
# Request bodies against OpenAI's schema


def test_request_bodies_validate_against_the_openai_schema(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create(system="You are terse.")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
    }
    api.script(
        completion(None, tool_calls=[call], finish_reason="tool_calls"),
        completion("Cold."),
        completion(None, refusal="No."),
        stream_response(text_stream("streamed")),
        completion("last"),
    )
    driver.send(
        conv.id, "Weather in Oslo?", tools=tools, tool_choice="auto", temperature=0.5, seed=1, user="u"
    )
    sqlite_store.get(conv.id).append("tool", '{"temp": -3}', tool_call_id="call_1")
    driver.retry(conv.id, tools=tools, max_completion_tokens=100)
    driver.send(conv.id, [{"type": "text", "text": "And this?"}], response_format={"type": "json_object"})
    driver.stream(conv.id, "stream it", stop=["END"], top_p=0.5)
    driver.send(conv.id, "last one", model="gpt-4.1", n=2, max_tokens=10)
    assert len(api.bodies) == 5
    for body in api.bodies:
        assert_valid("CreateChatCompletionRequest", body)


# ---------------------------------------------------------------------------------------------
# The API key stays secret


def test_the_api_key_never_leaks(
    sync: bool, sqlite_store: Store, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    echo = error_response(401, f"Incorrect API key provided: {API_KEY}")
    api = FakeAPI(
        echo,
        httpx.Response(
            500, text=f"<html><title>{API_KEY}</title></html>", headers={"content-type": "text/html"}
        ),
        httpx.Response(200, text=f"oops {API_KEY}"),
        httpx.ConnectError(f"cannot connect with {API_KEY}"),
        stream_response(sse(chunk({"content": "x"}), done=False), error=httpx.ReadError("reset")),
        stream_response(sse(chunk({"content": "y"}), {"error": {"message": f"bad {API_KEY}"}}, done=False)),
        completion("fine"),
    )
    driver = Driver(sync, sqlite_store, transport=api.transport())
    errors: list[BaseException] = []
    conv = sqlite_store.create()
    with caplog.at_level(logging.DEBUG):
        assert API_KEY not in repr(driver.sender)
        for call in (
            lambda: driver.send(conv.id, "a"),
            lambda: driver.retry(conv.id, max_retries=0),
            lambda: driver.retry(conv.id),
            lambda: driver.retry(conv.id, max_retries=0),
            lambda: driver.stream(conv.id, again=True),
            lambda: driver.stream(conv.id, again=True),
        ):
            with pytest.raises(GilasConvError) as caught:
                call()
            errors.append(caught.value)
        driver.retry(conv.id)
        driver.close()
    assert [type(e) for e in errors] == [
        AuthenticationError,
        InternalServerError,
        APIResponseValidationError,
        APIConnectionError,
        StreamInterrupted,
        StreamInterrupted,
    ]
    assert "bad [REDACTED]" in str(errors[-1].__cause__)
    for err in errors:
        own: BaseException | None = err
        while isinstance(own, GilasConvError):  # ours, and the chain of ours behind it
            for text in (str(own), repr(own), repr(getattr(own, "body", None))):
                assert API_KEY not in text
            own = own.__cause__
    assert "[REDACTED]" in str(errors[0])
    assert caplog.records
    for record in caplog.records:
        assert API_KEY not in record.getMessage()
    sqlite_store.close()
    files = [p for p in tmp_path.rglob("*.db*") if p.is_file()]
    assert files
    assert all(API_KEY.encode() not in p.read_bytes() for p in files)


def test_api_errors_from_pure_helpers() -> None:
    err = _api.status_error(502, "application/json", b'{"detail": "upstream"}', request_id="r")
    assert type(err) is InternalServerError and err.message == "upstream"
    err = _api.status_error(520, "", b"", secrets=("k",))
    assert type(err) is InternalServerError and "empty body" in err.message
    err = _api.status_error(400, "application/json", b'{"error": "plain string"}')
    assert err.message == "plain string"
    err = _api.status_error(302, "text/plain", b"moved")
    assert type(err) is APIStatusError and "moved" in err.message


def test_reply_parsing_edge_cases() -> None:
    both = _api.parse_completion(completion("Partly.", refusal="Not the rest."))
    assert both.content == [
        {"type": "text", "text": "Partly."},
        {"type": "refusal", "refusal": "Not the rest."},
    ]
    bare = completion(None, finish_reason="content_filter")
    del bare["id"], bare["usage"]
    parsed = _api.parse_completion(bare)
    assert (parsed.content, parsed.response_id, parsed.usage) == ("", None, None)
    assert parsed.finish_reason == "content_filter" and parsed.extra == {"system_fingerprint": "fp_test"}

    refused = _api.StreamAccumulator()
    for data in (chunk({"refusal": "I can"}), chunk({"refusal": "not."}), chunk({}, finish_reason="stop")):
        refused.add(json.dumps(data))
    assert refused.finished and refused.reply(complete=True).content == [
        {"type": "refusal", "refusal": "I cannot."}
    ]

    cut = _api.StreamAccumulator()
    cut.add(json.dumps(chunk({"content": "Let me check."})))
    cut.add(
        json.dumps(
            chunk(
                {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a'}}]}
            )
        )
    )
    cut.add(json.dumps(chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]})))
    assert not cut.finished and not cut.empty
    partial = cut.reply(complete=False)
    assert partial.content == "Let me check."
    assert partial.tool_calls == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a'}}
    ]
    assert partial.extra == {
        "partial_tool_calls": [{"id": "", "type": "function", "function": {"name": "", "arguments": "{}"}}]
    }
    with pytest.raises(APIResponseValidationError):
        cut.reply(complete=True)  # a finished reply may not have a call without id


# ---------------------------------------------------------------------------------------------
# Concurrency


def test_async_store_calls_run_off_the_event_loop(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []

    def spy_on(name: str) -> None:
        real = getattr(type(sqlite_store), name)

        def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(type(sqlite_store), name, spy)

    spy_on("_take_turn")  # stores the user message (the lease, and the quota under a limit)
    spy_on("_append")  # stores the reply
    api = FakeAPI(default=completion("x"))
    conv = sqlite_store.create()

    async def run() -> str:
        loop_thread = threading.current_thread().name
        async with AsyncSender(sqlite_store, api_key="k", transport=api.transport()) as sender:
            await sender.send(conv.id, "a")
            async with await sender.stream(conv.id, "b") as stream:
                async for _ in stream:
                    pass
        return loop_thread

    api.script(completion("x"), stream_response(text_stream("y")))
    loop_thread = asyncio.run(run())
    assert len(threads) == 4 and loop_thread not in threads
