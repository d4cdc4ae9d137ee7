"""Terminal output for the command line: rich on a terminal, the exact text when piped.

Two audiences read what ``gilas-conv`` prints, and they want different things:

* a person at a terminal wants replies as rendered Markdown, roles in colour, progress
  bars for long jobs;
* a pipe or a file wants the stored text, byte for byte, so ``gilas-conv show ID | grep``
  and ``gilas-conv send --no-stream ... > reply.md`` give back exactly what was stored.

So every function here asks whether its stream is a terminal and picks one of the two.

Right-to-left text (Persian, Arabic, Hebrew) is written in logical order and left to the
terminal's bidi algorithm: nothing here reverses, reshapes or re-orders characters, and
zero-width characters such as ZWNJ (U+200C, the Persian half-space) pass through
untouched. Two habits keep mixed Persian/English output readable: a role label is printed
on its own line, never in front of message text, so each paragraph's direction is set by
its own first strong character; and the padding spaces rich adds to fill a line are
removed, so a right-to-left paragraph is not followed by a run of invisible spaces.
Wrapping happens only on a terminal and only between words (rich's word wrap); a word is
cut only when it is wider than the terminal.

Text from outside (a model's reply, an imported title, a server's error message) must not
drive the terminal: an OSC 52 sequence in a reply would write the user's clipboard, OSC 0
retitle the window, CSI clear the screen. So on a terminal every control character other
than newline and tab is shown visibly instead (:func:`visible`): C0 controls and DEL in
caret notation (ESC as ``^[``, BEL as ``^G``, CR as ``^M``, DEL as ``^?``), C1 controls
(U+0080 to U+009F, e.g. the one-character CSI U+009B) as ``\x9b``. JSON printed on a
terminal escapes DEL and C1 as ``\u007f``..``\u009f`` (the same JSON value; the others are
escaped by JSON itself). Rich markup is never interpreted: ``[bold]`` in a reply prints as
typed. Piped or redirected, nothing is changed: the bytes are the stored text.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from .. import _content
from .._content import PartText, image_url

__all__ = [
    "Output",
    "ReplyPrinter",
    "content_text",
    "isatty",
    "terminal_json",
    "visible",
]

# How often a streamed reply is redrawn on a terminal. Each redraw re-renders the
# Markdown of the whole reply so far, so redrawing on every token would be quadratic.
STREAM_REDRAWS_PER_SECOND = 15

ROLE_STYLES = {
    "system": "magenta",
    "developer": "magenta",
    "user": "bold cyan",
    "assistant": "bold green",
    "tool": "yellow",
}


# Every C0 control but tab and newline, DEL, and every C1 control.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_JSON_UNESCAPED_CONTROLS = re.compile("[\x7f-\x9f]")


def _shown(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    return f"\\x{code:02x}"


def visible(text: str) -> str:
    """``text`` with every control character but newline and tab made visible and inert
    (``ESC`` as ``^[``, ``U+009B`` as ``\\x9b``): what a terminal shows of outside text."""
    return _CONTROLS.sub(_shown, text)


def terminal_json(text: str) -> str:
    """JSON text safe for a terminal: DEL and C1 controls, which ``ensure_ascii=False``
    leaves raw, as ``\\u00XX`` escapes (the JSON value is unchanged)."""
    return _JSON_UNESCAPED_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def isatty(stream: IO[Any] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for pipes, files and test doubles)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a real file
        return False


def _image(part: Mapping[str, Any]) -> str:
    url = image_url(part)
    return "[image: inline data]" if url.startswith("data:") else f"[image: {url}]"


_PARTS: dict[str, PartText] = {
    "text": lambda part: str(part.get("text", "")),
    "refusal": lambda part: f"[refusal] {part.get('refusal', '')}",
    "image_url": _image,
}


def content_text(content: Any) -> str:
    """The text of a message's content: a string as it is, content parts joined by newlines."""
    return _content.content_text(content, _PARTS, other=lambda kind: f"[{kind} part]", sep="\n")


def _tool_call_lines(tool_calls: Sequence[Mapping[str, Any]] | None) -> list[str]:
    lines = []
    for call in tool_calls or ():
        function = call.get("function") or {}
        lines.append(f"→ {function.get('name', '?')}({function.get('arguments', '')}) [{call.get('id', '')}]")
    return lines


def _label(message: Any) -> str:
    """``[seq] role`` plus what else identifies the message: name, model, call id, status."""
    details = []
    if message.name:
        details.append(message.name)
    if message.role == "assistant" and message.model:
        details.append(message.model)
    if message.tool_call_id:
        details.append(f"answers {message.tool_call_id}")
    if message.pinned:
        details.append("pinned")
    if message.status != "complete":
        details.append(message.status)
    suffix = f" ({', '.join(details)})" if details else ""
    return f"[{message.seq}] {message.role}{suffix}"


class _Trimmed:
    """A renderable without the spaces rich pads lines with, optionally only its last lines.

    Padding is removed only where it is plain space (no background colour), so code blocks
    keep their shaded box. ``tail`` keeps a streamed reply's newest lines on screen while it
    is taller than the terminal; the final render shows everything.
    """

    def __init__(self, renderable: RenderableType, *, tail: int | None = None) -> None:
        self.renderable = renderable
        self.tail = tail

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        if self.tail is not None and len(lines) > self.tail:
            lines = lines[-self.tail :]
        for line in lines:
            yield from _rstrip_segments(line)
            yield Segment.line()


def _rstrip_segments(line: list[Segment]) -> list[Segment]:
    line = list(line)
    while line:
        last = line[-1]
        if last.control or (last.style is not None and last.style.bgcolor is not None):
            break
        stripped = last.text.rstrip(" ")
        if stripped:
            line[-1] = Segment(stripped, last.style)
            break
        line.pop()
    return line


def _console(stream: IO[str], *, rich: bool) -> Console:
    # markup/emoji/highlight off: message text is data, "[b]" or ":smile:" stay as typed.
    return Console(file=stream, force_terminal=rich, markup=False, emoji=False, highlight=False)


class Output:
    """Where a command writes: ``out`` (stdout) and ``err`` (stderr), each rich or plain.

    Made per command invocation, so it sees the streams in force then (click's test runner
    swaps them).
    """

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.rich = isatty(self.out)
        self.err_rich = isatty(self.err)
        self.console = _console(self.out, rich=self.rich)
        self.err_console = _console(self.err, rich=self.err_rich)

    # -- plain lines -----------------------------------------------------------------------

    def line(self, text: str = "", *, style: str | None = None) -> None:
        """One line on stdout, styled only on a terminal (where controls are made visible)."""
        if self.rich:
            self.console.print(Text(visible(text), style=style or ""), soft_wrap=True)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def note(self, text: str, *, style: str = "dim") -> None:
        """One line on stderr: status and hints that must not mix with the data on stdout."""
        if self.err_rich:
            self.err_console.print(Text(visible(text), style=style), soft_wrap=True)
        else:
            self.err.write(text + "\n")
            self.err.flush()

    def write_exact(self, text: str) -> None:
        """``text`` as it is, ending with a newline (added only if it has none)."""
        self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()

    def json(self, text: str) -> None:
        """JSON text: exact when piped; on a terminal with DEL and C1 controls escaped."""
        self.write_exact(terminal_json(text) if self.rich else text)

    # -- messages --------------------------------------------------------------------------

    def reply(self, text: str) -> None:
        """A finished reply: Markdown on a terminal, the exact text when piped."""
        if self.rich:
            self.console.print(_Trimmed(Markdown(visible(text))))
        else:
            self.write_exact(text)

    def message(self, message: Any) -> None:
        """One stored message with its label line; the content exact when piped."""
        text = content_text(message.content)
        calls = _tool_call_lines(message.tool_calls)
        if not self.rich:
            self.out.write(_label(message) + "\n")
            body = "\n".join([text, *calls]) if text else "\n".join(calls)
            self.out.write(body + ("" if body.endswith("\n") else "\n"))
            self.out.write("\n")
            self.out.flush()
            return
        text = visible(text)
        self.console.print(Text(visible(_label(message)), style=ROLE_STYLES.get(message.role, "bold")))
        if text:
            if message.role == "assistant":
                self.console.print(_Trimmed(Markdown(text)))
            else:
                # Users' text is shown as typed: Markdown would eat their asterisks.
                self.console.print(_Trimmed(Text(text)))
        for call in calls:
            self.console.print(Text(visible(call), style="yellow"))
        self.console.print()

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table on a terminal; tab-separated lines with a header line when piped."""
        if not self.rich:
            self.out.write("\t".join(columns) + "\n")
            for row in rows:
                self.out.write("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row) + "\n")
            self.out.flush()
            return
        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in columns:
            table.add_column(name, overflow="ellipsis", no_wrap=name != columns[-1])
        for row in rows:
            table.add_row(*(Text(visible(cell)) for cell in row))
        self.console.print(_Trimmed(table))

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[], None]]:
        """Yield an ``advance()`` callable; a progress bar on stderr only if it is a terminal."""
        if not self.err_rich:
            yield lambda: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.err_console,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)


class ReplyPrinter:
    """Prints a reply while it streams; ``finish()`` ends it (safe to call twice).

    On a terminal the reply is redrawn as Markdown as it grows, showing its newest lines
    while it is taller than the screen and all of it at the end. Piped, each piece is
    written as it arrives, so the output is exactly the reply plus a final newline.
    """

    def __init__(self, output: Output) -> None:
        self.output = output
        self.text = ""
        self._live: Live | None = None
        self._last_draw = 0.0
        self._done = False

    def _renderable(self, *, full: bool) -> RenderableType:
        height = self.output.console.size.height
        return _Trimmed(Markdown(visible(self.text)), tail=None if full else max(height - 1, 1))

    def feed(self, delta: str | None) -> None:
        if not delta:
            return
        self.text += delta
        if not self.output.rich:
            self.output.out.write(delta)
            self.output.out.flush()
            return
        if self._live is None:
            self._live = Live(
                console=self.output.console,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
                vertical_overflow="visible",
            )
            self._live.start()
        now = time.monotonic()
        if now - self._last_draw >= 1 / STREAM_REDRAWS_PER_SECOND:
            self._live.update(self._renderable(full=False), refresh=True)
            self._last_draw = now

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._live is not None:
            self._live.update(self._renderable(full=True))
            self._live.stop()  # draws the final, full render
        elif not self.output.rich and self.text and not self.text.endswith("\n"):
            self.output.out.write("\n")
            self.output.out.flush()
