"""Choosing what of a stored conversation is sent: the context window of one turn.

The store keeps every message; :func:`build_context` decides which of them go into the
next request so that the prompt fits the model's window, and counts the prompt exactly.

Budget
    ``available = context_limit - reserved_for_reply - tool_definitions - reply_priming``
    where ``context_limit`` defaults to the model's window (see :mod:`gilas_conv.tokens`'s
    registry) and ``reserved_for_reply`` is ``max_tokens`` when given, else
    :data:`DEFAULT_REPLY_RESERVE` (capped at the model's maximum output).

Default policy (``policy="truncate"``)
    * System and developer messages, and pinned messages, are always sent.
    * The rest of the history is cut into turns: a turn is a user message and everything
      after it up to the next user message (the replies, tool calls and tool results).
      Whole turns are kept from the newest backwards while they fit; the oldest are dropped.
      So the window never starts with an assistant or tool message, and an assistant
      message with ``tool_calls`` always travels with its tool results.
    * An assistant ``tool_calls`` message whose results are not all stored, and tool
      results whose call is not sent, are left out: the API rejects either.
    * Incomplete (interrupted) replies are left out unless ``include_incomplete=True``.
    * If the system messages plus the newest turn do not fit, :class:`ContextWindowExceeded`
      is raised with the numbers; a message is never cut in half.

``policy="summarize"``
    As above, but when turns are dropped a summary of them is sent in their place, as a
    system message after the kept system messages. Summaries are produced by the
    ``summarizer`` callable (the senders provide one that asks the API), stored in the
    ``summaries`` table with the seq range they cover, reused by later turns, and only
    extended, never redone, when more is dropped.

Cost
    Reading is two indexed range scans: the anchors (system/developer/pinned, through a
    partial index) and the newest rows, newest first, stopping as soon as the budget is
    spent (SQLite steps one query lazily; Postgres reads batches sized from the tokens still
    to fill). Content comes as JSON text and is decoded only for the messages sent. Token
    counts are stored per message at append time, so nothing
    is tokenized here unless the conversation moved to another encoding; then only the rows
    read are recounted, and written back once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import Connection, Table, Text, bindparam, select, text, type_coerce, update
from sqlalchemy import cast as sql_cast

from . import tokens as _tokens
from .exceptions import ContextWindowExceeded
from .store import openai_message
from .store._schema import ANCHOR_PREDICATE, MessageRow

if TYPE_CHECKING:
    from .store import Conversation, Summary

__all__ = [
    "DEFAULT_REPLY_RESERVE",
    "SUMMARY_MAX_TOKENS",
    "Context",
    "SummaryRequest",
    "build_context",
    "conversation_tokens",
]

# Tokens kept free for the reply when the caller does not say (max_tokens). Without a cap
# the API lets a reply run to the end of the window; we keep room for a long answer.
DEFAULT_REPLY_RESERVE = 1024
# The longest summary the summarize policy asks for, and so the room it keeps for one.
SUMMARY_MAX_TOKENS = 600
SUMMARY_PREFIX = "Summary of the earlier part of this conversation, which is not repeated here:\n"

# SQLite steps its cursor on demand, so the newest rows are read from one open query, a
# chunk at a time, until the budget is spent. Postgres drivers fetch a whole result at
# once, so there rows are read in batches sized from the tokens still to fill: the first
# guessing a short message, the next from the average so far.
_CHUNK = 32
_FIRST_BATCH = 512
_FIRST_BATCH_TOKENS_PER_ROW = 48
_MIN_BATCH = 16
_MAX_BATCH = 4096
_BATCH_MARGIN = 1.25

_m = cast(Table, MessageRow.__table__)
_FULL_COLUMNS = (
    _m.c.seq,
    _m.c.role,
    _m.c.content,
    _m.c.name,
    _m.c.tool_calls,
    _m.c.tool_call_id,
    _m.c.pinned,
    _m.c.status,
    _m.c.tokens,
    _m.c.tokens_encoding,
)
# What choosing the window needs of each of the newest rows (their content is added below).
_LIGHT_COLUMNS = (
    _m.c.seq,
    _m.c.role,
    # Raw JSON text: nearly always NULL, and decoded here only when it is not.
    type_coerce(_m.c.tool_calls, Text),
    _m.c.tool_call_id,
    _m.c.pinned,
    _m.c.status,
    _m.c.tokens,
    _m.c.tokens_encoding,
)
_of_conversation = _m.c.conversation_id == bindparam("cid")
# Statements are built once: building them per call costs more than running them.
_SELECT_ANCHORS = (
    select(*_FULL_COLUMNS).where(_of_conversation, text(f"({ANCHOR_PREDICATE})")).order_by(_m.c.seq)
)
# The newest rows carry their content (and name) as raw JSON text: fetching a row too many
# costs little, and only the rows sent are decoded. On Postgres the cast happens in the
# server, so the driver does not decode every row's JSON either.
_SELECT_NEWEST_SQLITE = (
    select(*_LIGHT_COLUMNS, type_coerce(_m.c.content, Text), _m.c.name)
    .where(_of_conversation)
    .order_by(_m.c.seq.desc())
)
_SELECT_NEWEST_BATCH = (
    select(*_LIGHT_COLUMNS, sql_cast(_m.c.content, Text), _m.c.name)
    .where(_of_conversation)
    .order_by(_m.c.seq.desc())
    .limit(bindparam("n"))
)
_SELECT_NEWEST_BATCH_BEFORE = _SELECT_NEWEST_BATCH.where(_m.c.seq < bindparam("before"))
_SELECT_BETWEEN = (
    select(*_FULL_COLUMNS)
    .where(_of_conversation, _m.c.seq >= bindparam("lo"), _m.c.seq <= bindparam("hi"))
    .order_by(_m.c.seq)
)
_UPDATE_TOKENS = (
    update(_m)
    .where(_m.c.conversation_id == bindparam("b_cid"), _m.c.seq == bindparam("b_seq"))
    .values(tokens=bindparam("b_tokens"), tokens_encoding=bindparam("b_encoding"))
)
_UNLOADED: Any = object()

Policy = Literal["truncate", "summarize"]


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    """What a summarizer is asked: fold ``messages`` into ``previous`` (may be None)."""

    conversation_id: str
    model: str
    previous: str | None
    messages: list[dict[str, Any]]
    from_seq: int
    to_seq: int
    max_tokens: int = SUMMARY_MAX_TOKENS


Summarizer = Callable[[SummaryRequest], str]


@dataclass(frozen=True, slots=True)
class Context:
    """The messages of one request, and the accounting behind them."""

    messages: list[dict[str, Any]]
    prompt_tokens: int
    dropped: int
    model: str
    encoding: str
    context_limit: int
    reserved: int
    tools_tokens: int
    available: int
    seqs: tuple[int, ...] = ()
    summary: Summary | None = None

    @property
    def free(self) -> int:
        """Prompt tokens still free in the window after this context."""
        return self.context_limit - self.reserved - self.prompt_tokens


@dataclass(slots=True)
class _Row:
    seq: int
    role: str
    content: Any
    name: str | None
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    pinned: bool
    status: str
    tokens: int
    raw: str | None = None  # content as stored JSON text, decoded only if the row is sent

    def to_openai(self) -> dict[str, Any]:
        return openai_message(self.role, self.content, self.name, self.tool_calls, self.tool_call_id)

    def _stored(self) -> dict[str, Any]:
        """The message as stored (image size hints kept), for counting its tokens."""
        out = {"role": self.role, "content": self.content}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@functools.cache
def _sqlite_sql(dialect: Any) -> str:
    compiled = _SELECT_NEWEST_SQLITE.compile(dialect=dialect)
    assert compiled.positiontup == ["cid"], compiled.positiontup
    return compiled.string


class _Reader:
    """Reads rows of one conversation, recounting those stored under another encoding."""

    def __init__(self, conn: Connection, conversation_id: str, encoding: str) -> None:
        self.conn = conn
        self.conversation_id = conversation_id
        self.encoding = encoding
        self.recounted: list[dict[str, Any]] = []

    def _full_rows(self, statement: Any, **params: Any) -> list[_Row]:
        rows = []
        for seq, role, content, name, calls, call_id, pinned, status, count, enc in self.conn.execute(
            statement, {"cid": self.conversation_id, **params}
        ):
            row = _Row(seq, role, content, name, calls, call_id, bool(pinned), status, count or 0)
            if enc != self.encoding or count is None:
                self._recount(row)
            rows.append(row)
        return rows

    def _recount(self, row: _Row) -> None:
        row.tokens = _tokens.message_tokens(row._stored(), self.encoding)
        self.recounted.append({"b_seq": row.seq, "b_tokens": row.tokens})

    def anchors(self) -> list[_Row]:
        return self._full_rows(_SELECT_ANCHORS)

    def newest(self, tokens_wanted: Callable[[], int]) -> Generator[list[_Row], None, None]:
        """The rows, newest first, in chunks, content still JSON text (see :meth:`load_content`),
        read only as far as the caller iterates; ``tokens_wanted`` says how many tokens the
        caller can still take, to size the next batch."""
        params: dict[str, Any] = {"cid": self.conversation_id}
        if self.conn.dialect.name == "sqlite":
            # The driver's own cursor, inside the transaction the anchors query began: rows
            # come straight from sqlite3, with no result processing (nothing here needs it).
            driver = self.conn.connection.driver_connection
            assert driver is not None, "a checked-out connection has a driver connection"
            cursor = driver.cursor()
            try:
                cursor.execute(_sqlite_sql(self.conn.dialect), (self.conversation_id,))
                while chunk := cursor.fetchmany(_CHUNK):
                    yield self._light_rows(chunk)
            finally:
                cursor.close()
            return
        statement, seen, tokens = _SELECT_NEWEST_BATCH, 0, 0
        size = max(_MIN_BATCH, min(tokens_wanted() // _FIRST_BATCH_TOKENS_PER_ROW, _FIRST_BATCH))
        while True:
            chunk = self.conn.execute(statement, {**params, "n": size}).all()
            rows = self._light_rows(chunk)
            yield rows
            if len(chunk) < size:
                return
            seen += len(rows)
            tokens += sum(r.tokens for r in rows)
            per_row = max(tokens / seen, 1.0)
            size = int(tokens_wanted() / per_row * _BATCH_MARGIN) + 1
            size = max(_MIN_BATCH, min(size, _MAX_BATCH))
            statement = _SELECT_NEWEST_BATCH_BEFORE
            params["before"] = rows[-1].seq

    def _light_rows(self, chunk: Sequence[Any]) -> list[_Row]:
        rows = []
        stale = []
        for seq, role, calls, call_id, pinned, status, count, enc, raw, name in chunk:
            if isinstance(calls, str):
                calls = json.loads(calls)
            row = _Row(seq, role, _UNLOADED, name, calls, call_id, bool(pinned), status, count or 0, raw)
            if raw is None:
                row.content = None
            if enc != self.encoding or count is None:
                stale.append(row)
            rows.append(row)
        if stale:
            # Counted under another encoding: their content is needed to count them again.
            self.load_content(stale)
            for row in stale:
                self._recount(row)
        return rows

    @staticmethod
    def load_content(rows: Sequence[_Row]) -> None:
        """Decode the content of ``rows`` (read as JSON text with them) where not done yet."""
        for row in rows:
            if row.content is _UNLOADED:
                row.content = _decode(row.raw)

    def between(self, first: int, last: int) -> list[_Row]:
        return self._full_rows(_SELECT_BETWEEN, lo=first, hi=last)

    def save_recounts(self, store: Any) -> None:
        if not self.recounted:
            return
        extra = {"b_cid": self.conversation_id, "b_encoding": self.encoding}
        with store._write() as conn:
            conn.execute(_UPDATE_TOKENS, [{**row, **extra} for row in self.recounted])
        self.recounted = []


def _resolve_budget(
    model: str,
    *,
    context_limit: int | None,
    max_tokens: int | None,
    tools: Sequence[Mapping[str, Any]] | None,
) -> tuple[str, int, int, int, int]:
    """(encoding, context_limit, reserved, tools_tokens, available prompt tokens)."""
    info = _tokens.get_model_info(model)
    encoding = info.encoding
    limit = context_limit if context_limit is not None else info.context_window
    if not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"context_limit must be a positive integer, not {limit!r}")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, not {max_tokens!r}")
        reserved = max_tokens
    else:
        reserved = min(DEFAULT_REPLY_RESERVE, info.max_output_tokens, limit // 4)
    tools_cost = _tokens.tools_tokens(list(tools), encoding) if tools else 0
    available = limit - reserved - tools_cost - _tokens.REPLY_PRIMING_TOKENS
    return encoding, limit, reserved, tools_cost, available


@dataclass(slots=True)
class _Turn:
    start: int  # seq of the message that opens the turn (its user message, or the first row)
    rows: list[_Row]  # the turn's non-anchor rows that may be sent, oldest first
    cost: int


def _decode(raw: str | None) -> Any:
    """Stored JSON content back to Python. A string with no backslash has no escapes, so
    (the usual case) it is just the text between its quotes."""
    if raw is None:
        return None
    if raw[0] == '"' and raw[-1] == '"' and "\\" not in raw:
        return raw[1:-1]
    return json.loads(raw)


def _turns_newest_first(
    reader: _Reader,
    anchors: dict[int, _Row],
    include_incomplete: bool,
    tokens_wanted: Callable[[], int],
) -> Generator[tuple[_Turn, int], None, None]:
    """Yield the history as whole turns, newest first, with the highest seq seen so far.

    A turn opens at a user message (pinned or not) and runs to the next one; anchors are
    sent anyway, so only a turn's other rows are in it. Rows are read lazily, newest first
    (stop iterating and nothing more is read). The last turn may be the rows before the
    first user message.
    """
    current: list[_Row] = []  # the turn being gathered, newest row first
    cost = 0
    plain = True  # nothing in the turn that might be left out (the usual case: no filtering)
    top = max(anchors, default=0)
    with closing(reader.newest(tokens_wanted)) as chunks:
        for rows in chunks:
            if rows:
                top = max(top, rows[0].seq)
            for row in rows:
                if row.seq not in anchors:
                    current.append(row)
                    cost += row.tokens
                    if row.status != "complete" or row.tool_calls is not None or row.role == "tool":
                        plain = False
                if row.role == "user":
                    current.reverse()
                    if plain:
                        yield _Turn(row.seq, current, cost), top
                    else:
                        yield _make_turn(row.seq, current, include_incomplete), top
                    current, cost, plain = [], 0, True
    if current:
        current.reverse()
        yield _make_turn(current[0].seq, current, include_incomplete), top


def _make_turn(start: int, rows: list[_Row], include_incomplete: bool) -> _Turn:
    sendable = _sendable(rows, include_incomplete)
    return _Turn(start, sendable, sum(r.tokens for r in sendable))


def _sendable(turn: list[_Row], include_incomplete: bool) -> list[_Row]:
    """The rows of a turn that may be sent."""
    if all(r.status == "complete" and r.tool_calls is None and r.role != "tool" for r in turn):
        return turn  # the usual turn: nothing to leave out
    keep = [r for r in turn if include_incomplete or r.status == "complete"]
    answered = {r.tool_call_id for r in keep if r.role == "tool"}
    sent_calls: set[str] = set()
    result = []
    for row in keep:
        if row.role == "assistant" and row.tool_calls:
            ids = {str(call.get("id")) for call in row.tool_calls}
            if not ids <= answered:
                continue  # the API refuses a tool call without all its results
            sent_calls |= ids
        elif row.role == "tool" and row.tool_call_id not in sent_calls:
            continue  # ... and a tool result without its call
        result.append(row)
    return result


def build_context(
    conv: Conversation,
    *,
    model: str | None = None,
    context_limit: int | None = None,
    max_tokens: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    policy: Policy = "truncate",
    include_incomplete: bool = False,
    summarizer: Summarizer | None = None,
) -> Context:
    """Pick the stored messages to send for the next turn of ``conv`` (see module docs).

    Raises ContextWindowExceeded when the system messages plus the newest turn do not fit,
    and ValueError for a bad argument. Writes nothing except lazily recounted token counts
    and, with ``policy="summarize"``, a new summary.
    """
    if policy not in ("truncate", "summarize"):
        raise ValueError(f"unknown policy {policy!r}; expected 'truncate' or 'summarize'")
    if policy == "summarize" and summarizer is None:
        raise ValueError("policy='summarize' needs a summarizer (the senders provide one)")
    model = model or conv.model
    encoding, limit, reserved, tools_cost, available = _resolve_budget(
        model, context_limit=context_limit, max_tokens=max_tokens, tools=tools
    )
    store = conv.store
    store._check_owner(conv.id, conv.owner)
    with store.engine.connect() as conn:
        reader = _Reader(conn, conv.id, encoding)
        anchors = {r.seq: r for r in reader.anchors() if include_incomplete or r.status == "complete"}
        anchor_tokens = sum(r.tokens for r in anchors.values())
        left = available - anchor_tokens
        kept: list[_Turn] = []  # newest first
        truncated = False
        top = max(anchors, default=0)
        # Closed on every way out, so the open query ends before its connection does.
        with closing(_turns_newest_first(reader, anchors, include_incomplete, lambda: left)) as turns:
            for turn, top in turns:  # noqa: B007
                if not kept and turn.cost > left:
                    # The newest turn is the one being answered: it must be sent whole.
                    raise ContextWindowExceeded(
                        anchor_tokens + turn.cost + tools_cost + _tokens.REPLY_PRIMING_TOKENS,
                        limit - reserved,
                        model=model,
                    )
                if turn.cost > left:
                    truncated = True
                    break
                left -= turn.cost
                kept.append(turn)
        if left < 0:  # only anchors, and they alone do not fit
            raise ContextWindowExceeded(
                anchor_tokens + tools_cost + _tokens.REPLY_PRIMING_TOKENS, limit - reserved, model=model
            )
        summary = None
        summary_tokens = 0
        if policy == "summarize" and truncated and kept and kept[-1].start > 1:
            assert summarizer is not None
            # Make room for the summary by dropping more of the oldest kept turns (never the
            # newest); each drop widens what the summary must cover, so measure again.
            while True:
                summary = _ensure_summary(
                    store, reader, conv, model, encoding, kept[-1].start - 1, anchors, summarizer
                )
                if summary is None:
                    break
                summary_tokens = _tokens.message_tokens(_summary_message(summary), encoding)
                if summary_tokens <= left:
                    break
                if len(kept) == 1:
                    summary, summary_tokens = None, 0  # no room at all: send without it
                    break
                left += kept.pop().cost
        chosen = sorted([*anchors.values(), *(r for turn in kept for r in turn.rows)], key=lambda r: r.seq)
        reader.load_content(chosen)
    reader.save_recounts(store)
    messages = [r.to_openai() for r in chosen]
    prompt_tokens = sum(r.tokens for r in chosen) + tools_cost + _tokens.REPLY_PRIMING_TOKENS
    if summary is not None:
        # After the leading system/developer messages, before the kept history.
        at = 0
        while at < len(messages) and messages[at]["role"] in ("system", "developer"):
            at += 1
        messages.insert(at, _summary_message(summary))
        prompt_tokens += summary_tokens
    return Context(
        messages=messages,
        prompt_tokens=prompt_tokens,
        # Sequence numbers are contiguous, so everything up to the newest seen that was
        # not chosen was left out.
        dropped=top - len(chosen),
        model=model,
        encoding=encoding,
        context_limit=limit,
        reserved=reserved,
        tools_tokens=tools_cost,
        available=available,
        seqs=tuple(r.seq for r in chosen),
        summary=summary,
    )


def _summary_message(summary: Summary) -> dict[str, Any]:
    return {"role": "system", "content": SUMMARY_PREFIX + summary.content}


def _ensure_summary(
    store: Any,
    reader: _Reader,
    conv: Conversation,
    model: str,
    encoding: str,
    cut: int,
    anchors: Mapping[int, _Row],
    summarizer: Summarizer,
) -> Summary | None:
    """The stored summary covering messages up to ``cut``, extended or made if needed."""
    existing = [s for s in store._summaries(conv.id, conv.owner) if s.to_seq <= cut]
    latest = existing[-1] if existing else None
    if latest is not None and latest.to_seq == cut:
        return latest
    start = latest.to_seq + 1 if latest is not None else 1
    previous = latest.content if latest is not None else None
    from_seq = latest.from_seq if latest is not None else 1
    # Summarize in slices that fit a request of their own, folding each into the last.
    info = _tokens.get_model_info(model)
    slice_budget = max(1000, min(info.context_window // 2, 50_000))
    first = start
    while first <= cut:
        rows = reader.between(first, min(cut, first + _MAX_BATCH - 1))
        if not rows:
            break
        chunk: list[dict[str, Any]] = []
        used = 0
        last = first - 1
        for row in rows:
            if row.seq in anchors or row.status != "complete":
                last = row.seq
                continue
            if chunk and used + row.tokens > slice_budget:
                break
            chunk.append(row.to_openai())
            used += row.tokens
            last = row.seq
        if chunk:
            text = summarizer(
                SummaryRequest(
                    conversation_id=conv.id,
                    model=model,
                    previous=previous,
                    messages=chunk,
                    from_seq=from_seq,
                    to_seq=last,
                )
            )
            if not isinstance(text, str) or not text.strip():
                raise ValueError("the summarizer returned no text")
            previous = text
        first = last + 1
    if previous is None:
        return latest
    tokens = _tokens.message_tokens({"role": "system", "content": SUMMARY_PREFIX + previous}, encoding)
    summary: Summary = store._add_summary(
        conv.id,
        from_seq=from_seq,
        to_seq=cut,
        content=previous,
        model=model,
        tokens=tokens,
        tokens_encoding=encoding,
        usage=None,
    )
    return summary


def conversation_tokens(conv: Conversation, *, model: str | None = None) -> int:
    """Prompt tokens the whole stored history would take (every message, plus priming)."""
    encoding = _tokens.get_model_info(model or conv.model).encoding
    total = 0
    conv.store._check_owner(conv.id, conv.owner)
    with conv.store.engine.connect() as conn:
        reader = _Reader(conn, conv.id, encoding)
        after = 0
        while True:
            rows = reader.between(after + 1, after + _MAX_BATCH)
            total += sum(r.tokens for r in rows)
            if not rows:
                break
            after = rows[-1].seq
        reader.save_recounts(conv.store)
    return total + _tokens.REPLY_PRIMING_TOKENS
