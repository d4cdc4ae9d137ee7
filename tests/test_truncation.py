"""The context window: what of a stored conversation ``build_context`` sends, and its count.

Every test runs on a real SQLite file and, where it takes the ``store`` fixture, on a real
Postgres database too; the property tests draw random conversations onto one SQLite file.

The contract checked here (see ``gilas_conv.truncation``):

* Budget: ``prompt_tokens`` is exactly ``count_tokens(ctx.messages, model, tools=tools)``,
  and ``prompt_tokens + reserved <= context_limit``; ``available`` is the context limit less
  the reply reserve, the tool definitions and the reply priming.
* Default policy: system/developer and pinned messages always go; then the newest whole
  turns that fit, oldest dropped first, with no gap; the window (after those anchors) never
  starts with an assistant or tool message; an assistant ``tool_calls`` message travels with
  all its results or not at all; incomplete replies only with ``include_incomplete=True``;
  when even the anchors plus the newest turn do not fit, ``ContextWindowExceeded`` with
  numbers that say by how much.
* The store keeps the full history; token counts are stored per message and recounted
  lazily, once, when the conversation moves to another encoding; the hot path reads only
  the newest rows.
* ``policy="summarize"``: dropped messages are folded into a stored summary sent as a
  system message, reused while nothing more is dropped, extended with only the newly
  dropped messages, and copied by a fork.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from _truncation_strategies import (
    TOOLS,
    ConversationSpec,
    MessageSpec,
    build_conversation,
    conversation_specs,
    filler,
    tool_call,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, Table, event, insert, text, update

from gilas_conv import (
    Context,
    ContextWindowExceeded,
    Conversation,
    ConversationStore,
    GilasConvError,
    Message,
    StoreError,
    SummaryRequest,
    build_context,
    conversation_tokens,
    count_tokens,
    get_model_info,
)
from gilas_conv.store._schema import ConversationRow, MessageRow
from gilas_conv.tokens import REPLY_PRIMING_TOKENS, message_tokens, tools_tokens
from gilas_conv.truncation import DEFAULT_REPLY_RESERVE, plan_context, save_summary

MODEL = "gpt-4o-mini"
ANCHOR_ROLES = ("system", "developer")


# ---------------------------------------------------------------------------------------------
# Helpers: a recording summarizer, a statement log, and an oracle for the invariants


class RecordingSummarizer:
    """A summarizer that records every request and answers with a short, numbered text."""

    def __init__(self, *, words: int = 0) -> None:
        self.requests: list[SummaryRequest] = []
        self.replies: list[str] = []
        self.words = words

    def __call__(self, request: SummaryRequest) -> str:
        self.requests.append(request)
        reply = f"summary {len(self.requests)}: {len(request.messages)} messages up to {request.to_seq}"
        if self.words:
            reply += " " + filler(self.words)
        self.replies.append(reply)
        return reply


class StatementLog:
    """Records the SQL an engine executes while open, as the driver receives it.

    :meth:`rows_returned` measures what the recorded reads of a table returned by running
    each again, counted (``SELECT count(*) FROM (...)``), on the unchanged data: an upper
    bound on the rows read, whatever the driver or the way the rows were fetched.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[tuple[str, Any]] = []

    def __enter__(self) -> StatementLog:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        self.statements.append((statement, parameters))

    def of_kind(self, verb: str, table: str = "messages") -> list[tuple[str, Any]]:
        return [
            (sql, params)
            for sql, params in self.statements
            if sql.lstrip().upper().startswith(verb) and table in sql
        ]

    def rows_returned(self, table: str = "messages") -> int:
        with self.engine.connect() as conn:
            return sum(
                conn.exec_driver_sql(f"SELECT count(*) FROM ({sql}) AS returned", params).scalar_one()
                for sql, params in self.of_kind("SELECT", table)
            )


def _anchor_seqs(stored: Sequence[Message]) -> set[int]:
    return {m.seq for m in stored if m.role in ANCHOR_ROLES or m.pinned}


def _unsendable(stored: Sequence[Message], include_incomplete: bool) -> set[int]:
    """Seqs the API must never see: incomplete replies (unless asked for), tool calls not
    all of whose results are stored and sendable, and tool results without their call."""
    usable = {m.seq for m in stored if include_incomplete or m.status == "complete"}
    out = {m.seq for m in stored} - usable
    answered = {m.tool_call_id for m in stored if m.role == "tool" and m.seq in usable}
    sendable_calls: set[str] = set()
    for m in stored:
        if m.role == "assistant" and m.tool_calls:
            ids = {call["id"] for call in m.tool_calls}
            if m.seq in usable and ids <= answered:
                sendable_calls |= ids
            else:
                out.add(m.seq)
    out |= {m.seq for m in stored if m.role == "tool" and m.tool_call_id not in sendable_calls}
    return out


def _turns(stored: Sequence[Message], anchors: set[int]) -> list[list[Message]]:
    """The non-anchor history cut at each user message (a first chunk may be a preamble).

    A pinned user message opens a turn too, though it is sent as an anchor, not in the turn.
    """
    turns: list[list[Message]] = []
    for m in stored:
        if m.role == "user" or not turns:
            turns.append([])
        if m.seq not in anchors:
            turns[-1].append(m)
    return turns


def _minimal_context(stored: Sequence[Message], include_incomplete: bool) -> list[Message]:
    """Anchors plus the sendable part of the newest turn: what must fit, or the call raises."""
    anchors = _anchor_seqs(stored)
    unsendable = _unsendable(stored, include_incomplete)
    turns = _turns(stored, anchors)
    newest = {m.seq for m in turns[-1] if m.seq not in unsendable} if turns else set()
    return [m for m in stored if m.seq in anchors or m.seq in newest]


def _assert_api_valid(messages: Sequence[dict[str, Any]]) -> None:
    """What the chat-completions API enforces: each assistant ``tool_calls`` message is
    followed at once by one result per call, and no tool result appears anywhere else."""
    i = 0
    while i < len(messages):
        message = messages[i]
        assert message["role"] != "tool", f"tool result without its call at index {i}: {messages}"
        if message.get("tool_calls"):
            ids = sorted(call["id"] for call in message["tool_calls"])
            results = messages[i + 1 : i + 1 + len(ids)]
            assert [r["role"] for r in results] == ["tool"] * len(ids), f"call at {i} split from results"
            assert sorted(r["tool_call_id"] for r in results) == ids, f"call at {i} split from results"
            i += 1 + len(ids)
        else:
            i += 1


