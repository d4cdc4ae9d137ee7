"""The conversation store's contract, on a real SQLite file and a real Postgres database.

Every test that writes checks what the database holds afterwards; every refused call checks
that the database is byte for byte what it was before (``_snapshot``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from test_migrations import TABLES

from gilas_conv import (
    ConfigurationError,
    Conversation,
    ConversationNotFound,
    ConversationStore,
    Message,
    MessageNotFound,
    StoreError,
    head_revision,
)
from gilas_conv.store._schema import metadata

# As conftest.py words it, so every skipped Postgres test gives the same reason.
POSTGRES_SKIP_REASON = (
    "Postgres tests need GILAS_CONV_TEST_POSTGRES_URL=postgresql://user@host:port/dbname "
    "(a server where the user may create databases)"
)
MODEL = "gpt-4o-mini"

PERSIAN = (
    "سلام\u200cعلیکم! من می\u200cخواهم کتاب\u200cها را بخوانم. "
    "\u200fراست\u200cبه\u200cچپ\u200f \u202bجاسازی \u202aLTR inside\u202c\u202c "
    "\u202eبازنویسی\u202c \u2067ایزوله\u2069 \u200e ۱۲۳۴ ك ي ی ک"
)
EMOJI = "👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳\ufe0f\u200d🌈 🇮🇷 ❤\ufe0f\u200d🔥 🧑🏻\u200d💻 😀"
CJK = "漢字 かな カナ 한국어 中文 𠜎𠜱𠝹𠱓 (CJK Ext-B, astral)"
NUL_TEXT = "\x00before\x00after\x00"
CONTROLS = "\t\r\n\x01\x1f\x7f \u2028\u2029 \ufeff \uffff \U0010ffff \\ \" ' `"
TOOL_CALLS = [
    {
        "id": "call_abc123",
        "type": "function",
        "function": {
            "name": "lookup_weather",
            "arguments": json.dumps(
                {"city": "تهران\u200cشمالی", "emoji": EMOJI, "nul": "\x00"}, ensure_ascii=False
            ),
        },
    },
    {"id": "call_def456", "type": "function", "function": {"name": "now", "arguments": "{}"}},
]
USER_PARTS = [
    {"type": "text", "text": PERSIAN},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
    {"type": "text", "text": EMOJI + NUL_TEXT},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
]


def _one_megabyte() -> str:
    unit = PERSIAN + EMOJI + CJK + NUL_TEXT + CONTROLS
    return (unit * (1_000_000 // len(unit) + 1))[:1_000_000]


def _snapshot(store: ConversationStore) -> dict[str, list[Any]]:
    """Every row of every gilas-conv table, in key order."""
    with store.engine.connect() as conn:
        return {
            name: conn.execute(select(table).order_by(*table.primary_key.columns)).all()
            for name, table in metadata.tables.items()
        }


def _last_seq(store: ConversationStore, conversation_id: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(
            text("SELECT last_seq FROM conversations WHERE id = :id"), {"id": conversation_id}
        ).scalar_one()


def _message_rows(store: ConversationStore, conversation_id: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(
            text("SELECT count(*) FROM messages WHERE conversation_id = :id"), {"id": conversation_id}
        ).scalar_one()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shared_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres_server: Any
) -> Iterator[ConversationStore]:
    """One store per backend, shared by the tests that need no database of their own: each
    works on conversations it creates (refusals assert the whole database is unchanged).
    A new Postgres database per case would cost a forced checkpoint to create and drop."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('shared') / 'store.db'}"
    elif postgres_server is None:
        pytest.skip(POSTGRES_SKIP_REASON)
    else:
        url = postgres_server.create(migrated=True)
    with ConversationStore(url) as opened:
        yield opened


def _url_of(store: ConversationStore) -> str:
    return store.engine.url.render_as_string(hide_password=False)


def _without_conversation_id(message: Message) -> dict[str, Any]:
    fields = dataclasses.asdict(message)
    del fields["conversation_id"]
    return fields


# ---------------------------------------------------------------------------------------------
# Opening a store


def test_no_argument_and_no_environment_uses_sqlite_file_in_user_data_dir() -> None:
    expected = Path(os.environ["XDG_DATA_HOME"]) / "gilas-conv" / "conversations.db"
    assert not expected.exists()
    with ConversationStore() as store:
        assert store.dialect == "sqlite"
        conversation = store.create(model=MODEL, system="سلام")
    assert expected.is_file()
    raw = sqlite3.connect(expected)
    try:
        # Upgraded automatically on first use: at the head revision, with every table.
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {t for t in tables if not t.startswith("message_search")} == {"alembic_version", *TABLES}
        assert "message_search" in tables
    finally:
        raw.close()
    with ConversationStore() as again:
        assert [m.content for m in again.get(conversation.id).messages()] == ["سلام"]


def test_no_argument_uses_the_environment_variable(
    shared_store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GILAS_CONV_DATABASE_URL", _url_of(shared_store))
    with ConversationStore() as store:
        assert store.dialect == shared_store.dialect
        conversation = store.create(model=MODEL, title="from env")
    assert shared_store.get(conversation.id).title == "from env"
    assert not (Path(os.environ["XDG_DATA_HOME"]) / "gilas-conv").exists()


def test_an_explicit_url_beats_the_environment_variable(
    shared_store: ConversationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoy = tmp_path / "decoy.db"
    monkeypatch.setenv("GILAS_CONV_DATABASE_URL", f"sqlite:///{decoy}")
    with ConversationStore(_url_of(shared_store)) as store:
        conversation = store.create(model=MODEL)
    assert shared_store.get(conversation.id).id == conversation.id
    assert not decoy.exists()


def test_a_malformed_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not a database URL"):
        ConversationStore("definitely not a url")


@pytest.mark.parametrize(
    "url",
    ["postgresql://gilas:s3cret-pw@127.0.0.1:1/nowhere", "sqlite:////nonexistent-dir/s3cret-pw/x.db"],
    ids=["postgres-refused", "sqlite-missing-dir"],
)
def test_an_unreachable_database_is_a_store_error(url: str) -> None:
    with pytest.raises(StoreError, match="cannot open the database") as info:
        ConversationStore(url)
    assert info.value.__cause__ is not None
    if url.startswith("postgresql"):
        assert "s3cret-pw" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "synchronous"),
    [({}, 1), ({"sqlite_synchronous": "NORMAL"}, 1), ({"sqlite_synchronous": "FULL"}, 2)],
    ids=["default", "NORMAL", "FULL"],
)
def test_sqlite_pragmas_on_every_pooled_connection(
    tmp_path: Path, kwargs: dict[str, str], synchronous: int
) -> None:
    with ConversationStore(f"sqlite:///{tmp_path / 'p.db'}", **kwargs) as store:
        store.create(model=MODEL, system="warm the pool up")
        connections = [store.engine.connect() for _ in range(3)]
        try:
            for conn in connections:
                pragma = {
                    name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                    for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
                }
                assert pragma == {
                    "journal_mode": "wal",
                    "foreign_keys": 1,
                    "busy_timeout": 30_000,
                    "synchronous": synchronous,
                }
        finally:
            for conn in connections:
                conn.close()


