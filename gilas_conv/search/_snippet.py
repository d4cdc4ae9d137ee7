"""Search hits and their snippets, cut from the original text (pure)."""

from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import dataclass
from typing import Any

from ._normalize import JOINERS, tokenize
from ._query import Query

__all__ = ["HIGHLIGHT", "SNIPPET_CHARS", "SearchHit", "make_snippet", "searchable_text"]

# Matched words are wrapped in these in SearchHit.snippet. Not « »: Persian quotes with them.
HIGHLIGHT = ("[", "]")
SNIPPET_CHARS = 160
# How much of the text before the first match a snippet shows.
SNIPPET_LEAD = 50
ELLIPSIS = "…"

# What is searched, by role: what the people said and what tools returned; never system or
# developer instructions, nor the JSON of tool calls.
SEARCHED_ROLES = frozenset({"user", "assistant", "tool"})


def searchable_text(role: str, content: Any) -> str:
    """The text of a message that search indexes ("" when none): a string content, or the
    text and refusal parts of a content list, joined by newlines."""
    if role not in SEARCHED_ROLES or content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            for key in ("text", "refusal"):
                value = part.get(key)
                if part.get("type") == key and isinstance(value, str):
                    pieces.append(value)
    return "\n".join(pieces)


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One message that matched a search.

    ``snippet`` is a piece of the message's original text around the first match, with
    whitespace folded and control characters removed, the matched words wrapped in
    :data:`HIGHLIGHT` (``[`` ``]``); ``fragments`` is the same text as ``(text, matched)``
    pairs, for display without parsing the brackets. ``rank`` orders hits (higher is better);
    its scale is the engine's (FTS5's bm25 negated, Postgres's ts_rank), so compare ranks
    only within one result list. ``status`` is ``"incomplete"`` for a cut-off reply.
    """

    conversation_id: str
    title: str | None
    seq: int
    role: str
    snippet: str
    rank: float
    status: str
    created_at: dt.datetime
    fragments: tuple[tuple[str, bool], ...] = ()

    @property
    def incomplete(self) -> bool:
        return self.status == "incomplete"

    def to_json(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "title": self.title,
            "seq": self.seq,
            "role": self.role,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "rank": self.rank,
            "snippet": self.snippet,
        }


def _matches(query: Query) -> Any:
    exact = query.exact_words()
    prefixes = query.prefixes()

    def matched(word: str) -> bool:
        return word in exact or any(word.startswith(p) for p in prefixes)

    return matched


def _clean(text: str) -> str:
    """Whitespace folded to single spaces, control and format characters dropped (joiners
    kept: Persian needs them to render), so a snippet is one safe line."""
    out: list[str] = []
    for ch in text:
        if ch.isspace():
            if not out or out[-1] != " ":
                out.append(" ")
        elif ch in JOINERS or not unicodedata.category(ch).startswith("C"):
            out.append(ch)
    return "".join(out)


def make_snippet(text: str, query: Query, *, width: int = SNIPPET_CHARS) -> tuple[tuple[str, bool], ...]:
    """The fragments of a snippet of ``text`` around the first word ``query`` matches."""
    matched = _matches(query)
    spans: list[tuple[int, int]] = []
    for token in tokenize(text):
        if matched(token.text):
            spans.append((token.start, token.end))
        else:
            spans.extend((start, end) for part, start, end in token.parts if matched(part))
    first = spans[0][0] if spans else 0
    start = max(0, first - SNIPPET_LEAD)
    if start > 0:
        # Begin at a word boundary, not inside a word.
        space = next((i for i in range(start, first) if text[i].isspace()), first)
        start = space + 1 if space < first else first
    end = min(len(text), start + width)
    if end < len(text):
        space = next((i for i in range(end, max(start, first + 1), -1) if text[i - 1].isspace()), end)
        end = space
    fragments: list[tuple[str, bool]] = []
    position = start
    for span_start, span_end in spans:
        if span_start < position or span_end > end:
            continue
        if span_start > position:
            fragments.append((_clean(text[position:span_start]), False))
        fragments.append((_clean(text[span_start:span_end]), True))
        position = span_end
    if position < end:
        fragments.append((_clean(text[position:end]), False))
    if fragments and not fragments[0][1]:
        fragments[0] = (fragments[0][0].lstrip(), False)
    if fragments and not fragments[-1][1]:
        fragments[-1] = (fragments[-1][0].rstrip(), False)
    if start > 0:
        fragments.insert(0, (ELLIPSIS, False))
    if end < len(text):
        fragments.append((ELLIPSIS, False))
    return tuple(f for f in fragments if f[0])


def marked(fragments: tuple[tuple[str, bool], ...]) -> str:
    """The fragments as one string, matched words in :data:`HIGHLIGHT`."""
    left, right = HIGHLIGHT
    return "".join(f"{left}{text}{right}" if hit else text for text, hit in fragments)
