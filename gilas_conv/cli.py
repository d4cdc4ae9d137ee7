"""The ``gilas-conv`` command line: chat, resume, inspect and move stored conversations.

Thin by design: each command parses its options, calls the library (ConversationStore,
Sender, build_context, ...) and prints. What it prints goes through
:mod:`gilas_conv._render`: rich on a terminal, the exact stored text when piped.

Errors reach the user through one funnel, :func:`error_message`: every error the library
raises on purpose (and ``ValueError`` for bad input) becomes one line on stderr saying what
happened and what to do, and the command exits with :data:`EXIT_ERROR`. Usage errors are
click's (:data:`EXIT_USAGE`). ``--debug`` lets the real exception and its traceback through
instead, and turns on the library's debug log.

Settings, by precedence: the global option, then its environment variable, then the named
default in :mod:`gilas_conv._config`. The API key is read only from ``$GILAS_API_KEY``:
a flag would leave it in shell history and process lists.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import __version__, _search_command, portable
from ._config import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    ENV_API_KEY,
    ENV_BASE_URL,
    ENV_DATABASE_URL,
    default_data_dir,
    resolve_database_url,
)
from ._render import Output, ReplyPrinter, content_text
from .exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ContextWindowExceeded,
    ConversationNotFound,
    GilasConvError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    SchemaOutOfDate,
    StreamInterrupted,
)
from .portable import parse_import
from .sender import DEFAULT_TIMEOUT, Sender
from .store import Conversation, ConversationStore, Message
from .store._engine import redact_url
from .store._migrate import upgrade_database
from .truncation import DEFAULT_REPLY_RESERVE, build_context, conversation_tokens

if TYPE_CHECKING:
    from .sender import ReplyStream

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "error_message",
    "main",
    "parse_import",
    "read_message",
    "token_report",
]

EXIT_ERROR = 1  # an API, store or runtime error: the one-line message says what to do
EXIT_USAGE = 2  # a bad command line (click's UsageError)
EXIT_INTERRUPTED = 130  # Ctrl-C outside chat (128 + SIGINT, as shells report it)

# What `chat` shows of a resumed conversation before the first prompt.
RESUME_PREVIEW_MESSAGES = 6
# Readline history of `chat`, in the user's data directory.
CHAT_HISTORY_FILENAME = "chat_history"
CHAT_HISTORY_LENGTH = 1000
PROMPT = "> "
CONTINUATION_PROMPT = "... "
BLOCK_QUOTE = '"""'
# A new conversation is titled after its first message, cut to this many characters.
TITLE_LENGTH = 60
# `tokens` lists the drift of this many most recent replies (all of them with --json).
DRIFT_ROWS = 10

_JSON_LINE = {"ensure_ascii": False, "separators": (",", ":")}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# ---------------------------------------------------------------------------------------------
# The error funnel


