"""Text normalization and tokenization for search: pure functions, applied identically to
the text that is indexed and to every query, so that spellings a reader sees as the same
word match each other.

What is folded (each original character is mapped on its own, so every normalized
character can be traced back to the character it came from; that is what lets snippets be
cut from the original text):

* Compatibility forms (NFKD): Arabic presentation forms (ﻻ, ﯾ), full-width Latin,
  ligatures, superscripts become their plain letters and digits.
* Every combining mark is removed: Arabic harakat (U+064B-U+065F), the superscript alef
  U+0670, and Latin accents (``café`` matches ``cafe``). Because NFKD splits a hamza or
  madda carried by a letter into the letter and a mark, this also folds the alef forms
  أ إ آ to ا, ؤ to و, ئ to ی and ۀ to ه: Persian and Arabic writers use either spelling,
  and search engines for both languages fold them. (Scripts whose vowel signs are marks,
  such as Devanagari, match a little more loosely; both sides are folded alike.)
* Arabic yeh ي (U+064A) and alef maksura ى (U+0649) become Persian yeh ی (U+06CC); Arabic
  kaf ك (U+0643) becomes Persian keheh ک (U+06A9); teh marbuta ة and ae ە become heh ه;
  alef wasla ٱ becomes ا. The standalone hamza ء is kept: it is a letter of its own.
* Tatweel (U+0640) and format characters (bidi marks, soft hyphen, BOM) are removed; the
  zero-width non-joiner U+200C is kept as a *joiner* (see below), and so is U+200D.
* Every decimal digit (Persian ۰-۹, Arabic-Indic ٠-٩, and any other script's) becomes
  its ASCII digit.
* Case is folded with :meth:`str.casefold`.

Tokens and the zero-width non-joiner
------------------------------------
A token is a run of letters and digits (joiners inside a run do not end it). Each token
has a *canonical* form, the run with its joiners removed, and *parts*, the pieces between
joiners. Persian writes one word three ways: می‌خواهم (ZWNJ), میخواهم (joined) and
می خواهم (a space). So that all three are one word:

* the ZWNJ is removed in the canonical form (می‌خواهم → میخواهم), and
* the detachable verb prefixes می and نمی are joined to the next word, and the plural
  suffixes ها, های, ... to the previous word, when only spaces separate them
  (می خواهم → میخواهم, کتاب ها → کتابها).

Every spelling therefore has the canonical token ``میخواهم``, in the index and in the
query. The parts (``می``, ``خواهم``; ``کتاب``, ``ها``) are indexed too, beside the word,
so a single-word search for ``کتاب`` still finds کتاب‌ها; phrases are matched on canonical
tokens only, which keeps positions the same whatever the spelling. What cannot be found is a
part of a word written fully joined (``خواهم`` does not find ``میخواهم``): nothing in that
spelling says where the word would split.

Bounds
------
A message's first :data:`MAX_INDEXED_TOKENS` tokens, within :data:`MAX_INDEXED_BYTES` of
token text, are indexed, and tokens longer than :data:`MAX_TOKEN_CHARS` are skipped (base64
blobs, hashes). The bounds are the same on every backend, so both find the same messages;
they keep a Postgres ``tsvector`` under its 1 MB limit and its 16,383 positions.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "JOINERS",
    "MAX_INDEXED_BYTES",
    "MAX_INDEXED_TOKENS",
    "MAX_TOKEN_CHARS",
    "Token",
    "normalize",
    "tokenize",
]

ZWNJ = "\u200c"
ZWJ = "\u200d"
JOINERS = frozenset((ZWNJ, ZWJ))
TATWEEL = "\u0640"

MAX_TOKEN_CHARS = 64
MAX_INDEXED_TOKENS = 16_000
MAX_INDEXED_BYTES = 128 * 1024

# Letters folded to the Persian form (after marks are removed).
_FOLD = {
    "\u064a": "\u06cc",  # ي Arabic yeh
    "\u0649": "\u06cc",  # ى alef maksura
    "\u0643": "\u06a9",  # ك Arabic kaf
    "\u0629": "\u0647",  # ة teh marbuta
    "\u06d5": "\u0647",  # ە ae (what ۀ leaves once its hamza is removed)
    "\u0671": "\u0627",  # ٱ alef wasla
}

# Detachable affixes joined to their word when only spaces separate them (see the module
# docstring). Only unambiguous ones: "تر" (wet) or "ای" (oh) are words of their own.
_PREFIXES = frozenset({"می", "نمی"})
_SUFFIXES = frozenset(
    {"ها", "های", "هایی", "هایم", "هایت", "هایش", "هایمان", "هایتان", "هایشان"}
)  # fmt: skip


def _fold_once(text: str) -> str:
    out = []
    for ch in unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold()):
        if ch in JOINERS:
            out.append(ch)
            continue
        category = unicodedata.category(ch)
        if category in ("Mn", "Me") or category == "Cf" or ch == TATWEEL:
            continue
        if category == "Nd":
            out.append(str(unicodedata.decimal(ch)))
            continue
        out.append(_FOLD.get(ch, ch))
    return "".join(out)


@lru_cache(maxsize=65536)
def _fold_char(ch: str) -> str:
    """The normalized form of one character (possibly empty, possibly several characters)."""
    folded = _fold_once(ch)
    # A fixpoint, so normalize() is idempotent whatever Unicode's tables compose into.
    for _ in range(4):
        again = _fold_once(folded)
        if again == folded:
            break
        folded = again
    return folded


class _FoldTable(dict[int, str]):
    """A ``str.translate`` table filled on demand: each character folded once per process."""

    def __missing__(self, codepoint: int) -> str:
        folded = self[codepoint] = _fold_char(chr(codepoint))
        return folded


_TABLE = _FoldTable()


def _unchanged_characters() -> str:
    """The characters of ASCII and the Arabic block that normalization leaves as they are
    (most of Persian and English text), computed from the folding itself so the set is
    right for this Python's Unicode tables."""
    candidates = [chr(c) for c in (*range(0x80), *range(0x0600, 0x0700), 0x200C, 0x200D, 0xAB, 0xBB)]
    return "".join(ch for ch in candidates if _fold_char(ch) == ch)