def test_sqlite_foreign_keys_are_enforced_and_busy_timeout_configurable(tmp_path: Path) -> None:
    store = ConversationStore(f"sqlite:///{tmp_path / 'fk.db'}", sqlite_busy_timeout_ms=1234)
    with store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
        with pytest.raises(IntegrityError, match="FOREIGN KEY"):
            conn.exec_driver_sql(
                "INSERT INTO messages (conversation_id, seq, role, content, pinned, status, created_at)"
                " VALUES ('no-such-conversation', 1, 'user', '\"x\"', 0, 'complete', '2025-01-01')"
            )


def test_sqlite_synchronous_must_be_a_known_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="sqlite_synchronous"):
        ConversationStore(f"sqlite:///{tmp_path / 's.db'}", sqlite_synchronous="SOMETIMES")


# ---------------------------------------------------------------------------------------------
# Conversations


def test_create_stores_every_field_and_the_system_message(shared_store: ConversationStore) -> None:
    meta = {"topic": "تست", "n": 3, "nested": {"xs": [1, 2.5, None, True, "\x00"]}}
    conversation = shared_store.create(
        model=MODEL, system=PERSIAN, title="عنوان 📚", metadata=meta, owner="alice"
    )
    assert isinstance(conversation, Conversation)
    assert isinstance(conversation.id, str)
    parsed = uuid.UUID(conversation.id)
    assert parsed.version == 4 and str(parsed) == conversation.id
    fetched = shared_store.get(conversation.id, owner="alice")
    assert (fetched.id, fetched.model, fetched.title, fetched.metadata, fetched.owner) == (
        conversation.id,
        MODEL,
        "عنوان 📚",
        meta,
        "alice",
    )
    assert fetched.message_count == 1
    assert fetched.created_at == conversation.created_at
    assert fetched.created_at.utcoffset() is not None and fetched.created_at.utcoffset().total_seconds() == 0
    [system] = fetched.messages()
    assert (system.seq, system.role, system.content) == (1, "system", PERSIAN)
    assert system.to_openai() == {"role": "system", "content": PERSIAN}


def test_create_without_system_has_no_messages(shared_store: ConversationStore) -> None:
    conversation = shared_store.create(model=MODEL)
    assert shared_store.get(conversation.id).messages() == []
    assert conversation.message_count == 0
    assert _last_seq(shared_store, conversation.id) == 0


def test_ids_are_distinct_uuid4_strings(shared_store: ConversationStore) -> None:
    ids = [shared_store.create(model=MODEL).id for _ in range(20)]
    assert len(set(ids)) == 20
    assert all(uuid.UUID(i).version == 4 for i in ids)


@pytest.mark.parametrize("unknown", [str(uuid.UUID(int=0, version=4)), "nope", "x" * 100, "' OR 1=1 --"])
def test_get_and_delete_of_an_unknown_id_raise_conversation_not_found(
    shared_store: ConversationStore, unknown: str
) -> None:
    shared_store.create(model=MODEL, system="exists")
    before = _snapshot(shared_store)
    with pytest.raises(ConversationNotFound) as info:
        shared_store.get(unknown)
    assert info.value.conversation_id == unknown
    assert isinstance(info.value, StoreError) and isinstance(info.value, KeyError)
    with pytest.raises(ConversationNotFound):
        shared_store.delete(unknown)
    assert _snapshot(shared_store) == before


@pytest.mark.parametrize("bad_id", ["", "   ", None, 42])
def test_an_empty_or_non_string_conversation_id_is_a_value_error(
    shared_store: ConversationStore, bad_id: Any
) -> None:
    conversation = shared_store.create(model=MODEL, system="s")
    before = _snapshot(shared_store)
    with pytest.raises(ValueError, match="conversation id must be a non-empty string"):
        shared_store.get(bad_id)
    with pytest.raises(ValueError, match="conversation id must be a non-empty string"):
        shared_store.delete(bad_id)
    with pytest.raises(ValueError, match="conversation id must be a non-empty string"):
        dataclasses.replace(conversation, id=bad_id).append("user", "hello")
    assert _snapshot(shared_store) == before


def test_list_is_most_recently_active_first_and_an_append_moves_to_front(
    shared_store: ConversationStore,
) -> None:
    owner = f"list-{uuid.uuid4()}"  # this test's own scope in the shared database
    a = shared_store.create(model=MODEL, title="a", owner=owner)
    b = shared_store.create(model=MODEL, title="b", owner=owner)
    c = shared_store.create(model=MODEL, title="c", owner=owner)
    assert [x.id for x in shared_store.list(owner=owner)] == [c.id, b.id, a.id]
    a.append("user", "bump a")
    assert [x.id for x in shared_store.list(owner=owner)] == [a.id, c.id, b.id]
    shared_store.get(b.id, owner=owner).append("user", "bump b through a fresh handle")
    listed = shared_store.list(owner=owner)
    assert [x.id for x in listed] == [b.id, a.id, c.id]
    assert [x.message_count for x in listed] == [1, 1, 0]
    assert [x.id for x in shared_store.list(owner=owner, limit=2)] == [b.id, a.id]
    assert shared_store.count(owner=owner) == 3


def test_list_defaults_to_fifty(shared_store: ConversationStore) -> None:
    owner = f"fifty-{uuid.uuid4()}"
    created = [shared_store.create(model=MODEL, owner=owner).id for _ in range(53)]
    listed = [c.id for c in shared_store.list(owner=owner)]
    assert listed == created[::-1][:50]


@pytest.mark.parametrize("limit", [0, -1, 2.5, "10"])
def test_list_refuses_a_bad_limit(shared_store: ConversationStore, limit: Any) -> None:
    with pytest.raises(ValueError, match="limit"):
        shared_store.list(limit=limit)


