"""The README's examples run as written: the Python examples and the command-line sessions,
against a real SQLite file and the local stub server, so a renamed argument, option or
return value breaks this test, not a newcomer. (The command reference itself is checked
against --help in test_cli.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from stub_server import StubServer

README = Path(__file__).resolve().parent.parent / "README.md"
API_KEY = "sk-readme-test"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_the_examples_this_test_runs() -> None:
    blocks = _python_blocks()
    assert len(blocks) == 5
    assert "build_context" in blocks[0] and "sender.stream" in blocks[1] and "tool_calls" in blocks[2]
    assert "extra_body" in blocks[3]
    assert "store.search" in blocks[4]


def test_the_readme_examples_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GILAS_CONV_DATABASE_URL", f"sqlite:///{tmp_path / 'readme.db'}")
    monkeypatch.setenv("GILAS_API_KEY", API_KEY)
    store_only, streaming, tools, _gateway, search = _python_blocks()
    namespace: dict[str, Any] = {}
    with contextlib.ExitStack() as closing:

        def run(block: str, name: str, into: dict[str, Any]) -> None:
            try:
                exec(compile(block, f"README.md ({name})", "exec"), into)
            finally:  # each example opens a store and leaves it open, as a script may
                if "store" in into:
                    closing.callback(into["store"].close)

        run(store_only, "store", namespace)
        search_namespace = dict(namespace)
        run(search, "search", search_namespace)
        (hit,) = namespace["store"].search('"به تهران" بهار* میخواهم')
        assert hit.snippet == "[مي‌خواهم] در [بهار] [به] [تهران] بروم"
        ctx = namespace["ctx"]
        assert [m["role"] for m in ctx.messages] == ["system", "user", "assistant", "user"]
        assert ctx.dropped == 0
        assert namespace["branch"].message_count == 3

        with StubServer(api_key=API_KEY) as server:
            monkeypatch.setenv("GILAS_BASE_URL", server.base_url)
            run(streaming, "sender", namespace)
            stream = namespace["stream"]
            assert stream.message.status == "complete"
            assert stream.message.content == "echo: Where was the final played?"

            # The tool-calling example, with the sender kept open: one tool call, then the answer.
            server.script(
                {"tool_calls": [{"name": "get_weather", "arguments": '{"city": "Tehran"}', "id": "call_1"}]},
                {"reply": "۲۱ درجه"},
            )
            from gilas_conv import Sender

            with Sender(namespace["store"]) as sender:
                exec(compile(tools, "README.md (tools)", "exec"), {**namespace, "sender": sender})
            conv = namespace["store"].get(namespace["conv"].id)
            roles = [m.role for m in conv.messages()]
            assert roles[-4:] == ["user", "assistant", "tool", "assistant"]
            assert conv.messages()[-1].content == "۲۱ درجه"
            *_, call, result = server.requests[-1]["body"]["messages"]
            assert call["tool_calls"][0]["id"] == result["tool_call_id"] == "call_1"
            assert result["content"] == '{"city": "Tehran", "celsius": 21}'


# ---------------------------------------------------------------------------------------------
# The command-line example sessions


# Conversation ids and client key ids: the README's are mapped to those really printed.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\bkey_[0-9a-f]{16}\b")
_IMAGINARY_POSTGRES = "postgresql://gilas@db.internal/conversations"
_SH_GILAS_CONV_LINES = {"gilas-conv db upgrade", "gilas-conv serve"}


@dataclass
class _Step:
    command: str
    expected: str = ""

    def stdin(self) -> str:
        """What the session typed: chat's prompt lines, rm's answer."""
        if "[y/N]: y" in self.expected:
            return "y\n"
        if not re.match(r"gilas-conv chat\b", self.command):
            return ""
        typed, in_block = [], False
        for line in self.expected.splitlines():
            if line.startswith("> "):
                text = line[2:]
                typed.append(text)
                in_block = text.startswith('"""') and not (len(text) > 3 and text.endswith('"""'))
                in_block = in_block or text.endswith("\\")
            elif in_block and line.startswith("... "):
                text = line[4:]
                typed.append(text)
                in_block = not text.endswith('"""') and (text.endswith("\\") or in_block)
        return "\n".join(typed) + ("\n" if typed else "")


