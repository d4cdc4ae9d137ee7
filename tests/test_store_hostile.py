"""The store under hostile or unlucky conditions: locks held by others, forged handles,
malformed imports, bad database URLs, odd schema states, file permissions, huge messages."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from gilas_conv import Conversation, ConversationNotFound, ConversationStore, StoreError
from gilas_conv.truncation import build_context, conversation_tokens

MODEL = "gpt-4o-mini"


def test_sqlite_lock_timeout_is_a_store_error(tmp_path: Path) -> None:
    """Another connection holds the write lock longer than the busy timeout: append and
    create fail with StoreError, not the driver's sqlite3.OperationalError."""
    path = tmp_path / "locked.db"
    with ConversationStore(f"sqlite:///{path}", sqlite_busy_timeout_ms=20) as store:
        conv = store.create(model=MODEL)
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="database is locked"):
                conv.append("user", "hi")
            with pytest.raises(StoreError, match="database is locked"):
                store.create(model=MODEL)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        conv.append("user", "hi")
        assert [m.content for m in conv.messages()] == ["hi"]


def _forged(store: ConversationStore) -> tuple[Conversation, Conversation]:
    """Alice's conversation, and Bob's handle with its id swapped for Alice's."""
    alice = store.create(model=MODEL, owner="alice")
    alice.append("user", "alice's secret")
    alice.append("assistant", "noted")
    bob = store.create(model=MODEL, owner="bob")
    return alice, dataclasses.replace(bob, id=alice.id)


FORGED_OPERATIONS = {
    "messages": lambda c: c.messages(),
    "iter_messages": lambda c: list(c.iter_messages()),
    "message": lambda c: c.message(1),
    "last_message": lambda c: c.last_message(),
    "pin": lambda c: c.pin(1),
    "summaries": lambda c: c.summaries(),
    "export": lambda c: c.export(),
    "build_context": lambda c: build_context(c),
    "conversation_tokens": lambda c: conversation_tokens(c),
    "append": lambda c: c.append("user", "x"),
    "fork": lambda c: c.fork(),
    "update": lambda c: c.update(title="x"),
}


@pytest.mark.parametrize("operation", list(FORGED_OPERATIONS))
def test_a_forged_handle_reads_and_changes_nothing_of_another_owner(
    store: ConversationStore, operation: str
) -> None:
    alice, forged = _forged(store)
    with pytest.raises(ConversationNotFound):
        FORGED_OPERATIONS[operation](forged)
    assert [(m.content, m.pinned) for m in alice.messages()] == [("alice's secret", False), ("noted", False)]
    assert store.get(alice.id, owner="alice").title is None
    assert store.count(owner="bob") == 1


@pytest.mark.parametrize("bad", ["\ud800", "a\udfffb"])
def test_lone_surrogate_ids_and_owners_are_simply_not_found(store: ConversationStore, bad: str) -> None:
    conv = store.create(model=MODEL)
    with pytest.raises(ConversationNotFound):
        store.get(bad)
    with pytest.raises(ConversationNotFound):
        store.get(conv.id, owner=bad)
    with pytest.raises(ConversationNotFound):
        store.delete(bad)
    with pytest.raises(ConversationNotFound):
        store.delete(conv.id, owner=bad)
    assert store.list(owner=bad) == []
    assert store.count(owner=bad) == 0
    assert store.get(conv.id).id == conv.id
