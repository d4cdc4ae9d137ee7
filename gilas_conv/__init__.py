"""gilas-conv: persistent conversation memory for stateless chat-completions APIs.

Store every message (SQLite by default, Postgres at scale), count prompt tokens exactly as
the API bills them, send each turn with the history trimmed to the model's window, and
store the reply: nothing lost, nothing stored twice.
"""

from . import exceptions
from ._prices import Prices, load_prices
from ._version import __version__
from .exceptions import *  # noqa: F403  (the whole exception tree is public: exceptions.__all__)
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
    "AsyncReplyStream",
    "AsyncSender",
    "Context",
    "Conversation",
    "ConversationStore",
    "Message",
    "ModelInfo",
    "ModelRegistry",
    "Prices",
    "ReplyStream",
    "Sender",
    "StreamChunk",
    "Summary",
    "SummaryRequest",
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
# and the whole exception tree, as exceptions.__all__ names it
__all__ += exceptions.__all__