def test_delete_removes_the_conversation_and_cascades_to_its_messages(
    shared_store: ConversationStore,
) -> None:
    store, owner = shared_store, f"delete-{uuid.uuid4()}"
    doomed = store.create(model=MODEL, system="s", owner=owner)
    for i in range(5):
        doomed.append("user", f"m{i}")
    kept = store.create(model=MODEL, system="keep me", owner=owner)
    kept.append("user", "still here")
    kept_before = kept.messages()
    assert _message_rows(store, doomed.id) == 6
    store.delete(doomed.id, owner=owner)
    assert _message_rows(store, doomed.id) == 0
    with pytest.raises(ConversationNotFound):
        store.get(doomed.id, owner=owner)
    with pytest.raises(ConversationNotFound):
        store.delete(doomed.id, owner=owner)
    # The stale handle cannot resurrect it or leave an orphan message behind.
    with pytest.raises(ConversationNotFound):
        doomed.append("user", "too late")
    assert _message_rows(store, doomed.id) == 0
    assert [c.id for c in store.list(owner=owner)] == [kept.id]
    assert store.get(kept.id, owner=owner).messages() == kept_before


# ---------------------------------------------------------------------------------------------
# Messages


def test_append_returns_the_stored_message_and_messages_returns_history_in_order(
    shared_store: ConversationStore,
) -> None:
    conversation = shared_store.create(model=MODEL, system="be brief")
    appended = [conversation.append("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(10)]
    assert [m.seq for m in appended] == list(range(2, 12))
    assert all(isinstance(m, Message) and m.conversation_id == conversation.id for m in appended)
    assert conversation.message_count == 11
    history = shared_store.get(conversation.id).messages()
    assert history[1:] == appended
    assert [m.seq for m in history] == list(range(1, 12))
    assert [m.content for m in history] == ["be brief", *(f"turn {i}" for i in range(10))]
    assert shared_store.get(conversation.id).message_count == 11
    assert _last_seq(shared_store, conversation.id) == 11


def test_every_role_and_to_openai_gives_exactly_the_api_fields(shared_store: ConversationStore) -> None:
    conversation = shared_store.create(model=MODEL)
    conversation.append("system", "You are terse.")
    conversation.append("developer", "Answer in Persian.")
    conversation.append("user", "plain text")
    conversation.append("user", USER_PARTS, name="sara")
    conversation.append("assistant", None, tool_calls=TOOL_CALLS)
    conversation.append("tool", '{"temp_c": 21}', tool_call_id="call_abc123")
    conversation.append("tool", [{"type": "text", "text": "12:00"}], tool_call_id="call_def456")
    conversation.append(
        "assistant",
        "هوا ۲۱ درجه است.",
        response_id="resp_1",
        model="gpt-4o-mini-2024-07-18",
        finish_reason="stop",
        usage={"prompt_tokens": 100, "completion_tokens": 9, "total_tokens": 109},
    )
    expected = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer in Persian."},
        {"role": "user", "content": "plain text"},
        {"role": "user", "content": USER_PARTS, "name": "sara"},
        {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
        {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_abc123"},
        {"role": "tool", "content": [{"type": "text", "text": "12:00"}], "tool_call_id": "call_def456"},
        {"role": "assistant", "content": "هوا ۲۱ درجه است."},
    ]
    assert [m.to_openai() for m in conversation.messages()] == expected
    # Key sets exactly (no extra bookkeeping keys leak into the request).
    assert [sorted(m.to_openai()) for m in conversation.messages()] == [sorted(e) for e in expected]
    with ConversationStore(_url_of(shared_store)) as reopened:
        assert [m.to_openai() for m in reopened.get(conversation.id).messages()] == expected
    last = conversation.messages()[-1]
    assert (last.response_id, last.model, last.finish_reason, last.usage) == (
        "resp_1",
        "gpt-4o-mini-2024-07-18",
        "stop",
        {"prompt_tokens": 100, "completion_tokens": 9, "total_tokens": 109},
    )


def test_image_size_hints_are_stored_but_not_sent(shared_store: ConversationStore) -> None:
    hinted = [
        {"type": "text", "text": "what is this?"},
        {
            "type": "image_url",
            "image_url": {"url": "https://example.com/a.png", "detail": "high", "width": 512, "height": 300},
        },
    ]
    conversation = shared_store.create(model=MODEL)
    conversation.append("user", hinted)
    [stored] = shared_store.get(conversation.id).messages()
    assert stored.content == hinted
    assert stored.to_openai() == {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}},
        ],
    }
    assert stored.content == hinted  # to_openai() did not strip them from the stored value


ROUND_TRIP_CONTENTS = {
    "persian-zwnj-rtl": PERSIAN,
    "emoji-zwj": EMOJI,
    "cjk": CJK,
    "nul": NUL_TEXT,
    "only-nul": "\x00",
    "controls-and-quotes": CONTROLS,
    "whitespace-kept": "  \n padded \t\n ",
    "empty": "",
    "json-looking": '{"role": "system", "content": null}',
    "content-parts": USER_PARTS,
    "one-megabyte": _one_megabyte(),
}


@pytest.mark.parametrize("content", ROUND_TRIP_CONTENTS.values(), ids=ROUND_TRIP_CONTENTS.keys())
def test_content_round_trips_exactly(shared_store: ConversationStore, content: Any) -> None:
    conversation = shared_store.create(model=MODEL)
    appended = conversation.append("user", content)
    assert appended.content == content
    [read] = shared_store.get(conversation.id).messages()
    assert read == appended
    assert type(read.content) is type(content)
    assert read.tokens is not None and read.tokens > 0
    with ConversationStore(_url_of(shared_store)) as reopened:
        [again] = reopened.get(conversation.id).messages()
    assert again == appended
    assert again.content == content


def test_tool_calls_and_bookkeeping_round_trip_exactly(shared_store: ConversationStore) -> None:
    conversation = shared_store.create(model=MODEL, system=PERSIAN + EMOJI)
    extra = {
        "choices": [{"index": 1, "message": {"content": CJK}}],
        "ratio": 0.1,
        "big": 2**53,
        "neg": -1e-300,
    }
    reply = conversation.append(
        "assistant",
        None,
        tool_calls=TOOL_CALLS,
        response_id="chatcmpl-ÄÖ-😀",
        finish_reason="tool_calls",
        usage={"prompt_tokens": 12, "prompt_tokens_details": {"cached_tokens": 0}},
        predicted_prompt_tokens=12,
        reply_to=1,
        extra=extra,
        status="incomplete",
    )
    answer = conversation.append("tool", NUL_TEXT + CJK, tool_call_id="call_abc123", name="lookup_weather")
    with ConversationStore(_url_of(shared_store)) as reopened:
        history = reopened.get(conversation.id).messages()
    assert history[1:] == [reply, answer]
    assert history[1].tool_calls == TOOL_CALLS
    assert history[1].extra == extra
    assert (history[1].status, history[1].complete, history[1].pinned) == ("incomplete", False, False)
    assert history[2].to_openai() == {
        "role": "tool",
        "content": NUL_TEXT + CJK,
        "name": "lookup_weather",
        "tool_call_id": "call_abc123",
    }


