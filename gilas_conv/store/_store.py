"""The conversation store: every message of every conversation, on SQLite or Postgres.

A :class:`ConversationStore` owns one SQLAlchemy engine. :meth:`ConversationStore.create`
and :meth:`ConversationStore.get` hand out :class:`Conversation` handles; a handle appends
messages and reads the history. Messages come back as immutable :class:`Message` values.

What is guaranteed
------------------
* Append is one short transaction: ``UPDATE conversations SET last_seq = last_seq + 1
  ... RETURNING last_seq`` then ``INSERT`` the message. The update takes the conversation's
  row lock (Postgres) or the write lock (SQLite, ``BEGIN IMMEDIATE``), so any number of
  threads or processes may append to one conversation at once: every message is stored
  once, and sequence numbers stay contiguous and unique, with no retry loop.
* Everything is validated before the transaction starts; a call that raises has written
  nothing.
* Content is stored as JSON, so strings, content-part lists and ``None`` come back exactly
  as given, NUL characters included (see :mod:`gilas_conv._schema`).
* ``owner`` scopes every call: a conversation created for owner A does not exist for
  owner B (or for ``owner=None``, which is its own scope, not a wildcard).
* The store keeps the full history; truncation only chooses what is sent.
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, cast

from sqlalchemy import Engine, Row, Table, bindparam, delete, func, insert, literal, select, update

from .._config import (
    DEFAULT_MAX_MESSAGE_CHARS,
    DEFAULT_MODEL,
    DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
    DEFAULT_SQLITE_SYNCHRONOUS,
)
from .._config import resolve_database_url as _resolve_database_url
from .._prices import MICROS, Prices, resolve_prices
from ..exceptions import (
    ConversationNotFound,
    MessageNotFound,
    SchemaOutOfDate,
    StoreIntegrityError,
)
from . import _usage
from ._engine import create_engine_for_url, redact_url
from ._io import _prepare_import
from ._migrate import check_schema_state, current_revision, head_revision, upgrade_database
from ._schema import ConversationRow, MessageRow, SummaryRow
from ._tx import _Checkpoint, _opening, _Transaction
from ._validate import (
    _check_conversation_id,
    _check_field,
    _check_int,
    _check_json,
    _check_reply_fields,
    _check_size,
    _check_str,
    _could_exist,
    _token_columns,
    _validate_message,
)
from ._values import Message, Summary
from ._values import now as _now
from ._window import WindowReader
from ._window import read_window as _read_window
from ._window import summary_rows as _summary_rows

__all__ = ["Conversation", "ConversationStore", "Deletion", "Message", "Role", "Summary"]

Role = Literal["system", "developer", "user", "assistant", "tool"]

_conversations = cast(Table, ConversationRow.__table__)
_messages = cast(Table, MessageRow.__table__)
_summaries = cast(Table, SummaryRow.__table__)

DEFAULT_LIST_LIMIT = 50
# prune/erase_owner: conversations and (about) messages deleted per transaction. A batch of
# 50,000 messages takes well under a second on SQLite, the longest any append waits.
DEFAULT_DELETE_BATCH_CONVERSATIONS = 500
DEFAULT_DELETE_BATCH_MESSAGES = 50_000

logger = logging.getLogger("gilas_conv.store")


@dataclass(frozen=True, slots=True)
class Deletion:
    """What :meth:`ConversationStore.prune` or :meth:`~ConversationStore.erase_owner`
    deleted (or, in a dry run, would delete)."""

    conversations: int
    messages: int


_MESSAGE_COLUMNS = tuple(_messages.c[name] for name in Message.__dataclass_fields__)


def _message_from_row(row: Row[Any] | Mapping[str, Any]) -> Message:
    data = row._mapping if isinstance(row, Row) else row
    return Message(**{name: data[name] for name in Message.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Validation: everything is checked before a transaction starts.


def _bump_statement(*, owned: bool) -> Any:
    """``UPDATE conversations SET last_seq = last_seq + 1 ... RETURNING last_seq``: the one
    statement that numbers a new message and locks the conversation until commit."""
    c = _conversations.c
    owner = c.owner == bindparam("b_owner") if owned else c.owner.is_(None)
    return (
        update(_conversations)
        .where(c.id == bindparam("b_cid"), owner)
        .values(last_seq=c.last_seq + 1, updated_at=bindparam("b_now", type_=c.updated_at.type))
        .returning(c.last_seq)
    )


# Built once: constructing statements per append costs more than executing them.
_BUMP_OWNED = _bump_statement(owned=True)
_BUMP_UNOWNED = _bump_statement(owned=False)
_INSERT_MESSAGE = insert(_messages)


def _owner_clause(owner: str | None) -> Any:
    column = _conversations.c.owner
    return column.is_(None) if owner is None else column == owner


@dataclass(eq=False)
class Conversation:
    """A handle on one stored conversation.

    The attributes are a snapshot taken when the handle was made; appends through this
    handle keep ``message_count`` and ``updated_at`` current, :meth:`refresh` reloads them.
    """

    store: ConversationStore = field(repr=False)
    id: str
    model: str
    owner: str | None
    title: str | None
    metadata: dict[str, Any] | None
    created_at: dt.datetime
    updated_at: dt.datetime
    message_count: int
    forked_from: str | None = None
    forked_at: int | None = None

    def append(
        self,
        role: Role | str,
        content: Any,
        *,
        name: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        tool_call_id: str | None = None,
        pinned: bool = False,
        **reply_fields: Any,
    ) -> Message:
        """Store one message at the end of the history and return it.

        ``reply_fields`` (``status``, ``response_id``, ``model``, ``finish_reason``,
        ``usage``, ``predicted_prompt_tokens``, ``reply_to``, ``extra``) record what the API
        said about a reply. Appending a reply whose ``response_id`` is already stored in
        this conversation returns the stored message instead of storing it twice.

        An assistant reply with ``usage`` (or, lacking it, with ``predicted_prompt_tokens``:
        a reply the API cut off before reporting usage, charged at that count plus the
        reply's own tokens) also writes its usage-ledger row, in the same transaction.
        ``quota_reservation`` (a :class:`~gilas_conv.store.Reservation`) is settled there
        too: deleted as its usage is recorded.
        """
        message = self.store._append(
            self.id,
            self.owner,
            self.model,
            role,
            content,
            name=name,
            tool_calls=tool_calls,
            tool_call_id=tool_call_id,
            pinned=pinned,
            **reply_fields,
        )
        if message.seq > self.message_count:
            self.message_count = message.seq
            self.updated_at = max(self.updated_at, message.created_at)
        return message

    def messages(self, *, after: int = 0, limit: int | None = None) -> list[Message]:
        """The stored history in order (all of it by default), as Message values."""
        return self.store._messages(self.id, self.owner, after=after, limit=limit)

    def iter_messages(self, *, batch_size: int = 1000) -> Iterator[Message]:
        """The history in order, read in batches, for conversations too long to hold at once."""
        after = 0
        while True:
            batch = self.store._messages(self.id, self.owner, after=after, limit=batch_size)
            yield from batch
            if len(batch) < batch_size:
                return
            after = batch[-1].seq

    def message(self, seq: int) -> Message:
        """The message with sequence number ``seq``; raises MessageNotFound."""
        found = self.store._messages(self.id, self.owner, after=seq - 1, limit=1)
        if not found or found[0].seq != seq:
            raise MessageNotFound(self.id, seq)
        return found[0]

    def last_message(self) -> Message | None:
        return self.store._last_message(self.id, self.owner)

    def fork(self, at: int | None = None, *, title: str | None = None) -> Conversation:
        """A new conversation holding a copy of messages 1..``at`` (all when None)."""
        return self.store._fork(self, at=at, title=title)

    def pin(self, seq: int, pinned: bool = True) -> None:
        """Mark a message to be kept in every context window (or unmark it)."""
        self.store._pin(self.id, self.owner, seq, pinned)

    def update(
        self,
        *,
        title: str | None = None,
        model: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Conversation:
        """Change the title, model or metadata (those given); returns this handle, refreshed."""
        self.store._update(self.id, self.owner, title=title, model=model, metadata=metadata)
        return self.refresh()

    def refresh(self) -> Conversation:
        fresh = self.store.get(self.id, owner=self.owner)
        for name in ("model", "title", "metadata", "updated_at", "message_count"):
            setattr(self, name, getattr(fresh, name))
        return self

    def summaries(self) -> list[Summary]:
        """The stored summaries, ordered by the last seq they cover."""
        return self.store._summaries(self.id, self.owner)

    def add_summary(
        self,
        content: str,
        *,
        from_seq: int,
        to_seq: int,
        model: str | None = None,
        tokens: int | None = None,
        tokens_encoding: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> Summary:
        """Store a summary standing in for messages ``from_seq``..``to_seq`` and return it.

        ``model`` wrote it; ``tokens`` is its cost as sent, under ``tokens_encoding``. If a
        summary ending at ``to_seq`` is already stored (another process summarized the same
        range first), that one is returned and nothing is written. Bad values raise
        ValueError, with nothing written. Summaries are what ``policy="summarize"`` sends
        in place of dropped history (see :func:`gilas_conv.truncation.plan_context`).
        """
        _check_str(content, "summary", allow_empty=False)
        for value, what in ((from_seq, "from_seq"), (to_seq, "to_seq")):
            if _check_int(value, what) is None or value < 1:
                raise ValueError(f"{what} must be a positive integer, not {value!r}")
        if from_seq > to_seq:
            raise ValueError(f"from_seq ({from_seq}) must not be after to_seq ({to_seq})")
        if model is not None:
            _check_field(model, "model", allow_empty=False)
        _check_int(tokens, "tokens")
        if tokens_encoding is not None:
            _check_field(tokens_encoding, "tokens_encoding", allow_empty=False)
        if usage is not None and not isinstance(usage, Mapping):
            raise ValueError("usage must be a dict")
        _check_json(usage, "usage")
        return self.store._add_summary(
            self.id,
            self.owner,
            from_seq=from_seq,
            to_seq=to_seq,
            content=content,
            model=model,
            tokens=tokens,
            tokens_encoding=tokens_encoding,
            usage=dict(usage) if usage is not None else None,
        )

    def read_window(self, *, encoding: str) -> AbstractContextManager[WindowReader]:
        """Rows for choosing a context window, counted under ``encoding``: the planner's
        reader (:mod:`gilas_conv.truncation` uses it; see :class:`WindowReader`).

        ``with conv.read_window(encoding=...) as reader``: one read transaction, so run
        nothing slow (an API request) inside the block. Database errors are StoreError.
        """
        return _read_window(self.store, self.id, self.owner, encoding)

    def export(self) -> dict[str, Any]:
        """The conversation as gilas-conv's JSON export format.

        ``{"id", "title", "model", "created_at", "updated_at", "metadata", "messages": [...]}``
        where each message is ``{"role", "content", "name"?, "tool_calls"?,
        "tool_call_id"?, "created_at", "status", "usage"?, "finish_reason"?, ...}``.
        """
        data: dict[str, Any] = {
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "metadata": self.metadata,
        }
        if self.forked_from:
            data["forked_from"] = self.forked_from
            data["forked_at"] = self.forked_at
        data["messages"] = [m.to_export() for m in self.iter_messages()]
        return data


def _instant(value: dt.date | dt.datetime | None, zone: Any, what: str, *, end: bool) -> dt.datetime | None:
    """A report bound as a UTC instant: a datetime as it is (aware), a date as the start of
    that day in ``zone`` (of the next day for an inclusive ``until``)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"{what} must be timezone-aware, or a date")
        return value.astimezone(dt.timezone.utc)
    if not isinstance(value, dt.date):
        raise ValueError(f"{what} must be a date or a datetime, not {value!r}")
    day = value + dt.timedelta(days=1) if end else value
    return dt.datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(dt.timezone.utc)


