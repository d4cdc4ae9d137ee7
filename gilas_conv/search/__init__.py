"""Full-text search over stored messages, aware of Persian and Arabic spelling.

The pure half lives here: normalization and tokenization (:mod:`._normalize`), the query
language (:mod:`._query`) and snippets (:mod:`._snippet`). The store runs the queries
(``ConversationStore.search``); its SQL lives in ``gilas_conv/store/_search.py``.
"""

from ._normalize import Token, normalize, tokenize
from ._query import Query, Term, parse_query
from ._snippet import SearchHit, make_snippet, searchable_text

__all__ = [
    "Query",
    "SearchHit",
    "Term",
    "Token",
    "make_snippet",
    "normalize",
    "parse_query",
    "searchable_text",
    "tokenize",
]
