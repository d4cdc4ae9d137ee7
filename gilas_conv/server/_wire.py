"""The gateway's wire format: stored values as OpenAI objects, and back (pure).

Conversations are OpenAI ``conversation`` objects (``id``, ``object``, ``created_at`` in
Unix seconds, ``metadata``) with three more fields: ``title``, ``model`` and
``updated_at``.

Every stored message is one conversation item, whose id is ``msg_<seq>``:

* system, developer, user and assistant messages are ``message`` items: ``role``, and
  ``content`` as parts (``input_text`` for what the client sent, ``output_text`` for a
  reply, ``refusal``, ``input_image``); ``status`` is ``completed``, or ``incomplete`` for
  a reply cut off mid-stream.
* What an OpenAI message item cannot hold is kept in extra fields on it, in the
  chat-completions format: ``tool_calls`` (an assistant's tool calls), ``name``,
  ``model``, ``finish_reason``, ``usage``, ``response_id``, ``pinned``, ``seq`` and
  ``created_at``.
* A tool result (role ``tool``) is a ``function_call_output`` item: ``call_id`` and
  ``output`` (its text), with ``role: "tool"`` and the original ``content`` beside.

Items given to ``items.create`` (or ``conversations.create``) may be OpenAI input items
(``message`` with string or part content, ``function_call``, ``function_call_output``) or
plain chat-completions messages (``role``, ``content``, ``tool_calls``, ``tool_call_id``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from ..store import Conversation, Message

__all__ = [
    "completion_body",
    "conversation_object",
    "item_id",
    "item_object",
    "messages_from_items",
    "parse_item_id",
    "stream_event",
]

ITEM_PREFIX = "msg_"


def _unix(value: dt.datetime) -> int:
    return int(value.timestamp())


def conversation_object(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "object": "conversation",
        "created_at": _unix(conv.created_at),
        "metadata": conv.metadata or {},
        "title": conv.title,
        "model": conv.model,
        "updated_at": _unix(conv.updated_at),
    }


def item_id(seq: int) -> str:
    return f"{ITEM_PREFIX}{seq}"


def parse_item_id(value: str) -> int | None:
    """The seq an item id names, or None if it names none."""
    if not value.startswith(ITEM_PREFIX):
        return None
    digits = value[len(ITEM_PREFIX) :]
    if not digits.isascii() or not digits.isdigit() or len(digits) > 12:
        return None
    seq = int(digits)
    return seq if seq >= 1 else None


def _parts(content: Any, *, reply: bool) -> list[dict[str, Any]]:
    text_type = "output_text" if reply else "input_text"
    if content is None:
        return []
    if isinstance(content, str):
        part: dict[str, Any] = {"type": text_type, "text": content}
        if reply:
            part["annotations"] = []
        return [part]
    parts: list[dict[str, Any]] = []
    for item in content if isinstance(content, list) else [content]:
        kind = item.get("type") if isinstance(item, Mapping) else None
        if kind == "text":
            parts.append(_parts(item.get("text", ""), reply=reply)[0])
        elif kind == "refusal":
            parts.append({"type": "refusal", "refusal": item.get("refusal", "")})
        elif kind == "image_url":
            image = item.get("image_url") or {}
            url = image.get("url") if isinstance(image, Mapping) else image
            detail = image.get("detail", "auto") if isinstance(image, Mapping) else "auto"
            parts.append({"type": "input_image", "image_url": url, "detail": detail})
        else:  # kept as stored (input_audio, file, ...): nothing is lost
            parts.append(dict(item) if isinstance(item, Mapping) else {"type": "unknown", "value": item})
    return parts


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return ""


def item_object(message: Message) -> dict[str, Any]:
    status = "completed" if message.complete else "incomplete"
    common: dict[str, Any] = {
        "id": item_id(message.seq),
        "status": status,
        "seq": message.seq,
        "created_at": _unix(message.created_at),
    }
    if message.role == "tool":
        return {
            **common,
            "type": "function_call_output",
            "call_id": message.tool_call_id,
            "output": _text(message.content),
            "role": "tool",
            "content": message.content,
        }
    item: dict[str, Any] = {
        **common,
        "type": "message",
        "role": message.role,
        "content": _parts(message.content, reply=message.role == "assistant"),
    }
    for key in ("name", "tool_calls", "model", "finish_reason", "usage", "response_id"):
        value = getattr(message, key)
        if value:
            item[key] = value
    if message.pinned:
        item["pinned"] = True
    return item


def _content_from_parts(content: Any) -> Any:
    """OpenAI input content (a string or parts) as chat-completions content."""
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise ValueError("an item's content must be a string or a list of content parts")
    out: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, Mapping):
            raise ValueError("a content part must be an object")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            out.append({"type": "text", "text": part.get("text")})
        elif kind == "refusal":
            out.append({"type": "refusal", "refusal": part.get("refusal")})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise ValueError("an input_image part needs an image_url (file ids are not supported)")
            out.append({"type": "image_url", "image_url": {"url": url, "detail": part.get("detail", "auto")}})
        elif kind == "image_url":
            out.append(dict(part))
        else:
            raise ValueError(f"content parts of type {kind!r} are not supported")
    if len(out) == 1 and out[0]["type"] == "text":
        return out[0]["text"]
    return out


_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


def messages_from_items(items: Any) -> list[dict[str, Any]]:
    """Chat-completions messages from OpenAI input items (see the module docstring).

    Consecutive ``function_call`` items become one assistant message with those tool
    calls. ValueError names the first item that cannot be read.
    """
    if not isinstance(items, list):
        raise ValueError("items must be a list")
    out: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"items[{index}] is not an object")
        kind = item.get("type", "message")
        try:
            if kind == "message":
                message: dict[str, Any] = {
                    "role": item.get("role"),
                    "content": _content_from_parts(item.get("content")),
                }
                for key in _MESSAGE_KEYS[2:]:
                    if item.get(key) is not None:
                        message[key] = item[key]
                out.append(message)
            elif kind == "function_call":
                call = {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
                }
                previous = out[-1] if out else None
                if previous is not None and previous.get("_calls_only"):
                    previous["tool_calls"].append(call)
                else:
                    out.append(
                        {"role": "assistant", "content": None, "tool_calls": [call], "_calls_only": True}
                    )
            elif kind == "function_call_output":
                output = item.get("output")
                content = output if isinstance(output, str) else _content_from_parts(output)
                out.append({"role": "tool", "content": content, "tool_call_id": item.get("call_id")})
            else:
                raise ValueError(f"items of type {kind!r} are not supported")
        except ValueError as err:
            raise ValueError(f"items[{index}]: {err}") from err
    for message in out:
        message.pop("_calls_only", None)
    return out


def completion_body(message: Message, *, conversation_id: str, requested_model: str) -> dict[str, Any]:
    """The ``chat.completion`` object of a stored reply, as the upstream sent it (what the
    store keeps of it: choices, usage, fingerprint, logprobs, annotations)."""
    extra = message.extra or {}
    content = message.content
    refusal = None
    if isinstance(content, list):
        refusal = "".join(str(p.get("refusal", "")) for p in content if p.get("type") == "refusal") or None
        content = _text(content) or None
    reply: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    if message.tool_calls:
        reply["tool_calls"] = message.tool_calls
    for key in ("annotations", "audio"):
        if key in extra:
            reply[key] = extra[key]
    first: dict[str, Any] = {
        "index": 0,
        "message": reply,
        "logprobs": extra.get("logprobs"),
        "finish_reason": message.finish_reason,
    }
    body: dict[str, Any] = {
        "id": message.response_id or f"chatcmpl-{conversation_id}-{message.seq}",
        "object": "chat.completion",
        "created": _unix(message.created_at),
        "model": message.model or requested_model,
        "choices": [first, *extra.get("choices", [])],
    }
    for key in ("system_fingerprint", "service_tier"):
        if key in extra:
            body[key] = extra[key]
    if message.usage is not None:
        body["usage"] = message.usage
    body["conversation"] = conversation_id
    return body


def stream_event(
    data: str, chunk: Mapping[str, Any], conversation_id: str, *, include_usage: bool
) -> str | None:
    """A streamed chunk as the server-sent event the client gets: the chunk with
    ``"conversation": conversation_id`` added (None: not for this client, a usage chunk it
    did not ask for; without ``include_usage`` no chunk carries ``usage``).

    ``chunk`` is the chunk parsed, ``data`` its JSON text as the upstream sent it (``""``
    if there is none). The text is passed on as it is, the field written in before its
    closing brace, so a chunk is not encoded again; it is encoded again from ``chunk`` when
    that could not give exactly ``{**chunk, "conversation": conversation_id}``: no text,
    a text over several lines, a chunk with its own ``conversation``, or a ``usage`` to drop.
    """
    if not include_usage and "usage" in chunk:
        if not chunk.get("choices") and chunk["usage"] is not None:
            return None  # the sender always asks for usage; this client did not
        chunk = {k: v for k, v in chunk.items() if k != "usage"}
        data = ""
    if data and "conversation" not in chunk and "\n" not in data and "\r" not in data:
        # A JSON object (the sender parsed it) ends with "}", then maybe spaces or tabs.
        head = data.rstrip(" \t")[:-1].rstrip(" \t")
        comma = "" if head.endswith("{") else ","
        return f'data: {head}{comma}"conversation":{json.dumps(conversation_id)}}}\n\n'
    return "data: " + json.dumps({**chunk, "conversation": conversation_id}, ensure_ascii=False) + "\n\n"
