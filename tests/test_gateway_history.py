"""Which messages of a chat-completions request are new: the gateway's pure matching."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from gilas_conv.server._history import HistoryDiverged, new_messages
from gilas_conv.store import Message

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def stored(*messages: tuple[str, Any] | tuple[str, Any, str]) -> list[Message]:
    out = []
    for seq, entry in enumerate(messages, start=1):
        role, content, *status = entry
        out.append(
            Message(
                conversation_id="c",
                seq=seq,
                role=role,
                content=content,
                created_at=NOW,
                status=status[0] if status else "complete",
            )
        )
    return out


def m(role: str, content: Any, **more: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **more}


HISTORY = stored(("system", "S"), ("user", "one"), ("assistant", "echo one"))


def test_only_new_messages() -> None:
    match = new_messages([m("user", "two")], HISTORY)
    assert match.new == [m("user", "two")] and match.mode == "new"


def test_the_stored_system_prompt_then_new_messages() -> None:
    match = new_messages([m("system", "S"), m("user", "two")], HISTORY)
    assert match.new == [m("user", "two")] and match.mode == "instructions"


def test_the_whole_history_again_then_new_messages() -> None:
    request = [m("system", "S"), m("user", "one"), m("assistant", "echo one"), m("user", "two")]
    match = new_messages(request, HISTORY)
    assert match.new == [m("user", "two")] and match.mode == "history"


def test_text_parts_equal_the_same_text() -> None:
    request = [
        m("system", [{"type": "text", "text": "S"}]),
        m("user", "one"),
        m("assistant", [{"type": "text", "text": "echo one"}]),
        m("user", "two"),
    ]
    assert new_messages(request, HISTORY).new == [m("user", "two")]


def test_an_empty_conversation_takes_everything() -> None:
    request = [m("system", "S"), m("user", "hi")]
    assert new_messages(request, []).new == request


def test_interrupted_replies_are_passed_over_whether_resent_or_not() -> None:
    history = stored(
        ("user", "one"), ("assistant", "ech", "incomplete"), ("user", "again"), ("assistant", "ok")
    )
    without = [m("user", "one"), m("user", "again"), m("assistant", "ok"), m("user", "three")]
    with_it = [
        m("user", "one"),
        m("assistant", "ech"),
        m("user", "again"),
        m("assistant", "ok"),
        m("user", "3"),
    ]
    assert new_messages(without, history).new == [m("user", "three")]
    assert new_messages(with_it, history).new == [m("user", "3")]


def test_a_retried_request_does_not_repeat_the_unanswered_message() -> None:
    history = stored(("system", "S"), ("user", "one"), ("assistant", "echo one"), ("user", "two"))
    assert new_messages([m("user", "two")], history).new == []
    assert new_messages([m("user", "two"), m("user", "more")], history).new == [m("user", "more")]
    resent = [m("system", "S"), m("user", "one"), m("assistant", "echo one"), m("user", "two")]
    assert new_messages(resent, history).new == []


def test_tool_results_after_a_stored_tool_call() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    history = [
        *stored(("user", "q")),
        Message(
            conversation_id="c", seq=2, role="assistant", content=None, created_at=NOW, tool_calls=[call]
        ),
    ]
    result = m("tool", "42", tool_call_id="call_1")
    assert new_messages([result], history).new == [result]
    same_call = {**call, "function": {"name": "f", "arguments": '{"a":1}'}}  # same JSON, other spacing
    resent = [m("user", "q"), m("assistant", None, tool_calls=[same_call]), result]
    assert new_messages(resent, history).new == [result]


def test_a_diverged_history_is_refused_saying_where_and_how_to_fork() -> None:
    request = [m("system", "S"), m("user", "one"), m("assistant", "other"), m("user", "two")]
    with pytest.raises(HistoryDiverged) as caught:
        new_messages(request, HISTORY)
    assert caught.value.index == 2 and caught.value.seq == 3 and caught.value.agreed_seq == 2
    assert "fork" in str(caught.value)


def test_a_different_system_prompt_is_refused() -> None:
    with pytest.raises(HistoryDiverged):
        new_messages([m("system", "other"), m("user", "two")], HISTORY)


def test_a_request_shorter_than_the_stored_history_that_resends_it_is_refused() -> None:
    with pytest.raises(HistoryDiverged):
        new_messages([m("user", "one"), m("assistant", "echo one")], [*HISTORY, *stored(("user", "x"))])
