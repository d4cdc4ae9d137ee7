"""Which of a request's messages are new: the gateway's history matching (pure).

A chat-completions request names a conversation and carries ``messages``. Clients send
them in one of three ways, all accepted:

* only what is new (usually one user message, or tool results after a tool call);
* their system prompt first, then only what is new (many clients always prepend it);
* the whole history again, then what is new (stateless clients and chat UIs).

:func:`new_messages` tells which messages are new, comparing the request with the stored
history (roles, content, names, tool calls and tool call ids, in order). Interrupted
(incomplete) stored replies are passed over: a client may have kept the part it saw or
not. Messages that repeat the stored turn still waiting for its answer (a client retrying
a request whose reply never came) are not new either, so a retried request never stores
its message twice. A request that re-sends a history different from the stored one is
refused with :class:`HistoryDiverged`: the gateway cannot tell which history is right, and
the client can fork the conversation at the point where they agree instead.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..store import Message

__all__ = ["HistoryDiverged", "Match", "new_messages", "resends_nothing"]

_INSTRUCTION_ROLES = ("system", "developer")


class HistoryDiverged(ValueError):
    """The request re-sends a history that differs from the stored one.

    ``index`` is the position in the request's messages where they differ, ``seq`` the
    stored message there (None past the stored end), ``agreed_seq`` the last stored
    message both agree on (0: none): forking there keeps the common part.
    """

    def __init__(self, message: str, *, index: int, seq: int | None, agreed_seq: int) -> None:
        super().__init__(message)
        self.index = index
        self.seq = seq
        self.agreed_seq = agreed_seq


@dataclass(frozen=True)
class Match:
    """The outcome: ``new`` are the request's messages to append (in order)."""

    new: list[dict[str, Any]]
    # How the request was read: "new" (only new messages), "instructions" (the stored
    # system/developer prompt, then new ones), "history" (the stored history re-sent).
    mode: str


def _text_parts(content: Any) -> Any:
    """Content in one comparable form: text parts joined, a lone text part as a string."""
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") in ("text", "input_text", "output_text") for p in content
    ):
        return "".join(str(p.get("text", "")) for p in content)
    if content is None:
        return ""
    return content


def _calls(calls: Any) -> Any:
    if not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, Mapping):
            return calls
        function = call.get("function") or {}
        arguments = function.get("arguments") if isinstance(function, Mapping) else None
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        name = function.get("name") if isinstance(function, Mapping) else None
        out.append((call.get("id"), name, json.dumps(arguments, sort_keys=True)))
    return out


def _key(role: Any, content: Any, name: Any, tool_calls: Any, tool_call_id: Any) -> tuple[Any, ...]:
    return (
        role,
        json.dumps(_text_parts(content), sort_keys=True, ensure_ascii=False),
        name or None,
        _calls(tool_calls),
        tool_call_id or None,
    )


def _request_key(message: Mapping[str, Any]) -> tuple[Any, ...]:
    return _key(
        message.get("role"),
        message.get("content"),
        message.get("name"),
        message.get("tool_calls"),
        message.get("tool_call_id"),
    )


def _stored_key(message: Message) -> tuple[Any, ...]:
    return _key(message.role, message.content, message.name, message.tool_calls, message.tool_call_id)


def _leading_instructions(messages: Sequence[Any], role_of: Any) -> int:
    count = 0
    while count < len(messages) and role_of(messages[count]) in _INSTRUCTION_ROLES:
        count += 1
    return count


def _pending_tail(stored: Sequence[Message]) -> list[Message]:
    """The stored messages still waiting for an answer: the user or tool messages after
    the last complete assistant reply (interrupted replies skipped)."""
    tail: list[Message] = []
    for message in reversed(stored):
        if message.role == "assistant":
            if message.complete:
                break
            continue
        if message.role in ("user", "tool"):
            tail.append(message)
        else:
            break
    tail.reverse()
    return tail


