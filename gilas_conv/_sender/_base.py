"""Everything a turn needs that does no I/O, shared by the async source and the generated sync code.

Configuration and its checks, building a request, translating httpx errors, deciding on a
retry, choosing the context and storing the reply (``_prepare`` / ``_store_reply``: plain
blocking calls, which :mod:`._async` runs through its backend), and decoding a stream into
chunks and a reply (:class:`_StreamCore`). The I/O itself -- sending, sleeping, reading a
stream -- is in :mod:`._async` (written by hand) and :mod:`._sync` (generated from it).

The order of a turn under a quota (``_prepare``, ``_take_turn``, ``_plan``):

1. The store's ``_take_turn`` takes the lease and appends the new messages in one write
   transaction; its lease statement also says whether a limit applies to the owner (an
   index probe) and returns the conversation's running token total. An owner without a
   limit is done: that probe is all it pays. Under a limit the same transaction reserves
   the prompt the window can cost at most (that total, capped by the context budget: see
   ``_quota_ask``) plus the reply's room, atomically (``QuotaExceeded``: nothing written,
   no lease taken, nothing sent). No window is read for it.
2. ``_plan`` builds the request from the history under the lease; if its window costs more
   than was reserved (tokens recounted under another encoding, a summary's tokens beyond
   the budget) the reservation grows to it, checked like a new request.
3. The reply is stored, its usage charged and the reservation settled, and the lease
   released, in one transaction; a failed request releases the lease and the reservation.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from .. import _api
from .. import tokens as _tokens
from .._config import DEFAULT_TURN_LEASE_SECONDS, redact_url, resolve_api_key, resolve_base_url
from .._retry import RetryDecision, decide
from .._sse import SSEDecoder
from .._version import __version__
from ..exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    StoreError,
)
from ..store import (
    DEFAULT_QUOTA_RESERVATION,
    Conversation,
    ConversationStore,
    Message,
    QuotaAsk,
    Reservation,
)
from ..truncation import (
    SUMMARY_MAX_TOKENS,
    Context,
    Policy,
    SummaryRequest,
    _resolve_budget,
    plan_context,
    save_summary,
)

# The public module's name: log lines read as coming from gilas_conv.sender.
logger = logging.getLogger("gilas_conv.sender")

CHAT_COMPLETIONS_PATH = "/chat/completions"
# Seconds for each phase of a request (connect, write, each read, pool); a float applies to
# all four, an httpx.Timeout sets them one by one. A stream that sends no content (only
# keep-alive comments or empty chunks) for longer than the read timeout is cut off too.
DEFAULT_TIMEOUT = 60.0
# Seconds a whole call may take, retries and the waits between them included: long enough
# for a long reply from a slow model, short enough that nothing hangs for good.
DEFAULT_DEADLINE = 600.0
# One pool per sender; connections are kept alive between turns. A streamed turn holds its
# connection for the whole reply, so this is how many turns of one sender run at once; the
# others wait (up to the pool timeout) for a free connection.
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_MAX_KEEPALIVE_CONNECTIONS = 20
# How far back retry() first looks for the turn to answer; it widens the window if needed.
_RETRY_TAIL = 64
POLICIES = ("truncate", "summarize")
# A stream renews its turn's lease each time this fraction of the lease has passed (checked
# as chunks arrive): a reply has a read timeout per chunk but none overall, so it may stream
# for longer than the lease lasts, and must not lose the conversation to another request.
_RENEW_FRACTION = 1 / 3


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
#: Called with each decision to retry, before the wait (see :class:`gilas_conv.sender.Sender`).
RetryCallback = Callable[[RetryDecision], object]


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """What one streamed chunk added to the reply (choice 0).

    ``delta`` is the text added (``""`` when the chunk carried none: a role or tool-call
    chunk, the final usage chunk). ``tool_calls`` are the raw tool-call deltas, to be
    assembled by ``index`` (the stored reply has them assembled). ``raw`` is the chunk as
    the API sent it, other choices included; ``data`` is its JSON text as it arrived (the
    event's data, ``""`` for a reply that came whole), for passing it on unchanged.
    """

    delta: str
    refusal: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    data: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class _Call:
    """The checked options of one send/stream/retry call."""

    params: dict[str, Any]
    max_retries: int
    timeout: httpx.Timeout
    context_limit: int | None
    policy: Policy
    deadline: float | None = None  # seconds for the whole call (None: none)
    expires: float | None = None  # time.monotonic() when it passes
    on_retry: RetryCallback | None = None

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or None without one."""
        return None if self.expires is None else self.expires - time.monotonic()


@dataclass(frozen=True, slots=True)
class _Turn:
    """A turn under way: where its reply is stored and what it answers; once planned
    (``_plan``), the request body and our count of its prompt tokens."""

    conversation: Conversation
    reply_to: int | None
    lease: str | None = None  # the conversation's turn lease, released with the reply
    body: dict[str, Any] = field(default_factory=dict)
    predicted_prompt_tokens: int = 0
    # The owner's quota held for this request (None: no limit applies); settled when the
    # reply is stored, released when the request fails.
    reservation: Reservation | None = None
    # The conversation to plan the turn with first, when its lease statement read the start
    # of the window too (Postgres: see ``_take_turn``); dropped once planned.
    window: Conversation | None = field(default=None, repr=False)


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


def _check_deadline(value: Any) -> float | None:
    """Seconds, or None for no deadline (``math.inf`` too)."""
    if value is None or value == math.inf:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value != value:
        raise ValueError(f"deadline must be a positive number of seconds or None, not {value!r}")
    return float(value)


def _check_max_connections(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_connections must be a positive integer, not {value!r}")
    return value


def _check_callback(value: Any) -> RetryCallback | None:
    if value is not None and not callable(value):
        raise ValueError(f"on_retry must be callable, not {value!r}")
    return value


def _check_positive(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def _user_agent() -> str:
    return f"gilas-conv/{__version__}"


def _translate(
    err: httpx.HTTPError, url: str, secrets: Sequence[str], *, max_connections: int | None = None
) -> APIConnectionError:
    """The library's error for an httpx failure, with the httpx error as its cause.

    ``url`` is shown as it is: pass it with its credentials masked (``redact_url``).
    """
    detail = _api.redact(str(err) or type(err).__name__, secrets)
    error: APIConnectionError
    if isinstance(err, httpx.PoolTimeout):
        size = f"all {max_connections} connections" if max_connections else "every connection"
        error = APITimeoutError(
            f"the request to {url} timed out waiting for a free connection: {size} of the sender's "
            "pool were busy with other requests; raise the sender's max_connections= (or its pool "
            "timeout) to serve more turns at once"
        )
    elif isinstance(err, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for the answer",
            httpx.WriteTimeout: "sending the request",
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

    def ran_out(why: str) -> Exception:
        # The start of ``messages`` was reached: the answer if it is the whole history.
        return ValueError(why) if whole else LookupError()

    index = len(messages) - 1
    while index >= 0 and messages[index].role == "assistant" and not messages[index].complete:
        index -= 1
    if index < 0:
        raise ran_out("nothing to answer: the conversation has no user message yet; use send()")
    last = messages[index]
    if last.role == "user":
        return last.seq
    if last.role == "tool":
        answered = set()
        while index >= 0 and messages[index].role == "tool":
            answered.add(messages[index].tool_call_id)
            index -= 1
        if index < 0:
            raise ran_out("the last messages are tool results with no assistant tool_calls before them")
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
    """The I/O-free part of reading a streamed reply, shared by both stream handles.

    ``idle_limit``: seconds the stream may go without content (text, a tool call, a finish
    reason, usage or ``[DONE]``; keep-alive comments and empty deltas do not count) before
    :meth:`check_clock` cuts it off with ``idle_error()``; ``expires`` (``time.monotonic()``)
    is the call's deadline, past which it is cut off with ``deadline_error()``. ``whole``:
    the reply already arrived whole (a JSON answer to a streaming request), given as one chunk.
    """

    def __init__(
        self,
        request_id: str | None,
        secrets: Sequence[str],
        *,
        idle_limit: float | None = None,
        expires: float | None = None,
        idle_error: Callable[[], APIError] | None = None,
        deadline_error: Callable[[], APIError] | None = None,
        whole: _api.Reply | None = None,
    ) -> None:
        self.decoder = SSEDecoder()
        self.acc = _api.StreamAccumulator(request_id=request_id, secrets=secrets)
        self.secrets = secrets
        self.ready: deque[StreamChunk] = deque()
        self.error: APIError | None = None  # the API said error, or sent a malformed stream
        self.reason: str | None = None  # why the stream was cut off here, when it was
        self.idle_limit = idle_limit
        self.expires = expires
        self._idle_error = idle_error
        self._deadline_error = deadline_error
        self.last_content = time.monotonic()
        self.whole = whole
        if whole is not None:
            self.ready.append(_whole_chunk(whole))

    def feed(self, data: bytes) -> None:
        try:
            events = self.decoder.feed(data)
        except APIError as err:  # an event over the decoder's size cap: a cut stream
            self.error = err
            return
        self._take(events)

    def eof(self) -> None:
        try:
            events = self.decoder.flush()
        except APIError as err:
            self.error = err
            return
        self._take(events)

    def check_clock(self) -> None:
        """Cut the stream off if the deadline passed or no content came for too long."""
        if self.error is not None or self.acc.finished or self.whole is not None:
            return
        now = time.monotonic()
        if self.expires is not None and now >= self.expires and self._deadline_error is not None:
            self.error = self._deadline_error()
            self.reason = "the deadline passed"
        elif (
            self.idle_limit is not None
            and now - self.last_content > self.idle_limit
            and self._idle_error is not None
        ):
            self.error = self._idle_error()
            self.reason = f"no content for more than {self.idle_limit:g} s"

    def _take(self, events: list[Any]) -> None:
        for event in events:
            if self.acc.done or self.error is not None:
                return  # after [DONE] the rest of the body is read only to free the connection
            try:
                if event.event == "error":
                    raise _api.stream_error_event(
                        event.data, request_id=self.acc.request_id, secrets=self.secrets
                    )
                if event.event != "message":
                    continue
                delta = self.acc.add(event.data)
            except APIError as err:
                self.error = err
                return
            if delta is None or _carries_content(delta):
                self.last_content = time.monotonic()
            if delta is not None:
                self.ready.append(
                    StreamChunk(
                        delta=delta.content,
                        refusal=delta.refusal,
                        tool_calls=delta.tool_calls,
                        finish_reason=delta.finish_reason,
                        usage=delta.usage,
                        raw=delta.raw,
                        data=event.data,
                    )
                )

    def settle(self, *, cause: APIError | None, closed: bool) -> _Settlement:
        if self.whole is not None:
            return _Settlement("complete", self.whole)
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
        elif self.reason is not None and error is self.error:
            reason = self.reason
        elif isinstance(error, APITimeoutError) and error.deadline is not None:
            reason = "the deadline passed"
        elif isinstance(error, APITimeoutError):
            reason = "timed out waiting for the next chunk"
        elif isinstance(error, APIConnectionError):
            reason = "the connection was lost"
        else:
            reason = error.message
        if acc.empty:
            return _Settlement(None, None, error, reason)
        return _Settlement("incomplete", acc.reply(complete=False), error, reason)


def _carries_content(delta: _api.StreamDelta) -> bool:
    """Whether a chunk brought anything of a reply (of any choice), not just a keep-alive."""
    if delta.content or delta.refusal or delta.tool_calls or delta.finish_reason or delta.usage:
        return True
    for choice in delta.raw.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        inner = choice.get("delta")
        if isinstance(inner, dict) and (
            inner.get("content") or inner.get("refusal") or inner.get("tool_calls")
        ):
            return True
    return False


def _whole_chunk(reply: _api.Reply) -> StreamChunk:
    """A reply that arrived whole, as the one chunk of its stream."""
    content = reply.content
    if isinstance(content, list):  # a refusal kept as content parts
        text = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        refusal = "".join(
            p.get("refusal", "") for p in content if isinstance(p, dict) and p.get("type") == "refusal"
        )
    else:
        text, refusal = content or "", ""
    calls = None
    if reply.tool_calls:
        calls = [{"index": i, **call} for i, call in enumerate(reply.tool_calls)]
    return StreamChunk(
        delta=text,
        refusal=refusal,
        tool_calls=calls,
        finish_reason=reply.finish_reason,
        usage=reply.usage,
    )


def _safe_json(text: str) -> Any:
    try:
        return _api.loads(text)
    except ValueError:
        return None


class _SenderBase:
    """Configuration, and everything a turn needs that is the same for both senders.

    ``_prepare``, ``_plan``, ``_save_summary`` and ``_store_reply`` are blocking calls (the
    store is); the senders make them through their backend's ``run_blocking`` (a worker
    thread for AsyncSender, so that its event loop never waits on the database) and make
    every HTTP request, summaries included, between them, with no connection to the
    database open and no worker thread waiting.
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
        deadline: float | None = DEFAULT_DEADLINE,
        on_retry: RetryCallback | None = None,
        max_connections: int | None = None,
        http_client: object = None,
    ) -> None:
        self._api_key = resolve_api_key(api_key)
        self._store = store
        self.base_url = resolve_base_url(base_url)
        # What is shown of the URL anywhere (repr, errors, logs): credentials masked.
        self._display_base_url = redact_url(self.base_url)
        self.timeout = _as_timeout(timeout)
        self.max_retries = _check_max_retries(max_retries)
        self.policy = _check_policy(policy)
        self.deadline = _check_deadline(deadline)
        self.on_retry = _check_callback(on_retry)
        if max_connections is not None and http_client is not None:
            raise ValueError("max_connections sets the sender's own pool: pass it or http_client, not both")
        self.max_connections = _check_max_connections(
            DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections
        )
        self._url = httpx.URL(self.base_url + CHAT_COMPLETIONS_PATH)  # parsed once, not per request
        self._display_url = self._display_base_url + CHAT_COMPLETIONS_PATH
        # Scrubbed from every message, body and log (a server may echo the key). The base URL
        # carries no credentials: resolve_base_url refuses them.
        self._secrets = (self._api_key,)
        self._user_agent = _user_agent()

    def _limits(self) -> httpx.Limits:
        return httpx.Limits(
            max_connections=self.max_connections,
            max_keepalive_connections=min(DEFAULT_MAX_KEEPALIVE_CONNECTIONS, self.max_connections),
        )

    @property
    def store(self) -> ConversationStore:
        return self._store

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self._display_base_url!r}, timeout={self.timeout!r}, "
            f"deadline={self.deadline!r}, max_retries={self.max_retries}, policy={self.policy!r}, "
            f"max_connections={self.max_connections})"
        )

    # -- the turn, before and after the request ----------------------------------------------

    def _call(
        self,
        params: Mapping[str, Any],
        *,
        max_retries: int | None,
        timeout: float | httpx.Timeout | None,
        deadline: float | None = None,
        on_retry: RetryCallback | None = None,
        context_limit: int | None,
        policy: Policy | None,
    ) -> _Call:
        """Check the options of a send/stream/retry/stream_retry call, in the order of their
        signatures, before anything is stored (ValueError if one is bad); None keeps the
        sender's own. The one path from the public methods' keywords to a :class:`_Call`.

        The call's deadline starts counting here.
        """
        checked = _api.check_params(params)
        _check_positive(checked.get("max_tokens"), "max_tokens")
        _check_positive(checked.get("max_completion_tokens"), "max_completion_tokens")
        _check_positive(context_limit, "context_limit")
        seconds = self.deadline if deadline is None else _check_deadline(deadline)
        return _Call(
            params=checked,
            max_retries=self.max_retries if max_retries is None else _check_max_retries(max_retries),
            timeout=self.timeout if timeout is None else _as_timeout(timeout),
            context_limit=context_limit,
            policy=self.policy if policy is None else _check_policy(policy),
            deadline=seconds,
            expires=None if seconds is None else time.monotonic() + seconds,
            on_retry=self.on_retry if on_retry is None else _check_callback(on_retry),
        )

    def _conversation(self, conversation: ConversationRef, owner: str | None) -> Conversation:
        """A handle is used as it is (with its own owner); an id is looked up for ``owner``."""
        if isinstance(conversation, Conversation):
            return conversation
        return self._store.get(conversation, owner=owner)

    def _prepare(
        self, conversation: ConversationRef, content: Any, call: _Call, *, owner: str | None
    ) -> _Turn:
        """Take the turn (the lease, the turn's new messages and, under a limit, the
        owner's quota, in one transaction; see the module docstring for the order): the
        turn, not yet planned. ConversationBusy if another request holds the lease,
        QuotaExceeded if the quota is spent; nothing is stored then."""
        answering = isinstance(content, _Answer)
        new = list(content.messages) if answering else [{"role": "user", "content": content}]
        conv = self._conversation(conversation, owner)
        lease, held, added, start, _ = self._take_turn(conv.id, conv.owner, conv.model, new, call)
        return self._taken(conv, lease, held, added, start, answering=answering)

    def _prepare_after_reply(
        self, conversation_id: str, content: Any, call: _Call, *, owner: str | None, model: str
    ) -> _Turn:
        """:meth:`_prepare` of a user message (the gateway's, on Postgres), the
        conversation not looked up: the turn is taken only if the conversation's newest
        message is a complete reply and its model is ``model``, the model as last seen
        (else the store's NotAfterReply, nothing stored); its handle is the one the lease
        statement returns."""
        new = [{"role": "user", "content": content}]
        lease, held, added, start, conv = self._take_turn(
            conversation_id, owner, model, new, call, after_reply=True
        )
        return self._taken(conv, lease, held, added, start, answering=False)

    def _taken(
        self,
        conv: Conversation,
        lease: str,
        held: Reservation | None,
        added: list[Message],
        start: tuple[int, list[Any], int] | None,
        *,
        answering: bool,
    ) -> _Turn:
        """The turn just taken, its lease given back if it cannot be described."""
        window = None
        if start is not None:  # this handle as it is, planning from what the lease read
            window = replace(conv)
            window._window_start = start
        try:
            for message in added:
                conv._saw(message)
            reply_to = self._pending(conv) if answering else added[0].seq
        except BaseException:
            self._release(conv.id, lease, held)
            raise
        return _Turn(conv, reply_to, lease, reservation=held, window=window)

    def _start(
        self, conversation: ConversationRef, content: Any, call: _Call, *, owner: str | None, stream: bool
    ) -> tuple[_Turn, _Turn | SummaryRequest]:
        """:meth:`_prepare`, then the first :meth:`_plan`, in one blocking call (one worker
        thread's hop, not two): the turn and its plan. A plan that fails gives the turn back."""
        turn = self._prepare(conversation, content, call, owner=owner)
        window, turn = turn.window, replace(turn, window=None)  # for this first plan only
        try:
            return turn, self._plan(turn, call, stream=stream, window=window)
        except BaseException:
            self._abandon(turn)
            raise

    def _abandon_started(self, started: tuple[_Turn, _Turn | SummaryRequest]) -> None:
        """:meth:`_abandon` the turn of :meth:`_start` (as planned: its reservation may have grown)."""
        turn, plan = started
        self._abandon(plan if isinstance(plan, _Turn) else turn)

    def _take_turn(
        self,
        conversation_id: str,
        owner: str | None,
        model: str,
        new: list[dict[str, Any]],
        call: _Call,
        *,
        after_reply: bool = False,
    ) -> tuple[str, Reservation | None, list[Message], tuple[int, list[Any], int] | None, Conversation]:
        """The store's ``_take_turn`` of the conversation of ``model`` as the caller knows
        it, with what to hold should a limit apply to the owner (the store finds out in the
        turn's own transaction; see the module docstring). Then the start of the window
        when the lease statement also read it (Postgres, SQLite: see the store's
        ``_take_turn``), else None; last, the conversation as the lease statement returned
        it (without that start: a handle to keep). ``after_reply``: see :meth:`_prepare_after_reply`."""
        lease, taken, added, held = self._store._take_turn(
            conversation_id,
            owner=owner,
            lease_seconds=self._lease_seconds,
            messages=new,
            quota=self._quota_ask(model, call),
            model=model,
            window=True,
            after_reply=after_reply,
        )
        start, taken._window_start = taken._window_start, None
        return lease, held, added, start, taken

    def _reply_room(self, call: _Call) -> int:
        """What a reservation holds beyond the prompt: the reply's max_tokens (or the
        documented default), and one summary's room under ``policy="summarize"``."""
        params = call.params
        room = params.get("max_completion_tokens") or params.get("max_tokens") or DEFAULT_QUOTA_RESERVATION
        if call.policy == "summarize":
            room += SUMMARY_MAX_TOKENS
        return int(room)

    def _quota_ask(self, conversation_model: str, call: _Call) -> QuotaAsk:
        """What to reserve should a limit apply: the prompt tokens of the window about to be
        sent plus ``_reply_room``. No window is read for it: the window ``_plan`` will
        choose is the stored history (the turn's new messages included), or as much of it
        as the context budget holds (a summary included), so its prompt is at most
        ``min(history, available)`` plus the tools and the reply's priming, ``history``
        being the conversation's running token total, which the turn's lease statement
        returns. Exact when the whole history is sent (the usual case); larger by less
        than one dropped turn when the oldest turns are dropped (or by the tokens of
        messages not sent: incomplete ones, unanswered tool calls). A window larger than
        that (tokens recounted under another model's encoding) grows the reservation in
        ``_plan``."""
        params = call.params
        model = params.get("model") or conversation_model
        room = self._reply_room(call)

        def hold(history: int) -> int:
            budget = _resolve_budget(
                model,
                context_limit=call.context_limit,
                max_tokens=params.get("max_completion_tokens") or params.get("max_tokens"),
                tools=params.get("tools"),
            )
            window = min(history, max(budget.available, 0))
            return window + budget.tools_cost + _tokens.REPLY_PRIMING_TOKENS + room

        return QuotaAsk(hold=hold, model=model)

    def _abandon(self, turn: _Turn) -> None:
        """End a turn that stores no reply (the request failed, nothing arrived): release
        its lease and give back the quota it held."""
        self._release(turn.conversation.id, turn.lease, turn.reservation)

    def _renewal_due(self, renewed_at: float) -> bool:
        """Whether a stream whose lease was last taken or renewed at ``renewed_at``
        (``time.monotonic()``) should renew it now."""
        return time.monotonic() - renewed_at >= self._lease_seconds * _RENEW_FRACTION

    def _renew(self, turn: _Turn) -> None:
        """Extend a streaming turn's lease by another ``_lease_seconds`` from now."""
        if turn.lease is None:
            return
        try:
            held = self._store._renew_turn(
                turn.conversation.id, turn.lease, lease_seconds=self._lease_seconds
            )
        except StoreError:  # the lease is still good for two thirds of its time: try again later
            logger.warning(
                "could not renew the turn lease of conversation %s", turn.conversation.id, exc_info=True
            )
            return
        if not held:
            logger.warning(
                "the turn lease of conversation %s expired and was taken over; this reply will be refused",
                turn.conversation.id,
            )

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

    def _plan(
        self, turn: _Turn, call: _Call, *, stream: bool, window: Conversation | None = None
    ) -> _Turn | SummaryRequest:
        """Choose the context (one short read, no connection kept): the turn with its request
        body, or the summary to ask the API for first (``policy="summarize"``). ``window``:
        the turn's conversation, to plan from (see ``_take_turn``)."""
        params = call.params
        plan = plan_context(
            turn.conversation if window is None else window,
            model=params.get("model"),
            context_limit=call.context_limit,
            max_tokens=params.get("max_completion_tokens") or params.get("max_tokens"),
            tools=params.get("tools"),
            policy=call.policy,
        )
        if not isinstance(plan, Context):
            return plan
        held = turn.reservation
        if held is not None:
            # The hold covers the window unless the history grew under the lease (an append
            # outside any turn) or was recounted under another encoding: then it grows to
            # it, checked like a new request (QuotaExceeded: the caller abandons the turn).
            needed = plan.prompt_tokens + self._reply_room(call)
            held = self._store._grow_reservation(held, tokens=needed, model=plan.model)
        body = _api.build_request_body(model=plan.model, messages=plan.messages, params=params, stream=stream)
        return replace(turn, body=body, predicted_prompt_tokens=plan.prompt_tokens, reservation=held)

    @staticmethod
    def _check_progress(request: SummaryRequest, covered: int) -> int:
        """Each summary asked for must reach further than the last (so the plan loop ends)."""
        if request.to_seq <= covered:
            raise RuntimeError(f"the summary up to message {covered} was stored but not found again")
        return request.to_seq

    def _save_summary(self, turn: _Turn, request: SummaryRequest, reply: _api.Reply) -> None:
        summary = save_summary(turn.conversation, request, self._summary_text(reply), usage=reply.usage)
        logger.debug(
            "stored the summary of messages %s..%s of conversation %s",
            summary.from_seq,
            summary.to_seq,
            summary.conversation_id,
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

    def _attempt_timeout(self, call: _Call) -> httpx.Timeout:
        """The call's timeouts, none longer than the time left before its deadline
        (APITimeoutError if it has passed)."""
        left = call.remaining()
        if left is None:
            return call.timeout
        if left <= 0:
            raise self._deadline_error(call)
        t = call.timeout

        def clip(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(
            connect=clip(t.connect), read=clip(t.read), write=clip(t.write), pool=clip(t.pool)
        )

    def _build_request(self, body: dict[str, Any], *, stream: bool, call: _Call) -> httpx.Request:
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
            timeout=self._attempt_timeout(call),
        )

    def _deadline_error(
        self, call: _Call, detail: str = "", *, request_id: str | None = None
    ) -> APITimeoutError:
        """The error for a call whose overall deadline passed (or would, waiting to retry)."""
        assert call.deadline is not None
        why = f": {detail}" if detail else ""
        return APITimeoutError(
            f"the request to {self._display_url} ran out of its deadline of {call.deadline:g} s "
            f"(deadline=, retries and waits included){why}",
            request_id=request_id,
            deadline=call.deadline,
        )

    def _idle_error(self, call: _Call, request_id: str | None) -> APITimeoutError:
        return APITimeoutError(
            f"the stream from {self._display_url} sent no content for more than "
            f"{call.timeout.read:g} s (the read timeout), only keep-alives or empty chunks",
            request_id=request_id,
        )

    # A timeout within this many seconds of the deadline is taken as the deadline's: the
    # phase timeouts were clipped to it.
    _DEADLINE_SLACK = 0.05

    def _connection_error(self, err: httpx.HTTPError, call: _Call | None = None) -> APIConnectionError:
        left = call.remaining() if call is not None else None
        if isinstance(err, httpx.TimeoutException) and left is not None and left <= self._DEADLINE_SLACK:
            assert call is not None
            error = self._deadline_error(call)
            error.__cause__ = err
            error.__suppress_context__ = True
            return error
        return _translate(err, self._display_url, self._secrets, max_connections=self.max_connections)

    def _status_error(self, response: httpx.Response, payload: bytes) -> APIStatusError:
        error = _api.status_error(
            response.status_code,
            response.headers.get("content-type", ""),
            payload,
            request_id=response.headers.get("x-request-id"),
            secrets=self._secrets,
        )
        error.retry_after = response.headers.get("retry-after")
        return error

    def _retry_delay(
        self, error: APIError, call: _Call, *, retries_done: int, headers: httpx.Headers | None = None
    ) -> float:
        """Log the decision about a failed attempt and tell ``call.on_retry``; the delay
        before the next attempt, or raise (``error``; past the deadline, APITimeoutError)."""
        if isinstance(error, APITimeoutError) and error.deadline is not None:
            raise error
        decision = decide(
            retries_done=retries_done,
            max_retries=call.max_retries,
            status=error.status_code if isinstance(error, APIStatusError) else None,
            headers=headers,
            error=type(error).__name__,
            deadline_remaining=call.remaining(),
        )
        logger.debug("POST %s: %s", self._display_url, decision.reason)
        if decision.deadline:
            raise self._deadline_error(call, decision.reason, request_id=error.request_id) from error
        if not decision.retry:
            raise error
        if call.on_retry is not None:
            call.on_retry(decision)
        return decision.delay

    def _completion(self, response: httpx.Response, payload: bytes | None) -> _api.Reply:
        """The reply in a non-streamed answer (``payload``: its body, read by ``_request``)."""
        assert payload is not None, "a non-streamed answer's body is always read"
        request_id = response.headers.get("x-request-id")
        data = _api.decode_json_body(
            response.status_code,
            response.headers.get("content-type", ""),
            payload,
            request_id=request_id,
            secrets=self._secrets,
        )
        return _api.parse_completion(
            data, status=response.status_code, request_id=request_id, secrets=self._secrets
        )

    def _answer_without_stream(self, response: httpx.Response, payload: bytes) -> _api.Reply:
        """A 2xx answer to a streaming request that is not an event stream: its reply, or raise."""
        return _api.answer_without_stream(
            response.status_code,
            response.headers.get("content-type", ""),
            payload,
            request_id=response.headers.get("x-request-id"),
            secrets=self._secrets,
        )

    def _stream_core(self, response: httpx.Response, call: _Call, whole: _api.Reply | None) -> _StreamCore:
        request_id = response.headers.get("x-request-id")
        return _StreamCore(
            request_id,
            self._secrets,
            idle_limit=call.timeout.read,
            expires=call.expires,
            idle_error=lambda: self._idle_error(call, request_id),
            deadline_error=lambda: self._deadline_error(call, request_id=request_id),
            whole=whole,
        )

    def _check_clock(self, call: _Call) -> None:
        """APITimeoutError if the call's deadline has passed."""
        left = call.remaining()
        if left is not None and left <= 0:
            raise self._deadline_error(call)

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
