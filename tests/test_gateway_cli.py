"""`gilas-conv keys` and `gilas-conv serve` as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest
from _gateway import free_port
from stub_server import StubServer

from gilas_conv import ConversationStore

API_KEY = "sk-gateway-cli-upstream"
TIMEOUT = 30


@pytest.fixture
def env(stub: StubServer, db_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "GILAS_API_KEY": API_KEY,
        "GILAS_BASE_URL": stub.base_url,
        "GILAS_CONV_DATABASE_URL": db_url,
    }


def run(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "gilas_conv", *args], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    return result


@contextmanager
def serving(env: dict[str, str], *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gilas_conv", "serve", "--port", str(port), *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "Application startup complete" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(TIMEOUT):
            raise AssertionError("serve did not start:\n" + "".join(lines))
        assert any(f"listening on http://127.0.0.1:{port}/v1" in line for line in lines), lines
        yield process, f"http://127.0.0.1:{port}/v1"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(TIMEOUT)
        reader.join(5)
        assert process.stderr is not None
        process.stderr.close()
    assert not any("Traceback" in line for line in lines), "".join(lines)


def test_keys_create_list_revoke(env: dict[str, str]) -> None:
    key = run(env, "keys", "create", "--owner", "alice").stdout
    assert key.endswith("\n") and key.count("\n") == 1 and key.startswith("gc-")
    key = key.strip()
    listed = json.loads(run(env, "keys", "list", "--json").stdout)
    assert [(k["owner"], k["revoked_at"]) for k in listed] == [("alice", None)]
    assert key not in json.dumps(listed) and key[:11] == listed[0]["prefix"]
    text = run(env, "keys", "list").stdout
    assert "alice" in text and key not in text
    run(env, "keys", "revoke", listed[0]["id"])
    assert json.loads(run(env, "keys", "list", "--json").stdout)[0]["revoked_at"] is not None
    missing = run(env, "keys", "revoke", "gc-not-a-real-key", code=1)
    assert "gc-not-a-real-key" not in missing.stderr


def test_no_auth_is_refused_off_loopback(env: dict[str, str]) -> None:
    result = run(env, "serve", "--no-auth", "--host", "0.0.0.0", code=2)
    assert "loopback" in result.stderr


def test_serve_then_sigterm_mid_stream_stores_what_arrived(
    env: dict[str, str], stub: StubServer, db_url: str
) -> None:
    key = run(env, "keys", "create", "--owner", "me").stdout.strip()
    with serving(env, "--graceful-timeout", "1") as (process, url):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        cid = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        ).conversation  # type: ignore[attr-defined]
        stub.script({"reply": " ".join(f"w{n}" for n in range(40)), "chunk_delay": 0.2})
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "long"}],
            extra_body={"conversation": cid},
            stream=True,
        )
        received = ""
        with pytest.raises(Exception):  # noqa: B017  (the cut surfaces as whatever httpx says)
            for chunk in stream:
                received += chunk.choices[0].delta.content or ""
                if received.count(" ") == 2:
                    process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the SIGTERM it handled once shutdown is done.
        assert process.wait(TIMEOUT) in (0, -signal.SIGTERM)
    with ConversationStore(db_url) as store:
        messages = store.get(cid, owner="me").messages()
    assert [(m.role, m.status) for m in messages] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "incomplete"),
    ]
    assert messages[-1].content.startswith(received[:6])


def test_serve_with_two_workers(env: dict[str, str], db_url: str) -> None:
    key = run(env, "keys", "create", "--owner", "me").stdout.strip()
    with serving(env, "--workers", "2") as (_process, url):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        ids = {
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {n}"}]
            ).conversation  # type: ignore[attr-defined]
            for n in range(4)
        }
    assert len(ids) == 4
    with ConversationStore(db_url) as store:
        assert store.count(owner="me") == 4
