"""The exceptions gilas-conv raises, one tree with one root.

    GilasConvError                  anything this library raises on purpose
    ├── ConfigurationError          a setting is missing or malformed (names the variable)
    │   └── MissingAPIKeyError      GILAS_API_KEY is not set; raised before anything is stored
    ├── StoreError                  the conversation store
    │   ├── ConversationNotFound    no such conversation for this owner (also a KeyError)
    │   ├── ConversationBusy        another request is answering this conversation right now
    │   ├── MessageNotFound         no message with that seq in the conversation
    │   ├── SchemaOutOfDate         the database schema is missing or behind: run `gilas-conv db upgrade`
    │   └── StoreIntegrityError     the database refused a write (constraint, lost connection)
    ├── ContextWindowExceeded       even the minimal context does not fit the model's window
    ├── QuotaExceeded               the owner's token or cost limit would be passed; nothing sent or stored
    ├── StreamInterrupted           a streamed reply was cut off; what arrived is stored as incomplete
    └── APIError                    talking to the chat-completions API
        ├── APIConnectionError      the request never got an answer
        │   └── APITimeoutError     ... because it timed out
        ├── APIResponseValidationError  a 2xx answer that is not a valid completion, or not JSON
        └── APIStatusError          a 4xx/5xx answer (status, request id, the API's message/type/code)
            ├── BadRequestError         400 (``is_context_length_error`` tells the window overflow apart)
            ├── AuthenticationError     401
            ├── PermissionDeniedError   403
            ├── NotFoundError           404
            ├── ConflictError           409
            ├── UnprocessableEntityError 422
            ├── RateLimitError          429
            └── InternalServerError     5xx

``ValueError`` (not part of the tree) is raised for malformed arguments: an unknown role, a
non-string content, a lone surrogate. Nothing is written when any of these is raised.

Foreign exceptions (SQLAlchemy, httpx) are translated where they cross into this library and
chained with ``raise ... from err``, so the original cause is always kept on ``__cause__``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "ContextWindowExceeded",
    "ConversationBusy",
    "ConversationNotFound",
    "GilasConvError",
    "InternalServerError",
    "MessageNotFound",
    "MissingAPIKeyError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceeded",
    "RateLimitError",
    "SchemaOutOfDate",
    "StoreError",
    "StoreIntegrityError",
    "StreamInterrupted",
    "UnprocessableEntityError",
]


class GilasConvError(Exception):
    """Base class of every error gilas-conv raises on purpose."""


class ConfigurationError(GilasConvError):
    """A required setting is missing or malformed; the message names it and how to set it."""


class MissingAPIKeyError(ConfigurationError):
    """No API key was given and ``GILAS_API_KEY`` is not set."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "GILAS_API_KEY is not set; get a key from your Gilas dashboard "
            "(https://gilas.io) and run: export GILAS_API_KEY=..."
        )


class StoreError(GilasConvError):
    """Base class of the conversation store's errors."""


class ConversationNotFound(StoreError, KeyError):
    """No conversation with this id is visible to this owner."""

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        super().__init__(f"conversation not found: {conversation_id!r}")

    def __str__(self) -> str:  # KeyError would quote the whole message again
        return str(self.args[0])


class ConversationBusy(StoreError):
    """Another request holds the conversation's turn lease: it is answering right now.

    Raised before anything of the refused request is stored or sent. ``expires_at`` is when
    the other request's lease runs out if it never finishes (its process died), or None.
    """

    def __init__(self, conversation_id: str, *, expires_at: object = None) -> None:
        self.conversation_id = conversation_id
        self.expires_at = expires_at
        super().__init__(
            f"conversation {conversation_id!r} is busy: another request is answering it; "
            "try again when that one finishes"
        )


class MessageNotFound(StoreError, KeyError):
    """The conversation has no message with this sequence number."""

    def __init__(self, conversation_id: str, seq: int) -> None:
        self.conversation_id = conversation_id
        self.seq = seq
        super().__init__(f"conversation {conversation_id!r} has no message with seq {seq}")

    def __str__(self) -> str:
        return str(self.args[0])


