"""gilas-conv: persistent conversation memory for stateless chat-completions APIs.

Store every message (SQLite by default, Postgres at scale), count prompt tokens exactly as
the API bills them, send each turn with the history trimmed to the model's window, and
store the reply: nothing lost, nothing stored twice.
"""

from ._prices import Prices, load_prices
from ._version import __version__
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
    ConversationBusy,
    ConversationNotFound,
    GilasConvError,
    InternalServerError,
    MessageNotFound,
    MissingAPIKeyError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceeded,
    RateLimitError,
    SchemaOutOfDate,
    StoreError,
    StoreIntegrityError,
    StreamInterrupted,
    UnprocessableEntityError,
)
from .sender import AsyncReplyStream, AsyncSender, ReplyStream, Sender, StreamChunk
from .store import (
    Conversation,
    ConversationStore,
    Message,
    Summary,
    downgrade_database,
    head_revision,
    upgrade_database,
)
from .tokens import ModelInfo, ModelRegistry, count_tokens, get_model_info
from .truncation import Context, SummaryRequest, build_context, conversation_tokens

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncReplyStream",
    "AsyncSender",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "Context",
    "ContextWindowExceeded",
    "Conversation",
    "ConversationBusy",
    "ConversationNotFound",
    "ConversationStore",
    "GilasConvError",
    "InternalServerError",
    "Message",
    "MessageNotFound",
    "MissingAPIKeyError",
    "ModelInfo",
    "ModelRegistry",
    "NotFoundError",
    "PermissionDeniedError",
    "Prices",
    "QuotaExceeded",
    "RateLimitError",
    "ReplyStream",
    "SchemaOutOfDate",
    "Sender",
    "StoreError",
    "StoreIntegrityError",
    "StreamChunk",
    "StreamInterrupted",
    "Summary",
    "SummaryRequest",
    "UnprocessableEntityError",
    "__version__",
    "build_context",
    "conversation_tokens",
    "count_tokens",
    "downgrade_database",
    "get_model_info",
    "head_revision",
    "load_prices",
    "upgrade_database",
]
