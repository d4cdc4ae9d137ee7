"""The API key (and a password in the base URL) never leaks: a scan of everything a user,
a log or a database could see, for every way the secret might come back.

Each scenario makes one thing go wrong -- the upstream echoing the key in an error body
(raw, JSON-escaped, URL-encoded), in an ``event: error`` frame of a stream, in a header or
in an HTML page; a base URL carrying ``user:password@``; a refused connection; a timeout;
a key that cannot travel in a header -- and runs it through every command that talks to the
API (``send`` streamed and not, ``chat``, ``retry`` streamed and not), with and without
``--debug``, and through the library (``Sender.send``, ``Sender.stream``,
``AsyncSender.stream``). Everything is collected: stdout, stderr, every log record at DEBUG,
the exception with its ``__cause__``/``__context__`` chain (str, repr, args, traceback),
the SQLite files byte for byte, and an export. None may hold the key or the password in any
form: raw, JSON-escaped (``\\/``, ``\\uXXXX`` in either case, mixed), URL-encoded, or any
eight characters of it once such escapes are undone.

The scan cannot pass vacuously: each run must also show the error the scenario is about
(its type, its words), the stub must have received the requests the scenario expects, and
where the echoed text is shown, ``[REDACTED]`` must stand in its place. A scenario that
stopped reaching its path (a script not consumed, a different error) fails.

The key contains ``/`` and ``+`` (the characters JSON and URL encodings escape) and letters
(which ``\\uXXXX`` can spell).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import pytest
from click.testing import CliRunner, Result
from stub_server import StubServer

from gilas_conv import (
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    AsyncSender,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConversationStore,
    GilasConvError,
    InternalServerError,
    PermissionDeniedError,
    Sender,
    StreamInterrupted,
    upgrade_database,
)
from gilas_conv.cli import main

# The stub of this module accepts any key: each scenario scripts the refusal it needs.
API_KEY = None
KEY = "sk-Sec/r3t+Key/9qX7wLmNzQ"
PASSWORD = "hunter2/Pw+x9Zk"
SECRETS = (KEY, PASSWORD)
# Any this many consecutive characters of a secret, found once escapes are undone, is a leak.
FRAGMENT = 8
REDACTED = "[REDACTED]"


# ---------------------------------------------------------------------------------------------
# Finding a secret in any form


def _json_u(text: str, *, upper: bool = False, every: int = 1) -> str:
    """``text`` with every ``every``-th character as ``\\uXXXX``."""
    out = []
    for index, char in enumerate(text):
        code = f"{ord(char):04X}" if upper else f"{ord(char):04x}"
        out.append(f"\\u{code}" if index % every == 0 else char)
    return "".join(out)


def secret_forms(secret: str) -> dict[str, str]:
    """The forms a server, a proxy or a log may spell ``secret`` in."""
    return {
        "raw": secret,
        "json-slash": secret.replace("/", "\\/"),
        "json-dumps": json.dumps(secret)[1:-1],
        "json-ascii-u-lower": _json_u(secret),
        "json-u-upper": _json_u(secret, upper=True),
        "json-u-mixed": _json_u(secret, every=2).replace("/", "\\/"),
        "url": quote(secret, safe=""),
        "url-lower": re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(secret, safe="")),
        "url-plus": quote_plus(secret),
        "repr": repr(secret)[1:-1],
    }


_JSON_U = re.compile(r"\\u([0-9a-fA-F]{4})")


def unescaped(text: str) -> str:
    """``text`` with JSON escapes (``\\uXXXX``, ``\\/``) and URL encoding undone."""
    text = _JSON_U.sub(lambda m: chr(int(m.group(1), 16)), text).replace("\\/", "/")
    return unquote(text)


def leaks(text: str) -> list[str]:
    """How the secrets show in ``text`` (empty: not at all)."""
    found = []
    plain = unescaped(text)
    for secret in SECRETS:
        found += [f"{name} {form!r}" for name, form in secret_forms(secret).items() if form in text]
        for start in range(len(secret) - FRAGMENT + 1):
            piece = secret[start : start + FRAGMENT]
            if piece in plain:
                found.append(f"fragment {piece!r}")
                break
    return found


def test_the_scan_finds_every_form() -> None:
    # The detector itself, so that a clean scan means something.
    for secret in SECRETS:
        for name, form in secret_forms(secret).items():
            assert leaks(f"before {form} after"), name
        assert leaks(f"x {secret[3 : 3 + FRAGMENT]} y")  # a part of it
        assert leaks(secret.replace("/", "%2f").replace("+", "%2B"))  # mixed case
    assert not leaks(f"Incorrect API key provided: {REDACTED}; {KEY[:4]}")


# ---------------------------------------------------------------------------------------------
# What a run leaves behind


@dataclass
class Evidence:
    """Every text a run produced, by where it came from."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, text: str | bytes | None) -> None:
        if text is None:
            return
        if isinstance(text, bytes):
            text = text.decode("latin-1")  # byte for byte: nothing hidden by a decode error
        self.texts[where] = self.texts.get(where, "") + text

    def add_exception(self, where: str, err: BaseException | None) -> None:
        if err is None:
            return
        self.add(f"{where} traceback", "".join(traceback.format_exception(err)))
        seen: set[int] = set()
        current: BaseException | None = err
        depth = 0
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            self.add(f"{where} [{depth}] str", str(current))
            self.add(f"{where} [{depth}] repr", repr(current))
            self.add(f"{where} [{depth}] args", repr(current.args))
            for name in ("message", "body", "request_id", "code", "param", "error_type"):
                if hasattr(current, name):
                    self.add(f"{where} [{depth}] .{name}", repr(getattr(current, name)))
            current = current.__cause__ or current.__context__
            depth += 1

    def add_logs(self, caplog: pytest.LogCaptureFixture) -> None:
        formatter = logging.Formatter()
        for record in caplog.records:
            if record.name.split(".")[0] in ("httpx", "httpcore"):
                # The HTTP libraries' own loggers print the request URL (httpx, INFO: with a
                # base URL's password) and response headers (httpcore, DEBUG: with a key a
                # server echoes in one) verbatim. gilas-conv does not scrub other libraries'
                # loggers; its --debug shows only the gilas_conv logger (the README says so).
                continue
            self.add(f"log {record.name}", record.getMessage() + "\n")
            if record.exc_info:
                self.add("log traceback", formatter.formatException(record.exc_info))

    def add_database(self, path: Path) -> None:
        files = sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))
        assert files, f"no database file at {path}"
        for found in files:
            self.add(f"database file {found.name}", found.read_bytes())

    def all(self) -> str:
        return "\n".join(self.texts.values())

    def assert_no_leak(self) -> None:
        found = {where: hits for where, text in self.texts.items() if (hits := leaks(text))}
        assert not found, f"a secret leaked: {found}"


