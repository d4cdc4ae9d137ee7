"""The command line through click's CliRunner, against the stub server on a thread.

Happy paths run with ``--debug``, so an unexpected exception surfaces as itself, with its
traceback, instead of the one-line message users get; error paths run without it and
check the documented exit code and that stderr holds one ``Error:`` line, no traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import traceback
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, event
from stub_server import StubServer

from gilas_conv import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ContextWindowExceeded,
    ConversationNotFound,
    ConversationStore,
    InternalServerError,
    MissingAPIKeyError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    SchemaOutOfDate,
    StreamInterrupted,
    upgrade_database,
)
from gilas_conv import cli as cli_module
from gilas_conv.cli import error_message, main, parse_import, read_message
from gilas_conv.cli._app import GLOBAL_OPTIONS
from gilas_conv.cli._render import Output, ReplyPrinter, content_text

API_KEY = "sk-cli-test-5b1e0c"
PERSIAN = "سلام! کتاب\u200cها را می\u200cخواهم؛ the API و English هم\u200cزمان."
README = Path(__file__).resolve().parent.parent / "README.md"


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-template") / "template.db"
    upgrade_database(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(_sqlite_template: Path, tmp_path: Path) -> str:
    """A migrated SQLite database (a copy of a template: fast)."""
    path = tmp_path / f"cli-{uuid.uuid4().hex[:8]}.db"
    shutil.copy(_sqlite_template, path)
    return f"sqlite:///{path}"


class CLI:
    """Runs ``gilas-conv --db URL ...`` in-process with the API key and the stub's URL."""

    def __init__(self, url: str, stub: StubServer | None) -> None:
        self.url = url
        self.stub = stub
        self.runner = CliRunner()

    def __call__(
        self,
        *args: str,
        input: str | bytes | None = None,
        env: dict[str, str | None] | None = None,
        code: int = 0,
        debug: bool | None = None,
    ) -> Result:
        environment: dict[str, str | None] = {"GILAS_API_KEY": API_KEY}
        if self.stub is not None:
            environment["GILAS_BASE_URL"] = self.stub.base_url
        environment.update(env or {})
        debug = code == 0 if debug is None else debug
        argv = ["--db", self.url, *(["--debug"] if debug else []), *args]
        result = self.runner.invoke(main, argv, input=input, env=environment)
        detail = ""
        if result.exc_info is not None and not isinstance(result.exception, SystemExit):
            detail = "".join(traceback.format_exception(*result.exc_info))
        assert result.exit_code == code, (
            f"exit {result.exit_code} != {code}\nstdout: {result.stdout}\nstderr: {result.stderr}\n{detail}"
        )
        if not debug:
            assert "Traceback" not in result.stderr
        return result

    def store(self) -> ConversationStore:
        return ConversationStore(self.url)


@pytest.fixture
def backend() -> str:
    """SQLite unless a test asks for both with ``@both_backends``: a Postgres test costs a
    database created and dropped, and most commands do not depend on the database."""
    return "sqlite"


both_backends = pytest.mark.parametrize("backend", ["sqlite", "postgres"])


@pytest.fixture
def cli(db_url: str, stub: StubServer) -> CLI:
    return CLI(db_url, stub)


