"""The values the store hands out: :class:`Message` and :class:`Summary`, and the message
dict the chat-completions API takes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

__all__ = ["Message", "Summary", "now", "openai_message"]


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# Keys gilas-conv lets callers add to an image part for token estimates only (the pixel size
# of an image the API would otherwise have to fetch); stored, but never sent.
_IMAGE_HINT_KEYS = ("width", "height")


def openai_message(
    role: str,
    content: Any,
    name: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    tool_call_id: str | None = None,
) -> dict[str, Any]:
    """A message dict exactly as the chat-completions API accepts it."""
    if isinstance(content, list):
        content = [_api_part(part) for part in content]
    out: dict[str, Any] = {"role": role, "content": content}
    if name is not None:
        out["name"] = name
    if tool_calls:
        out["tool_calls"] = tool_calls
    if tool_call_id is not None:
        out["tool_call_id"] = tool_call_id
    return out


def _api_part(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url") if part.get("type") == "image_url" else None
    if isinstance(image, dict) and any(key in image for key in _IMAGE_HINT_KEYS):
        image = {k: v for k, v in image.items() if k not in _IMAGE_HINT_KEYS}
        return {**part, "image_url": image}
    return part


# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class Message:
    """One stored message. ``seq`` counts from 1 within its conversation."""

    conversation_id: str
    seq: int
    role: str
    content: Any
    created_at: dt.datetime
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    pinned: bool = False
    status: str = "complete"
    tokens: int | None = None
    tokens_encoding: str | None = None
    response_id: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    predicted_prompt_tokens: int | None = None
    reply_to: int | None = None
    extra: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def to_openai(self) -> dict[str, Any]:
        """The message as the chat-completions API expects it in ``messages``."""
        return openai_message(self.role, self.content, self.name, self.tool_calls, self.tool_call_id)

    def to_export(self) -> dict[str, Any]:
        """The message in gilas-conv's export format (see :meth:`Conversation.export`)."""
        out = self.to_openai()
        out["created_at"] = self.created_at.isoformat()
        out["status"] = self.status
        for key in ("pinned", "response_id", "model", "finish_reason", "usage"):
            value = getattr(self, key)
            if value:
                out[key] = value
        for key in ("predicted_prompt_tokens", "reply_to", "extra"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class Summary:
    """A stored summary standing in for messages ``from_seq``..``to_seq`` (inclusive)."""

    conversation_id: str
    from_seq: int
    to_seq: int
    content: str
    created_at: dt.datetime
    model: str | None = None
    tokens: int | None = None
    tokens_encoding: str | None = None
    usage: dict[str, Any] | None = None
