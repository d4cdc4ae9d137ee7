"""The gateway's ASGI application (Starlette): endpoints, tenancy, streaming.

Every request is answered for one owner: the one its key belongs to (``api_keys``), or the
"no owner" scope when the app runs without auth. Lookups pass that owner to the store, so
another tenant's conversation does not exist here (404), on every endpoint.

A completion is one turn of the library: the request's new messages (see
:mod:`._history`) are stored, the window is built from the stored history, the upstream is
called with :class:`~gilas_conv.AsyncSender` and the reply is stored. Everything a request
can be refused for (bad input, unknown conversation, diverged history, nothing to answer)
is checked before anything is stored or sent. Store calls run in worker threads: the event
loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import _api
from .._config import DEFAULT_MODEL, resolve_api_key, resolve_base_url
from .._sender._base import ConversationRef, _answer, _Call, _Turn
from ..exceptions import APIError, ConversationNotFound, MessageNotFound, StreamInterrupted
from ..sender import DEFAULT_TIMEOUT, AsyncReplyStream, AsyncSender, pending_reply_to
from ..store import (
    APIKeys,
    Conversation,
    ConversationStore,
    Message,
    NotAfterReply,
    current_revision,
    head_revision,
    validate_message,
)
from ._errors import GatewayError, error_body, error_for
from ._history import new_messages, resends_nothing
from ._wire import (
    completion_body,
    conversation_object,
    item_object,
    messages_from_items,
    parse_item_id,
    stream_event,
)

__all__ = [
    "CONVERSATION_HEADER",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_UPSTREAM_RETRIES",
    "KEY_CACHE_SECONDS",
    "create_app",
]

logger = logging.getLogger("gilas_conv.server")

_T = TypeVar("_T")

# Requests larger than this are refused with 413 before they are parsed.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# A key's owner is remembered this long, so a revoked key stops working within it.
KEY_CACHE_SECONDS = 2.0
# The gateway does not retry the upstream itself by default: clients do (the official SDKs
# retry 429/5xx twice, honouring Retry-After, which the gateway passes through), and a
# retried request never stores its message twice. Retrying here too would multiply waits.
DEFAULT_UPSTREAM_RETRIES = 0
# The response header naming the conversation a completion belongs to.
CONVERSATION_HEADER = "x-gilas-conversation"
# Items and conversations per page (OpenAI's defaults and maximum).
DEFAULT_PAGE_LIMIT = 20
MAX_PAGE_LIMIT = 100
# How many of the last messages are read first to find the turn waiting for its answer
# (further back only when they are all part of it): a request that re-sends no history
# reads this many with its conversation (usually one suffices: a complete reply), ...
_LAST = 2
# ... then, if they are all part of the turn, this many and more.
_TAIL = 8
# At shutdown, how long the streams cut by the server may take to store what arrived.
_SHUTDOWN_STORE_SECONDS = 10.0
# How long an edit of the items (append, delete) holds the turn lease at most: it is
# released at once, so this only bounds how long a crash mid-edit keeps the conversation busy.
_EDIT_LEASE_SECONDS = 60.0
# How many conversations' models the sender remembers (see _Sender) before it starts again.
_MODELS_KEPT = 10_000
# Titles of conversations a completion creates: the first user line, cut to this length.
_TITLE_LENGTH = 60
# Body fields of a completion that are not sent upstream as parameters.
_GATEWAY_FIELDS = ("messages", "stream", "conversation", "policy", "context_limit")
# Sender options a body must not set through the parameters.
_RESERVED = ("max_retries", "timeout", "owner")


def _title_from(messages: list[dict[str, Any]]) -> str | None:
    for message in messages:
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            for line in message["content"].splitlines():
                words = " ".join(line.split())
                if words:
                    return words if len(words) <= _TITLE_LENGTH else words[: _TITLE_LENGTH - 1] + "…"
    return None


def _as_message(conversation_id: str, seq: int, data: Mapping[str, Any]) -> Message:
    """A new message as the Message it will be once stored (for checking the turn's shape)."""
    return Message(
        conversation_id=conversation_id,
        seq=seq,
        role=data["role"],
        content=data.get("content"),
        created_at=dt.datetime.now(dt.timezone.utc),
        tool_calls=data.get("tool_calls"),
        tool_call_id=data.get("tool_call_id"),
    )


def _check_messages(messages: Any, *, field: str = "messages") -> list[dict[str, Any]]:
    """Request messages, each checked as the store checks it (ValueError naming it)."""
    if not isinstance(messages, list):
        raise GatewayError(400, f"`{field}` must be a list of messages", param=field)
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise GatewayError(400, f"{field}[{index}] is not an object", param=f"{field}[{index}]")
        kept = {
            k: message[k] for k in ("role", "content", "name", "tool_calls", "tool_call_id") if k in message
        }
        if message.get("role") == "assistant" and kept.get("content") is None and not kept.get("tool_calls"):
            kept["content"] = ""
        try:
            validate_message(
                kept.get("role"),
                kept.get("content"),
                name=kept.get("name"),
                tool_calls=kept.get("tool_calls"),
                tool_call_id=kept.get("tool_call_id"),
            )
        except ValueError as err:
            raise GatewayError(400, f"{field}[{index}]: {err}", param=f"{field}[{index}]") from err
        out.append({k: v for k, v in kept.items() if v is not None or k == "content"})
    return out


def _check_answerable(
    tail: list[Message], new: list[dict[str, Any]], *, conversation_id: str, whole: bool
) -> None:
    """Refuse (400) a turn the sender could not answer: it must end in a user message, or in
    tool results answering every call of the assistant message before them."""
    next_seq = (tail[-1].seq if tail else 0) + 1
    candidates = tail + [_as_message(conversation_id, next_seq + i, m) for i, m in enumerate(new)]
    try:
        pending_reply_to(candidates, whole=whole)
    except LookupError:
        return  # more history than was read: the sender looks further back itself
    except ValueError as err:
        if not new:
            raise GatewayError(
                400,
                "`messages` adds nothing new to the conversation and it has nothing left to answer: "
                "send the new message",
                param="messages",
            ) from err
        raise GatewayError(400, f"`messages` cannot be answered: {err}", param="messages") from err


class _ReplyEvents(StreamingResponse):
    """A streamed reply as server-sent events; it owns the reply stream and closes it.

    It notices a client leaving even while no chunk is being written, so the upstream
    request is cancelled at once. However the response ends -- the reply finished, the
    upstream cut off, the client gone (before the first chunk, between two, or before the
    response even began), the server cutting it at shutdown -- the reply stream is closed,
    which stores what arrived (incomplete unless the reply finished) and releases the turn's
    lease. That close runs in its own task: cancelling the response cannot stop it halfway,
    and shutdown waits for it (:class:`_InFlight`).

    The body generator alone could not promise this: cut at a ``yield`` or before its first
    step, a generator's ``finally`` runs only when it is garbage-collected.
    """

    def __init__(
        self,
        stream: AsyncReplyStream,
        conversation_id: str,
        *,
        include_usage: bool,
        in_flight: _InFlight,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(
            _events(stream, conversation_id, include_usage=include_usage),
            media_type="text/event-stream",
            headers=headers,
        )
        self._stream = stream
        self._in_flight = in_flight
        self._closing: asyncio.Task[None] | None = None
        in_flight.enter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def pump() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(pump)
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        group.cancel_scope.cancel()
                        break
        except asyncio.CancelledError:
            # The server cut this response (its shutdown grace period ended); what arrived
            # is stored below, and there is no one left to tell.
            pass
        finally:
            await self.close()

    def close(self) -> asyncio.Future[None]:
        """Close the reply stream (once; later calls wait for the same close)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        return asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()
            with contextlib.suppress(APIError, StreamInterrupted):
                await self._stream.aclose()
        except Exception:
            logger.warning("could not store a streamed reply", exc_info=True)
        finally:
            self._in_flight.exit()


class _InFlight:
    """The streams being answered, so that shutdown waits until each has stored its reply.

    A server cancels the requests still running when its grace period ends, then shuts the
    app down and may exit at once (uvicorn re-raises SIGTERM): the streams' replies are
    stored on their way out, and shutdown waits for those writes.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self._count += 1

    def exit(self) -> None:
        self._count -= 1
        if self._count == 0 and self._idle is not None:
            self._idle.set()

    async def wait(self, timeout: float) -> None:
        if self._count == 0:
            return
        self._idle = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


class _KeyCache:
    """Owners of recently seen keys, each remembered for at most ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._found: dict[str, tuple[float, str]] = {}

    def get(self, key: str) -> str | None:
        found = self._found.get(key)
        if found is None or time.monotonic() - found[0] > self.seconds:
            self._found.pop(key, None)
            return None
        return found[1]

    def put(self, key: str, owner: str) -> None:
        if len(self._found) > 10_000:
            self._found.clear()
        self._found[key] = (time.monotonic(), owner)


@dataclasses.dataclass
class _Completion:
    """A completion's messages as the sender's ``content``, checked against the stored
    conversation (:func:`_plan_turn`) in the worker-thread call that takes the turn."""

    owner: str | None
    reference: str | None  # the conversation named (None: create one)
    messages: list[dict[str, Any]]
    model: str | None
    # The conversation, once found (or created) and every check has passed.
    conversation: Conversation | None = None
    # Its id from then on (or from when the turn's lease statement checks the request):
    # an error after that names the conversation.
    conversation_id: str | None = None


class _Sender(AsyncSender):
    """The gateway's sender: a completion's checks and its new messages' turn run in one
    worker-thread call, with the window's plan (:meth:`_start`), so that a turn makes two
    hops to a worker thread (this one; the reply with the release), not three.

    On Postgres a completion of one user message (the usual turn) skips the read its checks
    make when the conversation's model is known here: the turn's lease statement checks
    that its newest message is a complete reply without tool calls (then that message is
    new and the turn answerable, whatever the history) and its model is the one known
    here; when not, nothing is stored and the request is checked the long way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (owner, conversation id) -> the conversation's model, as last seen by this process.
        self._models: dict[tuple[str | None, str], str] = {}

    def _remember(self, conv: Conversation) -> None:
        if self.store.dialect != "postgresql":
            return
        if len(self._models) >= _MODELS_KEPT:
            self._models.clear()  # a hint: forgetting costs a turn one read
        self._models[(conv.owner, conv.id)] = conv.model

    def _after_reply(self, completion: _Completion, call: _Call) -> _Turn | None:
        """The turn of a completion of one user message, if it follows a complete reply
        (see the class docstring); None when it must be checked the long way."""
        messages, reference = completion.messages, completion.reference
        if reference is None or len(messages) != 1 or messages[0].keys() != {"role", "content"}:
            return None
        model = self._models.get((completion.owner, reference))
        if messages[0]["role"] != "user" or model is None:
            return None
        completion.conversation_id = reference
        try:
            turn = self._prepare_after_reply(
                reference, messages[0]["content"], call, owner=completion.owner, model=model
            )
        except (NotAfterReply, ValueError):
            # Nothing stored. Not after a reply, or a message the store refuses (ValueError):
            # the long way's checks decide, and say why in the gateway's words.
            completion.conversation_id = None
            return None
        except ConversationNotFound:
            completion.conversation_id = None
            self._models.pop((completion.owner, reference), None)
            raise
        completion.conversation = turn.conversation
        self._remember(turn.conversation)
        return turn

    def _prepare(
        self, conversation: ConversationRef, content: Any, call: _Call, *, owner: str | None
    ) -> _Turn:
        if isinstance(content, _Completion):
            turn = self._after_reply(content, call)
            if turn is not None:
                return turn
            conv, new = _plan_turn(self.store, content)
            content.conversation = conversation = conv
            content.conversation_id = conv.id
            self._remember(conv)
            # One new user message (the usual turn) is answered as ``send`` answers it: the
            # reply is to that message, so the sender need not look for the pending turn.
            plain = len(new) == 1 and new[0].keys() == {"role", "content"} and new[0]["role"] == "user"
            content = new[0]["content"] if plain else _answer(new)
        return super()._prepare(conversation, content, call, owner=owner)


def _plan_turn(
    store: ConversationStore, completion: _Completion
) -> tuple[Conversation, list[dict[str, Any]]]:
    """The conversation and the new messages of a completion, or a refusal; writes only
    when it creates the conversation (after every check passed). One read transaction for
    a conversation whose end shows the turn (the usual case)."""
    owner, messages = completion.owner, completion.messages
    if completion.reference is None:
        _check_answerable([], messages, conversation_id="", whole=True)
        conv = store.create(model=completion.model or DEFAULT_MODEL, owner=owner, title=_title_from(messages))
        return conv, messages
    # The first messages only matter to a request that may re-send the history.
    only_new = resends_nothing(messages)
    limit = 2 * len(messages) + 16
    count = _LAST if only_new else limit
    conv, last = store._with_last_messages(completion.reference, owner=owner, count=count)
    if conv.message_count <= count:  # a short history: read whole
        stored, tail, whole, tail_whole = last, last, True, True
    else:
        stored = [] if only_new else conv.messages(limit=limit)
        if _ends_a_turn(last):
            tail, tail_whole = last, False
        else:
            tail, tail_whole = _tail(conv)
        whole = False
    match = new_messages(messages, stored, whole=whole, tail=tail)
    _check_answerable(tail, match.new, conversation_id=conv.id, whole=tail_whole)
    return conv, match.new


@dataclasses.dataclass(kw_only=True, eq=False)
class _Gateway:
    """The state of one app: the store, the sender, the key cache; and the endpoints."""

    store: ConversationStore
    owns_store: bool
    api_key: str = dataclasses.field(repr=False)
    base_url: str
    auth: bool
    max_body_bytes: int
    max_retries: int
    timeout: float
    key_cache: _KeyCache
    keys: APIKeys = dataclasses.field(init=False)
    sender: _Sender | None = None
    http: httpx.AsyncClient | None = None
    streams: _InFlight = dataclasses.field(default_factory=_InFlight)

    def __post_init__(self) -> None:
        self.keys = APIKeys(self.store)

    # -- lifecycle -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.sender = _Sender(
            self.store,
            api_key=self.api_key,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
        )
        self.http = httpx.AsyncClient(timeout=self.timeout)
        async with contextlib.AsyncExitStack() as resources:
            # Closed last to first however shutdown goes (an error or a cancellation in
            # one step still closes the rest).
            if self.owns_store:
                resources.callback(self.store.close)
            resources.push_async_callback(self.http.aclose)
            resources.push_async_callback(self.sender.aclose)
            try:
                yield
            finally:
                # The streams in flight store what arrived before the clients close.
                await self.streams.wait(_SHUTDOWN_STORE_SECONDS)

    # -- plumbing ----------------------------------------------------------------------------------

    async def owner(self, request: Request) -> str | None:
        """The owner the request's key speaks for (None: the no-owner scope, without auth)."""
        if not self.auth:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise GatewayError(
                401,
                "missing API key: send `Authorization: Bearer gc-...` (a key from `gilas-conv keys create`)",
                code="invalid_api_key",
            )
        owner = self.key_cache.get(key)
        if owner is None:
            owner = await asyncio.to_thread(self.keys.owner_of, key)
            if owner is None:
                raise GatewayError(401, "invalid or revoked API key", code="invalid_api_key")
            self.key_cache.put(key, owner)
        return owner

    async def json_body(self, request: Request) -> dict[str, Any]:
        too_large = GatewayError(
            413,
            f"the request body is larger than {self.max_body_bytes} bytes",
            code="request_too_large",
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            return {}
        try:
            data = _api.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise GatewayError(400, "the request body is not valid JSON") from err
        if not isinstance(data, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        return data

    async def conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        return await asyncio.to_thread(self.store.get, conversation_id, owner=owner)

    # -- health ------------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            revision = await asyncio.to_thread(current_revision, self.store.engine)
        except Exception as err:  # any failure to reach the database means "not ready"
            logger.warning("readiness check failed: %s", type(err).__name__)
            return JSONResponse({"status": "unavailable", "reason": "the database is unreachable"}, 503)
        if revision != head_revision():
            return JSONResponse(
                {"status": "unavailable", "reason": f"schema at {revision}, {head_revision()} needed"}, 503
            )
        return JSONResponse({"status": "ready", "revision": revision})

    # -- models ------------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        await self.owner(request)
        assert self.http is not None
        try:
            upstream = await self.http.get(
                self.base_url + "/models", headers={"Authorization": f"Bearer {self.api_key}"}
            )
        except httpx.HTTPError as err:
            raise GatewayError(
                502, f"upstream: no answer ({type(err).__name__})", type="server_error", code="upstream_error"
            ) from err
        text = _api.redact(upstream.text, (self.api_key,))
        headers = {}
        if upstream.headers.get("retry-after"):
            headers["Retry-After"] = upstream.headers["retry-after"]
        return Response(
            text,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type", "application/json"),
            headers=headers,
        )

    # -- chat completions --------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        owner = await self.owner(request)
        body = await self.json_body(request)
        messages = _check_messages(body.get("messages"))
        if not messages:
            raise GatewayError(400, "`messages` must hold at least one message", param="messages")
        reference = body.get("conversation")
        if isinstance(reference, Mapping):
            reference = reference.get("id")
        if reference is not None and (not isinstance(reference, str) or not reference):
            raise GatewayError(400, "`conversation` must be a conversation id", param="conversation")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise GatewayError(400, "`stream` must be true or false", param="stream")
        params = {k: v for k, v in body.items() if k not in _GATEWAY_FIELDS}
        reserved = [k for k in _RESERVED if k in params]
        if reserved:
            raise GatewayError(400, f"unknown parameter: {reserved[0]}", param=reserved[0])
        include_usage = bool(stream) and bool((body.get("stream_options") or {}).get("include_usage"))
        if not stream:
            params.pop("stream_options", None)
        options: dict[str, Any] = {}
        if body.get("policy") is not None:
            options["policy"] = body["policy"]
        if body.get("context_limit") is not None:
            options["context_limit"] = body["context_limit"]
        assert self.sender is not None
        # The sender's own checks of the parameters, before anything is written.
        call = self.sender._call(
            params,
            max_retries=None,
            timeout=None,
            context_limit=options.get("context_limit"),
            policy=options.get("policy"),
        )
        return await _unless_client_leaves(
            request, self._turn(owner, reference, messages, call, bool(stream), include_usage)
        )

    async def _turn(
        self,
        owner: str | None,
        reference: str | None,
        messages: list[dict[str, Any]],
        call: _Call,
        stream: bool,
        include_usage: bool,
    ) -> Response:
        """A checked completion: the turn, up to its response (a stream, once started)."""
        assert self.sender is not None
        completion = _Completion(owner, reference, messages, call.params.get("model"))
        try:
            if not stream:
                reply = await self.sender._complete(reference or "", completion, call, owner=owner)
            else:
                started = await self.sender._open_stream(reference or "", completion, call, owner=owner)
        except Exception as err:
            if completion.conversation_id is None:  # refused by the checks: nothing was stored
                raise
            error = error_for(err)
            error.headers[CONVERSATION_HEADER] = completion.conversation_id
            raise error from err
        conv = completion.conversation
        assert conv is not None
        header = {CONVERSATION_HEADER: conv.id}
        if not stream:
            return JSONResponse(
                completion_body(
                    reply, conversation_id=conv.id, requested_model=call.params.get("model") or conv.model
                ),
                headers=header,
            )
        return _ReplyEvents(
            started,
            conv.id,
            include_usage=include_usage,
            in_flight=self.streams,
            headers={**header, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- conversations -----------------------------------------------------------------------------

    async def create_conversation(self, request: Request) -> Response:
        owner = await self.owner(request)
        body = await self.json_body(request)
        metadata = _metadata(body.get("metadata"))
        items = messages_from_items(body.get("items") or [])
        if len(items) > 0:
            items = _check_messages(items, field="items")
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise GatewayError(400, "`model` must be a model name", param="model")
        title = body.get("title")
        fork_from = body.get("fork_from")

        def create() -> Conversation:
            if fork_from is not None:
                if items:
                    raise GatewayError(400, "give `items` or `fork_from`, not both", param="items")
                source = self.store.get(str(fork_from), owner=owner)
                at = body.get("fork_at")
                conv = source.fork(at, title=title)
                if metadata or model:
                    conv = conv.update(metadata=metadata, model=model)
                return conv
            if items:
                data = {
                    "messages": items,
                    "model": model or DEFAULT_MODEL,
                    "title": title,
                    "metadata": metadata,
                }
                return self.store.import_conversation(data, owner=owner)
            return self.store.create(
                model=model or DEFAULT_MODEL, owner=owner, title=title, metadata=metadata
            )

        conv = await asyncio.to_thread(create)
        return JSONResponse(conversation_object(conv))

    async def list_conversations(self, request: Request) -> Response:
        owner = await self.owner(request)
        limit = _limit(request)
        after = request.query_params.get("after") or None
        found = await asyncio.to_thread(self.store.list, owner=owner, limit=limit + 1, after=after)
        return _page(found, limit, conversation_object)

    async def get_conversation(self, request: Request) -> Response:
        owner = await self.owner(request)
        conv = await self.conversation(request.path_params["conversation_id"], owner)
        return JSONResponse(conversation_object(conv))

    async def update_conversation(self, request: Request) -> Response:
        owner = await self.owner(request)
        body = await self.json_body(request)
        conv = await self.conversation(request.path_params["conversation_id"], owner)
        metadata = _metadata(body.get("metadata"))
        conv = await asyncio.to_thread(
            conv.update, metadata=metadata, title=body.get("title"), model=body.get("model")
        )
        return JSONResponse(conversation_object(conv))

    async def delete_conversation(self, request: Request) -> Response:
        owner = await self.owner(request)
        conversation_id = request.path_params["conversation_id"]
        await asyncio.to_thread(self.store.delete, conversation_id, owner=owner)
        return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})

    # -- items -------------------------------------------------------------------------------------

    def _between_turns(
        self,
        conv: Conversation,
        messages: list[dict[str, Any]],
        change: Callable[[], object] | None = None,
    ) -> list[Message]:
        """Append ``messages`` (then make ``change``) holding the conversation's turn lease, so
        that an edit of the history never lands inside a turn: while a completion is being
        answered it is refused (ConversationBusy, 409) and nothing is written."""
        token, _, added = self.store._begin_turn(
            conv.id, owner=conv.owner, lease_seconds=_EDIT_LEASE_SECONDS, messages=messages
        )
        try:
            if change is not None:
                change()
        finally:
            self.store._end_turn(conv.id, token)
        return added

    async def create_items(self, request: Request) -> Response:
        owner = await self.owner(request)
        body = await self.json_body(request)
        conv = await self.conversation(request.path_params["conversation_id"], owner)
        items = _check_messages(messages_from_items(body.get("items")), field="items")
        if not items:
            raise GatewayError(400, "`items` must hold at least one item", param="items")

        added = await asyncio.to_thread(self._between_turns, conv, items)
        return _page(added, len(added), item_object)

    async def list_items(self, request: Request) -> Response:
        owner = await self.owner(request)
        conv = await self.conversation(request.path_params["conversation_id"], owner)
        limit = _limit(request)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise GatewayError(400, "`order` must be asc or desc", param="order")
        after = request.query_params.get("after")
        cursor = None
        if after:
            cursor = parse_item_id(after)
            if cursor is None:
                raise GatewayError(400, "`after` must be an item id", param="after")
        if order == "asc":
            found = await asyncio.to_thread(conv.messages, after=cursor or 0, limit=limit + 1)
        else:
            found = await asyncio.to_thread(_newest_before, conv, cursor, limit + 1)
        return _page(found, limit, item_object)

    async def get_item(self, request: Request) -> Response:
        owner = await self.owner(request)
        conv = await self.conversation(request.path_params["conversation_id"], owner)
        seq = parse_item_id(request.path_params["item_id"])
        if seq is None:
            raise MessageNotFound(conv.id, 0)
        message = await asyncio.to_thread(conv.message, seq)
        return JSONResponse(item_object(message))

    async def delete_item(self, request: Request) -> Response:
        owner = await self.owner(request)
        conv = await self.conversation(request.path_params["conversation_id"], owner)
        seq = parse_item_id(request.path_params["item_id"])
        if seq is None:
            raise MessageNotFound(conv.id, 0)
        await asyncio.to_thread(self._between_turns, conv, [], functools.partial(conv.delete_message, seq))
        conv = await asyncio.to_thread(conv.refresh)
        return JSONResponse(conversation_object(conv))


async def _unless_client_leaves(request: Request, work: Awaitable[Response]) -> Response:
    """``work``'s response, or, if the client disconnects first, ``work`` cancelled.

    The server does not cancel a handler whose client left before the response began, so
    a turn would run on (and hold its conversation) for a reader who is gone. Only called
    once the body is read: what ``receive`` gives after that is the disconnect.
    """
    task = asyncio.ensure_future(work)
    left = False

    async def watch() -> None:
        nonlocal left
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        orphan = task.result() if task.done() and not task.cancelled() and not task.exception() else None
        if isinstance(orphan, _ReplyEvents):
            # The stream began just as this handler was cut: no one will send it, close it.
            await orphan.close()
        if not left:
            raise
        # No one will read this; the sender released the turn on its way out.
        return Response(status_code=499)
    finally:
        watcher.cancel()


def _ends_a_turn(messages: Sequence[Message]) -> bool:
    """Whether one of ``messages`` ends a turn (a complete reply or an instruction): the turn
    still waiting for its answer is after it."""
    return any(m.role not in ("user", "tool") and m.complete for m in messages)


def _tail(conv: Conversation) -> tuple[list[Message], bool]:
    """The last messages, back to one that ends a turn (a complete reply or an instruction)
    or to the start (then True): enough to see the turn still waiting for its answer."""
    window = _TAIL
    while True:
        after = max(0, conv.message_count - window)
        found = conv.messages(after=after)
        if after == 0 or _ends_a_turn(found):
            return found, after == 0
        window *= 4


def _newest_before(conv: Conversation, before: int | None, count: int) -> list[Message]:
    """Up to ``count`` messages with seq below ``before`` (all when None), newest first."""
    high = conv.message_count + 1 if before is None else before
    out: list[Message] = []
    while high > 1 and len(out) < count:
        low = max(0, high - 1 - (count - len(out)))
        batch = conv.messages(after=low, limit=high - 1 - low)
        out.extend(reversed([m for m in batch if m.seq < high]))
        high = low + 1
    return out[:count]


def _page(found: Sequence[_T], limit: int, render: Callable[[_T], dict[str, Any]]) -> Response:
    """A page of a cursor-paginated list in OpenAI's shape: the first ``limit`` of ``found``
    (read with one more than a page holds, so that ``has_more`` is known)."""
    data = [render(x) for x in found[:limit]]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(found) > limit,
        }
    )


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_PAGE_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_LIMIT:
        raise GatewayError(400, f"`limit` must be between 1 and {MAX_PAGE_LIMIT}", param="limit")
    return int(raw)


def _metadata(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise GatewayError(400, "`metadata` must be an object", param="metadata")
    return dict(value)


async def _events(
    stream: AsyncReplyStream, conversation_id: str, *, include_usage: bool
) -> AsyncIterator[str]:
    """The reply's chunks as server-sent events, each naming the conversation, as they arrive.
    (:class:`_ReplyEvents` closes the stream, however this ends.)

    Chunks that arrived together (in one read from the upstream) are sent together: one
    write to the client instead of one per chunk, none of them held back."""
    batch: list[str] = []
    try:
        async for chunk in stream:
            event = stream_event(chunk.data, chunk.raw, conversation_id, include_usage=include_usage)
            if event is not None:
                batch.append(event)
            if batch and not stream._core.ready:  # the next chunk is not here yet
                yield "".join(batch)
                batch = []
    except (APIError, StreamInterrupted) as err:
        error = error_for(err)
        payload = error_body(error.message, type=error.type, code=error.code)
        payload["conversation"] = conversation_id
        batch.append("data: " + json.dumps(payload, ensure_ascii=False) + "\n\n")
        yield "".join(batch)
        return
    batch.append("data: [DONE]\n\n")
    yield "".join(batch)


def _handler(gateway: _Gateway, name: str) -> Callable[[Request], Awaitable[Response]]:
    method = getattr(gateway, name)

    async def endpoint(request: Request) -> Response:
        try:
            return await method(request)
        except Exception as err:
            error = error_for(err)
            return JSONResponse(
                error_body(error.message, type=error.type, code=error.code, param=error.param),
                status_code=error.status,
                headers=error.headers,
            )

    return endpoint


def create_app(
    *,
    store: ConversationStore | None = None,
    database_url: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    auth: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_retries: int = DEFAULT_UPSTREAM_RETRIES,
    timeout: float = DEFAULT_TIMEOUT,
    key_cache_seconds: float = KEY_CACHE_SECONDS,
) -> Starlette:
    """The gateway as an ASGI application (Starlette), to run or mount in your own app.

    ``store``: the conversation store to use (left open at shutdown); else one is opened
    on ``database_url`` (else ``$GILAS_CONV_DATABASE_URL``, else the default SQLite file)
    and closed at shutdown. ``base_url`` and ``api_key`` name the upstream (else
    ``$GILAS_BASE_URL`` and ``$GILAS_API_KEY``; a missing key raises MissingAPIKeyError
    here). ``auth``: clients present keys from ``gilas-conv keys create`` and see only
    their owner's conversations; ``False`` serves one user with no key (the conversations
    without an owner), only sensible on a loopback address. ``max_body_bytes``: larger
    request bodies get 413. ``max_retries``: retries of a failed upstream request (see
    :data:`DEFAULT_UPSTREAM_RETRIES`). ``key_cache_seconds``: how long a key's owner is
    remembered (a revoked key works at most this long afterwards).
    """
    upstream_key = resolve_api_key(api_key)
    upstream_url = resolve_base_url(base_url)
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError("max_body_bytes must be a positive integer")
    owns_store = store is None
    opened = store if store is not None else ConversationStore(database_url)
    gateway = _Gateway(
        store=opened,
        owns_store=owns_store,
        api_key=upstream_key,
        base_url=upstream_url,
        auth=auth,
        max_body_bytes=max_body_bytes,
        max_retries=max_retries,
        timeout=timeout,
        key_cache=_KeyCache(key_cache_seconds),
    )

    def route(path: str, name: str, methods: list[str]) -> Route:
        return Route(path, _handler(gateway, name), methods=methods)

    routes = [
        route("/healthz", "healthz", ["GET"]),
        route("/readyz", "readyz", ["GET"]),
        route("/v1/models", "models", ["GET"]),
        route("/v1/chat/completions", "chat_completions", ["POST"]),
        route("/v1/conversations", "create_conversation", ["POST"]),
        route("/v1/conversations", "list_conversations", ["GET"]),
        route("/v1/conversations/{conversation_id}", "get_conversation", ["GET"]),
        route("/v1/conversations/{conversation_id}", "update_conversation", ["POST"]),
        route("/v1/conversations/{conversation_id}", "delete_conversation", ["DELETE"]),
        route("/v1/conversations/{conversation_id}/items", "create_items", ["POST"]),
        route("/v1/conversations/{conversation_id}/items", "list_items", ["GET"]),
        route("/v1/conversations/{conversation_id}/items/{item_id}", "get_item", ["GET"]),
        route("/v1/conversations/{conversation_id}/items/{item_id}", "delete_item", ["DELETE"]),
    ]

    async def not_found(request: Request, _exc: Exception) -> Response:
        return JSONResponse(
            error_body(
                f"no route {request.method} {request.url.path}",
                type="invalid_request_error",
                code="not_found",
            ),
            status_code=404,
        )

    async def not_allowed(request: Request, _exc: Exception) -> Response:
        return JSONResponse(
            error_body(
                f"{request.method} is not allowed on {request.url.path}", type="invalid_request_error"
            ),
            status_code=405,
        )

    async def failed(request: Request, err: Exception) -> Response:
        logger.error("unexpected error", exc_info=err)
        return JSONResponse(
            error_body("the gateway failed unexpectedly", type="server_error"), status_code=500
        )

    app = Starlette(
        routes=routes,
        lifespan=gateway.lifespan,
        exception_handlers={404: not_found, 405: not_allowed, 500: failed},
    )
    app.state.gateway = gateway
    return app