def check_truncation(
    conv: Conversation,
    stored: Sequence[Message],
    ctx: Any,
    *,
    model: str,
    limit: int,
    max_tokens: int | None = None,
    tools: list[dict[str, Any]] | None = None,
    include_incomplete: bool = False,
) -> None:
    """Every invariant of the default policy, for one result of ``build_context``."""
    by_seq = {m.seq: m for m in stored}
    # The store keeps the full history: choosing changed nothing.
    assert conv.messages() == list(stored)
    # Budget and exact count.
    assert ctx.context_limit == limit
    if max_tokens is not None:
        assert ctx.reserved == max_tokens
    assert ctx.tools_tokens == (tools_tokens(tools, model) if tools else 0)
    assert ctx.available == limit - ctx.reserved - ctx.tools_tokens - REPLY_PRIMING_TOKENS
    assert ctx.prompt_tokens == count_tokens(ctx.messages, model, tools=tools)
    assert ctx.prompt_tokens + ctx.reserved <= ctx.context_limit
    # Stored messages, whole and in order; everything else counted as dropped.
    assert ctx.summary is None
    assert list(ctx.seqs) == sorted(set(ctx.seqs))
    assert ctx.messages == [by_seq[s].to_openai() for s in ctx.seqs]
    assert ctx.dropped == len(stored) - len(ctx.seqs)
    sent = set(ctx.seqs)
    anchors = _anchor_seqs(stored)
    unsendable = _unsendable(stored, include_incomplete)
    assert anchors <= sent, "a system, developer or pinned message was dropped"
    users = [m.seq for m in stored if m.role == "user"]
    if users:
        assert users[-1] in sent, "the newest user message was dropped"
    assert not sent & unsendable, f"sent what the API must not see: {sorted(sent & unsendable)}"
    _assert_api_valid(ctx.messages)
    window = sorted(sent - anchors)
    if not window:
        return
    start = window[0]
    sendable_before = [
        m.seq for m in stored if m.seq < start and m.seq not in anchors and m.seq not in unsendable
    ]
    # After the anchors the window starts with a user message -- or with the reply to a
    # pinned user message, which opens its turn -- unless it starts at the very beginning
    # of the history (a greeting before the first question).
    opener = max((m.seq for m in stored if m.role == "user" and m.seq <= start), default=None)
    opened_by_pinned_user = opener is not None and opener != start and opener in sent and opener in anchors
    assert by_seq[start].role == "user" or opened_by_pinned_user or not sendable_before, (
        f"window starts with a {by_seq[start].role} message (seq {start}) after dropping {sendable_before}"
    )
    # The oldest are dropped first: no gap in the window.
    gaps = [m.seq for m in stored if m.seq > start and m.seq not in anchors | unsendable | sent]
    assert not gaps, f"messages {gaps} dropped from inside the window"
    # Nothing is dropped that would have fit: the turn before the window did not.
    if sendable_before:
        turns = _turns(stored, anchors)
        index = next(i for i, turn in enumerate(turns) if any(m.seq == start for m in turn))
        assert start == min(m.seq for m in turns[index] if m.seq not in unsendable), "turn split"
        # The nearest older turn with something to send (a pinned user message whose reply
        # was not stored opens a turn with nothing in it, which costs nothing to keep).
        before = next(t for t in reversed(turns[:index]) if any(m.seq not in unsendable for m in t))
        previous = sum(m.tokens or 0 for m in before if m.seq not in unsendable)
        used = ctx.prompt_tokens - ctx.tools_tokens - REPLY_PRIMING_TOKENS
        assert used + previous > ctx.available, (
            f"dropped a turn of {previous} tokens with {ctx.available - used} tokens still free"
        )


def _sendable_tokens(stored: Sequence[Message], include_incomplete: bool) -> int:
    unsendable = _unsendable(stored, include_incomplete)
    return sum(m.tokens or 0 for m in stored if m.seq not in unsendable)


def _append_turns(conv: Conversation, sizes: Sequence[int], tag: str = "") -> None:
    """One user question and one assistant answer of about ``size`` words each, per size."""
    for i, size in enumerate(sizes):
        conv.append("user", filler(size, f"{tag}q{i} "))
        conv.append("assistant", filler(size, f"{tag}a{i} "))


# ---------------------------------------------------------------------------------------------
# Budget and exact counts


def test_everything_fits_sends_the_stored_history_exactly(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="تو یک دستیار مفید هستی. 😀")
    conv.append("developer", "Answer in Persian.")
    conv.append("user", "سلام! هوای تهران چطور است؟ 🇮🇷", name="sara")
    conv.append(
        "user",
        [
            {"type": "text", "text": "و این عکس؟"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        ],
    )
    conv.append("assistant", None, tool_calls=[tool_call("call_1"), tool_call("call_2", "شیراز")])
    conv.append("tool", '{"temp": 21}', tool_call_id="call_1")
    conv.append("tool", '{"temp": 25}', tool_call_id="call_2")
    conv.append("assistant", "تهران ۲۱ درجه و شیراز ۲۵ درجه است. 👍🏽")
    stored = conv.messages()

    ctx = build_context(conv)

    assert ctx.messages == [m.to_openai() for m in stored]
    assert ctx.seqs == tuple(range(1, len(stored) + 1))
    assert ctx.dropped == 0
    assert ctx.prompt_tokens == count_tokens(stored, MODEL) == count_tokens(ctx.messages, MODEL)
    info = get_model_info(MODEL)
    assert ctx.context_limit == info.context_window
    assert ctx.reserved == min(DEFAULT_REPLY_RESERVE, info.max_output_tokens)
    assert ctx.tools_tokens == 0
    assert ctx.available == ctx.context_limit - ctx.reserved - REPLY_PRIMING_TOKENS
    assert ctx.model == MODEL and ctx.encoding == info.encoding
    assert ctx.summary is None
    assert conv.messages() == stored


_FIXED_LISTS: dict[str, list[MessageSpec]] = {
    "plain": [
        MessageSpec("user", "What is 2 + 2?"),
        MessageSpec("assistant", "4."),
        MessageSpec("user", "And in Persian digits?"),
    ],
    "persian_emoji_names": [
        MessageSpec("developer", "پاسخ کوتاه بده"),
        MessageSpec("user", filler(40, "سلام "), name="ali_2"),
        MessageSpec("assistant", "👨\u200d👩\u200d👧\u200d👦 " * 5),
        MessageSpec("user", "\x00 NUL and <|endoftext|> are plain text here 🚀"),
    ],
    "tools_and_parts": [
        MessageSpec(
            "user",
            [
                {"type": "text", "text": "Weather in these two cities?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/m.png", "detail": "low"}},
            ],
        ),
        MessageSpec("assistant", "Checking.", tool_calls=[tool_call("c1"), tool_call("c2", "یزد")]),
        MessageSpec("tool", "21°C", tool_call_id="c1"),
        MessageSpec("tool", "۳۸ درجه", tool_call_id="c2"),
        MessageSpec("assistant", [{"type": "text", "text": "Tehran 21, Yazd 38."}]),
        MessageSpec("user", "Thanks!"),
    ],
}


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4"])
@pytest.mark.parametrize("name", sorted(_FIXED_LISTS))
def test_prompt_tokens_equal_count_tokens_of_what_is_sent(
    store: ConversationStore, name: str, model: str
) -> None:
    conv = build_conversation(store, ConversationSpec(model, "Be brief.", _FIXED_LISTS[name]))
    stored = conv.messages()
    for tools in (None, TOOLS):
        ctx = build_context(conv, max_tokens=256, tools=tools)
        assert ctx.messages == [m.to_openai() for m in stored]
        assert ctx.prompt_tokens == count_tokens(ctx.messages, model, tools=tools)
        assert ctx.tools_tokens == (tools_tokens(TOOLS, model) if tools else 0)
        # Each stored count is the message's cost under the conversation's encoding.
        encoding = get_model_info(model).encoding
        assert all(m.tokens_encoding == encoding for m in stored)
        assert [m.tokens for m in stored] == [message_tokens(m.to_openai(), encoding) for m in stored]