def error_message(
    err: BaseException,
    *,
    base_url: str | None = None,
    timeout: float | None = None,
    conversation_id: str | None = None,
) -> str:
    """The one line the user sees for ``err``: what happened, then what to do about it.

    ``conversation_id``, when known, is put in the `gilas-conv retry` hint of errors that
    leave the user's message stored but unanswered.
    """
    retry = f"`gilas-conv retry {conversation_id or 'ID'}`"
    if isinstance(err, ConversationNotFound):
        return f"{err}; `gilas-conv list` shows the conversations"
    if isinstance(err, StreamInterrupted):
        return f"{err}; {retry} asks for the reply again"
    if isinstance(err, SchemaOutOfDate | ContextWindowExceeded):
        return str(err)  # these messages already say what to do
    if isinstance(err, AuthenticationError):
        return f"the API refused the key ({err}); check {ENV_API_KEY}"
    if isinstance(err, PermissionDeniedError):
        return f"the API key may not do this ({err}); pick another model with -m or check the key's access"
    if isinstance(err, NotFoundError):
        where = base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
        return f"the API answered 404 ({err}); check the model name (-m) and the base URL ({where})"
    if isinstance(err, RateLimitError):
        return f"rate limited by the API ({err}); wait a moment, then {retry} answers the stored message"
    if isinstance(err, BadRequestError) and err.is_context_length_error:
        return f"the API says the prompt is too long ({err}); lower --context-limit or --max-tokens"
    if isinstance(err, InternalServerError):
        return f"the API failed ({err}); try again later with {retry}"
    if isinstance(err, APIStatusError):
        return f"the API refused the request ({err})"
    if isinstance(err, APITimeoutError):
        limit = f" within {timeout:g} s" if timeout else ""
        return f"{err}: no answer{limit}; raise --timeout, or try again with {retry}"
    if isinstance(err, APIConnectionError):
        return f"{err}; check the network and the base URL (--base-url or ${ENV_BASE_URL}), then {retry}"
    if isinstance(err, APIResponseValidationError):
        return f"{err}; is --base-url an OpenAI-compatible API (ending in /v1)?"
    if isinstance(err, APIError | GilasConvError | ValueError):
        return str(err)
    if isinstance(err, OSError):
        return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    return f"unexpected {type(err).__name__}: {err}; run again with --debug for the traceback and report it"


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """A library warning (e.g. an unknown model's assumed window) as one line on stderr."""
    click.echo(click.style("Warning: ", fg="yellow", bold=True) + str(message), err=True)


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(click.style("Error: ", fg="red", bold=True) + message, err=True)
    raise SystemExit(code)


