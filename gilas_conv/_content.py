"""A message's content as text for people: the walk over content parts that the terminal
(:mod:`gilas_conv.cli`) and the Markdown export (:mod:`gilas_conv.portable.markdown`) share,
each with its own way of showing a part."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["PartText", "content_text", "image_url"]

#: Shows one content part (a dict) as text.
PartText = Callable[[Mapping[str, Any]], str]


def content_text(
    content: Any, shown: Mapping[str, PartText], *, other: Callable[[str], str], sep: str
) -> str:
    """``content`` as text: None as ``""``, a string as it is, a list of content parts each
    shown by the function ``shown`` has for its ``type`` (``other(type)`` for any other
    type), joined by ``sep``. A part that is not a dict, or content of any other kind, shows
    nothing (the store never holds either)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, Mapping):
            kind = part.get("type")
            show = shown.get(kind) if isinstance(kind, str) else None
            pieces.append(show(part) if show is not None else other(str(kind)))
    return sep.join(pieces)


def image_url(part: Mapping[str, Any]) -> str:
    """The URL of an ``image_url`` part (``""`` if it has none)."""
    return str((part.get("image_url") or {}).get("url", ""))
