"""``chat``: the interactive REPL (prompt loop, slash commands, line editing, streamed replies)."""

from __future__ import annotations

import contextlib
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._config import DEFAULT_MODEL, default_data_dir
from ..exceptions import GilasConvError
from ..store import Conversation
from ._app import (
    Settings,
    api_options,
    conversation_options,
    error_message,
    main,
    pass_settings,
    pick_conversation,
    plural,
    title_from,
)
from ._manage import token_lines, token_report
from ._render import Output, ReplyPrinter
from ._search import print_hits
from ._turns import (
    StreamStopped,
    TurnOptions,
    ignore_stop_signals,
    print_stream,
    stopped_note,
    turn_options,
)

if TYPE_CHECKING:
    from ..sender import ReplyStream

__all__ = ["CHAT_HELP", "SLASH_COMMANDS", "read_message"]

# What `chat` shows of a resumed conversation before the first prompt.
RESUME_PREVIEW_MESSAGES = 6
# Readline history of `chat`, in the user's data directory.
CHAT_HISTORY_FILENAME = "chat_history"
CHAT_HISTORY_LENGTH = 1000
PROMPT = "> "
CONTINUATION_PROMPT = "... "
BLOCK_QUOTE = '"""'
# /search shows this many hits.
SEARCH_LIMIT = 10

# The slash commands: name, arguments, what it does. /help, `chat --help` and the
# completion all read this table.
_COMMANDS = (
    ("/help", "", "this list"),
    ("/new", "", "start a new conversation"),
    ("/model", "[NAME]", "show or switch the model (kept for this conversation)"),
    ("/system", "TEXT", "add a system message (instructions sent with every later turn)"),
    ("/tokens", "", "the token budget of the next turn"),
    ("/fork", "[SEQ]", "continue in a copy of this conversation (up to message SEQ)"),
    ("/history", "[N]", "show the last N messages (default: all)"),
    ("/search", "QUERY", 'find messages in all your conversations (words, "phrases", prefix*)'),
    ("/retry", "", "answer the last message again (after an error)"),
    ("/exit", "", "leave (also /quit, Ctrl-D, or Ctrl-C twice)"),
)
SLASH_COMMANDS = tuple(name for name, _args, _what in _COMMANDS)

CHAT_HELP = "\n".join(
    [
        "Commands:",
        *(f"  {f'{name} {args}'.strip():<15} {what}" for name, args, what in _COMMANDS),
        "Input:",
        '  End a line with \\ to continue on the next line; a line starting with """ opens a',
        '  block that ends at a line ending with """. Start a message with a space to send text',
        '  beginning with "/". Ctrl-C stops a reply while it streams; what arrived is kept.',
    ]
)


def _history_path() -> Path:
    return default_data_dir() / CHAT_HISTORY_FILENAME


class _Readline:
    """Line editing and a persistent history for chat, when stdin is a terminal."""

    def __init__(self) -> None:
        self.module: Any = None
        self.path = _history_path()

    def __enter__(self) -> _Readline:
        if not sys.stdin.isatty():
            return self
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input() still works
            return self
        self.module = readline
        readline.set_history_length(CHAT_HISTORY_LENGTH)
        with contextlib.suppress(OSError):
            readline.read_history_file(self.path)
        readline.set_completer(self._complete)
        readline.set_completer_delims(" \t\n")
        readline.parse_and_bind("tab: complete")
        return self

    @staticmethod
    def _complete(text: str, state: int) -> str | None:
        matches = [c for c in SLASH_COMMANDS if c.startswith(text)] if text.startswith("/") else []
        return matches[state] if state < len(matches) else None

    def __exit__(self, *exc_info: object) -> None:
        if self.module is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.module.write_history_file(self.path)
        except OSError:
            pass


def read_message(read: Callable[[str], str]) -> str:
    """One message from the user, possibly over several lines (see CHAT_HELP).

    ``read`` is ``input``; its EOFError and KeyboardInterrupt pass through.
    """
    line = read(PROMPT)
    if line.lstrip().startswith(BLOCK_QUOTE):
        rest = line.lstrip()[len(BLOCK_QUOTE) :]
        if rest.rstrip().endswith(BLOCK_QUOTE):
            return rest.rstrip()[: -len(BLOCK_QUOTE)]
        lines = [rest] if rest else []
        while True:
            line = read(CONTINUATION_PROMPT)
            if line.rstrip().endswith(BLOCK_QUOTE):
                last = line.rstrip()[: -len(BLOCK_QUOTE)]
                if last:
                    lines.append(last)
                return "\n".join(lines)
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read(CONTINUATION_PROMPT)
    lines.append(line)
    return "\n".join(lines)


