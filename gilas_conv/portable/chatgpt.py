"""A ChatGPT data export turned into gilas-conv's export format (pure).

ChatGPT's "Export data" sends a ZIP holding ``conversations.json``: a list of
conversations, each a tree of messages (``mapping``: node id → ``{"message", "parent",
"children"}``), because every edited prompt or regenerated reply starts a branch.
``current_node`` is the node the user last saw; the branch imported is the path from it back
to the root, so what is imported is the conversation as it last appeared.

Per message:

* ``author.role`` user, assistant and system map to the same roles. Tool messages (code
  interpreter output, browsing results, image generation) become assistant messages whose
  text starts with a placeholder naming the tool (``[python output]``): ChatGPT's tools are
  not OpenAI function calls, and an assistant message keeps the history sendable.
* Text parts are kept as they are. Everything that is not text is kept as a placeholder
  saying what was there, never dropped silently: ``[image: file-abc, 1024×768]``,
  ``[attached file: report.pdf (application/pdf)]``, ``[code for python]`` followed by the
  code, ``[python output]`` followed by the output, ``[browsing result]``, and
  ``[<content type>]`` for any type this converter does not know.
* Messages ChatGPT marks hidden (``metadata.is_visually_hidden_from_conversation``: the
  empty root system message, custom instructions, model-set context) and messages with
  no content are skipped, each reported with its reason.
* Times (``create_time``, seconds since the epoch) become ISO timestamps; a message without
  one gets its conversation's. The model is the message's ``metadata.model_slug`` or the
  conversation's ``default_model_slug``. A reply ChatGPT reports as interrupted is
  imported as incomplete.

The original ids are kept in ``metadata`` (conversation) and ``extra`` (message).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Converted", "convert", "looks_like_chatgpt"]

# A tree deeper than this is refused rather than walked (a cycle, or a hostile file).
MAX_DEPTH = 100_000


@dataclass
class Converted:
    """Conversations in gilas-conv's export format, the label naming each in errors, and
    what was skipped, as ``(where, reason)`` pairs."""

    conversations: list[dict[str, Any]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def looks_like_chatgpt(data: Any) -> bool:
    """True for a parsed ``conversations.json`` (a list of objects with a ``mapping``) or
    one conversation of it."""
    if isinstance(data, Mapping):
        return isinstance(data.get("mapping"), Mapping)
    return (
        isinstance(data, list)
        and bool(data)
        and all(isinstance(item, Mapping) and isinstance(item.get("mapping"), Mapping) for item in data)
    )


def convert(data: Any) -> Converted:
    """Convert a parsed ``conversations.json``; ValueError naming the conversation at fault."""
    items = [data] if isinstance(data, Mapping) else data
    if not isinstance(items, list):
        raise ValueError("a ChatGPT export is a JSON list of conversations")
    out = Converted()
    for index, item in enumerate(items, start=1):
        label = f"conversation {index}"
        if isinstance(item, Mapping) and isinstance(item.get("title"), str):
            label += f" ({item['title'][:60]!r})"
        try:
            conversation = _conversation(item, label, out.skipped)
        except (ValueError, TypeError, KeyError, OverflowError) as err:
            raise ValueError(f"{label}: {err}") from None
        if conversation["messages"]:
            out.conversations.append(conversation)
            out.labels.append(label)
        else:
            out.skipped.append((label, "no visible messages"))
    return out


def _time(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be seconds since the epoch, not {value!r}")
    try:
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"{what} is out of range: {value!r}") from None


def _branch(mapping: Mapping[str, Any], current: Any) -> list[Mapping[str, Any]]:
    """The nodes from the root to ``current``."""
    if not isinstance(current, str) or current not in mapping:
        raise ValueError(f"current_node {current!r} is not in the mapping")
    path: list[Mapping[str, Any]] = []
    seen = set()
    node_id: Any = current
    while node_id is not None:
        if node_id in seen or len(path) > MAX_DEPTH:
            raise ValueError(f"the mapping has a cycle at node {node_id!r}")
        seen.add(node_id)
        node = mapping.get(node_id)
        if not isinstance(node, Mapping):
            raise ValueError(f"node {node_id!r} is missing from the mapping")
        path.append(node)
        node_id = node.get("parent")
    path.reverse()
    return path


def _conversation(item: Any, label: str, skipped: list[tuple[str, str]]) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValueError("each conversation must be an object")
    mapping = item.get("mapping")
    if not isinstance(mapping, Mapping):
        raise ValueError('missing "mapping"')
    current = item.get("current_node")
    if current is None:  # very old exports: the newest leaf
        leaves = [k for k, v in mapping.items() if isinstance(v, Mapping) and not v.get("children")]
        current = leaves[-1] if leaves else None
    created = _time(item.get("create_time"), "create_time")
    default_model = item.get("default_model_slug")
    messages = []
    for node in _branch(mapping, current):
        message = node.get("message")
        if message is None:
            continue
        if not isinstance(message, Mapping):
            raise ValueError(f"node {node.get('id')!r}: message must be an object")
        where = f"{label}, message {message.get('id', node.get('id'))}"
        converted, reason = _message(message, created, where)
        if converted is None:
            skipped.append((where, reason))
        else:
            messages.append(converted)
    model = default_model or next((m["model"] for m in messages if m.get("model")), None)
    metadata: dict[str, Any] = {"source": "chatgpt"}
    original_id = item.get("conversation_id") or item.get("id")
    if isinstance(original_id, str):
        metadata["chatgpt_id"] = original_id
    out: dict[str, Any] = {"title": item.get("title"), "metadata": metadata, "messages": messages}
    if isinstance(model, str) and model:
        out["model"] = model
    if created is not None:
        out["created_at"] = created
    return out


def _message(
    message: Mapping[str, Any], default_time: str | None, where: str
) -> tuple[dict[str, Any] | None, str]:
    author = message.get("author") or {}
    role = author.get("role")
    metadata = message.get("metadata") or {}
    if metadata.get("is_visually_hidden_from_conversation"):
        return None, f"hidden in ChatGPT ({role} message)"
    content = message.get("content") or {}
    if not isinstance(content, Mapping):
        raise ValueError(f"{where}: content must be an object")
    text = _content_text(content, message.get("recipient"), author.get("name"))
    attachments = metadata.get("attachments") or []
    if isinstance(attachments, list):
        for attachment in attachments:
            if isinstance(attachment, Mapping):
                name = attachment.get("name") or attachment.get("id") or "file"
                kind = attachment.get("mime_type")
                text += f"\n[attached file: {name}{f' ({kind})' if kind else ''}]"
    text = text.strip("\n")
    if not text.strip():
        return None, f"no content ({role} message, {content.get('content_type')})"
    if role == "tool":
        header = f"[{author.get('name') or 'tool'} output]"
        if not text.startswith(header):
            text = f"{header}\n{text}"
        role = "assistant"
    elif role not in ("user", "assistant", "system"):
        return None, f"unknown author role {role!r}"
    out: dict[str, Any] = {"role": role, "content": text}
    created = _time(message.get("create_time"), "create_time") or default_time
    if created is not None:
        out["created_at"] = created
    if role == "assistant":
        if isinstance(metadata.get("model_slug"), str):
            out["model"] = metadata["model_slug"]
        finish = metadata.get("finish_details") or {}
        if message.get("status") == "in_progress" or (
            isinstance(finish, Mapping) and finish.get("type") == "interrupted"
        ):
            out["status"] = "incomplete"
    if isinstance(message.get("id"), str):
        out["extra"] = {"chatgpt_id": message["id"]}
    return out, ""


def _content_text(content: Mapping[str, Any], recipient: Any, author_name: Any) -> str:
    kind = content.get("content_type")
    if kind in ("text", "multimodal_text"):
        return "".join(_part_text(part) for part in content.get("parts") or [])
    if kind == "code":
        target = recipient if isinstance(recipient, str) and recipient != "all" else "a tool"
        language = content.get("language") or ""
        if language == "unknown":
            language = ""
        return f"[code for {target}]\n```{language}\n{content.get('text', '')}\n```"
    if kind == "execution_output":
        return f"[{author_name or 'code interpreter'} output]\n```\n{content.get('text', '')}\n```"
    if kind == "tether_browsing_display":
        return f"[browsing result]\n{content.get('result', '')}"
    if kind == "tether_quote":
        source = content.get("title") or content.get("url") or "a page"
        return f"[quote from {source}]\n{content.get('text', '')}"
    if kind == "system_error":
        return f"[error: {content.get('name', 'system error')}] {content.get('text', '')}"
    if kind == "thoughts":
        summaries = [t.get("summary", "") for t in content.get("thoughts") or [] if isinstance(t, Mapping)]
        return "[reasoning]\n" + "\n".join(s for s in summaries if s)
    if kind == "reasoning_recap":
        return f"[reasoning: {content.get('content', '')}]"
    if kind == "user_editable_context":
        return "[custom instructions]\n" + "\n".join(
            str(content[key]) for key in ("user_profile", "user_instructions") if content.get(key)
        )
    return f"[{kind or 'unknown'} content not imported]"


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, Mapping):
        return f"[{type(part).__name__} part]"
    kind = part.get("content_type") or "unknown"
    if kind == "image_asset_pointer":
        pointer = (
            str(part.get("asset_pointer") or "").removeprefix("file-service://").removeprefix("sediment://")
        )
        size = f", {part['width']}×{part['height']}" if part.get("width") and part.get("height") else ""
        return f"\n[image: {pointer or 'no file'}{size}]\n"
    if kind == "audio_transcription":
        return f"\n[audio transcription] {part.get('text', '')}\n"
    if kind in ("audio_asset_pointer", "real_time_user_audio_video_asset_pointer"):
        return "\n[audio]\n"
    return f"\n[{kind}: {json.dumps(part, ensure_ascii=False)[:200]}]\n"
