"""The conversation store: every message of every conversation, on SQLite or Postgres.

This package owns persistence: every SQL statement gilas-conv runs is here, transactions
open in one place (:mod:`._tx`) where database errors are translated, and the other
modules get rows or values, never a connection.

Layout
    ``_store``     :class:`ConversationStore` and the :class:`Conversation` handle
    ``_values``    the immutable values handed out (:class:`Message`, :class:`Summary`)
    ``_validate``  checks of everything written or looked up (pure; run before a transaction;
                   :func:`validate_message` checks a message as an append would)
    ``_io``        import: export data checked and turned into rows
    ``_tx``        the one transaction context and error translation
    ``_schema``    the tables (SQLAlchemy models; Alembic migrations build exactly these)
    ``_engine``    engines configured per backend (SQLite pragmas, the Postgres driver)
    ``_migrate``   running the shipped Alembic migrations (:func:`upgrade_database`, ...)
    ``_keys``      the gateway's client keys (:class:`APIKeys`; hashes only)
    ``_usage``     the usage ledger, its reports, quotas (limits, reservations, periods)
    ``_window``    the planner's reader: anchors, newest rows, ranges, recount write-back
                   (:class:`WindowReader`, opened by :meth:`Conversation.read_window`)
"""

from ._keys import APIKey, APIKeys
from ._migrate import current_revision, downgrade_database, head_revision, upgrade_database
from ._store import Conversation, ConversationStore, Deletion, Role

# The gateway's turn after a reply (``ConversationStore._take_turn``'s ``after_reply``);
# not public either.
from ._store import NotAfterReply as NotAfterReply

# The quota side of the turn protocol (``ConversationStore._take_turn``), for the senders;
# not part of the public API, so not in __all__.
from ._usage import DEFAULT_QUOTA_RESERVATION as DEFAULT_QUOTA_RESERVATION
from ._usage import QuotaAsk as QuotaAsk
from ._usage import QuotaLimits, QuotaStatus, Reservation, UsageRow
from ._validate import _validate_message as validate_message
from ._values import Message, Summary, openai_message

# The planner's rows (gilas_conv.truncation); not public either.
from ._window import Entry as Entry
from ._window import WindowReader, WindowRow

__all__ = [
    "APIKey",
    "APIKeys",
    "Conversation",
    "ConversationStore",
    "Deletion",
    "Message",
    "QuotaLimits",
    "QuotaStatus",
    "Reservation",
    "Role",
    "Summary",
    "UsageRow",
    "WindowReader",
    "WindowRow",
    "current_revision",
    "downgrade_database",
    "head_revision",
    "openai_message",
    "upgrade_database",
    "validate_message",
]
