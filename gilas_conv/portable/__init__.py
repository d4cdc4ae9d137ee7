"""Portable history: conversations read from the formats people already have, and written
as documents (pure: bytes in, export-format data out; the store does the writing).

Readers turn a file into gilas-conv's export format, so every import goes through
``ConversationStore.import_conversations``: validated whole before one transaction, all or
nothing per file.

* ``gilas``: gilas-conv's own export (one conversation, a JSON array, or JSON Lines from
  ``export --all``) or a plain OpenAI messages array.
* ``chatgpt``: a ChatGPT data export, ``conversations.json`` or the ZIP that holds it
  (:mod:`.chatgpt`).
* ``openai-items``: OpenAI conversation items (:mod:`.openai_items`).

Writers: :func:`.markdown.to_markdown`.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

from . import chatgpt, openai_items
from .chatgpt import Converted
from .gilas import parse_import
from .markdown import to_markdown

__all__ = ["FORMATS", "Converted", "load", "parse_import", "to_markdown"]

FORMATS = ("auto", "gilas", "chatgpt", "openai-items")

_NAMES = {"chatgpt": "ChatGPT export", "openai-items": "list of OpenAI conversation items"}

# The member of ChatGPT's export ZIP that holds the conversations.
CHATGPT_MEMBER = "conversations.json"
# A conversations.json larger than this inside a ZIP is refused (a ZIP bomb guard).
MAX_ZIP_MEMBER_BYTES = 2 * 1024**3


def _from_zip(raw: bytes) -> bytes:
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile as err:
        raise ValueError(f"the file looks like a ZIP but cannot be read: {err}") from None
    with archive:
        members = [i for i in archive.infolist() if i.filename.rsplit("/", 1)[-1] == CHATGPT_MEMBER]
        if not members:
            raise ValueError(f"the ZIP has no {CHATGPT_MEMBER} (is it a ChatGPT data export?)")
        if members[0].file_size > MAX_ZIP_MEMBER_BYTES:
            raise ValueError(f"{CHATGPT_MEMBER} in the ZIP is too large ({members[0].file_size} bytes)")
        return archive.read(members[0])


def load(raw: bytes, *, format: str = "auto") -> tuple[str, Converted]:
    """The conversations in a file's bytes, and the format they were read as.

    ``format="auto"`` recognizes a ChatGPT export (a ZIP, or JSON whose conversations have a
    ``mapping``) and OpenAI conversation items by their content; anything else is read as
    gilas-conv's format. ValueError names the line, conversation or item at fault.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown import format {format!r}; one of {', '.join(FORMATS)}")
    if raw.startswith(b"PK\x03\x04"):
        if format not in ("auto", "chatgpt"):
            raise ValueError(f"a ZIP file can only be a ChatGPT export, not {format}")
        raw, format = _from_zip(raw), "chatgpt"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"the file is not UTF-8 text (byte {err.start})") from None
    data: Any = None
    if format != "gilas":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if format != "auto":
                raise ValueError(f"line {err.lineno}, column {err.colno}: {err.msg}") from None
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None
    detected = (
        "chatgpt"
        if chatgpt.looks_like_chatgpt(data)
        else "openai-items"
        if openai_items.looks_like_items(data)
        else None
    )
    if format not in ("auto", "gilas") and detected not in (None, format):
        raise ValueError(f"the file looks like a {_NAMES[detected]}, not {_NAMES[format]}")
    if format == "chatgpt" or (format == "auto" and detected == "chatgpt"):
        return "chatgpt", chatgpt.convert(data)
    if format == "openai-items" or (format == "auto" and detected == "openai-items"):
        return "openai-items", openai_items.convert(data)
    items = parse_import(text)
    return "gilas", Converted(
        conversations=[item.data for item in items], labels=[item.where for item in items]
    )