class _FunnelGroup(click.Group):
    """Runs every command through :func:`error_message` unless ``--debug`` is on."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():  # restores showwarning afterwards
                if not ctx.params.get("debug"):  # the group's options are parsed by now
                    warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except BrokenPipeError:
            # The reader of a pipe went away (`gilas-conv export --all | head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            if _settings(ctx).debug:
                raise
            click.echo("\nInterrupted.", err=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except Exception as err:
            settings = _settings(ctx)
            if settings.debug:
                raise
            _fail(
                error_message(
                    err,
                    base_url=settings.base_url,
                    timeout=settings.timeout,
                    conversation_id=settings.conversation_id,
                )
            )


# ---------------------------------------------------------------------------------------------
# Settings shared by the commands


@dataclass
class _Settings:
    db: str | None
    base_url: str | None
    timeout: float | None
    debug: bool
    # The conversation a command is working on, for the retry hint of an error.
    conversation_id: str | None = None
    _store: ConversationStore | None = field(default=None, repr=False)
    _sender: Sender | None = field(default=None, repr=False)

    def store(self) -> ConversationStore:
        if self._store is None:
            self._store = ConversationStore(self.db)
            click.get_current_context().call_on_close(self._store.close)
        return self._store

    def sender(self) -> Sender:
        """The sender; raises MissingAPIKeyError before anything is stored."""
        if self._sender is None:
            options: dict[str, Any] = {"base_url": self.base_url}
            if self.timeout is not None:
                options["timeout"] = self.timeout
            self._sender = Sender(self.store(), **options)
            click.get_current_context().call_on_close(self._sender.close)
        return self._sender


def _settings(ctx: click.Context) -> _Settings:
    found = ctx.find_object(_Settings)
    return found if found is not None else _Settings(None, None, None, False)


pass_settings = click.make_pass_decorator(_Settings)


def _dumps(data: Any, *, pretty: bool = False) -> str:
    if pretty:
        return json.dumps(data, ensure_ascii=False, indent=2)
    return json.dumps(data, **_JSON_LINE)  # type: ignore[arg-type]


def _title_from(text: str) -> str | None:
    """A title for a new conversation: the first line of its first message, shortened."""
    for line in text.splitlines():
        words = " ".join(line.split())
        if words:
            return words if len(words) <= TITLE_LENGTH else words[: TITLE_LENGTH - 1].rstrip() + "…"
    return None


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _local_time(value: dt.datetime) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def _message_json(message: Message) -> dict[str, Any]:
    return {"seq": message.seq, **message.to_export()}


def _turn_params(model: str | None, max_tokens: int | None, context_limit: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if model:
        params["model"] = model
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if context_limit is not None:
        params["context_limit"] = context_limit
    return params


class _StreamStopped(Exception):
    """Ctrl-C stopped a streamed reply; ``message`` is what was stored of it (or None)."""

    def __init__(self, message: Message | None) -> None:
        super().__init__("stopped")
        self.message = message


def _print_stream(stream: ReplyStream, printer: ReplyPrinter | None) -> Message | None:
    """Print a streamed reply as it arrives; return the stored reply.

    Ctrl-C closes the stream, which stores what arrived as incomplete, and raises
    _StreamStopped. A stream cut off by the network raises StreamInterrupted (stored too).
    """
    try:
        for chunk in stream:
            if printer is not None:
                printer.feed(chunk.delta or chunk.refusal)
    except KeyboardInterrupt:
        if printer is not None:
            printer.finish()
        stream.close()
        raise _StreamStopped(stream.message) from None
    finally:
        if printer is not None:
            printer.finish()
    return stream.message


def _stopped_note(message: Message | None) -> str:
    if message is None:
        return "Stopped before any of the reply arrived; nothing of it is stored."
    received = len(content_text(message.content))
    return (
        f"Stopped: the {received} characters received are stored as message {message.seq}, marked incomplete."
    )


# ---------------------------------------------------------------------------------------------
# The group


@click.group(cls=_FunnelGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--db",
    metavar="URL",
    envvar=ENV_DATABASE_URL,
    show_envvar=True,
    help="Database URL (sqlite:///path.db or postgresql://user@host/db). "
    "Default: a SQLite file in your data directory.",
)
@click.option(
    "--base-url",
    metavar="URL",
    envvar=ENV_BASE_URL,
    show_envvar=True,
    help=f"OpenAI-compatible API base URL. Default: {DEFAULT_BASE_URL}",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds to wait for each phase of an API request (connect, each read). "
    f"Default: {DEFAULT_TIMEOUT:g}.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors, and debug logs.")
@click.version_option(__version__, "--version", prog_name="gilas-conv")
@click.pass_context
def main(
    ctx: click.Context, db: str | None, base_url: str | None, timeout: float | None, debug: bool
) -> None:
    """Chat with a Gilas (or any OpenAI-compatible) model and keep every conversation.

    Conversations are stored in SQLite (or Postgres) with their whole history; each turn
    sends as much of it as fits the model's window. The API key is read from the
    GILAS_API_KEY environment variable, never from a flag.

    Exit status: 0 on success, 1 when the API or the database failed (the message says what
    to do), 2 for a bad command line, 130 when interrupted.
    """
    ctx.obj = _Settings(db=db or None, base_url=base_url or None, timeout=timeout, debug=debug)
    if debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        library_logger = logging.getLogger("gilas_conv")
        library_logger.addHandler(handler)
        library_logger.setLevel(logging.DEBUG)
        ctx.call_on_close(lambda: library_logger.removeHandler(handler))


# ---------------------------------------------------------------------------------------------
# send, retry


_REPLY_OPTIONS = (
    click.option("--max-tokens", type=click.IntRange(min=1), metavar="N", help="Longest reply, in tokens."),
    click.option(
        "--context-limit",
        type=click.IntRange(min=1),
        metavar="N",
        help="Send at most N tokens of prompt and reply (default: the model's window).",
    ),
    click.option("--no-stream", is_flag=True, help="Wait for the whole reply instead of streaming it."),
    click.option("--json", "as_json", is_flag=True, help="Print the stored reply as one JSON object."),
)


def _reply_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options of every command that asks for a reply (send, retry)."""
    for option in reversed(_REPLY_OPTIONS):
        command = option(command)
    return command


