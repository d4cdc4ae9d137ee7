"""Sending a conversation's next turn to a chat-completions API and storing the reply.

:class:`Sender` (on ``httpx.Client``) and :class:`AsyncSender` (on ``httpx.AsyncClient``)
do the same thing; only the few lines that do I/O exist twice. Everything else -- what is
sent, whether and when to retry, how a stream is decoded and assembled, what is stored --
lives in pure helpers (``_api``, ``_retry``, ``_sse``) and in :class:`_SenderBase`.

One turn, step by step (``send``)
    1. The parameters are checked; a bad one raises ValueError and nothing is stored.
    2. The user message is stored.
    3. The context is chosen from the stored history by
       :func:`gilas_conv.truncation.build_context` (``context_limit=`` overrides the
       model's window; it is not sent). Turns that do not fit are dropped, or with
       ``policy="summarize"`` replaced by a stored summary, which an extra request to
       the same API makes or extends when needed. If even the newest turn does not fit,
       :class:`~gilas_conv.ContextWindowExceeded` is raised and nothing is sent.
    4. ``POST {base_url}/chat/completions``, retried on 408/409/429/5xx and connection
       errors (see :mod:`gilas_conv._retry`); other errors raise at once.
    5. The reply is stored with the API's response id, model, finish reason and usage,
       ``predicted_prompt_tokens`` (our count before sending) and ``reply_to`` (the seq of
       the user message it answers), and returned.

If anything fails after step 2, the user message stays stored, unanswered, and the error
is raised: :meth:`Sender.retry` answers it later, and a next ``send`` replays it as part of
the history before the new message. Replies are stored under the API's response id, which
the store keeps unique per conversation, so the same reply is never stored twice.

Streams (``stream``)
    Chunks are yielded as they arrive; the reply is stored when the stream ends. A stream
    is finished when the API sends ``[DONE]`` or a ``finish_reason``; one that stops
    before that was cut off, even if the connection closed cleanly. Then what arrived is
    stored with status ``"incomplete"`` (never replayed by default) and
    :class:`~gilas_conv.StreamInterrupted` is raised. Closing a stream early (``close()``,
    leaving its ``with`` block, or breaking out of the loop) stores what arrived the same
    way, quietly ("what arrived" is everything read from the network so far, which may
    run a chunk or two ahead of what the loop consumed; if the whole reply had arrived it
    is stored as complete). When nothing of the reply arrived, nothing is stored and the
    error itself (e.g. :class:`~gilas_conv.APIConnectionError`) is raised. Requests are
    retried only until the response headers arrive, never in the middle of a stream.

``n > 1``
    Choice 0 is the reply that is stored and replayed; the other choices are kept in the
    stored message's ``extra["choices"]``, each as the API sent it (with its ``index``).

The API key is only ever put in the ``Authorization`` header: it is scrubbed from error
messages and bodies, and appears in no log line, repr or stored row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import _api
from ._config import resolve_api_key, resolve_base_url
from ._retry import DEFAULT_MAX_RETRIES, decide
from ._sse import SSEDecoder
from .exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    StreamInterrupted,
)
from .store import Conversation, ConversationStore, Message
from .truncation import Policy, SummaryRequest, build_context

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncReplyStream",
    "AsyncSender",
    "ReplyStream",
    "Sender",
    "StreamChunk",
    "pending_reply_to",
]

logger = logging.getLogger("gilas_conv.sender")

CHAT_COMPLETIONS_PATH = "/chat/completions"
# Seconds for each phase of a request (connect, write, each read, pool); a float applies to
# all four, an httpx.Timeout sets them one by one. A stream's read timeout is per chunk.
DEFAULT_TIMEOUT = 60.0
# One pool per sender; connections are kept alive between turns.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
# How far back retry() first looks for the turn to answer; it widens the window if needed.
_RETRY_TAIL = 64
POLICIES = ("truncate", "summarize")


@dataclass(frozen=True, slots=True)
class _Answer:
    """``content`` of a call that answers the pending turn instead of adding a user message,
    after appending ``messages`` (retry's ``messages=``) as part of the turn."""

    messages: tuple[Mapping[str, Any], ...] = ()


_PENDING: Any = _Answer()

ConversationRef = str | Conversation


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """What one streamed chunk added to the reply (choice 0).

    ``delta`` is the text added (``""`` when the chunk carried none: a role or tool-call
    chunk, the final usage chunk). ``tool_calls`` are the raw tool-call deltas, to be
    assembled by ``index`` (the stored reply has them assembled). ``raw`` is the chunk as
    the API sent it, other choices included.
    """

    delta: str
    refusal: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class _Call:
    """The checked options of one send/stream/retry call."""

    params: dict[str, Any]
    max_retries: int
    timeout: httpx.Timeout
    context_limit: int | None
    policy: Policy


@dataclass(frozen=True, slots=True)
class _Turn:
    """A request ready to go: where its reply is stored and what it answers."""

    conversation: Conversation
    reply_to: int | None
    body: dict[str, Any]
    predicted_prompt_tokens: int


def _answer(messages: Sequence[Mapping[str, Any]]) -> _Answer:
    if isinstance(messages, str | bytes | Mapping):
        raise ValueError("messages must be a list of message dicts")
    return _Answer(tuple(messages))


def _as_timeout(value: float | httpx.Timeout) -> httpx.Timeout:
    if isinstance(value, httpx.Timeout):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"timeout must be a positive number of seconds or an httpx.Timeout, not {value!r}")
    return httpx.Timeout(float(value))