# Any character normalization may change: normalize() replaces only these, one by one,
# which for Persian text (a few of them per message, if any) is several times faster than
# translating every character.
_CHANGED = re.compile("[^" + re.escape(_unchanged_characters()) + "]")


def _fold_match(match: re.Match[str]) -> str:
    return _TABLE[ord(match.group())]


# A run of letters, digits and joiners, captured so that re.split() returns the runs and
# the text between them. ``\w`` is ``str.isalnum`` or "_"; "_" is replaced before splitting.
_RUN_SPLIT = re.compile(r"([\w\u200c\u200d]+)")
_RUN = re.compile(r"[\w\u200c\u200d]+")
_JOINER_SPLIT = re.compile(r"[\u200c\u200d]+")


def normalize(text: str) -> str:
    """The text with every character folded as the module docstring describes.

    Joiners (ZWNJ, ZWJ) are kept; :func:`tokenize` decides what they mean. Idempotent:
    ``normalize(normalize(t)) == normalize(t)``.
    """
    if text.isascii():
        return text.lower()
    return _CHANGED.sub(_fold_match, text)


@dataclass(frozen=True, slots=True)
class Token:
    """One word: its canonical form, its parts, and where it is in the original text.

    ``start``/``end`` index the original string; ``parts`` holds ``(part, start, end)`` for
    each piece between joiners or merged affixes (empty when the word has one piece).
    """

    text: str
    start: int
    end: int
    parts: tuple[tuple[str, int, int], ...] = ()