def test_default_reply_reserve_is_capped_and_max_tokens_replaces_it(store: ConversationStore) -> None:
    conv = store.create(model="gpt-4", system="Be brief.")
    _append_turns(conv, [30, 30])
    conv.append("user", "last question")
    stored = conv.messages()

    default = build_context(conv)
    assert default.context_limit == get_model_info("gpt-4").context_window
    assert default.reserved == DEFAULT_REPLY_RESERVE

    small = build_context(conv, context_limit=300)
    assert 0 < small.reserved <= DEFAULT_REPLY_RESERVE
    check_truncation(conv, stored, small, model="gpt-4", limit=300)

    explicit = build_context(conv, context_limit=300, max_tokens=7)
    assert explicit.reserved == 7
    check_truncation(conv, stored, explicit, model="gpt-4", limit=300, max_tokens=7)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"context_limit": 0}, "context_limit"),
        ({"context_limit": -5}, "context_limit"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"policy": "drop-everything"}, "policy"),
        ({"policy": "summarize"}, "summarizer"),
    ],
)
def test_bad_arguments_raise_value_error_and_write_nothing(
    store: ConversationStore, kwargs: dict[str, Any], what: str
) -> None:
    conv = store.create(model=MODEL, system="s")
    _append_turns(conv, [5])
    stored = conv.messages()
    with pytest.raises(ValueError, match=what):
        build_context(conv, **kwargs)
    assert conv.messages() == stored
    assert conv.summaries() == []


# ---------------------------------------------------------------------------------------------
# The default policy: whole turns, newest first


def test_drops_oldest_whole_turns_at_the_exact_budget(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="Answer in one line.")
    _append_turns(conv, [20, 35, 50, 25, 40])
    conv.append("user", "And now?")
    stored = conv.messages()
    system, newest = stored[0], stored[-1]
    turns = [stored[1 + 2 * i : 3 + 2 * i] for i in range(5)]
    reserve = 50

    for kept in range(6):
        tail = [m for turn in turns[5 - kept :] for m in turn]
        exact = reserve + REPLY_PRIMING_TOKENS + sum(m.tokens or 0 for m in [system, *tail, newest])
        ctx = build_context(conv, context_limit=exact, max_tokens=reserve)
        assert ctx.seqs == (1, *(m.seq for m in tail), newest.seq), f"{kept} turns fit exactly"
        assert ctx.prompt_tokens + ctx.reserved == exact
        assert ctx.dropped == 2 * (5 - kept)
        check_truncation(conv, stored, ctx, model=MODEL, limit=exact, max_tokens=reserve)
        # One token less and the oldest of those turns goes, whole.
        short = build_context(conv, context_limit=exact - 1, max_tokens=reserve) if kept else None
        if short is not None:
            assert short.seqs == (1, *(m.seq for m in tail[2:]), newest.seq)
            check_truncation(conv, stored, short, model=MODEL, limit=exact - 1, max_tokens=reserve)
    assert conv.messages() == stored


def test_window_has_no_gap_even_when_older_turns_would_fit(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="s")
    _append_turns(conv, [5, 5, 400, 10])
    conv.append("user", "newest")
    stored = conv.messages()
    # Room for the newest two turns and the two small old ones, but not the big one between.
    small_old = sum(m.tokens or 0 for m in stored[1:5])
    newest = sum(m.tokens or 0 for m in [stored[0], *stored[7:]])
    limit = 10 + REPLY_PRIMING_TOKENS + newest + small_old + 5

    ctx = build_context(conv, context_limit=limit, max_tokens=10)

    assert ctx.seqs == (1, 8, 9, 10)
    check_truncation(conv, stored, ctx, model=MODEL, limit=limit, max_tokens=10)


def test_window_never_starts_with_an_assistant_reply(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="s")
    conv.append("user", "Tell me a long story.")
    conv.append("assistant", filler(300, "Once "))
    conv.append("user", "Shorter, please.")
    conv.append("assistant", "Fine.")
    stored = conv.messages()
    # Everything but the first question would fit; a window starting with the story would not
    # be a conversation the model can follow, so the whole first turn goes.
    limit = 20 + REPLY_PRIMING_TOKENS + sum(m.tokens or 0 for m in stored) - 1

    ctx = build_context(conv, context_limit=limit, max_tokens=20)

    assert ctx.seqs == (1, 4, 5)
    check_truncation(conv, stored, ctx, model=MODEL, limit=limit, max_tokens=20)


def test_tool_call_group_travels_whole(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="Use tools.")
    conv.append("user", "Weather in Tehran and Shiraz?")
    conv.append("assistant", None, tool_calls=[tool_call("call_a"), tool_call("call_b", "شیراز")])
    conv.append("tool", filler(60, "Tehran: "), tool_call_id="call_a")
    conv.append("tool", filler(60, "Shiraz: "), tool_call_id="call_b")
    conv.append("assistant", "Both are sunny.")
    conv.append("user", "Thanks!")
    stored = conv.messages()
    total = sum(m.tokens or 0 for m in stored)

    for missing in range(1, 6):
        # A limit that would fit the last ``missing`` messages of the tool turn but not it all.
        limit = 16 + REPLY_PRIMING_TOKENS + total - sum(m.tokens or 0 for m in stored[1 : 1 + missing])
        ctx = build_context(conv, context_limit=limit, max_tokens=16, tools=None)
        assert ctx.seqs == (1, 7), f"{missing} messages short"
        check_truncation(conv, stored, ctx, model=MODEL, limit=limit, max_tokens=16)

    everything = build_context(conv, context_limit=16 + REPLY_PRIMING_TOKENS + total, max_tokens=16)
    assert everything.seqs == tuple(range(1, 8))


def test_tool_call_without_all_results_is_never_sent(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="Use tools.")
    conv.append("user", "Weather in Tehran and Shiraz?")
    conv.append("assistant", None, tool_calls=[tool_call("call_a"), tool_call("call_b", "شیراز")])
    conv.append("tool", "sunny", tool_call_id="call_a")  # the run was interrupted before call_b
    conv.append("user", "Are you there?")
    conv.append("assistant", None, tool_calls=[tool_call("call_c")], status="incomplete")
    conv.append("user", "Hello?")
    stored = conv.messages()

    for include_incomplete in (False, True):
        ctx = build_context(conv, max_tokens=100, include_incomplete=include_incomplete)
        assert ctx.seqs == (1, 2, 5, 7)
        assert ctx.dropped == 3
        check_truncation(
            conv,
            stored,
            ctx,
            model=MODEL,
            limit=ctx.context_limit,
            max_tokens=100,
            include_incomplete=include_incomplete,
        )


def test_incomplete_reply_is_sent_only_when_asked(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="s")
    conv.append("user", "Write a poem.")
    conv.append("assistant", "Roses are red, vio", status="incomplete", finish_reason=None)
    conv.append("user", "Go on.")
    stored = conv.messages()

    default = build_context(conv)
    assert default.seqs == (1, 2, 4)
    assert default.dropped == 1
    check_truncation(conv, stored, default, model=MODEL, limit=default.context_limit)

    included = build_context(conv, include_incomplete=True)
    assert included.seqs == (1, 2, 3, 4)
    assert included.dropped == 0
    assert included.messages == [m.to_openai() for m in stored]
    check_truncation(
        conv, stored, included, model=MODEL, limit=included.context_limit, include_incomplete=True
    )