def test_round_trip_is_identical_on_sqlite_and_postgres(tmp_path: Path, postgres_server: Any) -> None:
    if postgres_server is None:
        pytest.skip(POSTGRES_SKIP_REASON)
    results = []
    for url in (f"sqlite:///{tmp_path / 'both.db'}", postgres_server.create(migrated=True)):
        with ConversationStore(url) as store:
            conversation = store.create(model=MODEL, system=PERSIAN, metadata={"k": EMOJI})
            for content in ROUND_TRIP_CONTENTS.values():
                conversation.append("user", content)
            conversation.append("assistant", None, tool_calls=TOOL_CALLS)
            exported = store.get(conversation.id).export()
            results.append(
                (
                    exported["metadata"],
                    [{k: v for k, v in m.items() if k != "created_at"} for m in exported["messages"]],
                    [(m.seq, m.tokens, m.tokens_encoding) for m in conversation.messages()],
                )
            )
    assert results[0] == results[1]


# ---------------------------------------------------------------------------------------------
# Refused input writes nothing


def _assert_refused(
    store: ConversationStore, conversation: Conversation, match: str, *args: Any, **kwargs: Any
) -> None:
    before = _snapshot(store)
    last_seq = _last_seq(store, conversation.id)
    count = conversation.message_count
    with pytest.raises(ValueError, match=match):
        conversation.append(*args, **kwargs)
    assert _snapshot(store) == before
    assert _last_seq(store, conversation.id) == last_seq
    assert conversation.message_count == count


