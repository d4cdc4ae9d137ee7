"""``send`` and ``retry``: one turn each, streamed or whole; and how a streamed reply is
printed and stopped (shared with the chat REPL).

A streamed reply can be stopped by Ctrl-C, SIGTERM (a stopped service) or SIGHUP (a closed
terminal): all three take the same path. The stream is closed, which stores what arrived
as one reply marked ``incomplete``; while that is stored further signals wait, so two quick
Ctrl-C still store the partial reply and end with status 130 (129 for SIGHUP, 143 for
SIGTERM: 128 plus the signal number, as shells report it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from .._config import DEFAULT_MODEL
from ..exceptions import APIResponseValidationError
from ..store import Conversation, Message
from ._app import (
    DEFAULT_POLICY,
    POLICY_CHOICES,
    Settings,
    Signalled,
    api_options,
    conversation_options,
    dumps,
    main,
    message_json,
    pass_settings,
    pick_conversation,
    title_from,
)
from ._render import Output, ReplyPrinter, content_text

if TYPE_CHECKING:
    from ..sender import ReplyStream

__all__ = ["StreamStopped", "TurnOptions", "parse_options", "print_stream", "stopped_note", "turn_options"]

# Signals that stop a streaming reply the way Ctrl-C does (SIGHUP does not exist on Windows).
STOP_SIGNALS = tuple(
    sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if sig is not None
)
# Options -o may not set: each has its own flag, or the sender builds it.
_OPTIONS_WITH_A_FLAG = {"model": "-m", "max_tokens": "--max-tokens", "context_limit": "--context-limit"}


# ---------------------------------------------------------------------------------------------
# Printing a streamed reply, and stopping it


class StreamStopped(Exception):
    """A signal stopped a streamed reply; ``message`` is what was stored of it (or None)."""

    def __init__(self, message: Message | None, signum: int) -> None:
        super().__init__("stopped")
        self.message = message
        self.signum = signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_stop_the_reply() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Signalled` (a KeyboardInterrupt), like Ctrl-C."""
    if not _in_main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise Signalled(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_wait() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP are ignored meanwhile: the partial reply is being stored,
    and a second Ctrl-C must not lose it (the command exits right after anyway)."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """From now on Ctrl-C, SIGTERM and SIGHUP are ignored: the process is on its way out."""
    if _in_main_thread():
        for sig in (signal.SIGINT, *STOP_SIGNALS):
            signal.signal(sig, signal.SIG_IGN)


def print_stream(stream: ReplyStream, printer: ReplyPrinter | None) -> Message | None:
    """Print a streamed reply as it arrives; return the stored reply.

    Ctrl-C, SIGTERM or SIGHUP close the stream, which stores what arrived as incomplete, and
    raise :class:`StreamStopped`. A stream cut off by the network raises StreamInterrupted
    (stored too).
    """
    try:
        with _signals_stop_the_reply():
            for chunk in stream:
                if printer is not None:
                    printer.feed(chunk.delta or chunk.refusal)
    except KeyboardInterrupt as stop:
        # Stored first: after a hang-up, writing to the terminal may fail.
        with _signals_wait():
            stream.close()
        raise StreamStopped(stream.message, getattr(stop, "signum", signal.SIGINT)) from None
    except BaseException:
        # Anything else that ends the loop early (an output error): what arrived is stored
        # all the same (an unclosed stream is only warned about, never stored, when collected).
        stream.close()
        raise
    finally:
        if printer is not None:
            with contextlib.suppress(OSError):
                printer.finish()
    return stream.message


def stopped_note(message: Message | None) -> str:
    if message is None:
        return "Stopped before any of the reply arrived; nothing of it is stored."
    received = len(content_text(message.content))
    return (
        f"Stopped: the {received} characters received are stored as message {message.seq}, marked incomplete."
    )


# ---------------------------------------------------------------------------------------------
# Options of every command that asks for a reply (send, retry, chat)


def parse_options(pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """``-o KEY VALUE`` pairs as request parameters: VALUE parsed as JSON when it parses
    (``0.2``, ``true``, ``["a"]``), else taken as a string; a later KEY wins."""
    params: dict[str, Any] = {}
    for key, raw in pairs:
        if key in _OPTIONS_WITH_A_FLAG:
            raise click.UsageError(f"use {_OPTIONS_WITH_A_FLAG[key]} rather than -o {key}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


_TURN_OPTIONS = (
    click.option(
        "-m",
        "--model",
        help="The conversation's model from now on (this turn and later ones). "
        f"Default: the conversation's; a new one gets {DEFAULT_MODEL}.",
    ),
    click.option("--max-tokens", type=click.IntRange(min=1), metavar="N", help="Longest reply, in tokens."),
    click.option(
        "--context-limit",
        type=click.IntRange(min=1),
        metavar="N",
        help="Send at most N tokens of prompt and reply (default: the model's window).",
    ),
    click.option(
        "--policy",
        type=click.Choice(POLICY_CHOICES),
        help="When the history does not fit: truncate drops the oldest turns, summarize sends a "
        f"stored summary of them instead (one more API request). Default: {DEFAULT_POLICY}.",
    ),
    click.option(
        "-o",
        "--option",
        "options",
        type=(str, str),
        multiple=True,
        metavar="KEY VALUE",
        help="An extra API parameter, e.g. -o temperature 0.2 (repeatable; VALUE is read as JSON "
        "when it parses, else as a string).",
    ),
)


@dataclass(frozen=True)
class TurnOptions:
    """What ``-m``, ``--max-tokens``, ``--context-limit``, ``--policy`` and ``-o`` ask of a turn."""

    model: str | None  # -m: the conversation's model from now on (None: keep it)
    params: dict[str, Any]  # the keyword arguments of a sender call

    @classmethod
    def from_flags(
        cls,
        *,
        model: str | None,
        max_tokens: int | None,
        context_limit: int | None,
        policy: str | None,
        options: tuple[tuple[str, str], ...],
    ) -> TurnOptions:
        params = parse_options(options)
        for key, value in (("max_tokens", max_tokens), ("context_limit", context_limit), ("policy", policy)):
            if value is not None:
                params[key] = value
        return cls(model, params)

    def switch_model(self, conv: Conversation) -> None:
        """``-m``: the conversation's model from now on."""
        if self.model and self.model != conv.model:
            conv.update(model=self.model)


def turn_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a command that asks for a reply, given to it as one ``turn``
    (:class:`TurnOptions`) argument."""

    @functools.wraps(command)
    def run(
        *args: Any,
        model: str | None,
        max_tokens: int | None,
        context_limit: int | None,
        policy: str | None,
        options: tuple[tuple[str, str], ...],
        **kwargs: Any,
    ) -> Any:
        turn = TurnOptions.from_flags(
            model=model, max_tokens=max_tokens, context_limit=context_limit, policy=policy, options=options
        )
        return command(*args, turn=turn, **kwargs)

    # The options the command's own decorators declared so far, in a list of run's own.
    run.__click_params__ = list(getattr(command, "__click_params__", []))  # type: ignore[attr-defined]
    for option in reversed(_TURN_OPTIONS):
        run = option(run)
    return run


_OUTPUT_OPTIONS = (
    click.option("--no-stream", is_flag=True, help="Wait for the whole reply instead of streaming it."),
    click.option("--json", "as_json", is_flag=True, help="Print the stored reply as one JSON object."),
)


def _output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_OUTPUT_OPTIONS):
        command = option(command)
    return command


# ---------------------------------------------------------------------------------------------
# send, retry


@main.command()
@click.argument("text", nargs=-1, required=True)
@conversation_options
@click.option("-s", "--system", metavar="TEXT", help="A system message, stored before TEXT.")
@turn_options
@_output_options
@api_options
@pass_settings
def send(
    settings: Settings,
    text: tuple[str, ...],
    continue_latest: bool,
    cid: str | None,
    system: str | None,
    turn: TurnOptions,
    no_stream: bool,
    as_json: bool,
) -> None:
    """Send one message and print the reply.

    TEXT is the message (several words are joined with spaces); - reads it from stdin.
    With -c the most recent conversation goes on, with --cid ID that one; otherwise a new
    conversation is started and its id printed on stderr.

    --json prints nothing while the reply streams, then
    {"conversation_id": ..., "message": {...the stored reply...}, "usage": {...}}.
    """
    content = _read_text(text)
    output = Output()
    sender = settings.sender()
    conv = pick_conversation(settings, cid=cid, continue_latest=continue_latest, required=False)
    if conv is None:
        conv = settings.store().create(
            model=turn.model or DEFAULT_MODEL, title=title_from(content), owner=settings.owner
        )
        settings.conversation_id = conv.id
        output.note(f"conversation {conv.id}")
    else:
        turn.switch_model(conv)
    if system:
        conv.append("system", system)
    reply = _deliver(
        output,
        lambda: sender.send(conv, content, **turn.params),
        lambda: sender.stream(conv, content, **turn.params),
        stream=not no_stream,
        as_json=as_json,
    )
    if as_json:
        output.json(dumps(_reply_json(conv.id, reply)))


@main.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@conversation_options
@turn_options
@_output_options
@api_options
@pass_settings
def retry(
    settings: Settings,
    conversation_id: str | None,
    continue_latest: bool,
    cid: str | None,
    turn: TurnOptions,
    no_stream: bool,
    as_json: bool,
) -> None:
    """Answer the unanswered last message of a conversation.

    The conversation is ID, --cid ID, or -c for the most recent one. A message is left
    unanswered when a send fails after storing it (a timeout, a rate limit, a refused key);
    an interrupted, incomplete reply after it is skipped, and the new reply is stored after
    it.
    """
    output = Output()
    sender = settings.sender()
    conv = pick_conversation(settings, positional=conversation_id, cid=cid, continue_latest=continue_latest)
    assert conv is not None
    turn.switch_model(conv)
    reply = _deliver(
        output,
        lambda: sender.retry(conv, **turn.params),
        lambda: sender.stream_retry(conv, **turn.params),
        stream=not no_stream,
        as_json=as_json,
    )
    if as_json:
        output.json(dumps(_reply_json(conv.id, reply)))


def _read_text(words: tuple[str, ...]) -> str:
    if words == ("-",):
        content = sys.stdin.read()
        if not content.strip():
            raise click.UsageError("TEXT is -, but stdin is empty")
        return content
    content = " ".join(words)
    if not content.strip():
        raise click.UsageError("TEXT is empty")
    return content


def _deliver(
    output: Output,
    whole: Callable[[], Message],
    streamed: Callable[[], ReplyStream],
    *,
    stream: bool,
    as_json: bool,
) -> Message:
    """Get one reply, printing it unless ``as_json``; a signal while it streams ends the
    command with 128 + its number, after storing what arrived."""
    if not stream:
        reply = whole()
        if not as_json:
            output.reply(content_text(reply.content))
        return reply
    try:
        streamed_reply = print_stream(streamed(), None if as_json else ReplyPrinter(output))
    except StreamStopped as stopped:
        # The command is ending: a further Ctrl-C must not interrupt closing the database.
        ignore_stop_signals()
        with contextlib.suppress(OSError):
            output.note(stopped_note(stopped.message))
        raise SystemExit(128 + stopped.signum) from None
    if streamed_reply is None:  # the API ended the stream without a single chunk of content
        raise APIResponseValidationError("the API ended the stream without a reply", status_code=200)
    return streamed_reply


def _reply_json(conversation_id: str, reply: Message) -> dict[str, Any]:
    return {"conversation_id": conversation_id, "message": message_json(reply), "usage": reply.usage}
