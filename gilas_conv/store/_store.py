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
* A reply's ``response_id`` is the server's label, not a key: servers reuse ids, so a new
  reply is stored whatever its id. Only a repeated append of the same reply (same
  response id, same message answered, same content and tool calls) returns the stored
  message instead of storing it twice.
* One request answers a conversation at a time: a turn takes the conversation's lease
  (:meth:`ConversationStore._begin_turn`), which lives in the conversation's row, so it
  holds across threads, processes and hosts sharing the database. The reply is stored and
  the lease released in one transaction; a request that fails releases it
  (:meth:`ConversationStore._end_turn`); a process that dies holding it leaves it to
  expire. Plain appends neither check nor take the lease.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, cast

from sqlalchemy import (
    Engine,
    Row,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)

from .._config import (
    DEFAULT_MAX_MESSAGE_CHARS,
    DEFAULT_MODEL,
    DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
    DEFAULT_SQLITE_SYNCHRONOUS,
    DEFAULT_TURN_LEASE_SECONDS,
)
from .._config import resolve_database_url as _resolve_database_url
from .._prices import MICROS, Prices, nonnegative_decimal, resolve_prices
from ..exceptions import (
    ConversationBusy,
    ConversationNotFound,
    MessageNotFound,
    SchemaOutOfDate,
    StoreError,
    StoreIntegrityError,
)
from ..search import SearchHit, make_snippet, parse_query, searchable_text
from ..search._snippet import marked as _marked
from . import _search, _usage
from ._engine import create_engine_for_url, redact_url
from ._io import _prepare_import
from ._migrate import check_schema_state, current_revision, head_revision, upgrade_database
from ._schema import ANCHOR_PREDICATE, ConversationRow, MessageRow, SummaryRow
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
    _validate_message_dict,
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


DEFAULT_SEARCH_LIMIT = 20
# A search returns at most this many hits, whatever limit it is given: each hit's snippet
# is cut in Python from the message's text.
MAX_SEARCH_LIMIT = 1000


_MESSAGE_COLUMNS = tuple(_messages.c[name] for name in Message.__dataclass_fields__)


