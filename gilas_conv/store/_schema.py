"""The database schema, as SQLAlchemy 2.0 typed models. Alembic migrations build exactly this.

Data model
----------
``conversations``
    One row per conversation. ``id`` is a random UUID4 string. ``last_seq`` is the
    sequence number of the newest message: an append increments it with one
    ``UPDATE ... RETURNING``, which also takes the row lock that serializes concurrent
    appends to the same conversation (on Postgres the row lock, on SQLite the write lock),
    so sequence numbers are contiguous and unique without retries. ``owner`` scopes every
    lookup; ``NULL`` is the "no owner" scope, not a wildcard. ``lease_token`` and
    ``lease_expires_at`` are the turn lease: set while one request is answering the
    conversation, so that a second one is refused instead of interleaving its turn (see
    ``ConversationStore._begin_turn``). A lease past its expiry is free: its holder crashed.
    ``tokens_total`` is the running sum of its messages' ``tokens`` as appended (see
    ``messages.tokens_total``), advanced by the same ``UPDATE`` that numbers a message.

``messages``
    One row per message, keyed by ``(conversation_id, seq)``. Every query filters on
    ``conversation_id`` and every key and index leads with it, so both tables can be
    distributed by conversation id (Citus, YugabyteDB) without a redesign. ``content``
    is JSON: a string, a list of content parts, or SQL NULL (an assistant message that
    only calls tools). JSON text escapes U+0000, so content containing NUL round-trips
    on Postgres, whose TEXT type rejects it. ``tokens`` is the message's prompt-token
    cost under ``tokens_encoding`` (per-message overhead included), computed once at
    append and recomputed lazily when the conversation moves to another encoding.
    ``tokens_total`` is the running total of ``tokens`` up to and including this message, as
    they were when it was appended (the conversation's ``tokens_total`` after the append):
    with the index on ``(conversation_id, tokens_total)`` the window reader finds in one
    seek where the newest N tokens begin. It is a hint for how far to read, never trusted
    for what is sent: a recount or a deleted message leaves it stale, and that only changes
    how many rows are read.
    ``status`` is ``complete`` or ``incomplete`` (a streamed reply that was cut off).
    API bookkeeping for replies: ``response_id`` (the server's label for the completion,
    not a key: servers do reuse ids, so two replies may share one), ``model``, ``finish_reason``, ``usage``
    and ``predicted_prompt_tokens`` (what we counted before sending, kept beside
    ``usage.prompt_tokens`` so the counting error stays visible). ``extra`` keeps
    anything else worth keeping (other choices when n > 1).

``api_keys``
    The gateway's client keys (``gilas-conv keys``): one row per key, naming the
    ``owner`` whose conversations the key reaches. Only the SHA-256 of a key is stored
    (``key_hash``, looked up directly: a key is 256 random bits, so its hash needs no
    constant-time comparison), beside a short ``prefix`` of the key for people to tell
    keys apart. ``revoked_at`` set: the key no longer works.

``summaries``
    Stored summaries of dropped history: each covers messages ``from_seq``..``to_seq``
    of one conversation. The originals are never deleted.

``usage_events``
    The usage ledger: one row per API request whose usage was reported (a reply, or a
    summary request of the summarize policy), with owner, conversation, model, kind
    (``reply``/``summary``), prompt/completion/total/cached tokens and, when a price was
    known at record time, its ``cost_micros`` (millionths of ``currency``: an integer, so
    sums are exact). No foreign key and no content: deleting a conversation keeps the
    spending it caused, and nothing the user wrote. Reports read it through its
    ``(owner, created_at)`` and ``(created_at)`` indexes, never the messages.

``usage_rollup``
    The ledger's ``total_tokens`` and ``cost_micros`` (NULL counted as 0) summed per owner
    (``owner``; the empty string, never a valid owner name, for no owner) and UTC bucket:
    ``start_minute`` is the bucket's start in minutes since the Unix epoch, ``span_minutes``
    its length, 1440 (UTC day), 60 (hour) or 15 (quarter hour). Every ledger row is added
    to its three buckets by one upsert in the transaction that inserts it, so the table is
    always the ledger summed, and a quota check reads at most a few dozen rows whatever
    the owner spent: a period of the quota time zone (it starts on a quarter hour in every
    zone in use) is covered by whole UTC days, then hours, then quarter hours at its ends.
    UTC buckets do not depend on the configured zone, so changing it rewrites nothing.
    Reports still read ``usage_events``.

``quota_limits``
    Token and cost limits per day and per month, one row per owner; the row whose
    ``owner`` is the empty string (never a valid owner name) is the default for owners
    without their own.

``quota_reservations``
    Quota held by requests in flight: taken before a request is sent, deleted in the
    transaction that writes the reply's ledger row (or when the request fails); a row past
    ``expires_at`` (its process died) no longer counts.

``settings``
    Store-wide settings as name/value text (``quota_timezone``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ANCHOR_PREDICATE",
    "ROLES",
    "SCHEMA_REVISION",
    "STATUSES",
    "APIKeyRow",
    "Base",
    "ConversationRow",
    "MessageRow",
    "QuotaLimitRow",
    "QuotaReservationRow",
    "SettingRow",
    "SummaryRow",
    "UsageEventRow",
    "UsageRollupRow",
    "metadata",
]

# The Alembic revision these models describe: a new migration bumps it (a test checks that
# it equals the head of migrations/), so opening a store compares one string.
SCHEMA_REVISION = "0008"

# The rows every context keeps: system and developer messages and pinned ones. The partial
# index below holds exactly these; a query must repeat this predicate word for word (in
# parentheses) for SQLite to use that index instead of walking the whole conversation.
ANCHOR_PREDICATE = "role IN ('system', 'developer') OR pinned"

ROLES = ("system", "developer", "user", "assistant", "tool")
STATUSES = ("complete", "incomplete")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend.

    Postgres stores ``timestamptz``; SQLite has no time zones, so values are stored as UTC
    and handed back with ``tzinfo=UTC``. Naive datetimes are refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: gilas-conv stores timezone-aware UTC timestamps")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON()}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class ConversationRow(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    title: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(255))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON(none_as_null=True))
    last_seq: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    tokens_total: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    forked_from: Mapped[str | None] = mapped_column(String(36))
    forked_at: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    lease_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[dt.datetime | None]

    __table_args__ = (
        # "most recently active first" for one owner is a range scan of this index.
        Index(None, "owner", "updated_at"),
        CheckConstraint("last_seq >= 0", name="last_seq_nonnegative"),
    )


class MessageRow(Base):
    __tablename__ = "messages"

    conversation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    name: Mapped[str | None] = mapped_column(String(255))
    tool_calls: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    tool_call_id: Mapped[str | None] = mapped_column(String(255))
    pinned: Mapped[bool] = mapped_column(Boolean, server_default=false())
    status: Mapped[str] = mapped_column(String(16), server_default=text("'complete'"))
    tokens: Mapped[int | None] = mapped_column(Integer)
    tokens_encoding: Mapped[str | None] = mapped_column(String(64))
    tokens_total: Mapped[int | None] = mapped_column(Integer)
    response_id: Mapped[str | None] = mapped_column(String(255))
    model: Mapped[str | None] = mapped_column(String(255))
    finish_reason: Mapped[str | None] = mapped_column(String(64))
    usage: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    predicted_prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    reply_to: Mapped[int | None] = mapped_column(Integer)
    extra: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[dt.datetime]

    __table_args__ = (
        ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        CheckConstraint(_in("role", ROLES), name="role_known"),
        CheckConstraint(_in("status", STATUSES), name="status_known"),
        CheckConstraint("seq >= 1", name="seq_positive"),
        CheckConstraint("role <> 'tool' OR tool_call_id IS NOT NULL", name="tool_has_call_id"),
        # The messages every context keeps (system/developer and pinned ones), found
        # without walking the history: a partial index holding only those rows.
        Index(
            "ix_messages_anchor",
            "conversation_id",
            "seq",
            postgresql_where=text(ANCHOR_PREDICATE),
            sqlite_where=text(ANCHOR_PREDICATE),
        ),
        # Where the newest N tokens of a conversation begin, in one seek (the window reader).
        Index(None, "conversation_id", "tokens_total"),
        # Finds the replies carrying a response id, to tell a repeated append of the same
        # reply from a new reply that happens to reuse the id. Not unique: the id is the
        # server's label, and servers reuse them.
        Index(
            "ix_messages_response",
            "conversation_id",
            "response_id",
            postgresql_where=text("response_id IS NOT NULL"),
            sqlite_where=text("response_id IS NOT NULL"),
        ),
    )


class SummaryRow(Base):
    __tablename__ = "summaries"

    conversation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    to_seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    from_seq: Mapped[int] = mapped_column(Integer)
    content: Mapped[Any] = mapped_column(JSON)
    model: Mapped[str | None] = mapped_column(String(255))
    tokens: Mapped[int | None] = mapped_column(Integer)
    tokens_encoding: Mapped[str | None] = mapped_column(String(64))
    usage: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[dt.datetime]

    __table_args__ = (
        ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        CheckConstraint("from_seq >= 1 AND to_seq >= from_seq", name="range_valid"),
    )


class APIKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    key_hash: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]

    __table_args__ = (
        # Every request looks its key up by hash.
        Index(None, "key_hash", unique=True),
        Index(None, "owner"),
    )


# An auto-incrementing 64-bit key: BIGINT on Postgres, SQLite's INTEGER PRIMARY KEY (rowid).
_BigId = BigInteger().with_variant(Integer(), "sqlite")
USAGE_KINDS = ("reply", "summary")


class UsageEventRow(Base):
    __tablename__ = "usage_events"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    conversation_id: Mapped[str | None] = mapped_column(String(36))
    model: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    completion_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    total_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    cached_tokens: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    cost_micros: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime]

    __table_args__ = (
        # A report filters by owner and time (a quota check reads usage_rollup instead).
        Index(None, "owner", "created_at"),
        # Reports over every owner scan a time range.
        Index(None, "created_at"),
        CheckConstraint(_in("kind", USAGE_KINDS), name="kind_known"),
    )


# The bucket lengths of usage_rollup, in minutes, longest first.
ROLLUP_SPANS = (1440, 60, 15)


class UsageRollupRow(Base):
    __tablename__ = "usage_rollup"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    span_minutes: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    total_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_micros: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("span_minutes IN (1440, 60, 15)", name="span_known"),
        # SQLite: the rows live in the key's b-tree (no rowid table beside it), so an upsert
        # writes one b-tree and a check reads its sums from the key's range.
        {"sqlite_with_rowid": False},
    )


class QuotaLimitRow(Base):
    __tablename__ = "quota_limits"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    daily_tokens: Mapped[int | None] = mapped_column(BigInteger)
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger)
    daily_cost_micros: Mapped[int | None] = mapped_column(BigInteger)
    monthly_cost_micros: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime]


class QuotaReservationRow(Base):
    __tablename__ = "quota_reservations"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    owner: Mapped[str | None] = mapped_column(String(255))
    tokens: Mapped[int] = mapped_column(BigInteger)
    cost_micros: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]

    __table_args__ = (Index(None, "owner", "expires_at"),)


class SettingRow(Base):
    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