class _Chat:
    """One interactive chat session: the prompt loop, slash commands and streamed replies."""

    def __init__(
        self,
        settings: Settings,
        output: Output,
        conv: Conversation | None,
        *,
        model: str,
        system: str | None,
        params: dict[str, Any],
    ) -> None:
        self.settings = settings
        self.store = settings.store()
        self.sender = settings.sender()
        self.output = output
        self.conv = conv
        self.model = model
        self.system = system  # for a conversation not created yet
        self.params = params

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        interrupted = False  # the last thing that happened was a Ctrl-C
        with _Readline():
            while True:
                try:
                    text = read_message(input)
                    interrupted = False
                    if not text.strip():
                        continue
                    if text.startswith("/"):
                        if self.command(text) == "exit":
                            break
                        continue
                    interrupted = self.turn(text.lstrip(" ") if text.startswith(" /") else text)
                except KeyboardInterrupt:
                    # At the prompt, or while a command printed: a second one in a row exits.
                    if interrupted:
                        self.output.line()
                        break
                    interrupted = True
                    self.output.line()
                    self.output.line("(Ctrl-C again or Ctrl-D to exit)", style="dim")
                except EOFError:
                    self.output.line()
                    break
        if self.conv is not None:
            self.output.line(
                f"conversation {self.conv.id}; resume with: gilas-conv chat {self.conv.id}", style="dim"
            )

    def _ensure_conversation(self, first_text: str | None) -> Conversation:
        if self.conv is None:
            self.conv = self.store.create(
                model=self.model,
                system=self.system,
                title=title_from(first_text or ""),
                owner=self.settings.owner,
            )
            self.settings.conversation_id = self.conv.id
            self.output.line(f"conversation {self.conv.id}", style="dim")
        return self.conv

    def turn(self, text: str) -> bool:
        """Send one message and stream the reply; True when Ctrl-C stopped it."""
        conv = self._ensure_conversation(text)
        return self._stream(lambda: self.sender.stream(conv, text, **self.params))

    def _stream(self, start: Callable[[], ReplyStream]) -> bool:
        printer = ReplyPrinter(self.output)
        try:
            print_stream(start(), printer)
        except StreamStopped as stopped:
            with contextlib.suppress(OSError):
                self.output.line(stopped_note(stopped.message), style="dim")
            if stopped.signum != signal.SIGINT:
                # SIGTERM or a closed terminal: the session is over, the partial reply is stored.
                ignore_stop_signals()
                raise SystemExit(128 + stopped.signum) from None
            return True
        except KeyboardInterrupt:
            # Before the first byte: the message is stored, unanswered.
            self.output.line()
            self.output.line("Stopped before the reply started; /retry asks again.", style="dim")
            return True
        except (GilasConvError, ValueError) as err:
            self._error(err)
        self.output.line()
        return False

    def _error(self, err: BaseException) -> None:
        if self.settings.debug:
            traceback.print_exception(err, file=sys.stderr)
        message = error_message(
            err, base_url=self.settings.base_url, timeout=self.settings.timeout, conversation_id="ID"
        ).replace("`gilas-conv retry ID`", "/retry")
        self.output.note(f"Error: {message}", style="red")

    # -- slash commands ------------------------------------------------------------------------

    def command(self, text: str) -> str | None:
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        handler = {
            "/help": self._help,
            "/new": self._new,
            "/model": self._model,
            "/system": self._system,
            "/tokens": self._tokens,
            "/fork": self._fork,
            "/history": self._history,
            "/search": self._search,
            "/retry": self._retry,
            "/exit": None,
            "/quit": None,
        }
        if name not in handler:
            self.output.note(f"unknown command {name}; /help lists the commands", style="red")
            return None
        action = handler[name]
        if action is None:
            return "exit"
        try:
            action(arg)
        except (GilasConvError, ValueError) as err:
            self._error(err)
        return None

    def _help(self, _arg: str) -> None:
        for line in CHAT_HELP.splitlines():
            self.output.line(line)

    def _new(self, _arg: str) -> None:
        self.conv = None
        self.output.line("New conversation (stored when you send the first message).", style="dim")

    def _model(self, arg: str) -> None:
        if not arg:
            self.output.line(f"model: {self.conv.model if self.conv else self.model}")
            return
        self.model = arg
        if self.conv is not None:
            self.conv.update(model=arg)
        self.output.line(f"model: {arg}", style="dim")

    def _system(self, arg: str) -> None:
        if not arg:
            raise ValueError("/system needs the text of the system message")
        if self.conv is None:
            self.system = arg if self.system is None else f"{self.system}\n\n{arg}"
        else:
            self.conv.append("system", arg)
        self.output.line("system message added", style="dim")

    def _tokens(self, _arg: str) -> None:
        if self.conv is None:
            self.output.line("Nothing stored yet.", style="dim")
            return
        self.conv.refresh()  # the sender appended through this handle, but refresh is cheap
        report = token_report(
            self.conv,
            context_limit=self.params.get("context_limit"),
            max_tokens=self.params.get("max_tokens"),
        )
        for line in token_lines(report, drift_rows=0):
            self.output.line(line)

    def _fork(self, arg: str) -> None:
        if self.conv is None:
            raise ValueError("nothing to fork yet: send a message first")
        try:
            at = int(arg) if arg else None
        except ValueError:
            raise ValueError(f"/fork takes a message number, not {arg!r}") from None
        old = self.conv
        self.conv = old.fork(at)
        self.output.line(f"forked {old.id} into {self.conv.id}; you are now in the copy", style="dim")

    def _search(self, arg: str) -> None:
        if not arg:
            raise ValueError("/search needs the words to look for")
        hits = self.store.search(arg, owner=self.settings.owner, limit=SEARCH_LIMIT)
        if not hits:
            self.output.line("No message matches.", style="dim")
            return
        print_hits(self.output, hits, owner=self.settings.owner)

    def _history(self, arg: str) -> None:
        if self.conv is None:
            self.output.line("Nothing stored yet.", style="dim")
            return
        try:
            count = int(arg) if arg else None
        except ValueError:
            raise ValueError(f"/history takes a number of messages, not {arg!r}") from None
        self.conv.refresh()
        self._show_messages(self.conv, count)

    def _retry(self, _arg: str) -> None:
        if self.conv is None:
            raise ValueError("nothing to retry yet")
        conv = self.conv
        self._stream(lambda: self.sender.stream_retry(conv, **self.params))

    def _show_messages(self, conv: Conversation, count: int | None) -> None:
        after = max(0, conv.message_count - count) if count else 0
        if after:
            earlier = plural(after, "earlier message", "earlier messages")
            self.output.line(f"... {earlier} (/history shows all)", style="dim")
        for message in conv.messages(after=after):
            self.output.message(message)

    def show_resumed(self) -> None:
        assert self.conv is not None
        title = f" \u201c{self.conv.title}\u201d" if self.conv.title else ""
        self.output.line(
            f"Resuming{title} ({self.conv.id}, {self.conv.message_count} messages)", style="bold"
        )
        self._show_messages(self.conv, RESUME_PREVIEW_MESSAGES)