def error_line(result: Result) -> str:
    """The one line an error prints; fails unless stderr is exactly one ``Error:`` line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


def new_conversation(cli: CLI, *args: str) -> str:
    result = cli("send", "--json", *args)
    return str(json.loads(result.stdout)["conversation_id"])


def user_texts(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "user"]


# ---------------------------------------------------------------------------------------------
# send


def test_send_prints_the_reply_exactly_when_piped(cli: CLI) -> None:
    result = cli("send", "--no-stream", PERSIAN)
    assert result.stdout_bytes == f"echo: {PERSIAN}\n".encode()
    assert cli.stub is not None
    body = cli.stub.requests[-1]["body"]
    assert not body.get("stream")
    assert user_texts(body) == [PERSIAN]
    assert re.search(r"conversation [0-9a-f-]{36}", result.stderr)


def test_send_streams_by_default_and_stores_the_reply(cli: CLI) -> None:
    result = cli("send", PERSIAN)
    assert result.stdout_bytes == f"echo: {PERSIAN}\n".encode()
    assert cli.stub is not None
    assert cli.stub.requests[-1]["body"]["stream"] is True
    with cli.store() as store:
        [conv] = store.list()
        messages = conv.messages()
    assert [(m.role, m.content, m.status) for m in messages] == [
        ("user", PERSIAN, "complete"),
        ("assistant", f"echo: {PERSIAN}", "complete"),
    ]
    assert conv.title == PERSIAN and len(PERSIAN) < cli_module.TITLE_LENGTH


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_send_json_prints_one_object_with_the_stored_reply(cli: CLI, stream: bool) -> None:
    result = cli("send", "--json", *([] if stream else ["--no-stream"]), "hello")
    data = json.loads(result.stdout)
    assert set(data) == {"conversation_id", "message", "usage"}
    with cli.store() as store:
        stored = store.get(data["conversation_id"]).message(data["message"]["seq"])
    assert data["message"] == {"seq": stored.seq, **stored.to_export()}
    assert data["message"]["content"] == "echo: hello"
    assert data["usage"] == stored.usage and data["usage"]["prompt_tokens"] > 0


@both_backends
def test_send_continue_replays_the_history_and_system(cli: CLI) -> None:
    conv_id = new_conversation(cli, "-s", "Answer in Persian.", "first question")
    result = cli("send", "--cid", conv_id, "--no-stream", "second question")
    assert result.stdout == "echo: second question\n"
    assert not re.search("^conversation", result.stderr, re.M)  # no new conversation was started
    assert cli.stub is not None
    sent = cli.stub.requests[-1]["body"]["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "Answer in Persian."),
        ("user", "first question"),
        ("assistant", "echo: first question"),
        ("user", "second question"),
    ]


def test_send_reads_stdin_and_passes_max_tokens_and_model(cli: CLI) -> None:
    cli("send", "-m", "gpt-4o", "--max-tokens", "50", "-", input=f"{PERSIAN}\nline two\n")
    assert cli.stub is not None
    body = cli.stub.requests[-1]["body"]
    assert user_texts(body) == [f"{PERSIAN}\nline two\n"]
    assert body["model"] == "gpt-4o"
    assert body.get("max_tokens") == 50 or body.get("max_completion_tokens") == 50
    assert "context_limit" not in body


def test_send_context_limit_drops_old_turns(cli: CLI) -> None:
    conv_id = new_conversation(cli, "one " * 200)
    cli("send", "--cid", conv_id, "--context-limit", "300", "--max-tokens", "50", "short")
    assert cli.stub is not None
    assert user_texts(cli.stub.requests[-1]["body"]) == ["short"]


def test_send_joins_words(cli: CLI) -> None:
    assert cli("send", "--no-stream", "two", "words").stdout == "echo: two words\n"


# ---------------------------------------------------------------------------------------------
# retry


@both_backends
def test_retry_answers_a_message_left_unanswered(cli: CLI) -> None:
    failed = cli("send", "hello", env={"GILAS_API_KEY": "sk-wrong"}, code=1)
    line = error_line(failed)
    assert "GILAS_API_KEY" in line and "sk-wrong" not in failed.stderr
    conv_id = re.search(r"conversation ([0-9a-f-]{36})", failed.stderr).group(1)  # type: ignore[union-attr]
    result = cli("retry", conv_id, "--no-stream")
    assert result.stdout == "echo: hello\n"
    with cli.store() as store:
        messages = store.get(conv_id).messages()
    assert [(m.role, m.content) for m in messages] == [("user", "hello"), ("assistant", "echo: hello")]
    assert messages[1].reply_to == 1


def test_retry_streams_and_json(cli: CLI) -> None:
    with cli.store() as store:
        conv = store.create()
        conv.append("user", "pending")
    data = json.loads(cli("retry", conv.id, "--json").stdout)
    assert data["message"]["content"] == "echo: pending"
    assert data["message"]["reply_to"] == 1


def test_retry_with_nothing_to_answer_exits_1(cli: CLI) -> None:
    conv_id = new_conversation(cli, "hi")
    line = error_line(cli("retry", conv_id, code=1))
    assert "nothing to retry" in line


def test_connection_error_names_the_conversation_to_retry(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.sleep", lambda _seconds: None)  # the sender's backoff between retries
    result = cli("--base-url", "http://127.0.0.1:9/v1", "send", "hi", code=1)
    conv_id = re.search(r"conversation ([0-9a-f-]{36})", result.stderr).group(1)  # type: ignore[union-attr]
    assert f"gilas-conv retry {conv_id}" in error_line(result)


# ---------------------------------------------------------------------------------------------
# list, show, export


@both_backends
def test_list_is_empty_then_most_recent_first(cli: CLI) -> None:
    empty = cli("list")
    assert empty.stdout == "" and "No conversations yet" in empty.stderr
    assert json.loads(cli("list", "--json").stdout) == []
    first = new_conversation(cli, "first")
    second = new_conversation(cli, "second")
    cli("send", "--cid", first, "again")  # first is now the most recently active
    data = json.loads(cli("list", "--json").stdout)
    assert [c["id"] for c in data] == [first, second]
    assert data[0]["message_count"] == 4 and data[0]["title"] == "first"
    assert {"id", "title", "model", "created_at", "updated_at", "message_count"} <= set(data[0])
    assert [c["id"] for c in json.loads(cli("list", "--json", "--limit", "1").stdout)] == [first]
    table = cli("list").stdout.splitlines()
    assert table[0].split("\t") == ["id", "updated", "messages", "model", "title"]
    assert table[1].startswith(first) and table[1].endswith("\tfirst")


@both_backends
def test_show_prints_each_message_exactly_when_piped(cli: CLI) -> None:
    markdown = f"# عنوان\n\n**{PERSIAN}**\n\n- [x] item\n"
    with cli.store() as store:
        conv = store.create(system="system text", title="t")
        conv.append("user", PERSIAN)
        conv.append("assistant", markdown, model="gpt-4o")
    out = cli("show", conv.id).stdout_bytes
    assert f"[2] user\n{PERSIAN}\n\n".encode() in out
    assert f"[3] assistant (gpt-4o)\n{markdown}\n".encode() in out
    assert out.startswith(f"conversation {conv.id}\n".encode())
    with cli.store() as store:
        exported = store.get(conv.id).export()
    assert json.loads(cli("show", conv.id, "--json").stdout) == json.loads(json.dumps(exported))


def test_export_one_and_all(cli: CLI) -> None:
    ids = [new_conversation(cli, f"message {n} {PERSIAN}") for n in range(3)]
    one = json.loads(cli("export", ids[0]).stdout)
    with cli.store() as store:
        assert one == json.loads(json.dumps(store.get(ids[0]).export()))
    lines = cli("export", "--all").stdout.splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(ids)
    assert PERSIAN in lines[0]  # kept as text, not \\u escapes


@pytest.mark.parametrize("args", [[], ["--all", "some-id"]], ids=["neither", "both"])
def test_export_needs_an_id_or_all(cli: CLI, args: list[str]) -> None:
    result = cli("export", *args, code=2)
    assert "--all" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# import


def _comparable(export: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in export.items() if k not in ("id", "updated_at")}


@both_backends
def test_export_import_round_trip_is_equal(cli: CLI) -> None:
    with cli.store() as store:
        conv = store.create(system="be brief", title="round trip", metadata={"k": [1, "دو"]})
        conv.append("user", PERSIAN)
        conv.append(
            "assistant",
            None,
            tool_calls=[{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        )
        conv.append("tool", "42", tool_call_id="call_1")
        conv.append(
            "assistant",
            "partial",
            status="incomplete",
            usage={"prompt_tokens": 9},
            finish_reason=None,
            predicted_prompt_tokens=8,
            reply_to=2,
        )
    new_conversation(cli, "another")
    exported = cli("export", "--all").stdout
    result = cli("import", "-", input=exported)
    new_ids = result.stdout.split()
    assert len(new_ids) == 2 and "imported 2 conversations" in result.stderr
    with cli.store() as store:
        assert store.count() == 4
        before = sorted((json.loads(line) for line in exported.splitlines()), key=lambda d: d["title"])
        after = sorted((store.get(i).export() for i in new_ids), key=lambda d: d["title"])
    assert [_comparable(json.loads(json.dumps(d))) for d in after] == [_comparable(d) for d in before]


def test_import_single_export_and_openai_messages(cli: CLI, tmp_path: Path) -> None:
    conv_id = new_conversation(cli, PERSIAN)
    single = tmp_path / "one.json"
    single.write_text(cli("export", conv_id).stdout, encoding="utf-8")
    openai = tmp_path / "openai.json"
    openai.write_text(
        json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]), encoding="utf-8"
    )
    first = cli("import", str(single)).stdout.split()
    second = cli("import", "-m", "gpt-4o", str(openai)).stdout.split()
    again = cli("import", str(single)).stdout.split()
    assert len(first) == len(second) == len(again) == 1 and first != again
    with cli.store() as store:
        assert store.get(first[0]).messages()[0].content == PERSIAN
        imported = store.get(second[0])
        assert imported.model == "gpt-4o"
        assert [m.role for m in imported.messages()] == ["system", "user"]


BAD_JSONL_LINE = json.dumps({"messages": [{"role": "wizard", "content": "x"}]})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b"", "the file is empty", id="empty"),
        pytest.param(b'{"messages": [', "line 1, column", id="truncated-json"),
        pytest.param(b"\xff\xfe\x00junk", "not UTF-8", id="not-utf8"),
        pytest.param(b"[1, 2]", "expected an exported conversation", id="wrong-shape"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="nested-too-deep"),
        pytest.param(
            b'{"messages": []}\n' + b"[" * 100_000 + b"]" * 100_000,
            "nested too deeply",
            id="jsonl-nested-too-deep",
        ),
        pytest.param(
            (
                "\n".join(
                    [json.dumps({"messages": [{"role": "user", "content": "ok"}]})] * 2 + [BAD_JSONL_LINE]
                )
            ).encode(),
            "line 3: message 1: unknown role 'wizard'",
            id="jsonl-bad-third-line",
        ),
        pytest.param(
            (json.dumps({"messages": []}) + "\n{not json}\n").encode(),
            "line 2, column 2",
            id="jsonl-syntax",
        ),
        pytest.param(
            json.dumps({"messages": [{"role": "user", "content": "x", "colour": "red"}]}).encode(),
            "message 1: unknown field(s) colour",
            id="unknown-field",
        ),
        pytest.param(
            json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": 7}]).encode(),
            "message 2: content must be a string",
            id="openai-bad-content",
        ),
    ],
)
def test_bad_import_files_are_refused_whole(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, expected: str
) -> None:
    existing = new_conversation(cli, "kept")
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with _statements_on_every_engine() as statements:
        result = cli("import", str(path), code=1)
    # Refused before the first write, not rolled back after.
    assert not [sql for sql in statements if sql.lstrip().upper().startswith("INSERT")]
    line = error_line(result)
    assert expected in line and "nothing was imported" in line
    assert result.stdout == ""
    with cli.store() as store:
        assert [c.id for c in store.list()] == [existing]


def test_a_database_error_that_escapes_the_store_is_one_line_without_sql(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError(
            "SELECT secret_column FROM conversations WHERE owner = ?",
            ("alice-param",),
            Exception("disk I/O error"),
        )

    monkeypatch.setattr(ConversationStore, "list", broken)
    line = error_line(cli("list", code=1))
    assert "disk I/O error" in line
    assert "SELECT" not in line and "alice-param" not in line and "unexpected" not in line


def test_import_missing_file_is_a_usage_error(cli: CLI, tmp_path: Path) -> None:
    result = cli("import", str(tmp_path / "nope.json"), code=2)
    assert "nope.json" in result.stderr


def test_import_failure_half_way_stores_nothing(cli: CLI, tmp_path: Path) -> None:
    """The database refuses the third conversation's row: the one transaction that stores
    them all rolls back, so the first two are not left behind."""
    good = json.dumps({"messages": [{"role": "user", "content": "ok"}]})
    path = tmp_path / "three.jsonl"
    path.write_text("\n".join([good] * 3), encoding="utf-8")
    inserted = {"conversations": 0}

    def fail_third(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO CONVERSATIONS"):
            inserted["conversations"] += 1
            if inserted["conversations"] == 3:
                raise conn.dialect.loaded_dbapi.OperationalError("disk I/O error")

    event.listen(Engine, "before_cursor_execute", fail_third)
    try:
        line = error_line(cli("import", str(path), code=1))
    finally:
        event.remove(Engine, "before_cursor_execute", fail_third)
    assert inserted["conversations"] == 3
    assert "disk I/O error" in line
    with cli.store() as store:
        assert store.count() == 0


@contextlib.contextmanager
def _statements_on_every_engine() -> Iterator[list[str]]:
    """The SQL every engine runs meanwhile (the CLI makes its own engine)."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def test_parse_import_formats() -> None:
    conv = {"messages": [{"role": "user", "content": "a"}]}
    assert [i.where for i in parse_import(json.dumps(conv, indent=2))] == ["the file"]
    assert [i.where for i in parse_import(json.dumps([conv, conv]))] == ["conversation 1", "conversation 2"]
    assert [i.where for i in parse_import(f"{json.dumps(conv)}\n\n{json.dumps(conv)}\n")] == [
        "line 1",
        "line 3",
    ]
    messages = parse_import(json.dumps(conv["messages"]))
    assert messages[0].data == conv["messages"]


