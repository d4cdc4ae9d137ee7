"""The gateway's streamed chunks on the wire: ``stream_event``, edge cases a stub upstream
does not send (the SDK-level behaviour is in test_gateway.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gilas_conv.server._wire import stream_event

CID = "conv_0123"


def _event(data: str, *, include_usage: bool = True) -> dict[str, Any] | None:
    out = stream_event(data, json.loads(data), CID, include_usage=include_usage)
    if out is None:
        return None
    assert out.startswith("data: ") and out.endswith("\n\n") and "\n" not in out[:-2]
    return json.loads(out[len("data: ") :])


@pytest.mark.parametrize(
    "data",
    [
        '{"id":"c1","choices":[{"index":0,"delta":{"content":"\\u0633\\u0644\\u0627\\u0645"}}]}',
        '{"id": "c1", "choices": [{"index": 0, "delta": {"content": "سلام \\"}\\" {"}}]}  \t',
        "{}",
        "{ }",
        ' {"id":"c1","choices":[]}',
        '{"id":"c1","conversation":"someone else\'s","choices":[]}',  # the gateway's id wins
        '{\n"id":"c1",\n"choices":[]\n}',  # an event of several data lines
    ],
)
def test_a_chunk_is_passed_on_with_the_conversation_added(data: str) -> None:
    assert _event(data) == {**json.loads(data), "conversation": CID}


def test_a_client_that_did_not_ask_for_usage_gets_no_usage() -> None:
    with_usage = '{"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
    assert _event(with_usage, include_usage=False) == {
        "id": "c1",
        "choices": [{"index": 0, "delta": {"content": "hi"}}],
        "conversation": CID,
    }
    usage_only = '{"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'
    assert _event(usage_only, include_usage=False) is None
    assert _event(usage_only)["usage"] == {"prompt_tokens": 3, "completion_tokens": 1}  # type: ignore[index]


def test_a_chunk_without_its_text_is_encoded_from_the_parsed_chunk() -> None:
    out = stream_event("", {"id": "c1", "choices": []}, CID, include_usage=True)
    assert out is not None and json.loads(out[len("data: ") :]) == {
        "id": "c1",
        "choices": [],
        "conversation": CID,
    }
