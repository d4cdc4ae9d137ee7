"""Which turn ``retry`` answers, and what a stream's named error event may show.

Each test pins a branch that once survived a mutation of the code (issue 8, item 14): the
loop that passes over interrupted replies, the widening of the tail ``retry`` reads first,
and the redaction of the API key in an ``event: error`` frame.
"""

from __future__ import annotations

import json

import pytest
from _sender_fixtures import API_KEY, Driver, FakeAPI, completion, stream_response

from gilas_conv import APIError, ConversationStore

pytest_plugins = ["_sender_fixtures"]

Store = ConversationStore


def test_retry_passes_over_two_interrupted_replies_in_a_row(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    question = conv.append("user", "What is the capital of Iran?")
    conv.append("assistant", "The cap", status="incomplete", reply_to=question.seq)
    conv.append("assistant", "Teh", status="incomplete", reply_to=question.seq)
    api.script(completion("Tehran."))

    reply = driver.retry(conv.id)

    assert reply.reply_to == question.seq
    assert reply.content == "Tehran." and reply.complete
    # The interrupted replies are not replayed: the request carries the question alone.
    assert api.bodies[0]["messages"] == [{"role": "user", "content": "What is the capital of Iran?"}]


def test_retry_finds_a_pending_turn_longer_than_the_tail_it_reads_first(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    conv.append("user", "an earlier question")
    conv.append("assistant", "an earlier answer")
    question = conv.append("user", "Look up the weather in 70 cities.")
    calls = [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "weather", "arguments": json.dumps({"i": i})},
        }
        for i in range(70)
    ]
    conv.append("assistant", None, tool_calls=calls)  # no reply_to: found by walking back
    for call in calls:
        conv.append("tool", "21 C", tool_call_id=call["id"])
    api.script(completion("All sunny."))

    reply = driver.retry(conv.id)

    assert reply.reply_to == question.seq
    sent = api.bodies[0]["messages"]
    assert len(sent) == 2 + 1 + 1 + 70  # the whole history fits: both turns, every result
    assert sent[2] == {"role": "user", "content": "Look up the weather in 70 cities."}


def test_an_error_event_that_echoes_the_key_is_redacted(
    driver: Driver, api: FakeAPI, sqlite_store: Store
) -> None:
    conv = sqlite_store.create()
    frame = json.dumps({"error": {"message": f"invalid key {API_KEY}", "type": "auth"}})
    api.script(stream_response(f"event: error\ndata: {frame}\n\n".encode()))

    with pytest.raises(APIError) as caught:
        driver.stream(conv.id, "hi")

    assert "invalid key" in str(caught.value)
    assert API_KEY not in str(caught.value)
    assert API_KEY not in repr(caught.value.args)
