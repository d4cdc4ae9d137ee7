"""Conversations for the truncation tests: a plain description, a builder, hypothesis strategies.

A :class:`ConversationSpec` describes a conversation as data (model, system message, the
messages in order with their status and pin), so the same description can be stored on
SQLite and on Postgres, drawn at random by hypothesis, or written by hand. Random
conversations look like real ones: turns that start with a user message, replies that may
be cut off (``status="incomplete"``), tool-call groups (an assistant message with one to
three calls, then the results, some possibly missing because the run was interrupted),
occasional mid-conversation system or developer messages, pinned user messages and plain
replies, and text mixing Persian, emoji and English of very different lengths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import strategies as st

from gilas_conv import Conversation, ConversationStore

__all__ = [
    "MODELS",
    "TOOLS",
    "ConversationSpec",
    "MessageSpec",
    "build_conversation",
    "conversation_specs",
    "filler",
    "texts",
    "tool_call",
]

# One model per encoding: the two encodings count Persian and emoji very differently.
MODELS = ("gpt-4o-mini", "gpt-4")

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "نام شهر، مثلاً تهران"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

_WORDS = (
    "سلام",
    "دنیا",
    "کتاب\u200cها",
    "می\u200cخواهم",
    "گفتگو",
    "تهران",
    "۱۲۳۴",
    "ك",
    "ی",
    "😀",
    "🚀",
    "👍🏽",
    "🇮🇷",
    "👨\u200d👩\u200d👧\u200d👦",
    "hello",
    "world",
    "context",
    "window",
    "42",
    "\n",
    "—",
)


def filler(words: int, seed: str = "") -> str:
    """Deterministic mixed-script text of ``words`` words (for hand-written conversations)."""
    start = sum(map(ord, seed)) % len(_WORDS)
    return seed + " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(words))


@st.composite
def texts(draw: st.DrawFn) -> str:
    """Message text: mostly short, sometimes a few hundred words, sometimes arbitrary Unicode."""
    kind = draw(st.sampled_from(("short", "short", "short", "long", "unicode", "empty")))
    if kind == "empty":
        return ""
    if kind == "unicode":
        # Arbitrary code points (no lone surrogates: the store refuses them, by design).
        return draw(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40))
    words = draw(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=25))
    if kind == "long":
        # A few hundred words from few draws, so examples stay small for hypothesis.
        words = words * draw(st.integers(4, 30))
    return " ".join(words)


@dataclass(frozen=True)
class MessageSpec:
    role: str
    content: Any
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    status: str = "complete"
    pinned: bool = False


@dataclass(frozen=True)
class ConversationSpec:
    model: str
    system: str | None
    messages: list[MessageSpec] = field(default_factory=list)


def tool_call(call_id: str, city: str = "تهران") -> dict[str, Any]:
    arguments = json.dumps({"city": city, "unit": "celsius"}, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def build_conversation(store: ConversationStore, spec: ConversationSpec) -> Conversation:
    """Store ``spec`` through the public API (append, then pin), as an application would."""
    conv = store.create(model=spec.model, system=spec.system)
    for message in spec.messages:
        stored = conv.append(
            message.role,
            message.content,
            name=message.name,
            tool_calls=message.tool_calls,
            tool_call_id=message.tool_call_id,
            status=message.status,
        )
        if message.pinned:
            conv.pin(stored.seq)
    return conv


@st.composite
def _tool_group(draw: st.DrawFn, prefix: str) -> list[MessageSpec]:
    """An assistant message calling tools, then the results (some may be missing)."""
    count = draw(st.integers(1, 3))
    ids = [f"call_{prefix}_{k}" for k in range(count)]
    status = draw(st.sampled_from(("complete", "complete", "complete", "incomplete")))
    content = draw(st.one_of(st.none(), texts())) if status == "complete" else None
    group = [
        MessageSpec(
            "assistant", content, tool_calls=[tool_call(i, draw(texts())[:30]) for i in ids], status=status
        )
    ]
    # Usually every call is answered; an interrupted run leaves some unanswered.
    answered = ids if draw(st.integers(0, 4)) else draw(st.lists(st.sampled_from(ids), unique=True))
    group += [MessageSpec("tool", draw(texts()), tool_call_id=i) for i in ids if i in answered]
    return group


@st.composite
def _reply(draw: st.DrawFn, prefix: str) -> list[MessageSpec]:
    kind = draw(st.sampled_from(("text", "text", "text", "tools", "incomplete", "system")))
    if kind == "tools":
        return draw(_tool_group(prefix))
    if kind == "system":
        role = draw(st.sampled_from(("system", "developer")))
        return [MessageSpec(role, draw(texts()))]
    status = "incomplete" if kind == "incomplete" else "complete"
    return [MessageSpec("assistant", draw(texts()), status=status)]


@st.composite
def conversation_specs(draw: st.DrawFn, *, max_turns: int = 10) -> ConversationSpec:
    """A random conversation. The newest user message is never pinned: that case has a
    test of its own (``test_pinned_newest_user_message_is_the_newest_turn``)."""
    model = draw(st.sampled_from(MODELS))
    system = draw(st.one_of(st.none(), texts(), texts(), texts()))
    messages: list[MessageSpec] = []
    if draw(st.integers(0, 5)) == 0:
        messages.append(MessageSpec("developer", draw(texts())))
    if draw(st.integers(0, 5)) == 0:
        # A greeting before the first user message: the only way a window may start with
        # an assistant message is by starting at the very beginning of the history.
        messages.append(MessageSpec("assistant", draw(texts())))
    turns = draw(st.integers(1, max_turns))
    for turn in range(turns):
        name = draw(st.one_of(st.none(), st.sampled_from(("sara", "ali_2"))))
        messages.append(MessageSpec("user", draw(texts()), name=name))
        for reply in range(draw(st.integers(0, 3))):
            messages.extend(draw(_reply(f"{turn}_{reply}")))
    newest_user = max(i for i, m in enumerate(messages) if m.role == "user")
    pins = draw(st.sets(st.integers(0, len(messages) - 1), max_size=3))
    for index in pins:
        message = messages[index]
        pinnable = (
            message.role in ("user", "assistant")
            and not message.tool_calls
            and message.status == "complete"
            and index != newest_user
        )
        if pinnable:
            messages[index] = replace(message, pinned=True)
    return ConversationSpec(model=model, system=system, messages=messages)
