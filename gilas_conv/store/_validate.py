"""Validation of everything the store is asked to write or look up: pure functions, run
before any transaction starts, raising ValueError and touching nothing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from .. import tokens as _tokens
from ._schema import ROLES, STATUSES

# Content-part types the chat-completions API accepts, per role.
_USER_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file"})
_TEXT_PART_TYPES = frozenset({"text"})
_ASSISTANT_PART_TYPES = frozenset({"text", "refusal"})


def _check_str(value: Any, what: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} contains a lone surrogate at index {err.start} ({value[err.start]!r}); "
            "it is not valid Unicode text and cannot be stored"
        ) from err
    return value


# Column sizes of the short text fields (see _schema); Postgres enforces them, SQLite does
# not, so they are checked here for both.
_SHORT = 255
_ID_LENGTH = 36
_FINISH_REASON_MAX = 64


def _check_field(value: Any, what: str, *, max_length: int | None = _SHORT, allow_empty: bool = True) -> str:
    """A short text field (ids, names, models, titles): text, no NUL, within its column."""
    _check_str(value, what, allow_empty=allow_empty)
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    if max_length is not None and len(value) > max_length:
        raise ValueError(f"{what} is {len(value)} characters long; at most {max_length} are stored")
    return value


def _lookup_key(value: str | None, max_length: int) -> bool:
    """Whether ``value`` could be a stored id or owner at all (else it is simply not found):
    stored ones are valid Unicode (no lone surrogate), with no NUL, within their column."""
    if value is None:
        return True
    if "\x00" in value or len(value) > max_length:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The largest value of an INTEGER column on Postgres (SQLite would take up to 2**63 - 1):
# checked for both, so what one backend stores (and exports) the other imports.
MAX_STORED_INT = 2**31 - 1
# How deeply JSON data (usage, extra, metadata, content parts, tool calls) may nest. Real
# data nests a few levels; the limit keeps checking and encoding it far from Python's
# recursion limit.
MAX_JSON_DEPTH = 64


def _check_int(value: Any, what: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{what} must be an integer (>= 0), not {value!r}")
    if value is not None and value > MAX_STORED_INT:
        raise ValueError(f"{what} is {value}; at most {MAX_STORED_INT} can be stored")
    return value


def _check_json(value: Any, what: str, _depth: int = 0, _root: str | None = None) -> Any:
    """Check that ``value`` is plain JSON data with valid Unicode strings, nested at most
    MAX_JSON_DEPTH levels; return it."""
    root = what if _root is None else _root
    if _depth > MAX_JSON_DEPTH:
        raise ValueError(f"{root} nests deeper than {MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{what} contains {value!r}, which JSON cannot represent")
        return value
    if isinstance(value, str):
        return _check_str(value, what)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{what} has a non-string key {key!r}")
            _check_str(key, f"a key of {what}")
            _check_json(item, f"{what}[{key!r}]", _depth + 1, root)
        return value
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{what}[{index}]", _depth + 1, root)
        return value
    raise ValueError(f"{what} must be JSON data (str, number, list, dict), not {type(value).__name__}")


def _check_content(role: str, content: Any, *, has_tool_calls: bool) -> Any:
    if content is None:
        if role == "assistant" and has_tool_calls:
            return None
        raise ValueError(
            f"content of a {role} message must be a string"
            + (" (only an assistant message with tool_calls may have null content)")
        )
    if isinstance(content, str):
        return _check_str(content, "content")
    if isinstance(content, list | tuple):
        allowed = (
            _USER_PART_TYPES
            if role == "user"
            else _ASSISTANT_PART_TYPES
            if role == "assistant"
            else _TEXT_PART_TYPES
        )
        parts = []
        for index, part in enumerate(content):
            where = f"content[{index}]"
            if not isinstance(part, Mapping):
                raise ValueError(f"{where} must be a content part object, not {type(part).__name__}")
            kind = part.get("type")
            if kind not in allowed:
                raise ValueError(
                    f"{where} has type {kind!r}; a {role} message accepts {', '.join(sorted(allowed))}"
                )
            if kind == "text":
                _check_str(part.get("text"), f"{where}.text")
            elif kind == "refusal":
                _check_str(part.get("refusal"), f"{where}.refusal")
            elif kind == "image_url":
                image = part.get("image_url")
                if not isinstance(image, Mapping) or not isinstance(image.get("url"), str):
                    raise ValueError(f'{where} must look like {{"image_url": {{"url": "..."}}}}')
            _check_json(part, where)
            parts.append(dict(part))
        return parts
    raise ValueError(f"content must be a string or a list of content parts, not {type(content).__name__}")


def _check_tool_calls(tool_calls: Any) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list | tuple) or not tool_calls:
        raise ValueError("tool_calls must be a non-empty list")
    out = []
    for index, call in enumerate(tool_calls):
        where = f"tool_calls[{index}]"
        if not isinstance(call, Mapping):
            raise ValueError(f"{where} must be an object")
        _check_field(call.get("id"), f"{where}.id", max_length=None, allow_empty=False)
        function = call.get("function")
        if call.get("type", "function") == "function":
            if not isinstance(function, Mapping):
                raise ValueError(f"{where}.function must be an object with name and arguments")
            _check_str(function.get("name"), f"{where}.function.name", allow_empty=False)
            _check_str(function.get("arguments"), f"{where}.function.arguments")
        _check_json(call, where)
        out.append(dict(call))
    return out


def _validate_message(
    role: Any,
    content: Any,
    *,
    name: Any = None,
    tool_calls: Any = None,
    tool_call_id: Any = None,
    status: Any = "complete",
    pinned: Any = False,
) -> dict[str, Any]:
    """Check one message; return its columns. Raises ValueError, having touched nothing."""
    if not isinstance(pinned, bool):
        raise ValueError("pinned must be True or False")
    if pinned and (role == "tool" or tool_calls is not None):
        # Sent alone, half of a tool-call pair makes the API refuse the request.
        raise ValueError(
            "tool calls and tool results cannot be pinned on their own; "
            "pin the user message or a plain reply instead"
        )
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
    if tool_calls is not None and role != "assistant":
        raise ValueError("only assistant messages may have tool_calls")
    calls = _check_tool_calls(tool_calls) if tool_calls is not None else None
    if role == "tool":
        if tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        _check_field(tool_call_id, "tool_call_id", allow_empty=False)
    elif tool_call_id is not None:
        raise ValueError("only tool messages may have a tool_call_id")
    if name is not None:
        _check_field(name, "name", allow_empty=False)
    # An interrupted streamed reply may have no text yet; it is stored as "".
    checked = _check_content(role, content, has_tool_calls=calls is not None)
    return {
        "role": role,
        "content": checked,
        "name": name,
        "tool_calls": calls,
        "tool_call_id": tool_call_id,
        "status": status,
        "pinned": pinned,
    }


def _json_chars(value: Any) -> int:
    """The characters of every string (keys included) in JSON data."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(len(k) + _json_chars(v) for k, v in value.items() if isinstance(k, str))
    if isinstance(value, list | tuple):
        return sum(_json_chars(item) for item in value)
    return 0