# ---------------------------------------------------------------------------------------------
# fork, rm


def test_fork_copies_up_to_seq(cli: CLI) -> None:
    conv_id = new_conversation(cli, "one")
    cli("send", "--cid", conv_id, "two")
    copy_id = cli("fork", conv_id, "--at", "2", "--title", "branch").stdout.strip()
    whole_id = cli("fork", conv_id).stdout.strip()
    with cli.store() as store:
        copy = store.get(copy_id)
        assert [m.content for m in copy.messages()] == ["one", "echo: one"]
        assert copy.title == "branch" and copy.forked_from == conv_id
        assert store.get(whole_id).message_count == 4
    line = error_line(cli("fork", conv_id, "--at", "9", code=1))
    assert "fork point must be a seq between 0 and 4" in line
    assert error_line(cli("fork", "no-such-id", code=1)).startswith("Error: conversation not found")


def test_rm_asks_unless_yes(cli: CLI) -> None:
    first = new_conversation(cli, "first")
    second = new_conversation(cli, "second")
    declined = cli("rm", first, input="n\n", code=1)
    assert "Delete this conversation?" in declined.stderr
    assert "nothing was deleted" in error_line(declined)
    assert "nothing was deleted" in error_line(cli("rm", first, input="", code=1))
    cli("rm", first, input="y\n")
    # One unknown id among several: nothing is deleted.
    assert "not found" in error_line(cli("rm", second, "no-such-id", "--yes", code=1))
    with cli.store() as store:
        assert [c.id for c in store.list()] == [second]
    cli("rm", "--yes", second)
    with cli.store() as store:
        assert store.count() == 0