def _message_from_row(row: Row[Any] | Mapping[str, Any]) -> Message:
    data = row._mapping if isinstance(row, Row) else row
    return Message(**{name: data[name] for name in Message.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Validation: everything is checked before a transaction starts.


def _bump_statement(
    *, owned: bool, lease: bool = False, new_reply: bool = False, unchanged: bool = False
) -> Any:
    """``UPDATE conversations SET last_seq = last_seq + 1, tokens_total = tokens_total +
    :b_tokens ... RETURNING last_seq, tokens_total``: the one statement that numbers a new
    message, advances the running token total, and locks the conversation until commit.

    ``lease``: only where the turn lease is ``:b_lease``'s or free, and release it (the
    append of a turn's reply); no row comes back when another request holds it.
    ``new_reply``: only where no stored message has the response id ``:b_rid`` (the reply
    may repeat it: see ``ConversationStore._insert_reply``).
    ``unchanged`` (Postgres, with ``new_reply``): only where the conversation's row is as the
    statement's snapshot has it (its ``last_seq`` is the snapshot's). A bump that waited for
    the row lock while another append committed then finds the row changed and updates
    nothing; without this the ``new_reply`` subquery, which reads the snapshot taken before
    the wait, would miss a repeat appended meanwhile.
    """
    c = _conversations.c
    owner = c.owner == bindparam("b_owner") if owned else c.owner.is_(None)
    now = bindparam("b_now", type_=c.updated_at.type)
    values: dict[str, Any] = {
        "last_seq": c.last_seq + 1,
        "tokens_total": c.tokens_total + bindparam("b_tokens", type_=c.tokens_total.type),
        "updated_at": now,
    }
    statement = update(_conversations).where(c.id == bindparam("b_cid"), owner)
    if lease:
        statement = statement.where(
            or_(c.lease_token == bindparam("b_lease"), c.lease_token.is_(None), c.lease_expires_at <= now)
        )
        values.update(lease_token=None, lease_expires_at=None)
    if new_reply:
        m = _messages.c
        statement = statement.where(
            ~exists().where(m.conversation_id == bindparam("b_cid"), m.response_id == bindparam("b_rid"))
        )
    if unchanged:
        # An uncorrelated subquery: computed once, from the statement's snapshot, while the
        # WHERE is checked again against the row version found after waiting for its lock.
        seen = _conversations.alias("seen")
        statement = statement.where(
            c.last_seq == select(seen.c.last_seq).where(seen.c.id == bindparam("b_cid")).scalar_subquery()
        )
    return statement.values(**values).returning(c.last_seq, c.tokens_total)


def _added_cte(bumped: Any) -> Any:
    """Postgres: ``added AS (INSERT INTO messages ... SELECT ... FROM bumped RETURNING
    conversation_id, seq)``, the message's columns bound as ``m_<column>``, its seq and
    running total taken from ``bumped`` (the UPDATE of its conversation)."""
    names = [c.name for c in _messages.c]
    taken = {"seq": bumped.c.last_seq, "tokens_total": bumped.c.tokens_total}
    columns = [taken.get(c.name, bindparam(f"m_{c.name}", type_=c.type)) for c in _messages.c]
    return (
        insert(_messages)
        .from_select(names, select(*columns).select_from(bumped))
        .returning(_messages.c.conversation_id, _messages.c.seq)
        .cte("added")
    )


# Postgres: the rows that go with an added message, each a data-modifying WITH reading
# ``added`` (written as text: the search table is not modeled, and SQLAlchemy does not cache
# the compiled form of its ON CONFLICT constructs). PostgreSQL runs a data-modifying WITH
# even when nothing reads it; none of them runs when ``added`` is empty.
_SEARCHED_CTE = (
    text(
        f"INSERT INTO {_search.SEARCH_TABLE} (conversation_id, seq, document)"
        " SELECT conversation_id, seq, CAST(:s_document AS tsvector) FROM added"
    )
    .columns()
    .cte("searched")
)


def _with_rows(added: Any, *, searched: bool, charged: bool) -> list[Any]:
    """The WITHs storing an added message's search row (``searched``: bound as
    ``s_document``) and its ledger row with its rollup increments (``charged``: the ledger
    row bound as ``e_<column>``, the increments as ``_usage.rollup_increments`` names them)."""
    ctes = []
    if searched:
        ctes.append(_SEARCHED_CTE)
    if charged:
        ctes.extend(_usage.charge_ctes(added))
    return ctes


def _append_cte(bump: Any, *, searched: bool = False, charged: bool = False) -> Any:
    """Postgres: an append in one statement (one round trip), ``WITH bumped AS (<bump>),
    added AS (INSERT INTO messages ...)`` and the message's search and ledger rows (see
    :func:`_with_rows`), ``SELECT seq FROM added``: no row when the bump updated nothing, and
    then nothing was written."""
    bumped = bump.cte("bumped")
    added = _added_cte(bumped)
    # Each WITH may read only those before it: the order is given.
    return select(added.c.seq).add_cte(bumped, added, *_with_rows(added, searched=searched, charged=charged))


# Built once: constructing statements per append costs more than executing them.
# Keyed by (owned, lease, new_reply).
_BUMP = {
    (owned, lease, new_reply): _bump_statement(owned=owned, lease=lease, new_reply=new_reply)
    for owned in (True, False)
    for lease in (True, False)
    for new_reply in (True, False)
}
_INSERT_MESSAGE = insert(_messages)
# Postgres, keyed by (owned, lease, new_reply, searched, charged); made when first used.
_APPEND_CTE: dict[tuple[bool, ...], Any] = {}


def _append_statement(key: tuple[bool, bool, bool, bool, bool]) -> Any:
    statement = _APPEND_CTE.get(key)
    if statement is None:
        owned, lease, new_reply, searched, charged = key
        bump = _bump_statement(owned=owned, lease=lease, new_reply=new_reply, unchanged=new_reply)
        statement = _APPEND_CTE[key] = _append_cte(bump, searched=searched, charged=charged)
    return statement


def _after_reply() -> Any:
    """SQL true when the conversation's model is ``:t_model`` and its newest message (seq =
    ``last_seq``: not one deleted) is a complete assistant reply without tool calls: then a
    request of one user message is that message's new turn (see ``_take_turn``'s
    ``after_reply``). One probe of the messages' primary key."""
    c, newest = _conversations.c, _messages.alias("newest")
    return and_(
        c.model == bindparam("t_model"),
        exists().where(
            newest.c.conversation_id == c.id,
            newest.c.seq == c.last_seq,
            newest.c.role == "assistant",
            newest.c.status == "complete",
            newest.c.tool_calls.is_(None),
        ),
    )


def _take_lease(
    *,
    owned: bool,
    adds: bool,
    unlimited: bool = False,
    anchors: bool = False,
    after_reply: bool = False,
) -> Any:
    """The UPDATE that takes a free (or expired) turn lease, and with ``adds`` numbers the
    turn's ``:t_count`` messages and adds their ``:t_tokens``; RETURNING the whole row and
    ``quota_applies``, whether a quota limit applies to the owner (the quota check of a
    turn, at the cost of one index probe: see ``_take_turn``). ``unlimited``: only where
    no limit applies (the check made by the statement itself, which then needs no
    transaction to be rolled back: see ``_take_turn``). ``anchors`` (SQLite): also
    ``anchors``, the window's first read (see :func:`_anchors_json`). ``after_reply``: only
    where :func:`_after_reply` holds."""
    c = _conversations.c
    owner = c.owner == bindparam("t_owner") if owned else c.owner.is_(None)
    now = bindparam("t_now", type_=c.updated_at.type)
    values: dict[str, Any] = {
        "lease_token": bindparam("t_token"),
        "lease_expires_at": bindparam("t_expires", type_=c.lease_expires_at.type),
    }
    if adds:
        values.update(
            last_seq=c.last_seq + bindparam("t_count", type_=c.last_seq.type),
            tokens_total=c.tokens_total + bindparam("t_tokens", type_=c.tokens_total.type),
            updated_at=now,
        )
    applies = _usage.limit_applies(bindparam("t_owner") if owned else None)
    statement = update(_conversations).where(
        c.id == bindparam("t_cid"), owner, or_(c.lease_token.is_(None), c.lease_expires_at <= now)
    )
    if unlimited:
        statement = statement.where(~applies.element)
    if after_reply:
        statement = statement.where(_after_reply())
    returned = [*_conversations.c, applies]
    if anchors:
        returned.append(_anchors_json())
    return statement.values(**values).returning(*returned)


# The start of a window read (see _window.read_window): the conversation's running token
# total, its anchor rows and its newest seq, as a turn's lease statement left them.
_WindowStart = tuple[int, builtins.list[Any], int]


def _is_anchor(columns: Mapping[str, Any]) -> bool:
    """Whether a new message is an anchor (``_schema.ANCHOR_PREDICATE``)."""
    return columns["role"] in ("system", "developer") or bool(columns["pinned"])


# The anchor messages as the lease statement reads them (see _take_lease_with_message).
_anchor = _messages.alias("anchor")
# Their columns as the window reader takes them (_window.WindowReader._full_rows), labelled.
_ANCHOR_COLUMNS = tuple(
    _anchor.c[name].label(f"a_{name}")
    for name in (
        "seq",
        "role",
        "content",
        "name",
        "tool_calls",
        "tool_call_id",
        "pinned",
        "status",
        "tokens",
        "tokens_encoding",
        "tokens_total",
    )
)


# The most anchors the SQLite lease statement reads (see _anchors_json): building the array
# holds the write lock, some 25 ms for 20,000 of them; a conversation with more has its
# anchors read by the window, after the commit.
_ANCHORS_IN_LEASE = 64


def _anchors_json() -> Any:
    """SQLite: the conversation's anchor messages as one JSON array, a ``[<column>, ...]``
    array per message in the order of ``_ANCHOR_COLUMNS`` (content and tool calls as their
    stored JSON text), read by the lease statement's RETURNING (a subquery on the partial
    anchor index): the window's first read, without a statement of its own (see
    ``_take_turn``). A RETURNING clause gives one row per row updated, so the rows come as
    one value. At most ``_ANCHORS_IN_LEASE`` and one more: that many means too many to use.
    Written as text: SQLAlchemy hashes a statement's whole structure on every execution (its
    compiled-cache key), a text's only once."""
    names = [column.element.name for column in _ANCHOR_COLUMNS]
    found = ", ".join(f"found.{name}" for name in names)
    columns = ", ".join(f"anchor.{name}" for name in names)
    # Ordered by seq, so that SQLite walks the partial anchor index (without an order it
    # took the (conversation_id, tokens_total) index, every row of the conversation).
    return literal_column(
        f"(SELECT json_group_array(json_array({found})) FROM (SELECT {columns} FROM messages AS anchor"
        f" WHERE anchor.conversation_id = conversations.id AND ({ANCHOR_PREDICATE})"
        f" ORDER BY anchor.seq LIMIT {_ANCHORS_IN_LEASE + 1}) AS found)"
    ).label("anchors")


def _anchor_rows(found: str) -> builtins.list[Any]:
    """The rows of :func:`_anchors_json`, oldest first, as the window reader takes them
    (content and tool calls decoded as the JSON column type decodes them)."""
    rows = sorted(json.loads(found))
    for row in rows:
        for i in (2, 4):  # content, tool_calls
            if row[i] is not None:
                row[i] = json.loads(row[i])
    return rows


def _take_lease_with_message(*, owned: bool, searched: bool, unlimited: bool, after_reply: bool) -> Any:
    """Postgres: the lease taken and one message inserted, with its search row
    (``searched``), in one statement; the conversation's row comes back (``WITH bumped AS
    (UPDATE ...), added AS (INSERT ...) SELECT * FROM bumped``: PostgreSQL runs a
    data-modifying WITH even when unread). ``unlimited``, ``after_reply``: see
    :func:`_take_lease`.

    The same statement reads what the window's first read would (the anchors: one row per
    anchor message, ``a_<column>``, or one row of NULLs after the conversation's columns),
    so that the turn's plan starts without a round trip of its own (see ``_take_turn``).
    Those rows come from the statement's snapshot, which holds neither the new message nor
    a write committed while the UPDATE waited for the conversation's row lock (an append,
    a deleted message: every such write updates the conversation's row). ``anchors_fresh``
    says whether the row this statement updated is the version its snapshot sees (that
    version's ``xmax`` is this transaction: nothing updated the row in between); when it is
    false (or cannot tell: a row also locked by another transaction has a multixact there)
    the rows are not used and the window reads the anchors itself, after this commit.
    This rests on the writes that change the anchors also updating the conversation's row:
    appends and deletions do; a pin or unpin does not, so one committed while the statement
    waited is missing from that turn's window only, as if it had come just after it (the
    next turn sees it). A multixact's id could in theory equal this transaction's
    id; the anchors would then be those of the statement's snapshot, as if the concurrent
    write had come just after this turn."""
    bumped = _take_lease(owned=owned, adds=True, unlimited=unlimited, after_reply=after_reply).cte("bumped")
    added = _added_cte(bumped)
    seen = _conversations.alias("seen")
    fresh = (
        select(literal_column("seen.xmax"))
        .select_from(seen)
        .where(seen.c.id == bindparam("t_cid"))
        .scalar_subquery()
        .op("=")(literal_column("pg_current_xact_id()::xid"))
    ).label("anchors_fresh")
    return (
        select(*bumped.c, fresh, *_ANCHOR_COLUMNS)
        .select_from(
            bumped.outerjoin(
                _anchor, and_(_anchor.c.conversation_id == bumped.c.id, text(f"({ANCHOR_PREDICATE})"))
            )
        )
        .order_by(_anchor.c.seq)
        .add_cte(bumped, added, *_with_rows(added, searched=searched, charged=False))
    )


# Postgres: a session of this store's database and login, by its server process id (see
# ConversationStore._end_backend).
_THIS_SESSION = (
    " FROM pg_stat_activity WHERE pid = :pid AND datname = current_database() AND usename = session_user"
)
_END_SESSION = text("SELECT pg_terminate_backend(pid)" + _THIS_SESSION)
_SESSION_ALIVE = text("SELECT 1" + _THIS_SESSION)

# The oldest PostgreSQL the statements run on (pg_current_xact_id() is from 13).
POSTGRES_SINCE = (13,)

# Whether :func:`_after_reply` holds, as a column (with ``after_reply``), or nothing.
_AFTER_REPLY = {True: (_after_reply().label("after_reply"),), False: ()}

# Keyed by (owned, adds, anchors).
_TAKE_LEASE = {
    (owned, adds, anchors): _take_lease(owned=owned, adds=adds, anchors=anchors)
    for owned in (True, False)
    for adds in (True, False)
    for anchors in (True, False)
}
# Keyed by (owned, searched, unlimited, after_reply).
_TAKE_LEASE_WITH_MESSAGE = {
    (owned, searched, unlimited, after_reply): _take_lease_with_message(
        owned=owned, searched=searched, unlimited=unlimited, after_reply=after_reply
    )
    for owned in (True, False)
    for searched in (True, False)
    for unlimited in (True, False)
    for after_reply in (True, False)
}


# How many owners ConversationStore._limited_owners remembers (a default limit applies to
# every owner) before it starts again.
_LIMITED_OWNERS_KEPT = 10_000


class _Limited(Exception):
    """A turn's one-statement lease took nothing because a quota limit applies: the turn is
    taken again in a transaction that reserves (see ``ConversationStore._take_turn``)."""


class NotAfterReply(Exception):
    """A turn taken with ``after_reply`` (``ConversationStore._take_turn``) found the
    conversation's newest message not a complete reply without tool calls, or its model not
    the one given: nothing was written, and the caller checks the request the long way."""


class _SlowPath(Exception):
    """Raised inside an append's transaction to roll it back and take the general path."""


def _lease_held(token: str | None, expires_at: dt.datetime | None, now: dt.datetime) -> bool:
    return token is not None and expires_at is not None and expires_at > now


def _stored_reply(conn: Any, conversation_id: str, columns: Mapping[str, Any]) -> Message | None:
    """The stored message this reply repeats: same response id, same message answered,
    same role, content and tool calls. A reply that only shares the id is a new one."""
    if columns["response_id"] is None:
        return None
    # Sorted here, not by the query: with ORDER BY seq, SQLite walks the conversation's
    # primary key instead of the response-id index (linear in the history).
    found = conn.execute(
        select(*_MESSAGE_COLUMNS).where(
            _messages.c.conversation_id == conversation_id, _messages.c.response_id == columns["response_id"]
        )
    ).all()
    for row in sorted(found, key=lambda r: r.seq):
        message = _message_from_row(row)
        if (message.role, message.reply_to, message.content, message.tool_calls) == (
            columns["role"],
            columns["reply_to"],
            columns["content"],
            columns["tool_calls"],
        ):
            return message
    return None


_TURN_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "pinned"})


