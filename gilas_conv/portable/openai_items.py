"""OpenAI conversation items turned into gilas-conv's export format (pure).

The input is what ``client.conversations.items.list(conversation_id)`` returns, as JSON:
``{"object": "list", "data": [...]}`` or the bare list of items. Items carry no timestamps,
so they are imported in the order given: list them with ``order="asc"`` (the API's default
is newest first).

* ``message`` items keep their role (user, assistant, system, developer); ``input_text``
  and ``output_text`` parts become the text, refusals are kept, and images and files
  become placeholders (``[image: file-abc]``, ``[file: report.pdf]``).
* ``function_call`` items become an assistant message with ``tool_calls`` (consecutive
  calls, made in parallel, share one message); ``function_call_output`` items become
  tool messages answering them.
* Other items (``reasoning``, ``web_search_call``, ``code_interpreter_call``, ...) become
  assistant placeholders saying what happened, or are skipped with a reason when they
  hold nothing to show (reasoning without a summary).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .chatgpt import Converted

__all__ = ["convert", "looks_like_items"]

ITEM_TYPES = frozenset(
    {
        "message", "function_call", "function_call_output", "reasoning", "web_search_call",
        "file_search_call", "code_interpreter_call", "image_generation_call", "computer_call",
        "computer_call_output", "local_shell_call", "local_shell_call_output", "mcp_call",
        "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "custom_tool_call",
        "custom_tool_call_output", "item_reference",
    }
)  # fmt: skip


def _items(data: Any) -> list[Any] | None:
    if isinstance(data, Mapping) and data.get("object") == "list" and isinstance(data.get("data"), list):
        return list(data["data"])
    if isinstance(data, list):
        return data
    return None


def looks_like_items(data: Any) -> bool:
    """True for an items list: every element an object whose ``type`` is an item type."""
    items = _items(data)
    return bool(items) and all(isinstance(i, Mapping) and i.get("type") in ITEM_TYPES for i in items or [])


def convert(data: Any, *, label: str = "the file") -> Converted:
    """Convert one conversation's items; ValueError naming the item at fault."""
    items = _items(data)
    if items is None:
        raise ValueError('expected {"object": "list", "data": [...]} or a list of conversation items')
    out = Converted()
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items, start=1):
        where = f"{label}, item {index}"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: each item must be an object")
        try:
            _item(item, messages, out.skipped, where)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None
    if not messages:
        out.skipped.append((label, "no messages"))
        return out
    title = next((_first_line(m["content"]) for m in messages if m["role"] == "user"), None)
    out.conversations.append({"title": title, "metadata": {"source": "openai-items"}, "messages": messages})
    out.labels.append(label)
    return out


def _first_line(content: Any) -> str | None:
    if not isinstance(content, str):
        return None
    for line in content.splitlines():
        words = " ".join(line.split())
        if words:
            return words[:59] + "…" if len(words) > 60 else words
    return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_part(p) for p in value)
    return json.dumps(value, ensure_ascii=False)


def _part(part: Any) -> str:
    if not isinstance(part, Mapping):
        raise ValueError(f"a content part must be an object, not {type(part).__name__}")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
        return str(part.get("text", ""))
    if kind == "refusal":
        return str(part.get("refusal", ""))
    if kind == "input_image":
        source = part.get("file_id") or part.get("image_url") or "inline"
        if isinstance(source, str) and source.startswith("data:"):
            source = "inline data"
        return f"[image: {source}]"
    if kind == "input_file":
        return f"[file: {part.get('filename') or part.get('file_id') or 'unnamed'}]"
    if kind == "input_audio":
        return "[audio]"
    return f"[{kind} part]"


def _item(
    item: Mapping[str, Any], messages: list[dict[str, Any]], skipped: list[tuple[str, str]], where: str
) -> None:
    kind = item.get("type")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ValueError(f"unknown message role {role!r}")
        message: dict[str, Any] = {"role": role, "content": _text(item.get("content", ""))}
        if role == "assistant" and item.get("status") == "incomplete":
            message["status"] = "incomplete"
        if isinstance(item.get("id"), str):
            message["extra"] = {"openai_item_id": item["id"]}
        messages.append(message)
    elif kind == "function_call":
        call = {
            "id": item.get("call_id") or item.get("id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
        }
        previous = messages[-1] if messages else None
        if (
            previous is not None
            and previous["role"] == "assistant"
            and previous.get("tool_calls")
            and previous["content"] is None
        ):
            previous["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind in ("function_call_output", "custom_tool_call_output"):
        messages.append(
            {"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output", ""))}
        )
    elif kind == "reasoning":
        summary = "\n".join(_part(p) for p in item.get("summary") or [])
        if summary.strip():
            messages.append({"role": "assistant", "content": f"[reasoning]\n{summary}"})
        else:
            skipped.append((where, "reasoning item without a summary"))
    elif kind == "web_search_call":
        action = item.get("action") or {}
        query = action.get("query") if isinstance(action, Mapping) else None
        messages.append({"role": "assistant", "content": f"[web search{f': {query}' if query else ''}]"})
    elif kind == "code_interpreter_call":
        text = f"[code interpreter]\n```python\n{item.get('code') or ''}\n```"
        for output in item.get("outputs") or []:
            if isinstance(output, Mapping) and output.get("type") == "logs":
                text += f"\n[code interpreter output]\n```\n{output.get('logs', '')}\n```"
            elif isinstance(output, Mapping):
                text += f"\n[code interpreter {output.get('type', 'output')}]"
        messages.append({"role": "assistant", "content": text})
    elif kind in ITEM_TYPES:
        messages.append({"role": "assistant", "content": f"[{kind}]"})
    else:
        raise ValueError(f"unknown item type {kind!r}")