def _sessions() -> list[_Step]:
    steps: list[_Step] = []
    for block in re.findall(r"```console\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append(_Step(line[2:]))
            elif steps:
                steps[-1].expected += line + "\n"
    return steps


def test_the_sh_blocks_hold_no_other_gilas_conv_example() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    commands = {
        re.sub(r"\s+#.*", "", line).strip()
        for block in blocks
        for line in block.splitlines()
        if line.startswith("gilas-conv")
    }
    assert commands == _SH_GILAS_CONV_LINES


def test_the_readme_sessions_run(tmp_path: Path) -> None:
    """The README's ``console`` sessions run.

    Every ``$ `` line runs in bash, in order, in one scratch directory, against one scratch
    SQLite database and the stub server (whose replies are ``echo: ...``, so the replies shown
    in the README are not compared; what is checked is that each command runs, exits 0, or 1
    where the README shows an ``Error:`` line, and prints no traceback). The conversation ids of
    the README (and the ids of client keys) are mapped to the ids the commands really print, in
    order of first appearance,
    so later commands use the real ones. What cannot run as written, and what is done instead:

    * ``export GILAS_API_KEY=...`` sets the key in the shell: the test sets it in the
      environment of every command instead.
    * the example of a missing key runs with ``GILAS_API_KEY`` unset.
    * the example of a failed send (``HTTP 503``) runs with the stub scripted to answer 503
      (three times: the first request and its two retries).
    * ``postgresql://gilas@db.internal/conversations`` names a server that does not exist: the
      command runs with a scratch SQLite URL in its place.
    * ``conversations.json`` is the ChatGPT export fixture of tests/data.
    * ``git diff`` runs in a scratch git repository holding one changed file; ``bad.jsonl`` is a
      scratch file whose line 2 has an unknown role.
    * ``chat`` reads the lines typed at its ``> `` prompts (and the ``... `` lines of a block)
      from a pipe, so the Ctrl-C shown in the middle of a reply cannot be sent: that turn runs
      to the end (stopping a reply is tested in test_cli_subprocess.py). ``rm`` reads the ``y``
      answered to its question.

    * ``serve`` runs until it is stopped: it is started on a free port, must print the line
      the README shows (where it listens), and is stopped with SIGTERM.

    The ``sh`` blocks are installation steps (a virtualenv, pip, pytest) and are not run; the
    gilas-conv commands among them (``gilas-conv db upgrade``, ``gilas-conv serve``) are the
    same as the sessions of those commands, which run.
    """
    steps = _sessions()
    assert len(steps) > 30 and any(s.command.startswith("gilas-conv chat -s") for s in steps)
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "gilas-conv"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gilas_conv "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    (work / "bad.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "ok"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "wizard", "content": "x"}]})
        + "\n",
        encoding="utf-8",
    )
    # The ChatGPT export the import session names: the test fixture.
    shutil.copy(Path(__file__).parent / "data" / "chatgpt_conversations.json", work / "conversations.json")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=work, check=True)
    (work / "patch.py").write_text("x = 1\n", encoding="utf-8")
    subprocess.run([*git, "add", "patch.py"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=work, check=True)
    (work / "patch.py").write_text("x = 2\n", encoding="utf-8")
    ids: dict[str, str] = {}
    with StubServer(api_key=API_KEY) as server:
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "GILAS_API_KEY": API_KEY,
            "GILAS_BASE_URL": server.base_url,
            "GILAS_CONV_DATABASE_URL": f"sqlite:///{tmp_path / 'readme.db'}",
        }
        for step in steps:
            if step.command.startswith("export GILAS_API_KEY="):
                continue
            command = step.command.replace(_IMAGINARY_POSTGRES, f"sqlite:///{tmp_path / 'upgraded.db'}")
            for readme_id, real_id in ids.items():
                command = command.replace(readme_id, real_id)
            step_env = dict(env)
            if "GILAS_API_KEY is not set" in step.expected:
                step_env["GILAS_API_KEY"] = ""
            if "HTTP 503" in step.expected:
                server.script(*[{"status": 503, "headers": {"retry-after-ms": "10"}}] * 3)
            if command.startswith("gilas-conv serve"):
                _serve_prints_where_it_listens(command, work, step_env)
                continue
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=work,
                env=step_env,
                input=step.stdin().encode(),
                capture_output=True,
                timeout=60,
            )
            out = result.stdout.decode() + result.stderr.decode()
            expected_code = 1 if "Error:" in step.expected else 0
            assert result.returncode == expected_code, f"$ {command}\n{out}"
            assert "Traceback" not in out, f"$ {command}\n{out}"
            new_readme = [u for u in dict.fromkeys(_UUID.findall(step.expected)) if u not in ids]
            new_real = [u for u in dict.fromkeys(_UUID.findall(out)) if u not in ids.values()]
            ids.update(zip(new_readme, new_real, strict=False))
    assert len(ids) >= 5  # the conversations the sessions name were all created


def _serve_prints_where_it_listens(command: str, work: Path, env: dict[str, str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [*shlex.split(re.sub(r"--port \d+", f"--port {port}", command))]
    argv[0] = shutil.which("gilas-conv", path=env["PATH"]) or argv[0]
    process = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        line = b""
        while time.monotonic() < deadline and b"listening on" not in line:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
        assert f"listening on http://127.0.0.1:{port}/v1".encode() in line, line
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def test_the_readme_gateway_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from _gateway import running_gateway

    from gilas_conv import ConversationStore
    from gilas_conv.store import APIKeys

    example = _python_blocks()[3]
    with (
        StubServer(api_key="sk-gateway-upstream") as server,
        ConversationStore(f"sqlite:///{tmp_path / 'gateway.db'}") as store,
    ):
        key = APIKeys(store).create(owner="me")[0]
        with running_gateway(store, server.base_url) as gateway:
            code = example.replace("http://127.0.0.1:8080/v1", gateway.url)
            namespace: dict[str, Any] = {"KEY": key}
            exec(compile(code, "README.md (gateway)", "exec"), namespace)
        conv = store.get(namespace["conversation"], owner="me")
        assert [m.role for m in conv.messages()] == ["system", "user", "assistant"] + [
            "user",
            "assistant",
        ] * 2
        assert server.requests[-1]["body"]["messages"][-1]["content"] == "One more fact."
    assert capsys.readouterr().out.endswith("echo: One more fact.")
