"""A conversation, in gilas-conv's export format, as a Markdown document (pure).

The document reads top to bottom like the conversation: a title, the model and dates, then
one section per message headed by its role and time. Message text is written as it was
stored (models answer in Markdown already); Persian and other right-to-left text is left
exactly as it is, so a viewer lays it out by its own bidi rules. Tool calls are one line
each (the function and its arguments, shortened), tool results a fenced block, images and
files a line saying what was there.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from .._content import PartText, content_text, image_url

__all__ = ["to_markdown"]

# Tool-call arguments longer than this are cut in the document (the JSON export keeps them).
MAX_ARGUMENTS_CHARS = 200

_ROLE_NAMES = {
    "system": "System",
    "developer": "Developer",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


def _when(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    return parsed.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks inside the text."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _image(part: Mapping[str, Any]) -> str:
    url = image_url(part)
    return "*[image: inline data]*" if url.startswith("data:") else f"![image]({url})"


def _file(part: Mapping[str, Any]) -> str:
    file = part.get("file") or {}
    return f"*[file: {file.get('filename') or file.get('file_id') or 'file'}]*"


_PARTS: dict[str, PartText] = {
    "text": lambda part: str(part.get("text", "")),
    "refusal": lambda part: f"*Refused:* {part.get('refusal', '')}",
    "image_url": _image,
    "input_audio": lambda _part: "*[audio]*",
    "file": _file,
}


def _content(content: Any) -> str:
    return content_text(content, _PARTS, other=lambda kind: f"*[{kind}]*", sep="\n\n")


def _tool_call(call: Any) -> str:
    function = call.get("function") or {} if isinstance(call, Mapping) else {}
    arguments = str(function.get("arguments", ""))
    if len(arguments) > MAX_ARGUMENTS_CHARS:
        arguments = arguments[: MAX_ARGUMENTS_CHARS - 1] + "…"
    call_id = call.get("id", "") if isinstance(call, Mapping) else ""
    return f"- **Tool call** `{function.get('name', '?')}` `{arguments}` (id `{call_id}`)"


def to_markdown(conversation: Mapping[str, Any]) -> str:
    """The Markdown document for one exported conversation (:meth:`Conversation.export`)."""
    lines = [f"# {conversation.get('title') or 'Untitled conversation'}", ""]
    facts = [("Model", conversation.get("model")), ("Conversation", f"`{conversation.get('id')}`")]
    facts.append(("Started", _when(conversation.get("created_at"))))
    facts.append(("Last active", _when(conversation.get("updated_at"))))
    if conversation.get("forked_from"):
        facts.append(
            ("Forked from", f"`{conversation['forked_from']}` at message {conversation.get('forked_at')}")
        )
    lines += [f"- **{name}:** {value}" for name, value in facts if value]
    lines.append("")
    for seq, message in enumerate(conversation.get("messages") or [], start=1):
        role = message.get("role", "?")
        heading = [_ROLE_NAMES.get(role, role)]
        if message.get("name"):
            heading.append(str(message["name"]))
        when = _when(message.get("created_at"))
        if when:
            heading.append(when)
        if role == "assistant" and message.get("model") and message.get("model") != conversation.get("model"):
            heading.append(str(message["model"]))
        if message.get("status") == "incomplete":
            heading.append("*incomplete*")
        lines += ["---", "", f"### {seq}. " + " · ".join(heading), ""]
        body = _content(message.get("content"))
        if role == "tool":
            fence = _fence(body)
            lines += [f"Result of `{message.get('tool_call_id', '')}`:", "", fence, body, fence]
        elif body:
            lines.append(body)
        if message.get("tool_calls"):
            if body:
                lines.append("")
            lines += [_tool_call(call) for call in message["tool_calls"]]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
