"""SQLite FTS5's matching and ``bm25`` for a handful of rows, in Python.

On SQLite the newest search rows (at most ``FTS5_BATCH`` store-wide, see
``gilas_conv/store/_search.py``) are not yet in the FTS5 index: FTS5 charges a fixed price
per transaction that writes it, so the store copies rows into it in batches. A search
matches those pending rows here, the way FTS5 would match them once copied, and ranks
them with FTS5's own ``bm25`` formula and weights, so a message reads the same whether
its row is pending or indexed.

What FTS5 does, and this module repeats:

* The ``ascii`` tokenizer: a token is a run of ASCII letters and digits and of non-ASCII
  characters; every other ASCII character separates; ASCII letters are lower-cased.
  A query's quoted string is tokenized the same way, so one query word may be a phrase
  of several tokens.
* A phrase matches where its tokens are consecutive in one column (``body`` or ``parts``;
  a ``body : "…"`` phrase in ``body`` only); a prefix phrase's last token may be any
  token that starts with it. Every phrase of the query must match (AND).
* ``bm25(fts, 1.0, 0.5)``: for each phrase, its IDF ``log((N - n + 0.5) / (n + 0.5))``
  (at least 1e-6) times ``f * (k1 + 1) / (f + k1 * (1 - b + b * D / avgdl))``, with
  ``k1 = 1.2``, ``b = 0.75``, ``f`` the phrase's instances weighted by column, ``D`` the
  row's tokens in all columns, ``N`` the rows, ``n`` the rows the phrase matches and
  ``avgdl`` the mean tokens per row, summed over the phrases in query order. The store's
  rank is that sum (``-bm25``).

``tests/test_search.py`` checks that this module and FTS5 agree on which rows match and on
their ranks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ._query import Query

__all__ = [
    "Phrase",
    "Row",
    "Stats",
    "bm25",
    "compile_query",
    "count_tokens",
    "folded",
    "frequencies",
    "frequency",
    "may_contain",
    "tokens",
]

# Column weights as the store ranks (bm25(fts, 1.0, 0.5)): body, parts.
WEIGHTS = (1.0, 0.5)
_K1 = 1.2
_B = 0.75

_SEPARATORS = re.compile(r"[\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


_ASCII_UPPER = re.compile("[A-Z]")


def _fold(value: str) -> str:
    # Indexed text is case-folded already: translate (slow on non-ASCII text) only if needed.
    return value.translate(_ASCII_LOWER) if _ASCII_UPPER.search(value) else value


def tokens(value: str) -> list[str]:
    """The tokens FTS5's ``ascii`` tokenizer makes of ``value``."""
    return [token for token in _SEPARATORS.split(_fold(value)) if token]


def count_tokens(*values: str) -> int:
    """How many tokens :func:`tokens` makes of the values together."""
    return sum(len(tokens(value)) for value in values)


@dataclass(frozen=True, slots=True)
class Phrase:
    """One phrase of an FTS5 query: consecutive tokens, the last a prefix or not, in every
    column or in ``body`` only."""

    tokens: tuple[str, ...]
    prefix: bool
    body_only: bool
    # The FTS5 MATCH expression of this phrase alone.
    expression: str


def compile_query(query: Query) -> tuple[Phrase, ...]:
    """The phrases of ``query.fts5()``, in its order."""
    phrases = []
    for term in query.terms:
        phrases.append(
            Phrase(
                tokens=tuple(tokens(" ".join(term.words))),
                prefix=term.kind == "prefix",
                body_only=term.kind == "phrase",
                expression=Query(query.text, (term,)).fts5(),
            )
        )
    return tuple(phrases)


@dataclass(frozen=True, slots=True)
class Row:
    """A search row's columns as FTS5 tokenizes them."""

    columns: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, body: str, parts: str) -> Row:
        return cls((tuple(tokens(body)), tuple(tokens(parts))))

    @property
    def size(self) -> int:
        return sum(len(column) for column in self.columns)


def _instances(phrase: Phrase, column: Sequence[str]) -> int:
    wanted = phrase.tokens
    if not wanted:
        return 0
    first = wanted[0]
    if len(wanted) == 1:
        if phrase.prefix:
            return sum(1 for token in column if token.startswith(first))
        return column.count(first)
    last = len(wanted) - 1
    found = 0
    for start, token in enumerate(column[: len(column) - last]):
        if token == first and all(column[start + i] == wanted[i] for i in range(1, last)):
            final = column[start + last]
            found += final.startswith(wanted[last]) if phrase.prefix else final == wanted[last]
    return found


def frequency(phrase: Phrase, row: Row) -> float:
    """The phrase's instances in ``row``, weighted by column (0.0: no match)."""
    columns = row.columns[:1] if phrase.body_only else row.columns
    return sum(
        _instances(phrase, column) * weight
        for column, weight in zip(columns, WEIGHTS[: len(columns)], strict=True)
    )


def frequencies(phrases: Sequence[Phrase], row: Row) -> list[float]:
    """Each phrase's :func:`frequency` in ``row``."""
    return [frequency(phrase, row) for phrase in phrases]


def folded(body: str, parts: str) -> str:
    """A row's text for :func:`may_contain`: ASCII letters lower-cased, as the tokenizer
    folds them."""
    return _fold(body + " " + parts)


def may_contain(phrase: Phrase, text: str) -> bool:
    """False when a row whose :func:`folded` text is ``text`` cannot match ``phrase``: one
    of its tokens is not even in the text. Spares tokenizing most rows."""
    return all(token in text for token in phrase.tokens)


@dataclass(frozen=True, slots=True)
class Stats:
    """What ``bm25`` knows of the whole index: rows, their tokens, and how many rows each
    phrase matches."""

    rows: int
    tokens: int
    matching: tuple[int, ...]


def bm25(stats: Stats, frequency: Sequence[float], size: int) -> float:
    """The store's rank (FTS5's ``-bm25``) of a row with these phrase frequencies and
    ``size`` tokens, the operations in FTS5's order (the same doubles come out)."""
    rows = stats.rows if stats.rows > 0 else 1
    average = stats.tokens / rows
    score = 0.0
    for found, hits in zip(frequency, stats.matching, strict=True):
        idf = math.log((rows - hits + 0.5) / (hits + 0.5))
        if idf <= 0.0:
            idf = 1e-6
        score += idf * ((found * (_K1 + 1.0)) / (found + _K1 * (1 - _B + _B * size / average)))
    return score