LONE_SURROGATES = {
    "content-high": (("user", "abc\ud800def"), {}),
    "content-low": (("user", "\udfff"), {}),
    "content-part-text": (
        ("user", [{"type": "text", "text": "ok"}, {"type": "text", "text": "x\udc00"}]),
        {},
    ),
    "tool-call-arguments": (
        ("assistant", None),
        {"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "\ud83d"}}]},
    ),
    "name": (("user", "hi"), {"name": "sara\ud800"}),
    "tool-call-id": (("tool", "ok"), {"tool_call_id": "call\udfff"}),
    "usage-key": (("assistant", "ok"), {"usage": {"\ud800": 1}}),
}


@pytest.mark.parametrize(("args", "kwargs"), LONE_SURROGATES.values(), ids=LONE_SURROGATES.keys())
def test_a_lone_surrogate_is_refused_and_nothing_is_written(
    shared_store: ConversationStore, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    conversation = shared_store.create(model=MODEL, system="s")
    conversation.append("user", "already here")
    _assert_refused(shared_store, conversation, "surrogate", *args, **kwargs)


@pytest.mark.parametrize(
    "content", [42, 4.2, True, b"bytes", bytearray(b"x"), {"text": "a dict"}, object()], ids=repr
)
def test_non_string_content_is_refused_and_nothing_is_written(
    shared_store: ConversationStore, content: Any
) -> None:
    conversation = shared_store.create(model=MODEL, system="s")
    _assert_refused(
        shared_store, conversation, "content must be a string or a list of content parts", "user", content
    )


def test_create_with_a_lone_surrogate_writes_no_conversation(shared_store: ConversationStore) -> None:
    before = _snapshot(shared_store)
    with pytest.raises(ValueError, match="surrogate"):
        shared_store.create(model=MODEL, system="\ud800")
    with pytest.raises(ValueError, match="surrogate"):
        shared_store.create(model=MODEL, title="\udfff")
    with pytest.raises(ValueError, match="surrogate"):
        shared_store.create(model=MODEL, metadata={"k": "\ud800"})
    assert _snapshot(shared_store) == before


BAD_MESSAGES = {
    "unknown-role": (("bot", "hi"), {}, r"unknown role 'bot'"),
    "role-case": (("User", "hi"), {}, r"unknown role 'User'"),
    "legacy-function-role": (("function", "hi"), {}, r"unknown role 'function'"),
    "tool-without-call-id": (("tool", "result"), {}, "tool_call_id"),
    "tool-with-empty-call-id": (("tool", "result"), {"tool_call_id": "  "}, "tool_call_id must not be empty"),
    "tool-calls-on-user": (
        ("user", "hi"),
        {"tool_calls": TOOL_CALLS},
        "only assistant messages may have tool_calls",
    ),
    "tool-calls-on-tool": (
        ("tool", "r"),
        {"tool_calls": TOOL_CALLS, "tool_call_id": "c"},
        "only assistant messages may have tool_calls",
    ),
    "call-id-on-user": (("user", "hi"), {"tool_call_id": "c"}, "only tool messages may have a tool_call_id"),
    "null-user-content": (("user", None), {}, "must be a string"),
    "null-assistant-content-without-calls": (("assistant", None), {}, "must be a string"),
    "empty-tool-calls": (("assistant", None), {"tool_calls": []}, "non-empty list"),
    "tool-calls-not-a-list": (("assistant", None), {"tool_calls": "call"}, "non-empty list"),
    "tool-call-without-id": (
        ("assistant", None),
        {"tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        r"tool_calls\[0\]\.id",
    ),
    "tool-call-without-arguments": (
        ("assistant", None),
        {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
        r"tool_calls\[0\]\.function\.arguments",
    ),
    "part-unknown-type": (("user", [{"type": "video", "video": {}}]), {}, r"content\[0\] has type 'video'"),
    "part-not-an-object": (("user", ["just a string"]), {}, r"content\[0\] must be a content part object"),
    "part-text-missing": (("user", [{"type": "text"}]), {}, r"content\[0\]\.text must be a string"),
    "part-text-not-string": (
        ("user", [{"type": "text", "text": 5}]),
        {},
        r"content\[0\]\.text must be a string",
    ),
    "part-image-url-not-object": (
        ("user", [{"type": "image_url", "image_url": "https://example.com/a.png"}]),
        {},
        r"content\[0\] must look like",
    ),
    "part-image-without-url": (
        ("user", [{"type": "image_url", "image_url": {"detail": "low"}}]),
        {},
        r"content\[0\] must look like",
    ),
    "second-part-bad": (
        ("user", [{"type": "text", "text": "fine"}, {"type": "text", "text": None}]),
        {},
        r"content\[1\]\.text",
    ),
    "image-in-system": (
        ("system", [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]),
        {},
        r"a system message accepts text",
    ),
    "image-in-tool": (
        ("tool", [{"type": "image_url", "image_url": {"url": "https://e.com/a.png"}}]),
        {"tool_call_id": "c"},
        r"a tool message accepts text",
    ),
    "non-json-in-part": (("user", [{"type": "text", "text": "x", "extra": {1, 2}}]), {}, "JSON"),
    "nan-in-usage": (("assistant", "x"), {"usage": {"cost": float("nan")}}, "JSON cannot represent"),
    "unknown-status": (("assistant", "x"), {"status": "partial"}, "unknown status 'partial'"),
}


@pytest.mark.parametrize(("args", "kwargs", "match"), BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_message_is_refused_with_a_clear_error_and_nothing_is_written(
    shared_store: ConversationStore, args: tuple[Any, ...], kwargs: dict[str, Any], match: str
) -> None:
    conversation = shared_store.create(model=MODEL, system="s")
    conversation.append("user", "hello")
    _assert_refused(shared_store, conversation, match, *args, **kwargs)


# Short text columns (ids, names, the model) are VARCHAR/TEXT: Postgres refuses NUL in them and
# enforces the declared length, SQLite does neither. The store must behave the same on both:
# store the value exactly, or refuse it with a ValueError before writing anything.
SHORT_TEXT_FIELDS = {
    "title": (lambda s, c, v: s.get(s.create(model=MODEL, title=v).id).title, ["nul"]),
    "owner": (lambda s, c, v: s.get(s.create(model=MODEL, owner=v).id, owner=v).owner, ["nul", "long"]),
    "model": (lambda s, c, v: s.get(s.create(model=v).id).model, ["nul", "long"]),
    "name": (lambda s, c, v: _append_and_read(s, c, "user", "x", name=v).name, ["nul", "long"]),
    "tool_call_id": (
        lambda s, c, v: _append_and_read(s, c, "tool", "x", tool_call_id=v).tool_call_id,
        ["nul", "long"],
    ),
    "response_id": (
        lambda s, c, v: _append_and_read(s, c, "assistant", "x", response_id=v).response_id,
        ["nul", "long"],
    ),
    "reply-model": (
        lambda s, c, v: _append_and_read(s, c, "assistant", "x", model=v).model,
        ["nul", "long"],
    ),
    "finish_reason": (
        lambda s, c, v: _append_and_read(s, c, "assistant", "x", finish_reason=v).finish_reason,
        ["nul", "long"],
    ),
}
SHORT_TEXT_VALUES = {"nul": "id\x00with-nul", "long": "n" * 300}


def _append_and_read(store: ConversationStore, conversation: Any, *args: Any, **kwargs: Any) -> Message:
    appended = conversation.append(*args, **kwargs)
    [read] = store.get(conversation.id).messages()
    assert read == appended
    return read


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, SHORT_TEXT_VALUES[k]) for f, (_, kinds) in SHORT_TEXT_FIELDS.items() for k in kinds],
    ids=[f"{f}-{k}" for f, (_, kinds) in SHORT_TEXT_FIELDS.items() for k in kinds],
)
def test_short_text_fields_are_stored_exactly_or_refused_with_value_error(
    shared_store: ConversationStore, field: str, value: str
) -> None:
    # The conversation an append goes to exists before the snapshot: only the call under
    # test may change (or, refused, not change) the database.
    conversation = shared_store.create(model=MODEL)
    before = _snapshot(shared_store)
    try:
        stored = SHORT_TEXT_FIELDS[field][0](shared_store, conversation, value)
    except ValueError:
        assert _snapshot(shared_store) == before
    else:
        assert stored == value


def test_looking_up_an_id_or_owner_with_nul_finds_nothing(shared_store: ConversationStore) -> None:
    """A NUL in a looked-up id is just an id that does not exist (or a ValueError), never a
    database error."""
    for call in (
        lambda: shared_store.get("a\x00b"),
        lambda: shared_store.delete("a\x00b"),
        lambda: shared_store.get(str(uuid.uuid4()), owner="o\x00"),
    ):
        with pytest.raises((ConversationNotFound, ValueError)):
            call()
    with contextlib.suppress(ValueError):
        assert shared_store.list(owner="o\x00") == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("predicted_prompt_tokens", 1.5),
        ("predicted_prompt_tokens", "abc"),
        ("reply_to", "12"),
    ],
    ids=repr,
)
def test_integer_reply_fields_must_be_integers(
    shared_store: ConversationStore, field: str, value: Any
) -> None:
    """As import_conversation already insists; otherwise the stored value silently differs
    from the one given (Postgres rounds 1.5 to 2, both backends turn "12" into 12)."""
    conversation = shared_store.create(model=MODEL, system="s")
    _assert_refused(
        shared_store, conversation, f"{field} must be an integer", "assistant", "x", **{field: value}
    )


def test_append_to_an_unknown_conversation_raises_not_found_and_writes_nothing(
    shared_store: ConversationStore,
) -> None:
    conversation = shared_store.create(model=MODEL, system="s")
    ghost = dataclasses.replace(conversation, id=str(uuid.uuid4()))
    before = _snapshot(shared_store)
    with pytest.raises(ConversationNotFound):
        ghost.append("user", "anyone there?")
    assert _snapshot(shared_store) == before


# ---------------------------------------------------------------------------------------------
# Owner scoping


def test_another_owners_conversation_does_not_exist(store: ConversationStore) -> None:
    mine = store.create(model=MODEL, system="alice's", owner="alice")
    mine.append("user", "private")
    shared = store.create(model=MODEL, system="no owner")
    bobs = store.create(model=MODEL, owner="bob")
    before = _snapshot(store)

    for owner in ("bob", None, "Alice", "alice "):
        with pytest.raises(ConversationNotFound):
            store.get(mine.id, owner=owner)
        with pytest.raises(ConversationNotFound):
            store.delete(mine.id, owner=owner)
        with pytest.raises(ConversationNotFound):
            dataclasses.replace(mine, owner=owner).append("user", "let me in")
        assert mine.id not in [c.id for c in store.list(owner=owner)]
    with pytest.raises(ConversationNotFound):
        store.get(shared.id, owner="alice")
    assert _snapshot(store) == before

    assert [c.id for c in store.list(owner="alice")] == [mine.id]
    assert [c.id for c in store.list(owner="bob")] == [bobs.id]
    assert [c.id for c in store.list()] == [shared.id]
    assert (store.count(owner="alice"), store.count(owner="bob"), store.count()) == (1, 1, 1)
    assert [m.content for m in store.get(mine.id, owner="alice").messages()] == ["alice's", "private"]

    fork = store.get(mine.id, owner="alice").fork()
    assert store.get(fork.id, owner="alice").owner == "alice"
    with pytest.raises(ConversationNotFound):
        store.get(fork.id)

    store.delete(mine.id, owner="alice")
    with pytest.raises(ConversationNotFound):
        store.get(mine.id, owner="alice")


