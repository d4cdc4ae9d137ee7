"""Everything a turn needs that does no I/O, shared by the async source and the generated sync code.

Configuration and its checks, building a request, translating httpx errors, deciding on a
retry, choosing the context and storing the reply (``_prepare`` / ``_store_reply``: plain
blocking calls, which :mod:`._async` runs through its backend), and decoding a stream into
chunks and a reply (:class:`_StreamCore`). The I/O itself -- sending, sleeping, reading a
stream -- is in :mod:`._async` (written by hand) and :mod:`._sync` (generated from it).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from .. import _api
from .. import tokens as _tokens
from .._config import DEFAULT_TURN_LEASE_SECONDS, resolve_api_key, resolve_base_url
from .._retry import decide
from .._sse import SSEDecoder
from ..exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    ConversationBusy,
    StoreError,
)
from ..store import Conversation, ConversationStore, Message, Reservation
from ..store._usage import DEFAULT_QUOTA_RESERVATION, HistoryMoved, QuotaAsk, QuotaNeeded
from ..truncation import SUMMARY_MAX_TOKENS, Context, Policy, SummaryRequest, build_context, plan_context

# The public module's name: log lines read as coming from gilas_conv.sender.
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


def _answer(messages: Sequence[Mapping[str, Any]]) -> _Answer:
    """The ``content`` of ``retry(messages=...)``: answer the turn these messages end."""
    if isinstance(messages, str | bytes | Mapping):
        raise ValueError("messages must be a list of message dicts")
    return _Answer(tuple(messages))


ConversationRef = str | Conversation

# A turn under a quota plans its window, then checks in its transaction that the history is
# still the one planned over; a conversation appended to this often in between is busy.
_PLAN_ATTEMPTS = 5
_UNOWNED: Any = object()


def _owner_key(owner: str | None) -> Any:
    return _UNOWNED if owner is None else owner


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
    lease: str | None = None  # the conversation's turn lease, released with the reply
    # The owner's quota held for this request (None: no limit applies); settled when the
    # reply is stored, released when the request fails.
    reservation: Reservation | None = None


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
    from .. import __version__  # the package is fully imported by the time a sender exists

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

    ``_prepare`` and ``_store_reply`` are blocking calls (the store is); the senders make
    them through their backend's ``run_blocking`` (a worker thread for AsyncSender, so
    that its event loop never waits on the database).
    """

    _client: Any
    _lease_seconds: float = DEFAULT_TURN_LEASE_SECONDS

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
        # Owners a limit applied to at their last turn: their next turn plans its
        # reservation first instead of learning it from a refused transaction. A hint only:
        # the turn's transaction decides (set.add/discard are atomic under the GIL).
        self._limited: set[Any] = set()
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

    def _conversation(self, conversation: ConversationRef, owner: str | None) -> Conversation:
        """A handle is used as it is (with its own owner); an id is looked up for ``owner``."""
        if isinstance(conversation, Conversation):
            return conversation
        return self._store.get(conversation, owner=owner)

    def _prepare(
        self,
        conversation: ConversationRef,
        content: Any,
        call: _Call,
        *,
        owner: str | None,
        stream: bool,
        summarizer: Callable[[SummaryRequest], _api.Reply] | None,
    ) -> _Turn:
        """Take the turn (lease, new messages and, under a limit, the owner's quota, in one
        transaction) and build the body; see the module docstring for the order.
        ConversationBusy if another request holds the lease; QuotaExceeded with nothing
        stored."""
        conv = self._conversation(conversation, owner)
        answering = isinstance(content, _Answer)
        new = list(content.messages) if answering else [{"role": "user", "content": content}]
        lease, held, added = self._take_turn(conv, new, call)
        try:
            for message in added:
                conv._saw(message)
            reply_to = self._pending(conv) if answering else added[0].seq
            params = call.params
            context = build_context(
                conv,
                model=params.get("model"),
                context_limit=call.context_limit,
                max_tokens=params.get("max_completion_tokens") or params.get("max_tokens"),
                tools=params.get("tools"),
                policy=call.policy,
                summarizer=self._summary_recorder(conv, summarizer) if summarizer is not None else None,
            )
            if held is not None:
                # The window is the one reserved for unless the history changed under the
                # lease (an append outside any turn): then the hold grows to it, checked.
                needed = context.prompt_tokens + self._reply_room(call)
                held = self._store._grow_reservation(held, tokens=needed, model=context.model)
            body = _api.build_request_body(
                model=context.model, messages=context.messages, params=params, stream=stream
            )
        except BaseException:
            self._release(conv.id, lease, held)
            raise
        return _Turn(conv, reply_to, body, context.prompt_tokens, lease, held)

    def _take_turn(
        self, conv: Conversation, new: list[dict[str, Any]], call: _Call
    ) -> tuple[str, Reservation | None, list[Message]]:
        """The store's ``_take_turn``, asked first without a reservation for an owner not
        known to be limited (an owner without a limit pays one indexed read in the turn's
        transaction), and with one planned over the history as it is when a limit applies
        (again if the history moved between the plan and the transaction)."""
        key = _owner_key(conv.owner)
        ask = self._quota_ask(conv, new, call) if key in self._limited else None
        for _attempt in range(_PLAN_ATTEMPTS):
            try:
                lease, _, added, held = self._store._take_turn(
                    conv.id, owner=conv.owner, lease_seconds=self._lease_seconds, messages=new, quota=ask
                )
            except (QuotaNeeded, HistoryMoved):
                self._limited.add(key)
                ask = self._quota_ask(conv, new, call)
                continue
            if ask is not None and held is None:
                self._limited.discard(key)  # the limit was removed meanwhile
            return lease, held, added
        raise ConversationBusy(conv.id)

    def _reply_room(self, call: _Call) -> int:
        """What a reservation holds beyond the prompt: the reply's max_tokens (or the
        documented default), and one summary's room under ``policy="summarize"``."""
        params = call.params
        room = params.get("max_completion_tokens") or params.get("max_tokens") or DEFAULT_QUOTA_RESERVATION
        if call.policy == "summarize":
            room += SUMMARY_MAX_TOKENS
        return int(room)

    def _quota_ask(self, conv: Conversation, new: list[dict[str, Any]], call: _Call) -> QuotaAsk:
        """What to reserve: the prompt tokens of the window about to be sent plus
        ``_reply_room``. The new messages are not stored yet, so the window is planned over
        the stored history (as it is now: ``last_seq`` lets the turn's transaction check it
        has not changed) with the new messages' tokens kept free, plus those messages."""
        fresh = self._store.get(conv.id, owner=conv.owner)
        params = call.params
        model = params.get("model") or fresh.model
        new_tokens = 0
        try:
            encoding = _tokens.get_model_info(model).encoding
            new_tokens = sum(_tokens.message_tokens(message, encoding) for message in new)
        except (TypeError, ValueError, KeyError):
            new_tokens = 0  # bad content: the turn's validation refuses it, nothing is held
        prompt = new_tokens
        if fresh.message_count:
            reply_tokens = params.get("max_completion_tokens") or params.get("max_tokens") or 0
            plan = plan_context(
                fresh,
                model=params.get("model"),
                context_limit=call.context_limit,
                max_tokens=(reply_tokens + new_tokens) or None,
                tools=params.get("tools"),
                policy="truncate",
            )
            assert isinstance(plan, Context)
            prompt += plan.prompt_tokens
        return QuotaAsk(tokens=prompt + self._reply_room(call), model=model, last_seq=fresh.message_count)

    def _summary_recorder(
        self, conv: Conversation, ask: Callable[[SummaryRequest], _api.Reply]
    ) -> Callable[[SummaryRequest], str]:
        """The summarizer build_context calls: ask for the summary, record the request's
        usage in the ledger (it was paid for, even if the text turns out unusable), return
        the text."""

        def summarize(request: SummaryRequest) -> str:
            reply = ask(request)
            self._store.record_usage(
                owner=conv.owner,
                conversation_id=conv.id,
                model=reply.model or request.model,
                kind="summary",
                usage=reply.usage,
            )
            return self._summary_text(reply)

        return summarize

    def _abandon(self, turn: _Turn) -> None:
        """End a turn that stores no reply (the request failed, nothing arrived): release
        its lease and give back the quota it held."""
        self._release(turn.conversation.id, turn.lease, turn.reservation)

    def _release(self, conversation_id: str, lease: str | None, held: Reservation | None = None) -> None:
        # Called while another error is on its way up: a failed release must not replace it,
        # and the lease and the reservation expire by themselves.
        try:
            if lease is not None:
                self._store._end_turn(conversation_id, lease)
            if held is not None:
                self._store.release_quota(held)
        except StoreError:
            logger.warning(
                "could not release the turn lease or quota of conversation %s", conversation_id, exc_info=True
            )

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
        try:  # the reply is stored, its quota settled and the lease released in one transaction
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
                lease=turn.lease,
                quota_reservation=turn.reservation,
            )
        except BaseException:
            self._abandon(turn)
            raise
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