def _drop_pending_repeat(new: list[dict[str, Any]], stored: Sequence[Message]) -> list[dict[str, Any]]:
    pending = _pending_tail(stored)
    if (
        pending
        and len(new) >= len(pending)
        and all(_request_key(n) == _stored_key(p) for n, p in zip(new, pending, strict=False))
    ):
        return new[len(pending) :]
    return new


def _align(request: Sequence[Mapping[str, Any]], stored: Sequence[Message]) -> tuple[int, int, int]:
    """Walk both in step: ``(request index, stored index, last agreed seq)`` where they part.

    An incomplete stored reply matches a request message equal to it, or is passed over.
    """
    i = j = 0
    agreed = 0
    while j < len(stored):
        message = stored[j]
        if i < len(request) and _request_key(request[i]) == _stored_key(message):
            i += 1
            j += 1
            agreed = message.seq
            continue
        if message.role == "assistant" and not message.complete:
            j += 1
            continue
        break
    return i, j, agreed


def resends_nothing(request: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the request holds only user and tool messages: then it re-sends no history
    and no instructions, and :func:`new_messages` needs no stored message but the last ones."""
    return all(m.get("role") not in ("assistant", *_INSTRUCTION_ROLES) for m in request)


def new_messages(
    request: Sequence[Mapping[str, Any]],
    stored: Sequence[Message],
    *,
    whole: bool = True,
    tail: Sequence[Message] | None = None,
) -> Match:
    """The request's new messages, given the conversation's stored messages.

    ``stored`` is the stored history from its start, in order; ``whole`` says whether it
    is all of it (False: the caller read only the first messages, enough to compare a
    request of this length, or none when :func:`resends_nothing`). ``tail``: the end of the
    history, back to the last complete reply at least (default: ``stored``), where the turn
    still waiting for its answer is. Raises :class:`HistoryDiverged` when the request
    re-sends a history that differs from the stored one.
    """
    tail = stored if tail is None else tail
    i, j, agreed = _align(request, stored)
    if j == len(stored) and whole:
        # The request begins with the whole stored history (an empty one included).
        return Match(_drop_pending_repeat([dict(m) for m in request[i:]], stored), "history" if i else "new")

    stored_instructions = _leading_instructions(stored, lambda m: m.role)
    request_instructions = _leading_instructions(request, lambda m: m.get("role"))
    rest = [dict(m) for m in request[request_instructions:]]
    resends_history = any(m.get("role") == "assistant" for m in rest)
    if not resends_history:
        if request_instructions == 0:
            return Match(_drop_pending_repeat(rest, tail), "new")
        if request_instructions == stored_instructions and i >= request_instructions:
            return Match(_drop_pending_repeat(rest, tail), "instructions")
        raise HistoryDiverged(
            "the system/developer messages at the start of `messages` differ from the ones stored "
            "in this conversation; send only the new messages, the stored instructions unchanged, "
            "or fork the conversation to change them",
            index=min(i, request_instructions),
            seq=stored[j].seq if j < len(stored) else None,
            agreed_seq=agreed,
        )
    where = f"message {i} of the request"
    stored_seq = stored[j].seq if j < len(stored) else None
    if stored_seq is not None and i < len(request):
        detail = f"{where} differs from stored message {stored_seq}"
    elif stored_seq is not None:
        detail = f"the request ends before stored message {stored_seq}"
    else:
        detail = f"{where} has no stored counterpart"
    raise HistoryDiverged(
        f"`messages` re-sends a history that diverges from the stored conversation ({detail}); "
        "send only the new messages, or fork the conversation where the histories agree "
        f'(POST /v1/conversations with {{"fork_from": ..., "fork_at": {agreed}}}, or '
        f"`gilas-conv fork --at {agreed} ID`) and continue there",
        index=i,
        seq=stored_seq,
        agreed_seq=agreed,
    )