def _is_word_char(ch: str) -> bool:
    return ch.isalnum()


def _raw_tokens(text: str) -> Iterator[tuple[list[tuple[str, int, int]], int, int]]:
    """Runs of letters and digits, each as its pieces (split at joiners), with offsets."""
    pieces: list[tuple[str, int, int]] = []
    piece: list[str] = []
    piece_start = -1
    last_end = -1
    start = -1

    def close_piece() -> None:
        nonlocal piece, piece_start
        if piece:
            pieces.append(("".join(piece), piece_start, last_end))
        piece = []
        piece_start = -1

    for index, ch in enumerate(text):
        folded = _fold_char(ch) if not ch.isascii() else ch.lower()
        if not folded:
            continue  # removed (a mark, tatweel, a format character): not a word break
        for out in folded:
            if out in JOINERS:
                if start >= 0:
                    close_piece()
                continue
            if _is_word_char(out):
                if start < 0:
                    start = index
                if piece_start < 0:
                    piece_start = index
                piece.append(out)
                last_end = index + 1
            elif start >= 0:
                close_piece()
                yield pieces, start, last_end
                pieces, start = [], -1
    if start >= 0:
        close_piece()
        yield pieces, start, last_end


def _arabic_script(word: str) -> bool:
    return "\u0600" <= word[0] <= "\u06ff"


def tokenize(text: str) -> list[Token]:
    """The words of ``text`` (original, not normalized), in order, with their offsets.

    Pure and deterministic; the same function tokenizes what is indexed and what is asked.
    """
    raw = [
        (pieces, start, end) for pieces, start, end in _raw_tokens(text) if pieces
    ]  # a run of joiners alone has no pieces
    merged: list[tuple[list[tuple[str, int, int]], int, int]] = []
    for pieces, start, end in raw:
        if merged:
            previous, p_start, p_end = merged[-1]
            gap = normalize(text[p_end:start])
            only_spaces = gap.strip() == "" and "\n" not in gap
            word = "".join(p for p, _, _ in pieces)
            before = "".join(p for p, _, _ in previous)
            if (
                only_spaces
                and _arabic_script(word)
                and _arabic_script(before)
                and ((before in _PREFIXES and len(previous) == 1) or (word in _SUFFIXES and len(pieces) == 1))
            ):
                merged[-1] = (previous + pieces, p_start, end)
                continue
        merged.append((pieces, start, end))
    tokens = []
    for pieces, start, end in merged:
        canonical = "".join(p for p, _, _ in pieces)
        parts = tuple(pieces) if len(pieces) > 1 else ()
        tokens.append(Token(canonical, start, end, parts))
    return tokens


_AFFIXES = _PREFIXES | _SUFFIXES


def _words(normalized: str) -> list[tuple[str, tuple[str, ...]]]:
    """:func:`words_and_parts` of text already normalized."""
    if "_" in normalized:
        # Neither a word character nor a space, like "_": the split below needs one class.
        normalized = normalized.replace("_", "\x00")
    chunks = _RUN_SPLIT.split(normalized)  # text between runs at even indexes, runs at odd
    runs = chunks[1::2]
    if ZWNJ not in normalized and ZWJ not in normalized and _AFFIXES.isdisjoint(runs):
        # The usual message: every run is one word, and no affix can join another word.
        return [(run, ()) for run in runs]
    merged: list[list[str]] = []
    after_joiners = False  # a joiner lies between the previous word and this one
    for index in range(1, len(chunks), 2):
        run = chunks[index]
        if ZWNJ in run or ZWJ in run:
            pieces = [piece for piece in _JOINER_SPLIT.split(run) if piece]
            if not pieces:
                after_joiners = True
                continue
            # A joiner at the edge of a run sits in the gap as tokenize sees it: no join there.
            after_joiners = after_joiners or run[0] in (ZWNJ, ZWJ)
            ends_with_joiner = run[-1] in (ZWNJ, ZWJ)
        else:
            pieces = [run]
            ends_with_joiner = False
        if merged and not after_joiners:
            gap = chunks[index - 1]
            previous = merged[-1]
            # Affixes join their word across spaces only (not a line break, not punctuation).
            if (
                gap.isspace()
                and "\n" not in gap
                and (
                    (len(previous) == 1 and previous[0] in _PREFIXES and _arabic_script(pieces[0]))
                    or (len(pieces) == 1 and pieces[0] in _SUFFIXES and _arabic_script(previous[0]))
                )
            ):
                previous.extend(pieces)
                after_joiners = ends_with_joiner
                continue
        after_joiners = ends_with_joiner
        merged.append(pieces)
    return [("".join(p), tuple(p) if len(p) > 1 else ()) for p in merged]


