"""The wire format as pure functions: request bodies, stream assembly, answers and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from _sender_fixtures import SCHEMA_PATH, assert_valid, chunk, completion

from gilas_conv import _api
from gilas_conv.exceptions import APIError, APIResponseValidationError, APIStatusError, RateLimitError
from gilas_conv.tokens import ModelRegistry

MESSAGES = [{"role": "user", "content": "hi"}]
# A key with characters JSON and URLs escape: a slash, a plus, a space-free tail.
KEY = "sk-proj/ab+CD_ef-0123456789/xyz"


def _u_escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


# ---------------------------------------------------------------------------------------------
# 8.12: the schema is vendored


def test_the_openai_schema_is_vendored_with_the_tests() -> None:
    tests_dir = Path(__file__).resolve().parent
    assert SCHEMA_PATH.is_relative_to(tests_dir) and SCHEMA_PATH.is_file()
    assert "openai-openapi" in json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))["$comment"]
    assert (SCHEMA_PATH.parent / "README.md").is_file()


# ---------------------------------------------------------------------------------------------
# 8.6: the reply limit goes under the name the model accepts


@pytest.mark.parametrize("model", ["gpt-5", "gpt-5-mini-2025-08-07", "o3", "o1-mini", "o4-mini"])
def test_max_tokens_becomes_max_completion_tokens_for_reasoning_models(model: str) -> None:
    body = _api.build_request_body(model=model, messages=MESSAGES, params={"max_tokens": 50}, stream=False)
    assert "max_tokens" not in body and body["max_completion_tokens"] == 50
    assert_valid("CreateChatCompletionRequest", body)
    both = _api.build_request_body(
        model=model, messages=MESSAGES, params={"max_tokens": 50, "max_completion_tokens": 70}, stream=True
    )
    assert "max_tokens" not in both and both["max_completion_tokens"] == 70
    assert_valid("CreateChatCompletionRequest", both)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4.1-mini", "gpt-3.5-turbo"])
def test_other_models_get_what_the_caller_gave(model: str) -> None:
    for params in ({"max_tokens": 50}, {"max_completion_tokens": 50}):
        body = _api.build_request_body(model=model, messages=MESSAGES, params=params, stream=False)
        assert {k: body[k] for k in params} == params and len(body) == 2 + len(params)
        assert_valid("CreateChatCompletionRequest", body)


def test_unknown_models_are_not_reasoning_models_and_a_registry_can_say_otherwise() -> None:
    body = _api.build_request_body(
        model="gilas-unknown-1", messages=MESSAGES, params={"max_tokens": 5}, stream=False
    )
    assert body["max_tokens"] == 5
    registry = ModelRegistry(
        {
            "gilas-think": {
                "encoding": "o200k_base",
                "context_window": 8000,
                "max_output_tokens": 800,
                "reasoning": True,
            }
        }
    )
    body = _api.build_request_body(
        model="gilas-think", messages=MESSAGES, params={"max_tokens": 5}, stream=False, registry=registry
    )
    assert body["max_completion_tokens"] == 5 and "max_tokens" not in body


@pytest.mark.parametrize(
    ("model", "key"),
    [("gpt-4o-mini", "max_tokens"), ("gpt-5", "max_completion_tokens"), ("o3-mini", "max_completion_tokens")],
)
def test_summary_request_uses_the_parameter_the_model_accepts(model: str, key: str) -> None:
    body = _api.summary_request_body(model=model, previous="before", messages=MESSAGES, max_tokens=600)
    other = {"max_tokens", "max_completion_tokens"} - {key}
    assert body[key] == 600 and not other & set(body)
    assert_valid("CreateChatCompletionRequest", body)


# ---------------------------------------------------------------------------------------------
# 8.7, 8.8: stream assembly


def test_the_served_model_is_the_first_non_empty_one() -> None:
    acc = _api.StreamAccumulator()
    # Azure opens with a prompt_filter_results chunk: no choices, model "".
    acc.add(
        json.dumps(
            {"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": []}
        )
    )
    acc.add(json.dumps(chunk({"role": "assistant", "content": "Hi"})))
    acc.add(json.dumps({**chunk({}, finish_reason="stop"), "model": "other"}))
    assert acc.reply(complete=True).model == "gpt-4o-mini-2024-07-18"


def test_restated_tool_call_ids_and_names_are_kept_once() -> None:
    # LiteLLM repeats id, type and function.name in every tool-call delta.
    acc = _api.StreamAccumulator()
    for piece in ['{"q": ', '"tehran"', "}"]:
        call = {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "search", "arguments": piece},
        }
        acc.add(json.dumps(chunk({"tool_calls": [call]})))
    # ... or repeats only the name.
    first = {"index": 1, "id": "call_2", "function": {"name": "clock", "arguments": "{"}}
    acc.add(json.dumps(chunk({"tool_calls": [first]})))
    acc.add(
        json.dumps(chunk({"tool_calls": [{"index": 1, "function": {"name": "clock", "arguments": "}"}}]}))
    )
    acc.add(json.dumps(chunk({}, finish_reason="tool_calls")))
    calls = acc.reply(complete=True).tool_calls
    assert calls is not None
    assert [c["function"] for c in calls] == [
        {"name": "search", "arguments": '{"q": "tehran"}'},
        {"name": "clock", "arguments": "{}"},
    ]
    assert calls[0]["id"] == "call_1"


# ---------------------------------------------------------------------------------------------
# 8.9: a streaming request answered with JSON


@pytest.mark.parametrize(
    ("content_type", "streamed"),
    [
        ("text/event-stream", True),
        ("text/event-stream; charset=utf-8", True),
        ("text/plain", True),
        ("", True),
        ("application/json", False),
        ("application/json; charset=utf-8", False),
        ("application/problem+json", False),
        ("text/html; charset=utf-8", False),
    ],
)
def test_only_json_or_html_answers_are_not_read_as_a_stream(content_type: str, streamed: bool) -> None:
    assert _api.is_event_stream(content_type) is streamed


def test_a_json_completion_to_a_streaming_request_is_the_reply() -> None:
    body = json.dumps(completion("Whole answer.", response_id="chatcmpl-1")).encode()
    reply = _api.answer_without_stream(200, "application/json", body, request_id="req-1")
    assert (reply.content, reply.response_id, reply.finish_reason) == ("Whole answer.", "chatcmpl-1", "stop")


def test_a_json_error_to_a_streaming_request_is_the_api_error_with_its_message() -> None:
    body = json.dumps({"error": {"message": "model overloaded", "type": "server_error"}}).encode()
    with pytest.raises(APIError, match="model overloaded") as caught:
        _api.answer_without_stream(200, "application/json", body, request_id="req-2")
    assert caught.value.request_id == "req-2"
    assert not isinstance(caught.value, APIStatusError)  # not retried: the status was 200
    with pytest.raises(APIResponseValidationError, match="HTML page"):
        _api.answer_without_stream(200, "text/html", b"<html><title>Gateway</title></html>")
    with pytest.raises(RateLimitError, match="slow down"):
        _api.answer_without_stream(429, "application/json", b'{"error": {"message": "slow down"}}')


# ---------------------------------------------------------------------------------------------
# 9.1: the key is redacted in every form a server may echo it in


ESCAPED_FORMS = {
    "raw": KEY,
    "slash-escaped": KEY.replace("/", "\\/"),
    "all-u-escaped": _u_escaped(KEY),
    "upper-u-escaped": _u_escaped(KEY).upper().replace("\\U", "\\u"),
    "mixed": _u_escaped(KEY[:6]) + KEY[6:].replace("/", "\\/"),
}


@pytest.mark.parametrize("form", list(ESCAPED_FORMS))
def test_a_key_escaped_in_a_json_error_body_is_redacted(form: str) -> None:
    echoed = ESCAPED_FORMS[form]
    body = (
        '{"error": {"message": "Incorrect API key provided: ' + echoed + '", '
        '"type": "invalid_request_error", "code": "' + echoed + '", "param": null}}'
    ).encode()
    assert KEY in json.loads(body)["error"]["message"]  # the server's JSON does decode to the key
    err = _api.status_error(401, "application/json", body, secrets=(KEY,))
    shown = [str(err), repr(err), err.message, err.code, json.dumps(err.body)]
    assert all(KEY not in text and ESCAPED_FORMS[form] not in text for text in shown if text)
    assert "[REDACTED]" in err.message


@pytest.mark.parametrize("form", ["url", "url-plus", "url-lower"])
def test_a_url_encoded_key_is_redacted(form: str) -> None:
    encoded = {
        "url": quote(KEY, safe=""),
        "url-plus": quote_plus(KEY),
        "url-lower": re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(KEY, safe="")),
    }[form]
    assert encoded != KEY
    text = f"upstream said: GET /v1?key={encoded} failed"
    assert _api.redact(text, (KEY,)) == "upstream said: GET /v1?key=[REDACTED] failed"


def test_redaction_after_decoding_in_every_error_path() -> None:
    escaped = _u_escaped(KEY)
    secrets = (KEY,)
    # A 2xx body that is not a completion.
    bad = ('{"id": "x", "choices": "' + escaped + '"}').encode()
    with pytest.raises(APIResponseValidationError) as caught:
        _api.parse_completion(
            _api.decode_json_body(200, "application/json", bad, secrets=secrets), secrets=secrets
        )
    assert KEY not in str(caught.value) and KEY not in (caught.value.body or "")
    # error_fields on decoded data.
    message, kind, code, param = _api.error_fields(
        {"error": {"message": KEY, "type": KEY, "code": KEY, "param": KEY}}, secrets=secrets
    )
    assert {message, kind, code, param} == {"[REDACTED]"}
    # A chunk carrying an error, mid-stream.
    acc = _api.StreamAccumulator(secrets=secrets)
    with pytest.raises(APIError) as caught:
        acc.add('{"error": {"message": "bad key ' + escaped + '"}}')
    assert KEY not in str(caught.value) and "[REDACTED]" in str(caught.value)
    # A named `event: error` frame, JSON or not.
    for data in (
        '{"error": {"message": "' + escaped + '"}}',
        '{"message": "' + KEY.replace("/", "\\/") + '"}',
        f"oops {KEY}",
    ):
        err = _api.stream_error_event(data, request_id="r", secrets=secrets)
        assert KEY not in str(err) and "[REDACTED]" in str(err) and err.request_id == "r"
    # A malformed chunk is shown redacted too.
    with pytest.raises(APIResponseValidationError) as caught:
        acc.add(json.dumps({"choices": [{"delta": KEY}]}))
    assert KEY not in str(caught.value) and KEY not in (caught.value.body or "")


def test_redaction_leaves_other_text_alone() -> None:
    text = "path \\/v1\\/chat, \\u0041 and sk-proj%2F are not the key"
    assert _api.redact(text, (KEY,)) == text
    assert _api.redact_value({"a": [1, None, "x"]}, (KEY,)) == {"a": [1, None, "x"]}


def test_stream_error_event_without_a_message_shows_the_frame() -> None:
    err = _api.stream_error_event('{"code": 7}', secrets=("k",))
    assert "the API reported an error in the middle of the stream" in str(err) and '{"code": 7}' in str(err)
    assert isinstance(_api.stream_error_event("", secrets=()), APIError)
