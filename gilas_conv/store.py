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
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from sqlalchemy import Engine, Row, Table, bindparam, delete, func, insert, literal, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import tokens as _tokens
from ._config import DEFAULT_MODEL, DEFAULT_SQLITE_BUSY_TIMEOUT_MS, DEFAULT_SQLITE_SYNCHRONOUS
from ._config import resolve_database_url as _resolve_database_url
from ._engine import WRITE, create_engine_for_url, redact_url
from ._migrate import current_revision, head_revision, upgrade_database
from ._schema import ROLES, STATUSES, ConversationRow, MessageRow, SummaryRow
from .exceptions import (
    ConversationNotFound,
    MessageNotFound,
    SchemaOutOfDate,
    StoreError,
    StoreIntegrityError,
)

__all__ = ["Conversation", "ConversationStore", "Message", "Role", "Summary"]

Role = Literal["system", "developer", "user", "assistant", "tool"]

_conversations = cast(Table, ConversationRow.__table__)
_messages = cast(Table, MessageRow.__table__)
_summaries = cast(Table, SummaryRow.__table__)

# Content-part types the chat-completions API accepts, per role.
_USER_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file"})
_TEXT_PART_TYPES = frozenset({"text"})
_ASSISTANT_PART_TYPES = frozenset({"text", "refusal"})

DEFAULT_LIST_LIMIT = 50


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# Keys gilas-conv lets callers add to an image part for token estimates only (the pixel size
# of an image the API would otherwise have to fetch); stored, but never sent.
_IMAGE_HINT_KEYS = ("width", "height")


def openai_message(
    role: str,
    content: Any,
    name: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    tool_call_id: str | None = None,
) -> dict[str, Any]:
    """A message dict exactly as the chat-completions API accepts it."""
    if isinstance(content, list):
        content = [_api_part(part) for part in content]
    out: dict[str, Any] = {"role": role, "content": content}
    if name is not None:
        out["name"] = name
    if tool_calls:
        out["tool_calls"] = tool_calls
    if tool_call_id is not None:
        out["tool_call_id"] = tool_call_id
    return out