# ---------------------------------------------------------------------------------------------
# tokens


@both_backends
def test_tokens_reports_history_window_and_drift(cli: CLI) -> None:
    conv_id = new_conversation(cli, "-s", "be brief", "word " * 300)
    cli("send", "--cid", conv_id, "short question")
    report = json.loads(cli("tokens", conv_id, "--json").stdout)
    with cli.store() as store:
        conv = store.get(conv_id)
        replies = [m for m in conv.messages() if m.role == "assistant"]
        from gilas_conv import build_context, conversation_tokens

        assert report["history_tokens"] == conversation_tokens(conv)
        context = build_context(conv)
    window = report["window"]
    assert window["prompt_tokens"] == context.prompt_tokens
    assert (window["kept"], window["dropped"]) == (5, 0)
    assert window["reserved_for_reply"] == context.reserved
    drift = report["drift"]
    errors = [m.usage["prompt_tokens"] - m.predicted_prompt_tokens for m in replies]  # type: ignore[index,operator]
    assert [row["error"] for row in drift["per_reply"]] == errors
    assert drift["max_abs_error"] == max(map(abs, errors))
    assert drift["mean_abs_error"] == pytest.approx(sum(map(abs, errors)) / len(errors))
    # A small window drops the long first turn, keeping the system message.
    small = json.loads(
        cli("tokens", conv_id, "--json", "--context-limit", "200", "--max-tokens", "50").stdout
    )
    assert (small["window"]["kept"], small["window"]["dropped"]) == (3, 2)
    text = cli("tokens", conv_id).stdout
    assert f"{report['history_tokens']:,} tokens" in text and "5 messages kept, 0 dropped" in text
    assert "2 replies: mean |reported - predicted|" in text


def test_tokens_window_too_small_is_an_error(cli: CLI) -> None:
    conv_id = new_conversation(cli, "word " * 100)
    line = error_line(cli("tokens", conv_id, "--context-limit", "60", "--max-tokens", "10", code=1))
    assert "prompt tokens but only" in line


# ---------------------------------------------------------------------------------------------
# db upgrade, settings


@both_backends
def test_db_upgrade_then_commands_work(empty_db_url: str, stub: StubServer) -> None:
    cli = CLI(empty_db_url, stub)
    if empty_db_url.startswith("postgresql"):
        line = error_line(cli("list", code=1))
        assert "gilas-conv db upgrade" in line
    result = cli("db", "upgrade")
    assert "up to date" in result.stdout
    assert cli("db", "upgrade").exit_code == 0  # idempotent
    assert cli("list", "--json").stdout.strip() == "[]"


def test_db_option_beats_the_environment_which_beats_the_default(
    sqlite_url: str, stub: StubServer, tmp_path: Path
) -> None:
    runner = CliRunner()
    env_url = f"sqlite:///{tmp_path / 'from-env.db'}"
    base = {"GILAS_API_KEY": API_KEY, "GILAS_BASE_URL": stub.base_url}
    runner.invoke(main, ["send", "into default"], env=base, catch_exceptions=False)
    runner.invoke(main, ["send", "into env"], env={**base, "GILAS_CONV_DATABASE_URL": env_url})
    runner.invoke(
        main, ["--db", sqlite_url, "send", "into flag"], env={**base, "GILAS_CONV_DATABASE_URL": env_url}
    )
    default_path = Path.home() / ".local" / "share" / "gilas-conv" / "conversations.db"
    for url, title in (
        (f"sqlite:///{default_path}", "into default"),
        (env_url, "into env"),
        (sqlite_url, "into flag"),
    ):
        with ConversationStore(url) as store:
            assert [c.title for c in store.list()] == [title]


def test_base_url_option_beats_the_environment(cli: CLI) -> None:
    assert cli.stub is not None
    result = cli(
        "--base-url", cli.stub.base_url, "send", "hi", env={"GILAS_BASE_URL": "http://127.0.0.1:9/v1"}
    )
    assert result.stdout == "echo: hi\n"


# ---------------------------------------------------------------------------------------------
# The error funnel


@pytest.mark.parametrize(
    ("args", "env", "code", "expected"),
    [
        pytest.param(["send", "hi"], {"GILAS_API_KEY": None}, 1, "GILAS_API_KEY is not set", id="no-key"),
        pytest.param(["chat"], {"GILAS_API_KEY": ""}, 1, "GILAS_API_KEY is not set", id="chat-no-key"),
        pytest.param(["show", "nope"], {}, 1, "conversation not found: 'nope'", id="not-found"),
        pytest.param(["tokens", "nope"], {}, 1, "`gilas-conv list` shows", id="tokens-not-found"),
        pytest.param(["send", "--cid", "nope", "hi"], {}, 1, "not found", id="send-not-found"),
        pytest.param(["send", "hi"], {"GILAS_API_KEY": "sk-bad"}, 1, "the API refused the key", id="401"),
        pytest.param(["--base-url", "ftp://x", "send", "hi"], {}, 1, "must start with http", id="base-url"),
        pytest.param(
            ["send", "hi"],
            {"GILAS_BASE_URL": "https://user:hunter2@api.test/v1"},
            1,
            "'https://user:***@api.test/v1' carries a user name or password",
            id="base-url-credentials",
        ),
        pytest.param(["--db", "not a url", "list"], {}, 1, "not a database URL", id="bad-db-url"),
        pytest.param(["send", "--context-limit", "20", "hello " * 50], {}, 1, "prompt tokens", id="window"),
    ],
)
def test_errors_print_one_line_and_exit_1(
    cli: CLI, args: list[str], env: dict[str, str | None], code: int, expected: str
) -> None:
    result = cli(*args, env=env, code=code)
    assert expected in error_line(result)


@pytest.mark.parametrize(
    "args",
    [
        ["nope"],
        ["list", "--limit", "0"],
        ["send"],
        ["send", "--max-tokens", "x", "hi"],
        ["send", "-"],
        ["--timeout", "0", "list"],
        ["chat", "some-id", "-c"],
        ["import"],
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors_exit_2(cli: CLI, args: list[str]) -> None:
    result = cli(*args, code=2, input="")
    assert "Error" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ({"status": 404}, "the API answered 404"),
        ({"status": 403}, "may not do this"),
        (
            {
                "status": 400,
                "error": {"message": "maximum context length is 10", "code": "context_length_exceeded"},
            },
            "lower --context-limit",
        ),
        ({"status": 422}, "the API refused the request"),
        ({"body": "not json", "status": 200, "content_type": "text/plain"}, "OpenAI-compatible"),
    ],
    ids=["404", "403", "400-context", "422", "not-json"],
)
def test_api_errors_through_the_stub(cli: CLI, action: dict[str, Any], expected: str) -> None:
    assert cli.stub is not None
    cli.stub.script(action)
    assert expected in error_line(cli("send", "--no-stream", "hi", code=1))