def test_system_developer_and_pinned_messages_survive_truncation(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="You are a travel agent.")
    conv.append("developer", "Never book flights without asking.")
    name = conv.append("user", "My name is Sara and I am vegetarian.")
    conv.append("assistant", "Noted, Sara.")
    _append_turns(conv, [120, 120], "old ")
    conv.append("system", "The user is now on a budget.")
    reply = conv.append("assistant", "Budget noted: economy only.")
    _append_turns(conv, [120])
    conv.append("user", "What did I tell you about food?")
    conv.pin(name.seq)
    conv.pin(reply.seq)
    stored = conv.messages()
    anchors = [m for m in stored if m.role in ANCHOR_ROLES or m.pinned]
    limit = 10 + REPLY_PRIMING_TOKENS + sum(m.tokens or 0 for m in [*anchors, stored[-1]]) + 5

    ctx = build_context(conv, context_limit=limit, max_tokens=10)

    assert ctx.seqs == (*(m.seq for m in anchors), stored[-1].seq)
    check_truncation(conv, stored, ctx, model=MODEL, limit=limit, max_tokens=10)

    conv.pin(name.seq, False)
    unpinned = conv.messages()
    ctx = build_context(conv, context_limit=limit, max_tokens=10)
    assert name.seq not in ctx.seqs
    check_truncation(conv, unpinned, ctx, model=MODEL, limit=limit, max_tokens=10)


def test_pinned_newest_user_message_is_the_newest_turn(store: ConversationStore) -> None:
    """The newest user message is pinned: the minimal context is the system message and it.

    The older turn before it does not fit, so it must be dropped, not reported as a window
    overflow (``ContextWindowExceeded``) while the system message and the newest user message
    fit with room to spare."""
    conv = store.create(model=MODEL, system="s")
    _append_turns(conv, [300], "old ")
    newest = conv.append("user", "Remember this question.")
    conv.pin(newest.seq)
    stored = conv.messages()
    limit = 100 + count_tokens([stored[0], newest], MODEL) + 10

    ctx = build_context(conv, context_limit=limit, max_tokens=100)

    assert ctx.seqs == (1, newest.seq)
    check_truncation(conv, stored, ctx, model=MODEL, limit=limit, max_tokens=100)


@pytest.mark.parametrize("system", ["You answer in Persian.", None])
def test_context_window_exceeded_when_even_the_newest_turn_does_not_fit(
    store: ConversationStore, system: str | None
) -> None:
    conv = store.create(model=MODEL, system=system)
    _append_turns(conv, [10])
    conv.append("user", filler(400, "A very long question: "))
    stored = conv.messages()
    minimal = [m for m in stored if m.role == "system"] + [stored[-1]]
    needed = count_tokens(minimal, MODEL, tools=TOOLS)
    limit = 64 + needed - 1

    with pytest.raises(ContextWindowExceeded) as raised:
        build_context(conv, context_limit=limit, max_tokens=64, tools=TOOLS)

    err = raised.value
    assert err.needed == needed
    assert err.needed > err.available
    assert conv.messages() == stored
    # The numbers say exactly how much is missing: that much more room, and it fits.
    shortfall = err.needed - err.available
    ctx = build_context(conv, context_limit=limit + shortfall, max_tokens=64, tools=TOOLS)
    assert ctx.prompt_tokens == needed
    assert ctx.seqs == tuple(m.seq for m in minimal)
    with pytest.raises(ContextWindowExceeded):
        build_context(conv, context_limit=limit + shortfall - 1, max_tokens=64, tools=TOOLS)


def test_tools_count_against_the_budget(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="Use tools.")
    _append_turns(conv, [30, 30])
    conv.append("user", "Weather?")
    stored = conv.messages()
    tools_cost = tools_tokens(TOOLS, MODEL)
    assert tools_cost > 0
    exact = 32 + count_tokens(stored, MODEL, tools=TOOLS)

    ctx = build_context(conv, context_limit=exact, max_tokens=32, tools=TOOLS)
    assert ctx.seqs == tuple(range(1, 7))
    assert ctx.tools_tokens == tools_cost
    assert ctx.prompt_tokens + ctx.reserved == exact
    check_truncation(conv, stored, ctx, model=MODEL, limit=exact, max_tokens=32, tools=TOOLS)

    # The same limit without tools is the same room for messages plus the tools' share.
    tighter = build_context(conv, context_limit=exact - 1, max_tokens=32, tools=TOOLS)
    assert tighter.seqs == (1, 4, 5, 6)
    check_truncation(conv, stored, tighter, model=MODEL, limit=exact - 1, max_tokens=32, tools=TOOLS)
    without = build_context(conv, context_limit=exact - tools_cost, max_tokens=32)
    assert without.seqs == tuple(range(1, 7))


def test_conversation_tokens_counts_the_whole_history(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="s")
    _append_turns(conv, [10, 200, 3])
    assert conversation_tokens(conv) == count_tokens(conv.messages(), MODEL)
    assert conversation_tokens(conv, model="gpt-4") == count_tokens(conv.messages(), "gpt-4")


# ---------------------------------------------------------------------------------------------
# Stored token counts: recounted lazily, once, when the encoding changes


def _persian_history(store: ConversationStore, messages: int) -> Conversation:
    """A long Persian conversation, stored in one transaction (import) to keep tests fast."""
    data: list[dict[str, Any]] = [{"role": "system", "content": "تو یک دستیار فارسی\u200cزبان هستی."}]
    for i in range(messages):
        role = "user" if i % 2 == 0 else "assistant"
        data.append({"role": role, "content": f"پیام {i}: " + filler(12 + i % 7, "کتاب ")})
    return store.import_conversation(data, model=MODEL)


def test_model_change_recounts_the_rows_read_once(store: ConversationStore) -> None:
    conv = _persian_history(store, 1200)
    assert conv.message(2).tokens_encoding == "o200k_base"
    conv.update(model="gpt-4")  # cl100k_base: Persian costs far more tokens there

    ctx = build_context(conv, context_limit=3000, max_tokens=200)

    assert ctx.encoding == "cl100k_base"
    assert ctx.prompt_tokens == count_tokens(ctx.messages, "gpt-4")
    assert ctx.prompt_tokens + ctx.reserved <= 3000
    after = {m.seq: m for m in conv.messages()}
    changed = 0
    for seq in ctx.seqs:
        message = after[seq]
        assert message.tokens_encoding == "cl100k_base"
        assert message.tokens == message_tokens(message.to_openai(), "cl100k_base")
        changed += message.tokens != message_tokens(message.to_openai(), "o200k_base")
    assert changed > 0, "the two encodings should count this text differently"
    # Lazily: the far past was not read, so not recounted.
    assert after[2].tokens_encoding == "o200k_base"

    # Once: the next turn finds the counts in place and writes nothing.
    with StatementLog(store.engine) as log:
        again = build_context(conv, context_limit=3000, max_tokens=200)
    assert log.of_kind("UPDATE") == []
    assert again.messages == ctx.messages and again.prompt_tokens == ctx.prompt_tokens

    # A message appended under the new model is counted under its encoding at once.
    new = conv.append("user", "سلام دوباره")
    assert new.tokens_encoding == "cl100k_base"
    assert new.tokens == message_tokens(new.to_openai(), "cl100k_base")