def _check_size(columns: Mapping[str, Any], limit: int) -> None:
    """Refuse a message longer than ``limit`` characters, before it is counted or stored."""
    size = _json_chars(columns.get("content")) + _json_chars(columns.get("tool_calls"))
    if size > limit:
        raise MessageTooLarge(size, limit)


class MessageTooLarge(ValueError):
    """A message is longer than the store's ``max_message_chars``."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"the message is {size:,} characters long; the store accepts at most {limit:,} "
            "(raise it with ConversationStore(max_message_chars=...))"
        )


def _check_reply_fields(response_id: Any, model: Any, finish_reason: Any) -> None:
    if response_id is not None:
        _check_field(response_id, "response_id")
    if model is not None:
        _check_field(model, "model")
    if finish_reason is not None:
        _check_field(finish_reason, "finish_reason", max_length=_FINISH_REASON_MAX)


def _check_conversation_id(conversation_id: Any) -> str:
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        raise ValueError("conversation id must be a non-empty string")
    return conversation_id


def _could_exist(conversation_id: Any, owner: Any, *, any_id: bool = False) -> bool:
    """Check lookup arguments; False when no stored conversation can match them (an id or
    owner with NUL or longer than its column), which callers report as not found."""
    if not any_id:
        _check_conversation_id(conversation_id)
    if owner is not None and not isinstance(owner, str):
        raise ValueError(f"owner must be a string or None, not {type(owner).__name__}")
    return (any_id or _lookup_key(conversation_id, _ID_LENGTH)) and _lookup_key(owner, _SHORT)


def _parse_timestamp(value: Any, what: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as err:
            raise ValueError(f"{what} is not an ISO 8601 timestamp: {value!r}") from err
    else:
        raise ValueError(f"{what} must be an ISO 8601 timestamp string")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    try:
        return parsed.astimezone(dt.timezone.utc)
    except OverflowError as err:
        raise ValueError(f"{what} is out of range: {value!r}") from err


# ---------------------------------------------------------------------------------------------
# The conversation handle


def _token_columns(columns: Mapping[str, Any], model: str) -> dict[str, Any]:
    encoding = _tokens.encoding_name_for_model(model)
    message = {"role": columns["role"], "content": columns.get("content")}
    for key in ("name", "tool_calls", "tool_call_id"):
        if columns.get(key) is not None:
            message[key] = columns[key]
    return {"tokens": _tokens.message_tokens(message, encoding), "tokens_encoding": encoding}


def _validate_message_dict(message: Mapping[str, Any], *, max_message_chars: int) -> dict[str, Any]:
    """:func:`_validate_message` of a message given as a dict (a turn's or an import's), its
    size checked too; its columns. Raises ValueError, having touched nothing."""
    columns = _validate_message(
        message.get("role"),
        message.get("content"),
        name=message.get("name"),
        tool_calls=message.get("tool_calls"),
        tool_call_id=message.get("tool_call_id"),
        status=message.get("status", "complete"),
        pinned=message.get("pinned", False),
    )
    _check_size(columns, max_message_chars)
    return columns