class SchemaOutOfDate(StoreError):
    """The database's schema is missing or older than this version of gilas-conv."""

    def __init__(self, url: str, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        where = "has no gilas-conv schema" if current is None else f"is at revision {current}"
        super().__init__(
            f"the database {url} {where}, but this gilas-conv needs revision {head}; "
            f"run `gilas-conv db upgrade --db '{url}'` (or gilas_conv.upgrade_database(url))"
        )


class StoreIntegrityError(StoreError):
    """The database refused or lost a write; nothing of the failed call was stored."""


class QuotaExceeded(GilasConvError):
    """The request would take its owner past a quota limit; nothing was sent or stored.

    ``owner`` (None: the unowned scope), ``period`` (``"day"`` or ``"month"``), ``unit``
    (``"tokens"``, or the currency of a cost limit), ``limit``, ``used`` (the period's
    recorded usage plus the reservations of requests in flight), ``requested`` (this
    request's reservation) and ``resets_at`` (an aware datetime: the next period boundary
    in the store's quota time zone).
    """

    def __init__(
        self,
        *,
        owner: str | None,
        period: str,
        unit: str,
        limit: Any,
        used: Any,
        requested: Any,
        resets_at: dt.datetime,
    ) -> None:
        self.owner = owner
        self.period = period
        self.unit = unit
        self.limit = limit
        self.used = used
        self.requested = requested
        self.resets_at = resets_at
        who = f"owner {owner!r}" if owner is not None else "the unowned scope"
        super().__init__(
            f"{'daily' if period == 'day' else 'monthly'} quota of {who} reached: {used} of "
            f"{limit} {unit} used, this request needs {requested}; it resets at "
            f"{resets_at.isoformat(timespec='minutes')}"
        )


class ContextWindowExceeded(GilasConvError):
    """Even the minimal context (system messages plus the newest user turn) does not fit.

    ``needed`` is the number of prompt tokens that minimal context takes, tool definitions
    and reply priming included; ``available`` is the most the prompt may take: the context
    limit minus the tokens reserved for the reply.
    """

    def __init__(self, needed: int, available: int, *, model: str | None = None) -> None:
        self.needed = needed
        self.available = available
        self.model = model
        for_model = f" for {model}" if model else ""
        super().__init__(
            f"the conversation needs at least {needed} prompt tokens but only {available} are "
            f"available{for_model}; raise the context limit, lower max_tokens, or shorten "
            "the system message or the newest message"
        )


class StreamInterrupted(GilasConvError):
    """A streamed reply ended before the API finished it.

    What arrived was stored as an incomplete message, available as ``message``;
    ``__cause__`` holds the network error, if any.
    """

    def __init__(self, message_obj: object, reason: str) -> None:
        self.message = message_obj
        self.reason = reason
        super().__init__(f"the streamed reply was cut off ({reason}); the part received is stored")


class APIError(GilasConvError):
    """Base class of errors talking to the chat-completions API."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class APIConnectionError(APIError):
    """The request could not be sent or its answer not received."""


class APITimeoutError(APIConnectionError):
    """The request timed out: a phase of it (connecting, a read, a free connection), a
    stream that sent no content for longer than the read timeout, or the call's overall
    deadline. ``deadline`` is that deadline in seconds when it was the cause, else None."""

    def __init__(self, message: str, *, request_id: str | None = None, deadline: float | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.deadline = deadline


class APIResponseValidationError(APIError):
    """The API answered with a success status but a body that is not a valid completion."""

    def __init__(
        self, message: str, *, status_code: int, body: str | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code
        self.body = body


class APIStatusError(APIError):
    """The API answered with an error status (4xx or 5xx).

    ``retry_after``: the answer's ``Retry-After`` header, when it had one (the gateway
    passes it on to its clients).
    """

    retry_after: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        request_id: str | None = None,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        body: object = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code
        self.error_type = error_type
        self.code = code
        self.param = param
        self.body = body

    def __str__(self) -> str:
        extra = f", request id {self.request_id}" if self.request_id else ""
        return f"HTTP {self.status_code}: {self.message}{extra}"


class BadRequestError(APIStatusError):
    """400: the API rejected the request."""

    @property
    def is_context_length_error(self) -> bool:
        """True when the API said the prompt does not fit the model's context window."""
        text = f"{self.code or ''} {self.error_type or ''} {self.message}".lower()
        return "context_length" in text or "context length" in text or "maximum context" in text


class AuthenticationError(APIStatusError):
    """401: the API key was refused."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not use this model or endpoint."""


class NotFoundError(APIStatusError):
    """404: unknown model or endpoint (check the base URL)."""


class ConflictError(APIStatusError):
    """409."""


class UnprocessableEntityError(APIStatusError):
    """422."""


class RateLimitError(APIStatusError):
    """429: too many requests or tokens; retried automatically up to ``max_retries``."""


class InternalServerError(APIStatusError):
    """5xx."""