def words_and_parts(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """The canonical words of ``text`` with their parts: what :func:`tokenize` gives without
    the offsets, computed with one substitution and one split (the indexing path of every
    append, so kept fast). A test checks the two agree."""
    return _words(normalize(text))


# Text normalized to at most this many characters cannot reach the bounds: a word costs at
# most twice its UTF-8 bytes (itself and its parts), and has at least one character and
# one character between it and the next word.
_UNBOUNDED_CHARS = min(MAX_INDEXED_BYTES // 8, 2 * MAX_INDEXED_TOKENS - 1)


def index_terms(text: str) -> tuple[list[str], list[tuple[int, str]]]:
    """What the index holds for ``text``: its canonical words in order, and its parts, each
    with the index of the word it belongs to. Bounded as the module docstring says."""
    normalized = normalize(text)
    found = _words(normalized)
    words: list[str] = []
    parts: list[tuple[int, str]] = []
    if len(normalized) <= _UNBOUNDED_CHARS:
        for canonical, pieces in found:
            if len(canonical) <= MAX_TOKEN_CHARS:
                if pieces:
                    parts.extend((len(words), p) for p in pieces)
                words.append(canonical)
        return words, parts
    budget = MAX_INDEXED_BYTES
    for canonical, pieces in found:
        if len(words) >= MAX_INDEXED_TOKENS:
            break
        if len(canonical) > MAX_TOKEN_CHARS:
            continue
        cost = len(canonical.encode())
        token_parts = [p for p in pieces if p != canonical]
        cost += sum(len(p.encode()) for p in token_parts)
        budget -= cost
        if budget < 0:
            break
        position = len(words)
        words.append(canonical)
        parts.extend((position, p) for p in token_parts)
    return words, parts


def index_text(text: str) -> tuple[str, str]:
    """:func:`index_terms` as the SQLite index stores it: the words, and the parts, each
    joined by spaces. The same result, found without a loop in Python for most messages
    (no affix to join, no word over the bounds); a test checks the two agree."""
    normalized = normalize(text)
    if len(normalized) <= _UNBOUNDED_CHARS:
        runs = _RUN.findall(normalized.replace("_", " ") if "_" in normalized else normalized)
        if _AFFIXES.isdisjoint(runs) and (not runs or max(map(len, runs)) <= MAX_TOKEN_CHARS):
            if ZWNJ not in normalized and ZWJ not in normalized:
                return " ".join(runs), ""
            words: list[str] = []
            parts: list[str] = []
            for run in runs:
                if ZWNJ not in run and ZWJ not in run:
                    words.append(run)
                    continue
                pieces = [piece for piece in _JOINER_SPLIT.split(run) if piece]
                if len(pieces) > 1:
                    words.append("".join(pieces))
                    parts.extend(pieces)
                elif pieces:
                    if pieces[0] in _AFFIXES:
                        break  # it may join its neighbour: the general path decides
                    words.append(pieces[0])
            else:
                return " ".join(words), " ".join(parts)
    all_words, all_parts = index_terms(text)
    return " ".join(all_words), " ".join(part for _, part in all_parts)