def test_rows_recounted_by_another_process_between_the_two_reads_are_still_sent(
    store: ConversationStore,
) -> None:
    """The rows counted under another encoding are read again whole after the range read.
    When another process writes their new counts between the two statements (on Postgres
    each statement of a read transaction sees what was committed before it), the second
    read does not find them as they were: they are read as they are now, not left out."""
    conv = _persian_history(store, 300)
    conv.update(model="gpt-4")  # cl100k_base: every stored count is now of another encoding
    recounted = [
        {"cid": conv.id, "seq": m.seq, "tokens": message_tokens(m.to_openai(), "cl100k_base")}
        for m in conv.messages()
    ]
    raced = []

    def recount_elsewhere(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if raced or not ("CASE WHEN" in statement and "<=" in statement):
            return  # not the second read (the unusual rows, whole)
        raced.append(statement)
        with store.engine.connect() as other, other.begin():
            other.execute(
                text(
                    "UPDATE messages SET tokens = :tokens, tokens_encoding = 'cl100k_base'"
                    " WHERE conversation_id = :cid AND seq = :seq"
                ),
                recounted,
            )

    event.listen(store.engine, "before_cursor_execute", recount_elsewhere)
    try:
        raced_ctx = build_context(conv, context_limit=3000, max_tokens=200)
    finally:
        event.remove(store.engine, "before_cursor_execute", recount_elsewhere)

    assert raced, "the race should have been run"
    calm = build_context(conv, context_limit=3000, max_tokens=200)
    assert raced_ctx.messages == calm.messages
    assert raced_ctx.prompt_tokens == calm.prompt_tokens == count_tokens(calm.messages, "gpt-4")


def test_model_argument_counts_under_that_model(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="سلام 😀")
    _append_turns(conv, [40, 40])
    ctx = build_context(conv, model="gpt-4", max_tokens=100)
    assert ctx.model == "gpt-4" and ctx.encoding == "cl100k_base"
    assert ctx.context_limit == get_model_info("gpt-4").context_window
    assert ctx.prompt_tokens == count_tokens(ctx.messages, "gpt-4")
    assert ctx.prompt_tokens != count_tokens(ctx.messages, MODEL)


# ---------------------------------------------------------------------------------------------
# The hot path reads only the newest rows


def test_hot_path_reads_only_the_newest_rows(store: ConversationStore) -> None:
    conv = _persian_history(store, 5000)

    with StatementLog(store.engine) as log:
        ctx = build_context(conv, context_limit=3000, max_tokens=300)

    assert ctx.dropped > 4500, "the window should be small next to the history"
    assert ctx.prompt_tokens == count_tokens(ctx.messages, MODEL)
    rows = log.rows_returned()
    assert 0 < rows < 600, f"read {rows} rows of a 5001-message history for a {len(ctx.seqs)}-message window"
    assert log.of_kind("UPDATE") == []


# ---------------------------------------------------------------------------------------------
# policy="summarize"


def _summarized_conversation(store: ConversationStore) -> tuple[Conversation, list[Message], int]:
    """Six big turns and a short question, and a limit that keeps the newest two big turns
    with about 1500 tokens to spare (room for a summary, not for another big turn)."""
    conv = store.create(model=MODEL, system="You are terse.")
    _append_turns(conv, [900] * 6)
    conv.append("user", "So, what do you think?")
    stored = conv.messages()
    turn = [sum(m.tokens or 0 for m in stored[1 + 2 * i : 3 + 2 * i]) for i in range(6)]
    slack = 1500
    assert min(turn) > slack + 300, "each big turn must be too big for the slack"
    limit = 100 + REPLY_PRIMING_TOKENS + (stored[0].tokens or 0) + turn[4] + turn[5]
    limit += (stored[-1].tokens or 0) + slack
    return conv, stored, limit


def _check_summary_context(
    conv: Conversation, stored: Sequence[Message], ctx: Any, *, limit: int, summarizer: RecordingSummarizer
) -> None:
    assert ctx.prompt_tokens == count_tokens(ctx.messages, MODEL)
    assert ctx.prompt_tokens + ctx.reserved <= limit
    assert conv.messages() == list(stored), "summarizing must not touch the originals"
    assert ctx.summary is not None
    assert ctx.messages[0] == stored[0].to_openai()
    summary_message = ctx.messages[1]
    assert summary_message["role"] == "system"
    assert ctx.summary.content in summary_message["content"]
    assert ctx.summary.content == summarizer.replies[-1]
    by_seq = {m.seq: m for m in stored}
    assert ctx.messages[2:] == [by_seq[s].to_openai() for s in ctx.seqs[1:]]
    assert ctx.summary.to_seq == ctx.seqs[1] - 1, "the summary covers everything before the window"
    assert ctx.dropped == len(stored) - len(ctx.seqs)


def test_summarize_stores_a_summary_reuses_it_and_extends_it(store: ConversationStore) -> None:
    conv, stored, limit = _summarized_conversation(store)
    summarize = RecordingSummarizer()
    options = {"context_limit": limit, "max_tokens": 100, "policy": "summarize", "summarizer": summarize}

    first = build_context(conv, **options)

    assert first.seqs == (1, 10, 11, 12, 13, 14)
    [request] = summarize.requests
    assert request.previous is None
    assert request.messages == [m.to_openai() for m in stored[1:9]]
    assert request.to_seq == 9
    assert request.conversation_id == conv.id
    _check_summary_context(conv, stored, first, limit=limit, summarizer=summarize)
    [saved] = conv.summaries()
    assert (saved.from_seq, saved.to_seq, saved.content) == (request.from_seq, 9, summarize.replies[0])
    assert saved.from_seq <= 2

    # The same turn again, and a later turn that drops nothing more: the summary is reused.
    again = build_context(conv, **options)
    assert again.messages == first.messages and again.prompt_tokens == first.prompt_tokens
    conv.append("assistant", "It depends.")
    conv.append("user", "On what?")
    later = build_context(conv, **options)
    assert len(summarize.requests) == 1
    assert later.seqs == (1, 10, 11, 12, 13, 14, 15, 16)
    _check_summary_context(conv, conv.messages(), later, limit=limit, summarizer=summarize)
    assert len(conv.summaries()) == 1

    # A big new turn pushes one more old turn out: only that turn is summarized, onto the old.
    conv.append("user", filler(700, "new "))
    conv.append("assistant", filler(700, "reply "))
    conv.append("user", "Short again.")
    current = conv.messages()
    extended = build_context(conv, **options)
    assert len(summarize.requests) == 2
    second = summarize.requests[1]
    assert second.previous == summarize.replies[0]
    assert second.messages == [m.to_openai() for m in current[9:11]]
    assert second.to_seq == 11
    assert extended.seqs[:2] == (1, 12)
    _check_summary_context(conv, current, extended, limit=limit, summarizer=summarize)
    latest = conv.summaries()[-1]
    assert (latest.from_seq, latest.to_seq) == (saved.from_seq, 11)
    assert latest.content == summarize.replies[1]


def test_step_wise_planning_asks_for_the_summary_then_sends_it(store: ConversationStore) -> None:
    """plan_context says which summary it needs and stores nothing; once save_summary has
    stored the answer, planning again sends it (what the senders do around their request)."""
    conv, stored, limit = _summarized_conversation(store)
    options: dict[str, Any] = {"context_limit": limit, "max_tokens": 100, "policy": "summarize"}

    request = plan_context(conv, **options)

    assert isinstance(request, SummaryRequest)
    assert (request.previous, request.to_seq) == (None, 9)
    assert request.messages == [m.to_openai() for m in stored[1:9]]
    assert conv.summaries() == [], "planning writes no summary"
    assert plan_context(conv, **options) == request, "and asks again until one is stored"
    with pytest.raises(ValueError, match="no text"):
        save_summary(conv, request, "  ")
    assert conv.summaries() == []

    saved = save_summary(conv, request, "They talked at length.")
    ctx = plan_context(conv, **options)

    assert isinstance(ctx, Context)
    assert conv.summaries() == [saved] and ctx.summary == saved
    assert (saved.from_seq, saved.to_seq) == (request.from_seq, 9)
    assert ctx.seqs == (1, 10, 11, 12, 13, 14)
    assert ctx.messages[1]["content"].endswith("They talked at length.")
    assert ctx.prompt_tokens == count_tokens(ctx.messages, MODEL)
    # The truncate policy never asks.
    assert isinstance(plan_context(conv, **{**options, "policy": "truncate"}), Context)


def test_summarize_does_nothing_when_everything_fits(store: ConversationStore) -> None:
    """Summaries are for what must be dropped; a history that fits is sent as it is."""
    conv = store.create(model=MODEL, system="s")
    _append_turns(conv, [100] * 5)
    conv.append("user", "last")
    stored = conv.messages()
    limit = 100 + count_tokens(stored, MODEL) + 50
    summarize = RecordingSummarizer()

    ctx = build_context(conv, context_limit=limit, max_tokens=100, policy="summarize", summarizer=summarize)

    assert summarize.requests == []
    assert ctx.messages == [m.to_openai() for m in stored]
    assert ctx.summary is None and ctx.dropped == 0
    assert conv.summaries() == []


def _assert_summarized_context_fits(ctx: Any, conv: Conversation, stored: list[Message], limit: int) -> None:
    """Exactly counted, within the window, the newest message sent, the history untouched."""
    assert ctx.prompt_tokens == count_tokens(ctx.messages, MODEL)
    assert ctx.prompt_tokens + ctx.reserved <= limit, (
        f"prompt {ctx.prompt_tokens} + reserve {ctx.reserved} > limit {limit}"
    )
    assert stored[-1].to_openai() in ctx.messages
    assert conv.messages() == stored


def test_summary_never_overflows_the_window(store: ConversationStore) -> None:
    """The newest turn leaves less room than a summary takes; an older turn must go. The
    prompt must still fit: a summary that does not fit cannot be sent."""
    conv = store.create(model=MODEL, system="s")
    _append_turns(conv, [40])
    conv.append("user", filler(300, "long question "))
    stored = conv.messages()
    limit = 100 + count_tokens([stored[0], stored[-1]], MODEL) + 20
    summarize = RecordingSummarizer()

    ctx = build_context(conv, context_limit=limit, max_tokens=100, policy="summarize", summarizer=summarize)

    _assert_summarized_context_fits(ctx, conv, stored, limit)


def test_summary_longer_than_asked_never_overflows_the_window(store: ConversationStore) -> None:
    conv, stored, limit = _summarized_conversation(store)
    wordy = RecordingSummarizer(words=2500)  # ignores SummaryRequest.max_tokens

    ctx = build_context(conv, context_limit=limit, max_tokens=100, policy="summarize", summarizer=wordy)

    _assert_summarized_context_fits(ctx, conv, stored, limit)


def test_fork_copies_the_summaries_of_its_range(store: ConversationStore) -> None:
    conv, stored, limit = _summarized_conversation(store)
    summarize = RecordingSummarizer()
    options = {"context_limit": limit, "max_tokens": 100, "policy": "summarize", "summarizer": summarize}
    original = build_context(conv, **options)
    [saved] = conv.summaries()

    fork = conv.fork()
    assert [(s.from_seq, s.to_seq, s.content) for s in fork.summaries()] == [
        (saved.from_seq, saved.to_seq, saved.content)
    ]
    forked = build_context(fork, **options)
    assert len(summarize.requests) == 1, "the fork reuses the copied summary"
    assert forked.messages == original.messages

    early = conv.fork(at=saved.to_seq - 1)
    assert early.summaries() == [], "a summary reaching past the fork point is not the fork's"
    assert conv.messages() == stored


# ---------------------------------------------------------------------------------------------
# The invariants on hand-written conversations, on SQLite and Postgres


def _scenario_messages() -> dict[str, ConversationSpec]:
    tools_turns: list[MessageSpec] = []
    for turn in range(4):
        tools_turns += [
            MessageSpec("user", filler(20 + 30 * turn, f"سوال {turn} ")),
            MessageSpec("assistant", None, tool_calls=[tool_call(f"c{turn}a"), tool_call(f"c{turn}b")]),
            MessageSpec("tool", filler(40, "🚀 "), tool_call_id=f"c{turn}a"),
            MessageSpec("tool", filler(15, "☀ "), tool_call_id=f"c{turn}b"),
            MessageSpec("assistant", filler(25, "جواب ")),
        ]
    tools_turns.append(MessageSpec("user", "خلاصه کن"))
    mixed = [
        MessageSpec("assistant", "Hi! How can I help?"),
        MessageSpec("user", "I am Sara.", pinned=True),
        MessageSpec("assistant", "Hello Sara.", pinned=True),
        MessageSpec("user", filler(120, "plan ")),
        MessageSpec("assistant", filler(60, "part "), status="incomplete"),
        MessageSpec("user", "Go on."),
        MessageSpec("assistant", None, tool_calls=[tool_call("x1"), tool_call("x2")]),
        MessageSpec("tool", "only one result", tool_call_id="x1"),
        MessageSpec("developer", "Keep answers short."),
        MessageSpec("user", filler(80, "again ")),
        MessageSpec("assistant", filler(200, "long answer ")),
        MessageSpec("system", "Mid-conversation instruction."),
        MessageSpec("user", "👍🏽", name="sara"),
    ]
    return {
        "tool_turns": ConversationSpec(MODEL, "ابزارها را به کار ببر.", tools_turns),
        "pins_incomplete_greeting": ConversationSpec("gpt-4", "You are kind. 😀", mixed),
        "no_system": ConversationSpec(MODEL, None, mixed[1:]),
    }


_SCENARIOS = _scenario_messages()


@pytest.mark.parametrize("scenario", sorted(_SCENARIOS))
def test_invariants_across_limits(store: ConversationStore, scenario: str) -> None:
    spec = _SCENARIOS[scenario]
    conv = build_conversation(store, spec)
    stored = conv.messages()
    full = count_tokens(stored, spec.model, tools=TOOLS)
    outcomes = set()
    for include_incomplete in (False, True):
        minimal = _minimal_context(stored, include_incomplete)
        for permille in range(0, 1301, 100):
            limit = max(1, full * permille // 1000) + 64
            try:
                ctx = build_context(
                    conv,
                    context_limit=limit,
                    max_tokens=64,
                    tools=TOOLS,
                    include_incomplete=include_incomplete,
                )
            except ContextWindowExceeded as err:
                outcomes.add("exceeded")
                assert err.needed == count_tokens(minimal, spec.model, tools=TOOLS)
                assert err.needed + 64 > limit
                continue
            outcomes.add("all" if ctx.dropped == len(_unsendable(stored, include_incomplete)) else "some")
            check_truncation(
                conv,
                stored,
                ctx,
                model=spec.model,
                limit=limit,
                max_tokens=64,
                tools=TOOLS,
                include_incomplete=include_incomplete,
            )
    assert outcomes == {"exceeded", "some", "all"}, "the limits should cover every outcome"


# ---------------------------------------------------------------------------------------------
# Properties over random conversations (SQLite)


@pytest.fixture(scope="module")
def sqlite_store() -> Iterator[ConversationStore]:
    """One SQLite file for all examples of a property; each example makes a new conversation."""
    with (
        tempfile.TemporaryDirectory() as directory,
        ConversationStore(f"sqlite:///{Path(directory) / 'property.db'}") as opened,
    ):
        yield opened


_PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("GILAS_CONV_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_PROPERTY_SETTINGS
@given(
    spec=conversation_specs(),
    permille=st.integers(-150, 1150),
    max_tokens=st.integers(1, 400),
    use_tools=st.booleans(),
    include_incomplete=st.booleans(),
)
def test_property_truncation_invariants(
    sqlite_store: ConversationStore,
    spec: ConversationSpec,
    permille: int,
    max_tokens: int,
    use_tools: bool,
    include_incomplete: bool,
) -> None:
    conv = build_conversation(sqlite_store, spec)
    stored = conv.messages()
    tools = TOOLS if use_tools else None
    minimal = count_tokens(_minimal_context(stored, include_incomplete), spec.model, tools=tools)
    full = count_tokens(stored, spec.model, tools=tools)
    # From a little less than the minimal context to a little more than everything.
    limit = max(1, minimal + (full - minimal) * permille // 1000 + max_tokens)
    try:
        ctx = build_context(
            conv,
            context_limit=limit,
            max_tokens=max_tokens,
            tools=tools,
            include_incomplete=include_incomplete,
        )
    except ContextWindowExceeded as err:
        assert minimal + max_tokens > limit, "raised although the minimal context fits"
        assert err.needed == minimal
        assert err.needed > err.available
        assert conv.messages() == stored
        return
    assert minimal + max_tokens <= limit
    check_truncation(
        conv,
        stored,
        ctx,
        model=spec.model,
        limit=limit,
        max_tokens=max_tokens,
        tools=tools,
        include_incomplete=include_incomplete,
    )


def _set_running_totals(
    store: ConversationStore, conversation_id: str, totals: dict[int, int | None]
) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE messages SET tokens_total = :total WHERE conversation_id = :cid AND seq = :seq"),
            [{"cid": conversation_id, "seq": seq, "total": total} for seq, total in totals.items()],
        )


def _context_or_error(conv: Conversation, **options: Any) -> Any:
    try:
        return build_context(conv, **options)
    except ContextWindowExceeded as err:
        return ("exceeded", err.needed, err.available)


@_PROPERTY_SETTINGS
@given(
    spec=conversation_specs(),
    permille=st.integers(-150, 1150),
    max_tokens=st.integers(1, 400),
    use_tools=st.booleans(),
    include_incomplete=st.booleans(),
    garbage=st.lists(st.one_of(st.none(), st.integers(-100, 20_000)), min_size=1, max_size=40),
)
def test_property_range_read_chooses_the_window_of_the_plain_read(
    sqlite_store: ConversationStore,
    spec: ConversationSpec,
    permille: int,
    max_tokens: int,
    use_tools: bool,
    include_incomplete: bool,
    garbage: list[int | None],
) -> None:
    """The running token totals only decide how far the window reader's first read goes:
    with them as appended (one range read), without them (the newest rows read in batches)
    and with nonsense in them, every turn gets the same context, or the same error."""
    conv = build_conversation(sqlite_store, spec)
    stored = conv.messages()
    tools = TOOLS if use_tools else None
    minimal = count_tokens(_minimal_context(stored, include_incomplete), spec.model, tools=tools)
    full = count_tokens(stored, spec.model, tools=tools)
    limit = max(1, minimal + (full - minimal) * permille // 1000 + max_tokens)
    options = dict(
        context_limit=limit, max_tokens=max_tokens, tools=tools, include_incomplete=include_incomplete
    )

    ranged = _context_or_error(conv, **options)
    _set_running_totals(sqlite_store, conv.id, {m.seq: None for m in stored})
    plain = _context_or_error(conv, **options)
    _set_running_totals(
        sqlite_store, conv.id, {m.seq: garbage[i % len(garbage)] for i, m in enumerate(stored)}
    )
    nonsense = _context_or_error(conv, **options)

    assert ranged == plain
    assert nonsense == plain


def test_range_read_reads_the_window_and_one_row_more(store: ConversationStore) -> None:
    """With the running totals in place, a turn of a long plain conversation reads, in one
    statement besides the anchors, the rows it sends and the older ones that fit until one
    does not (here at most a user message and its reply)."""
    conv = _persian_history(store, 3000)

    with StatementLog(store.engine) as log:
        ctx = build_context(conv, context_limit=3000, max_tokens=300)

    reads = [
        sql for sql, _params in log.of_kind("SELECT") if "FROM messages" in sql or "JOIN messages" in sql
    ]
    assert len(reads) == 2, reads  # the conversation with its anchors, then the range
    assert len(ctx.seqs) + 1 <= log.rows_returned() <= len(ctx.seqs) + 2


@settings(_PROPERTY_SETTINGS, max_examples=40)
@given(spec=conversation_specs(), permille=st.integers(-100, 1100), max_tokens=st.integers(1, 400))
def test_property_summarize_invariants(
    sqlite_store: ConversationStore, spec: ConversationSpec, permille: int, max_tokens: int
) -> None:
    conv = build_conversation(sqlite_store, spec)
    stored = conv.messages()
    # Summaries need room: from the minimal context to everything plus a summary's worth.
    minimal = count_tokens(_minimal_context(stored, False), spec.model)
    full = count_tokens(stored, spec.model) + 700
    limit = max(1, minimal + (full - minimal) * permille // 1000 + max_tokens)
    summarize = RecordingSummarizer()
    options = {
        "context_limit": limit,
        "max_tokens": max_tokens,
        "policy": "summarize",
        "summarizer": summarize,
    }
    try:
        ctx = build_context(conv, **options)
    except ContextWindowExceeded:
        assert minimal + max_tokens > limit, "raised although the minimal context fits"
        assert conv.messages() == stored and conv.summaries() == []
        return
    assert conv.messages() == stored, "the originals stay in the store"
    assert ctx.prompt_tokens == count_tokens(ctx.messages, spec.model)
    assert ctx.prompt_tokens + ctx.reserved <= limit, "over budget"
    assert ctx.dropped == len(stored) - len(ctx.seqs)
    by_seq = {m.seq: m for m in stored}
    sent = list(ctx.messages)
    anchors = _anchor_seqs(stored)
    assert anchors <= set(ctx.seqs)
    unsendable = _unsendable(stored, False)
    dropped = sorted({m.seq for m in stored} - set(ctx.seqs) - unsendable - anchors)
    if _sendable_tokens(stored, False) <= ctx.available:
        assert summarize.requests == [] and ctx.summary is None, "summarized a history that fits"
    if ctx.summary is None:
        assert sent == [by_seq[s].to_openai() for s in ctx.seqs]
    else:
        leading = 0
        while leading < len(ctx.seqs) and by_seq[ctx.seqs[leading]].role in ANCHOR_ROLES:
            leading += 1
        summary_message = sent.pop(leading)
        assert summary_message["role"] == "system"
        assert ctx.summary.content in summary_message["content"]
        assert sent == [by_seq[s].to_openai() for s in ctx.seqs]
        assert dataclasses.astuple(conv.summaries()[-1])[:4] == dataclasses.astuple(ctx.summary)[:4]
        assert all(ctx.summary.from_seq <= seq <= ctx.summary.to_seq for seq in dropped)
    _assert_api_valid(sent)
    # Asking again drops nothing new, so the summarizer is not asked again.
    calls = len(summarize.requests)
    again = build_context(conv, **options)
    assert len(summarize.requests) == calls
    assert again.messages == ctx.messages and again.prompt_tokens == ctx.prompt_tokens


# ---------------------------------------------------------------------------------------------
# Resources: the summarizer runs with no connection held; database errors are StoreError


class PoolWatchingSummarizer(RecordingSummarizer):
    """Records, at each call, how many pooled connections are checked out (the summarizer
    is an HTTP request: holding a connection across it starves the pool)."""

    def __init__(self, store: ConversationStore) -> None:
        super().__init__()
        self.store = store
        self.checked_out: list[int] = []

    def __call__(self, request: SummaryRequest) -> str:
        self.checked_out.append(self.store.engine.pool.checkedout())  # type: ignore[attr-defined]
        return super().__call__(request)


def test_summarize_holds_no_connection_during_the_summarizer(db_url: str) -> None:
    """A pool of one connection is enough for a summarizing turn, and the summarizer is
    called with no connection checked out (it used to block, then raise TimeoutError)."""
    pool = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 2}
    with ConversationStore(db_url, engine_options=pool) as store:
        conv, stored, limit = _summarized_conversation(store)
        summarize = PoolWatchingSummarizer(store)

        options = {"context_limit": limit, "max_tokens": 100, "policy": "summarize"}
        ctx = build_context(conv, **options, summarizer=summarize)  # type: ignore[arg-type]

        assert summarize.checked_out == [0]
        _check_summary_context(conv, stored, ctx, limit=limit, summarizer=summarize)
        assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_summarize_works_on_an_in_memory_database() -> None:
    """``sqlite://`` has one connection per thread: summarizing used to fail with "cannot
    start a transaction within a transaction"."""
    with ConversationStore("sqlite://") as store:
        conv, stored, limit = _summarized_conversation(store)
        summarize = RecordingSummarizer()

        options = {"context_limit": limit, "max_tokens": 100, "policy": "summarize"}
        ctx = build_context(conv, **options, summarizer=summarize)  # type: ignore[arg-type]

        _check_summary_context(conv, stored, ctx, limit=limit, summarizer=summarize)
        assert conv.summaries() == [ctx.summary]


def test_database_errors_while_choosing_the_window_are_store_errors(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="s")
    _append_turns(conv, [5, 5])
    with store.engine.begin() as conn:
        if store.dialect == "sqlite":
            conn.exec_driver_sql("DROP TABLE message_search_fts")
        conn.exec_driver_sql("DROP TABLE message_search")  # it references messages
        conn.exec_driver_sql("DROP TABLE messages")

    for call in (
        lambda: build_context(conv),
        lambda: build_context(conv, policy="summarize", summarizer=RecordingSummarizer()),
        lambda: conversation_tokens(conv),
    ):
        with pytest.raises(StoreError) as raised:
            call()
        assert isinstance(raised.value, GilasConvError)
        assert "SELECT" not in str(raised.value), "no SQL in the message"


def test_an_exhausted_pool_is_a_store_error(db_url: str) -> None:
    with ConversationStore(
        db_url, engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}
    ) as store:
        conv = store.create(model=MODEL, system="s")
        with store.engine.connect():  # the only connection, held elsewhere
            with pytest.raises(StoreError, match="no database connection free"):
                build_context(conv)
            with pytest.raises(StoreError, match="no database connection free"):
                conversation_tokens(conv)
        assert build_context(conv).seqs == (1,)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"content": "", "from_seq": 1, "to_seq": 2}, "summary"),
        ({"content": "s", "from_seq": 0, "to_seq": 2}, "from_seq"),
        ({"content": "s", "from_seq": 3, "to_seq": 2}, "from_seq"),
        ({"content": "s", "from_seq": 1, "to_seq": "2"}, "to_seq"),
        ({"content": "s", "from_seq": 1, "to_seq": 2, "usage": [1]}, "usage"),
    ],
)
def test_add_summary_refuses_bad_values_and_writes_nothing(
    store: ConversationStore, kwargs: dict[str, Any], what: str
) -> None:
    conv = store.create(model=MODEL, system="s")
    with pytest.raises(ValueError, match=what):
        conv.add_summary(**kwargs)
    assert conv.summaries() == []


