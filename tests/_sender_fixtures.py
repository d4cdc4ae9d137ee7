"""Helpers shared by the sender tests: one test body drives Sender or AsyncSender.

``Driver(sync, store, ...)`` exposes ``send`` / ``retry`` / ``stream`` as plain calls: for
``sync=False`` each call runs the AsyncSender coroutine on the driver's own event loop (one
loop for the driver's life, so the connection pool survives between calls). Sleeps are
recorded, never slept. ``FakeAPI`` is an httpx.MockTransport handler that records what
it received and answers from a script.

PYTEST_DONT_REWRITE: this module is imported by the tests before pytest loads it as a
plugin, so its asserts carry their own messages instead.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gilas_conv import ConversationStore, upgrade_database
from gilas_conv.sender import AsyncSender, Sender, StreamChunk

# Recognisable, so a leak is easy to find in a log line, a database file or an error.
API_KEY = "sk-test-SeCrEt-7f3a9c0d1e2b4a68"
# OpenAI's chat-completions schema, vendored so the schema tests run on every checkout
# (source and licence: tests/data/README.md).
SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "openai-chat-completions.schema.json"


# ---------------------------------------------------------------------------------------------
# Schema


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema: also accept null.

    The schema is extracted from an OpenAPI document; draft 2020-12 ignores
    ``nullable``, which would reject the ``"usage": null`` every real stream chunk carries.
    """
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable_to_json_schema(value) for key, value in node.items()}
    if out.pop("nullable", False) is not True:
        return out
    if isinstance(out.get("enum"), list) and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    kind = out.get("type")
    if isinstance(kind, str) and not any(k in out for k in ("$ref", "allOf", "anyOf", "oneOf")):
        out["type"] = [kind, "null"]
        return out
    return {"anyOf": [out, {"type": "null"}]}


def schema_validator(definition: str, *, openapi_nullable: bool = False) -> Any:
    """A jsonschema validator for ``#/$defs/<definition>`` of the vendored OpenAI schema.

    Requests are checked strictly (we never send null); answers with ``openapi_nullable``.
    """
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    document = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    if openapi_nullable:
        document = _nullable_to_json_schema(document)
    uri = "urn:openai:chat-completions"
    registry = Registry().with_resource(uri, Resource.from_contents(document))
    return Draft202012Validator({"$ref": f"{uri}#/$defs/{definition}"}, registry=registry)


def assert_valid(definition: str, instance: Any, *, openapi_nullable: bool = False) -> None:
    validator = schema_validator(definition, openapi_nullable=openapi_nullable)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