# ---------------------------------------------------------------------------------------------
# Scenarios


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_FAST_RETRY = {"retry-after-ms": "10"}
_ESCAPED_BODY = json.dumps({"error": {"message": "placeholder", "type": "invalid_request_error"}}).replace(
    "placeholder", "Incorrect API key provided: " + _json_u(KEY, every=2).replace("/", "\\/")
)
_HTML = (
    f"<html><head><title>403 Forbidden: key {KEY}</title></head>"
    f"<body><h1>Forbidden</h1><p>Authorization: Bearer {quote(KEY, safe='')}</p></body></html>"
)


@dataclass(frozen=True)
class Scenario:
    """One thing going wrong, and how it must show.

    ``error``: what the library raises for it (``stream_error`` when a stream raises
    another); ``says``: words the error message must hold; ``redacted``: the echoed text is
    shown, so ``[REDACTED]`` must be too; ``requests``: how many requests the stub must see
    per command (None: any); ``base_url``: a template (``{stub}`` the stub's host:port,
    ``{closed}`` a port nobody listens on); ``streamed_only``: the fault lives in a stream.
    """

    id: str
    error: type[GilasConvError]
    says: str
    actions: tuple[dict[str, Any], ...] = ()
    stream_error: type[GilasConvError] | None = None
    redacted: bool = False
    requests: int | None = 1
    base_url: str = "http://{stub}/v1"
    key: str = KEY
    timeout: float | None = None
    streamed_only: bool = False
    unstreamed_only: bool = False
    commands: tuple[str, ...] | None = None  # None: every command