def test_stream_cut_off_is_stored_and_reported(cli: CLI) -> None:
    assert cli.stub is not None
    cli.stub.script({"reply": "one two three four five", "cut_after": 2})
    result = cli("send", "hi", code=1)
    assert result.stdout == "one two \n"
    line = error_line(result)
    assert "cut off" in line and "gilas-conv retry" in line
    with cli.store() as store:
        [conv] = store.list()
        assert conv.last_message().status == "incomplete"  # type: ignore[union-attr]


def test_a_stream_ended_by_an_output_error_stores_what_arrived(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[str] = []

    def feed(self: Any, delta: str | None) -> None:
        if delta:
            shown.append(delta)
        if len(shown) == 2:
            raise OSError("the terminal went away")

    monkeypatch.setattr(ReplyPrinter, "feed", feed)
    cli("send", "one two three four five", code=1)
    with cli.store() as store:
        [conv] = store.list()
        last = conv.last_message()
    assert last is not None and (last.role, last.status) == ("assistant", "incomplete")
    assert last.content.startswith("".join(shown))


# The suite turns warnings into errors; a user's process shows them, which is what is tested.
@pytest.mark.filterwarnings("default::UserWarning")
def test_library_warnings_are_one_line(cli: CLI) -> None:
    model = f"in-house-{uuid.uuid4().hex[:6]}"  # warned about once per process
    result = cli("send", "-m", model, "hi", debug=False)
    warning = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warning) == 1 and f"unknown model '{model}'" in warning[0]
    assert "GilasTokenWarning" not in result.stderr and result.stdout == "echo: hi\n"


def test_debug_lets_the_real_exception_through(cli: CLI) -> None:
    result = cli("--debug", "send", "hi", env={"GILAS_API_KEY": None}, code=1, debug=False)
    assert isinstance(result.exception, MissingAPIKeyError)


