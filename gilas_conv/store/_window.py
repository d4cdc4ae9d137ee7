"""Reading a conversation for choosing its context window: the planner's reader.

:mod:`gilas_conv.truncation` decides which messages a turn sends; it issues no SQL. It
opens a :class:`WindowReader` with :meth:`Conversation.read_window` and asks it for rows:

* :meth:`WindowReader.anchors`: the system, developer and pinned messages (one range scan
  of the partial anchor index), oldest first;
* :meth:`WindowReader.newest`: the history newest first, in chunks, read only as far as the
  caller iterates. The first chunk is one indexed range read: the running token totals
  (``messages.tokens_total``, see :mod:`._schema`) say where the newest N tokens begin, N
  being what the caller can take, so in the usual case it is exactly the rows that fit and
  the one before them. Further chunks (when rows were left out, or the totals are stale)
  are read in batches sized from the tokens the caller can still take.
  :meth:`WindowReader.newest_entries` is the same read as entries, what the planner takes:
  a usual row (complete, not pinned, no name or tool fields, counted under the reader's
  encoding) is read as four values, ``(seq, role, tokens, raw JSON content)``, and made no
  object of; only the other rows are read again whole, as WindowRow objects;
* :meth:`WindowReader.between`: a seq range, oldest first (what a summary must cover);
* :meth:`WindowReader.summaries`: the stored summaries, by ``to_seq``.

The totals only decide how far the first read reaches; which rows are sent is decided by
the planner from the rows themselves, so a stale or missing total changes how many rows are
read, never the result.

On SQLite everything is read in one read transaction (a consistent snapshot). On Postgres
under READ COMMITTED, its default, each statement reads a snapshot of its own, in a
transaction or not, so the statements run in autocommit mode, without the BEGIN and COMMIT
round trips (at a stricter isolation level they share one read transaction). The first read
(the running total and the anchors) of a sender's turn is made by the turn's lease
statement itself, one statement less (see ``read_window``'s ``start``); on SQLite that
statement holds the write lock, so it reads the conversation as the turn committed it, and
the later reads see it as it is then, as Postgres's statements each do. Either way
the connection comes from the store's error-translating path (:mod:`._tx`), so a database
error is a :class:`~gilas_conv.StoreError`. The connection is returned when the ``with``
block ends; nothing else (an API request, above all) should run inside it.

Token counts are stored per message at append time under the conversation's encoding. A row
counted under another encoding (the conversation moved to another model) is recounted as it
is read, and the new counts are written back in one short write transaction after the read
transaction ends, so later turns find them in place. Only rows read are recounted.

Rows carry their content as the stored JSON text where that is cheaper
(:meth:`newest`, :meth:`newest_entries`): it is decoded only for the rows a context sends
(:meth:`WindowRow.entry_messages`, :meth:`WindowRow.to_openai`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, Text, and_, bindparam, case, func, literal_column, null, select, text, update
from sqlalchemy import cast as sql_cast

from .. import tokens as _tokens
from ..exceptions import ConversationNotFound
from ._schema import ANCHOR_PREDICATE, ConversationRow, MessageRow, SummaryRow
from ._validate import _could_exist
from ._values import Summary, openai_message

if TYPE_CHECKING:
    from ._store import ConversationStore

__all__ = ["WindowReader", "WindowRow"]

# Batches of the newest rows: the first guesses a short message per row, the next use the
# average seen so far, with a margin, so that usually one or two statements suffice.
_FIRST_BATCH = 512
_FIRST_BATCH_TOKENS_PER_ROW = 48
_MIN_BATCH = 16
_MAX_BATCH = 4096
_BATCH_MARGIN = 1.25
# Rows per statement when a seq range is read whole (summaries, conversation_tokens).
RANGE_BATCH = _MAX_BATCH

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
    _m.c.tokens_total,
)
_of_conversation = _m.c.conversation_id == bindparam("cid")
# Statements are built once: building them per call costs more than running them.
_SELECT_ANCHORS = (
    select(*_FULL_COLUMNS).where(_of_conversation, text(f"({ANCHOR_PREDICATE})")).order_by(_m.c.seq)
)
_c = cast(Table, ConversationRow.__table__)
_SELECT_CONVERSATION = select(_c.c.id).where(_c.c.id == bindparam("cid"))
_SELECT_BETWEEN = (
    select(*_FULL_COLUMNS)
    .where(_of_conversation, _m.c.seq >= bindparam("lo"), _m.c.seq <= bindparam("hi"))
    .order_by(_m.c.seq)
)


# A row the planner takes as it is (most rows): complete, not pinned, no name or tool
# fields, counted under the reader's encoding (``:enc``). The newest rows are read as four
# values and this flag, NULL; the others (flagged 1) are read again whole (_SELECT_UNUSUAL). The
# driver's work grows with the columns read, even NULL ones: a row of four values and a
# flag costs it about a fifth less than a full row.
_UNUSUAL = case(
    (
        and_(
            _m.c.status == literal_column("'complete'"),
            ~_m.c.pinned,
            _m.c.tool_calls.is_(None),
            _m.c.tool_call_id.is_(None),
            _m.c.name.is_(None),
            _m.c.tokens.is_not(None),
            _m.c.tokens_encoding == bindparam("enc"),
        ),
        null(),
    ),
    else_=literal_column("1"),
)


def _select_newest(*, before: bool) -> Any:
    """Which of the newest rows are read: the one place that says so.

    Newest first, at most ``:n`` rows, older than ``:before`` when given: ``seq, role,
    tokens, content, unusual`` (see ``_UNUSUAL``). Content comes as raw JSON text, cast in
    the database, so the driver decodes no JSON: fetching a row too many costs little, and
    only the rows sent are decoded.
    """
    statement = (
        select(_m.c.seq, _m.c.role, _m.c.tokens, sql_cast(_m.c.content, Text), _UNUSUAL)
        .where(_of_conversation)
        .order_by(_m.c.seq.desc())
        .limit(bindparam("n"))
    )
    return statement.where(_m.c.seq < bindparam("before")) if before else statement


# The unusual rows among seqs :lo..:hi, whole, as _light_rows takes them.
_SELECT_UNUSUAL = (
    select(
        _m.c.seq,
        _m.c.role,
        sql_cast(_m.c.tool_calls, Text),
        _m.c.tool_call_id,
        _m.c.pinned,
        _m.c.status,
        _m.c.tokens,
        _m.c.tokens_encoding,
        sql_cast(_m.c.content, Text),
        _m.c.name,
    )
    .where(_of_conversation, _m.c.seq >= bindparam("lo"), _m.c.seq <= bindparam("hi"), _UNUSUAL == 1)
    .order_by(_m.c.seq.desc())
)
_SELECT_NEWEST = _select_newest(before=False)
_SELECT_NEWEST_BEFORE = _select_newest(before=True)
# The range read: every row from the oldest whose running total reaches :x (one seek of the
# (conversation_id, tokens_total) index) to the newest, newest first. Reading from a seq
# keeps the range contiguous whatever the totals hold.
_FIRST_IN_RANGE = (
    select(_m.c.seq)
    .where(_m.c.conversation_id == bindparam("cid"), _m.c.tokens_total >= bindparam("x"))
    .order_by(_m.c.tokens_total)
    .limit(1)
    .scalar_subquery()
)
# At most RANGE_BATCH rows, a limit the planner cannot see through (a sub-SELECT, not a
# constant or a parameter), so that it takes the limit for a small part of the range: it
# cannot know where the range starts (the subquery's value) and guesses a third of the
# conversation; without the limit (or with one it could compare with that guess) Postgres
# read such a range through a bitmap and sorted it, or, for a conversation holding most of
# a large table, scanned the whole table in parallel (60 ms instead of 0.2 ms at 100,000
# messages), where walking the primary key newest first and stopping is what it should do.
# A longer range is read on by the later batches of newest().
_SELECT_RANGE = (
    _select_newest(before=False)
    .limit(select(literal_column(str(RANGE_BATCH))).scalar_subquery())
    .where(_m.c.seq >= func.coalesce(_FIRST_IN_RANGE, bindparam("past_end")))
)
_SELECT_ALL_NEWEST = _select_newest(before=False).limit(None)
# What a reader starts with, in one statement: the owner's check, the running total, and the
# anchors (one row with NULL message columns when there are none). The anchors are a scan of
# the partial anchor index, as _SELECT_ANCHORS is.
_CONVERSATION_AND_ANCHORS = {
    owned: select(_c.c.tokens_total, *_FULL_COLUMNS)
    .select_from(_c.outerjoin(_m, and_(_m.c.conversation_id == _c.c.id, text(f"({ANCHOR_PREDICATE})"))))
    .where(_c.c.id == bindparam("cid"), _c.c.owner == bindparam("owner") if owned else _c.c.owner.is_(None))
    .order_by(_m.c.seq)
    for owned in (True, False)
}
_UPDATE_TOKENS = (
    update(_m)
    .where(_m.c.conversation_id == bindparam("b_cid"), _m.c.seq == bindparam("b_seq"))
    .values(tokens=bindparam("b_tokens"), tokens_encoding=bindparam("b_encoding"))
)
_s = cast(Table, SummaryRow.__table__)
_SELECT_SUMMARIES = select(_s).where(_s.c.conversation_id == bindparam("cid")).order_by(_s.c.to_seq)
_UNLOADED: Any = object()

# One of the newest rows as the planner takes it (WindowReader.newest_entries):
# ``(seq, role, tokens, raw JSON content, None)`` for a usual row (see _UNUSUAL), whose
# content is its raw text; ``(seq, role, tokens, None, row)`` for any other, read whole as a
# WindowRow (its tokens recounted when needed).
Entry = tuple[int, str, int, "str | None", "WindowRow | None"]


@dataclass(slots=True)
class WindowRow:
    """One stored message as the planner sees it; ``tokens`` is its cost under the
    encoding the reader was opened with."""

    seq: int
    role: str
    name: str | None
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    pinned: bool
    status: str
    tokens: int
    _content: Any = field(default=_UNLOADED, repr=False)
    _raw: str | None = field(default=None, repr=False)  # the stored JSON text, until decoded

    @property
    def content(self) -> Any:
        """The message content (decoded from the stored JSON on first use)."""
        if self._content is _UNLOADED:
            self._content = _decode(self._raw)
            self._raw = None
        return self._content

    def to_openai(self) -> dict[str, Any]:
        """The message as the chat-completions API takes it."""
        content = self._content if self._content is not _UNLOADED else self.content
        return openai_message(self.role, content, self.name, self.tool_calls, self.tool_call_id)

    @staticmethod
    def entry_messages(entries: Iterable[Entry]) -> list[dict[str, Any]]:
        """The messages of :meth:`WindowReader.newest_entries` entries (or of
        :meth:`entry`), as the chat-completions API takes them. A window sends every row it
        plans, so this is per-row work of every turn: a usual row whose stored JSON is a
        string with no escapes is built inline."""
        out: list[dict[str, Any]] = []
        add = out.append
        for _seq, role, _count, raw, row in entries:
            if row is not None:
                add(row.to_openai())
            elif raw is not None and raw[0] == '"' and raw[-1] == '"' and "\\" not in raw:
                add({"role": role, "content": raw[1:-1]})
            else:
                add(openai_message(role, _decode(raw)))
        return out

    def entry(self) -> Entry:
        """This row as an entry (see :meth:`WindowReader.newest_entries`): a usual row still
        holding its stored JSON as its raw text, any other row as itself."""
        raw = self._raw
        if (
            raw is not None
            and self.status == "complete"
            and not self.pinned
            and self.name is None
            and self.tool_calls is None
            and self.tool_call_id is None
        ):
            return (self.seq, self.role, self.tokens, raw, None)
        return (self.seq, self.role, self.tokens, None, self)

    @staticmethod
    def of_entry(entry: Entry) -> WindowRow:
        """The row an entry stands for."""
        seq, role, tokens, raw, row = entry
        if row is not None:
            return row
        return WindowRow(seq, role, None, None, None, False, "complete", tokens, _UNLOADED, raw)

    def _stored(self) -> dict[str, Any]:
        """The message as stored (image size hints kept), for counting its tokens."""
        out = {"role": self.role, "content": self.content}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _decode(raw: str | None) -> Any:
    """Stored JSON content back to Python. A string with no backslash has no escapes, so
    (the usual case) it is just the text between its quotes."""
    if raw is None:
        return None
    if raw[0] == '"' and raw[-1] == '"' and "\\" not in raw:
        return raw[1:-1]
    return json.loads(raw)


class WindowReader:
    """Reads one conversation's rows inside one read transaction (see the module docs).

    Made by :meth:`Conversation.read_window`; valid only inside its ``with`` block.
    """

    def __init__(
        self,
        conn: Any,
        conversation_id: str,
        encoding: str,
        total: int | None = None,
        anchors: Sequence[Any] | None = None,
        newest: int | None = None,
    ) -> None:
        self._conn = conn
        self.conversation_id = conversation_id
        self.encoding = encoding
        self._recounted: list[dict[str, Any]] = []
        # The conversation's running token total, and the anchors' (total, stored tokens):
        # what the range read of newest() is computed from.
        self._total = total
        self._anchor_totals: list[tuple[int, int]] | None = None
        # The anchor rows read with the total (see read_window), made WindowRows on demand.
        self._anchors = anchors
        # The newest seq as the statement that read them left it (a turn's lease), or None
        # when this reader checked the conversation itself (see _check_newest).
        self._newest = newest

    def anchors(self) -> list[WindowRow]:
        """System, developer and pinned messages, oldest first."""
        totals: list[tuple[int, int]] = []
        if self._anchors is None:
            found = self._conn.execute(_SELECT_ANCHORS, {"cid": self.conversation_id})
        else:
            found, self._anchors = self._anchors, None
        rows = self._full_rows(found, totals=totals)
        self._anchor_totals = totals
        return rows

    def between(self, first: int, last: int) -> list[WindowRow]:
        """Messages ``first``..``last`` (inclusive), oldest first."""
        return self._full_rows(
            self._conn.execute(_SELECT_BETWEEN, {"cid": self.conversation_id, "lo": first, "hi": last})
        )

    def summaries(self) -> list[Summary]:
        """The stored summaries, ordered by the last seq they cover."""
        return summary_rows(self._conn, self.conversation_id)

    def newest(self, tokens_wanted: Callable[[], int]) -> Generator[list[WindowRow], None, None]:
        """The rows, newest first, in chunks, read only as far as the caller iterates.

        ``tokens_wanted()`` says how many tokens the caller can still take. The first chunk
        is the range the running totals say holds that many tokens and one row more (see
        the module docs); later chunks are batches sized from ``tokens_wanted()``, so the
        rows read are about the rows that fit.
        """
        with closing(self.newest_entries(tokens_wanted)) as chunks:
            for chunk in chunks:
                yield [WindowRow.of_entry(entry) for entry in chunk]

    def newest_entries(self, tokens_wanted: Callable[[], int]) -> Generator[list[Entry], None, None]:
        """:meth:`newest` as entries, which cost less to make than rows (what the planner
        reads): ``(seq, role, tokens, raw, None)`` for a usual row (complete, not pinned, no
        name or tool fields, counted under this encoding: most rows), whose content is still
        its stored JSON text, and ``(seq, role, tokens, None, row)`` for any other, read
        whole as a :class:`WindowRow` (recounted when needed)."""
        params: dict[str, Any] = {"cid": self.conversation_id, "enc": self.encoding}
        statement, seen, tokens = _SELECT_NEWEST, 0, 0
        start = self._range_start(tokens_wanted())
        if start is not None:
            if start <= 0:  # everything fits, as far as the totals tell: read it all
                yield self._entries(self._conn.execute(_SELECT_ALL_NEWEST, params).all())
                return
            chunk = self._conn.execute(_SELECT_RANGE, {**params, "x": start, "past_end": 2**31 - 1}).all()
            if chunk:
                rows = self._entries(chunk)
                yield rows
                seen, tokens = len(rows), sum(r[2] for r in rows)
                statement = _SELECT_NEWEST_BEFORE
                params["before"] = chunk[-1][0]
        size = max(_MIN_BATCH, min(tokens_wanted() // _FIRST_BATCH_TOKENS_PER_ROW, _FIRST_BATCH))
        if seen:
            size = self._next_size(tokens_wanted(), tokens, seen)
        while True:
            chunk = self._conn.execute(statement, {**params, "n": size}).all()
            rows = self._entries(chunk)
            yield rows
            if len(chunk) < size:
                return
            seen += len(rows)
            tokens += sum(r[2] for r in rows)
            size = self._next_size(tokens_wanted(), tokens, seen)
            statement = _SELECT_NEWEST_BEFORE
            params["before"] = chunk[-1][0]

    def _check_newest(self, chunk: Sequence[Any]) -> None:
        """The first chunk of the newest rows, checked against the newest seq the statement
        that read the anchors left (a turn's lease): a first row that is not that one means
        a write came between, and if it deleted the conversation, the turn must not be
        planned, let alone sent, from the anchors alone (ConversationNotFound)."""
        newest, self._newest = self._newest, None
        changed = not (chunk and chunk[0][0] == newest)
        cid = {"cid": self.conversation_id}
        if changed and self._conn.execute(_SELECT_CONVERSATION, cid).first() is None:
            raise ConversationNotFound(self.conversation_id)

    def _entries(self, chunk: Sequence[Any]) -> list[Entry]:
        """A chunk of the newest read as entries: its unusual rows read again whole. Every
        chunk the planner takes passes here (an empty range read is followed by a batch read
        that does), so the first one is checked here too (see _check_newest)."""
        if self._newest is not None:
            self._check_newest(chunk)
        unusual = [row[0] for row in chunk if row[4] is not None]
        if not unusual:
            return list(chunk)  # each row is its entry: (seq, role, tokens, raw, None)
        found = self._conn.execute(
            _SELECT_UNUSUAL,
            {"cid": self.conversation_id, "enc": self.encoding, "lo": unusual[-1], "hi": unusual[0]},
        ).all()
        whole = {row.seq: row for row in self._light_rows(found)}
        for seq in unusual:
            if seq not in whole:
                # Changed by a write committed between the two statements (on Postgres each
                # statement of a read-committed transaction sees its own snapshot): as it
                # is now, or left out if it was deleted.
                whole.update((row.seq, row) for row in self.between(seq, seq))
        return [
            row if row[4] is None else (row[0], row[1], whole[row[0]].tokens, None, whole[row[0]])
            for row in chunk
            if row[4] is None or row[0] in whole
        ]

    @staticmethod
    def _next_size(wanted: int, tokens: int, seen: int) -> int:
        per_row = max(tokens / seen, 1.0)
        size = int(max(wanted, 0) / per_row * _BATCH_MARGIN) + 1
        return max(_MIN_BATCH, min(size, _MAX_BATCH))

    def _range_start(self, wanted: int) -> int | None:
        """The running total from which the newest rows hold ``wanted`` tokens of non-anchor
        messages (anchors inside that range do not count: they are sent anyway), or None
        when there are no totals to go by (anchors() not read, or an old database)."""
        if self._total is None or self._anchor_totals is None:
            return None
        start = self._total - max(wanted, 0)
        for total, tokens in reversed(self._anchor_totals):  # newest first
            if total >= start:
                start -= tokens
        return start

    def _full_rows(
        self, found: Iterable[Any], *, totals: list[tuple[int, int]] | None = None
    ) -> list[WindowRow]:
        rows = []
        for seq, role, content, name, calls, call_id, pinned, status, count, enc, total in found:
            if totals is not None and total is not None:
                totals.append((total, count or 0))
            row = WindowRow(seq, role, name, calls, call_id, bool(pinned), status, count or 0, content)
            if enc != self.encoding or count is None:
                self._recount(row)
            rows.append(row)
        return rows

    def _light_rows(self, chunk: Sequence[Any]) -> list[WindowRow]:
        rows = []
        for seq, role, calls, call_id, pinned, status, count, enc, raw, name in chunk:
            if isinstance(calls, str):
                calls = json.loads(calls)
            row = WindowRow(seq, role, name, calls, call_id, bool(pinned), status, count or 0, _UNLOADED, raw)
            if enc != self.encoding or count is None:
                self._recount(row)  # counted under another encoding: its content is needed
            rows.append(row)
        return rows

    def _recount(self, row: WindowRow) -> None:
        row.tokens = _tokens.message_tokens(row._stored(), self.encoding)
        self._recounted.append({"b_seq": row.seq, "b_tokens": row.tokens})

    def _save_recounts(self, store: ConversationStore) -> None:
        if not self._recounted:
            return
        extra = {"b_cid": self.conversation_id, "b_encoding": self.encoding}
        with store._write() as conn:
            conn.execute(_UPDATE_TOKENS, [{**row, **extra} for row in self._recounted])
        self._recounted = []


def summary_rows(conn: Any, conversation_id: str) -> list[Summary]:
    """The summaries of a conversation, ordered by the last seq they cover."""
    rows = conn.execute(_SELECT_SUMMARIES, {"cid": conversation_id})
    return [Summary(**{name: row._mapping[name] for name in Summary.__dataclass_fields__}) for row in rows]


@contextmanager
def read_window(
    store: ConversationStore,
    conversation_id: str,
    owner: str | None,
    encoding: str,
    *,
    start: tuple[int, list[Any], int] | None = None,
) -> Iterator[WindowReader]:
    """A :class:`WindowReader` on one read transaction, for this owner's conversation only
    (else ConversationNotFound); recounts written back after it.

    ``start``: the running total, the anchor rows and the newest seq, already read for this
    owner's conversation (by a turn's lease statement: see ``ConversationStore._take_turn``):
    the reader starts from them instead of reading them again, and checks that the
    conversation is still there only if its newest row has changed since."""
    if not _could_exist(conversation_id, owner):
        raise ConversationNotFound(conversation_id)
    with store._read(each=True) as conn:
        if start is not None:
            reader = WindowReader(conn, conversation_id, encoding, *start)
        else:
            # The owner's check, the running total and the anchors in one statement.
            found = conn.execute(
                _CONVERSATION_AND_ANCHORS[owner is not None], {"cid": conversation_id, "owner": owner}
            ).all()
            if not found:
                raise ConversationNotFound(conversation_id)
            anchors = [row[1:] for row in found if row[1] is not None]
            reader = WindowReader(conn, conversation_id, encoding, found[0][0], anchors)
        yield reader
    # After the read transaction: on a one-connection pool (``sqlite://``) the write needs
    # the connection the read held.
    reader._save_recounts(store)