@main.command()
@click.argument("text", nargs=-1, required=True)
@click.option("-c", "--conversation", "conversation_id", metavar="ID", help="Continue this conversation.")
@click.option(
    "-m", "--model", help=f"Model for this turn (a new conversation keeps it). Default: {DEFAULT_MODEL}."
)
@click.option("-s", "--system", metavar="TEXT", help="A system message, stored before TEXT.")
@_reply_options
@pass_settings
def send(
    settings: _Settings,
    text: tuple[str, ...],
    conversation_id: str | None,
    model: str | None,
    system: str | None,
    max_tokens: int | None,
    context_limit: int | None,
    no_stream: bool,
    as_json: bool,
) -> None:
    """Send one message and print the reply.

    TEXT is the message (several words are joined with spaces); - reads it from stdin.
    Without -c a new conversation is started and its id printed on stderr.

    --json prints nothing while the reply streams, then
    {"conversation_id": ..., "message": {...the stored reply...}, "usage": {...}}.
    """
    content = _read_text(text)
    output = Output()
    sender = settings.sender()
    store = settings.store()
    if conversation_id:
        conv = store.get(conversation_id)
    else:
        conv = store.create(model=model or DEFAULT_MODEL, title=_title_from(content))
        output.note(f"conversation {conv.id}")
    settings.conversation_id = conv.id
    if system:
        conv.append("system", system)
    params = _turn_params(model, max_tokens, context_limit)
    reply = _deliver(
        output,
        lambda: sender.send(conv.id, content, **params),
        lambda: sender.stream(conv.id, content, **params),
        stream=not no_stream,
        as_json=as_json,
    )
    if as_json:
        output.write_exact(_dumps(_reply_json(conv.id, reply)))


@main.command()
@click.argument("conversation_id", metavar="ID")
@click.option("-m", "--model", help="Model for this turn (default: the conversation's).")
@_reply_options
@pass_settings
def retry(
    settings: _Settings,
    conversation_id: str,
    model: str | None,
    max_tokens: int | None,
    context_limit: int | None,
    no_stream: bool,
    as_json: bool,
) -> None:
    """Answer the unanswered last message of a conversation.

    A message is left unanswered when a send fails after storing it (a timeout, a rate
    limit, a refused key); an interrupted, incomplete reply after it is skipped, and the new
    reply is stored after it.
    """
    output = Output()
    sender = settings.sender()
    conv = settings.store().get(conversation_id)
    settings.conversation_id = conv.id
    params = _turn_params(model, max_tokens, context_limit)
    reply = _deliver(
        output,
        lambda: sender.retry(conv.id, **params),
        lambda: sender.stream_retry(conv.id, **params),
        stream=not no_stream,
        as_json=as_json,
    )
    if as_json:
        output.write_exact(_dumps(_reply_json(conv.id, reply)))


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
    """Get one reply, printing it unless ``as_json``; Ctrl-C while it streams exits 130."""
    if not stream:
        reply = whole()
        if not as_json:
            output.reply(content_text(reply.content))
        return reply
    try:
        streamed_reply = _print_stream(streamed(), None if as_json else ReplyPrinter(output))
    except _StreamStopped as stopped:
        output.note(_stopped_note(stopped.message))
        raise SystemExit(EXIT_INTERRUPTED) from None
    if streamed_reply is None:  # the API ended the stream without a single chunk of content
        raise APIResponseValidationError("the API ended the stream without a reply", status_code=200)
    return streamed_reply


def _reply_json(conversation_id: str, reply: Message) -> dict[str, Any]:
    return {"conversation_id": conversation_id, "message": _message_json(reply), "usage": reply.usage}


# ---------------------------------------------------------------------------------------------
# list, show, export


@main.command("list")
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, metavar="N", help="Show at most N."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_settings
def list_(settings: _Settings, limit: int, as_json: bool) -> None:
    """List conversations, most recently active first."""
    conversations = settings.store().list(limit=limit)
    if as_json:
        click.echo(_dumps([_summary_json(conv) for conv in conversations], pretty=True))
        return
    output = Output()
    if not conversations:
        output.note("No conversations yet: start one with `gilas-conv chat` or `gilas-conv send TEXT`.")
        return
    rows = [
        [conv.id, _local_time(conv.updated_at), str(conv.message_count), conv.model, _describe(conv)]
        for conv in conversations
    ]
    output.table(["id", "updated", "messages", "model", "title"], rows)