@pytest.mark.parametrize("owner", ["", "   ", 7])
def test_an_empty_or_non_string_owner_is_refused(shared_store: ConversationStore, owner: Any) -> None:
    before = _snapshot(shared_store)
    with pytest.raises(ValueError, match="owner"):
        shared_store.create(model=MODEL, owner=owner)
    assert _snapshot(shared_store) == before


# ---------------------------------------------------------------------------------------------
# Forks


def test_fork_copies_history_up_to_at_and_is_independent(shared_store: ConversationStore) -> None:
    original = shared_store.create(model=MODEL, system="s", title="orig", metadata={"k": 1})
    for i in range(5):
        original.append("user" if i % 2 == 0 else "assistant", f"m{i}")
    original.append("assistant", "r", response_id="resp-x")
    history = original.messages()
    assert len(history) == 7

    whole = original.fork()
    part = original.fork(at=3)
    empty = original.fork(at=0)
    assert len({original.id, whole.id, part.id, empty.id}) == 4
    assert (part.forked_from, part.forked_at, part.title, part.metadata, part.model) == (
        original.id,
        3,
        "orig",
        {"k": 1},
        MODEL,
    )
    assert [_without_conversation_id(m) for m in whole.messages()] == [
        _without_conversation_id(m) for m in history
    ]
    assert [_without_conversation_id(m) for m in part.messages()] == [
        _without_conversation_id(m) for m in history[:3]
    ]
    assert all(m.conversation_id == part.id for m in part.messages())
    assert empty.messages() == []

    assert part.append("user", "only in the fork").seq == 4
    assert original.append("user", "only in the original").seq == 8
    assert [m.content for m in shared_store.get(part.id).messages()] == ["s", "m0", "m1", "only in the fork"]
    assert [m.content for m in shared_store.get(original.id).messages()][-2:] == ["r", "only in the original"]
    assert len(shared_store.get(whole.id).messages()) == 7
    assert shared_store.get(empty.id).message_count == 0
    # The fork is its own conversation: deleting the original leaves it whole.
    shared_store.delete(original.id)
    assert [m.content for m in shared_store.get(part.id).messages()] == ["s", "m0", "m1", "only in the fork"]


@pytest.mark.parametrize("at", [-1, 4, True, "2", 1.0])
def test_fork_at_outside_the_history_is_refused(shared_store: ConversationStore, at: Any) -> None:
    original = shared_store.create(model=MODEL, system="s")
    original.append("user", "u")
    original.append("assistant", "a")
    before = _snapshot(shared_store)
    with pytest.raises(ValueError, match="fork point"):
        original.fork(at=at)
    assert _snapshot(shared_store) == before


# ---------------------------------------------------------------------------------------------
# Pins


def test_pin_and_unpin(shared_store: ConversationStore) -> None:
    conversation = shared_store.create(model=MODEL, system="s")
    conversation.append("user", "remember this")
    conversation.pin(2)
    assert [m.pinned for m in conversation.messages()] == [False, True]
    conversation.pin(2, False)
    assert [m.pinned for m in conversation.messages()] == [False, False]
    with pytest.raises(MessageNotFound):
        conversation.pin(3)


def test_half_of_a_tool_call_pair_cannot_be_pinned_by_any_route(shared_store: ConversationStore) -> None:
    """Sent alone, a pinned tool call or tool result makes the API refuse the request, so
    pin() refuses it; append(pinned=True) and import must not be a way around that."""
    conversation = shared_store.create(model=MODEL, system="s")
    conversation.append("user", "weather?")
    conversation.append("assistant", None, tool_calls=TOOL_CALLS[:1])
    conversation.append("tool", "21C", tool_call_id="call_abc123")
    for seq in (3, 4):
        with pytest.raises(ValueError, match="cannot be pinned"):
            conversation.pin(seq)
    _assert_refused(
        shared_store, conversation, "pinned", "assistant", None, tool_calls=TOOL_CALLS[1:], pinned=True
    )
    _assert_refused(shared_store, conversation, "pinned", "tool", "12:00", tool_call_id="c2", pinned=True)
    before = _snapshot(shared_store)
    with pytest.raises(ValueError, match=r"^message 3: .*pinned"):
        shared_store.import_conversation(
            [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS[:1]},
                {"role": "tool", "content": "21C", "tool_call_id": "call_abc123", "pinned": True},
            ]
        )
    assert _snapshot(shared_store) == before


# ---------------------------------------------------------------------------------------------
# Reply dedupe


def test_appending_the_same_reply_again_returns_the_stored_message(shared_store: ConversationStore) -> None:
    """Idempotent only where it is the same reply: same response id, same message
    answered, same content and tool calls."""
    conversation = shared_store.create(model=MODEL, system="s")
    conversation.append("user", "q")
    first = conversation.append(
        "assistant", "answer", response_id="chatcmpl-1", reply_to=2, usage={"total_tokens": 3}
    )
    conversation.append("user", "q2")
    before = _snapshot(shared_store)
    again = conversation.append("assistant", "answer", response_id="chatcmpl-1", reply_to=2)
    assert again == first
    again_fresh = shared_store.get(conversation.id).append(
        "assistant", "answer", response_id="chatcmpl-1", reply_to=2
    )
    assert again_fresh == first
    assert _snapshot(shared_store) == before
    assert _last_seq(shared_store, conversation.id) == 4
    # Scoped to the conversation: the same id elsewhere is a different reply.
    other = shared_store.create(model=MODEL)
    assert other.append("assistant", "answer", response_id="chatcmpl-1", reply_to=2).seq == 1


def test_a_new_reply_reusing_a_response_id_is_stored(shared_store: ConversationStore) -> None:
    """A response id is the server's label, not a key: servers reuse them, so a reply that
    shares only the id (another message answered, or another text) is a new reply."""
    conversation = shared_store.create(model=MODEL)
    conversation.append("user", "What is 2+2?")
    first = conversation.append("assistant", "4", response_id="chatcmpl-1", reply_to=1)
    conversation.append("user", "What is the capital of Iran?")
    second = conversation.append("assistant", "Tehran", response_id="chatcmpl-1", reply_to=3)
    assert (second.seq, second.content) == (4, "Tehran")
    # Same message answered, another text: also a new reply (e.g. a retried request).
    third = conversation.append("assistant", "Tehran, the capital", response_id="chatcmpl-1", reply_to=3)
    assert third.seq == 5
    # Same text, another message answered: new as well.
    conversation.append("user", "And 2+2 again?")
    assert conversation.append("assistant", "4", response_id="chatcmpl-1", reply_to=6).seq == 7
    stored = shared_store.get(conversation.id).messages()
    assert [m.content for m in stored if m.response_id == "chatcmpl-1"] == [
        "4",
        "Tehran",
        "Tehran, the capital",
        "4",
    ]
    assert first == stored[1]


