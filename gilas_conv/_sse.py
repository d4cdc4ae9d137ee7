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
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent", "aiter_events", "iter_events"]

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``id`` is the last event id in force when it was dispatched."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the events completed by those bytes,
    ``flush()`` ends the stream."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # the current line, not yet terminated
        self._skip_lf = False  # the previous piece ended with CR: a leading LF is its pair
        self._started = False  # past the point where a BOM may appear
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None

    @property
    def retry(self) -> int | None:
        """The reconnection time (ms) the server asked for last, if any."""
        return self._retry

    @property
    def last_event_id(self) -> str | None:
        return self._last_id

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        return self._feed_text(self._utf8.decode(data))

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: returns any event completed by the last bytes; drops an open one."""
        events = self._feed_text(self._utf8.decode(b"", final=True))
        # An unterminated last line cannot complete an event (that needs a blank line after
        # it), so it and any event still open are dropped.
        self._pending = ""
        self._data = []
        self._event = ""
        return events

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
        buf = self._pending + text
        events: list[ServerSentEvent] = []
        pos = 0
        end = len(buf)
        while pos < end:
            cr = buf.find("\r", pos)
            lf = buf.find("\n", pos)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                line, pos = buf[pos:lf], lf + 1
            else:
                line, pos = buf[pos:cr], cr + 1
                if pos == end:
                    self._skip_lf = True  # its LF, if any, comes with the next piece
                elif buf[pos] == "\n":
                    pos += 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._pending = buf[pos:]
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
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent(
            data="\n".join(data), event=event or "message", id=self._last_id, retry=self._retry
        )


def iter_events(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """The events of a byte stream, each yielded as soon as it is complete."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()


async def aiter_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event
