"""The gateway's usual turn on Postgres: one user message after a complete reply is
taken by the lease statement itself, which checks that the conversation's newest message
is a complete reply (and its model the one the gateway knows), instead of a read before
it. Every other request, and every request whose check fails, behaves as it did: driven
by the official openai SDK over real HTTP, in front of the stub upstream."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
import sqlalchemy
from _gateway import UPSTREAM_KEY, GatewayServer, running_gateway, sdk_client, stored
from stub_server import StubServer

from gilas_conv import ConversationStore
from gilas_conv.store import APIKeys

API_KEY = UPSTREAM_KEY

pytestmark = pytest.mark.parametrize("backend", ["postgres"])

# The lease statement (an UPDATE taking the lease) and the completion's check read (the
# conversation with its last messages, one statement).
LEASE = "lease_token=%(t_token)s"
CHECK_READ = "LEFT OUTER JOIN messages ON messages.conversation_id = conversations.id"


@contextmanager
def statements(store: ConversationStore) -> Iterator[list[str]]:
    """The statements the store runs meanwhile, but the key lookups'."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "api_keys" not in statement:
            seen.append(statement)

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sqlalchemy.event.remove(store.engine, "before_cursor_execute", record)


def ask(client: openai.OpenAI, content: str, conversation: str | None = None) -> str:
    extra = {} if conversation is None else {"extra_body": {"conversation": conversation}}
    completion = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": content}],
        **extra,  # type: ignore[arg-type]
    )
    return completion.conversation  # type: ignore[attr-defined, no-any-return]


def answered_two(store: ConversationStore, stub: StubServer, cid: str) -> None:
    """ "two" was sent after "one" and its reply, then answered; each stored once."""
    assert [m["content"] for m in stub.requests[-1]["body"]["messages"]] == ["one", "echo: one", "two"]
    assert stored(store, cid) == [
        ("user", "one", "complete"),
        ("assistant", "echo: one", "complete"),
        ("user", "two", "complete"),
        ("assistant", "echo: two", "complete"),
    ]


def test_a_message_after_a_reply_is_taken_by_the_lease_statement_first(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = ask(client, "one")
    with statements(store) as seen:
        ask(client, "two", cid)
    assert LEASE in seen[0], seen[0]
    assert not any(CHECK_READ in sql for sql in seen)
    answered_two(store, stub, cid)


def test_a_message_resent_after_its_reply_was_deleted_is_answered_not_stored_again(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = ask(client, "one")
    ask(client, "two", cid)
    store.get(cid, owner="alice").delete_message(4)  # the reply to "two"
    with statements(store) as seen:
        ask(client, "two", cid)
    # The lease statement took nothing (the newest message is gone): the check read follows.
    assert LEASE in seen[0] and any(CHECK_READ in sql for sql in seen), seen
    answered_two(store, stub, cid)


def test_a_message_after_an_unanswered_one_joins_its_turn(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = ask(client, "one")
    stub.script({"status": 500})
    with pytest.raises(openai.InternalServerError):
        ask(client, "two", cid)
    ask(client, "three", cid)
    sent = [m["content"] for m in stub.requests[-1]["body"]["messages"]]
    assert sent == ["one", "echo: one", "two", "three"]
    assert stored(store, cid) == [
        ("user", "one", "complete"),
        ("assistant", "echo: one", "complete"),
        ("user", "two", "complete"),
        ("user", "three", "complete"),
        ("assistant", "echo: three", "complete"),
    ]
    # Answered: the next message is after a reply again.
    with statements(store) as seen:
        ask(client, "four", cid)
    assert LEASE in seen[0] and not any(CHECK_READ in sql for sql in seen)


def test_a_deleted_conversation_gets_404_and_nothing_is_sent(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = ask(client, "one")
    client.conversations.delete(cid)
    sent = len(stub.requests)
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "two", cid)
    assert caught.value.status_code == 404
    assert "x-gilas-conversation" not in caught.value.response.headers
    assert len(stub.requests) == sent


def test_a_busy_conversation_gets_409_and_nothing_is_stored_or_sent(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = ask(client, "one")
    token, _, _ = store._begin_turn(cid, owner="alice")  # another request's turn, under way
    sent = len(stub.requests)
    with statements(store) as seen, pytest.raises(openai.ConflictError) as caught:
        ask(client, "two", cid)
    assert caught.value.code == "conversation_busy"
    assert caught.value.response.headers["x-gilas-conversation"] == cid
    assert LEASE in seen[0]
    assert len(stub.requests) == sent and len(stored(store, cid)) == 2
    store._end_turn(cid, token)
    ask(client, "two", cid)
    assert len(stored(store, cid)) == 4


def test_a_conversation_whose_model_changed_is_checked_the_long_way_once(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    # The new message's tokens are counted under the conversation's model as the gateway
    # knows it: another model there, and the lease statement takes nothing.
    client = sdk_client(gateway, alice_key)
    cid = ask(client, "one")
    client.conversations.update(cid, metadata={}, extra_body={"model": "gpt-4o"})
    assert store.get(cid, owner="alice").model == "gpt-4o"
    with statements(store) as seen:
        ask(client, "two", cid)
    assert LEASE in seen[0] and any(CHECK_READ in sql for sql in seen), seen
    with statements(store) as seen:
        ask(client, "three", cid)
    assert LEASE in seen[0] and not any(CHECK_READ in sql for sql in seen)
    assert len(stored(store, cid)) == 6


def test_a_message_longer_than_the_store_takes_after_a_reply_gets_400_and_nothing_is_stored_or_sent(
    db_url: str, stub: StubServer
) -> None:
    # The gateway's body limit lets through a message over the store's own limit: the store
    # refuses it before it writes anything.
    with (
        ConversationStore(db_url, max_message_chars=100) as store,
        running_gateway(store, stub.base_url) as gateway,
    ):
        client = sdk_client(gateway, APIKeys(store).create(owner="alice")[0])
        cid = ask(client, "one")
        sent = len(stub.requests)
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, "x" * 101, cid)
        assert "the store accepts at most 100" in caught.value.message
        assert len(stub.requests) == sent and len(stored(store, cid)) == 2
        ask(client, "two", cid)
        assert len(stored(store, cid)) == 4