# ---------------------------------------------------------------------------------------------
# Export and import


def _rich_conversation(store: ConversationStore, *, owner: str | None = None) -> Conversation:
    conversation = store.create(
        model=MODEL,
        system=PERSIAN,
        title="عنوان 📚",
        metadata={"topic": "تست", "nested": {"xs": [1, 2.5, None, True]}},
        owner=owner,
    )
    conversation.append("developer", "Answer in Persian.")
    conversation.append("user", USER_PARTS, name="sara")
    conversation.append(
        "assistant",
        None,
        tool_calls=TOOL_CALLS,
        response_id="resp_1",
        model="gpt-4o-mini-2024-07-18",
        finish_reason="tool_calls",
        usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        predicted_prompt_tokens=10,
        reply_to=3,
    )
    conversation.append("tool", NUL_TEXT, tool_call_id="call_abc123")
    conversation.append("tool", "12:00", tool_call_id="call_def456")
    conversation.append("assistant", EMOJI + CJK, status="incomplete", extra={"choices": [{"index": 1}]})
    conversation.pin(3)
    return store.get(conversation.id, owner=owner)


def _strip_header(exported: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in exported.items() if k not in ("id", "created_at", "updated_at")}


def test_export_import_export_round_trips(shared_store: ConversationStore) -> None:
    original = _rich_conversation(shared_store, owner="alice")
    exported = original.export()
    # Through real JSON text, as a file would carry it.
    imported = shared_store.import_conversation(
        json.loads(json.dumps(exported, ensure_ascii=False)), owner="alice"
    )
    assert imported.id != original.id
    assert uuid.UUID(imported.id).version == 4
    assert _strip_header(imported.export()) == _strip_header(exported)
    assert [_without_conversation_id(m) for m in imported.messages()] == [
        _without_conversation_id(m) for m in original.messages()
    ]
    assert imported.message_count == 7 and _last_seq(shared_store, imported.id) == 7
    with pytest.raises(ConversationNotFound):
        shared_store.get(imported.id)
    # The imported copy is a normal conversation: it grows, and dedupes its replies.
    assert imported.append("user", "more").seq == 8
    assert (
        imported.append("assistant", None, tool_calls=TOOL_CALLS, response_id="resp_1", reply_to=3).seq == 4
    )


def test_import_of_a_plain_openai_messages_list(shared_store: ConversationStore) -> None:
    messages = [
        {"role": "system", "content": PERSIAN},
        {"role": "user", "content": USER_PARTS},
        {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
        {"role": "tool", "content": "{}", "tool_call_id": "call_abc123"},
        {"role": "assistant", "content": EMOJI, "name": "bot"},
    ]
    imported = shared_store.import_conversation(messages, model=MODEL)
    assert imported.model == MODEL
    assert [m.to_openai() for m in imported.messages()] == messages
    assert [m.seq for m in imported.messages()] == [1, 2, 3, 4, 5]


BAD_IMPORTED_MESSAGES = {
    "unknown-role": ({"role": "wizard", "content": "x"}, "unknown role 'wizard'"),
    "lone-surrogate": ({"role": "user", "content": "bad \ud800"}, "surrogate"),
    "tool-without-call-id": ({"role": "tool", "content": "x"}, "tool_call_id"),
    "non-string-content": ({"role": "user", "content": 12}, "content must be"),
    "unknown-field": ({"role": "user", "content": "x", "colour": "red"}, "unknown field"),
    "not-an-object": ("just text", "must be an object"),
    "bad-created-at": ({"role": "user", "content": "x", "created_at": "yesterday"}, "ISO 8601"),
}


@pytest.mark.parametrize(("bad", "match"), BAD_IMPORTED_MESSAGES.values(), ids=BAD_IMPORTED_MESSAGES.keys())
def test_a_bad_message_in_the_middle_refuses_the_whole_import(
    shared_store: ConversationStore, bad: Any, match: str
) -> None:
    exported = _rich_conversation(shared_store).export()
    exported["messages"][3] = bad  # the fourth message
    before = _snapshot(shared_store)
    with pytest.raises(ValueError, match=rf"^message 4: .*{match}"):
        shared_store.import_conversation(exported)
    assert _snapshot(shared_store) == before


def test_import_conversations_is_all_or_nothing(store: ConversationStore) -> None:
    good = {"title": "a", "messages": [{"role": "user", "content": "سلام"}]}
    bad = {"messages": [{"role": "user", "content": "ok"}, {"role": "wizard", "content": "x"}]}
    with pytest.raises(ValueError, match=r"^line 2: message 2: unknown role 'wizard'"):
        store.import_conversations([good, bad, good], labels=["line 1", "line 2", "line 3"])
    assert store.count() == 0
    seen: list[int] = []
    imported = store.import_conversations([good, good], progress=lambda: seen.append(1))
    assert len(seen) == 2 and len({c.id for c in imported}) == 2
    assert sorted(c.id for c in store.list()) == sorted(c.id for c in imported)
    assert [m.content for m in store.get(imported[0].id).messages()] == ["سلام"]
    with pytest.raises(ValueError, match=r"^conversation 1: expected an exported conversation"):
        store.import_conversations(["not a conversation"])  # type: ignore[list-item]


def test_sqlite_appends_store_values_exactly_as_core_inserts_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append and create()'s system message leave byte-for-byte the same row. The clock
    is frozen on microsecond zero, where sqlite3's own datetime adapter would have stored
    ``10:00:00`` instead of ``10:00:00.000000``."""
    frozen = dt.datetime(2026, 1, 1, 10, 0, 0, tzinfo=dt.timezone.utc)
    monkeypatch.setattr("gilas_conv.store._store._now", lambda: frozen)
    url = f"sqlite:///{tmp_path / 'formats.db'}"
    with ConversationStore(url) as store:
        conv = store.create(model=MODEL, system="سلام\x00")
        conv.append("system", "سلام\x00", pinned=True)
        conv.pin(1)
    with contextlib.closing(sqlite3.connect(tmp_path / "formats.db")) as raw:
        rows = raw.execute(
            "SELECT created_at, content, typeof(pinned), pinned, status,"
            " tokens, tokens_encoding, typeof(tool_calls) FROM messages ORDER BY seq"
        ).fetchall()
        bumped = raw.execute("SELECT updated_at FROM conversations").fetchone()
    created, appended = rows
    assert created == appended
    assert created[0] == bumped[0] == "2026-01-01 10:00:00.000000"
    assert created[1] == '"سلام\\u0000"' and created[2:4] == ("integer", 1)


def _terminate_pooled_backends(store: ConversationStore) -> int:
    """Terminate, from a connection of its own, the server processes of the store's pooled
    connections (as a server restart or an administrator would); how many there were."""
    pids = []
    for record in list(store.engine.pool._pool.queue):  # type: ignore[attr-defined]
        dbapi = record.dbapi_connection
        if dbapi is not None:
            pids.append(dbapi.info.backend_pid)
    import psycopg

    conninfo = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


def test_a_pooled_connection_killed_on_the_server_is_replaced(store: ConversationStore) -> None:
    """No ping per checkout: a connection found dead by a transaction's first statement is
    replaced and the statement sent again, so reads and writes after a backend was
    terminated succeed, and nothing is stored twice."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite connections do not die on a server")
    conv = store.create(model="gpt-4o-mini", system="s")
    conv.append("user", "before")

    assert _terminate_pooled_backends(store) >= 1
    assert store.get(conv.id).message_count == 2  # a read

    assert _terminate_pooled_backends(store) >= 1
    stored = conv.append("user", "after")  # a write
    assert stored.seq == 3
    assert [m.content for m in conv.messages()] == ["s", "before", "after"]

    assert _terminate_pooled_backends(store) >= 1
    lease, _, added = store._begin_turn(conv.id, messages=[{"role": "user", "content": "turn"}])
    assert _terminate_pooled_backends(store) >= 1
    reply = conv.append("assistant", "answer", response_id="r1", reply_to=added[0].seq, lease=lease)
    assert (added[0].seq, reply.seq) == (4, 5)
    assert [m.content for m in conv.messages()][3:] == ["turn", "answer"]