SCENARIOS = [
    Scenario(
        "echo-raw-401",
        AuthenticationError,
        "Incorrect API key provided: [REDACTED]",
        actions=({"status": 401, "error": {"message": f"Incorrect API key provided: {KEY}", "code": KEY}},),
        redacted=True,
    ),
    Scenario(
        "echo-json-escaped-400",
        BadRequestError,
        "Incorrect API key provided: [REDACTED]",
        actions=({"status": 400, "body": _ESCAPED_BODY},),
        redacted=True,
    ),
    Scenario(
        "echo-url-encoded-400",
        BadRequestError,
        f"key {REDACTED} or {REDACTED}",
        actions=({"status": 400, "error": {"message": f"key {quote(KEY, safe='')} or {quote_plus(KEY)}"}},),
        redacted=True,
    ),
    Scenario(
        "echo-in-sse-error-frame",
        APIError,
        f"invalid key {REDACTED}",
        actions=(
            {
                "error_event_after": 1,
                "event_name": "error",
                "error_event": {"error": {"message": f"invalid key {KEY}", "param": _json_u(KEY)}},
            },
        ),
        stream_error=StreamInterrupted,
        redacted=True,
        streamed_only=True,
    ),
    Scenario(
        "echo-in-sse-data-error-escaped",
        APIError,
        f"bad {REDACTED}",
        actions=(
            {
                "error_event_after": 1,
                "error_event": '{"error": {"message": "bad ' + KEY.replace("/", "\\/") + '"}}',
            },
        ),
        stream_error=StreamInterrupted,
        redacted=True,
        streamed_only=True,
    ),
    Scenario(
        "echo-in-headers-500",
        InternalServerError,
        "stub error 500",
        actions=tuple(
            {
                "status": 500,
                "headers": {
                    **_FAST_RETRY,
                    "WWW-Authenticate": f'Bearer error="invalid_token", key="{KEY}"',
                    "X-Echo-Authorization": f"Bearer {quote(KEY, safe='')}",
                },
            }
            for _ in range(3)
        ),
        requests=3,  # the first try and two retries, each with the echoing headers
    ),
    Scenario(
        "echo-in-html-page-403",
        PermissionDeniedError,
        "an HTML page ('403 Forbidden: key [REDACTED]')",
        actions=({"status": 403, "body": _HTML, "content_type": "text/html"},),
        redacted=True,
    ),
    Scenario(
        "echo-in-non-json-200",
        APIResponseValidationError,
        f"oops {REDACTED}",
        actions=({"status": 200, "body": f"oops {KEY}", "content_type": "application/json"},),
        redacted=True,
        # A stream answered with JSON is not yet read as JSON by the senders (they report an
        # unfinished stream), so only the unstreamed path is exercised here.
        unstreamed_only=True,
    ),
    Scenario(
        "password-in-base-url",
        ConfigurationError,
        # Refused before anything is sent: credentials in the URL would replace the Bearer key
        # (httpx turns them into Basic auth).
        "base URL 'http://user:***@127.0.0.1:",
        base_url=f"http://user:{quote(PASSWORD, safe='')}@{{stub}}/v1",
        requests=0,
    ),
    Scenario(
        "token-as-base-url-user",
        ConfigurationError,
        "base URL 'http://***@127.0.0.1:",
        base_url=f"http://{quote(PASSWORD, safe='')}@{{stub}}/v1",
        requests=0,
    ),
    Scenario(
        "timeout",
        APITimeoutError,
        "timed out",
        actions=tuple({"delay": 1.5} for _ in range(3)),
        timeout=0.3,
        requests=3,
        commands=("send", "send --no-stream", "retry"),  # each waits for two retries
    ),
    Scenario(
        "key-with-line-break",
        ConfigurationError,
        "contains a control character at position",
        key=f"{KEY}\r\nX-Injected: {KEY}",
        requests=0,
    ),
]

COMMANDS = ("send", "send --no-stream", "chat", "retry", "retry --no-stream")
CASES = [
    pytest.param(
        scenario, command, debug, id=f"{scenario.id}-{command.replace(' --', '-')}{'-debug' * debug}"
    )
    for scenario in SCENARIOS
    for command in COMMANDS
    if (scenario.commands is None or command in scenario.commands)
    and not (scenario.streamed_only and "--no-stream" in command)
    and not (scenario.unstreamed_only and "--no-stream" not in command)
    for debug in (False, True)
]


def _base_url(scenario: Scenario, stub: StubServer) -> str:
    host = stub.base_url.split("//", 1)[1].split("/", 1)[0]
    return scenario.base_url.format(stub=host, closed=f"127.0.0.1:{_closed_port()}")


