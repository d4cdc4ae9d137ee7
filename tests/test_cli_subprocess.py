"""The command line as users run it: real processes, real terminals, a real HTTP server.

Each test starts ``python -m gilas_conv`` (or ``chat`` in a pseudo-terminal through pexpect)
against the stub server, which runs on a thread of the test process and records every
request it receives, so the tests can check what a second process replayed.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest
from stub_server import StubServer

from gilas_conv import ConversationStore

API_KEY = "sk-subprocess-test-93d1"
PERSIAN = "کتاب\u200cها و نیم\u200cفاصله‌ها: mixed فارسی and English"
# A streamed reply long enough to be interrupted: 80 words, 50 ms apart.
SLOW_REPLY = " ".join(f"word{n}" for n in range(80))
SLOW = {"reply": SLOW_REPLY, "chunk_delay": 0.05}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TIMEOUT = 20


@pytest.fixture
def backend() -> str:
    return "sqlite"  # tests that replay across processes ask for both backends


both_backends = pytest.mark.parametrize("backend", ["sqlite", "postgres"])


@pytest.fixture
def env(stub: StubServer, db_url: str) -> dict[str, str]:
    """The environment of the processes: the isolated home of conftest, the key, the stub."""
    return {
        **os.environ,
        "GILAS_API_KEY": API_KEY,
        "GILAS_BASE_URL": stub.base_url,
        "GILAS_CONV_DATABASE_URL": db_url,
        "COLUMNS": "100",
        "LINES": "30",
    }


def run(
    env: dict[str, str], *args: str, input: bytes | None = None, code: int = 0
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [sys.executable, "-m", "gilas_conv", *args],
        input=input,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == code, f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {stderr}"
    if "--debug" not in args:
        assert "Traceback" not in stderr, stderr
    return result


def spawn(env: dict[str, str], *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "gilas_conv", *args],
        env=env,
        encoding="utf-8",
        dimensions=(30, 100),
        timeout=TIMEOUT,
    )
    return child


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus is None, f"killed by signal {child.signalstatus}"
    assert "Traceback" not in (child.before or "")
    return int(child.exitstatus)


def prompt(child: pexpect.spawn) -> None:
    child.expect_exact("\n> ")


def stored_messages(url: str) -> list[Any]:
    with ConversationStore(url) as store:
        conversations = store.list()
        assert len(conversations) == 1, conversations
        return conversations[0].messages()


def sent(stub: StubServer) -> list[tuple[str, str]]:
    body = stub.requests[-1]["body"]
    return [(m["role"], m["content"]) for m in body["messages"]]


# ---------------------------------------------------------------------------------------------
# Two processes, one conversation


@both_backends
def test_chat_resumed_in_a_second_process_replays_the_first_turn(
    env: dict[str, str], stub: StubServer, db_url: str
) -> None:
    first = spawn(env, "chat", "-s", "Be brief.")
    first.expect_exact("/help for commands")
    first.sendline(f"first turn {PERSIAN}")
    first.expect_exact(f"echo: first turn {PERSIAN}")
    prompt(first)
    first.sendeof()  # Ctrl-D at the prompt
    assert finish(first) == 0

    second = spawn(env, "chat", "-c")
    second.expect_exact("Resuming")
    second.expect_exact(f"echo: first turn {PERSIAN}")  # the last turns are shown
    prompt(second)
    second.sendline("second turn")
    second.expect_exact("echo: second turn")
    prompt(second)
    assert sent(stub) == [
        ("system", "Be brief."),
        ("user", f"first turn {PERSIAN}"),
        ("assistant", f"echo: first turn {PERSIAN}"),
        ("user", "second turn"),
    ]
    assert stub.requests[-1]["body"]["stream"] is True
    # Readline history survives the first process: Up twice recalls its line.
    second.send("\x1b[A\x1b[A\r")
    second.expect_exact(f"echo: first turn {PERSIAN}")
    prompt(second)
    second.sendline("/exit")
    assert finish(second) == 0
    assert user_turns(stored_messages(db_url)) == [
        f"first turn {PERSIAN}",
        "second turn",
        f"first turn {PERSIAN}",
    ]


def user_turns(messages: list[Any]) -> list[str]:
    return [m.content for m in messages if m.role == "user"]


@both_backends
def test_send_in_two_processes_replays_and_prints_exact_bytes(
    env: dict[str, str], stub: StubServer, db_url: str
) -> None:
    first = run(env, "send", "--no-stream", "--json", PERSIAN)  # a JSON answer
    conv_id = json.loads(first.stdout)["conversation_id"]
    assert not stub.requests[-1]["body"].get("stream")
    second = run(env, "send", "--cid", conv_id, "-", input=f"دوم {PERSIAN}".encode())  # SSE
    assert stub.requests[-1]["body"]["stream"] is True
    # Piped: the reply exactly as stored, byte for byte, ZWNJ included.
    assert second.stdout == f"echo: دوم {PERSIAN}\n".encode()
    assert sent(stub) == [
        ("user", PERSIAN),
        ("assistant", f"echo: {PERSIAN}"),
        ("user", f"دوم {PERSIAN}"),
    ]
    shown = run(env, "show", conv_id).stdout
    assert f"[1] user\n{PERSIAN}\n\n[2] assistant (gpt-4o-mini)\necho: {PERSIAN}\n".encode() in shown


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def test_chat_ctrl_c_stops_the_streamed_reply_then_twice_exits(
    env: dict[str, str], stub: StubServer, db_url: str
) -> None:
    child = spawn(env, "chat")
    child.expect_exact("/help for commands")
    stub.script(SLOW)
    child.sendline("tell me a long story")
    child.expect_exact("word3")
    child.sendintr()
    child.expect_exact("marked incomplete")
    prompt(child)
    messages = stored_messages(db_url)
    assert [m.role for m in messages] == ["user", "assistant"]
    partial = messages[-1]
    assert partial.status == "incomplete"
    assert partial.content.startswith("word0 word1 word2 word3")
    assert len(partial.content) < len(SLOW_REPLY) and SLOW_REPLY.startswith(partial.content)
    # The chat goes on, and the interrupted reply is not sent back.
    child.sendline("next")
    child.expect_exact("echo: next")
    prompt(child)
    assert sent(stub) == [("user", "tell me a long story"), ("user", "next")]
    # Ctrl-C at the prompt warns; a second one in a row leaves cleanly.
    child.sendintr()
    child.expect_exact("Ctrl-C again or Ctrl-D to exit")
    prompt(child)
    child.sendintr()
    assert finish(child) == 0
    history = Path(env["XDG_DATA_HOME"]) / "gilas-conv" / "chat_history"
    assert history.read_text(encoding="utf-8").splitlines()[-2:] == ["tell me a long story", "next"]


def test_ctrl_c_during_send_keeps_the_partial_reply(
    env: dict[str, str], stub: StubServer, db_url: str
) -> None:
    process, received = _start_slow_send(env, stub)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130
    stderr = err.decode()
    assert "Traceback" not in stderr and "marked incomplete" in stderr
    printed = (received + out).decode().rstrip("\n")
    partial = stored_messages(db_url)[-1]
    assert partial.status == "incomplete"
    # What was printed was stored (and perhaps a little more that had arrived unprinted).
    assert printed.startswith("word0 word1 word2 word3") and partial.content.startswith(printed)
    assert len(partial.content) < len(SLOW_REPLY)


# ---------------------------------------------------------------------------------------------
# Errors, pipes, terminals


def test_error_paths_exit_with_the_documented_code(env: dict[str, str]) -> None:
    no_key = run({**env, "GILAS_API_KEY": ""}, "send", "hi", code=1)
    lines = no_key.stderr.decode().strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("Error: GILAS_API_KEY is not set")
    assert run(env, "frobnicate", code=2).stderr.startswith(b"Usage: gilas-conv")
    debug = run({**env, "GILAS_API_KEY": ""}, "--debug", "send", "hi", code=1)
    assert b"Traceback" in debug.stderr and b"MissingAPIKeyError" in debug.stderr
    with ConversationStore(env["GILAS_CONV_DATABASE_URL"]) as store:
        assert store.count() == 0  # a missing key stops before anything is stored


def test_a_closed_pipe_ends_export_quietly(env: dict[str, str], tmp_path: Path) -> None:
    lines = "\n".join(
        json.dumps({"title": f"c{n}", "messages": [{"role": "user", "content": "x" * 20_000}]})
        for n in range(60)
    )
    (tmp_path / "many.jsonl").write_text(lines, encoding="utf-8")
    run(env, "import", str(tmp_path / "many.jsonl"))
    process = subprocess.Popen(
        [sys.executable, "-m", "gilas_conv", "export", "--all"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    assert json.loads(process.stdout.readline())["messages"]
    process.stdout.close()  # like `| head -1`
    with process.stderr:
        stderr = process.stderr.read().decode()
    process.wait(timeout=TIMEOUT)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_progress_is_shown_when_stderr_is_a_terminal(env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "many.jsonl"
    source.write_text(
        "\n".join(json.dumps({"messages": [{"role": "user", "content": f"m{n}"}]}) for n in range(120)),
        encoding="utf-8",
    )
    ids = tmp_path / "ids.txt"
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", f'"{sys.executable}" -m gilas_conv import "{source}" > "{ids}"'],
        env=env,
        encoding="utf-8",
        timeout=TIMEOUT,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    screen = ANSI.sub("", child.before)
    assert "importing" in screen and "imported 120 conversations" in screen
    assert len(ids.read_text().split()) == 120
    piped = run(env, "export", "--all")
    assert piped.stderr == b""  # no progress bar when stderr is not a terminal
    assert len(piped.stdout.splitlines()) == 120


def test_terminal_output_renders_markdown(env: dict[str, str], stub: StubServer) -> None:
    stub.script({"reply": f"# Title\n\n**bold {PERSIAN}**\n"})
    child = spawn(env, "send", "--no-stream", "markdown please")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    screen = ANSI.sub("", child.before)
    assert f"bold {PERSIAN}" in screen and "**" not in screen and "# Title" not in screen


def test_console_script_and_module_agree(env: dict[str, str]) -> None:
    module = run(env, "--help").stdout
    script = Path(sys.executable).with_name("gilas-conv")
    if not script.exists():
        pytest.skip("the gilas-conv console script is not installed in this environment")
    installed = subprocess.run([str(script), "--help"], capture_output=True, env=env, timeout=TIMEOUT)
    assert installed.returncode == 0, installed.stderr.decode()
    assert installed.stdout.decode() == module.decode()


# ---------------------------------------------------------------------------------------------
# SIGTERM and SIGHUP keep the partial reply, as Ctrl-C does (issue 8 item C)


def _start_slow_send(env: dict[str, str], stub: StubServer) -> tuple[subprocess.Popen[bytes], bytes]:
    """`send go` with a slow streamed reply, once "word3" has been printed."""
    stub.script(SLOW)
    process = subprocess.Popen(
        [sys.executable, "-m", "gilas_conv", "send", "go"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    received = b""
    deadline = time.monotonic() + TIMEOUT
    while b"word3" not in received and time.monotonic() < deadline:
        received += os.read(process.stdout.fileno(), 100)
    return process, received


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_during_send_keep_the_partial_reply(
    env: dict[str, str], stub: StubServer, db_url: str, sig: signal.Signals
) -> None:
    process, received = _start_slow_send(env, stub)
    process.send_signal(sig)
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 128 + sig, err.decode()
    assert "Traceback" not in err.decode() and "marked incomplete" in err.decode()
    printed = (received + out).decode().rstrip("\n")
    partial = stored_messages(db_url)[-1]
    assert partial.role == "assistant" and partial.status == "incomplete"
    assert printed.startswith("word0 word1 word2 word3") and partial.content.startswith(printed)
    shown = run(env, "show", "-c").stdout.decode()
    assert "[2] assistant (gpt-4o-mini, incomplete)\nword0 word1 word2 word3" in shown


def test_two_quick_ctrl_c_still_store_the_partial_reply_and_exit_130(
    env: dict[str, str], stub: StubServer, db_url: str
) -> None:
    process, _received = _start_slow_send(env, stub)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    partial = stored_messages(db_url)[-1]
    assert partial.status == "incomplete" and partial.content.startswith("word0 word1 word2 word3")


def test_a_closed_terminal_during_chat_keeps_the_partial_reply(
    env: dict[str, str], stub: StubServer, db_url: str
) -> None:
    child = spawn(env, "chat")
    child.expect_exact("/help for commands")
    stub.script(SLOW)
    child.sendline("tell me a long story")
    child.expect_exact("word3")
    child.kill(signal.SIGHUP)
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus is None and child.exitstatus == 128 + signal.SIGHUP
    partial = stored_messages(db_url)[-1]
    assert partial.status == "incomplete" and partial.content.startswith("word0 word1 word2 word3")


# ---------------------------------------------------------------------------------------------
# Escape sequences from outside do not reach the terminal (issue 9 item 4)

# A window title (OSC 0), a clipboard write (OSC 52), clear-screen (CSI 2J), a one-character
# C1 CSI (U+009B), DEL, a carriage return that would overwrite the line, and rich markup.
HOSTILE = "A\x1b]0;pwned\x07B \x1b]52;c;ZWNobyBwd25lZA==\x07C \x1b[2JD \x9b31mE \x7fF G\rH [bold]I[/bold] J"
RAW_SEQUENCES = ["\x1b]0;", "\x1b]52;", "\x1b[2J", "\x9b", "\x7f", "\x07"]


def _terminal_screen(env: dict[str, str], *args: str) -> str:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "gilas_conv", *args],
        env=env,
        encoding="utf-8",
        dimensions=(30, 200),
        timeout=TIMEOUT,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def _assert_neutralized(screen: str) -> None:
    for raw in RAW_SEQUENCES:
        assert raw not in screen, f"{raw!r} reached the terminal"
    text = ANSI.sub("", screen)  # rich's own styling
    for shown in ("A^[]0;pwned^GB", "^[]52;c;ZWNobyBwd25lZA==^GC", "^[[2JD", "\\x9b31mE", "^?F", "G^MH"):
        assert shown in text, (shown, text)
    assert "[bold]I[/bold]" in text


def _hostile_conversation(url: str) -> str:
    with ConversationStore(url) as store:
        conv = store.create(title=f"title {HOSTILE}")
        conv.append("user", f"question {HOSTILE}")
        conv.append("assistant", f"answer {HOSTILE}", model="gpt-4o-mini")
        return conv.id


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_reply_cannot_drive_the_terminal(env: dict[str, str], stub: StubServer, stream: bool) -> None:
    stub.script({"reply": HOSTILE})
    screen = _terminal_screen(env, "send", *([] if stream else ["--no-stream"]), "hi")
    _assert_neutralized(screen)


def test_stored_text_cannot_drive_the_terminal_in_show_list_and_chat(
    env: dict[str, str], db_url: str
) -> None:
    conv_id = _hostile_conversation(db_url)
    _assert_neutralized(_terminal_screen(env, "show", conv_id))
    listed = _terminal_screen(env, "list")
    for raw in RAW_SEQUENCES:
        assert raw not in listed
    assert "^[]0;pwned^G" in ANSI.sub("", listed)
    chat = spawn(env, "chat", conv_id)
    chat.logfile_read = screen = io.StringIO()
    chat.expect_exact("Resuming")
    prompt(chat)
    chat.sendeof()
    assert finish(chat) == 0
    _assert_neutralized(screen.getvalue())


def test_an_error_message_cannot_drive_the_terminal(env: dict[str, str], stub: StubServer) -> None:
    stub.script({"status": 422, "error": {"message": f"bad\nrequest {HOSTILE}"}})
    child = spawn(env, "send", "--no-stream", "hi")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    screen = str(child.before)
    for raw in RAW_SEQUENCES:
        assert raw not in screen
    errors = [line for line in ANSI.sub("", screen).splitlines() if "Error:" in line]
    assert len(errors) == 1 and "bad request A^[]0;pwned^GB" in errors[0]


def test_piped_output_stays_byte_exact(env: dict[str, str], stub: StubServer, db_url: str) -> None:
    conv_id = _hostile_conversation(db_url)
    with ConversationStore(db_url) as store:
        export = store.get(conv_id).export()
    exact = json.dumps(export, ensure_ascii=False, indent=2) + "\n"
    assert run(env, "export", conv_id).stdout == exact.encode()
    assert run(env, "show", conv_id, "--json").stdout == exact.encode()
    assert json.loads(run(env, "export", "--all").stdout) == json.loads(exact)
    assert f"answer {HOSTILE}\n".encode() in run(env, "show", conv_id).stdout
    stub.script({"reply": HOSTILE})
    assert run(env, "send", "hi").stdout == f"{HOSTILE}\n".encode()