def _describe(conv: Conversation) -> str:
    """The title, else the start of the first user message."""
    if conv.title:
        return conv.title
    for message in conv.messages(limit=5):
        if message.role == "user":
            return _title_from(content_text(message.content)) or ""
    return ""


def _summary_json(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "title": conv.title,
        "model": conv.model,
        "created_at": conv.created_at.isoformat(),
        "updated_at": conv.updated_at.isoformat(),
        "message_count": conv.message_count,
        "forked_from": conv.forked_from,
    }


@main.command()
@click.argument("conversation_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print it in the export format.")
@pass_settings
def show(settings: _Settings, conversation_id: str, as_json: bool) -> None:
    """Show a conversation, message by message.

    On a terminal replies are rendered as Markdown; piped, each message's text is printed
    exactly as stored, under a "[SEQ] ROLE" line.
    """
    conv = settings.store().get(conversation_id)
    if as_json:
        click.echo(_dumps(conv.export(), pretty=True))
        return
    output = Output()
    _print_header(output, conv)
    for message in conv.iter_messages():
        output.message(message)


def _print_header(output: Output, conv: Conversation) -> None:
    output.line(f"conversation {conv.id}", style="bold")
    if conv.title:
        output.line(f"title: {conv.title}")
    output.line(f"model: {conv.model}; {conv.message_count} messages; started {_local_time(conv.created_at)}")
    if conv.forked_from:
        output.line(f"forked from {conv.forked_from} at message {conv.forked_at}")
    output.line()


@main.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@click.option("--all", "export_all", is_flag=True, help="Every conversation (JSON Lines by default).")
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["json", "jsonl", "markdown"]),
    help="json (one object, indented; the default for one ID), jsonl (one line per conversation; "
    "the default for --all) or markdown (a readable document).",
)
@pass_settings
def export(
    settings: _Settings, conversation_id: str | None, export_all: bool, out_format: str | None
) -> None:
    """Print a conversation as JSON or Markdown, or all of them.

    The JSON format: {"id", "title", "model", "created_at", "updated_at", "metadata",
    "messages": [{"role", "content", "name"?, "tool_calls"?, "tool_call_id"?,
    "created_at", "status", "usage"?, "finish_reason"?, ...}]}. `gilas-conv import` reads it.
    Markdown gives a document: title, model, each message under its role and time.
    """
    if export_all == bool(conversation_id):
        raise click.UsageError("give a conversation ID or --all (not both)")
    out_format = out_format or ("jsonl" if export_all else "json")
    if export_all and out_format == "json":
        raise click.UsageError("--all prints jsonl or markdown")
    store = settings.store()
    if conversation_id:
        data = store.get(conversation_id).export()
        click.echo(_export_text(data, out_format), nl=False)
        return
    output = Output()
    total = store.count()
    conversations = store.list(limit=total) if total else []
    stdout = sys.stdout
    with output.progress("exporting", len(conversations)) as advance:
        for index, conv in enumerate(conversations):
            if out_format == "markdown" and index:
                stdout.write("\n")
            stdout.write(_export_text(conv.export(), out_format))
            advance()
    stdout.flush()


def _export_text(data: dict[str, Any], out_format: str) -> str:
    if out_format == "markdown":
        return portable.to_markdown(data)
    return _dumps(data, pretty=out_format == "json") + "\n"


# ---------------------------------------------------------------------------------------------
# import