# ---------------------------------------------------------------------------------------------
# Stores


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade_database(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_store(_sqlite_template: Path, tmp_path: Path) -> Iterator[ConversationStore]:
    """A store on a fresh SQLite file (copied from a migrated template: fast)."""
    path = tmp_path / f"unit-{uuid.uuid4().hex[:8]}.db"
    shutil.copy(_sqlite_template, path)
    with ConversationStore(f"sqlite:///{path}") as store:
        yield store


@pytest.fixture(params=[True, False], ids=["sync", "async"])
def sync(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


# ---------------------------------------------------------------------------------------------
# A fake API for httpx.MockTransport


def completion(
    content: str | None = "Hello!",
    *,
    response_id: str | None = None,
    model: str = "gpt-4o-mini-2024-07-18",
    finish_reason: str = "stop",
    tool_calls: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    choices: list[dict[str, Any]] | None = None,
    refusal: str | None = None,
) -> dict[str, Any]:
    """A chat.completion object as the API sends it."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal, "annotations": []}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": response_id or f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": choices
        or [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage or {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        "system_fingerprint": "fp_test",
    }


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    index: int = 0,
    response_id: str = "chatcmpl-stream",
    usage: dict[str, Any] | None = None,
    choices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A chat.completion.chunk object."""
    if choices is None:
        choices = [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    data: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": choices,
    }
    if usage is not None:
        data["usage"] = usage
    return data


def sse(*events: Any, done: bool = True, newline: str = "\n") -> bytes:
    """A server-sent-events body of chunk objects (and ``[DONE]``)."""
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}{newline}{newline}" for e in events]
    if done:
        lines.append(f"data: [DONE]{newline}{newline}")
    return "".join(lines).encode()


def text_stream(text: str, *, response_id: str | None = None, usage: bool = True, done: bool = True) -> bytes:
    """The body of a streamed reply of ``text``, one chunk per word (a new response id each time)."""
    response_id = response_id or f"chatcmpl-{uuid.uuid4().hex[:12]}"
    words = text.split(" ")
    events: list[Any] = [chunk({"role": "assistant", "content": ""}, response_id=response_id)]
    events += [
        chunk({"content": word + (" " if i < len(words) - 1 else "")}, response_id=response_id)
        for i, word in enumerate(words)
    ]
    events.append(chunk({}, finish_reason="stop", response_id=response_id))
    if usage:
        events.append(
            chunk(
                choices=[],
                response_id=response_id,
                usage={"prompt_tokens": 20, "completion_tokens": len(words), "total_tokens": 20 + len(words)},
            )
        )
    return sse(*events, done=done)


class ByteStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body delivered in the given pieces, then optionally a network error."""

    def __init__(self, pieces: list[bytes], *, error: Exception | None = None) -> None:
        self.pieces = pieces
        self.error = error
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.pieces
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> Any:
        for piece in self.pieces:
            yield piece
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def stream_response(
    body: bytes,
    *,
    split: int | None = None,
    error: Exception | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A 200 text/event-stream response; ``split`` cuts the body into pieces of that size."""
    pieces = [body[i : i + split] for i in range(0, len(body), split)] if split else [body]
    return httpx.Response(
        200,
        headers={"content-type": "text/event-stream", **(headers or {})},
        stream=ByteStream(pieces, error=error),
    )


Answer = httpx.Response | Exception | Callable[[httpx.Request], "httpx.Response"] | dict[str, Any]


class FakeAPI:
    """Answers each request with the next scripted answer (then ``default``), recording it.

    An answer is an httpx.Response, a dict (sent as a 200 JSON completion), an exception
    (raised, like a network failure) or a callable taking the request.
    """

    def __init__(self, *answers: Answer, default: Answer | None = None) -> None:
        self.answers: list[Answer] = list(answers)
        self.default = default
        self.requests: list[httpx.Request] = []

    def script(self, *answers: Answer) -> None:
        self.answers.extend(answers)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.answers:
            answer = self.answers.pop(0)
        elif self.default is not None:
            answer = self.default
        else:
            answer = completion()
        if isinstance(answer, Exception):
            raise answer
        if callable(answer) and not isinstance(answer, httpx.Response):
            answer = answer(request)
        if isinstance(answer, dict):
            return httpx.Response(200, json=answer, headers={"x-request-id": "req_ok"})
        return answer

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def error_response(
    status: int,
    message: str = "boom",
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return httpx.Response(status, json=body, headers={"x-request-id": f"req_{status}", **(headers or {})})


# ---------------------------------------------------------------------------------------------
# One test body, two senders


class Driver:
    """Sender or AsyncSender behind one synchronous interface (see the module docstring)."""

    def __init__(self, sync: bool, store: ConversationStore, **options: Any) -> None:
        self.sync = sync
        self.store = store
        self.sleeps: list[float] = []
        self.last_chunks: list[StreamChunk] = []
        self.last_stream: Any = None
        options.setdefault("api_key", API_KEY)
        options.setdefault("base_url", "http://api.test/v1")
        if sync:
            self.loop = None
            self.sender: Any = Sender(store, **options)
            self.sender._sleep = self.sleeps.append
        else:
            self.sender = AsyncSender(store, **options)  # first: a refused option leaves no loop open
            self.loop = asyncio.new_event_loop()

            async def sleep(seconds: float) -> None:
                self.sleeps.append(seconds)

            self.sender._sleep = sleep

    def run(self, value: Any) -> Any:
        """``value`` itself (sync) or the result of awaiting it on the driver's loop."""
        if self.loop is None:
            return value
        return self.loop.run_until_complete(value)

    def send(self, conversation: Any, content: Any, **options: Any) -> Any:
        return self.run(self.sender.send(conversation, content, **options))

    def retry(self, conversation: Any, **options: Any) -> Any:
        return self.run(self.sender.retry(conversation, **options))

    def stream(
        self,
        conversation: Any,
        content: Any = None,
        *,
        take: int | None = None,
        again: bool = False,
        **options: Any,
    ) -> tuple[list[StreamChunk], Any]:
        """Consume a stream (in a with block); ``take`` closes it after that many chunks.

        ``again``: stream_retry instead of stream. Returns (chunks, the stored reply);
        ``last_chunks`` keeps the chunks also when the stream raises.
        """
        chunks: list[StreamChunk] = []
        self.last_chunks = chunks
        if self.sync:
            opened = (
                self.sender.stream_retry(conversation, **options)
                if again
                else self.sender.stream(conversation, content, **options)
            )
            self.last_stream = opened
            with opened:
                for item in opened:
                    chunks.append(item)
                    if take is not None and len(chunks) >= take:
                        break
            return chunks, opened.message

        async def consume() -> tuple[list[StreamChunk], Any]:
            opened = await (
                self.sender.stream_retry(conversation, **options)
                if again
                else self.sender.stream(conversation, content, **options)
            )
            self.last_stream = opened
            async with opened:
                async for item in opened:
                    chunks.append(item)
                    if take is not None and len(chunks) >= take:
                        break
            return chunks, opened.message

        return self.run(consume())  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.loop is None:
            self.sender.close()
            return
        self.loop.run_until_complete(self.sender.aclose())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())  # as asyncio.run does
        self.loop.close()


@pytest.fixture
def make_driver(sync: bool) -> Iterator[Callable[..., Driver]]:
    """``make_driver(store, transport=..., ...)`` -> a Driver for this test's ``sync``; closed after."""
    made: list[Driver] = []

    def make(store: ConversationStore, **options: Any) -> Driver:
        driver = Driver(sync, store, **options)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def api() -> FakeAPI:
    """The fake API the ``driver`` fixture's sender talks to: script it with ``api.script(...)``."""
    return FakeAPI()


@pytest.fixture
def driver(make_driver: Callable[..., Driver], sqlite_store: ConversationStore, api: FakeAPI) -> Driver:
    """A sync or async driver (by the ``sync`` fixture) over a SQLite store and ``api``."""
    return make_driver(sqlite_store, transport=api.transport())
