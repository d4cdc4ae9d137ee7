"""The search query language, parsed by a pure parser into terms the store turns into an
FTS5 ``MATCH`` expression or a Postgres ``tsquery``.

Syntax
------
``word word``
    Every word must occur in the message (AND). Words are normalized and tokenized exactly
    as indexed text is (:mod:`._normalize`), so ``می خواهم`` is one word, like ``میخواهم``.
``"a phrase"``
    The words in this order, next to each other. ``«…»`` and ``“…”`` quote too; an
    unclosed quote runs to the end of the query.
``تهر*``
    A prefix: any word that starts with ``تهر``.

Anything else (``AND``, ``OR``, ``-``, ``(``, ``:``) is an ordinary word or punctuation,
never an operator: no user input reaches the database's query syntax. A query with no word
in it (``*``, ``""``, ``?!``) raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._normalize import MAX_TOKEN_CHARS, tokenize

__all__ = ["MAX_QUERY_CHARS", "MAX_QUERY_TERMS", "Query", "Term", "parse_query"]

MAX_QUERY_CHARS = 1000
MAX_QUERY_TERMS = 32

_QUOTES = {'"': '"', "«": "»", "“": "”"}


@dataclass(frozen=True, slots=True)
class Term:
    """One condition: a word, a prefix, or a phrase (two words or more), normalized."""

    kind: Literal["word", "prefix", "phrase"]
    words: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: all of its terms must match."""

    text: str
    terms: tuple[Term, ...]

    def fts5(self) -> str:
        """The SQLite FTS5 MATCH expression. Every word is a quoted string (the index's
        tokens are letters and digits only), phrases are restricted to the ``body`` column."""
        out = []
        for term in self.terms:
            quoted = '"' + " ".join(term.words).replace('"', '""') + '"'
            if term.kind == "prefix":
                out.append(quoted + " *")
            elif term.kind == "phrase":
                out.append("body : " + quoted)
            else:
                out.append(quoted)
        return " AND ".join(out)

    def tsquery(self) -> str:
        """The Postgres tsquery text (parsed by the ``tsquery`` input function, not by a text
        search parser): words quoted, phrases on the canonical (weight A) lexemes only."""
        out = []
        for term in self.terms:
            lexemes = [_pg_quote(word) for word in term.words]
            if term.kind == "prefix":
                out.append(lexemes[0] + ":*")
            elif term.kind == "phrase":
                out.append("(" + " <-> ".join(f"{lexeme}:A" for lexeme in lexemes) + ")")
            else:
                out.append(lexemes[0])
        return " & ".join(out)

    def exact_words(self) -> frozenset[str]:
        return frozenset(w for t in self.terms if t.kind != "prefix" for w in t.words)

    def prefixes(self) -> tuple[str, ...]:
        return tuple(t.words[0] for t in self.terms if t.kind == "prefix")


def _pg_quote(word: str) -> str:
    return "'" + word.replace("\\", "\\\\").replace("'", "''") + "'"


def parse_query(text: str) -> Query:
    """Parse a search query (see the module docstring); ValueError when it has no word to
    look for, or is too long."""
    if not isinstance(text, str):
        raise ValueError(f"the search query must be a string, not {type(text).__name__}")
    if len(text) > MAX_QUERY_CHARS:
        raise ValueError(f"the search query is too long ({len(text)} characters; at most {MAX_QUERY_CHARS})")
    terms: list[Term] = []
    position = 0
    while position < len(text):
        opening = min(
            (found for found in (text.find(q, position) for q in _QUOTES) if found >= 0),
            default=len(text),
        )
        terms.extend(_bare_terms(text[position:opening]))
        if opening == len(text):
            break
        closing = text.find(_QUOTES[text[opening]], opening + 1)
        if closing < 0:
            closing = len(text)
        words = tuple(t.text for t in tokenize(text[opening + 1 : closing]))
        if len(words) == 1:
            terms.append(Term("word", words))
        elif words:
            terms.append(Term("phrase", words))
        position = closing + 1
    unique = tuple(dict.fromkeys(terms))
    if not unique:
        raise ValueError(f"the search query {text!r} has no word to look for (only punctuation or operators)")
    for term in unique:
        for word in term.words:
            if len(word) > MAX_TOKEN_CHARS:
                # Such words are never indexed (see _normalize), so they could never match.
                raise ValueError(
                    f"a search word is at most {MAX_TOKEN_CHARS} characters long: {word[:20]!r}…"
                )
    if len(unique) > MAX_QUERY_TERMS:
        raise ValueError(f"the search query has {len(unique)} terms; at most {MAX_QUERY_TERMS}")
    return Query(text, unique)


def _bare_terms(segment: str) -> list[Term]:
    terms = []
    for token in tokenize(segment):
        prefix = segment[token.end : token.end + 1] == "*"
        terms.append(Term("prefix" if prefix else "word", (token.text,)))
    return terms
