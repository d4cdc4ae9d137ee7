"""The README's Python examples run as written: against a real SQLite file and the local stub
server, so a renamed argument or a changed return value breaks this test, not a newcomer."""

from __future__ import annotations

import re
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
    assert len(blocks) == 4
    assert "build_context" in blocks[0] and "sender.stream" in blocks[1] and "tool_calls" in blocks[2]
    assert "extra_body" in blocks[3]


def test_the_readme_examples_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GILAS_CONV_DATABASE_URL", f"sqlite:///{tmp_path / 'readme.db'}")
    monkeypatch.setenv("GILAS_API_KEY", API_KEY)
    store_only, streaming, tools, _gateway = _python_blocks()
    namespace: dict[str, Any] = {}
    exec(compile(store_only, "README.md (store)", "exec"), namespace)
    ctx = namespace["ctx"]
    assert [m["role"] for m in ctx.messages] == ["system", "user", "assistant", "user"]
    assert ctx.dropped == 0
    assert namespace["branch"].message_count == 3

    with StubServer(api_key=API_KEY) as server:
        monkeypatch.setenv("GILAS_BASE_URL", server.base_url)
        exec(compile(streaming, "README.md (sender)", "exec"), namespace)
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