def test_range_read_uses_the_key_when_conversations_fill_the_table(store: ConversationStore) -> None:
    """The range read's plan on long conversations that make up the whole table (with
    planner statistics, as autovacuum keeps them): an index range scan, newest first, that
    stops early; not a scan of the table, not a sort. Postgres cannot know where the range
    starts (a subquery's value); given no row limit it guessed a third of the conversation
    and read it through a bitmap and a sort, or, on a table large enough for parallel
    workers, scanned the whole table (issue 10: 60 ms a turn at 100,000 messages; that
    needs a larger table than a test should build, so this checks the plan's shape)."""
    rows = 10_000
    messages = cast(Table, MessageRow.__table__)
    conversations = cast(Table, ConversationRow.__table__)
    convs = [store.create(model=MODEL, system="Be brief.") for _ in range(2)]
    for conv in convs:
        total = conv.messages()[0].tokens or 0
        batch = []
        for seq in range(2, rows + 1):
            total += 20
            batch.append(
                {
                    "conversation_id": conv.id,
                    "seq": seq,
                    "role": "user" if seq % 2 == 0 else "assistant",
                    "content": f"message {seq}",
                    "status": "complete",
                    "pinned": False,
                    "tokens": 20,
                    "tokens_encoding": "o200k_base",
                    "tokens_total": total,
                    "created_at": conv.created_at,
                }
            )
        with store.engine.begin() as conn:
            conn.execute(insert(messages), batch)
            conn.execute(
                update(conversations)
                .where(conversations.c.id == conv.id)
                .values(last_seq=rows, tokens_total=total)
            )
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    conv = store.get(convs[-1].id)

    with StatementLog(store.engine) as log:
        ctx = build_context(conv, context_limit=3000, max_tokens=300)
    assert ctx.seqs[-1] == rows
    ((statement, params),) = [(sql, p) for sql, p in log.of_kind("SELECT") if "tokens_total >=" in sql]
    with store.engine.connect() as conn:
        plan = [str(r[-1]) for r in conn.exec_driver_sql(_EXPLAIN[store.dialect] + statement, params)]
    if store.dialect == "sqlite":
        assert not any(d.startswith("SCAN messages") or "TEMP B-TREE" in d for d in plan), plan
    else:
        assert not any("Seq Scan" in d or "Sort" in d for d in plan), plan


_EXPLAIN = {"sqlite": "EXPLAIN QUERY PLAN ", "postgresql": "EXPLAIN "}