@main.command("import")
@click.argument("file", type=click.File("rb"))
@click.option("-m", "--model", help="Store the conversations under this model (default: the file's).")
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["chatgpt", "openai-items", "gilas"]),
    help="Read FILE as this format (default: recognized by its content).",
)
@pass_settings
def import_(settings: _Settings, file: Any, model: str | None, file_format: str | None) -> None:
    """Import conversations from a file and print their new ids, one a line.

    FILE (- reads stdin) holds one conversation in the export format, JSON Lines of them
    (`export --all`), a plain OpenAI messages array, a ChatGPT data export
    (conversations.json, or the ZIP ChatGPT sends: the branch last seen of each
    conversation; images, files and tool output kept as placeholders; hidden messages
    skipped and reported), or OpenAI conversation items (the JSON of
    `client.conversations.items.list`, listed oldest first). Every conversation is checked
    before any is stored: a bad file is refused whole, naming the line, conversation or
    item and the reason. Importing a file twice makes new conversations each time.
    """
    try:
        found, converted = portable.load(file.read(), format=file_format or "auto")
    except ValueError as err:
        raise ValueError(f"{err}; nothing was imported") from None
    output = Output()
    store = settings.store()
    # Every conversation is checked before the one transaction that stores them all.
    with output.progress("importing", len(converted.conversations)) as advance:
        try:
            imported = store.import_conversations(
                converted.conversations, model=model, labels=converted.labels, progress=advance
            )
        except ValueError as err:
            raise ValueError(f"{err}; nothing was imported") from err
    for conv in imported:
        click.echo(conv.id)
    for where, reason in converted.skipped:
        output.note(f"skipped {where}: {reason}")
    output.note(
        f"imported {_plural(len(imported), 'conversation', 'conversations')} ({found} format)"
        + (f"; skipped {len(converted.skipped)} item(s), listed above" if converted.skipped else "")
    )


# ---------------------------------------------------------------------------------------------
# fork, rm


@main.command()
@click.argument("conversation_id", metavar="ID")
@click.option("--at", type=click.IntRange(min=0), metavar="SEQ", help="Copy messages 1..SEQ (default: all).")
@click.option("--title", help="Title of the copy (default: the original's).")
@pass_settings
def fork(settings: _Settings, conversation_id: str, at: int | None, title: str | None) -> None:
    """Copy a conversation into a new one and print its id.

    With --at SEQ only messages 1..SEQ are copied. The copy can then go its own way
    (`gilas-conv chat NEW_ID`); the original is untouched.
    """
    copy = settings.store().get(conversation_id).fork(at, title=title)
    click.echo(copy.id)


