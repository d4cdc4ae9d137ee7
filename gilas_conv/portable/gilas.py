"""gilas-conv's own export format, and plain OpenAI messages arrays, read from a file (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["parse_import"]


@dataclass(frozen=True)
class _ImportItem:
    where: str  # "line 3", "conversation 2", "the file": how an error names it
    data: Any


# Python's JSON parser recurses once per nesting level and stops at the interpreter's limit.
_TOO_DEEP = "the JSON is nested too deeply"


def parse_import(text: str) -> list[_ImportItem]:
    """The conversations in an import file; ValueError naming the line or item at fault.

    Accepted: one exported conversation (an object with "messages"), a JSON array of them,
    a plain OpenAI messages array (objects with "role"), or JSON Lines of either.
    """
    if not text.strip():
        raise ValueError("the file is empty")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    except json.JSONDecodeError as whole_err:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if len(lines) > 1 and _parses(lines[0][1]):
            return [_ImportItem(f"line {n}", _line_json(n, line)) for n, line in lines]
        raise ValueError(f"line {whole_err.lineno}, column {whole_err.colno}: {whole_err.msg}") from None
    if isinstance(data, dict):
        return [_ImportItem("the file", data)]
    if isinstance(data, list) and data and all(isinstance(item, dict) and "role" in item for item in data):
        return [_ImportItem("the file", data)]  # one conversation as an OpenAI messages array
    if (
        isinstance(data, list)
        and data
        and all(isinstance(item, dict) and "messages" in item for item in data)
    ):
        return [_ImportItem(f"conversation {n}", item) for n, item in enumerate(data, start=1)]
    raise ValueError(
        "expected an exported conversation, JSON Lines of them, or an OpenAI messages array "
        '(objects with "role" and "content")'
    )


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _line_json(number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError(f"line {number}: {_TOO_DEEP}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"line {number}, column {err.colno}: {err.msg}") from None
