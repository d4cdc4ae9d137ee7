"""Choosing what of a stored conversation is sent: the context window of one turn.

The store keeps every message; this module decides which of them go into the next request
so that the prompt fits the model's window, and counts the prompt exactly. It is planning
only: it issues no SQL and opens no connection. The store's window reader
(:meth:`Conversation.read_window <gilas_conv.store.Conversation.read_window>`) hands it
rows, and it hands back decisions.

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
    system message after the kept system messages. Summaries are stored in the
    ``summaries`` table with the seq range they cover, reused by later turns, and only
    extended, never redone, when more is dropped. When the dropped messages hold nothing
    to summarize beyond what the newest stored summary covers (only anchors or incomplete
    replies lie between), that summary is sent as it is.

Two ways to use it
    :func:`build_context` does everything: it plans, and with ``policy="summarize"`` calls
    the ``summarizer`` callable (an API request) and stores its answer as often as needed.
    The step-wise API is for callers that make the summary request themselves (the
    senders, which must not block on it holding a database connection)::

        plan = plan_context(conv, policy="summarize", ...)
        while isinstance(plan, SummaryRequest):
            text = ask_the_api(plan)            # no database connection is held here
            save_summary(conv, plan, text)      # Conversation.add_summary underneath
            plan = plan_context(conv, policy="summarize", ...)
        context = plan

    :func:`plan_context` returns a :class:`Context`, or a :class:`SummaryRequest` naming
    the messages to fold into the previous summary (``from_seq``..``to_seq``). Each request
    covers strictly more than the last stored summary, so the loop ends; a long stretch of
    dropped history is summarized in slices, each slice stored as it is made.

Cost
    Planning reads, in one read transaction: the anchors (system/developer/pinned, through a
    partial index) and the newest rows, newest first, in batches sized from the tokens still
    to fill, stopping as soon as the budget is spent; the summary policy reads the stored
    summaries and, when one must be made, the range it covers. Content comes as JSON text
    and is decoded only for the messages sent. Token counts are stored per message at
    append time, so nothing is tokenized unless the conversation moved to another encoding;
    then only the rows read are recounted, and the store writes the counts back once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from . import tokens as _tokens
from .exceptions import ContextWindowExceeded
from .store import Entry, WindowReader, WindowRow

if TYPE_CHECKING:
    from .store import Conversation, Summary

__all__ = [
    "DEFAULT_REPLY_RESERVE",
    "SUMMARY_MAX_TOKENS",
    "Context",
    "SummaryRequest",
    "build_context",
    "conversation_tokens",
    "plan_context",
    "save_summary",
]

# Tokens kept free for the reply when the caller does not say (max_tokens). Without a cap
# the API lets a reply run to the end of the window; we keep room for a long answer.
DEFAULT_REPLY_RESERVE = 1024
# The longest summary the summarize policy asks for, and so the room it keeps for one.
SUMMARY_MAX_TOKENS = 600
SUMMARY_PREFIX = "Summary of the earlier part of this conversation, which is not repeated here:\n"
# Messages read per statement when a seq range is read whole (a summary's, every message).
_RANGE_ROWS = 4096

Policy = Literal["truncate", "summarize"]
_seq = itemgetter(0)  # of an entry
_tokens_of = itemgetter(2)


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    """What a summarizer is asked: fold ``messages`` into ``previous`` (may be None).

    Returned by :func:`plan_context` when a summary is needed: the answer, stored with
    :func:`save_summary`, stands in for messages ``from_seq``..``to_seq``.
    """

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


@dataclass(frozen=True, slots=True)
class _Budget:
    model: str
    encoding: str
    limit: int
    reserved: int
    tools_cost: int
    available: int


def _resolve_budget(
    model: str,
    *,
    context_limit: int | None,
    max_tokens: int | None,
    tools: Sequence[Mapping[str, Any]] | None,
) -> _Budget:
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
    return _Budget(model, encoding, limit, reserved, tools_cost, available)


def _check_policy(policy: str) -> None:
    if policy not in ("truncate", "summarize"):
        raise ValueError(f"unknown policy {policy!r}; expected 'truncate' or 'summarize'")


@dataclass(slots=True)
class _Chosen:
    """A planned window, before its messages are decoded and counted."""

    rows: list[Entry]  # sent, in seq order
    top: int  # the highest seq seen
    summary: Summary | None
    summary_tokens: int


def _sendable_entries(entries: list[Entry], include_incomplete: bool) -> tuple[list[Entry], int]:
    """The entries of a turn (oldest first) that may be sent, and what they cost."""
    rows = [WindowRow.of_entry(entry) for entry in entries]
    sendable = _sendable(rows, include_incomplete)
    if sendable is rows:
        return entries, sum(entry[2] for entry in entries)
    return [row.entry() for row in sendable], sum(r.tokens for r in sendable)


def _sendable(turn: list[WindowRow], include_incomplete: bool) -> list[WindowRow]:
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


def _plan(
    window: WindowReader,
    budget: _Budget,
    *,
    summarize: bool,
    include_incomplete: bool,
) -> _Chosen | SummaryRequest:
    """Choose the rows to send from what ``window`` reads, or say which summary is needed.

    Pure but for the reading: it reads rows lazily through ``window`` and writes nothing.

    The history is taken as whole turns, newest first, while they fit. A turn opens at a
    user message (pinned or not) and runs to the next one; anchors are sent anyway, so only
    a turn's other rows are in it. The rows are read newest first, only as far as turns are
    taken; the last turn may be the rows before the first user message. The newest turn is
    the one being answered: it must fit whole (else ContextWindowExceeded, with its full
    cost). Once the rows of an older turn that will certainly be sent (complete, or
    incomplete ones when included; no tool call or result) cost more than the tokens left,
    the turn cannot be kept whatever its older rows hold: nothing older is read.
    """
    anchors = {r.seq: r for r in window.anchors() if include_incomplete or r.status == "complete"}
    anchor_tokens = sum(r.tokens for r in anchors.values())
    left = budget.available - anchor_tokens
    # The rows of the kept turns, then of the turn being read (from ``mark`` on), newest
    # first; and the kept turns, newest first: (the seq that opens it, where its rows start
    # in ``taken``, its cost).
    taken: list[Entry] = []
    kept: list[tuple[int, int, int]] = []
    mark = 0
    truncated = False
    top = seen = max(anchors, default=0)  # the highest seq seen when the last turn was taken

    def close(start: int, plain: bool, cost: int) -> bool:
        """The turn being read, opened at seq ``start``, is whole: keep it if it fits; False
        (the window ends) if it does not."""
        nonlocal left, mark
        if not plain:
            rows, cost = _sendable_entries(taken[mark:][::-1], include_incomplete)
            taken[mark:] = rows[::-1]
        if cost > left:
            if not kept:
                # The newest turn is the one being answered: it must be sent whole.
                raise ContextWindowExceeded(
                    anchor_tokens + cost + budget.tools_cost + _tokens.REPLY_PRIMING_TOKENS,
                    budget.limit - budget.reserved,
                    model=budget.model,
                )
            del taken[mark:]
            return False
        left -= cost
        kept.append((start, mark, cost))
        mark = len(taken)
        return True

    cost = 0
    certain = 0  # what the turn's rows certainly sent so far cost
    plain = True  # nothing in the turn that might be left out (the usual case: no filtering)
    # Closed on every way out, so the open query ends inside its transaction.
    with closing(window.newest_entries(lambda: left)) as chunks:
        for entries in chunks:
            if entries:
                seen = max(seen, entries[0][0])
            for entry in entries:
                seq, role, tokens, _raw, row = entry
                if seq not in anchors:
                    taken.append(entry)
                    cost += tokens
                    if row is None:  # a usual row: complete, no tool fields
                        certain += tokens
                    elif row.status != "complete" or row.tool_calls is not None or role == "tool":
                        plain = False
                        if role != "tool" and row.tool_calls is None and include_incomplete:
                            certain += tokens
                    else:
                        certain += tokens
                if role == "user":
                    top = seen
                    fits = close(seq, plain, cost)
                    cost, certain, plain = 0, 0, True
                    if not fits:
                        truncated = True
                        break
                elif len(taken) > mark and kept and certain > left:
                    top, truncated = seen, True  # this turn cannot be kept
                    del taken[mark:]
                    break
            else:
                continue
            break
        else:
            if len(taken) > mark:  # the rows before the first user message
                top = seen
                truncated = not close(taken[-1][0], plain, cost)
    if left < 0:  # only anchors, and they alone do not fit
        raise ContextWindowExceeded(
            anchor_tokens + budget.tools_cost + _tokens.REPLY_PRIMING_TOKENS,
            budget.limit - budget.reserved,
            model=budget.model,
        )
    summary = None
    summary_tokens = 0
    if summarize and truncated and kept and kept[-1][0] > 1:
        stored = window.summaries()
        # Make room for the summary by dropping more of the oldest kept turns (never the
        # newest); each drop widens what the summary must cover, so measure again.
        while True:
            cut = kept[-1][0] - 1
            covering = [s for s in stored if s.to_seq <= cut]
            latest = covering[-1] if covering else None
            if latest is None or latest.to_seq < cut:
                request = _summary_request(window, budget.model, cut, latest, anchors)
                if request is not None:
                    return request
                if latest is None:
                    break  # nothing dropped that a summary could say
            summary = latest
            summary_tokens = _tokens.message_tokens(_summary_message(summary), budget.encoding)
            if summary_tokens <= left:
                break
            if len(kept) == 1:
                summary, summary_tokens = None, 0  # no room at all: send without it
                break
            _start, at, cost = kept.pop()
            left += cost
            del taken[at:]
    # The kept rows are in seq order, and so are the anchors: when the anchors all come
    # before the history (the usual case: the system message), no sort is needed.
    history = taken[::-1]
    pinned = [r.entry() for r in anchors.values()]
    if history and pinned and pinned[-1][0] > history[0][0]:
        chosen = sorted([*pinned, *history], key=_seq)
    else:
        chosen = [*pinned, *history]
    return _Chosen(chosen, top, summary, summary_tokens)


def _summary_request(
    window: WindowReader,
    model: str,
    cut: int,
    latest: Summary | None,
    anchors: Mapping[int, WindowRow],
) -> SummaryRequest | None:
    """The next slice to fold into ``latest`` so that a summary reaches ``cut``, or None
    when nothing after ``latest`` up to ``cut`` is a message a summary could say."""
    previous = latest.content if latest is not None else None
    from_seq = latest.from_seq if latest is not None else 1
    # Summarize in slices that fit a request of their own, each folded into the last.
    info = _tokens.get_model_info(model)
    slice_budget = max(1000, min(info.context_window // 2, 50_000))
    first = latest.to_seq + 1 if latest is not None else 1
    while first <= cut:
        rows = window.between(first, min(cut, first + _RANGE_ROWS - 1))
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
            return SummaryRequest(
                conversation_id=window.conversation_id,
                model=model,
                previous=previous,
                messages=chunk,
                from_seq=from_seq,
                to_seq=last,
            )
        first = last + 1
    return None


def _context(chosen: _Chosen, budget: _Budget) -> Context:
    messages = WindowRow.entry_messages(chosen.rows)
    prompt_tokens = sum(map(_tokens_of, chosen.rows)) + budget.tools_cost + _tokens.REPLY_PRIMING_TOKENS
    if chosen.summary is not None:
        # After the leading system/developer messages, before the kept history.
        at = 0
        while at < len(messages) and messages[at]["role"] in ("system", "developer"):
            at += 1
        messages.insert(at, _summary_message(chosen.summary))
        prompt_tokens += chosen.summary_tokens
    return Context(
        messages=messages,
        prompt_tokens=prompt_tokens,
        # Sequence numbers are contiguous, so everything up to the newest seen that was
        # not chosen was left out.
        dropped=chosen.top - len(chosen.rows),
        model=budget.model,
        encoding=budget.encoding,
        context_limit=budget.limit,
        reserved=budget.reserved,
        tools_tokens=budget.tools_cost,
        available=budget.available,
        seqs=tuple(map(_seq, chosen.rows)),
        summary=chosen.summary,
    )


def plan_context(
    conv: Conversation,
    *,
    model: str | None = None,
    context_limit: int | None = None,
    max_tokens: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    policy: Policy = "truncate",
    include_incomplete: bool = False,
) -> Context | SummaryRequest:
    """Plan the next turn of ``conv``: the :class:`Context` to send, or, with
    ``policy="summarize"``, the :class:`SummaryRequest` to answer first (see module docs).

    Reads through one short read transaction, held only while planning (never while a
    summary is asked for). Writes nothing except lazily recounted token counts. Raises
    ContextWindowExceeded when the system messages plus the newest turn do not fit,
    ValueError for a bad argument, StoreError when the database fails.
    """
    _check_policy(policy)
    budget = _resolve_budget(
        model or conv.model, context_limit=context_limit, max_tokens=max_tokens, tools=tools
    )
    return _plan_context(conv, budget, summarize=policy == "summarize", include_incomplete=include_incomplete)


def _plan_context(
    conv: Conversation, budget: _Budget, *, summarize: bool, include_incomplete: bool
) -> Context | SummaryRequest:
    """:func:`plan_context` with its arguments checked and the budget resolved."""
    with conv.read_window(encoding=budget.encoding) as window:
        plan = _plan(window, budget, summarize=summarize, include_incomplete=include_incomplete)
    # Decoded and assembled with the connection already back in the pool.
    return plan if isinstance(plan, SummaryRequest) else _context(plan, budget)


def save_summary(
    conv: Conversation, request: SummaryRequest, text: str, *, usage: Mapping[str, Any] | None = None
) -> Summary:
    """Store ``text``, the answer to ``request``, as the summary of its range; return it.

    ``usage``: what the summary request cost, as the API reported it (kept with the
    summary). Raises ValueError, storing nothing, when ``text`` is not a non-empty string.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the summarizer returned no text")
    encoding = _tokens.get_model_info(request.model).encoding
    return conv.add_summary(
        text,
        from_seq=request.from_seq,
        to_seq=request.to_seq,
        model=request.model,
        tokens=_tokens.message_tokens({"role": "system", "content": SUMMARY_PREFIX + text}, encoding),
        tokens_encoding=encoding,
        usage=dict(usage) if usage is not None else None,
    )


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

    With ``policy="summarize"``, ``summarizer`` is called for each summary needed, with no
    database connection held, and its answers are stored. Raises ContextWindowExceeded when
    the system messages plus the newest turn do not fit, ValueError for a bad argument,
    StoreError when the database fails. Writes nothing except lazily recounted token counts
    and, with ``policy="summarize"``, new summaries.
    """
    _check_policy(policy)
    if policy == "summarize" and summarizer is None:
        raise ValueError("policy='summarize' needs a summarizer (the senders provide one)")
    budget = _resolve_budget(
        model or conv.model, context_limit=context_limit, max_tokens=max_tokens, tools=tools
    )
    covered = 0
    while True:
        plan = _plan_context(
            conv, budget, summarize=policy == "summarize", include_incomplete=include_incomplete
        )
        if isinstance(plan, Context):
            return plan
        assert summarizer is not None
        if plan.to_seq <= covered:  # each request must reach further than the last
            raise RuntimeError(f"the summary up to message {covered} was stored but not found again")
        covered = plan.to_seq
        save_summary(conv, plan, summarizer(plan))


def _summary_message(summary: Summary) -> dict[str, Any]:
    return {"role": "system", "content": SUMMARY_PREFIX + summary.content}


def conversation_tokens(conv: Conversation, *, model: str | None = None) -> int:
    """Prompt tokens the whole stored history would take (every message, plus priming).

    Raises StoreError when the database fails.
    """
    encoding = _tokens.get_model_info(model or conv.model).encoding
    total = 0
    with conv.read_window(encoding=encoding) as window:
        after = 0
        while rows := window.between(after + 1, after + _RANGE_ROWS):
            total += sum(r.tokens for r in rows)
            after = rows[-1].seq
    return total + _tokens.REPLY_PRIMING_TOKENS