def _check_max_retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_retries must be a non-negative integer, not {value!r}")
    return value


def _check_policy(value: Any) -> Policy:
    if value not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {value!r}")
    return value


def _check_positive(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def _user_agent() -> str:
    from . import __version__  # the package is fully imported by the time a sender exists

    return f"gilas-conv/{__version__}"


def _translate(err: httpx.HTTPError, url: str, secrets: Sequence[str]) -> APIConnectionError:
    """The library's error for an httpx failure, with the httpx error as its cause."""
    detail = _api.redact(str(err) or type(err).__name__, secrets)
    error: APIConnectionError
    if isinstance(err, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for the answer",
            httpx.WriteTimeout: "sending the request",
            httpx.PoolTimeout: "waiting for a free connection",
        }.get(type(err), "")
        error = APITimeoutError(f"the request to {url} timed out{' ' + phase if phase else ''}")
    else:
        error = APIConnectionError(f"no answer from {url}: {type(err).__name__}: {detail}")
    error.__cause__ = err
    error.__suppress_context__ = True
    return error


def pending_reply_to(messages: Sequence[Message], *, whole: bool = True) -> int | None:
    """The seq of the user message the next reply answers, for ``retry``.

    ``messages`` is the end of the history, in order (``whole``: it is all of it). The turn
    to answer is a last user message, or tool results answering every call of the
    assistant message before them; interrupted (incomplete) replies after either are
    skipped. Raises ValueError when there is nothing to answer, and LookupError when
    ``messages`` is too short to tell (the caller reads further back).
    """
    index = len(messages) - 1
    while index >= 0 and messages[index].role == "assistant" and not messages[index].complete:
        index -= 1
    if index < 0:
        if not whole:
            raise LookupError
        raise ValueError("nothing to answer: the conversation has no user message yet; use send()")
    last = messages[index]
    if last.role == "user":
        return last.seq
    if last.role == "tool":
        answered = set()
        while index >= 0 and messages[index].role == "tool":
            answered.add(messages[index].tool_call_id)
            index -= 1
        if index < 0:
            if not whole:
                raise LookupError
            raise ValueError("the last messages are tool results with no assistant tool_calls before them")
        caller = messages[index]
        if caller.role != "assistant" or not caller.tool_calls:
            raise ValueError(
                f"the tool results at the end answer no tool call: message {caller.seq} before "
                f"them is a {caller.role} message without tool_calls"
            )
        missing = [call.get("id") for call in caller.tool_calls if call.get("id") not in answered]
        if missing:
            raise ValueError(
                f"the tool calls {', '.join(map(str, missing))} of message {caller.seq} have no result "
                "yet; append each with conv.append('tool', result, tool_call_id=...) first"
            )
        if caller.reply_to is not None:
            return caller.reply_to
        for earlier in reversed(messages[:index]):
            if earlier.role == "user":
                return earlier.seq
        return None
    if last.role == "assistant":
        if last.tool_calls:
            raise ValueError(
                f"message {last.seq} asks for tool calls; append each result with "
                "conv.append('tool', result, tool_call_id=...) and call retry() again"
            )
        raise ValueError(
            f"the last message ({last.seq}) is already a complete assistant reply: there is "
            "nothing to retry; use send() for a new turn"
        )
    raise ValueError(f"nothing to answer: the last message ({last.seq}) is a {last.role} message; use send()")


@dataclass(frozen=True, slots=True)
class _Settlement:
    """How a stream ended: what to store (status None: nothing) and what to raise."""

    status: str | None
    reply: _api.Reply | None
    error: APIError | None = None
    reason: str = ""


class _StreamCore:
    """The I/O-free part of reading a streamed reply, shared by both stream handles."""

    def __init__(self, request_id: str | None, secrets: Sequence[str]) -> None:
        self.decoder = SSEDecoder()
        self.acc = _api.StreamAccumulator(request_id=request_id, secrets=secrets)
        self.secrets = secrets
        self.ready: deque[StreamChunk] = deque()
        self.error: APIError | None = None  # the API said error, or sent a malformed chunk

    def feed(self, data: bytes) -> None:
        self._take(self.decoder.feed(data))

    def eof(self) -> None:
        self._take(self.decoder.flush())

    def _take(self, events: list[Any]) -> None:
        for event in events:
            if self.acc.done or self.error is not None:
                return  # after [DONE] the rest of the body is read only to free the connection
            try:
                if event.event == "error":
                    message, *_ = _api.error_fields(_safe_json(event.data))
                    text = f"the API reported an error in the middle of the stream: {message or event.data}"
                    raise APIError(_api.redact(text, self.secrets), request_id=self.acc.request_id)
                if event.event != "message":
                    continue
                delta = self.acc.add(event.data)
            except APIError as err:
                self.error = err
                return
            if delta is not None:
                self.ready.append(
                    StreamChunk(
                        delta=delta.content,
                        refusal=delta.refusal,
                        tool_calls=delta.tool_calls,
                        finish_reason=delta.finish_reason,
                        usage=delta.usage,
                        raw=delta.raw,
                    )
                )

    def settle(self, *, cause: APIError | None, closed: bool) -> _Settlement:
        acc = self.acc
        if acc.finished:
            if cause is not None or self.error is not None:
                logger.debug("stream lost after the reply finished: %s", cause or self.error)
            return _Settlement("complete", acc.reply(complete=True))
        if closed:
            if acc.empty:
                return _Settlement(None, None)
            return _Settlement("incomplete", acc.reply(complete=False))
        error = self.error or cause
        if error is None:
            error = APIConnectionError(
                "the stream ended before the reply was finished (no [DONE] and no finish_reason)",
                request_id=acc.request_id,
            )
            reason = "the stream ended without [DONE] or a finish_reason"
        elif isinstance(error, APITimeoutError):
            reason = "timed out waiting for the next chunk"
        elif isinstance(error, APIConnectionError):
            reason = "the connection was lost"
        else:
            reason = error.message
        if acc.empty:
            return _Settlement(None, None, error, reason)
        return _Settlement("incomplete", acc.reply(complete=False), error, reason)


def _safe_json(text: str) -> Any:
    try:
        return _api.loads(text)
    except ValueError:
        return None


class _SenderBase:
    """Configuration, and everything a turn needs that is the same for both senders.

    ``_prepare`` and ``_store_reply`` are synchronous (the store is); AsyncSender runs them
    in a worker thread so that its event loop never waits on the database.
    """

    _client: Any

    def __init__(
        self,
        store: ConversationStore,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
        policy: Policy,
    ) -> None:
        self._api_key = resolve_api_key(api_key)
        self._store = store
        self.base_url = resolve_base_url(base_url)
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"the base URL must start with http:// or https://, not {self.base_url!r}; "
                "pass base_url= or set GILAS_BASE_URL"
            )
        self.timeout = _as_timeout(timeout)
        self.max_retries = _check_max_retries(max_retries)
        self.policy = _check_policy(policy)
        self._url = self.base_url + CHAT_COMPLETIONS_PATH
        self._user_agent = _user_agent()

    @property
    def store(self) -> ConversationStore:
        return self._store

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, timeout={self.timeout!r}, "
            f"max_retries={self.max_retries}, policy={self.policy!r})"
        )

    # -- the turn, before and after the request ----------------------------------------------

    def _call(
        self,
        params: Mapping[str, Any],
        *,
        max_retries: int | None,
        timeout: float | httpx.Timeout | None,
        context_limit: int | None,
        policy: Policy | None,
    ) -> _Call:
        """Check a call's options before anything is stored (ValueError if one is bad)."""
        checked = _api.check_params(params)
        _check_positive(checked.get("max_tokens"), "max_tokens")
        _check_positive(checked.get("max_completion_tokens"), "max_completion_tokens")
        _check_positive(context_limit, "context_limit")
        return _Call(
            params=checked,
            max_retries=self.max_retries if max_retries is None else _check_max_retries(max_retries),
            timeout=self.timeout if timeout is None else _as_timeout(timeout),
            context_limit=context_limit,
            policy=self.policy if policy is None else _check_policy(policy),
        )

    def _conversation(self, conversation: ConversationRef) -> Conversation:
        if isinstance(conversation, Conversation):
            return conversation
        return self._store.get(conversation)

    def _prepare(
        self,
        conversation: ConversationRef,
        content: Any,
        call: _Call,
        *,
        stream: bool,
        summarizer: Callable[[SummaryRequest], str] | None,
    ) -> _Turn:
        """Store the user message (an ``_Answer``: its messages, then find the pending turn)
        and build the body."""
        conv = self._conversation(conversation)
        if isinstance(content, _Answer):
            for message in content.messages:
                conv.append(**message)
            reply_to = self._pending(conv)
        else:
            reply_to = conv.append("user", content).seq
        params = call.params
        context = build_context(
            conv,
            model=params.get("model"),
            context_limit=call.context_limit,
            max_tokens=params.get("max_completion_tokens") or params.get("max_tokens"),
            tools=params.get("tools"),
            policy=call.policy,
            summarizer=summarizer,
        )
        body = _api.build_request_body(
            model=context.model, messages=context.messages, params=params, stream=stream
        )
        return _Turn(conv, reply_to, body, context.prompt_tokens)

    @staticmethod
    def _pending(conv: Conversation) -> int | None:
        last = conv.last_message()
        if last is None:
            raise ValueError("nothing to answer: the conversation is empty; use send()")
        window = _RETRY_TAIL
        while True:
            after = max(0, last.seq - window)
            try:
                return pending_reply_to(conv.messages(after=after), whole=after == 0)
            except LookupError:
                window *= 4

    def _store_reply(self, turn: _Turn, reply: _api.Reply, *, status: str) -> Message:
        message = turn.conversation.append(
            "assistant",
            reply.content,
            tool_calls=reply.tool_calls,
            status=status,
            response_id=reply.response_id,
            model=reply.model or turn.body["model"],
            finish_reason=reply.finish_reason,
            usage=reply.usage,
            predicted_prompt_tokens=turn.predicted_prompt_tokens,
            reply_to=turn.reply_to,
            extra=reply.extra,
        )
        logger.debug(
            "stored %s reply %s as message %s of conversation %s (answering %s)",
            status,
            reply.response_id,
            message.seq,
            message.conversation_id,
            turn.reply_to,
        )
        return message

    # -- HTTP, the parts without I/O ------------------------------------------------------------

    def _build_request(self, body: dict[str, Any], *, stream: bool, timeout: httpx.Timeout) -> httpx.Request:
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "User-Agent": self._user_agent,
        }
        return self._client.build_request(
            "POST",
            self._url,
            content=_api.encode_body(body),
            headers=headers,
            timeout=timeout,
        )

    def _connection_error(self, err: httpx.HTTPError) -> APIConnectionError:
        return _translate(err, self._url, (self._api_key,))

    def _status_error(self, response: httpx.Response, payload: bytes) -> APIStatusError:
        error = _api.status_error(
            response.status_code,
            response.headers.get("content-type", ""),
            payload,
            request_id=response.headers.get("x-request-id"),
            secrets=(self._api_key,),
        )
        error.retry_after = response.headers.get("retry-after")
        return error

    def _retry_delay(
        self, error: APIError, *, retries_done: int, max_retries: int, headers: httpx.Headers | None = None
    ) -> float:
        """Log the decision about a failed attempt; the delay before the next, or raise ``error``."""
        decision = decide(
            retries_done=retries_done,
            max_retries=max_retries,
            status=error.status_code if isinstance(error, APIStatusError) else None,
            headers=headers,
            error=type(error).__name__,
        )
        logger.debug("POST %s: %s", self._url, decision.reason)
        if not decision.retry:
            raise error
        return decision.delay

    def _completion(self, response: httpx.Response) -> _api.Reply:
        request_id = response.headers.get("x-request-id")
        data = _api.decode_json_body(
            response.status_code,
            response.headers.get("content-type", ""),
            response.content,
            request_id=request_id,
            secrets=(self._api_key,),
        )
        return _api.parse_completion(data, status=response.status_code, request_id=request_id)

    @staticmethod
    def _summary_body(request: SummaryRequest) -> dict[str, Any]:
        return _api.summary_request_body(
            model=request.model,
            previous=request.previous,
            messages=request.messages,
            max_tokens=request.max_tokens,
        )

    @staticmethod
    def _summary_text(reply: _api.Reply) -> str:
        text = reply.content if isinstance(reply.content, str) else ""
        if not text.strip():
            raise APIResponseValidationError(
                "the API returned no text for the summary of the dropped history", status_code=200
            )
        return text.strip()


