"""Importing conversations: gilas-conv's export format (or a plain messages list) checked
and turned into rows, before the one transaction that writes them."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from .._config import DEFAULT_MODEL
from ._validate import (
    _check_field,
    _check_int,
    _check_json,
    _check_reply_fields,
    _parse_timestamp,
    _token_columns,
    _validate_message_dict,
)
from ._values import now as _now


def _prepare_import(
    data: Any, model: str | None, *, max_message_chars: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate one conversation to import: its ``conversations`` row and its message rows."""
    if isinstance(data, Mapping):
        if not isinstance(data.get("messages"), list):
            raise ValueError('expected an object with a "messages" list')
        raw_messages = data["messages"]
        header: Mapping[str, Any] = data
    elif isinstance(data, list):
        raw_messages, header = data, {}
    else:
        raise ValueError("expected an exported conversation object or a list of messages")
    model = model or header.get("model") or DEFAULT_MODEL
    _check_field(model, "model", allow_empty=False)
    title = header.get("title")
    if title is not None:
        _check_field(title, "title", max_length=None)
    metadata = header.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError("metadata must be an object")
    _check_json(metadata, "metadata")
    now = _now()
    created_at = _parse_timestamp(header["created_at"], "created_at") if "created_at" in header else now
    rows = []
    for index, raw in enumerate(raw_messages):
        try:
            rows.append(_import_message(raw, model, now, max_message_chars=max_message_chars))
        except ValueError as err:
            raise ValueError(f"message {index + 1}: {err}") from err
    total = 0
    for seq, row in enumerate(rows, start=1):
        row["seq"] = seq
        total += row["tokens"] or 0
        row["tokens_total"] = total
        created_at = min(created_at, row["created_at"])
    conversation = {
        "id": str(uuid.uuid4()),
        "title": title,
        "model": model,
        "metadata": dict(metadata) if metadata is not None else None,
        "last_seq": len(rows),
        "tokens_total": total,
        "created_at": created_at,
        "updated_at": max([now, *(r["created_at"] for r in rows)]),
    }
    return conversation, rows


def _import_message(raw: Any, model: str, now: dt.datetime, *, max_message_chars: int) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError("each message must be an object")
    known = {
        "role", "content", "name", "tool_calls", "tool_call_id", "created_at", "status", "pinned",
        "response_id", "model", "finish_reason", "usage", "predicted_prompt_tokens", "reply_to", "extra",
        "refusal", "seq", "tokens", "tokens_encoding",
    }  # fmt: skip
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    if "content" not in raw and not raw.get("tool_calls"):
        raise ValueError('missing "content"')
    columns = _validate_message_dict(raw, max_message_chars=max_message_chars)
    _check_reply_fields(raw.get("response_id"), raw.get("model"), raw.get("finish_reason"))
    for key in ("response_id", "model", "finish_reason"):
        columns[key] = raw.get(key)
    for key in ("predicted_prompt_tokens", "reply_to"):
        columns[key] = _check_int(raw.get(key), key)
    usage = raw.get("usage")
    if usage is not None and not isinstance(usage, Mapping):
        raise ValueError("usage must be an object")
    columns["usage"] = _check_json(usage, "usage")
    columns["extra"] = _check_json(raw.get("extra"), "extra")
    columns["created_at"] = (
        _parse_timestamp(raw["created_at"], "created_at") if raw.get("created_at") is not None else now
    )
    columns.update(_token_columns(columns, model))
    return columns