def _turn_message_columns(
    message: Mapping[str, Any], model: str, *, max_message_chars: int
) -> dict[str, Any]:
    """The columns of one new message of a turn (see ``_begin_turn``), validated and counted."""
    if not isinstance(message, Mapping):
        raise ValueError(f"a message must be a dict, not {type(message).__name__}")
    unknown = set(message) - _TURN_MESSAGE_KEYS
    if unknown:
        raise ValueError(f"unknown message field(s): {', '.join(sorted(map(str, unknown)))}")
    columns = _validate_message_dict(message, max_message_chars=max_message_chars)
    columns.update(
        response_id=None,
        model=None,
        finish_reason=None,
        usage=None,
        predicted_prompt_tokens=None,
        reply_to=None,
        extra=None,
    )
    columns.update(_token_columns(columns, model))
    return columns


def _owner_clause(owner: str | None) -> Any:
    column = _conversations.c.owner
    return column.is_(None) if owner is None else column == owner


def _of_owner(owned: bool) -> Any:
    """The conversation ``:cid`` of the owner ``:owner`` (``owned``) or of no owner."""
    c = _conversations.c
    return and_(c.id == bindparam("cid"), c.owner == bindparam("owner") if owned else c.owner.is_(None))


# Built once, keyed by whether an owner is given.
_SELECT_CONVERSATION = {owned: select(_conversations).where(_of_owner(owned)) for owned in (True, False)}
_CONVERSATION_EXISTS = {owned: select(literal(1)).where(_of_owner(owned)) for owned in (True, False)}
# A conversation and its messages after ``last_seq - :count``, in one statement (one row per
# message, or one row of NULLs after the conversation's columns when none is that late).
_CONVERSATION_AND_LAST = {
    owned: select(_conversations, *(column.label(f"m_{column.name}") for column in _MESSAGE_COLUMNS))
    .select_from(
        _conversations.outerjoin(
            _messages,
            and_(
                _messages.c.conversation_id == _conversations.c.id,
                _messages.c.seq > _conversations.c.last_seq - bindparam("count"),
            ),
        )
    )
    .where(_of_owner(owned))
    .order_by(_messages.c.seq)
    for owned in (True, False)
}


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
    # Set on a handle made by a turn's lease statement (Postgres): what the next
    # read_window() would read first, read by that statement; used once (see _take_turn).
    _window_start: _WindowStart | None = field(default=None, init=False, repr=False, compare=False)

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
        said about a reply. Appending the same reply again (same ``response_id``,
        ``reply_to``, role, content and tool calls) returns the stored message instead of
        storing it twice; a reply that only shares the response id is a new reply, stored.
        (``lease``, for the senders: see ``ConversationStore._append``.)

        An assistant reply with ``usage`` (or, lacking it, with ``predicted_prompt_tokens``:
        a reply the API cut off before reporting usage, charged at that count plus the
        reply's own tokens) also writes its usage-ledger row, in the same transaction.
        ``quota_reservation`` (a :class:`~gilas_conv.store.Reservation`) is settled there
        too: deleted as its usage is recorded (or, for a reply already stored, released).
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
        self._saw(message)
        return message

    def _saw(self, message: Message) -> None:
        """Keep ``message_count`` and ``updated_at`` current after a write of this conversation."""
        if message.seq > self.message_count:
            self.message_count = message.seq
            self.updated_at = max(self.updated_at, message.created_at)

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

    def delete_message(self, seq: int) -> None:
        """Delete one message (MessageNotFound if there is none). The others keep their seq.

        Half of a tool-call pair cannot be deleted alone (ValueError): the API refuses a
        history holding the other half. Summaries already made are kept.
        """
        self.store._delete_message(self.id, self.owner, seq)

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
        summary = Summary(
            conversation_id=self.id,
            from_seq=from_seq,
            to_seq=to_seq,
            content=content,
            created_at=self.store._clock(),
            model=model,
            tokens=tokens,
            tokens_encoding=tokens_encoding,
            usage=dict(usage) if usage is not None else None,
        )
        return self.store._add_summary(summary, self.owner)

    def read_window(self, *, encoding: str) -> AbstractContextManager[WindowReader]:
        """Rows for choosing a context window, counted under ``encoding``: the planner's
        reader (:mod:`gilas_conv.truncation` uses it; see :class:`WindowReader`).

        ``with conv.read_window(encoding=...) as reader``: one read transaction, so run
        nothing slow (an API request) inside the block. Database errors are StoreError.
        """
        start, self._window_start = self._window_start, None
        return _read_window(self.store, self.id, self.owner, encoding, start=start)

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
    return int((nonnegative_decimal(value, name, error=ValueError) * MICROS).to_integral_value())


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
        # Postgres: owners whose last turn found a limit applying, so that their next turn
        # goes straight to the transaction that reserves (see _take_turn). A hint only: both
        # ways check the limit in the database.
        self._limited_owners: set[str | None] = set()
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
            version = self._engine.dialect.server_version_info
            if self.dialect == "postgresql" and version and tuple(version) < POSTGRES_SINCE:
                raise StoreError(
                    f"the database {self.url} runs PostgreSQL {'.'.join(map(str, version))}; "
                    f"gilas-conv needs PostgreSQL {POSTGRES_SINCE[0]} or later"
                )
            head = head_revision()
            if current == head:
                return
            if auto_upgrade:
                upgrade_database(self._engine)  # checks the schema's state under its lock
                return
            check_schema_state(self._engine, current)
        raise SchemaOutOfDate(self.url, current, head)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for advanced use: events, pool inspection)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection. The store (and every handle on it) is then closed
        for good: a later call raises StoreError instead of opening connections that
        nothing would close."""
        self._closed = True
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
                    tokens_total=first["tokens"] if first else 0,
                    created_at=now,
                    updated_at=now,
                )
            )
            if first:
                conn.execute(
                    insert(_messages).values(
                        conversation_id=conversation_id,
                        seq=1,
                        created_at=now,
                        tokens_total=first["tokens"],
                        **first,
                    )
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
        with self._read_one() as conn:
            row = conn.execute(
                _SELECT_CONVERSATION[owner is not None], {"cid": conversation_id, "owner": owner}
            ).first()
        if row is None:
            raise ConversationNotFound(conversation_id)
        return self._conversation_from_row(row)

    def list(
        self, *, owner: str | None = None, limit: int = DEFAULT_LIST_LIMIT, after: str | None = None
    ) -> builtins.list[Conversation]:
        """This owner's conversations, most recently active (``updated_at``) first.

        ``after``: the id of a conversation of a previous page; the list continues after
        it (ConversationNotFound if this owner has no such conversation).
        """
        if not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        if not _could_exist(None, owner, any_id=True):
            return []
        c = _conversations.c
        query = select(_conversations).where(_owner_clause(owner))
        with self._read() as conn:
            if after is not None:
                if not _could_exist(after, owner):
                    raise ConversationNotFound(after)
                cursor = conn.execute(
                    select(c.updated_at, c.id).where(c.id == after, _owner_clause(owner))
                ).first()
                if cursor is None:
                    raise ConversationNotFound(after)
                query = query.where(
                    or_(
                        c.updated_at < cursor.updated_at,
                        and_(c.updated_at == cursor.updated_at, c.id < cursor.id),
                    )
                )
            rows = conn.execute(query.order_by(c.updated_at.desc(), c.id.desc()).limit(limit)).all()
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
        """Delete a conversation and all its messages; raises ConversationNotFound.

        On SQLite the search index drops the deleted words too: at once when SQLite's FTS5
        has ``secure-delete`` (3.44+), otherwise by merging the index afterwards in bounded
        steps (``_search.prepare_delete``), as prune and erase_owner do."""
        if not _could_exist(conversation_id, owner):
            raise ConversationNotFound(conversation_id)
        with self._write() as conn:
            compact = _search.prepare_delete(conn, conversation_id)
            deleted = conn.execute(
                delete(_conversations).where(_conversations.c.id == conversation_id, _owner_clause(owner))
            ).rowcount
            if not deleted:  # inside: what prepare_delete wrote is rolled back with it
                raise ConversationNotFound(conversation_id)
        if compact:
            self._compact_search_index()

    def search(
        self,
        query: str,
        *,
        owner: str | None = None,
        limit: int = DEFAULT_SEARCH_LIMIT,
        conversation: str | None = None,
    ) -> builtins.list[SearchHit]:
        """The messages of this owner's conversations that match ``query``, best first.

        The query language (words ANDed, ``"phrases"``, ``prefix*``) and the normalization
        that lets Persian and Arabic spellings match are described in
        :mod:`gilas_conv.search`. Searched: the text of user and assistant messages (text
        parts of content lists included) and tool results; not system or developer
        messages, nor tool-call arguments. Incomplete replies are found too, with
        ``status="incomplete"``. ``conversation`` limits the search to one conversation.
        A query with no word in it raises ValueError; nothing reaches the database's query
        syntax unquoted.
        """
        parsed = parse_query(query)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError("limit must be a positive integer")
        if conversation is not None:
            _check_conversation_id(conversation)
        if not _could_exist(conversation, owner, any_id=conversation is None):
            return []
        with self._read() as conn:
            rows = _search.search_rows(
                conn, parsed, owner=owner, limit=min(limit, MAX_SEARCH_LIMIT), conversation=conversation
            )
        hits = []
        for row in rows:
            fragments = make_snippet(searchable_text(row.role, row.content), parsed)
            hits.append(
                SearchHit(
                    conversation_id=row.conversation_id,
                    title=row.title,
                    seq=row.seq,
                    role=row.role,
                    snippet=_marked(fragments),
                    rank=float(row.rank),
                    status=row.status,
                    created_at=row.created_at,
                    fragments=fragments,
                )
            )
        return hits

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
                    _search.insert_rows(conn, self._search_rows(header["id"], rows))
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
        with self._write() as conn:
            return self._reserve_in(conn, owner, tokens, model, self._clock())

    def _hold_cost(self, tokens: int, model: str | None) -> int | None:
        highest = self.prices.most_expensive(model) if self.prices is not None else None
        return None if highest is None else int((tokens * highest).to_integral_value())

    def _reserve_in(
        self, conn: Any, owner: str | None, tokens: int, model: str | None, now: dt.datetime
    ) -> _usage.Reservation | None:
        return _usage.reserve(
            conn,
            self.dialect,
            owner=owner,
            tokens=tokens,
            cost_micros=self._hold_cost(tokens, model),
            now=now,
            currency=self.prices.currency if self.prices is not None else None,
        )

    def _grow_reservation(
        self, reservation: _usage.Reservation, *, tokens: int, model: str | None
    ) -> _usage.Reservation:
        """Raise a held reservation to ``tokens`` (a window larger than planned), checked
        against the limits like a new one: QuotaExceeded leaves the old one held."""
        extra = tokens - reservation.tokens
        if extra <= 0:
            return reservation
        with self._write() as conn:
            now = self._clock()
            # Checked as a new request of ``extra`` tokens, under the owner's lock.
            probe = _usage.reserve(
                conn,
                self.dialect,
                owner=reservation.owner,
                tokens=extra,
                cost_micros=self._hold_cost(extra, model),
                now=now,
                currency=self.prices.currency if self.prices is not None else None,
            )
            if probe is not None:
                _usage.release(conn, probe)
            cost = self._hold_cost(tokens, model)
            _usage.grow(conn, reservation, tokens, cost)
        return dataclasses.replace(reservation, tokens=tokens, cost_micros=cost)

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

        Deleted means gone: messages, summaries and rows derived from them (the search
        index's rows cascade from their messages). On SQLite the freed space is overwritten
        (``PRAGMA secure_delete`` is on for every connection), the FTS5 search index is
        merged so its segments drop the deleted words, and the write-ahead log is
        checkpointed and truncated afterwards, so the text no
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
            self._compact_search_index()
            self._forget_freed_pages()
        return Deletion(conversations=conversations, messages=messages)

    def _compact_search_index(self) -> None:
        """SQLite: merge the FTS5 index's segments, in bounded transactions, so the deleted
        messages' words leave it (see ``_search.compact_step``). Its cost grows with the
        size of the index, not with what was deleted; each step holds the write lock for
        about ``COMPACT_PAGES`` pages of work, so live chats wait at most one step."""
        if self.dialect != "sqlite":
            return
        while True:
            with self._write() as conn:
                more = _search.compact_step(conn)
            if not more:
                return

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

    def _write(self, *, single: bool = False) -> Any:
        """A write transaction. ``single``: the caller runs one statement (on Postgres in
        autocommit mode: a statement is atomic on its own, so it needs no BEGIN and COMMIT,
        two round trips; on SQLite the usual write transaction)."""
        self._check_open()
        return _Transaction(self._engine, write=True, single=single)

    def _read(self, *, each: bool = False) -> Any:
        """A read transaction. ``each``: the caller's statements need no snapshot in common
        beyond what the isolation level gives them; on Postgres under READ COMMITTED (each
        statement its own snapshot, in a transaction or not) they then run in autocommit
        mode, without the BEGIN and COMMIT round trips."""
        self._check_open()
        return _Transaction(self._engine, write=False, single=each and self._snapshot_per_statement())

    def _snapshot_per_statement(self) -> bool:
        """Whether each statement reads a snapshot of its own, in a transaction or not:
        Postgres under READ COMMITTED, its default isolation level."""
        dialect = self._engine.dialect
        return dialect.name == "postgresql" and dialect.default_isolation_level == "READ COMMITTED"

    def _read_one(self) -> Any:
        """A read that runs one statement: atomic on its own, so it runs without BEGIN and
        COMMIT (in autocommit mode), errors translated as in any transaction."""
        self._check_open()
        return _Transaction(self._engine, write=False, single=True)

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise StoreError(f"the store {self.url} is closed; open a new ConversationStore to use it again")

    def _search_rows(
        self, conversation_id: str, rows: Iterable[Mapping[str, Any]]
    ) -> builtins.list[dict[str, Any]]:
        out = []
        for row in rows:
            indexed = _search.index_values(self.dialect, row["role"], row["content"])
            if indexed is not None:
                out.append({"cid": conversation_id, "seq": row["seq"], **indexed})
        return out

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
        lease: str | None = None,
    ) -> Message:
        """Append one message (see Conversation.append); ``model`` is the model that answered.

        ``lease``: the token of the conversation's turn lease (:meth:`_begin_turn`). The
        message is stored and the lease released in one transaction. If another request
        holds the lease now (this one's expired and was taken over), ConversationBusy is
        raised and nothing is stored. Without ``lease`` the lease is neither checked nor
        touched.
        """
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
        if lease is not None:
            _check_str(lease, "lease")
        indexed = _search.index_values(self.dialect, columns["role"], columns["content"])
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
        if response_id is not None or lease is not None:
            return self._append_reply(
                conversation_id,
                owner,
                columns,
                now,
                lease=lease,
                indexed=indexed,
                event=event,
                reservation=quota_reservation,
            )
        with self._write(single=quota_reservation is None) as conn:
            seq = self._insert_reply(
                conn,
                conversation_id,
                owner,
                columns,
                now,
                lease=None,
                new_reply=False,
                indexed=indexed,
                event=event,
                reservation=quota_reservation,
            )
            if seq is None:
                raise ConversationNotFound(conversation_id)
        return Message(conversation_id=conversation_id, seq=seq, created_at=now, **columns)

    def _insert_reply(
        self,
        conn: Any,
        conversation_id: str,
        owner: str | None,
        columns: Mapping[str, Any],
        now: dt.datetime,
        *,
        lease: str | None,
        new_reply: bool,
        indexed: dict[str, Any] | None,
        event: dict[str, Any] | None,
        reservation: _usage.Reservation | None,
    ) -> int | None:
        """Store a reply (or any appended message) in the caller's write transaction: the
        message, numbered and counted into the running total (releasing the lease
        ``lease``), its search row, its ledger row and the settling of its quota
        reservation. Its seq; or None, and the caller must roll back, when the conversation
        is not this owner's, another request holds the lease, or (``new_reply``) a stored
        message has the reply's response id, so that it may be a repeat.

        On Postgres the message, its search row and its ledger row take one statement (a
        CTE: the bump, then the inserts), which needs no transaction of its own (see
        ``_write(single=True)``); on SQLite, in-process, four. The response-id check is
        made so that a repeat appended concurrently is seen: on SQLite (whose write transaction holds the
        database lock from its BEGIN) inside the bump; on Postgres inside the bump as well,
        which then also requires the conversation's row to be as the statement's snapshot
        has it (the subquery reads that snapshot, taken before the bump waited for the row
        lock: a bump that waited while another append committed updates nothing, and the
        caller takes the general path)."""
        bump = {
            "b_cid": conversation_id,
            "b_owner": owner,
            "b_now": now,
            "b_tokens": columns["tokens"] or 0,
            "b_lease": lease,
        }
        new_reply = new_reply and columns["response_id"] is not None
        if self.dialect == "postgresql":
            values = {f"m_{name}": value for name, value in columns.items()}
            values.update(m_conversation_id=conversation_id, m_created_at=now, b_rid=columns["response_id"])
            if indexed is not None:
                values["s_document"] = indexed["document"]
            if event is not None:
                values.update({f"e_{name}": value for name, value in event.items()})
                values.update(_usage.rollup_increments(event))
            key = (owner is not None, lease is not None, new_reply, indexed is not None, event is not None)
            seq = conn.execute(_append_statement(key), {**bump, **values}).scalar()
            if seq is None:
                return None
            if reservation is not None:
                _usage.settle(conn, None, reservation)
            return cast(int, seq)
        else:
            if new_reply:
                bump["b_rid"] = columns["response_id"]
            bumped = conn.execute(_BUMP[(owner is not None, lease is not None, new_reply)], bump).first()
            if bumped is None:
                return None
            seq, total = bumped
            conn.execute(
                _INSERT_MESSAGE,
                {
                    "conversation_id": conversation_id,
                    "created_at": now,
                    "seq": seq,
                    "tokens_total": total,
                    **columns,
                },
            )
        if indexed is not None:
            _search.insert_rows(conn, [{"cid": conversation_id, "seq": seq, **indexed}])
        if event is not None or reservation is not None:
            _usage.settle(conn, event, reservation)
        return cast(int, seq)

    def _append_reply(
        self,
        conversation_id: str,
        owner: str | None,
        columns: dict[str, Any],
        now: dt.datetime,
        *,
        lease: str | None,
        indexed: dict[str, Any] | None,
        event: dict[str, Any] | None = None,
        reservation: _usage.Reservation | None = None,
    ) -> Message:
        """The append of a reply (a response id or a lease given), checked under the lock.

        The usual reply (its lease held or free, no other message with its response id) is
        stored by :meth:`_insert_reply` in one transaction (on Postgres, without a quota
        reservation to settle, one statement in autocommit mode). Any other case stores
        nothing there (the bump updates no row; the transaction is rolled back) and takes
        the general path, which locks the conversation's row first (FOR UPDATE
        on Postgres; SQLite's write transaction holds the database lock), so that telling a
        repeated reply from a new one, and a busy lease from a free one, cannot race
        another append.
        """

        def insert_reply(conn: Any, *, new_reply: bool) -> int | None:
            return self._insert_reply(
                conn,
                conversation_id,
                owner,
                columns,
                now,
                lease=lease,
                new_reply=new_reply,
                indexed=indexed,
                event=event,
                reservation=reservation,
            )

        with contextlib.suppress(_SlowPath), self._write(single=reservation is None) as conn:
            seq = insert_reply(conn, new_reply=True)
            if seq is None:
                raise _SlowPath  # rolls the transaction back
            return Message(conversation_id=conversation_id, seq=seq, created_at=now, **columns)
        c = _conversations.c
        with self._write() as conn:
            state = conn.execute(
                select(c.lease_token, c.lease_expires_at)
                .where(c.id == conversation_id, _owner_clause(owner))
                .with_for_update()
            ).first()
            if state is None:
                raise ConversationNotFound(conversation_id)
            ours = lease is not None and state.lease_token == lease
            stored = _stored_reply(conn, conversation_id, columns)
            if stored is not None:
                if ours:
                    conn.execute(
                        update(_conversations)
                        .where(c.id == conversation_id)
                        .values(lease_token=None, lease_expires_at=None)
                    )
                if reservation is not None:
                    # Stored (and charged) before: the reservation this request held just ends.
                    _usage.settle(conn, None, reservation)
                return stored
            if lease is not None and not ours and _lease_held(state.lease_token, state.lease_expires_at, now):
                raise ConversationBusy(conversation_id, expires_at=state.lease_expires_at)
            # The lease is this request's, free or expired: the bump's lease check passes.
            seq = insert_reply(conn, new_reply=False)
            if seq is None:
                raise StoreError(f"conversation {conversation_id} changed under its row lock")
        return Message(conversation_id=conversation_id, seq=seq, created_at=now, **columns)

    # -- the turn lease: one request answers a conversation at a time ---------------------------
    #
    # Private to the package but used by the senders and the gateway. A turn is
    # ``token, conv, added = store._begin_turn(id, owner=..., messages=[...])``, the request,
    # then ``conv.append("assistant", ..., lease=token)`` (stores the reply and releases the
    # lease) or, if the request failed, ``store._end_turn(id, token)``.

    def _begin_turn(
        self,
        conversation_id: str,
        *,
        owner: str | None = None,
        lease_seconds: float = DEFAULT_TURN_LEASE_SECONDS,
        messages: Sequence[Mapping[str, Any]] = (),
        model: str | None = None,
    ) -> tuple[str, Conversation, builtins.list[Message]]:
        """Take the conversation's turn lease and append ``messages``, in one transaction
        (quotas are not checked: see :meth:`_take_turn`).

        The lease is taken if it is free or expired (its holder died); otherwise
        :class:`~gilas_conv.ConversationBusy` is raised and nothing is written, so a refused
        request stores nothing. ``messages`` are the turn's new messages (``role``,
        ``content``, and optionally ``name``, ``tool_calls``, ``tool_call_id``,
        ``pinned``), all validated before the transaction (ValueError, nothing written).

        ``model``: the conversation's model as the caller knows it (a handle's), used only
        to count the new messages' tokens; looked up when not given. Counting under a model
        that changed meanwhile is harmless: the stored encoding says which one was used, and
        the count is redone when read.

        Returns the lease token (a random string: whoever holds it owns the turn), the
        conversation as it is now, and the messages appended. The lease lasts
        ``lease_seconds`` (:data:`~gilas_conv._config.DEFAULT_TURN_LEASE_SECONDS` by
        default: longer than any whole turn may take); expiry is judged by this process's
        clock, so hosts sharing a database need clocks in step to well under that.
        """
        token, conv, added, _held = self._take_turn(
            conversation_id,
            owner=owner,
            lease_seconds=lease_seconds,
            messages=messages,
            quota=None,
            model=model,
        )
        return token, conv, added

    def _take_turn(
        self,
        conversation_id: str,
        *,
        owner: str | None,
        lease_seconds: float,
        messages: Sequence[Mapping[str, Any]],
        quota: _usage.QuotaAsk | None,
        model: str | None = None,
        window: bool = False,
        after_reply: bool = False,
    ) -> tuple[str, Conversation, builtins.list[Message], _usage.Reservation | None]:
        """:meth:`_begin_turn` with the owner's quota, all in its one write transaction.

        ``window`` (for a caller that plans the turn at once with the handle returned, and
        uses it for nothing else): a turn whose lease statement also read the start of the
        window (Postgres under READ COMMITTED, one message: see
        :func:`_take_lease_with_message`; SQLite, up to ``_ANCHORS_IN_LEASE`` anchors: see
        :func:`_anchors_json`) returns a handle whose first :meth:`Conversation.read_window`
        starts from those rows, saving that read's statement. Such a handle must not be
        kept: what it carries is the conversation as the turn found it.

        With ``quota`` (None: no check, as :meth:`_begin_turn`): if a limit applies to
        ``owner``, ``quota.hold(history)`` tokens are reserved, ``history`` being the
        conversation's token total with the turn's new messages (its running
        ``tokens_total``, read from the lease statement), and the reservation is returned
        with the turn (QuotaExceeded: nothing written, no lease taken). The lease statement
        itself says whether a limit applies (an index probe of ``quota_limits`` in its
        RETURNING clause), so an owner without limits costs the turn no statement of its
        own, and a limited one no statement before the reservation's: the amount comes
        from the row the lease statement returns, not from a window read. The answer is
        read in the turn's transaction, never cached, so a limit set by another process
        counts for every turn whose lease statement starts after its commit. (On Postgres
        a lease statement that was already waiting for the conversation's row lock when
        the limit was committed still reads the snapshot it started with: that one turn
        goes unchecked, as if it had begun first; a test pins that the next turn is
        checked.)

        ``after_reply`` (Postgres, one message, ``model`` given): take the turn only if the
        conversation's newest message is a complete assistant reply without tool calls and
        its model is ``model``; else :class:`NotAfterReply`, and nothing is written (a lease
        held by another request is ConversationBusy only when that holds too). For the
        gateway: a request of one user message after a reply is that message's new turn,
        so the lease statement checks it instead of a read before it.
        """
        if not _could_exist(conversation_id, owner):
            raise ConversationNotFound(conversation_id)
        if after_reply and (model is None or self.dialect != "postgresql" or len(messages) != 1):
            raise ValueError("after_reply takes one message and the model, on Postgres")
        if (
            isinstance(lease_seconds, bool)
            or not isinstance(lease_seconds, int | float)
            or not lease_seconds > 0
        ):
            raise ValueError(f"lease_seconds must be a positive number, not {lease_seconds!r}")
        if model is not None:
            _check_field(model, "model", allow_empty=False)
        rows = []
        if messages:
            # Counted before the transaction, under the model known here: if the model changes
            # meanwhile, the stored encoding says so and the count is redone when read.
            if model is None:
                model = self.get(conversation_id, owner=owner).model
            for message in messages:
                rows.append(_turn_message_columns(message, model, max_message_chars=self.max_message_chars))
        indexed = [_search.index_values(self.dialect, r["role"], r["content"]) for r in rows]
        token = str(uuid.uuid4())
        now = self._clock()
        params = {
            "t_cid": conversation_id,
            "t_owner": owner,
            "t_now": now,
            "t_token": token,
            "t_expires": now + dt.timedelta(seconds=lease_seconds),
            "t_count": len(rows),
            "t_tokens": sum(r["tokens"] or 0 for r in rows),
            "t_model": model,
        }
        # Postgres, one message: the lease, the message and its search row in one statement
        # (one round trip). Without a reservation to take after it, that statement is the
        # whole write and needs no transaction; with ``quota`` it then takes nothing when a
        # limit applies, and only then is the turn taken again in a transaction that
        # reserves.
        one = self.dialect == "postgresql" and len(rows) == 1
        limited = quota is not None and owner in self._limited_owners
        for single in (True, False) if one and not limited else (False,):
            transaction = self._write(single=single)
            try:
                row, added, held, start = self._lease_in(
                    transaction,
                    conversation_id,
                    owner=owner,
                    params=params,
                    rows=rows,
                    indexed=indexed,
                    quota=quota,
                    single=single,
                    window=window,
                    after_reply=after_reply,
                )
            except _Limited:
                if len(self._limited_owners) >= _LIMITED_OWNERS_KEPT:
                    self._limited_owners.clear()  # a hint: forgetting costs a round trip
                self._limited_owners.add(owner)
                continue  # a limit applies: the transaction that reserves
            except StoreError as err:
                if not transaction.in_doubt:
                    raise
                pid = transaction.backend_pid
                raise self._lease_in_doubt(conversation_id, token, pid, bool(rows), err) from err
            break
        if limited and not row.quota_applies:
            self._limited_owners.discard(owner)
        conv = self._conversation_from_row(row)
        if window and (self.dialect == "sqlite" or self._snapshot_per_statement()):
            # Postgres: the window's reads would each take a snapshot of their own anyway.
            # SQLite: the anchors were read under the write lock, so they are the
            # conversation's as this turn committed it; the window's later reads see it as
            # it is then, as a Postgres window's statements each see their own snapshot.
            if start is not None and isinstance(start[1], str):
                # Decoded now, not while the write lock kept every other writer waiting.
                anchors = _anchor_rows(start[1])
                start = (start[0], anchors, start[2]) if len(anchors) <= _ANCHORS_IN_LEASE else None
            conv._window_start = start
        return token, conv, added, held

    def _lease_in_doubt(
        self, conversation_id: str, token: str, pid: int | None, stored: bool, err: StoreError
    ) -> StoreError:
        """The error of a lease write whose connection was lost while the server may have
        committed it (see ``_tx._Transaction.in_doubt``): then the lease is taken though
        nobody holds it, and the conversation would be busy for the lease's whole life. So
        it is released by its token, on a fresh connection (a no-op if the write was not
        stored); a release that fails is logged, and the write's own error is returned
        either way. The turn's messages may have been stored: retrying the turn (the
        sender's ``retry``; a gateway client sending them again) answers them.

        The server may not have run the write yet when the release does (its process
        ``pid`` had not read it yet): the release would free nothing, and the write take
        the lease after it. So that process is ended first (the server then runs nothing
        more of it: the write is stored or not, for good), and its end awaited, a few
        seconds at most."""
        if pid is not None:
            try:
                self._end_backend(pid)
            except StoreError:
                logger.warning("could not end the server process %s of a lost connection", pid, exc_info=True)
        try:
            self._end_turn(conversation_id, token)
        except StoreError:
            logger.warning(
                "could not release the turn lease of conversation %s after a lost connection",
                conversation_id,
                exc_info=True,
            )
        if not stored:
            return StoreError(str(err))
        return StoreError(f"{err}; the turn's messages may have been stored: retrying the turn answers them")

    def _end_backend(self, pid: int, *, wait: float = 5.0) -> None:
        """Postgres: end the server process ``pid`` (one of this store's connections, lost)
        and wait until it has exited, up to ``wait`` seconds. A user may end its own
        sessions; one that is gone already is no error. Only a session of this database
        and this login (``session_user``: a role set with ``SET ROLE`` or ``-c role=`` does
        not change it) is ended or waited for: the id comes from the driver, and behind a
        connection pooler it is the pooler's, not a server process's."""
        ours = {"pid": pid}
        with self._read_one() as conn:
            if conn.execute(_END_SESSION, ours).first() is None:
                return  # no such session: it has ended already
        deadline = time.monotonic() + wait
        pause = 0.002
        while time.monotonic() < deadline:
            with self._read_one() as conn:
                if conn.execute(_SESSION_ALIVE, ours).first() is None:
                    return
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        logger.warning("the server process %s of a lost connection did not end in %s s", pid, wait)

    def _lease_in(
        self,
        transaction: Any,
        conversation_id: str,
        *,
        owner: str | None,
        params: dict[str, Any],
        rows: builtins.list[dict[str, Any]],
        indexed: builtins.list[dict[str, Any] | None],
        quota: _usage.QuotaAsk | None,
        single: bool,
        window: bool = False,
        after_reply: bool = False,
    ) -> tuple[Any, builtins.list[Message], _usage.Reservation | None, tuple[int, Any, int] | None]:
        """The write of :meth:`_take_turn` in ``transaction`` (a ``_write``): the lease, the
        turn's messages and their search rows, and the reservation. ``single`` (Postgres,
        one message): one autocommit statement, which with ``quota`` takes nothing where a
        limit applies (``_Limited``). ``after_reply``: see :meth:`_take_turn`.
        Last comes the window's start as that statement read it (Postgres, one message:
        see :func:`_take_lease_with_message`; SQLite, with ``window``: see
        :func:`_anchors_json`, the anchors still as that JSON text), or None."""
        c = _conversations.c
        now = params["t_now"]
        check = single and quota is not None
        start = None
        with transaction as conn:
            # One UPDATE takes the lease only where it is free, so two requests racing for it
            # are ordered by the row lock (Postgres) or the write lock (SQLite): one wins.
            if self.dialect == "postgresql" and len(rows) == 1:
                values = {f"m_{name}": value for name, value in rows[0].items()}
                values.update(m_conversation_id=conversation_id, m_created_at=now)
                searched = indexed[0] is not None
                if indexed[0] is not None:
                    values["s_document"] = indexed[0]["document"]
                statement = _TAKE_LEASE_WITH_MESSAGE[(owner is not None, searched, check, after_reply)]
                found = conn.execute(statement, {**params, **values}).all()
                row = found[0] if found else None
                inserted = True
                if row is not None and row.anchors_fresh and not _is_anchor(rows[0]):
                    # The window's first read, done by this statement (see _take_lease_with_message).
                    anchors = [r[-len(_ANCHOR_COLUMNS) :] for r in found if r.a_seq is not None]
                    start = (row.tokens_total, anchors, row.last_seq)
            else:
                # SQLite holds the write lock from BEGIN: the anchors read are those at commit.
                reads = window and self.dialect == "sqlite" and not any(_is_anchor(r) for r in rows)
                row = conn.execute(_TAKE_LEASE[(owner is not None, bool(rows), reads)], params).first()
                inserted = False
                if row is not None and reads:
                    start = (row.tokens_total, row.anchors, row.last_seq)
            if row is None:
                holder = conn.execute(
                    select(c.lease_token, c.lease_expires_at, *_AFTER_REPLY[after_reply]).where(
                        c.id == conversation_id, _owner_clause(owner)
                    ),
                    {"t_model": params["t_model"]},
                ).first()
                if holder is None:
                    raise ConversationNotFound(conversation_id)
                if after_reply and not holder.after_reply:
                    raise NotAfterReply(conversation_id)
                held_now = _lease_held(holder.lease_token, holder.lease_expires_at, now)
                if check and not held_now:
                    # The statement's own check took nothing (a limit applied when it ran, if
                    # none does now): the reserving transaction decides.
                    raise _Limited
                if after_reply and not held_now:
                    # The statement waited for the row while another turn stored its reply
                    # and freed the lease: its EXISTS, read from the snapshot it began with,
                    # could not see that reply. Not busy: the long way takes the turn.
                    raise NotAfterReply(conversation_id)
                raise ConversationBusy(conversation_id, expires_at=holder.lease_expires_at)
            held = None
            if quota is not None and row.quota_applies:
                held = self._reserve_in(conn, owner, quota.hold(row.tokens_total), quota.model, now)
            first = row.last_seq - len(rows) + 1
            added = [
                Message(conversation_id=conversation_id, seq=first + i, created_at=now, **columns)
                for i, columns in enumerate(rows)
            ]
            if rows and not inserted:
                # Running totals: the conversation's total after the last message, less
                # what the later messages of this turn add.
                totals = []
                total = row.tokens_total
                for columns in reversed(rows):
                    totals.append(total)
                    total -= columns["tokens"] or 0
                conn.execute(
                    _INSERT_MESSAGE,
                    [
                        {
                            "conversation_id": conversation_id,
                            "seq": m.seq,
                            "created_at": now,
                            "tokens_total": t,
                            **r,
                        }
                        for m, r, t in zip(added, rows, reversed(totals), strict=True)
                    ],
                )
                search_rows = [
                    {"cid": conversation_id, "seq": m.seq, **found}
                    for m, found in zip(added, indexed, strict=True)
                    if found is not None
                ]
                if search_rows:
                    _search.insert_rows(conn, search_rows)
        return row, added, held, start

    def _end_turn(self, conversation_id: str, token: str) -> bool:
        """Release the lease ``token`` without storing a reply (the request failed).

        True if it was released; a lease that is not (or no longer) this token's is left
        alone, so a late release can never free another request's turn.
        """
        c = _conversations.c
        with self._write() as conn:
            released = conn.execute(
                update(_conversations)
                .where(c.id == conversation_id, c.lease_token == token)
                .values(lease_token=None, lease_expires_at=None)
            ).rowcount
        return bool(released)

    def _renew_turn(
        self, conversation_id: str, token: str, *, lease_seconds: float = DEFAULT_TURN_LEASE_SECONDS
    ) -> bool:
        """Extend the lease ``token`` to ``lease_seconds`` from now (a turn that runs long).

        False, and nothing changed, when the lease is no longer this token's.
        """
        c = _conversations.c
        with self._write() as conn:
            renewed = conn.execute(
                update(_conversations)
                .where(c.id == conversation_id, c.lease_token == token)
                .values(lease_expires_at=self._clock() + dt.timedelta(seconds=lease_seconds))
            ).rowcount
        return bool(renewed)

    def _check_owner(self, conversation_id: str, owner: str | None, conn: Any = None) -> None:
        """Raise ConversationNotFound unless this owner has this conversation: every read
        through a handle checks it, so a handle whose ``id`` was swapped (for instance with
        ``dataclasses.replace``) reads nothing of another owner's. An id never changes
        owner, so checking in a transaction of its own is as good as in the reader's."""
        if not _could_exist(conversation_id, owner):
            raise ConversationNotFound(conversation_id)
        query = _CONVERSATION_EXISTS[owner is not None]
        params = {"cid": conversation_id, "owner": owner}
        if conn is None:
            with self._read_one() as conn:
                found = conn.execute(query, params).first()
        else:
            found = conn.execute(query, params).first()
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

    def _with_last_messages(
        self, conversation_id: str, *, owner: str | None, count: int
    ) -> tuple[Conversation, builtins.list[Message]]:
        """This owner's conversation (else ConversationNotFound) and its last ``count``
        messages in order (those with seq above ``last_seq - count``), read with one
        statement: what the gateway checks a completion against."""
        if not _could_exist(conversation_id, owner):
            raise ConversationNotFound(conversation_id)
        with self._read_one() as conn:
            rows = conn.execute(
                _CONVERSATION_AND_LAST[owner is not None],
                {"cid": conversation_id, "owner": owner, "count": count},
            ).all()
        if not rows:
            raise ConversationNotFound(conversation_id)
        names = Message.__dataclass_fields__
        messages = [
            _message_from_row({name: row._mapping[f"m_{name}"] for name in names})
            for row in rows
            if row._mapping["m_seq"] is not None
        ]
        return self._conversation_from_row(rows[0]), messages

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
            # The copied messages keep their running totals: a prefix's totals are its own.
            total = conn.execute(
                select(_messages.c.tokens_total)
                .where(_messages.c.conversation_id == source.id, _messages.c.seq <= at)
                .order_by(_messages.c.seq.desc())
                .limit(1)
            ).scalar()
            conn.execute(
                insert(_conversations).values(
                    id=new_id,
                    owner=row.owner,
                    title=title if title is not None else row.title,
                    model=row.model,
                    metadata=row.metadata,
                    last_seq=at,
                    tokens_total=total or 0,
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
            _search.copy_rows(conn, source=source.id, new=new_id, at=at)
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

    def _delete_message(self, conversation_id: str, owner: str | None, seq: int) -> None:
        if not isinstance(seq, int) or isinstance(seq, bool) or not _could_exist(conversation_id, owner):
            raise MessageNotFound(conversation_id, seq)
        m = _messages.c
        with self._write() as conn:
            owned = conn.execute(
                select(_conversations.c.id).where(
                    _conversations.c.id == conversation_id, _owner_clause(owner)
                )
            ).first()
            row = conn.execute(
                select(m.role, m.tool_calls).where(m.conversation_id == conversation_id, m.seq == seq)
            ).first()
            if owned is None or row is None:
                raise MessageNotFound(conversation_id, seq)
            if row.role == "tool" or row.tool_calls:
                raise ValueError(
                    "tool calls and tool results cannot be deleted on their own: the API refuses a "
                    "history holding only half of the pair; fork the conversation before them instead"
                )
            conn.execute(delete(_messages).where(m.conversation_id == conversation_id, m.seq == seq))
            conn.execute(
                update(_conversations)
                .where(_conversations.c.id == conversation_id)
                .values(updated_at=self._clock())
            )

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

    def _add_summary(self, summary: Summary, owner: str | None) -> Summary:
        """Store ``summary`` (checked by :meth:`Conversation.add_summary`), or return the one
        another process stored first for the same range."""
        conversation_id, to_seq = summary.conversation_id, summary.to_seq
        values = {name: getattr(summary, name) for name in Summary.__dataclass_fields__}
        event = self._ledger_event(
            owner, conversation_id, summary.model, "summary", summary.usage, now=summary.created_at
        )
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
        return summary

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
