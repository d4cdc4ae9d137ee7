"""Sending a conversation's next turn to a chat-completions API and storing the reply.

:class:`Sender` (on ``httpx.Client``) and :class:`AsyncSender` (on ``httpx.AsyncClient``)
do the same thing, with the same options, methods and behaviour; AsyncSender's are awaited
(``stream = await sender.stream(...)``, then ``async with stream:`` / ``async for``). They
are written once: ``gilas_conv/_sender/_async.py`` is the source and ``_sync.py`` is
generated from it by ``scripts/unasync.py``. What is sent, whether and when to retry, how a
stream is decoded and assembled and what is stored lives in pure helpers (``_api``,
``_retry``, ``_sse``) and in ``_sender/_base.py``. AsyncSender makes its store calls (and
chooses the context) in worker threads, so the event loop never waits on the database and
any number of turns of different conversations may run at once in one loop.

``owner``
    Every call takes ``owner=``: a conversation id is looked up for that owner (the
    default ``None`` is its own scope, not a wildcard), so a conversation of another owner
    raises :class:`~gilas_conv.ConversationNotFound` and nothing is stored. A
    :class:`~gilas_conv.Conversation` handle is used as it is, with its own owner.

One turn, step by step (``send``)
    1. The parameters are checked; a bad one raises ValueError and nothing is stored.
    2. The user message is stored.
    3. The context is planned from the stored history by
       :func:`gilas_conv.truncation.plan_context` (``context_limit=`` overrides the
       model's window; it is not sent). Turns that do not fit are dropped, or with
       ``policy="summarize"`` replaced by a stored summary: when the plan asks for one,
       the sender requests it from the same API (with no database connection open and,
       for AsyncSender, no worker thread waiting), stores it with the request's usage
       and plans again. If even the newest turn does not fit,
       :class:`~gilas_conv.ContextWindowExceeded` is raised and nothing is sent.
    4. ``POST {base_url}/chat/completions``, retried on 408/409/429/5xx and connection
       errors (see :mod:`gilas_conv._retry`); other errors raise at once. ``on_retry``
       hears of each wait before it starts. The whole call, summaries, retries and waits
       included, runs within ``deadline`` (see :class:`Sender`).
    5. The reply is stored with the API's response id, model, finish reason and usage,
       ``predicted_prompt_tokens`` (our count before sending) and ``reply_to`` (the seq of
       the user message it answers), and returned.

If anything fails after step 2, the user message stays stored, unanswered, and the error
is raised: ``retry`` answers it later, and a next ``send`` replays it as part of
the history before the new message.

One request answers a conversation at a time: step 2 takes the conversation's turn lease
(in the database, so it holds across processes and hosts) and storing the reply releases
it; a failed request releases it too. A second ``send``, ``stream`` or ``retry`` on the
conversation meanwhile raises :class:`~gilas_conv.ConversationBusy` and stores nothing.

Streams (``stream``)
    Chunks are yielded as they arrive; the reply is stored when the stream ends. A stream
    is finished when the API sends ``[DONE]`` or a ``finish_reason``; one that stops
    before that was cut off, even if the connection closed cleanly. Then what arrived is
    stored with status ``"incomplete"`` (never replayed by default) and
    :class:`~gilas_conv.StreamInterrupted` is raised. Closing a stream early (``close()``,
    or leaving its ``with`` block, also by breaking out of the loop inside it) stores what
    arrived the same way, quietly ("what arrived" is everything read from the network so
    far, which may run a chunk or two ahead of what the loop consumed; if the whole reply
    had arrived it is stored as complete). When nothing of the reply arrived, nothing is
    stored and the error itself (e.g. :class:`~gilas_conv.APIConnectionError`) is raised.
    A stream that sends no content for longer than the read timeout (keep-alive comments
    and empty chunks do not count), or that runs past the call's deadline, is cut off the
    same way (the cause is an :class:`~gilas_conv.APITimeoutError`). A streaming request
    answered with a JSON completion gives that reply as the stream's one chunk; answered
    with a JSON error object, it raises that error with the API's message.
    Requests are retried only until the response headers arrive, never in the middle of a
    stream. ``stream()`` stores the user message and makes the request before it returns
    (errors such as AuthenticationError are raised there) and returns a started stream.
    A stream that is garbage-collected without being closed or read to the end stores
    nothing (no database write happens at a moment the collector picks) and gives a
    ``ResourceWarning``: use ``with`` (``async with``) or ``close()`` (``aclose()``).

``n > 1``
    Choice 0 is the reply that is stored and replayed; the other choices are kept in the
    stored message's ``extra["choices"]``, each as the API sent it (with its ``index``).

The API key is only ever put in the ``Authorization`` header: it is scrubbed from error
messages and bodies, and appears in no log line, repr or stored row. Credentials in the
base URL (``http://user:secret@host/v1``) are sent, but shown masked everywhere: reprs,
errors and log lines use :func:`gilas_conv._config.redact_url`'s form.
"""

from __future__ import annotations

from ._retry import RetryDecision
from ._sender._async import AsyncReplyStream, AsyncSender
from ._sender._base import (
    DEFAULT_DEADLINE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
    StreamChunk,
    pending_reply_to,
)
from ._sender._sync import ReplyStream, Sender

__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_TIMEOUT",
    "AsyncReplyStream",
    "AsyncSender",
    "ReplyStream",
    "RetryDecision",
    "Sender",
    "StreamChunk",
    "pending_reply_to",
]

# Shown where they are imported from (help(), reprs of the classes, tracebacks' readers).
for _public in (AsyncReplyStream, AsyncSender, ReplyStream, Sender, StreamChunk, pending_reply_to):
    _public.__module__ = __name__
del _public
