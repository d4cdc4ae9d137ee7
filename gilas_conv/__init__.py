"""gilas-conv: persistent conversation memory for stateless chat-completions APIs.

Store every message (SQLite by default, Postgres at scale), count prompt tokens exactly as
the API bills them, send each turn with the history trimmed to the model's window, and
store the reply: nothing lost, nothing stored twice.
"""

from ._migrate import downgrade_database, head_revision, upgrade_database
from .exceptions import (
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
    GilasConvError,
    InternalServerError,
    MessageNotFound,
    MissingAPIKeyError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    SchemaOutOfDate,
    StoreError,
    StoreIntegrityError,
    StreamInterrupted,
    UnprocessableEntityError,
)
from .store import Conversation, ConversationStore, Message, Summary

__version__ = "0.1.0"

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
    "Conversation",
    "ConversationNotFound",
    "ConversationStore",
    "GilasConvError",
    "InternalServerError",
    "Message",
    "MessageNotFound",
    "MissingAPIKeyError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "SchemaOutOfDate",
    "StoreError",
    "StoreIntegrityError",
    "StreamInterrupted",
    "Summary",
    "UnprocessableEntityError",
    "__version__",
    "downgrade_database",
    "head_revision",
    "upgrade_database",
]
