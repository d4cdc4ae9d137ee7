"""Portable history: a ChatGPT export and OpenAI conversation items imported (converters
pure, imports through the store, all or nothing), conversations exported as Markdown, and
the `import`, `export` and `search` commands end to end on a real SQLite file and Postgres."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gilas_conv import ConversationStore
from gilas_conv.cli import main
from gilas_conv.portable import chatgpt, load, openai_items, to_markdown

DATA = Path(__file__).resolve().parent / "data"
CHATGPT = DATA / "chatgpt_conversations.json"
ITEMS = DATA / "openai_items.json"


def chatgpt_data() -> list[dict[str, Any]]:
    return json.loads(CHATGPT.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# ChatGPT export (pure)


def test_chatgpt_follows_the_branch_last_seen_and_keeps_what_is_not_text() -> None:
    converted = chatgpt.convert(chatgpt_data())
    assert [c["title"] for c in converted.conversations] == ["سفر به تهران", "Weather plan"]
    trip = converted.conversations[0]
    assert trip["model"] == "gpt-4o"
    assert trip["metadata"] == {"source": "chatgpt", "chatgpt_id": "6650aaaa-1111-2222-3333-444455556666"}
    assert trip["created_at"] == "2024-05-29T16:26:40.500000+00:00"
    roles = [m["role"] for m in trip["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "assistant", "assistant"]
    texts = [m["content"] for m in trip["messages"]]
    assert texts[0] == "مي‌خواهم به تهران بروم. چه پیشنهادی داری؟"  # kept byte for byte
    assert not any("OLD BRANCH" in t for t in texts)  # the regenerated branch is not imported
    assert "[image: file-Abc123, 1024×768]" in texts[2]
    assert "[attached file: itinerary.pdf (application/pdf)]" in texts[2]
    assert texts[3].startswith("[code for python]\n```python\nprint(435 * 2)")
    assert texts[4] == "[python output]\n```\n870\n```"
    assert trip["messages"][5]["status"] == "incomplete"  # ChatGPT says it was interrupted
    assert trip["messages"][1]["created_at"] == "2024-05-29T16:27:10.500000+00:00"
    weather = converted.conversations[1]
    assert weather["messages"][1]["content"].startswith("[browser output]\n[browsing result]\nShiraz: sunny")
    skipped = dict(converted.skipped)
    assert any("hidden" in reason and "system" in reason for reason in skipped.values())
    assert skipped["conversation 2 ('New chat')"] == "no visible messages"
    assert converted.labels == ["conversation 1 ('سفر به تهران')", "conversation 3 ('Weather plan')"]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda c: c.update(current_node="nowhere"), "current_node 'nowhere' is not in the mapping"),
        (lambda c: c["mapping"]["u"].update(parent="q"), "cycle"),
        (lambda c: c["mapping"]["u"]["message"].update(create_time="yesterday"), "seconds since the epoch"),
        (lambda c: c.pop("mapping"), "mapping"),
    ],
)
def test_a_broken_chatgpt_conversation_is_named(breakage: Any, message: str) -> None:
    data = chatgpt_data()
    breakage(data[2])
    with pytest.raises(ValueError, match="conversation 3 \\('Weather plan'\\)") as info:
        chatgpt.convert(data)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# OpenAI conversation items (pure)


def test_openai_items_become_messages_and_tool_calls() -> None:
    raw = json.loads(ITEMS.read_text(encoding="utf-8"))
    for data in (raw, raw["data"]):
        assert openai_items.looks_like_items(data)
        converted = openai_items.convert(data)
        (conversation,) = converted.conversations
        messages = conversation["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
        assert messages[0]["content"] == "هوای تهران چطور است؟\n[image: file-img1]"
        assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_a", "call_b"]
        assert messages[1]["tool_calls"][0]["function"] == {
            "name": "get_weather",
            "arguments": '{"city": "Tehran"}',
        }
        assert messages[2] == {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 31}'}
        assert conversation["title"] == "هوای تهران چطور است؟"
        assert converted.skipped == [("the file, item 2", "reasoning item without a summary")]


def test_load_recognizes_formats_by_content(tmp_path: Path) -> None:
    assert load(CHATGPT.read_bytes())[0] == "chatgpt"
    assert load(ITEMS.read_bytes())[0] == "openai-items"
    assert load(json.dumps([{"role": "user", "content": "hi"}]).encode())[0] == "gilas"
    with pytest.raises(ValueError, match="ChatGPT"):
        load(CHATGPT.read_bytes(), format="openai-items")
    with pytest.raises(ValueError, match="unknown import format"):
        load(b"[]", format="csv")


# ---------------------------------------------------------------------------------------------
# Markdown (pure)


def test_markdown_reads_as_a_document() -> None:
    exported = {
        "id": "c-1",
        "title": "سفر",
        "model": "gpt-4o-mini",
        "created_at": "2026-01-01T10:00:00+00:00",
        "updated_at": "2026-01-01T10:05:00+00:00",
        "metadata": None,
        "messages": [
            {"role": "user", "content": "سلام، مي‌خواهم بروم", "created_at": "2026-01-01T10:00:00+00:00"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"x": "' + "y" * 500 + '"}'},
                    }
                ],
                "created_at": "2026-01-01T10:01:00+00:00",
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": "has ``` fences",
                "created_at": "2026-01-01T10:01:01+00:00",
            },
            {
                "role": "assistant",
                "content": "جواب نیمه",
                "status": "incomplete",
                "created_at": "2026-01-01T10:02:00+00:00",
            },
        ],
    }
    document = to_markdown(exported)
    assert document.startswith("# سفر\n\n- **Model:** gpt-4o-mini\n- **Conversation:** `c-1`\n")
    assert "### 1. User · 2026-01-01 10:00 UTC\n\nسلام، مي‌خواهم بروم\n" in document
    assert "- **Tool call** `f`" in document and "y" * 500 not in document
    assert "````\nhas ``` fences\n````" in document
    assert "### 4. Assistant · 2026-01-01 10:02 UTC · *incomplete*\n\nجواب نیمه" in document


# ---------------------------------------------------------------------------------------------
# The commands, end to end


def run(url: str, *args: str, code: int = 0, input: bytes | None = None) -> Result:
    result = CliRunner().invoke(main, ["--db", url, *args], input=input)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def test_done_means(db_url: str, tmp_path: Path) -> None:
    """The issue's "Done means": import a ChatGPT export, find "میخواهم" stored as
    "مي‌خواهم", export the conversation as Markdown."""
    export_file = tmp_path / "conversations.json"
    export_file.write_bytes(CHATGPT.read_bytes())
    imported = run(db_url, "import", str(export_file))
    ids = imported.stdout.split()
    assert len(ids) == 2
    assert "skipped conversation 2 ('New chat'): no visible messages" in imported.stderr
    assert "imported 2 conversations (chatgpt format)" in imported.stderr

    found = json.loads(run(db_url, "search", "میخواهم", "--json").stdout)
    assert [(h["conversation_id"], h["seq"], h["role"]) for h in found] == [(ids[0], 1, "user")]
    assert found[0]["snippet"].startswith("[مي‌خواهم] به تهران بروم")
    assert found[0]["title"] == "سفر به تهران"

    plain = run(db_url, "search", "برج", "میلاد").stdout
    assert f"gilas-conv chat {ids[0]}" in plain
    assert "[برج] [میلاد]" in plain

    document = run(db_url, "export", ids[0], "--format", "markdown").stdout
    assert document.startswith("# سفر به تهران\n")
    assert "مي‌خواهم به تهران بروم" in document
    assert "*incomplete*" in document


def test_import_the_zip_chatgpt_sends(db_url: str, tmp_path: Path) -> None:
    archive = tmp_path / "chatgpt-export.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("chat.html", "<html></html>")
        zipped.writestr("conversations.json", CHATGPT.read_bytes())
    ids = run(db_url, "import", str(archive)).stdout.split()
    assert len(ids) == 2
    with ConversationStore(db_url) as store:
        assert store.get(ids[1]).title == "Weather plan"
        assert [m.role for m in store.get(ids[1]).messages()] == ["user", "assistant", "assistant"]


def test_a_bad_conversation_refuses_the_whole_file(db_url: str, tmp_path: Path) -> None:
    data = chatgpt_data()
    broken = copy.deepcopy(data[2])
    broken["current_node"] = "gone"
    data.append(broken)
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    result = run(db_url, "import", str(path), code=1)
    assert "conversation 4 ('Weather plan'): current_node 'gone' is not in the mapping" in result.stderr
    assert "nothing was imported" in result.stderr
    with ConversationStore(db_url) as store:
        assert store.count() == 0
        assert store.search("Shiraz") == []


def test_import_openai_items_and_forced_formats(db_url: str, tmp_path: Path) -> None:
    (cid,) = run(db_url, "import", str(ITEMS)).stdout.split()
    with ConversationStore(db_url) as store:
        messages = store.get(cid).messages()
        assert [m.role for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
        assert [h.seq for h in store.search("آفتابی")] == [5]
        assert [h.seq for h in store.search("14")] == [4]  # a tool result is searched
        assert store.search("get_weather") == []  # tool-call JSON is not
    run(db_url, "import", "--format", "gilas", str(ITEMS), code=1)
    forced = run(db_url, "import", "--format", "openai-items", str(CHATGPT), code=1)
    assert "looks like a ChatGPT export" in forced.stderr


def test_export_formats(db_url: str) -> None:
    with ConversationStore(db_url) as store:
        conv = store.create(model="gpt-4o-mini", title="t")
        conv.append("user", "hello")
        other = store.create(model="gpt-4o-mini", title="u")
        other.append("user", "bye")
    as_json = json.loads(run(db_url, "export", conv.id, "--format", "json").stdout)
    assert as_json["messages"][0]["content"] == "hello"
    line = run(db_url, "export", conv.id, "--format", "jsonl").stdout
    assert line.count("\n") == 1 and json.loads(line)["id"] == conv.id
    every = run(db_url, "export", "--all").stdout.splitlines()
    assert {json.loads(x)["id"] for x in every} == {conv.id, other.id}
    documents = run(db_url, "export", "--all", "--format", "markdown").stdout
    assert documents.count("\n# ") + documents.startswith("# ") == 2


def test_search_command_scopes_and_errors(db_url: str) -> None:
    with ConversationStore(db_url) as store:
        mine = store.create(model="gpt-4o-mini", owner="alice", title="\x1b]0;evil\x07title")
        mine.append("user", "the kiwi is ripe")
        store.create(model="gpt-4o-mini").append("user", "another kiwi")
    hits = json.loads(run(db_url, "search", "kiwi", "--owner", "alice", "--json").stdout)
    assert [h["conversation_id"] for h in hits] == [mine.id]
    assert set(hits[0]) >= {"conversation_id", "seq", "role", "snippet", "title", "rank"}
    plain = run(db_url, "search", "kiwi", "--owner", "alice").stdout
    assert "\x1b" not in plain and f"gilas-conv chat --owner alice {mine.id}" in plain
    assert json.loads(run(db_url, "search", "nothing-here", "--json").stdout) == []
    error = run(db_url, "search", "***", code=1)
    assert "no word to look for" in error.stderr and "Traceback" not in error.stderr


def test_chat_slash_search(db_url: str) -> None:
    with ConversationStore(db_url) as store:
        old = store.create(model="gpt-4o-mini", title="قدیمی")
        old.append("user", "مي‌خواهم کیوی بخرم")
    result = CliRunner().invoke(
        main,
        ["--db", db_url, "chat"],
        input="/search میخواهم\n/search\n/search **\n/exit\n",
        env={"GILAS_API_KEY": "sk-portable-test"},
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "[مي‌خواهم] کیوی بخرم" in result.stdout
    assert f"gilas-conv chat {old.id}" in result.stdout
    assert "/search needs the words" in result.stderr and "no word to look for" in result.stderr