def _expected(scenario: Scenario, *, streamed: bool) -> type[GilasConvError]:
    return scenario.stream_error if streamed and scenario.stream_error else scenario.error


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets-template") / "template.db"
    upgrade_database(f"sqlite:///{path}")
    return path


@pytest.fixture
def database(_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "data" / f"history-{uuid.uuid4().hex[:8]}.db"
    path.parent.mkdir()
    shutil.copy(_template, path)
    return path


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the database file is read byte for byte


# ---------------------------------------------------------------------------------------------
# The command line


def _unanswered(url: str) -> str:
    with ConversationStore(url) as store:
        conv = store.create(title="to retry")
        conv.append("user", "a question left unanswered")
        return conv.id


@pytest.mark.parametrize(("scenario", "command", "debug"), CASES)
def test_the_cli_never_shows_a_secret(
    scenario: Scenario,
    command: str,
    debug: bool,
    stub: StubServer,
    database: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"sqlite:///{database}"
    name, *flags = command.split()
    streamed = "--no-stream" not in flags
    args = ["--db", url, *(["--debug"] if debug else [])]
    if scenario.timeout is not None:
        args += ["--timeout", str(scenario.timeout)]
    given_input = None
    if name == "send":
        args += ["send", *flags, "hello"]
    elif name == "retry":
        args += ["retry", *flags, _unanswered(url)]
    else:
        args += ["chat"]
        given_input = "hello\n"
    stub.script(*scenario.actions)
    env = {"GILAS_API_KEY": scenario.key, "GILAS_BASE_URL": _base_url(scenario, stub)}
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(main, args, input=given_input, env=env)

    evidence = Evidence()
    evidence.add("stdout", result.stdout)
    evidence.add("stderr", result.stderr)
    evidence.add_logs(caplog)
    raised = result.exception if not isinstance(result.exception, SystemExit) else None
    evidence.add_exception("exception", raised)
    export = CliRunner().invoke(main, ["--db", url, "export", "--all"])
    assert export.exit_code == 0, export.stderr
    evidence.add("export", export.stdout)
    evidence.add_database(database)

    _assert_the_scenario_happened(scenario, name, streamed, debug, result, raised, stub)
    evidence.assert_no_leak()


def _assert_the_scenario_happened(
    scenario: Scenario,
    command: str,
    streamed: bool,
    debug: bool,
    result: Result,
    raised: BaseException | None,
    stub: StubServer,
) -> None:
    expected = _expected(scenario, streamed=streamed)
    stderr = result.stderr
    if command == "chat":
        # The REPL reports the error and goes on to the next prompt (here: the end of input).
        assert result.exit_code == 0 or scenario.error is ConfigurationError, stderr
        if debug and scenario.error is not ConfigurationError:
            assert f"{expected.__module__}.{expected.__name__}" in stderr or expected.__name__ in stderr, (
                stderr
            )
    elif debug:
        assert isinstance(raised, expected), f"{type(raised).__name__}: {raised}\n{stderr}"
    else:
        assert result.exit_code == 1 and raised is None, stderr
    shown = stderr + (str(raised) if raised is not None else "")
    if raised is not None and raised.__cause__ is not None:
        shown += str(raised.__cause__)
    if not debug:
        lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1, stderr
    assert scenario.says in shown, f"expected {scenario.says!r} in:\n{shown}"
    if scenario.redacted:
        assert REDACTED in shown, shown
    if scenario.requests is not None:
        assert len(stub.requests) == scenario.requests, stub.requests
    assert stub.pending_actions == 0, "the scenario's script was not consumed"


# ---------------------------------------------------------------------------------------------
# The library


LIBRARY_CALLS = ("Sender.send", "Sender.stream", "AsyncSender.stream")


@pytest.mark.parametrize(
    ("scenario", "call"),
    [
        pytest.param(scenario, call, id=f"{scenario.id}-{call}")
        for scenario in SCENARIOS
        for call in LIBRARY_CALLS
        if not (scenario.streamed_only and call == "Sender.send")
        and not (scenario.unstreamed_only and call != "Sender.send")
    ],
)
def test_library_errors_never_carry_a_secret(
    scenario: Scenario, call: str, stub: StubServer, database: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{database}"
    stub.script(*scenario.actions)
    options: dict[str, Any] = {"api_key": scenario.key, "base_url": _base_url(scenario, stub)}
    if scenario.timeout is not None:
        options["timeout"] = scenario.timeout
    if scenario.requests != 3:
        options["max_retries"] = 0
    evidence = Evidence()
    caplog.set_level(logging.DEBUG)
    with ConversationStore(url) as store:
        conv = store.create()
        raised = _call(call, store, conv.id, options)
        evidence.add("repr(store)", repr(store))
        evidence.add("export", json.dumps(store.get(conv.id).export(), default=str))
    evidence.add_exception("exception", raised)
    evidence.add_logs(caplog)
    evidence.add_database(database)

    expected = _expected(scenario, streamed=call != "Sender.send")
    assert isinstance(raised, expected), f"{type(raised).__name__}: {raised}"
    shown = str(raised) + (str(raised.__cause__) if raised.__cause__ is not None else "")
    assert scenario.says in shown, f"expected {scenario.says!r} in {shown!r}"
    if scenario.redacted:
        assert REDACTED in shown
    if scenario.requests is not None:
        assert len(stub.requests) == scenario.requests, stub.requests
    assert stub.pending_actions == 0, "the scenario's script was not consumed"
    evidence.assert_no_leak()


def _call(
    call: str, store: ConversationStore, conversation_id: str, options: dict[str, Any]
) -> BaseException:
    """Run ``call`` once; return what it raised (failing if it raised nothing). The
    sender's repr is kept for the scan (``_sender_reprs``)."""
    try:
        if call.startswith("Async"):
            asyncio.run(_async_stream(store, conversation_id, options))
        else:
            with Sender(store, **options) as sender:
                try:
                    if call == "Sender.send":
                        sender.send(conversation_id, "hello")
                    else:
                        with sender.stream(conversation_id, "hello") as stream:
                            for _ in stream:
                                pass
                finally:
                    _reprs.append(repr(sender))
    except GilasConvError as err:
        return err
    pytest.fail(f"{call} raised nothing")


_reprs: list[str] = []


async def _async_stream(store: ConversationStore, conversation_id: str, options: dict[str, Any]) -> None:
    async with AsyncSender(store, **options) as sender:
        try:
            async with await sender.stream(conversation_id, "hello") as stream:
                async for _ in stream:
                    pass
        finally:
            _reprs.append(repr(sender))


@pytest.fixture(autouse=True)
def _sender_reprs() -> Iterator[None]:
    _reprs.clear()
    yield
    for shown in _reprs:
        assert not leaks(shown), f"a secret leaked in a sender's repr: {shown}"


def test_a_base_url_with_credentials_is_refused_before_anything_is_stored(
    stub: StubServer, database: Path
) -> None:
    # Credentials in the URL would reach the server as Basic auth in place of the Bearer key.
    base_url = f"http://gilas:{quote(PASSWORD, safe='')}@{_base_url(SCENARIOS[0], stub).split('//', 1)[1]}"
    with ConversationStore(f"sqlite:///{database}") as store:
        conversation = store.create()
        with pytest.raises(ConfigurationError, match="carries a user name or password") as caught:
            Sender(store, api_key=KEY, base_url=base_url)
        assert store.get(conversation.id).messages() == []
    assert not leaks(str(caught.value)) and "gilas:***@" in str(caught.value)
    assert stub.requests == []


@pytest.mark.parametrize(
    "scenario",
    [s for s in SCENARIOS if s.id in ("echo-json-escaped-400", "echo-in-sse-error-frame")],
    ids=lambda s: s.id,
)
def test_a_real_debug_traceback_never_shows_the_key(
    scenario: Scenario, stub: StubServer, database: Path
) -> None:
    # What Python itself prints for an uncaught error under --debug, in a real process.
    stub.script(*scenario.actions)
    env = {**os.environ, "GILAS_API_KEY": KEY, "GILAS_BASE_URL": _base_url(scenario, stub)}
    result = subprocess.run(
        [sys.executable, "-m", "gilas_conv", "--db", f"sqlite:///{database}", "--debug", "send", "hello"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1 and "Traceback (most recent call last)" in stderr, stderr
    assert scenario.says in stderr and scenario.error.__name__ in stderr, stderr
    evidence = Evidence()
    evidence.add("stdout", result.stdout)
    evidence.add("stderr", result.stderr)
    evidence.add_database(database)
    evidence.assert_no_leak()