@main.command()
@click.argument("conversation_ids", metavar="ID...", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_settings
def rm(settings: _Settings, conversation_ids: tuple[str, ...], yes: bool) -> None:
    """Delete conversations and all their messages.

    Asks first, unless --yes; if any ID is unknown, nothing is deleted.
    """
    store = settings.store()
    conversations = [store.get(cid) for cid in conversation_ids]  # all exist, or nothing is deleted
    if not yes:
        for conv in conversations:
            click.echo(f"{conv.id}  {conv.message_count} messages  {_describe(conv)}", err=True)
        count = len(conversations)
        question = "Delete this conversation?" if count == 1 else f"Delete these {count} conversations?"
        try:
            confirmed = click.confirm(question, default=False, err=True)
        except click.Abort:  # end of input: no answer is a no
            confirmed = False
        if not sys.stdin.isatty():
            click.echo(err=True)  # the answer read from a pipe was not echoed
        if not confirmed:
            _fail("nothing was deleted (pass --yes to delete without asking)")
    for conv in conversations:
        store.delete(conv.id)
    Output().note(f"deleted {_plural(len(conversations), 'conversation', 'conversations')}")


# ---------------------------------------------------------------------------------------------
# tokens


def token_report(
    conv: Conversation,
    *,
    model: str | None = None,
    context_limit: int | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """The numbers `tokens` prints: the whole history, the window the next request would
    send, and how far our predicted prompt tokens were from those the API reported."""
    model = model or conv.model
    context = build_context(conv, model=model, context_limit=context_limit, max_tokens=max_tokens)
    drift = []
    for message in conv.iter_messages():
        reported = (message.usage or {}).get("prompt_tokens")
        if message.predicted_prompt_tokens is None or not isinstance(reported, int):
            continue
        drift.append(
            {
                "seq": message.seq,
                "predicted": message.predicted_prompt_tokens,
                "reported": reported,
                "error": reported - message.predicted_prompt_tokens,
            }
        )
    errors = [abs(row["error"]) for row in drift]
    return {
        "conversation_id": conv.id,
        "model": context.model,
        "encoding": context.encoding,
        "messages": conv.message_count,
        "history_tokens": conversation_tokens(conv, model=model),
        "window": {
            "context_limit": context.context_limit,
            "reserved_for_reply": context.reserved,
            "tools_tokens": context.tools_tokens,
            "available": context.available,
            "prompt_tokens": context.prompt_tokens,
            "free": context.free,
            "kept": len(context.seqs),
            "dropped": context.dropped,
        },
        "drift": {
            "replies": len(drift),
            "mean_abs_error": sum(errors) / len(errors) if errors else None,
            "max_abs_error": max(errors) if errors else None,
            "per_reply": drift,
        },
    }


def _token_lines(report: dict[str, Any], *, drift_rows: int | None = DRIFT_ROWS) -> Iterator[str]:
    window, drift = report["window"], report["drift"]
    yield f"model {report['model']} ({report['encoding']}), {report['messages']} messages"
    yield f"full history      {report['history_tokens']:>9,} tokens"
    yield (
        f"next request      {window['prompt_tokens']:>9,} prompt tokens: {window['kept']} messages kept, "
        f"{window['dropped']} dropped"
    )
    yield (
        f"window            {window['context_limit']:>9,} = {window['available']:,} for the prompt"
        f" + {window['reserved_for_reply']:,} reserved for the reply"
        + (f" + {window['tools_tokens']:,} for tools" if window["tools_tokens"] else "")
        + " + priming"
    )
    if not drift["replies"]:
        yield "drift             no reply with both a predicted and a reported prompt count yet"
        return
    yield (
        f"drift             {_plural(drift['replies'], 'reply', 'replies')}: mean |reported - predicted| "
        f"{drift['mean_abs_error']:.1f}, max {drift['max_abs_error']}"
    )
    rows = drift["per_reply"]
    if drift_rows == 0:
        return
    if drift_rows is not None and len(rows) > drift_rows:
        yield f"  (the last {drift_rows}; --json lists all {len(rows)})"
        rows = rows[-drift_rows:]
    yield "  seq  predicted  reported  error"
    for row in rows:
        yield f"  {row['seq']:>3}  {row['predicted']:>9}  {row['reported']:>8}  {row['error']:>+5}"


@main.command()
@click.argument("conversation_id", metavar="ID")
@click.option("-m", "--model", help="Count for this model (default: the conversation's).")
@click.option(
    "--context-limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="The window to fit (default: the model's).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    metavar="N",
    help=f"Tokens reserved for the reply (default: {DEFAULT_REPLY_RESERVE}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_settings
def tokens(
    settings: _Settings,
    conversation_id: str,
    model: str | None,
    context_limit: int | None,
    max_tokens: int | None,
    as_json: bool,
) -> None:
    """Show the token budget of a conversation.

    The full history's tokens; the window the next request would send (prompt tokens,
    the room reserved for the reply, messages kept and dropped); and the drift between the
    prompt tokens predicted before each past reply and those the API reported.
    """
    conv = settings.store().get(conversation_id)
    report = token_report(conv, model=model, context_limit=context_limit, max_tokens=max_tokens)
    if as_json:
        click.echo(_dumps(report, pretty=True))
        return
    output = Output()
    for line in _token_lines(report):
        output.line(line)


# ---------------------------------------------------------------------------------------------
# db


@main.group()
def db() -> None:
    """Manage the database schema."""


@db.command()
@pass_settings
def upgrade(settings: _Settings) -> None:
    """Create or upgrade the database schema (safe to repeat).

    Needed once for Postgres, and after upgrading gilas-conv; SQLite files are upgraded
    automatically.
    """
    url, _embedded = resolve_database_url(settings.db)
    revision = upgrade_database(url)
    click.echo(f"{redact_url(url)}: schema at revision {revision} (up to date)")


# ---------------------------------------------------------------------------------------------
# chat


CHAT_HELP = """\
Commands:
  /help           this list
  /new            start a new conversation
  /model [NAME]   show or switch the model (kept for this conversation)
  /system TEXT    add a system message (instructions sent with every later turn)
  /tokens         the token budget of the next turn
  /fork [SEQ]     continue in a copy of this conversation (up to message SEQ)
  /history [N]    show the last N messages (default: all)
  /retry          answer the last message again (after an error)
  /exit           leave (also Ctrl-D, or Ctrl-C twice)
Input:
  End a line with \\ to continue on the next line; a line starting with \"\"\" opens a
  block that ends at a line ending with \"\"\". Start a message with a space to send text
  beginning with "/". Ctrl-C stops a reply while it streams; what arrived is kept."""

SLASH_COMMANDS = ("/help", "/new", "/model", "/system", "/tokens", "/fork", "/history", "/retry", "/exit")


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
        settings: _Settings,
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
                model=self.model, system=self.system, title=_title_from(first_text or "")
            )
            self.output.line(f"conversation {self.conv.id}", style="dim")
        return self.conv

    def turn(self, text: str) -> bool:
        """Send one message and stream the reply; True when Ctrl-C stopped it."""
        conv = self._ensure_conversation(text)
        return self._stream(lambda: self.sender.stream(conv.id, text, **self.params))

    def _stream(self, start: Callable[[], ReplyStream]) -> bool:
        printer = ReplyPrinter(self.output)
        try:
            _print_stream(start(), printer)
        except _StreamStopped as stopped:
            self.output.line(_stopped_note(stopped.message), style="dim")
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
        self.params.pop("model", None)
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
        self.conv.refresh()  # the sender appended through its own handle
        report = token_report(
            self.conv,
            model=self.params.get("model"),
            context_limit=self.params.get("context_limit"),
            max_tokens=self.params.get("max_tokens"),
        )
        for line in _token_lines(report, drift_rows=0):
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
        self._stream(lambda: self.sender.stream_retry(conv.id, **self.params))

    def _show_messages(self, conv: Conversation, count: int | None) -> None:
        after = max(0, conv.message_count - count) if count else 0
        if after:
            earlier = _plural(after, "earlier message", "earlier messages")
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


@main.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@click.option(
    "-c", "--continue", "continue_latest", is_flag=True, help="Resume the most recent conversation."
)
@click.option(
    "-m", "--model", help=f"Model to chat with (default: the conversation's, else {DEFAULT_MODEL})."
)
@click.option(
    "-s", "--system", metavar="TEXT", help="A system message to start with (or to add, when resuming)."
)
@click.option("--max-tokens", type=click.IntRange(min=1), metavar="N", help="Longest reply, in tokens.")
@click.option(
    "--context-limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="Send at most N tokens of prompt and reply (default: the model's window).",
)
@pass_settings
def chat(
    settings: _Settings,
    conversation_id: str | None,
    continue_latest: bool,
    model: str | None,
    system: str | None,
    max_tokens: int | None,
    context_limit: int | None,
) -> None:
    """Chat interactively; replies stream as they arrive.

    Without ID a new conversation starts (stored with your first message); with ID, or -c
    for the latest, the conversation resumes with its whole history and its last few
    messages are shown. Type /help for the commands (/new, /model, /system, /tokens, /fork,
    /history, /exit). Ctrl-C stops a streaming reply (what arrived is kept, marked
    incomplete); Ctrl-C twice or Ctrl-D exits.
    """
    if conversation_id and continue_latest:
        raise click.UsageError("give an ID or -c/--continue, not both")
    output = Output()
    settings.sender()  # a missing API key is reported before the first prompt
    store = settings.store()
    conv = None
    if conversation_id:
        conv = store.get(conversation_id)
    elif continue_latest:
        conv = store.latest()
        if conv is None:
            raise ValueError("there is no conversation to continue; start one with `gilas-conv chat`")
    if conv is not None:
        if model and model != conv.model:
            conv.update(model=model)
        if system:
            conv.append("system", system)
            system = None
    session = _Chat(
        settings,
        output,
        conv,
        model=model or DEFAULT_MODEL,
        system=system,
        params=_turn_params(None, max_tokens, context_limit),
    )
    if conv is not None:
        session.show_resumed()
    else:
        output.line(
            f"Chatting with {model or DEFAULT_MODEL}. /help for commands, Ctrl-D to exit.", style="dim"
        )
    session.run()


main.add_command(_search_command.search)