def test_a_pooled_connection_the_server_closed_is_replaced_before_anything_is_sent(
    store: ConversationStore,
) -> None:
    """A checkout sees, without a round trip, that the server has closed a pooled connection
    (its goodbye is waiting to be read), and the pool replaces it: no statement is sent on
    it and fails, so even a write in autocommit mode, which is not sent twice after a
    connection lost without a word, goes through."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite connections do not die on a server")
    from sqlalchemy import event

    conv = store.create(model="gpt-4o-mini", system="s")
    pids = [r.dbapi_connection.info.backend_pid for r in list(store.engine.pool._pool.queue)]  # type: ignore[attr-defined]
    assert _terminate_pooled_backends(store) == len(pids) >= 1
    import psycopg

    conninfo = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as watcher:  # until the backends have exited
        alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)"
        deadline = dt.datetime.now() + dt.timedelta(seconds=30)
        while watcher.execute(alive, (pids,)).fetchone() != (0,):
            assert dt.datetime.now() < deadline, "the terminated backends did not exit"
    failed: list[BaseException] = []
    event.listen(store.engine, "handle_error", lambda context: failed.append(context.original_exception))
    assert conv.append("user", "after").seq == 2
    assert failed == []
    assert [m.content for m in conv.messages()] == ["s", "after"]


def test_a_server_that_closes_every_new_connection_is_a_store_error(store: ConversationStore) -> None:
    """The pool gives up when every connection it checks out was closed by the server:
    that is a StoreError, on the first checkout and on the reconnection after a
    transaction's first statement found its connection dead (before, the reconnection's
    failure escaped as SQLAlchemy's InvalidRequestError, then warned of a transaction
    left without its connection). Nothing is stored."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite connections do not die on a server")
    from sqlalchemy import event
    from sqlalchemy.exc import DisconnectionError

    conv = store.create(model="gpt-4o-mini", system="s")
    refuse = {"now": False, "after_first_statement": False}

    def checkout(*_args: object) -> None:
        if refuse["now"]:
            raise DisconnectionError("every connection closed by the server (test)")

    def statement(_conn: object, cursor: Any, *_args: object) -> None:
        if refuse["after_first_statement"]:
            refuse["after_first_statement"] = False
            import psycopg

            pid = cursor.connection.info.backend_pid
            conninfo = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(conninfo, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
                while admin.execute(alive, (pid,)).fetchone() != (0,):
                    time.sleep(0.01)
            refuse["now"] = True

    event.listen(store.engine, "checkout", checkout)
    refuse["now"] = True
    with pytest.raises(StoreError, match="connection lost"):
        conv.append("user", "first checkout")
    refuse["now"] = False

    event.listen(store.engine, "before_cursor_execute", statement)
    refuse["after_first_statement"] = True
    with pytest.raises(StoreError, match="connection lost"):
        store.get(conv.id)
    refuse["now"] = False
    assert [m.content for m in conv.messages()] == ["s"]


def test_a_closed_store_refuses_to_be_used_instead_of_leaking_connections(db_url: str) -> None:
    store = ConversationStore(db_url)
    conv = store.create()
    store.close()
    with pytest.raises(StoreError, match="is closed"):
        conv.messages()
    with pytest.raises(StoreError, match="is closed"):
        store.list()


def test_the_gateway_reads_a_conversation_with_its_last_messages_for_its_owner_only(
    store: ConversationStore,
) -> None:
    conv = store.create(model="gpt-4o-mini", owner="alice")
    found, last = store._with_last_messages(conv.id, owner="alice", count=2)
    assert (found.id, found.owner, found.message_count, last) == (conv.id, "alice", 0, [])
    for words in ("one", "two", "three"):
        conv.append("user", words)
    conv.append("assistant", "four", status="incomplete")
    found, last = store._with_last_messages(conv.id, owner="alice", count=2)
    assert found.message_count == 4
    assert [(m.seq, m.content, m.complete) for m in last] == [(3, "three", True), (4, "four", False)]
    _, everything = store._with_last_messages(conv.id, owner="alice", count=10)
    assert [m.seq for m in everything] == [1, 2, 3, 4]
    assert everything == conv.messages()
    for owner in ("bob", None):
        with pytest.raises(ConversationNotFound):
            store._with_last_messages(conv.id, owner=owner, count=2)
    with pytest.raises(ConversationNotFound):
        store._with_last_messages("no-such-id", owner="alice", count=2)