def _cost_micros(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"{name} must be a number, not {value!r}")
    try:
        number = Decimal(str(value))
    except InvalidOperation as err:
        raise ValueError(f"{name} must be a number, not {value!r}") from err
    if not number.is_finite() or number < 0:
        raise ValueError(f"{name} must be a number >= 0, not {value!r}")
    return int((number * MICROS).to_integral_value())


# ---------------------------------------------------------------------------------------------
# The store


class ConversationStore:
    """Every message of every conversation, in SQLite (default) or Postgres.

    ``url``: a SQLAlchemy URL (``sqlite:///path.db``, ``postgresql://user@host/db``);
    else $GILAS_CONV_DATABASE_URL; else a SQLite file in the user's data directory.

    A SQLite database is brought to the current schema on first use (``auto_upgrade``
    defaults to True for SQLite). Any other database must be upgraded explicitly with
    ``gilas-conv db upgrade``; opening one whose schema is missing or behind raises
    :class:`~gilas_conv.SchemaOutOfDate`.

    ``sqlite_synchronous``: ``"NORMAL"`` (default; in WAL mode a crashed process loses
    nothing committed, a power cut may lose the newest commits but never corrupts the
    file) or ``"FULL"`` (survives power cuts too, at an fsync per commit).

    ``max_message_chars``: the longest message accepted (default
    ``DEFAULT_MAX_MESSAGE_CHARS``, ten million characters); a longer one raises
    ValueError naming the limit before anything is stored.

    ``pool_size`` and ``max_overflow``: the database connection pool (SQLAlchemy's
    defaults, 5 and 10, when not given). A connection is held only for one short
    transaction, never while waiting for the API, so a server needs about as many as it
    has requests writing at the same moment, not as many as open streams: for a gateway
    with a few hundred concurrent streams, ``pool_size=20, max_overflow=20`` is plenty,
    and the total over all processes must stay under Postgres's ``max_connections``.
    ``engine_options`` passes any other option to SQLAlchemy's ``create_engine``.

    ``prices``: the price table the usage ledger records costs with (a :class:`Prices`,
    or a TOML/JSON file); else the file named by ``$GILAS_CONV_PRICES``; else none, and
    costs stay ``None`` (see :mod:`gilas_conv._prices`). ``clock``: returns the current
    aware datetime, for timestamps and quota periods (tests and simulations move it).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        auto_upgrade: bool | None = None,
        sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS,
        sqlite_busy_timeout_ms: int = DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
        engine_options: Mapping[str, Any] | None = None,
        max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        prices: Prices | str | os.PathLike[str] | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        if (
            not isinstance(max_message_chars, int)
            or isinstance(max_message_chars, bool)
            or max_message_chars < 1
        ):
            raise ValueError("max_message_chars must be a positive integer")
        self.max_message_chars = max_message_chars
        self.prices = resolve_prices(prices)
        self._clock = clock or _now
        options = dict(engine_options or {})
        for name, value in (("pool_size", pool_size), ("max_overflow", max_overflow)):
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{name} must be an integer >= 0")
                options[name] = value
        resolved, _embedded = _resolve_database_url(url)
        self._engine = create_engine_for_url(
            resolved,
            sqlite_synchronous=sqlite_synchronous,
            sqlite_busy_timeout_ms=sqlite_busy_timeout_ms,
            **options,
        )
        self.url = redact_url(self._engine.url.render_as_string(hide_password=False))
        self.dialect = self._engine.dialect.name
        if auto_upgrade is None:
            auto_upgrade = self.dialect == "sqlite"
        try:
            self._ensure_schema(auto_upgrade)
        except BaseException:
            self._engine.dispose()
            raise

    def _ensure_schema(self, auto_upgrade: bool) -> None:
        with _opening(self._engine, self.url):
            current = current_revision(self._engine)
            head = head_revision()
            if current == head:
                return
            check_schema_state(self._engine, current)
            if auto_upgrade:
                upgrade_database(self._engine)
                return
        raise SchemaOutOfDate(self.url, current, head)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for advanced use: events, pool inspection)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConversationStore({self.url!r})"

    # -- conversations ------------------------------------------------------------------------

    def create(
        self,
        *,
        model: str = DEFAULT_MODEL,
        system: str | None = None,
        title: str | None = None,
        metadata: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> Conversation:
        """Start a conversation; ``system``, when given, is stored as its first message."""
        _check_field(model, "model", allow_empty=False)
        if title is not None:
            _check_field(title, "title", max_length=None)
        if owner is not None:
            _check_field(owner, "owner", allow_empty=False)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError("metadata must be a dict")
        _check_json(metadata, "metadata")
        first = None
        if system is not None:
            first = _validate_message("system", system)
            _check_size(first, self.max_message_chars)
            first.update(_token_columns(first, model))
        now = self._clock()
        conversation_id = str(uuid.uuid4())
        with self._write() as conn:
            conn.execute(
                insert(_conversations).values(
                    id=conversation_id,
                    owner=owner,
                    title=title,
                    model=model,
                    metadata=dict(metadata) if metadata is not None else None,
                    last_seq=1 if first else 0,
                    created_at=now,
                    updated_at=now,
                )
            )
            if first:
                conn.execute(
                    insert(_messages).values(conversation_id=conversation_id, seq=1, created_at=now, **first)
                )
        return Conversation(
            store=self,
            id=conversation_id,
            model=model,
            owner=owner,
            title=title,
            metadata=dict(metadata) if metadata is not None else None,
            created_at=now,
            updated_at=now,
            message_count=1 if first else 0,
        )

    def get(self, conversation_id: str, *, owner: str | None = None) -> Conversation:
        """The conversation with this id; raises ConversationNotFound (also for another owner)."""
        if not _could_exist(conversation_id, owner):
            raise ConversationNotFound(conversation_id)
        with self._read() as conn:
            row = conn.execute(
                select(_conversations).where(_conversations.c.id == conversation_id, _owner_clause(owner))
            ).first()
        if row is None:
            raise ConversationNotFound(conversation_id)
        return self._conversation_from_row(row)

    def list(
        self, *, owner: str | None = None, limit: int = DEFAULT_LIST_LIMIT
    ) -> builtins.list[Conversation]:
        """This owner's conversations, most recently active (``updated_at``) first."""
        if not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        if not _could_exist(None, owner, any_id=True):
            return []
        with self._read() as conn:
            rows = conn.execute(
                select(_conversations)
                .where(_owner_clause(owner))
                .order_by(_conversations.c.updated_at.desc(), _conversations.c.id.desc())
                .limit(limit)
            ).all()
        return [self._conversation_from_row(row) for row in rows]

    def latest(self, *, owner: str | None = None) -> Conversation | None:
        """The most recently active conversation of this owner, if any."""
        found = self.list(owner=owner, limit=1)
        return found[0] if found else None

    def count(self, *, owner: str | None = None) -> int:
        if not _could_exist(None, owner, any_id=True):
            return 0
        with self._read() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(_conversations).where(_owner_clause(owner))
                ).scalar_one()
            )

    def delete(self, conversation_id: str, *, owner: str | None = None) -> None:
        """Delete a conversation and all its messages; raises ConversationNotFound."""
        if not _could_exist(conversation_id, owner):
            raise ConversationNotFound(conversation_id)
        with self._write() as conn:
            deleted = conn.execute(
                delete(_conversations).where(_conversations.c.id == conversation_id, _owner_clause(owner))
            ).rowcount
        if not deleted:
            raise ConversationNotFound(conversation_id)

    def import_conversation(
        self,
        data: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        owner: str | None = None,
        model: str | None = None,
    ) -> Conversation:
        """Store a conversation from gilas-conv's export format or a plain OpenAI messages list.

        Always creates a new conversation (a new id), so importing the same data twice makes
        two conversations. Every message is validated first; a bad one raises ValueError
        naming it, and nothing is written.
        """
        return self.import_conversations([data], owner=owner, model=model, labels=[""])[0]

    def import_conversations(
        self,
        conversations: Iterable[Mapping[str, Any] | Sequence[Mapping[str, Any]]],
        *,
        owner: str | None = None,
        model: str | None = None,
        labels: Sequence[str] | None = None,
        progress: Callable[[], object] | None = None,
    ) -> builtins.list[Conversation]:
        """Store several conversations (each as :meth:`import_conversation` takes one), all or
        none: every one is validated before the single transaction that writes them.

        A bad conversation raises ValueError prefixed with its label (``labels[i]``, else
        "conversation i+1"). ``progress`` is called once per conversation written.
        """
        if owner is not None:
            _check_field(owner, "owner", allow_empty=False)
        prepared = []
        for index, data in enumerate(conversations):
            label = labels[index] if labels is not None else f"conversation {index + 1}"
            try:
                prepared.append(_prepare_import(data, model, max_message_chars=self.max_message_chars))
            except ValueError as err:
                raise ValueError(f"{label}: {err}" if label else str(err)) from err
        with self._write() as conn:
            for header, rows in prepared:
                conn.execute(insert(_conversations).values(owner=owner, **header))
                if rows:
                    conn.execute(insert(_messages), [{"conversation_id": header["id"], **r} for r in rows])
                if progress is not None:
                    progress()
        return [
            Conversation(
                store=self,
                id=header["id"],
                model=header["model"],
                owner=owner,
                title=header["title"],
                metadata=header["metadata"],
                created_at=header["created_at"],
                updated_at=header["updated_at"],
                message_count=header["last_seq"],
            )
            for header, _rows in prepared
        ]

    # -- usage and quotas ----------------------------------------------------------------------

    def usage(
        self,
        *,
        owner: str | None = None,
        since: dt.date | dt.datetime | None = None,
        until: dt.date | dt.datetime | None = None,
        by: str = "day",
        prices: Prices | str | os.PathLike[str] | None = None,
    ) -> builtins.list[_usage.UsageRow]:
        """What was spent, from the usage ledger, grouped ``by`` day, month, model, owner or
        conversation: a :class:`UsageRow` per group (requests, prompt/completion/total/
        cached tokens, cost).

        ``owner``: that owner's requests only (None: every owner). ``since``/``until``:
        calendar dates in the store's quota time zone, both included (a datetime is an
        instant: from it / before it). Days and months are calendar days and months of
        that zone. ``cost`` is what was recorded with each request (fixed at record time),
        None for a group with no priced request; ``prices`` prices the tokens at that table
        instead, at report time. Reads only the ledger and its indexes, never the messages;
        the ledger keeps the spending of deleted conversations.
        """
        if by not in _usage.GROUPINGS:
            raise ValueError(f"by must be one of {', '.join(_usage.GROUPINGS)}, not {by!r}")
        if owner is not None:
            _check_field(owner, "owner", allow_empty=False)
        table = resolve_prices(prices) if prices is not None else None
        with self._read() as conn:
            zone = _usage.read_zone(conn)
            return _usage.usage_report(
                conn,
                self.dialect,
                owner=owner,
                since=_instant(since, zone, "since", end=False),
                until=_instant(until, zone, "until", end=True),
                by=by,
                zone=zone,
                prices=table,
            )

    def set_quota(
        self,
        owner: str | None = None,
        *,
        default: bool = False,
        daily_tokens: int | None = None,
        monthly_tokens: int | None = None,
        daily_cost: Decimal | float | str | None = None,
        monthly_cost: Decimal | float | str | None = None,
    ) -> _usage.QuotaLimits:
        """Set limits of ``owner``, or with ``default=True`` of every owner without a limit
        of its own (the unowned scope, ``owner=None``, is always under the default). Only
        the limits given change; the others keep their value. Costs are in the currency of
        the price table. Returns the limits now in force for that row."""
        key = self._quota_key(owner, default)
        values: dict[str, int | None] = {}
        for name, value in (("daily_tokens", daily_tokens), ("monthly_tokens", monthly_tokens)):
            if value is not None:
                # BIGINT columns: any token count a budget could name.
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                    raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
                values[name] = value
        for name, cost in (("daily_cost", daily_cost), ("monthly_cost", monthly_cost)):
            if cost is not None:
                values[f"{name}_micros"] = _cost_micros(cost, name)
        if not values:
            raise ValueError(
                "give at least one limit (daily_tokens, monthly_tokens, daily_cost, monthly_cost)"
            )
        with self._write() as conn:
            _usage.set_limits(conn, key, values, self._clock())
            found = _usage.limits_of(conn, key)
        assert found is not None
        return found

    def remove_quota(self, owner: str | None = None, *, default: bool = False) -> bool:
        """Remove every limit of ``owner`` (or the default); False when it had none. The
        owner then falls under the default, if one is set."""
        key = self._quota_key(owner, default)
        with self._write() as conn:
            return _usage.remove_limits(conn, key)

    def quota_limits(self) -> builtins.list[_usage.QuotaLimits]:
        """Every limit row: the default (``default=True``) and each owner's."""
        with self._read() as conn:
            return _usage.all_limits(conn)

    def quota(self, owner: str | None = None) -> builtins.list[_usage.QuotaStatus]:
        """The limits in force for ``owner`` now, each with what is used, what requests in
        flight hold and when it resets; an empty list when no limit applies."""
        if owner is not None:
            _check_field(owner, "owner", allow_empty=False)
        with self._read() as conn:
            return _usage.status(conn, owner, self._clock(), _usage.read_zone(conn))

    def set_quota_timezone(self, zone: str) -> None:
        """The IANA time zone whose calendar days and months quota periods and usage
        reports follow (store-wide; the default is UTC). ValueError for an unknown zone."""
        if not isinstance(zone, str) or not zone:
            raise ValueError("the time zone must be an IANA name such as Asia/Tehran")
        _usage.zone_named(zone)
        with self._write() as conn:
            _usage.write_zone(conn, zone)

    def quota_timezone(self) -> str:
        with self._read() as conn:
            return str(_usage.read_zone(conn).key)

    def reserve_quota(
        self, owner: str | None, *, tokens: int, model: str | None = None
    ) -> _usage.Reservation | None:
        """Hold ``tokens`` of ``owner``'s quota for a request about to be sent, or raise
        :class:`~gilas_conv.QuotaExceeded` (holding nothing). None when no limit applies.

        Atomic across processes and hosts (see :mod:`gilas_conv.store._usage`). The cost
        held is ``tokens`` at ``model``'s highest price (none when it has no price). Settle
        it by appending the reply with ``quota_reservation=``, or :meth:`release_quota` it
        when the request fails; one neither settled nor released stops counting after
        ``RESERVATION_TTL``.
        """
        if owner is not None:
            _check_field(owner, "owner", allow_empty=False)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens < 2**62:
            raise ValueError(f"tokens must be an integer >= 0, not {tokens!r}")
        cost = None
        highest = self.prices.most_expensive(model) if self.prices is not None else None
        if highest is not None:
            cost = int((tokens * highest).to_integral_value())
        with self._write() as conn:
            return _usage.reserve(
                conn,
                self.dialect,
                owner=owner,
                tokens=tokens,
                cost_micros=cost,
                now=self._clock(),
                currency=self.prices.currency if self.prices is not None else None,
            )

    def release_quota(self, reservation: _usage.Reservation) -> None:
        """Give back a reservation whose request failed (nothing is charged for it)."""
        with self._write() as conn:
            _usage.release(conn, reservation)

    def record_usage(
        self,
        *,
        owner: str | None,
        conversation_id: str | None,
        model: str | None,
        kind: str = "reply",
        usage: Mapping[str, Any] | None,
    ) -> bool:
        """Write one ledger row for a request whose answer is stored elsewhere or not at all
        (the senders record each summary request this way). False when ``usage`` reports
        no tokens, and nothing is written. Replies appended with ``usage`` and summaries
        added with ``usage`` are recorded by the store itself; do not record them again."""
        if kind not in _usage.USAGE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(_usage.USAGE_KINDS)}, not {kind!r}")
        if owner is not None:
            _check_field(owner, "owner", allow_empty=False)
        if conversation_id is not None:
            _check_conversation_id(conversation_id)
        if model is not None:
            _check_field(model, "model", allow_empty=False)
        event = self._ledger_event(owner, conversation_id, model, kind, usage, now=self._clock())
        if event is None:
            return False
        with self._write() as conn:
            _usage.settle(conn, event, None)
        return True

    def _quota_applies(self, owner: str | None) -> bool:
        """Whether any limit applies to ``owner`` (one read; lets a turn skip the check)."""
        with self._read() as conn:
            return _usage.any_limit(conn, owner)

    @staticmethod
    def _quota_key(owner: str | None, default: bool) -> str:
        if default:
            if owner is not None:
                raise ValueError("give an owner or default=True, not both")
            return _usage.DEFAULT_OWNER_KEY
        if owner is None:
            raise ValueError("give an owner, or default=True for the default limits")
        return _check_field(owner, "owner", allow_empty=False)

    # -- retention and erasure -----------------------------------------------------------------

    def prune(
        self,
        *,
        inactive_for: dt.timedelta,
        owner: str | None = None,
        dry_run: bool = False,
        batch_conversations: int = DEFAULT_DELETE_BATCH_CONVERSATIONS,
        batch_messages: int = DEFAULT_DELETE_BATCH_MESSAGES,
    ) -> Deletion:
        """Delete every conversation whose last activity (``updated_at``) is older than
        ``inactive_for``, of ``owner`` only when given (None: of every owner). Returns how
        many conversations and messages were deleted (with ``dry_run``: would be, and
        nothing is). See :meth:`erase_owner` for what deleted means and how it runs."""
        if not isinstance(inactive_for, dt.timedelta) or inactive_for <= dt.timedelta(0):
            raise ValueError("inactive_for must be a positive timedelta")
        conditions = [_conversations.c.updated_at < self._clock() - inactive_for]
        if owner is not None:
            conditions.append(_conversations.c.owner == _check_field(owner, "owner", allow_empty=False))
        return self._delete_where(conditions, dry_run, batch_conversations, batch_messages)

    def erase_owner(
        self,
        owner: str,
        *,
        dry_run: bool = False,
        batch_conversations: int = DEFAULT_DELETE_BATCH_CONVERSATIONS,
        batch_messages: int = DEFAULT_DELETE_BATCH_MESSAGES,
    ) -> Deletion:
        """Delete every conversation of ``owner`` (a user's erasure request) and return how
        many conversations and messages went.

        Deleted means gone: messages, summaries and rows derived from them. On SQLite the
        freed space is overwritten (``PRAGMA secure_delete`` is on for every connection)
        and the write-ahead log is checkpointed and truncated afterwards, so the text no
        longer lies in the database file or its -wal file; on Postgres the old row versions
        stay on disk until VACUUM reclaims them (see the README). The usage ledger keeps
        the spending, which holds no content.

        Runs in batches of at most ``batch_conversations`` conversations and about
        ``batch_messages`` messages per transaction, so live chats wait at most one batch
        for the write lock; a conversation is always deleted whole in one transaction
        (longer than ``batch_messages``: alone), so an interrupted run leaves every
        conversation whole or gone, and running it again finishes the work.
        """
        owner = _check_field(owner, "owner", allow_empty=False)
        return self._delete_where(
            [_conversations.c.owner == owner], dry_run, batch_conversations, batch_messages
        )

    def _delete_where(
        self, conditions: builtins.list[Any], dry_run: bool, max_conversations: int, max_messages: int
    ) -> Deletion:
        for value, name in ((max_conversations, "batch_conversations"), (max_messages, "batch_messages")):
            if _check_int(value, name) is None or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        c = _conversations.c
        if dry_run:
            with self._read() as conn:
                count, messages = conn.execute(
                    select(func.count(), func.coalesce(func.sum(c.last_seq), 0)).where(*conditions)
                ).one()
            return Deletion(conversations=int(count), messages=int(messages))
        conversations = messages = 0
        while True:
            with self._write() as conn:
                # Postgres: the rows stay locked until commit, so an append racing the delete
                # waits and then finds the conversation gone; SQLite holds the write lock.
                found = conn.execute(
                    select(c.id, c.last_seq)
                    .where(*conditions)
                    .order_by(c.updated_at, c.id)
                    .limit(max_conversations)
                    .with_for_update(skip_locked=True)
                ).all()
                batch: builtins.list[str] = []
                size = 0
                for row in found:
                    if batch and size + row.last_seq > max_messages:
                        break
                    batch.append(row.id)
                    size += row.last_seq
                if batch:
                    # Every seq 1..last_seq exists (appends number them contiguously), so
                    # last_seq is the message count.
                    conn.execute(delete(_summaries).where(_summaries.c.conversation_id.in_(batch)))
                    conn.execute(delete(_messages).where(_messages.c.conversation_id.in_(batch)))
                    conn.execute(delete(_conversations).where(c.id.in_(batch)))
            if not batch:
                break
            conversations += len(batch)
            messages += size
        if conversations:
            self._forget_freed_pages()
        return Deletion(conversations=conversations, messages=messages)

    def _forget_freed_pages(self) -> None:
        """SQLite: copy the write-ahead log into the database file and truncate it, so the
        pages that held deleted text (zeroed there by secure_delete) are gone from -wal too."""
        if self.dialect != "sqlite":
            return
        with self._checkpoint() as conn:
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            logger.warning(
                "the write-ahead log of %s could not be truncated while other connections read it; "
                "deleted text may stay in the -wal file until the next checkpoint",
                self.url,
            )

    def _checkpoint(self) -> Any:
        return _Checkpoint(self._engine, self.url)

    # -- internals used by Conversation and the other modules -----------------------------------

    def _write(self) -> Any:
        return _Transaction(self._engine, write=True)

    def _read(self) -> Any:
        return _Transaction(self._engine, write=False)

    def _conversation_from_row(self, row: Row[Any]) -> Conversation:
        return Conversation(
            store=self,
            id=row.id,
            model=row.model,
            owner=row.owner,
            title=row.title,
            metadata=row.metadata,
            created_at=row.created_at,
            updated_at=row.updated_at,
            message_count=row.last_seq,
            forked_from=row.forked_from,
            forked_at=row.forked_at,
        )

    def _append(
        self,
        conversation_id: str,
        owner: str | None,
        conversation_model: str,
        role: str,
        content: Any,
        *,
        name: str | None = None,
        tool_calls: builtins.list[dict[str, Any]] | None = None,
        tool_call_id: str | None = None,
        pinned: bool = False,
        status: str = "complete",
        response_id: str | None = None,
        model: str | None = None,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
        predicted_prompt_tokens: int | None = None,
        reply_to: int | None = None,
        extra: dict[str, Any] | None = None,
        quota_reservation: _usage.Reservation | None = None,
    ) -> Message:
        """Append one message (see Conversation.append); ``model`` is the model that answered."""
        _check_conversation_id(conversation_id)
        columns = _validate_message(
            role,
            content,
            name=name,
            tool_calls=tool_calls,
            tool_call_id=tool_call_id,
            status=status,
            pinned=pinned,
        )
        _check_size(columns, self.max_message_chars)
        _check_reply_fields(response_id, model, finish_reason)
        _check_int(predicted_prompt_tokens, "predicted_prompt_tokens")
        _check_int(reply_to, "reply_to")
        if usage is not None and not isinstance(usage, Mapping):
            raise ValueError("usage must be a dict")
        _check_json(usage, "usage")
        _check_json(extra, "extra")
        columns.update(
            response_id=response_id,
            model=model,
            finish_reason=finish_reason,
            usage=dict(usage) if usage is not None else None,
            predicted_prompt_tokens=predicted_prompt_tokens,
            reply_to=reply_to,
            extra=extra,
        )
        if quota_reservation is not None and not isinstance(quota_reservation, _usage.Reservation):
            raise ValueError("quota_reservation must be a Reservation from reserve_quota()")
        columns.update(_token_columns(columns, conversation_model))
        now = self._clock()
        event = None
        if role == "assistant":
            event = self._ledger_event(
                owner,
                conversation_id,
                model or conversation_model,
                "reply",
                usage,
                estimate=(predicted_prompt_tokens, columns.get("tokens")),
                now=now,
            )
        try:
            with self._write() as conn:
                bump = {"b_cid": conversation_id, "b_owner": owner, "b_now": now}
                row = {"conversation_id": conversation_id, "created_at": now, **columns}
                statement = _BUMP_UNOWNED if owner is None else _BUMP_OWNED
                seq = conn.execute(statement, bump).scalar()
                if seq is not None:
                    conn.execute(_INSERT_MESSAGE, {**row, "seq": seq})
                if seq is None:
                    raise ConversationNotFound(conversation_id)
                if event is not None or quota_reservation is not None:
                    _usage.settle(conn, event, quota_reservation)
        except StoreIntegrityError:
            if response_id is None:
                raise
            existing = self._by_response_id(conversation_id, response_id)
            if existing is None:
                raise
            # Stored (and charged) before: the reservation this request held just ends.
            if quota_reservation is not None:
                self.release_quota(quota_reservation)
            return existing
        return Message(conversation_id=conversation_id, seq=seq, created_at=now, **columns)

    def _by_response_id(self, conversation_id: str, response_id: str) -> Message | None:
        with self._read() as conn:
            row = conn.execute(
                select(*_MESSAGE_COLUMNS).where(
                    _messages.c.conversation_id == conversation_id,
                    _messages.c.response_id == response_id,
                )
            ).first()
        return _message_from_row(row) if row is not None else None

    def _check_owner(self, conversation_id: str, owner: str | None, conn: Any = None) -> None:
        """Raise ConversationNotFound unless this owner has this conversation: every read
        through a handle checks it, so a handle whose ``id`` was swapped (for instance with
        ``dataclasses.replace``) reads nothing of another owner's. An id never changes
        owner, so checking in a transaction of its own is as good as in the reader's."""
        if not _could_exist(conversation_id, owner):
            raise ConversationNotFound(conversation_id)
        query = select(literal(1)).where(_conversations.c.id == conversation_id, _owner_clause(owner))
        if conn is None:
            with self._read() as conn:
                found = conn.execute(query).first()
        else:
            found = conn.execute(query).first()
        if found is None:
            raise ConversationNotFound(conversation_id)

    def _messages(
        self, conversation_id: str, owner: str | None, *, after: int = 0, limit: int | None = None
    ) -> builtins.list[Message]:
        query = (
            select(*_MESSAGE_COLUMNS)
            .where(_messages.c.conversation_id == conversation_id, _messages.c.seq > after)
            .order_by(_messages.c.seq)
        )
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            self._check_owner(conversation_id, owner, conn)
            return [_message_from_row(row) for row in conn.execute(query)]

    def _last_message(self, conversation_id: str, owner: str | None) -> Message | None:
        with self._read() as conn:
            self._check_owner(conversation_id, owner, conn)
            row = conn.execute(
                select(*_MESSAGE_COLUMNS)
                .where(_messages.c.conversation_id == conversation_id)
                .order_by(_messages.c.seq.desc())
                .limit(1)
            ).first()
        return _message_from_row(row) if row is not None else None

    def _fork(self, source: Conversation, *, at: int | None, title: str | None) -> Conversation:
        if title is not None:
            _check_field(title, "title", max_length=None)
        now = self._clock()
        new_id = str(uuid.uuid4())
        copied = [c for c in _messages.c if c.name != "conversation_id"]
        with self._write() as conn:
            row = conn.execute(
                select(_conversations).where(_conversations.c.id == source.id, _owner_clause(source.owner))
            ).first()
            if row is None:
                raise ConversationNotFound(source.id)
            last = row.last_seq
            if at is None:
                at = last
            elif not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= last:
                raise ValueError(f"fork point must be a seq between 0 and {last}, not {at!r}")
            conn.execute(
                insert(_conversations).values(
                    id=new_id,
                    owner=row.owner,
                    title=title if title is not None else row.title,
                    model=row.model,
                    metadata=row.metadata,
                    last_seq=at,
                    forked_from=row.id,
                    forked_at=at,
                    created_at=now,
                    updated_at=now,
                )
            )
            # One INSERT ... SELECT, so forking a long history never loads it into Python.
            conn.execute(
                insert(_messages).from_select(
                    ["conversation_id", *(c.name for c in copied)],
                    select(literal(new_id), *copied).where(
                        _messages.c.conversation_id == source.id, _messages.c.seq <= at
                    ),
                )
            )
            summary_columns = [c for c in _summaries.c if c.name != "conversation_id"]
            conn.execute(
                insert(_summaries).from_select(
                    ["conversation_id", *(c.name for c in summary_columns)],
                    select(literal(new_id), *summary_columns).where(
                        _summaries.c.conversation_id == source.id, _summaries.c.to_seq <= at
                    ),
                )
            )
        return self.get(new_id, owner=source.owner)

    def _pin(self, conversation_id: str, owner: str | None, seq: int, pinned: bool) -> None:
        with self._write() as conn:
            self._check_owner(conversation_id, owner, conn)
            row = conn.execute(
                select(_messages.c.role, _messages.c.tool_calls).where(
                    _messages.c.conversation_id == conversation_id, _messages.c.seq == seq
                )
            ).first()
            if row is None:
                raise MessageNotFound(conversation_id, seq)
            if pinned and (row.role == "tool" or row.tool_calls):
                # Sent alone, half of a tool-call pair makes the API refuse the request.
                raise ValueError(
                    "tool calls and tool results cannot be pinned on their own; "
                    "pin the user message or a plain reply instead"
                )
            changed = conn.execute(
                update(_messages)
                .where(_messages.c.conversation_id == conversation_id, _messages.c.seq == seq)
                .values(pinned=bool(pinned))
            ).rowcount
        if not changed:
            raise MessageNotFound(conversation_id, seq)

    def _update(
        self,
        conversation_id: str,
        owner: str | None,
        *,
        title: str | None,
        model: str | None,
        metadata: dict[str, Any] | None,
    ) -> None:
        values: dict[str, Any] = {}
        if title is not None:
            values["title"] = _check_field(title, "title", max_length=None)
        if model is not None:
            values["model"] = _check_field(model, "model", allow_empty=False)
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                raise ValueError("metadata must be a dict")
            values["metadata"] = dict(_check_json(metadata, "metadata"))
        if not values:
            return
        values["updated_at"] = self._clock()
        with self._write() as conn:
            changed = conn.execute(
                update(_conversations)
                .where(_conversations.c.id == conversation_id, _owner_clause(owner))
                .values(**values)
            ).rowcount
        if not changed:
            raise ConversationNotFound(conversation_id)

    def _summaries(self, conversation_id: str, owner: str | None) -> builtins.list[Summary]:
        with self._read() as conn:
            self._check_owner(conversation_id, owner, conn)
            return _summary_rows(conn, conversation_id)

    def _add_summary(
        self,
        conversation_id: str,
        owner: str | None,
        *,
        from_seq: int,
        to_seq: int,
        content: str,
        model: str | None,
        tokens: int | None,
        tokens_encoding: str | None,
        usage: dict[str, Any] | None,
    ) -> Summary:
        _check_str(content, "summary")
        now = self._clock()
        values: dict[str, Any] = dict(
            conversation_id=conversation_id,
            from_seq=from_seq,
            to_seq=to_seq,
            content=content,
            model=model,
            tokens=tokens,
            tokens_encoding=tokens_encoding,
            usage=usage,
            created_at=now,
        )
        event = self._ledger_event(owner, conversation_id, model, "summary", usage, now=now)
        try:
            with self._write() as conn:
                self._check_owner(conversation_id, owner, conn)
                conn.execute(insert(_summaries).values(**values))
                if event is not None:
                    _usage.settle(conn, event, None)
        except StoreIntegrityError:
            # Another process summarized the same range first; theirs is as good as ours.
            with self._read() as conn:
                row = conn.execute(
                    select(_summaries).where(
                        _summaries.c.conversation_id == conversation_id, _summaries.c.to_seq == to_seq
                    )
                ).first()
            if row is None:
                raise
            if event is not None:  # that request was made and paid for all the same
                with self._write() as conn:
                    _usage.settle(conn, event, None)
            return Summary(**{name: row._mapping[name] for name in Summary.__dataclass_fields__})
        return Summary(**values)

    def _ledger_event(
        self,
        owner: str | None,
        conversation_id: str | None,
        model: str | None,
        kind: str,
        usage: Mapping[str, Any] | None,
        *,
        estimate: tuple[int | None, int | None] = (None, None),
        now: dt.datetime,
    ) -> dict[str, Any] | None:
        """The ledger row of a request: from ``usage``; without it, from ``estimate``
        (the prompt tokens counted before sending, the reply's tokens) when the prompt count
        is known; None when neither says anything."""
        numbers = _usage.usage_numbers(usage)
        if numbers is None:
            prompt, completion = estimate
            if prompt is None:
                return None
            numbers = {
                "prompt_tokens": prompt,
                "completion_tokens": completion or 0,
                "total_tokens": prompt + (completion or 0),
                "cached_tokens": 0,
            }
        return _usage.ledger_row(
            owner=owner,
            conversation_id=conversation_id,
            model=model,
            kind=kind,
            numbers=numbers,
            prices=self.prices,
            now=now,
        )