def test_unexpected_errors_are_one_line_too(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(ConversationStore, "list", broken)
    line = error_line(cli("list", code=1))
    assert "unexpected RuntimeError: boom" in line and "--debug" in line


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (MissingAPIKeyError(), "export GILAS_API_KEY"),
        (ConversationNotFound("x"), "gilas-conv list"),
        (SchemaOutOfDate("sqlite:///x.db", None, "abc"), "gilas-conv db upgrade"),
        (ContextWindowExceeded(10, 5), "raise the context limit"),
        (StreamInterrupted(None, "the connection was lost"), "gilas-conv retry C1"),
        (AuthenticationError("bad key", status_code=401), "check GILAS_API_KEY"),
        (PermissionDeniedError("no", status_code=403), "pick another model"),
        (NotFoundError("no", status_code=404), "https://api.gilas.io/v1"),
        (RateLimitError("slow down", status_code=429), "gilas-conv retry C1"),
        (InternalServerError("oops", status_code=500), "gilas-conv retry C1"),
        (BadRequestError("maximum context length", status_code=400), "--context-limit"),
        (APITimeoutError("timed out"), "raise --timeout"),
        (APIConnectionError("refused"), "--base-url"),
        (APIResponseValidationError("not a completion", status_code=200), "OpenAI-compatible"),
        (ValueError("bad value"), "bad value"),
        (FileNotFoundError(2, "No such file or directory", "f.json"), "No such file or directory: f.json"),
        (KeyError("k"), "unexpected KeyError"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_error_message_says_what_to_do(error: BaseException, expected: str) -> None:
    message = error_message(error, conversation_id="C1")
    assert expected in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# chat (line-by-line input; the terminal itself is tested in test_cli_subprocess.py)


def test_chat_commands_and_turns(cli: CLI) -> None:
    script = "\n".join(
        [
            "/help",
            "hello",
            "/model gpt-4o",
            "/system Be brief.",
            "first line \\",
            "second line",
            '"""',
            "block one",
            "",
            'block two"""',
            "/tokens",
            "/history 2",
            "/fork",
            "/nonsense",
            " /not a command",
            "/new",
            "fresh start",
            "/exit",
            "never sent",
        ]
    )
    result = cli("chat", input=script + "\n")
    assert cli.stub is not None
    bodies = [r["body"] for r in cli.stub.requests]
    assert [user_texts(b)[-1] for b in bodies] == [
        "hello",
        "first line \nsecond line",
        "block one\n\nblock two",
        "/not a command",
        "fresh start",
    ]
    assert bodies[1]["model"] == "gpt-4o"
    assert {"role": "system", "content": "Be brief."} in bodies[1]["messages"]
    assert len(bodies[4]["messages"]) == 1  # /new: nothing of before
    out = result.stdout
    assert "echo: hello" in out and "prompt tokens" in out and "unknown command /nonsense" in result.stderr
    assert "/fork [SEQ]" in out and "model: gpt-4o" in out
    assert "... 5 earlier messages" in out and "[7] assistant (gpt-4o)" in out
    with cli.store() as store:
        conversations = store.list()
        assert len(conversations) == 3  # the first, its fork, and /new's
        forked = next(c for c in conversations if c.forked_from)
        assert forked.model == "gpt-4o"
        assert [m.content for m in forked.messages()][-1] == "echo: /not a command"


def test_chat_resume_shows_the_last_messages_and_replays(cli: CLI) -> None:
    conv_id = new_conversation(cli, "-s", "sys", "first")
    for n in range(3):
        cli("send", "--cid", conv_id, f"turn {n}")
    result = cli("chat", conv_id, input="next\n")
    assert "Resuming “first”" in result.stdout and "... 3 earlier messages" in result.stdout
    assert "[4] user\nturn 0" in result.stdout and "[2] user" not in result.stdout
    latest = cli("chat", "-c", input="")
    assert f"({conv_id}, 11 messages)" in latest.stdout
    assert cli.stub is not None
    assert user_texts(cli.stub.requests[-1]["body"]) == ["first", "turn 0", "turn 1", "turn 2", "next"]
    assert f"resume with: gilas-conv chat {conv_id}" in result.stdout


def test_chat_errors_do_not_end_the_session(cli: CLI) -> None:
    assert cli.stub is not None
    cli.stub.script({"status": 401})
    result = cli("chat", input="hello\n/retry\n")
    assert "the API refused the key" in result.stderr
    assert "echo: hello" in result.stdout  # /retry answered the stored message


def test_chat_continue_without_conversations(cli: CLI) -> None:
    assert "no conversation to continue" in error_line(cli("chat", "-c", code=1))


def test_read_message_multiline() -> None:
    def reader(*lines: str) -> Any:
        feed = iter(lines)

        def read(_prompt: str) -> str:
            for line in feed:
                return line
            raise EOFError

        return read

    assert read_message(reader("plain")) == "plain"
    assert read_message(reader("a\\", "b\\", "c")) == "a\nb\nc"
    assert read_message(reader('"""one line"""')) == "one line"
    assert read_message(reader('"""start', "", "end", '"""')) == "start\n\nend"
    with pytest.raises(EOFError):
        read_message(reader('"""unterminated'))
    assert read_message(reader(f"{PERSIAN}\\", PERSIAN)) == f"{PERSIAN}\n{PERSIAN}"


# ---------------------------------------------------------------------------------------------
# Rendering


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(width: int = 40) -> tuple[Output, FakeTTY]:
    out = FakeTTY()
    output = Output(out=out, err=io.StringIO())
    output.console.width = width
    return output, out


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_terminal_reply_renders_markdown_and_keeps_persian_intact() -> None:
    output, out = _terminal(width=30)
    output.reply(f"**bold** and `code`\n\n{PERSIAN} {PERSIAN}")
    text = ANSI.sub("", out.getvalue())
    assert "**" not in text and "bold and code" in text
    assert text.count("\u200c") == 2 * PERSIAN.count("\u200c")
    lines = text.splitlines()
    assert all(line == line.rstrip(" ") for line in lines), "padding spaces after the text"
    words = set(PERSIAN.split())
    persian_lines = [line for line in lines if any("\u0600" <= ch <= "\u06ff" for ch in line)]
    assert len(persian_lines) > 1  # wrapped at 30 columns ...
    for line in persian_lines:  # ... between words, never inside one
        assert set(line.split()) <= words


def test_piped_output_is_exact_and_unrendered() -> None:
    out = io.StringIO()
    Output(out=out, err=io.StringIO()).reply(f"**{PERSIAN}**")
    assert out.getvalue() == f"**{PERSIAN}**\n"


def test_reply_printer_streams_plain_pieces_and_ends_with_one_newline() -> None:
    out = io.StringIO()
    printer = ReplyPrinter(Output(out=out, err=io.StringIO()))
    for piece in ["کتاب", "\u200cها", " done"]:
        printer.feed(piece)
    printer.finish()
    printer.finish()
    assert out.getvalue() == "کتاب\u200cها done\n"


def test_reply_printer_on_a_terminal_ends_with_the_whole_reply() -> None:
    output, out = _terminal(width=40)
    printer = ReplyPrinter(output)
    lines = [f"line {n} {PERSIAN[:10]}" for n in range(60)]
    for line in lines:
        printer.feed(line + "\n\n")
    printer.finish()
    final = ANSI.sub("", out.getvalue().split("\r")[-1])
    assert "line 0 " in final and "line 59 " in final


def test_progress_only_on_a_terminal() -> None:
    quiet_err = io.StringIO()
    with Output(out=io.StringIO(), err=quiet_err).progress("working", 3) as advance:
        advance()
    assert quiet_err.getvalue() == ""
    tty_err = FakeTTY()
    output = Output(out=io.StringIO(), err=tty_err)
    with output.progress("working", 3) as advance:
        for _ in range(3):
            advance()
    assert "working" in ANSI.sub("", tty_err.getvalue())


def test_content_text_of_parts() -> None:
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    assert content_text(parts) == "look\n[image: https://x/y.png]\n[image: inline data]"
    assert content_text(None) == ""


# ---------------------------------------------------------------------------------------------
# Help and the command reference


def _help(args: Sequence[str]) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=100, prog_name="gilas-conv")
    assert result.exit_code == 0, result.output
    return result.stdout


def _commands() -> dict[str, Any]:
    """Every command path (``("db", "upgrade")``) and its click command."""
    import click

    found: dict[Any, Any] = {}

    def walk(group: click.Group, path: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, (*path, name))
            else:
                found[(*path, name)] = command

    walk(main, ())
    return found


FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def _help_flags(text: str) -> set[str]:
    options = text.split("Options:", 1)[1]
    return {
        flag
        for line in options.splitlines()
        if line.startswith("  -")
        for flag in FLAG.findall(line.split("  ")[1])
    }


def _cli_reference() -> str:
    """The README's "Command line" section, the command reference."""
    text = README.read_text(encoding="utf-8")
    return text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]


