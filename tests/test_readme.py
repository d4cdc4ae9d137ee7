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
    assert "store.search" in blocks[3]


def test_the_readme_examples_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GILAS_CONV_DATABASE_URL", f"sqlite:///{tmp_path / 'readme.db'}")
    monkeypatch.setenv("GILAS_API_KEY", API_KEY)
    store_only, streaming, tools, search = _python_blocks()
    namespace: dict[str, Any] = {}
    exec(compile(store_only, "README.md (store)", "exec"), namespace)
    search_namespace = dict(namespace)
    exec(compile(search, "README.md (search)", "exec"), search_namespace)
    (hit,) = namespace["store"].search('"به تهران" بهار* میخواهم')
    assert hit.snippet == "[مي‌خواهم] در [بهار] [به] [تهران] بروم"
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