def _api_part(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url") if part.get("type") == "image_url" else None
    if isinstance(image, dict) and any(key in image for key in _IMAGE_HINT_KEYS):
        image = {k: v for k, v in image.items() if k not in _IMAGE_HINT_KEYS}
        return {**part, "image_url": image}
    return part


# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class Message:
    """One stored message. ``seq`` counts from 1 within its conversation."""

    conversation_id: str
    seq: int
    role: str
    content: Any
    created_at: dt.datetime
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    pinned: bool = False
    status: str = "complete"
    tokens: int | None = None
    tokens_encoding: str | None = None
    response_id: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    predicted_prompt_tokens: int | None = None
    reply_to: int | None = None
    extra: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def to_openai(self) -> dict[str, Any]:
        """The message as the chat-completions API expects it in ``messages``."""
        return openai_message(self.role, self.content, self.name, self.tool_calls, self.tool_call_id)

    def to_export(self) -> dict[str, Any]:
        """The message in gilas-conv's export format (see :meth:`Conversation.export`)."""
        out = self.to_openai()
        out["created_at"] = self.created_at.isoformat()
        out["status"] = self.status
        for key in ("pinned", "response_id", "model", "finish_reason", "usage"):
            value = getattr(self, key)
            if value:
                out[key] = value
        for key in ("predicted_prompt_tokens", "reply_to", "extra"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class Summary:
    """A stored summary standing in for messages ``from_seq``..``to_seq`` (inclusive)."""

    conversation_id: str
    from_seq: int
    to_seq: int
    content: str
    created_at: dt.datetime
    model: str | None = None
    tokens: int | None = None
    tokens_encoding: str | None = None
    usage: dict[str, Any] | None = None


_MESSAGE_COLUMNS = tuple(_messages.c[name] for name in Message.__dataclass_fields__)


def _message_from_row(row: Row[Any] | Mapping[str, Any]) -> Message:
    data = row._mapping if isinstance(row, Row) else row
    return Message(**{name: data[name] for name in Message.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# Validation: everything is checked before a transaction starts.


def _check_str(value: Any, what: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} contains a lone surrogate at index {err.start} ({value[err.start]!r}); "
            "it is not valid Unicode text and cannot be stored"
        ) from err
    return value


# Column sizes of the short text fields (see _schema); Postgres enforces them, SQLite does
# not, so they are checked here for both.
_SHORT = 255
_ID_LENGTH = 36
_FINISH_REASON_MAX = 64


def _check_field(value: Any, what: str, *, max_length: int | None = _SHORT, allow_empty: bool = True) -> str:
    """A short text field (ids, names, models, titles): text, no NUL, within its column."""
    _check_str(value, what, allow_empty=allow_empty)
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    if max_length is not None and len(value) > max_length:
        raise ValueError(f"{what} is {len(value)} characters long; at most {max_length} are stored")
    return value


def _lookup_key(value: str | None, max_length: int) -> bool:
    """Whether ``value`` could be a stored id or owner at all (else it is simply not found)."""
    return value is None or ("\x00" not in value and len(value) <= max_length)


def _check_int(value: Any, what: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{what} must be an integer (>= 0), not {value!r}")
    return value


def _check_json(value: Any, what: str) -> Any:
    """Check that ``value`` is plain JSON data with valid Unicode strings; return it."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{what} contains {value!r}, which JSON cannot represent")
        return value
    if isinstance(value, str):
        return _check_str(value, what)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{what} has a non-string key {key!r}")
            _check_str(key, f"a key of {what}")
            _check_json(item, f"{what}[{key!r}]")
        return value
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{what}[{index}]")
        return value
    raise ValueError(f"{what} must be JSON data (str, number, list, dict), not {type(value).__name__}")


def _check_content(role: str, content: Any, *, has_tool_calls: bool) -> Any:
    if content is None:
        if role == "assistant" and has_tool_calls:
            return None
        raise ValueError(
            f"content of a {role} message must be a string"
            + (" (only an assistant message with tool_calls may have null content)")
        )
    if isinstance(content, str):
        return _check_str(content, "content")
    if isinstance(content, list | tuple):
        allowed = (
            _USER_PART_TYPES
            if role == "user"
            else _ASSISTANT_PART_TYPES
            if role == "assistant"
            else _TEXT_PART_TYPES
        )
        parts = []
        for index, part in enumerate(content):
            where = f"content[{index}]"
            if not isinstance(part, Mapping):
                raise ValueError(f"{where} must be a content part object, not {type(part).__name__}")
            kind = part.get("type")
            if kind not in allowed:
                raise ValueError(
                    f"{where} has type {kind!r}; a {role} message accepts {', '.join(sorted(allowed))}"
                )
            if kind == "text":
                _check_str(part.get("text"), f"{where}.text")
            elif kind == "refusal":
                _check_str(part.get("refusal"), f"{where}.refusal")
            elif kind == "image_url":
                image = part.get("image_url")
                if not isinstance(image, Mapping) or not isinstance(image.get("url"), str):
                    raise ValueError(f'{where} must look like {{"image_url": {{"url": "..."}}}}')
            _check_json(part, where)
            parts.append(dict(part))
        return parts
    raise ValueError(f"content must be a string or a list of content parts, not {type(content).__name__}")


def _check_tool_calls(tool_calls: Any) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list | tuple) or not tool_calls:
        raise ValueError("tool_calls must be a non-empty list")
    out = []
    for index, call in enumerate(tool_calls):
        where = f"tool_calls[{index}]"
        if not isinstance(call, Mapping):
            raise ValueError(f"{where} must be an object")
        _check_field(call.get("id"), f"{where}.id", max_length=None, allow_empty=False)
        function = call.get("function")
        if call.get("type", "function") == "function":
            if not isinstance(function, Mapping):
                raise ValueError(f"{where}.function must be an object with name and arguments")
            _check_str(function.get("name"), f"{where}.function.name", allow_empty=False)
            _check_str(function.get("arguments"), f"{where}.function.arguments")
        _check_json(call, where)
        out.append(dict(call))
    return out


def _validate_message(
    role: Any,
    content: Any,
    *,
    name: Any = None,
    tool_calls: Any = None,
    tool_call_id: Any = None,
    status: Any = "complete",
    pinned: Any = False,
) -> dict[str, Any]:
    """Check one message; return its columns. Raises ValueError, having touched nothing."""
    if not isinstance(pinned, bool):
        raise ValueError("pinned must be True or False")
    if pinned and (role == "tool" or tool_calls is not None):
        # Sent alone, half of a tool-call pair makes the API refuse the request.
        raise ValueError(
            "tool calls and tool results cannot be pinned on their own; "
            "pin the user message or a plain reply instead"
        )
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
    if tool_calls is not None and role != "assistant":
        raise ValueError("only assistant messages may have tool_calls")
    calls = _check_tool_calls(tool_calls) if tool_calls is not None else None
    if role == "tool":
        if tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        _check_field(tool_call_id, "tool_call_id", allow_empty=False)
    elif tool_call_id is not None:
        raise ValueError("only tool messages may have a tool_call_id")
    if name is not None:
        _check_field(name, "name", allow_empty=False)
    # An interrupted streamed reply may have no text yet; it is stored as "".
    checked = _check_content(role, content, has_tool_calls=calls is not None)
    return {
        "role": role,
        "content": checked,
        "name": name,
        "tool_calls": calls,
        "tool_call_id": tool_call_id,
        "status": status,
        "pinned": pinned,
    }


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


class _DriverAppend:
    """An append's two statements run on the SQLite driver's own cursor.

    An append is the hot path of every turn, and SQLAlchemy's per-statement machinery costs
    about three times what SQLite itself spends on the UPDATE and INSERT. The SQL is compiled
    by SQLAlchemy once per dialect and the values go through the columns' own bind
    processors (JSON, timestamps, booleans), so what is stored is exactly what the Core
    statements would store; the transaction is the one ``_Transaction`` began.
    """

    def __init__(self, dialect: Any) -> None:
        self._bump = {
            owned: self._prepare(_BUMP_OWNED if owned else _BUMP_UNOWNED, dialect) for owned in (True, False)
        }
        self._insert = self._prepare(_INSERT_MESSAGE, dialect)

    @staticmethod
    def _prepare(statement: Any, dialect: Any) -> tuple[str, list[tuple[str, Any, Any]]]:
        """The SQL, and per positional parameter: its name, its type's bind processor, and
        the value bound in the statement itself (the 1 of ``last_seq + 1``)."""
        compiled = statement.compile(dialect=dialect)
        binds = compiled.binds
        return compiled.string, [
            (key, binds[key].type.bind_processor(dialect), binds[key].value) for key in compiled.positiontup
        ]

    @staticmethod
    def _args(prepared: tuple[str, list[tuple[str, Any, Any]]], values: Mapping[str, Any]) -> list[Any]:
        args = []
        for key, process, default in prepared[1]:
            if key in values:
                value = values[key]
            elif default is not None:
                value = default
            else:  # every column is given explicitly; a missing one is a bug here
                raise KeyError(f"no value for {key!r}")
            args.append(process(value) if process is not None else value)
        return args

    def run(self, conn: Any, bump: Mapping[str, Any], row: dict[str, Any], *, owned: bool) -> int | None:
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            sql, _ = prepared = self._bump[owned]
            found = cursor.execute(sql, self._args(prepared, bump)).fetchone()
            if found is None:
                return None
            row["seq"] = seq = found[0]
            cursor.execute(self._insert[0], self._args(self._insert, row))
            return int(seq)
        finally:
            cursor.close()


def _check_reply_fields(response_id: Any, model: Any, finish_reason: Any) -> None:
    if response_id is not None:
        _check_field(response_id, "response_id")
    if model is not None:
        _check_field(model, "model")
    if finish_reason is not None:
        _check_field(finish_reason, "finish_reason", max_length=_FINISH_REASON_MAX)


def _check_conversation_id(conversation_id: Any) -> str:
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        raise ValueError("conversation id must be a non-empty string")
    return conversation_id


def _could_exist(conversation_id: Any, owner: Any, *, any_id: bool = False) -> bool:
    """Check lookup arguments; False when no stored conversation can match them (an id or
    owner with NUL or longer than its column), which callers report as not found."""
    if not any_id:
        _check_conversation_id(conversation_id)
    if owner is not None and not isinstance(owner, str):
        raise ValueError(f"owner must be a string or None, not {type(owner).__name__}")
    return (any_id or _lookup_key(conversation_id, _ID_LENGTH)) and _lookup_key(owner, _SHORT)


def _owner_clause(owner: str | None) -> Any:
    column = _conversations.c.owner
    return column.is_(None) if owner is None else column == owner


def _parse_timestamp(value: Any, what: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as err:
            raise ValueError(f"{what} is not an ISO 8601 timestamp: {value!r}") from err
    else:
        raise ValueError(f"{what} must be an ISO 8601 timestamp string")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc)


# ---------------------------------------------------------------------------------------------
# The conversation handle


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
        return self.store._messages(self.id, after=after, limit=limit)

    def iter_messages(self, *, batch_size: int = 1000) -> Iterator[Message]:
        """The history in order, read in batches, for conversations too long to hold at once."""
        after = 0
        while True:
            batch = self.store._messages(self.id, after=after, limit=batch_size)
            yield from batch
            if len(batch) < batch_size:
                return
            after = batch[-1].seq

    def message(self, seq: int) -> Message:
        """The message with sequence number ``seq``; raises MessageNotFound."""
        found = self.store._messages(self.id, after=seq - 1, limit=1)
        if not found or found[0].seq != seq:
            raise MessageNotFound(self.id, seq)
        return found[0]

    def last_message(self) -> Message | None:
        return self.store._last_message(self.id)

    def fork(self, at: int | None = None, *, title: str | None = None) -> Conversation:
        """A new conversation holding a copy of messages 1..``at`` (all when None)."""
        return self.store._fork(self, at=at, title=title)

    def pin(self, seq: int, pinned: bool = True) -> None:
        """Mark a message to be kept in every context window (or unmark it)."""
        self.store._pin(self.id, seq, pinned)

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
        return self.store._summaries(self.id)

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
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        auto_upgrade: bool | None = None,
        sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS,
        sqlite_busy_timeout_ms: int = DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        resolved, _embedded = _resolve_database_url(url)
        self._engine = create_engine_for_url(
            resolved,
            sqlite_synchronous=sqlite_synchronous,
            sqlite_busy_timeout_ms=sqlite_busy_timeout_ms,
            **dict(engine_options or {}),
        )
        self.url = redact_url(self._engine.url.render_as_string(hide_password=False))
        self.dialect = self._engine.dialect.name
        self._driver_append = _DriverAppend(self._engine.dialect) if self.dialect == "sqlite" else None
        if auto_upgrade is None:
            auto_upgrade = self.dialect == "sqlite"
        try:
            self._ensure_schema(auto_upgrade)
        except BaseException:
            self._engine.dispose()
            raise

    def _ensure_schema(self, auto_upgrade: bool) -> None:
        try:
            current = current_revision(self._engine)
            head = head_revision()
            if current == head:
                return
            if auto_upgrade:
                upgrade_database(self._engine)
                return
        except DBAPIError as err:
            raise StoreError(f"cannot open the database {self.url}: {err.orig}") from err
        raise SchemaOutOfDate(self.url, current, head)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for the truncation fast path and advanced use)."""
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
            first.update(_token_columns(first, model))
        now = _now()
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
                prepared.append(_prepare_import(data, model))
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
        columns.update(_token_columns(columns, conversation_model))
        now = _now()
        try:
            with self._write() as conn:
                bump = {"b_cid": conversation_id, "b_owner": owner, "b_now": now}
                row = {"conversation_id": conversation_id, "created_at": now, **columns}
                if self._driver_append is not None:
                    seq = self._driver_append.run(conn, bump, row, owned=owner is not None)
                else:
                    statement = _BUMP_UNOWNED if owner is None else _BUMP_OWNED
                    seq = conn.execute(statement, bump).scalar()
                    if seq is not None:
                        conn.execute(_INSERT_MESSAGE, {**row, "seq": seq})
                if seq is None:
                    raise ConversationNotFound(conversation_id)
        except StoreIntegrityError:
            if response_id is None:
                raise
            existing = self._by_response_id(conversation_id, response_id)
            if existing is None:
                raise
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

    def _messages(
        self, conversation_id: str, *, after: int = 0, limit: int | None = None
    ) -> builtins.list[Message]:
        query = (
            select(*_MESSAGE_COLUMNS)
            .where(_messages.c.conversation_id == conversation_id, _messages.c.seq > after)
            .order_by(_messages.c.seq)
        )
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [_message_from_row(row) for row in conn.execute(query)]

    def _last_message(self, conversation_id: str) -> Message | None:
        with self._read() as conn:
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
        now = _now()
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

    def _pin(self, conversation_id: str, seq: int, pinned: bool) -> None:
        with self._write() as conn:
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
        values["updated_at"] = _now()
        with self._write() as conn:
            changed = conn.execute(
                update(_conversations)
                .where(_conversations.c.id == conversation_id, _owner_clause(owner))
                .values(**values)
            ).rowcount
        if not changed:
            raise ConversationNotFound(conversation_id)

    def _summaries(self, conversation_id: str) -> builtins.list[Summary]:
        with self._read() as conn:
            rows = conn.execute(
                select(_summaries)
                .where(_summaries.c.conversation_id == conversation_id)
                .order_by(_summaries.c.to_seq)
            ).all()
        return [
            Summary(**{name: row._mapping[name] for name in Summary.__dataclass_fields__}) for row in rows
        ]

    def _add_summary(
        self,
        conversation_id: str,
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
        now = _now()
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
        try:
            with self._write() as conn:
                conn.execute(insert(_summaries).values(**values))
        except StoreIntegrityError:
            # Another process summarized the same range first; theirs is as good as ours.
            for summary in self._summaries(conversation_id):
                if summary.to_seq == to_seq:
                    return summary
            raise
        return Summary(**values)


def _token_columns(columns: Mapping[str, Any], model: str) -> dict[str, Any]:
    encoding = _tokens.encoding_name_for_model(model)
    message = {"role": columns["role"], "content": columns.get("content")}
    for key in ("name", "tool_calls", "tool_call_id"):
        if columns.get(key) is not None:
            message[key] = columns[key]
    return {"tokens": _tokens.message_tokens(message, encoding), "tokens_encoding": encoding}


def _prepare_import(data: Any, model: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate one conversation to import: its ``conversations`` row and its message rows."""
    if isinstance(data, Mapping):
        if not isinstance(data.get("messages"), list):
            raise ValueError('expected an object with a "messages" list')
        raw_messages = data["messages"]
        header: Mapping[str, Any] = data
    elif isinstance(data, list):
        raw_messages, header = data, {}
    else:
        raise ValueError("expected an exported conversation object or a list of messages")
    model = model or header.get("model") or DEFAULT_MODEL
    _check_field(model, "model", allow_empty=False)
    title = header.get("title")
    if title is not None:
        _check_field(title, "title", max_length=None)
    metadata = header.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError("metadata must be an object")
    _check_json(metadata, "metadata")
    now = _now()
    created_at = _parse_timestamp(header["created_at"], "created_at") if "created_at" in header else now
    rows = []
    for index, raw in enumerate(raw_messages):
        try:
            rows.append(_import_message(raw, model, now))
        except ValueError as err:
            raise ValueError(f"message {index + 1}: {err}") from err
    for seq, row in enumerate(rows, start=1):
        row["seq"] = seq
        created_at = min(created_at, row["created_at"])
    conversation = {
        "id": str(uuid.uuid4()),
        "title": title,
        "model": model,
        "metadata": dict(metadata) if metadata is not None else None,
        "last_seq": len(rows),
        "created_at": created_at,
        "updated_at": max([now, *(r["created_at"] for r in rows)]),
    }
    return conversation, rows


def _import_message(raw: Any, model: str, now: dt.datetime) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError("each message must be an object")
    known = {
        "role", "content", "name", "tool_calls", "tool_call_id", "created_at", "status", "pinned",
        "response_id", "model", "finish_reason", "usage", "predicted_prompt_tokens", "reply_to", "extra",
        "refusal", "seq", "tokens", "tokens_encoding",
    }  # fmt: skip
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    if "content" not in raw and not raw.get("tool_calls"):
        raise ValueError('missing "content"')
    columns = _validate_message(
        raw.get("role"),
        raw.get("content"),
        name=raw.get("name"),
        tool_calls=raw.get("tool_calls"),
        tool_call_id=raw.get("tool_call_id"),
        status=raw.get("status", "complete"),
        pinned=raw.get("pinned", False),
    )
    _check_reply_fields(raw.get("response_id"), raw.get("model"), raw.get("finish_reason"))
    for key in ("response_id", "model", "finish_reason"):
        columns[key] = raw.get(key)
    for key in ("predicted_prompt_tokens", "reply_to"):
        columns[key] = _check_int(raw.get(key), key)
    usage = raw.get("usage")
    if usage is not None and not isinstance(usage, Mapping):
        raise ValueError("usage must be an object")
    columns["usage"] = _check_json(usage, "usage")
    columns["extra"] = _check_json(raw.get("extra"), "extra")
    columns["created_at"] = (
        _parse_timestamp(raw["created_at"], "created_at") if raw.get("created_at") is not None else now
    )
    columns.update(_token_columns(columns, model))
    return columns


class _Transaction:
    """``with store._write() as conn``: one transaction, database errors translated.

    Write transactions ask SQLite for the write lock up front (BEGIN IMMEDIATE).
    """

    def __init__(self, engine: Engine, *, write: bool) -> None:
        self._engine = engine
        self._write = write
        self._conn: Any = None
        self._tx: Any = None

    def __enter__(self) -> Any:
        try:
            self._conn = self._engine.connect()
            if self._write:
                self._conn.execution_options(**WRITE)
            self._tx = self._conn.begin()
        except DBAPIError as err:
            if self._conn is not None:
                self._conn.close()
            raise StoreError(f"database error: {_describe(err)}") from err
        return self._conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        driver_errors = self._engine.dialect.loaded_dbapi
        if isinstance(exc, driver_errors.Error) and not isinstance(exc, DBAPIError):
            # Raised by the driver's own cursor (the SQLite append path): wrap it as
            # SQLAlchemy would have, so one translation below serves both.
            exc = DBAPIError.instance(None, None, exc, driver_errors.Error)
        try:
            if exc is None:
                self._tx.commit()
            else:
                self._tx.rollback()
        except IntegrityError as err:
            raise StoreIntegrityError(f"the database refused the write: {_describe(err)}") from err
        except DBAPIError as err:
            if exc is None:
                raise StoreError(f"database error: {_describe(err)}") from err
        finally:
            self._conn.close()
        if isinstance(exc, IntegrityError):
            raise StoreIntegrityError(f"the database refused the write: {_describe(exc)}") from exc
        if isinstance(exc, DBAPIError):
            raise StoreError(f"database error: {_describe(exc)}") from exc


def _describe(err: DBAPIError) -> str:
    """The driver's message alone: SQLAlchemy's text would echo every bound parameter."""
    text = str(err.orig).strip().splitlines()
    return text[0][:500] if text else type(err.orig).__name__