_CHAT_DOC = f"""Chat interactively; replies stream as they arrive.

Without a conversation a new one starts (stored with your first message); with ID (or
--cid ID), or -c for the most recent one, the conversation resumes with its whole history
and its last few messages are shown. Ctrl-C stops a streaming reply (what arrived is kept,
marked incomplete); Ctrl-C twice or Ctrl-D exits.

\b
{CHAT_HELP}
"""


@main.command(help=_CHAT_DOC)
@click.argument("conversation_id", metavar="[ID]", required=False)
@conversation_options
@click.option(
    "-s", "--system", metavar="TEXT", help="A system message to start with (or to add, when resuming)."
)
@turn_options
@api_options
@pass_settings
def chat(
    settings: Settings,
    conversation_id: str | None,
    continue_latest: bool,
    cid: str | None,
    system: str | None,
    turn: TurnOptions,
) -> None:
    output = Output()
    settings.sender()  # a missing API key is reported before the first prompt
    conv = pick_conversation(
        settings, positional=conversation_id, cid=cid, continue_latest=continue_latest, required=False
    )
    if conv is not None:
        turn.switch_model(conv)
        if system:
            conv.append("system", system)
            system = None
    model = turn.model or DEFAULT_MODEL
    session = _Chat(settings, output, conv, model=model, system=system, params=turn.params)
    if conv is not None:
        session.show_resumed()
    else:
        output.line(f"Chatting with {model}. /help for commands, Ctrl-D to exit.", style="dim")
    session.run()
