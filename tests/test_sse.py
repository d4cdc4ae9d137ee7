"""The server-sent-events decoder, fed directly: every rule of the spec, and every split."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gilas_conv._sse import MAX_EVENT_SIZE, ServerSentEvent, SSEDecoder, aiter_events, iter_events
from gilas_conv.exceptions import APIResponseValidationError


def decode(*pieces: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = []
    for piece in pieces:
        events += decoder.feed(piece)
    return events + decoder.flush()


def test_one_data_line_is_one_event() -> None:
    assert decode(b"data: hello\n\n") == [ServerSentEvent(data="hello")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert decode(b"data: one\ndata: two\ndata:\ndata: four\n\n")[0].data == "one\ntwo\n\nfour"


def test_comments_and_keep_alives_are_ignored() -> None:
    body = b": keep-alive\n\n:ping\ndata: x\n: inside an event\n\n"
    assert decode(body) == [ServerSentEvent(data="x")]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_line_ending(newline: bytes) -> None:
    body = newline.join([b"data: a", b"data: b", b"", b"event: e", b"data: c", b"", b""])
    assert decode(body) == [ServerSentEvent(data="a\nb"), ServerSentEvent(data="c", event="e")]


def test_mixed_line_endings_in_one_stream() -> None:
    body = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    assert decode(body) == [ServerSentEvent(data="a\nb\nc"), ServerSentEvent(data="d")]


def test_event_id_and_retry_fields() -> None:
    body = b"event: update\nid: 7\nretry: 1500\ndata: {}\n\ndata: next\n\n"
    first, second = decode(body)
    assert first == ServerSentEvent(data="{}", event="update", id="7", retry=1500)
    # The event name resets after each event; the last event id and retry carry over.
    assert second == ServerSentEvent(data="next", event="message", id="7", retry=1500)


def test_id_with_nul_and_non_numeric_retry_are_ignored() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"id: 1\ndata: a\n\nid: 2\x003\nretry: 10s\ndata: b\n\n")
    assert [e.id for e in events] == ["1", "1"]
    assert decoder.retry is None and decoder.last_event_id == "1"


def test_only_one_leading_space_is_stripped_and_colons_stay() -> None:
    body = b'data:  two spaces\n\ndata:none\n\ndata: {"a": "b:c"}\n\n'
    assert [e.data for e in decode(body)] == [" two spaces", "none", '{"a": "b:c"}']


def test_a_field_without_colon_has_an_empty_value() -> None:
    assert decode(b"data\n\n") == [ServerSentEvent(data="")]
    assert decode(b"data\ndata\n\n") == [ServerSentEvent(data="\n")]


def test_unknown_fields_are_ignored_and_blank_lines_without_data_dispatch_nothing() -> None:
    assert decode(b"foo: bar\n\n\n\nevent: x\n\ndata: y\n\n") == [ServerSentEvent(data="y")]


def test_an_unterminated_last_event_is_dropped() -> None:
    assert decode(b"data: complete\n\ndata: cut") == [ServerSentEvent(data="complete")]
    assert decode(b"data: complete\n\ndata: line ended but no blank line\n") == [
        ServerSentEvent(data="complete")
    ]


def test_done_marker_is_ordinary_data() -> None:
    assert decode(b"data: [DONE]\n\n") == [ServerSentEvent(data="[DONE]")]


def test_leading_byte_order_mark_is_dropped_once() -> None:
    bom = "\ufeff".encode()
    assert decode(bom + b"data: x\n\n") == [ServerSentEvent(data="x")]
    assert decode(bom[:1], bom[1:], b"data: x\n\n") == [ServerSentEvent(data="x")]
    # A BOM later in the stream is content.
    assert decode(b"data: \xef\xbb\xbfx\n\n")[0].data == "\ufeffx"


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert decode(b"data: \xff!\n\n")[0].data == "\ufffd!"


def test_events_are_returned_as_soon_as_complete() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent(data="a")]
    assert decoder.feed(b"data: b\r") == []
    assert decoder.feed(b"\r") == [ServerSentEvent(data="b")]  # CR CR: a line end, then a blank line


SAMPLE = (
    "\ufeff: keep-alive\r\n\r\n"
    'data: {"choices": [{"delta": {"content": "Ça va? 👍🏽"}}]}\r\n\r\n'
    "event: note\rid: 42\rretry: 3000\rdata: line one\rdata: line two\r\r"
    "data: naïve\n: comment\ndata: 日本語\n\n"
    "data\n\n"
    "data: crlf one\r\ndata: crlf two\r\n\r\n"
    "data: [DONE]\r\n\r\n"
).encode()
SAMPLE_EVENTS = decode(SAMPLE)


def test_sample_decodes_as_expected() -> None:
    assert [e.data for e in SAMPLE_EVENTS] == [
        '{"choices": [{"delta": {"content": "Ça va? 👍🏽"}}]}',
        "line one\nline two",
        "naïve\n日本語",
        "",
        "crlf one\ncrlf two",
        "[DONE]",
    ]
    assert SAMPLE_EVENTS[1].event == "note" and SAMPLE_EVENTS[1].id == "42"


@pytest.mark.parametrize("position", range(len(SAMPLE) + 1))
def test_split_at_every_byte_position(position: int) -> None:
    assert decode(SAMPLE[:position], SAMPLE[position:]) == SAMPLE_EVENTS


def test_fed_one_byte_at_a_time() -> None:
    assert decode(*(SAMPLE[i : i + 1] for i in range(len(SAMPLE)))) == SAMPLE_EVENTS


def test_split_at_every_pair_of_positions_of_a_crlf_stream() -> None:
    body = "data: é\r\ndata: x\r\n\r\ndata: y\r\r".encode()
    expected = [ServerSentEvent(data="é\nx"), ServerSentEvent(data="y")]
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            assert decode(body[:i], body[i:j], body[j:]) == expected, (i, j)


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(SAMPLE)), max_size=12))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    pieces = [SAMPLE[a:b] for a, b in zip([0, *points], [*points, len(SAMPLE)], strict=True)]
    assert decode(*pieces) == SAMPLE_EVENTS


@settings(max_examples=100, deadline=None)
@given(
    lines=st.lists(
        st.text(alphabet=st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=8), max_size=5
    ),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_any_data_round_trips(lines: list[str], newline: str) -> None:
    body = "".join(f"data:{' '}{line}{newline}" for line in lines) + newline
    expected = [ServerSentEvent(data="\n".join(lines))] if lines else []
    assert decode(body.encode()) == expected


def test_iter_helpers() -> None:
    pieces = [SAMPLE[:10], SAMPLE[10:77], SAMPLE[77:]]
    assert list(iter_events(pieces)) == SAMPLE_EVENTS

    async def chunks():  # type: ignore[no-untyped-def]
        for piece in pieces:
            yield piece

    async def collect() -> list[ServerSentEvent]:
        return [event async for event in aiter_events(chunks())]

    assert asyncio.run(collect()) == SAMPLE_EVENTS


# ---------------------------------------------------------------------------------------------
# Cost and bounds (speed itself is measured in benchmarks/sse.py, never here)

PIECE = 64 * 1024


def test_a_long_line_in_many_pieces_is_searched_once() -> None:
    # 32 MB without a newline, in 64 KB pieces: the decoder used to search the whole open
    # line again with every piece (quadratic: 16 MB took 0.9 s, 200 MB did not finish).
    size = 32 * 1024 * 1024
    decoder = SSEDecoder(max_event_size=size + 100)
    body = b"data: " + b"x" * (size - len(b"data: "))
    events = []
    for start in range(0, len(body), PIECE):
        events += decoder.feed(body[start : start + PIECE])
    events += decoder.feed(b"\n\n")
    assert decoder.scanned == len(body) + 2  # each character searched for a line end once
    assert len(events) == 1 and len(events[0].data) == size - len(b"data: ")


def test_many_short_lines_are_searched_once() -> None:
    body = b"".join(b'data: {"n": %d}\n\n' % n for n in range(20_000))
    decoder = SSEDecoder()
    events = [e for start in range(0, len(body), PIECE) for e in decoder.feed(body[start : start + PIECE])]
    assert len(events) == 20_000 and decoder.scanned == len(body)


def test_a_line_longer_than_the_limit_is_a_clear_error() -> None:
    decoder = SSEDecoder(max_event_size=1000)
    assert decoder.feed(b"data: ok\n\n")[0].data == "ok"
    decoder.feed(b"data: " + b"x" * 600)
    with pytest.raises(APIResponseValidationError, match=r"longer than 1000 characters.*max_event_size"):
        decoder.feed(b"x" * 600)  # still no newline: refused before the whole line is held
    with pytest.raises(APIResponseValidationError):
        decoder.feed(b"\n\n")  # the stream is abandoned
    with pytest.raises(APIResponseValidationError):
        decoder.flush()


def test_an_event_larger_than_the_limit_is_a_clear_error() -> None:
    decoder = SSEDecoder(max_event_size=1000)
    line = b"data: " + b"y" * 300 + b"\n"
    assert decoder.feed(line * 3 + b"\n")[0].data == "\n".join(["y" * 300] * 3)  # 902 characters
    # The events completed before the oversized one, in the same bytes, are delivered first.
    events = decoder.feed(b"data: first\n\n" + line * 4 + b"\n")
    assert [e.data for e in events] == ["first"]
    with pytest.raises(APIResponseValidationError, match="an event longer than 1000"):
        decoder.feed(b"data: later\n\n")


def test_the_limit_is_a_named_default_and_checked() -> None:
    assert SSEDecoder().max_event_size == MAX_EVENT_SIZE == 16 * 1024 * 1024
    exact = SSEDecoder(max_event_size=10)
    assert exact.feed(b"data:" + b"z" * 5 + b"\n" + b"data:" + b"z" * 4 + b"\n\n")[0].data == "zzzzz\nzzzz"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_event_size"):
            SSEDecoder(max_event_size=bad)  # type: ignore[arg-type]
    assert [e.data for e in iter_events([b"data: a\n\n"], max_event_size=7)] == ["a"]
