"""A server-sent events decoder: a pure, incremental state machine, no I/O.

Feed it the body's bytes in whatever pieces the network delivers and it hands back each
event once its terminating blank line has arrived. It follows the WHATWG "event stream
interpretation" rules (https://html.spec.whatwg.org/multipage/server-sent-events.html):

* lines end with CRLF, LF or CR, and a CRLF split across two pieces is still one ending;
* the stream is UTF-8 (a character split across pieces is reassembled, invalid bytes
  become U+FFFD) and one leading byte-order mark is dropped;
* ``data:`` lines accumulate, joined with ``"\\n"``; ``event:`` names the event,
  ``id:`` sets the last event id (kept across events, ignored if it contains NUL),
  ``retry:`` sets the reconnection time when it is all ASCII digits;
* one space after the colon is dropped; a line with no colon is a field with an empty
  value; lines starting with ``:`` are comments (keep-alives) and are ignored;
* a blank line dispatches the event, unless no ``data`` line was seen since the last
  one; an event still open when the stream ends is discarded, as the spec requires.

``[DONE]`` is the chat-completions API's end-of-stream marker, not an SSE feature: it
arrives as an ordinary event whose data is ``[DONE]``, and the caller decides.

Cost and bounds
    Decoding is linear in the input: each piece is searched once for line ends, and a line
    still open when a piece ends is kept as a list of its pieces, joined once when its
    end arrives (``scanned`` counts the characters searched, for tests and benchmarks).
    A single line, or a single event's data, longer than ``max_event_size`` characters
    (default :data:`MAX_EVENT_SIZE`, 16 MiB) raises APIResponseValidationError: a stream
    cannot make the process hold an unbounded buffer.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

from .exceptions import APIResponseValidationError

__all__ = ["MAX_EVENT_SIZE", "SSEDecoder", "ServerSentEvent", "aiter_events", "iter_events"]

MAX_EVENT_SIZE = 16 * 1024 * 1024
"""The longest line, and the most data one event may carry, in characters (16 MiB).

A chat-completions chunk is a few hundred bytes; even a whole reply sent as one event
(an image, a long tool call) stays far below this."""

_BOM = "\ufeff"
_LINE_END = re.compile(r"\r\n?|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``id`` is the last event id in force when it was dispatched."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the events completed by those bytes,
    ``flush()`` ends the stream.

    ``max_event_size``: the longest line and the most data of one event, in characters
    (default :data:`MAX_EVENT_SIZE`). Exceeding it raises APIResponseValidationError from
    ``feed`` (after the events the same bytes completed before it were returned) and the
    decoder is done: every later call raises it again.
    """

    def __init__(self, *, max_event_size: int = MAX_EVENT_SIZE) -> None:
        if isinstance(max_event_size, bool) or not isinstance(max_event_size, int) or max_event_size <= 0:
            raise ValueError(f"max_event_size must be a positive integer, not {max_event_size!r}")
        self.max_event_size = max_event_size
        self.scanned = 0
        """Characters searched for line ends so far: each decoded character exactly once."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []  # the current line, not yet terminated, as it arrived
        self._pending_size = 0  # sum of the lengths of _pieces
        self._skip_lf = False  # the previous piece ended with CR: a leading LF is its pair
        self._started = False  # past the point where a BOM may appear
        self._data: list[str] = []
        self._data_size = 0  # the characters of the current event's data, newlines included
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._error: APIResponseValidationError | None = None

    @property
    def retry(self) -> int | None:
        """The reconnection time (ms) the server asked for last, if any."""
        return self._retry

    @property
    def last_event_id(self) -> str | None:
        return self._last_id

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        if self._error is not None:
            raise self._error
        return self._feed_text(self._utf8.decode(data))

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: returns any event completed by the last bytes; drops an open one."""
        if self._error is not None:
            raise self._error
        events = self._feed_text(self._utf8.decode(b"", final=True))
        # An unterminated last line cannot complete an event (that needs a blank line after
        # it), so it and any event still open are dropped.
        self._pieces, self._pending_size = [], 0
        self._data, self._data_size = [], 0
        self._event = ""
        return events

    def _too_large(self, what: str) -> APIResponseValidationError:
        # Free what was buffered: the stream is abandoned.
        self._pieces, self._pending_size = [], 0
        self._data, self._data_size = [], 0
        self._error = APIResponseValidationError(
            f"the API's event stream sent {what} longer than {self.max_event_size} characters "
            "(the decoder's max_event_size); the stream was abandoned",
            status_code=200,
        )
        return self._error

    def _feed_text(self, text: str) -> list[ServerSentEvent]:
        if not text:
            return []
        if not self._started:
            self._started = True
            if text.startswith(_BOM):
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        self.scanned += len(text)
        events: list[ServerSentEvent] = []
        start = 0
        try:
            for match in _LINE_END.finditer(text):
                end = match.start()
                if self._pending_size + end - start > self.max_event_size:
                    raise self._too_large("a line")
                if self._pieces:
                    self._pieces.append(text[start:end])
                    line = "".join(self._pieces)
                    self._pieces, self._pending_size = [], 0
                else:
                    line = text[start:end]
                start = match.end()
                if start == len(text) and match.group() == "\r":
                    self._skip_lf = True  # its LF, if any, comes with the next piece
                event = self._line(line)
                if event is not None:
                    events.append(event)
            if start < len(text):
                self._pending_size += len(text) - start
                if self._pending_size > self.max_event_size:
                    raise self._too_large("a line")
                self._pieces.append(text[start:])
        except APIResponseValidationError:
            if events:
                return events  # delivered now; the error is raised by the next call
            raise
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_size + 1:
                raise self._too_large("an event")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._data_size, self._event = [], 0, ""
        if not data:
            return None
        return ServerSentEvent(
            data="\n".join(data), event=event or "message", id=self._last_id, retry=self._retry
        )


def iter_events(
    chunks: Iterable[bytes], *, max_event_size: int = MAX_EVENT_SIZE
) -> Iterator[ServerSentEvent]:
    """The events of a byte stream, each yielded as soon as it is complete."""
    decoder = SSEDecoder(max_event_size=max_event_size)
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()


async def aiter_events(
    chunks: AsyncIterable[bytes], *, max_event_size: int = MAX_EVENT_SIZE
) -> AsyncIterator[ServerSentEvent]:
    decoder = SSEDecoder(max_event_size=max_event_size)
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event