# ---------------------------------------------------------------------------------------------
# Sync


class Sender(_SenderBase):
    """Sends turns of stored conversations and stores the replies (synchronous).

    ``api_key``: else ``$GILAS_API_KEY``; if neither, MissingAPIKeyError is raised here,
    before anything is stored or sent. ``base_url``: else ``$GILAS_BASE_URL``, else
    ``https://api.gilas.io/v1``. ``timeout``: seconds per request phase, or an
    ``httpx.Timeout`` for connect/read/write/pool separately. ``max_retries``: retries of a
    failed request. ``policy``: what to do with history that does not fit the window,
    ``"truncate"`` (drop the oldest turns) or ``"summarize"`` (send a stored summary of them,
    made with an extra request when needed; see :mod:`gilas_conv.truncation`). Each call
    may override ``timeout``, ``max_retries`` and ``policy``.

    One connection pool per sender, kept alive between turns; ``with Sender(...) as s`` or
    :meth:`close` closes it. ``http_client``: use this ``httpx.Client`` instead (it is not
    closed here; ``timeout`` still applies per request); ``transport``: an httpx transport
    for the sender's own client (tests).
    """

    def __init__(
        self,
        store: ConversationStore,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        policy: Policy = "truncate",
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            store, api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries, policy=policy
        )
        if http_client is not None and transport is not None:
            raise ValueError("pass http_client or transport, not both")
        self._owns_client = http_client is None
        self._client = http_client or httpx.Client(
            transport=transport, timeout=self.timeout, limits=DEFAULT_LIMITS
        )
        self._sleep: Callable[[float], Any] = time.sleep

    def close(self) -> None:
        """Close the connection pool (not a client passed as ``http_client``)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(
        self,
        conversation: ConversationRef,
        content: Any,
        *,
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> Message:
        """Store ``content`` as a user message, send the turn, store and return the reply.

        ``conversation`` is an id or a :class:`Conversation` handle. ``params`` are
        chat-completions parameters (``model`` overrides the conversation's; ``None``
        values are not sent). ``context_limit`` caps the window (not sent). See the module
        docstring for what is stored when.
        """
        call = self._call(
            params, max_retries=max_retries, timeout=timeout, context_limit=context_limit, policy=policy
        )
        return self._complete(
            self._prepare(conversation, content, call, stream=False, summarizer=self._summarizer(call)), call
        )

    def retry(
        self,
        conversation: ConversationRef,
        *,
        messages: Sequence[Mapping[str, Any]] = (),
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> Message:
        """Answer the pending turn: a last user message left unanswered by a failure, or
        tool results appended after an assistant's tool calls (interrupted replies after
        either are passed over). ValueError if there is none, e.g. when the last message is
        a complete assistant reply.

        ``messages``: new messages to store first, as part of this turn (dicts with
        ``role``, ``content`` and optionally ``name``, ``tool_calls``, ``tool_call_id``,
        ``pinned``), e.g. the results of the tool calls the last reply asked for; the turn
        they end is then answered."""
        call = self._call(
            params, max_retries=max_retries, timeout=timeout, context_limit=context_limit, policy=policy
        )
        return self._complete(
            self._prepare(
                conversation, _answer(messages), call, stream=False, summarizer=self._summarizer(call)
            ),
            call,
        )

    def stream(
        self,
        conversation: ConversationRef,
        content: Any,
        *,
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> ReplyStream:
        """Like :meth:`send`, but the reply streams: iterate the returned :class:`ReplyStream`.

        The user message is stored and the request made (with retries) before this returns,
        so errors such as AuthenticationError are raised here.
        """
        call = self._call(
            params, max_retries=max_retries, timeout=timeout, context_limit=context_limit, policy=policy
        )
        return self._open_stream(
            self._prepare(conversation, content, call, stream=True, summarizer=self._summarizer(call)), call
        )

    def stream_retry(
        self,
        conversation: ConversationRef,
        *,
        messages: Sequence[Mapping[str, Any]] = (),
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> ReplyStream:
        """:meth:`retry`, streamed."""
        call = self._call(
            params, max_retries=max_retries, timeout=timeout, context_limit=context_limit, policy=policy
        )
        return self._open_stream(
            self._prepare(
                conversation, _answer(messages), call, stream=True, summarizer=self._summarizer(call)
            ),
            call,
        )

    def _complete(self, turn: _Turn, call: _Call) -> Message:
        response = self._request(turn.body, stream=False, max_retries=call.max_retries, timeout=call.timeout)
        return self._store_reply(turn, self._completion(response), status="complete")

    def _open_stream(self, turn: _Turn, call: _Call) -> ReplyStream:
        response = self._request(turn.body, stream=True, max_retries=call.max_retries, timeout=call.timeout)
        return ReplyStream(self, turn, response)

    def _summarizer(self, call: _Call) -> Callable[[SummaryRequest], str] | None:
        if call.policy != "summarize":
            return None

        def summarize(request: SummaryRequest) -> str:
            body = self._summary_body(request)
            response = self._request(body, stream=False, max_retries=call.max_retries, timeout=call.timeout)
            return self._summary_text(self._completion(response))

        return summarize

    def _request(
        self, body: dict[str, Any], *, stream: bool, max_retries: int, timeout: httpx.Timeout
    ) -> httpx.Response:
        """POST with retries; the 2xx response (open, when streaming), or raise."""
        request = self._build_request(body, stream=stream, timeout=timeout)
        retries_done = 0
        while True:
            headers = None
            try:
                response = self._client.send(request, stream=stream)
            except httpx.HTTPError as err:
                error: APIError = self._connection_error(err)
            else:
                if response.is_success:
                    return response
                try:
                    payload = response.read()
                except httpx.HTTPError:
                    payload = b""
                finally:
                    response.close()
                error, headers = self._status_error(response, payload), response.headers
            delay = self._retry_delay(
                error, retries_done=retries_done, max_retries=max_retries, headers=headers
            )
            self._sleep(delay)
            retries_done += 1


class ReplyStream:
    """A streamed reply: iterate it for :class:`StreamChunk` values.

    When the stream ends the reply is stored and available as :attr:`message`; see the
    module docstring for a stream that is cut off or closed early. Use it in a ``with``
    block (or call :meth:`close`) to close it at a known point; breaking out of a ``for``
    loop closes it when the handle is garbage-collected (at once in CPython).
    """

    def __init__(self, sender: Sender, turn: _Turn, response: httpx.Response) -> None:
        self._sender = sender
        self._turn = turn
        self._response = response
        self._core = _StreamCore(response.headers.get("x-request-id"), (sender._api_key,))
        self._bytes: Generator[bytes, None, None] = response.iter_bytes()  # type: ignore[assignment]
        self._ended = False
        self._cause: APIError | None = None
        self._settled = False
        #: The stored reply, once the stream has ended (None if nothing arrived).
        self.message: Message | None = None

    @property
    def conversation(self) -> Conversation:
        return self._turn.conversation

    @property
    def reply_to(self) -> int | None:
        """The seq of the user message this reply answers."""
        return self._turn.reply_to

    @property
    def closed(self) -> bool:
        return self._settled

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> StreamChunk:
        while True:
            if self._core.ready:
                return self._core.ready.popleft()
            if self._settled:
                raise StopIteration
            if self._ended or self._core.error is not None:
                self._settle(closed=False)
                continue
            try:
                data = next(self._bytes)
            except StopIteration:
                self._core.eof()
                self._ended = True
            except httpx.HTTPError as err:
                self._cause = self._sender._connection_error(err)
                self._ended = True
            else:
                self._core.feed(data)

    def final_message(self) -> Message | None:
        """Read the rest of the stream and return the stored reply."""
        for _ in self:
            pass
        return self.message

    def close(self) -> None:
        """Stop reading; what arrived so far is stored (as incomplete unless finished)."""
        if not self._settled:
            self._settle(closed=True)

    def __enter__(self) -> ReplyStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_settled", True):
            return
        try:
            self.close()
        except Exception:
            logger.warning("could not store the reply of an abandoned stream", exc_info=True)

    def _settle(self, *, closed: bool) -> None:
        self._settled = True
        try:
            outcome = self._core.settle(cause=self._cause, closed=closed)
        finally:
            self._bytes.close()
            self._response.close()
        if outcome.status is not None:
            assert outcome.reply is not None
            self.message = self._sender._store_reply(self._turn, outcome.reply, status=outcome.status)
        if outcome.error is not None:
            if self.message is None:
                raise outcome.error
            raise StreamInterrupted(self.message, outcome.reason) from outcome.error


# ---------------------------------------------------------------------------------------------
# Async


class AsyncSender(_SenderBase):
    """:class:`Sender` for asyncio, on ``httpx.AsyncClient``: the same options and methods, awaited.

    Store calls (and choosing the context) run in worker threads (``asyncio.to_thread``),
    so the event loop never waits on the database and any number of turns of different
    conversations may run at once in one loop. ``stream`` returns an
    :class:`AsyncReplyStream` to use with ``async for`` / ``async with`` (or ``await``).
    ``async with AsyncSender(...) as s`` or :meth:`aclose` closes the pool.
    """

    def __init__(
        self,
        store: ConversationStore,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        policy: Policy = "truncate",
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            store, api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries, policy=policy
        )
        if http_client is not None and transport is not None:
            raise ValueError("pass http_client or transport, not both")
        self._owns_client = http_client is None
        self._client = http_client or httpx.AsyncClient(
            transport=transport, timeout=self.timeout, limits=DEFAULT_LIMITS
        )
        self._sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
        # Streams abandoned without aclose() finish storing in these tasks.
        self._background: set[asyncio.Task[Any]] = set()

    async def aclose(self) -> None:
        """Let abandoned streams finish storing, then close the pool (not a given http_client)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def send(
        self,
        conversation: ConversationRef,
        content: Any,
        *,
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> Message:
        """See :meth:`Sender.send`."""
        call = self._call(
            params, max_retries=max_retries, timeout=timeout, context_limit=context_limit, policy=policy
        )
        return await self._complete(
            await self._prepare_in_thread(conversation, content, call, stream=False), call
        )

    async def retry(
        self,
        conversation: ConversationRef,
        *,
        messages: Sequence[Mapping[str, Any]] = (),
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> Message:
        """See :meth:`Sender.retry`."""
        call = self._call(
            params, max_retries=max_retries, timeout=timeout, context_limit=context_limit, policy=policy
        )
        return await self._complete(
            await self._prepare_in_thread(conversation, _answer(messages), call, stream=False), call
        )

    def stream(
        self,
        conversation: ConversationRef,
        content: Any,
        *,
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> AsyncReplyStream:
        """Like :meth:`send`, streamed. Nothing happens until the returned stream is first
        iterated, entered (``async with``) or awaited: then the user message is stored and
        the request made, and errors such as AuthenticationError are raised there."""
        call = self._call(
            params, max_retries=max_retries, timeout=timeout, context_limit=context_limit, policy=policy
        )
        return AsyncReplyStream(
            self, lambda: self._prepare_in_thread(conversation, content, call, stream=True), call
        )

    def stream_retry(
        self,
        conversation: ConversationRef,
        *,
        messages: Sequence[Mapping[str, Any]] = (),
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> AsyncReplyStream:
        """:meth:`retry`, streamed (started lazily like :meth:`stream`)."""
        call = self._call(
            params, max_retries=max_retries, timeout=timeout, context_limit=context_limit, policy=policy
        )
        return AsyncReplyStream(
            self, lambda: self._prepare_in_thread(conversation, _answer(messages), call, stream=True), call
        )

    async def _prepare_in_thread(
        self, conversation: ConversationRef, content: Any, call: _Call, *, stream: bool
    ) -> _Turn:
        summarizer = None
        if call.policy == "summarize":
            loop = asyncio.get_running_loop()

            def summarizer(request: SummaryRequest) -> str:
                # Called by build_context in the worker thread: the request runs on the loop.
                return asyncio.run_coroutine_threadsafe(self._summarize(request, call), loop).result()

        return await asyncio.to_thread(
            self._prepare, conversation, content, call, stream=stream, summarizer=summarizer
        )

    async def _summarize(self, request: SummaryRequest, call: _Call) -> str:
        body = self._summary_body(request)
        response = await self._request(body, stream=False, max_retries=call.max_retries, timeout=call.timeout)
        return self._summary_text(self._completion(response))

    async def _complete(self, turn: _Turn, call: _Call) -> Message:
        response = await self._request(
            turn.body, stream=False, max_retries=call.max_retries, timeout=call.timeout
        )
        reply = self._completion(response)
        return await asyncio.to_thread(self._store_reply, turn, reply, status="complete")

    async def _request(
        self, body: dict[str, Any], *, stream: bool, max_retries: int, timeout: httpx.Timeout
    ) -> httpx.Response:
        """POST with retries; the 2xx response (open, when streaming), or raise."""
        request = self._build_request(body, stream=stream, timeout=timeout)
        retries_done = 0
        while True:
            headers = None
            try:
                response = await self._client.send(request, stream=stream)
            except httpx.HTTPError as err:
                error: APIError = self._connection_error(err)
            else:
                if response.is_success:
                    return response
                try:
                    payload = await response.aread()
                except httpx.HTTPError:
                    payload = b""
                finally:
                    await response.aclose()
                error, headers = self._status_error(response, payload), response.headers
            delay = self._retry_delay(
                error, retries_done=retries_done, max_retries=max_retries, headers=headers
            )
            await self._sleep(delay)
            retries_done += 1

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class AsyncReplyStream:
    """A streamed reply for asyncio: ``async for chunk in stream``.

    Started lazily (see :meth:`AsyncSender.stream`). When the stream ends the reply is
    stored and available as :attr:`message`. ``async with`` (or :meth:`aclose`) closes it
    at a known point; a stream abandoned by breaking out of ``async for`` is closed and
    its reply stored in a background task that :meth:`AsyncSender.aclose` waits for.
    """

    def __init__(self, sender: AsyncSender, prepare: Callable[[], Awaitable[_Turn]], call: _Call) -> None:
        self._sender = sender
        self._prepare = prepare
        self._call = call
        self._started = False
        self._turn: _Turn | None = None
        self._response: httpx.Response | None = None
        self._core: _StreamCore | None = None
        self._bytes: Any = None
        self._ended = False
        self._cause: APIError | None = None
        self._settled = False
        self._settling: asyncio.Future[None] | None = None
        #: The stored reply, once the stream has ended (None if nothing arrived).
        self.message: Message | None = None

    @property
    def conversation(self) -> Conversation | None:
        return self._turn.conversation if self._turn else None

    @property
    def reply_to(self) -> int | None:
        return self._turn.reply_to if self._turn else None

    @property
    def closed(self) -> bool:
        return self._settled

    async def _start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self._turn = await self._prepare()
            self._response = await self._sender._request(
                self._turn.body, stream=True, max_retries=self._call.max_retries, timeout=self._call.timeout
            )
        except BaseException:
            self._settled = True
            raise
        self._core = _StreamCore(self._response.headers.get("x-request-id"), (self._sender._api_key,))
        self._bytes = self._response.aiter_bytes()

    def __await__(self) -> Generator[Any, None, AsyncReplyStream]:
        return self._started_self().__await__()

    async def _started_self(self) -> AsyncReplyStream:
        await self._start()
        return self

    async def __aenter__(self) -> AsyncReplyStream:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncReplyStream:
        return self

    async def __anext__(self) -> StreamChunk:
        await self._start()
        core = self._core
        while True:
            if core is not None and core.ready:
                return core.ready.popleft()
            if self._settled or core is None:
                raise StopAsyncIteration
            if self._ended or core.error is not None:
                await self._settle(closed=False)
                continue
            try:
                data = await self._bytes.__anext__()
            except StopAsyncIteration:
                core.eof()
                self._ended = True
            except httpx.HTTPError as err:
                self._cause = self._sender._connection_error(err)
                self._ended = True
            else:
                core.feed(data)

    async def final_message(self) -> Message | None:
        """Read the rest of the stream and return the stored reply."""
        async for _ in self:
            pass
        return self.message

    async def aclose(self) -> None:
        """Stop reading; what arrived so far is stored (as incomplete unless finished)."""
        if self._settling is not None:
            await asyncio.shield(self._settling)
        elif not self._settled and self._started:
            await self._settle(closed=True)
        self._settled = True

    def __del__(self) -> None:
        if getattr(self, "_settled", True) or not getattr(self, "_started", False) or self._core is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            logger.warning(
                "an AsyncReplyStream was abandoned outside its event loop; its reply was not stored "
                "(use async with or aclose())"
            )
            return
        self._sender._track(loop.create_task(self.aclose()))

    async def _settle(self, *, closed: bool) -> None:
        assert self._core is not None and self._response is not None and self._turn is not None
        self._settled = True
        self._settling = asyncio.get_running_loop().create_future()
        try:
            try:
                outcome = self._core.settle(cause=self._cause, closed=closed)
            finally:
                await self._bytes.aclose()
                await self._response.aclose()
            if outcome.status is not None:
                assert outcome.reply is not None
                self.message = await asyncio.to_thread(
                    self._sender._store_reply, self._turn, outcome.reply, status=outcome.status
                )
        finally:
            self._settling.set_result(None)
        if outcome.error is not None:
            if self.message is None:
                raise outcome.error
            raise StreamInterrupted(self.message, outcome.reason) from outcome.error
