"""The command group, its settings and its error funnel; helpers every command shares.

Errors reach the user through one funnel, :func:`error_message`: every error the library
raises on purpose (and ``ValueError`` for bad input) becomes one line on stderr saying what
happened and what to do, and the command exits with :data:`EXIT_ERROR`. A multi-line
message (some servers send them) is folded to one line, and control characters in it are
shown visibly (see :func:`gilas_conv.cli._render.visible`). Usage errors are click's
(:data:`EXIT_USAGE`). ``--debug`` lets the real exception and its traceback through
instead, whole, and turns on the library's debug log.

Settings, by precedence: the option, then its environment variable, then the named default
in :mod:`gilas_conv._config`. The global options (:data:`GLOBAL_OPTIONS`) are accepted
before the command (``gilas-conv --db URL list``) and after it (``gilas-conv list --db
URL``); given in both places, the one after the command wins. The API key is read only from
``$GILAS_API_KEY``: a flag would leave it in shell history and process lists.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from .._config import (
    DEFAULT_BASE_URL,
    ENV_API_KEY,
    ENV_BASE_URL,
    ENV_DATABASE_URL,
    check_cli_database_url,
    redact_url,
    resolve_database_url,
)
from .._version import __version__
from ..exceptions import (
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
    QuotaExceeded,
    RateLimitError,
    SchemaOutOfDate,
    StreamInterrupted,
)
from ..sender import DEFAULT_DEADLINE, DEFAULT_TIMEOUT, RetryDecision, Sender
from ..store import Conversation, ConversationStore, Message
from ._render import visible

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_QUOTA",
    "EXIT_USAGE",
    "GLOBAL_OPTIONS",
    "error_message",
    "fold_line",
    "main",
]

EXIT_ERROR = 1  # an API, store or runtime error: the one-line message says what to do
EXIT_USAGE = 2  # a bad command line (click's UsageError)
EXIT_INTERRUPTED = 130  # Ctrl-C outside chat (128 + SIGINT, as shells report it)
EXIT_QUOTA = 3  # the owner's quota refused the request: nothing was sent or stored

# A new conversation is titled after its first message, cut to this many characters.
TITLE_LENGTH = 60
# The policy a turn uses unless --policy says otherwise: the sender's own default.
DEFAULT_POLICY: str = inspect.signature(Sender).parameters["policy"].default
POLICY_CHOICES = ("truncate", "summarize")

GLOBAL_OPTIONS = ("--db", "--base-url", "--timeout", "--deadline", "--owner", "--debug")

_JSON_LINE = {"ensure_ascii": False, "separators": (",", ":")}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# ---------------------------------------------------------------------------------------------
# The error funnel

_LINE_BREAKS = re.compile(r"[ \t]*[\r\n\v\f\u0085\u2028\u2029]+[ \t]*")


def fold_line(text: str) -> str:
    """``text`` on one line: each run of line breaks (and the blanks around it) becomes one
    space, and any other control character is shown visibly (``ESC`` as ``^[``)."""
    return visible(_LINE_BREAKS.sub(" ", text.strip()))


def error_message(
    err: BaseException,
    *,
    base_url: str | None = None,
    timeout: float | None = None,
    conversation_id: str | None = None,
    owner: str | None = None,
) -> str:
    """The one line the user sees for ``err``: what happened, then what to do about it.

    ``conversation_id`` (and ``owner``), when known, are put in the `gilas-conv retry` hint
    of errors that leave the user's message stored but unanswered. The result is one line:
    a multi-line server message is folded (:func:`fold_line`).
    """
    return fold_line(
        _error_message(err, base_url=base_url, timeout=timeout, conversation_id=conversation_id, owner=owner)
    )


def _error_message(
    err: BaseException,
    *,
    base_url: str | None,
    timeout: float | None,
    conversation_id: str | None,
    owner: str | None,
) -> str:
    owned = f" --owner {owner}" if owner else ""
    retry = f"`gilas-conv retry {conversation_id or 'ID'}{owned}`"
    if isinstance(err, ConversationNotFound):
        return f"{err}; `gilas-conv list{owned}` shows the conversations"
    if isinstance(err, StreamInterrupted):
        cause = err.__cause__
        if isinstance(cause, APITimeoutError) and cause.deadline is not None:
            return f"{err} after {cause.deadline:g} s; raise --deadline, or {retry} asks for the rest again"
        return f"{err}; {retry} asks for the reply again"
    if isinstance(err, SchemaOutOfDate | ContextWindowExceeded):
        return str(err)  # these messages already say what to do
    if isinstance(err, AuthenticationError):
        return f"the API refused the key ({err}); check {ENV_API_KEY}"
    if isinstance(err, PermissionDeniedError):
        return f"the API key may not do this ({err}); pick another model with -m or check the key's access"
    if isinstance(err, NotFoundError):
        where = base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
        return (
            f"the API answered 404 ({err}); check the model name (-m) and the base URL ({redact_url(where)})"
        )
    if isinstance(err, RateLimitError):
        return f"rate limited by the API ({err}); wait a moment, then {retry} answers the stored message"
    if isinstance(err, BadRequestError) and err.is_context_length_error:
        return f"the API says the prompt is too long ({err}); lower --context-limit or --max-tokens"
    if isinstance(err, InternalServerError):
        return f"the API failed ({err}); try again later with {retry}"
    if isinstance(err, APIStatusError):
        return f"the API refused the request ({err})"
    if isinstance(err, APITimeoutError) and err.deadline is not None:
        return f"{err}; raise --deadline, or try again with {retry}"
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
    if type(err).__module__.startswith("sqlalchemy"):
        # A backstop: the store translates database errors, but should one slip through,
        # SQLAlchemy's text would show the SQL and every bound parameter.
        cause = getattr(err, "orig", None) or err.__cause__
        detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
        return f"database error ({type(err).__name__}{': ' + detail if detail else ''})"
    return f"unexpected {type(err).__name__}: {err}; run again with --debug for the traceback and report it"


def _say_waiting(decision: RetryDecision) -> None:
    """Tell the terminal user that a retry is coming, and when: the wait may be long."""
    asked = f"; the server asked for {decision.server_asked:g} s" if decision.server_asked is not None else ""
    click.echo(
        click.style("Waiting: ", fg="yellow", bold=True)
        + f"retry {decision.number} of {decision.max_retries} in {decision.delay:.3g} s{asked}",
        err=True,
    )


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``Error: message`` (one line) on stderr and exit with ``code``."""
    click.echo(click.style("Error: ", fg="red", bold=True) + fold_line(message), err=True)
    raise SystemExit(code)


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while a reply streamed: handled as Ctrl-C is (what arrived
    is stored, marked incomplete), then the command exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class _FunnelGroup(click.Group):
    """Runs every command through :func:`error_message` unless ``--debug`` is on."""

    def invoke(self, ctx: click.Context) -> Any:
        original = warnings.showwarning

        def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            # Decided per warning: --debug may come after the command, parsed after this.
            if _settings(ctx).debug:
                original(message, category, *args, **kwargs)
            else:
                text = fold_line(str(message))
                click.echo(click.style("Warning: ", fg="yellow", bold=True) + text, err=True)

        try:
            with warnings.catch_warnings():  # restores showwarning afterwards
                warnings.showwarning = show_warning
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except BrokenPipeError:
            # The reader of a pipe went away (`gilas-conv export --all | head`): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(EXIT_ERROR) from None
        except KeyboardInterrupt as interrupt:
            if _settings(ctx).debug:
                raise
            with contextlib.suppress(OSError):
                click.echo("\nInterrupted.", err=True)
            raise SystemExit(128 + getattr(interrupt, "signum", EXIT_INTERRUPTED - 128)) from None
        except Exception as err:
            settings = _settings(ctx)
            if settings.debug:
                raise
            fail(
                error_message(
                    err,
                    base_url=settings.base_url,
                    timeout=settings.timeout,
                    conversation_id=settings.conversation_id,
                    owner=settings.owner,
                ),
                EXIT_QUOTA if isinstance(err, QuotaExceeded) else EXIT_ERROR,
            )


# ---------------------------------------------------------------------------------------------
# Settings shared by the commands


@dataclass
class Settings:
    db: str | None = None
    base_url: str | None = None
    timeout: float | None = None
    deadline: float | None = None
    debug: bool = False
    owner: str | None = None
    # The conversation a command is working on, for the retry hint of an error.
    conversation_id: str | None = None
    _store: ConversationStore | None = field(default=None, repr=False)
    _sender: Sender | None = field(default=None, repr=False)
    _debug_handler: logging.Handler | None = field(default=None, repr=False)

    def database_url(self) -> str:
        url, _embedded = resolve_database_url(self.db)
        check_cli_database_url(url)
        return url

    def store(self) -> ConversationStore:
        if self._store is None:
            self._store = ConversationStore(self.database_url())
            click.get_current_context().call_on_close(self._store.close)
        return self._store

    def sender(self) -> Sender:
        """The sender; raises MissingAPIKeyError before anything is stored."""
        if self._sender is None:
            options: dict[str, Any] = {"base_url": self.base_url}
            if self.timeout is not None:
                options["timeout"] = self.timeout
            if self.deadline is not None:
                options["deadline"] = self.deadline
            self._sender = Sender(self.store(), on_retry=_say_waiting, **options)
            click.get_current_context().call_on_close(self._sender.close)
        return self._sender

    def enable_debug(self) -> None:
        self.debug = True
        if self._debug_handler is not None:
            return
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        library_logger = logging.getLogger("gilas_conv")
        library_logger.addHandler(handler)
        library_logger.setLevel(logging.DEBUG)
        self._debug_handler = handler
        click.get_current_context().find_root().call_on_close(lambda: library_logger.removeHandler(handler))

    def get(self, conversation_id: str) -> Conversation:
        """The conversation with this id, of ``--owner`` (ConversationNotFound otherwise)."""
        conv = self.store().get(conversation_id, owner=self.owner)
        self.conversation_id = conv.id
        return conv

    def latest(self) -> Conversation:
        """The most recently active conversation of ``--owner``; ValueError when there is none."""
        conv = self.store().latest(owner=self.owner)
        if conv is None:
            owned = f" of owner {self.owner!r}" if self.owner else ""
            raise ValueError(f"there is no conversation{owned} to continue; start one with `gilas-conv chat`")
        self.conversation_id = conv.id
        return conv


def _settings(ctx: click.Context) -> Settings:
    found = ctx.find_object(Settings)
    return found if found is not None else Settings()


pass_settings = click.make_pass_decorator(Settings)


# ---------------------------------------------------------------------------------------------
# Global options: one definition, accepted before and after the command


class _GlobalOption:
    """A global option, by its flag; the setting it fills is named after it (``--base-url``:
    ``base_url``)."""

    def __init__(self, flag: str, help: str, **kwargs: Any) -> None:
        self.flag = flag
        self.name = flag.removeprefix("--").replace("-", "_")
        self.help = help
        self.kwargs = kwargs

    def on_group(self) -> Callable[..., Any]:
        return click.option(self.flag, self.name, help=self.help, **self.kwargs)

    def on_command(self) -> Callable[..., Any]:
        # No envvar here: the group reads it, and an unset option must not overwrite the
        # value given before the command.
        kwargs = {k: v for k, v in self.kwargs.items() if k not in ("envvar", "show_envvar")}
        return click.option(self.flag, help=self.help, expose_value=False, callback=self._late, **kwargs)

    def _late(self, ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is None or value is False:
            return
        settings = ctx.find_object(Settings)
        if settings is None:
            return
        if self.name == "debug":
            settings.enable_debug()
        else:
            setattr(settings, self.name, value or None)


_SECONDS = click.FloatRange(min=0, min_open=True)

_DB = _GlobalOption(
    "--db",
    "Database URL (sqlite:///path.db or postgresql://user@host/db). "
    "Default: a SQLite file in your data directory.",
    metavar="URL",
    envvar=ENV_DATABASE_URL,
    show_envvar=True,
)
_BASE_URL = _GlobalOption(
    "--base-url",
    f"OpenAI-compatible API base URL. Default: {DEFAULT_BASE_URL}",
    metavar="URL",
    envvar=ENV_BASE_URL,
    show_envvar=True,
)
_TIMEOUT = _GlobalOption(
    "--timeout",
    f"Seconds to wait for each phase of an API request (connect, each read). Default: {DEFAULT_TIMEOUT:g}.",
    type=_SECONDS,
    metavar="SECONDS",
)
_DEADLINE = _GlobalOption(
    "--deadline",
    "Seconds a whole reply may take, retries and their waits included "
    f"(a stream is cut there and what arrived is kept). Default: {DEFAULT_DEADLINE:g}.",
    type=_SECONDS,
    metavar="SECONDS",
)
_OWNER = _GlobalOption(
    "--owner",
    "Work on this owner's conversations (created with it, found only with it). "
    "Default: the conversations that have no owner.",
    metavar="NAME",
)
_DEBUG = _GlobalOption(
    "--debug",
    "Show tracebacks and whole error messages instead of one-line errors, and debug logs.",
    is_flag=True,
)


def _apply(command: Callable[..., Any], options: tuple[_GlobalOption, ...]) -> Callable[..., Any]:
    for option in reversed(options):
        command = option.on_command()(command)
    return command


def store_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The global options of a command that uses the database but not the API."""
    return _apply(command, (_DB, _DEBUG))


def owner_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The global options of a command that reads or writes conversations."""
    return _apply(command, (_DB, _OWNER, _DEBUG))


def api_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The global options of a command that asks the API for a reply."""
    return _apply(command, (_DB, _BASE_URL, _TIMEOUT, _DEADLINE, _OWNER, _DEBUG))


# ---------------------------------------------------------------------------------------------
# Picking a conversation: ID, --cid ID, or -c for the latest


def conversation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``-c/--continue`` (the most recent conversation) and ``--cid/--conversation ID``."""
    command = click.option(
        "--cid",
        "--conversation",
        "cid",
        metavar="ID",
        help="The conversation to use, by id.",
    )(command)
    return click.option(
        "-c",
        "--continue",
        "continue_latest",
        is_flag=True,
        help="Use the most recently active conversation.",
    )(command)


def pick_conversation(
    settings: Settings,
    *,
    cid: str | None,
    continue_latest: bool,
    positional: str | None = None,
    required: bool = True,
) -> Conversation | None:
    """The conversation named by ID, ``--cid`` or ``-c`` (at most one of them)."""
    given = [name for name, value in (("ID", positional), ("--cid", cid), ("-c", continue_latest)) if value]
    if len(given) > 1:
        raise click.UsageError(f"give one of {', '.join(given)}, not several")
    if continue_latest:
        return settings.latest()
    conversation_id = positional or cid
    if conversation_id:
        return settings.get(conversation_id)
    if required:
        raise click.UsageError("name a conversation: ID, --cid ID, or -c for the most recent one")
    return None


# ---------------------------------------------------------------------------------------------
# Small shared helpers


def dumps(data: Any, *, pretty: bool = False) -> str:
    if pretty:
        return json.dumps(data, ensure_ascii=False, indent=2)
    return json.dumps(data, **_JSON_LINE)  # type: ignore[arg-type]


def title_from(text: str) -> str | None:
    """A title for a new conversation: the first line of its first message, shortened."""
    for line in text.splitlines():
        words = " ".join(line.split())
        if words:
            return words if len(words) <= TITLE_LENGTH else words[: TITLE_LENGTH - 1].rstrip() + "…"
    return None


def plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def local_time(value: dt.datetime) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M")


def message_json(message: Message) -> dict[str, Any]:
    return {"seq": message.seq, **message.to_export()}


# ---------------------------------------------------------------------------------------------
# The group


@click.group(cls=_FunnelGroup, context_settings=CONTEXT_SETTINGS)
@_DB.on_group()
@_BASE_URL.on_group()
@_TIMEOUT.on_group()
@_DEADLINE.on_group()
@_OWNER.on_group()
@_DEBUG.on_group()
@click.version_option(__version__, "--version", prog_name="gilas-conv")
@click.pass_context
def main(
    ctx: click.Context,
    db: str | None,
    base_url: str | None,
    timeout: float | None,
    deadline: float | None,
    owner: str | None,
    debug: bool,
) -> None:
    """Chat with a Gilas (or any OpenAI-compatible) model and keep every conversation.

    Conversations are stored in SQLite (or Postgres) with their whole history; each turn
    sends as much of it as fits the model's window. The API key is read from the
    GILAS_API_KEY environment variable, never from a flag. The options below may also be
    given after the command (gilas-conv list --db URL).

    Exit status: 0 on success, 1 when the API or the database failed (the message says what
    to do), 2 for a bad command line, 130 when interrupted (129 and 143 when a hang-up or
    SIGTERM stopped a streaming reply).
    """
    ctx.obj = Settings(
        db=db or None, base_url=base_url or None, timeout=timeout, deadline=deadline, owner=owner or None
    )
    if debug:
        ctx.obj.enable_debug()