def _doc_sections() -> dict[str, str]:
    parts = re.split(r"^### `gilas-conv ([a-z ]+?)`[^\n]*$", _cli_reference(), flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_command_has_complete_help() -> None:
    top = _help([])
    for path, command in _commands().items():
        text = _help(path)
        assert text.startswith(f"Usage: gilas-conv {' '.join(path)} ")
        assert command.help and len(command.help) > 30, path
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{path} {param.name} has no help"
        if len(path) == 1:
            assert f"  {path[0]} " in top
    assert "..." not in top.split("Commands:")[1], "a command's short help is cut off"


def test_the_command_reference_matches_the_help() -> None:
    sections = _doc_sections()
    commands = {" ".join(path) for path in _commands()}
    assert set(sections) == commands, (
        f"README command sections {sorted(sections)} != commands {sorted(commands)}"
    )
    for name in commands:
        section = sections[name]
        # The global options, accepted after every command too, are described once, above.
        documented = {f for f in FLAG.findall(section.split("#### Example")[0]) if f not in ("-", "--")}
        documented -= set(GLOBAL_OPTIONS)
        in_help = _help_flags(_help(name.split())) - {"-h", "--help"} - set(GLOBAL_OPTIONS)
        assert documented == in_help, (
            f"{name}: the README names {sorted(documented - in_help)} that --help does not, "
            f"and --help names {sorted(in_help - documented)} that the README does not"
        )
        usage = _help(name.split()).splitlines()[0].replace("Usage: ", "")
        assert usage in section, f"{name}: the usage line {usage!r} is not in the README"
    global_flags = _help_flags(_help([])) - {"-h", "--help", "--version"}
    assert global_flags == set(GLOBAL_OPTIONS)
    intro = _cli_reference().split("\n### `gilas-conv ")[0]
    for flag in global_flags:
        assert f"`{flag}" in intro, f"the global option {flag} is not described in the README"


def test_main_module_runs_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import runpy

    from gilas_conv import __version__

    monkeypatch.setattr(sys, "argv", ["gilas-conv", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("gilas_conv", run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"gilas-conv, version {__version__}\n"


# ---------------------------------------------------------------------------------------------
# One dialect (issue 10): -c, --cid, global options after the command, -m, -o, --policy,
# --owner, pin, rename


def test_continue_is_a_flag_and_cid_names_a_conversation(cli: CLI) -> None:
    first = new_conversation(cli, "first")
    second = new_conversation(cli, "second")
    assert cli("send", "-c", "--no-stream", "and then?").stdout == "echo: and then?\n"
    assert cli.stub is not None
    assert user_texts(cli.stub.requests[-1]["body"]) == ["second", "and then?"]
    cli("send", "--conversation", first, "back to first")
    assert user_texts(cli.stub.requests[-1]["body"]) == ["first", "back to first"]
    # -c is now the first conversation, in every command that takes one.
    assert json.loads(cli("show", "-c", "--json").stdout)["id"] == first
    assert json.loads(cli("export", "-c").stdout)["id"] == first
    assert json.loads(cli("tokens", "-c", "--json").stdout)["conversation_id"] == first
    assert json.loads(cli("show", "--cid", second, "--json").stdout)["id"] == second
    fork_id = cli("fork", "-c", "--at", "2").stdout.strip()
    with cli.store() as store:
        assert store.get(fork_id).forked_from == first
        store.get(second).append("user", "pending")
    data = json.loads(cli("retry", "--cid", second, "--json").stdout)
    assert data["conversation_id"] == second and data["message"]["content"] == "echo: pending"
    with cli.store() as store:
        store.get(first).append("user", "pending too")
    assert json.loads(cli("retry", "-c", "--json").stdout)["conversation_id"] == first
    cli("chat", "--cid", second, input="in chat\n")
    assert user_texts(cli.stub.requests[-1]["body"])[-1] == "in chat"


@pytest.mark.parametrize(
    "args",
    [["show", "x", "-c"], ["show", "x", "--cid", "y"], ["send", "-c", "--cid", "y", "hi"], ["show"]],
    ids=lambda a: " ".join(a),
)
def test_naming_a_conversation_twice_or_not_at_all_is_a_usage_error(cli: CLI, args: list[str]) -> None:
    assert "Error" in cli(*args, code=2).stderr


def test_global_options_work_after_the_command(sqlite_url: str, stub: StubServer) -> None:
    runner = CliRunner()
    env = {"GILAS_API_KEY": API_KEY, "GILAS_BASE_URL": "http://127.0.0.1:9/v1"}
    result = runner.invoke(
        main, ["send", "hi", "--db", sqlite_url, "--base-url", stub.base_url, "--timeout", "5"], env=env
    )
    assert result.exit_code == 0, result.output
    listed = runner.invoke(main, ["list", "--json", "--db", sqlite_url], env=env)
    assert [c["title"] for c in json.loads(listed.stdout)] == ["hi"]
    # After the command beats before it; --debug after the command lets the exception through.
    other = f"sqlite:///{Path(sqlite_url[len('sqlite:///') :]).with_name('other.db')}"
    assert json.loads(runner.invoke(main, ["--db", other, "list", "--json", "--db", sqlite_url]).stdout)
    debug = runner.invoke(main, ["--db", sqlite_url, "send", "hi", "--debug"], env={"GILAS_API_KEY": ""})
    assert isinstance(debug.exception, MissingAPIKeyError)
    owned = runner.invoke(main, ["list", "--json", "--db", sqlite_url, "--owner", "alice"])
    assert json.loads(owned.stdout) == []


def test_a_retry_says_that_it_waits_and_for_how_long(cli: CLI) -> None:
    assert cli.stub is not None
    cli.stub.script({"status": 429, "headers": {"retry-after-ms": "50"}}, {"reply": "later"})
    result = cli("send", "hi")
    assert "later" in result.stdout
    assert "Waiting: retry 1 of 2 in 0.05 s; the server asked for 0.05 s" in result.stderr


def test_a_server_asking_to_wait_past_the_deadline_fails_at_once(cli: CLI) -> None:
    assert cli.stub is not None
    cli.stub.script({"status": 429, "headers": {"retry-after": "3600"}})
    line = error_line(cli("send", "hi", "--deadline", "30", code=1))
    assert "deadline of 30 s" in line and "raise --deadline" in line
    assert len(cli.stub.requests) == 1  # no retry was attempted


def test_the_deadline_cuts_a_reply_that_never_ends_and_keeps_what_arrived(cli: CLI) -> None:
    assert cli.stub is not None
    cli.stub.script({"endless": "content", "every": 0.05})
    result = cli("send", "hi", "--deadline", "1", code=1)
    line = error_line(result)
    assert "deadline passed" in line and "after 1 s" in line and "raise --deadline" in line
    with cli.store() as store:
        [conv] = store.list()
        last = conv.last_message()
    assert last is not None and (last.role, last.status) == ("assistant", "incomplete") and last.content


def test_model_option_is_the_conversations_model_from_now_on(cli: CLI) -> None:
    conv_id = new_conversation(cli, "first")
    cli("send", "--cid", conv_id, "-m", "gpt-4o", "second")
    assert cli.stub is not None
    assert cli.stub.requests[-1]["body"]["model"] == "gpt-4o"
    cli("send", "--cid", conv_id, "third")  # no -m: the conversation's model is now gpt-4o
    assert cli.stub.requests[-1]["body"]["model"] == "gpt-4o"
    cli("chat", conv_id, "-m", "gpt-4.1", input="fourth\n")
    cli("retry", conv_id, code=1)  # nothing to retry, but the model stays
    cli("send", "-c", "fifth")
    assert cli.stub.requests[-1]["body"]["model"] == "gpt-4.1"
    assert "conversation's model from now on" in _help(["send"]) and "from now on" in _help(["chat"])


def test_options_are_extra_api_parameters(cli: CLI) -> None:
    cli(
        "send",
        "-o",
        "temperature",
        "0.2",
        "-o",
        "stop",
        '["\\n\\n"]',
        "-o",
        "user",
        "bob",
        "-o",
        "seed",
        "7",
        "hi",
    )
    assert cli.stub is not None
    body = cli.stub.requests[-1]["body"]
    assert (body["temperature"], body["stop"], body["user"], body["seed"]) == (0.2, ["\n\n"], "bob", 7)
    cli("chat", "-o", "temperature", "1", input="one\ntwo\n")
    assert [r["body"]["temperature"] for r in cli.stub.requests[-2:]] == [1, 1]
    assert "-m" in cli("send", "-o", "model", "x", "hi", code=2).stderr


def test_policy_summarize_summarizes_what_does_not_fit(cli: CLI) -> None:
    conv_id = new_conversation(cli, "word " * 300)
    cli("send", "--cid", conv_id, "second")
    assert cli.stub is not None
    before = len(cli.stub.requests)
    cli(
        "send", "--cid", conv_id, "--policy", "summarize", "--context-limit", "300", "--max-tokens", "50", "x"
    )
    assert len(cli.stub.requests) >= before + 2  # a summary request, then the turn
    with cli.store() as store:
        assert store.get(conv_id).summaries()
    assert "Default: truncate" in _help(["send"])
    cli("send", "--policy", "shorten", "hi", code=2)


def test_owner_scopes_every_command(cli: CLI) -> None:
    alice = new_conversation(cli, "--owner", "alice", "hi from alice")
    mine = new_conversation(cli, "mine")
    with cli.store() as store:
        assert store.get(alice, owner="alice").owner == "alice"
    assert [c["id"] for c in json.loads(cli("list", "--json", "--owner", "alice").stdout)] == [alice]
    assert [c["id"] for c in json.loads(cli("--owner", "alice", "list", "--json").stdout)] == [alice]
    assert [c["id"] for c in json.loads(cli("list", "--json").stdout)] == [mine]
    for args in (["show", alice], ["tokens", alice], ["export", alice], ["fork", alice], ["pin", alice, "1"]):
        assert "not found" in error_line(cli(*args, code=1)), args
        cli(*args, "--owner", "alice")
    assert "not found" in error_line(cli("send", "--cid", alice, "hi", code=1))
    cli("send", "--cid", alice, "--owner", "alice", "again")
    cli("rename", alice, "Alice's", "--owner", "alice")
    cli("send", "-c", "--owner", "alice", "latest of alice")
    assert cli.stub is not None
    assert user_texts(cli.stub.requests[-1]["body"])[0] == "hi from alice"
    exported = cli("export", alice, "--owner", "alice").stdout
    [imported] = cli("import", "-", "--owner", "bob", input=exported).stdout.split()
    assert json.loads(cli("list", "--json", "--owner", "bob").stdout)[0]["id"] == imported
    assert "not found" in error_line(cli("rm", "--yes", alice, code=1))
    cli("rm", "--yes", alice, "--owner", "alice")
    with cli.store() as store:
        assert store.count(owner="alice") == 1  # the fork is left


def test_pin_and_rename(cli: CLI) -> None:
    conv_id = new_conversation(cli, "-s", "be brief", "first")
    cli("pin", conv_id, "1", "2")
    with cli.store() as store:
        assert [m.pinned for m in store.get(conv_id).messages()] == [True, True, False]
    assert "[2] user (pinned)" in cli("show", conv_id).stdout
    cli("pin", "--unpin", conv_id, "2")
    line = error_line(cli("pin", conv_id, "3", "9", code=1))
    assert "9" in line
    with cli.store() as store:
        assert [m.pinned for m in store.get(conv_id).messages()] == [True, False, False]
    cli("rename", conv_id, "A", "new", "title")
    assert json.loads(cli("list", "--json").stdout)[0]["title"] == "A new title"
    cli("rename", conv_id, " ", code=2)


def test_multi_line_server_messages_are_folded_and_whole_with_debug(cli: CLI) -> None:
    assert cli.stub is not None
    message = (
        "litellm.BadRequestError: OpenAIException -\nReceived Model Group=x\n\n"
        "Available Model Group Fallbacks=None"
    )
    cli.stub.script({"status": 422, "error": {"message": message}})
    line = error_line(cli("send", "--no-stream", "hi", code=1))
    assert "OpenAIException - Received Model Group=x Available Model Group Fallbacks=None" in line
    cli.stub.script({"status": 422, "error": {"message": message}})
    debug = cli("send", "--no-stream", "hi", code=1, debug=True)
    assert message in str(debug.exception)


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "sqlite:///file::memory:?uri=true"])
def test_an_in_memory_database_is_refused(stub: StubServer, url: str) -> None:
    cli = CLI(url, stub)
    line = error_line(cli("send", "hi", code=1))
    assert "nothing would be kept" in line
    assert stub.requests == []  # refused before anything was sent
    assert "nothing would be kept" in error_line(cli("list", code=1))
    from_env = CliRunner().invoke(main, ["list"], env={"GILAS_CONV_DATABASE_URL": url})
    assert from_env.exit_code == 1 and "nothing would be kept" in from_env.stderr


def test_help_states_real_defaults_and_every_slash_command() -> None:
    from gilas_conv.cli._chat import SLASH_COMMANDS
    from gilas_conv.truncation import DEFAULT_REPLY_RESERVE

    assert f"(default: {DEFAULT_REPLY_RESERVE})" in " ".join(_help(["tokens"]).split())
    chat_help = _help(["chat"])
    for command in SLASH_COMMANDS:
        assert f"  {command}" in chat_help, command
    assert "/quit" in chat_help


def test_terminal_output_shows_control_characters_and_no_markup() -> None:
    output, out = _terminal(width=200)
    hostile = "a\x1b]52;c;eA==\x07b \x9b2J [bold]c[/bold] \x7f\r"
    output.reply(hostile)
    output.line(hostile)
    output.table(["title"], [[hostile]])
    text = out.getvalue()
    assert "\x1b]52" not in text and "\x9b" not in text and "\x07" not in text and "\x7f" not in text
    plain = ANSI.sub("", text)
    assert plain.count("a^[]52;c;eA==^Gb \\x9b2J [bold]c[/bold] ^?^M") == 3
    printer = ReplyPrinter(output)
    printer.feed("\x1b]0;title\x07")
    printer.finish()
    assert "\x1b]0;" not in out.getvalue() and "^[]0;title^G" in ANSI.sub("", out.getvalue())
