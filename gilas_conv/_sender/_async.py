"""AsyncSender and AsyncReplyStream: the I/O of a turn, written once.

This is the source: ``scripts/unasync.py`` generates :mod:`._sync` (Sender, ReplyStream)
from it by substitution (``async def`` -> ``def``, ``await`` dropped, ``AsyncSender`` ->
``Sender``, ``httpx.AsyncClient`` -> ``httpx.Client``, ...), so write nothing here that
reads wrongly after that, docstrings included. What truly differs between the two
(sleeping, running a blocking store call) goes through :mod:`._backend`; everything
without I/O is in :mod:`._base`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from .. import _api
from .._retry import DEFAULT_MAX_RETRIES
from ..exceptions import APIError, StreamInterrupted
from ..store import Conversation, ConversationStore, Message
from ..truncation import Policy
from ._backend import AsyncBackend
from ._base import (
    DEFAULT_DEADLINE,
    DEFAULT_TIMEOUT,
    ConversationRef,
    RetryCallback,
    StreamChunk,
    _answer,
    _Call,
    _SenderBase,
    _Turn,
)


class AsyncSender(_SenderBase):
    """Sends turns of stored conversations and stores the replies.

    ``api_key``: else ``$GILAS_API_KEY``; if neither, MissingAPIKeyError is raised here,
    before anything is stored or sent. ``base_url``: else ``$GILAS_BASE_URL``, else
    ``https://api.gilas.io/v1`` (credentials in it are never shown: reprs, errors and
    logs mask them). ``timeout``: seconds per request phase, or an ``httpx.Timeout`` for
    connect/read/write/pool separately; a stream that sends no content (only keep-alive
    comments or empty chunks) for longer than the read timeout is cut off with
    APITimeoutError. ``deadline``: seconds the whole call may take, retries and the waits
    between them included (default :data:`DEFAULT_DEADLINE`, 600; None: no deadline); when
    it passes, APITimeoutError names it (its ``deadline`` attribute is set), a retry whose
    wait would pass it is not made, and a stream under way is cut off like any other
    (what arrived is stored as incomplete). The deadline is checked whenever data arrives
    and before each attempt, and no read waits longer than the time left when its attempt
    began. ``max_retries``: retries of a failed request. ``on_retry``: called with each
    :class:`~gilas_conv.sender.RetryDecision` to retry (its ``delay``, ``reason``,
    ``server_asked``), before the wait: a plain function, called on the caller's thread
    (for AsyncSender, on the event loop: it must not block). ``policy``: what to do with
    history that does not fit the window, ``"truncate"`` (drop the oldest turns) or
    ``"summarize"`` (send a stored summary of them, made with an extra request when needed;
    see :mod:`gilas_conv.truncation`). Each call may override ``timeout``, ``deadline``
    (``math.inf``: none for this call), ``max_retries``, ``on_retry`` and ``policy``.

    One connection pool per sender, kept alive between turns; ``async with AsyncSender(...)
    as s`` or :meth:`aclose` closes it. ``max_connections``: its size (default
    :data:`DEFAULT_MAX_CONNECTIONS`, 100). A streamed turn holds a connection until its
    reply ends, so this is how many turns run at once; further turns wait for a free
    connection, up to the pool timeout, then fail with APITimeoutError. A server that runs
    many turns through one sender sets it to the concurrent turns it allows (e.g. 300 for
    300 open streams) and keeps the database pool in step (``ConversationStore(pool_size=)``).
    ``http_client``: use this ``httpx.AsyncClient`` instead (it is not closed here;
    ``timeout`` still applies per request; its own limits apply, so not with
    ``max_connections``); ``transport``: an httpx transport for the sender's own client (tests).
    """

    def __init__(
        self,
        store: ConversationStore,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        deadline: float | None = DEFAULT_DEADLINE,
        max_retries: int = DEFAULT_MAX_RETRIES,
        on_retry: RetryCallback | None = None,
        policy: Policy = "truncate",
        max_connections: int | None = None,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            store,
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            policy=policy,
            deadline=deadline,
            on_retry=on_retry,
            max_connections=max_connections,
            http_client=http_client,
        )
        if http_client is not None and transport is not None:
            raise ValueError("pass http_client or transport, not both")
        self._owns_client = http_client is None
        self._client = http_client or httpx.AsyncClient(
            transport=transport, timeout=self.timeout, limits=self._limits()
        )

    async def aclose(self) -> None:
        """Close the connection pool (not a client passed as ``http_client``)."""
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
        owner: str | None = None,
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        deadline: float | None = None,
        on_retry: RetryCallback | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> Message:
        """Store ``content`` as a user message, send the turn, store and return the reply.

        ``conversation`` is an id, looked up for ``owner`` (a conversation of another owner
        is not found: ConversationNotFound, nothing stored), or a :class:`Conversation`
        handle, used as it is. ``params`` are chat-completions parameters (``model``
        overrides the conversation's; ``None`` values are not sent). ``context_limit`` caps
        the window (not sent). See :mod:`gilas_conv.sender` for what is stored when.
        """
        call = self._call(
            params,
            max_retries=max_retries,
            timeout=timeout,
            deadline=deadline,
            on_retry=on_retry,
            context_limit=context_limit,
            policy=policy,
        )
        return await self._complete(conversation, content, call, owner=owner)

    async def retry(
        self,
        conversation: ConversationRef,
        *,
        owner: str | None = None,
        messages: Sequence[Mapping[str, Any]] = (),
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        deadline: float | None = None,
        on_retry: RetryCallback | None = None,
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
            params,
            max_retries=max_retries,
            timeout=timeout,
            deadline=deadline,
            on_retry=on_retry,
            context_limit=context_limit,
            policy=policy,
        )
        return await self._complete(conversation, _answer(messages), call, owner=owner)

    async def stream(
        self,
        conversation: ConversationRef,
        content: Any,
        *,
        owner: str | None = None,
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        deadline: float | None = None,
        on_retry: RetryCallback | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> AsyncReplyStream:
        """Like :meth:`send`, but the reply streams: iterate the returned :class:`AsyncReplyStream`.

        The user message is stored and the request made (with retries) before this returns,
        so errors such as AuthenticationError are raised here.
        """
        call = self._call(
            params,
            max_retries=max_retries,
            timeout=timeout,
            deadline=deadline,
            on_retry=on_retry,
            context_limit=context_limit,
            policy=policy,
        )
        return await self._open_stream(conversation, content, call, owner=owner)

    async def stream_retry(
        self,
        conversation: ConversationRef,
        *,
        owner: str | None = None,
        messages: Sequence[Mapping[str, Any]] = (),
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = None,
        deadline: float | None = None,
        on_retry: RetryCallback | None = None,
        context_limit: int | None = None,
        policy: Policy | None = None,
        **params: Any,
    ) -> AsyncReplyStream:
        """:meth:`retry`, streamed (started before it returns, like :meth:`stream`)."""
        call = self._call(
            params,
            max_retries=max_retries,
            timeout=timeout,
            deadline=deadline,
            on_retry=on_retry,
            context_limit=context_limit,
            policy=policy,
        )
        return await self._open_stream(conversation, _answer(messages), call, owner=owner)

    async def _prepare_turn(
        self, conversation: ConversationRef, content: Any, call: _Call, *, owner: str | None, stream: bool
    ) -> _Turn:
        """Store the user message, then plan the context; each summary the plan asks for is
        requested between two blocking store calls, holding neither a database connection
        nor a worker thread, and stored before planning again."""
        # The turn holds the conversation's lease: a caller cancelled meanwhile must not keep
        # it. It is taken and first planned in one blocking call.
        turn, plan = await AsyncBackend.run_claiming(
            self._abandon_started, self._start, conversation, content, call, owner=owner, stream=stream
        )
        try:
            covered = 0
            while not isinstance(plan, _Turn):
                covered = self._check_progress(plan, covered)
                response, payload = await self._request(self._summary_body(plan), stream=False, call=call)
                reply = self._completion(response, payload)
                await AsyncBackend.run_blocking(self._save_summary, turn, plan, reply)
                plan = await AsyncBackend.run_blocking(self._plan, turn, call, stream=stream)
            return plan
        except BaseException:
            # Planning or a summary failed: no request goes out, the conversation is freed.
            await AsyncBackend.run_blocking(self._abandon, turn)
            raise

    async def _complete(
        self, conversation: ConversationRef, content: Any, call: _Call, *, owner: str | None
    ) -> Message:
        """The turn of send() and retry(): prepared, requested, its reply stored."""
        turn = await self._prepare_turn(conversation, content, call, owner=owner, stream=False)
        try:
            response, payload = await self._request(turn.body, stream=False, call=call)
            reply = self._completion(response, payload)
        except BaseException:
            # No reply to store: free the conversation (a worker thread runs to its end even
            # if this task is cancelled again).
            await AsyncBackend.run_blocking(self._abandon, turn)
            raise
        return await AsyncBackend.run_blocking(self._store_reply, turn, reply, status="complete")

    async def _open_stream(
        self, conversation: ConversationRef, content: Any, call: _Call, *, owner: str | None
    ) -> AsyncReplyStream:
        """The turn of stream() and stream_retry(): prepared, requested, its stream started."""
        turn = await self._prepare_turn(conversation, content, call, owner=owner, stream=True)
        try:
            response, payload = await self._request(turn.body, stream=True, call=call)
            whole = None
            if payload is not None:  # the server answered with JSON, not a stream
                whole = self._answer_without_stream(response, payload)
        except BaseException:
            await AsyncBackend.run_blocking(self._abandon, turn)
            raise
        return AsyncReplyStream(self, turn, response, call, whole)

    async def _sleep(self, seconds: float) -> None:
        await AsyncBackend.sleep(seconds)

    async def _read_body(self, response: httpx.Response, call: _Call) -> bytes:
        """The whole body, the deadline checked as it arrives; the response is closed."""
        pieces = []
        try:
            async for piece in response.aiter_bytes():
                pieces.append(piece)
                self._check_clock(call)
        finally:
            await response.aclose()
        return b"".join(pieces)

    async def _request(
        self, body: dict[str, Any], *, stream: bool, call: _Call
    ) -> tuple[httpx.Response, bytes | None]:
        """POST with retries, within the call's deadline: the 2xx response and its body, or
        raise. A streaming request's event stream is returned open, with None for the body."""
        retries_done = 0
        while True:
            request = self._build_request(body, stream=stream, call=call)
            headers = None
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as err:
                error: APIError = self._connection_error(err, call)
            else:
                if (
                    response.is_success
                    and stream
                    and _api.is_event_stream(response.headers.get("content-type", ""))
                ):
                    return response, None
                try:
                    payload = await self._read_body(response, call)
                except httpx.HTTPError as err:
                    if response.is_success:
                        error = self._connection_error(err, call)
                    else:
                        error = self._status_error(response, b"")
                        headers = response.headers
                else:
                    if response.is_success:
                        return response, payload
                    error, headers = self._status_error(response, payload), response.headers
            delay = self._retry_delay(error, call, retries_done=retries_done, headers=headers)
            await self._sleep(delay)
            retries_done += 1


class AsyncReplyStream:
    """A streamed reply, already started: ``async for chunk in stream`` gives :class:`StreamChunk` values.

    When the stream ends the reply is stored and available as :attr:`message`; see the
    :mod:`gilas_conv.sender` for a stream that is cut off or closed early. Close it at a known
    point: read it to the end, leave its ``async with`` block (also by breaking out of the
    loop inside it), or call :meth:`aclose`; each stores what arrived. A stream that is
    garbage-collected unclosed stores nothing and gives a ResourceWarning.
    """

    def __init__(
        self,
        sender: AsyncSender,
        turn: _Turn,
        response: httpx.Response,
        call: _Call,
        whole: _api.Reply | None = None,
    ) -> None:
        self._sender = sender
        self._turn = turn
        self._response = response
        self._call = call
        self._core = sender._stream_core(response, call, whole)
        self._bytes: Any = response.aiter_bytes()
        self._ended = whole is not None  # a reply that came whole was read already
        self._cause: APIError | None = None
        self._settled = False
        self._renewed_at = time.monotonic()  # when the turn's lease was taken or last renewed
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

    def __aiter__(self) -> AsyncReplyStream:
        return self

    async def __anext__(self) -> StreamChunk:
        while True:
            if self._core.ready:
                return self._core.ready.popleft()
            if self._settled:
                raise StopAsyncIteration
            if self._ended or self._core.error is not None:
                await self._settle(closed=False)
                continue
            try:
                data = await self._bytes.__anext__()
            except StopAsyncIteration:
                self._core.eof()
                self._ended = True
            except httpx.HTTPError as err:
                self._cause = self._sender._connection_error(err, self._call)
                self._ended = True
            else:
                self._core.feed(data)
                self._core.check_clock()
                if self._sender._renewal_due(self._renewed_at):
                    self._renewed_at = time.monotonic()
                    await AsyncBackend.run_blocking(self._sender._renew, self._turn)

    async def final_message(self) -> Message | None:
        """Read the rest of the stream and return the stored reply."""
        async for _ in self:
            pass
        return self.message

    async def aclose(self) -> None:
        """Stop reading; what arrived so far is stored (as incomplete unless finished)."""
        if not self._settled:
            await self._settle(closed=True)

    async def __aenter__(self) -> AsyncReplyStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Storing from here would write to the database at whatever moment the collector
        # runs (on another thread's time, or with no event loop left): only warn.
        if getattr(self, "_settled", True):
            return
        warnings.warn(
            f"unclosed stream of conversation {self._turn.conversation.id}: its reply was not "
            "stored; use `async with` or aclose()",
            ResourceWarning,
            stacklevel=1,  # called by the collector: no caller of ours to point at
            source=self,
        )

    async def _settle(self, *, closed: bool) -> None:
        self._settled = True
        try:
            outcome = self._core.settle(cause=self._cause, closed=closed)
        finally:
            await self._bytes.aclose()
            await self._response.aclose()
        if outcome.status is not None:
            assert outcome.reply is not None
            self.message = await AsyncBackend.run_blocking(
                self._sender._store_reply, self._turn, outcome.reply, status=outcome.status
            )
        else:
            await AsyncBackend.run_blocking(self._sender._abandon, self._turn)
        if outcome.error is not None:
            if self.message is None:
                raise outcome.error
            raise StreamInterrupted(self.message, outcome.reason) from outcome.error
