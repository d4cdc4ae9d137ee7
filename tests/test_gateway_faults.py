"""The gateway under faults: upstream errors and cuts, clients leaving mid-stream, two
requests on one conversation. Afterwards the stored messages are counted: none lost, none
doubled."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
from _gateway import UPSTREAM_KEY, GatewayServer, sdk_client, stored, turn_in_background, wait_for
from stub_server import StubServer

from gilas_conv import ConversationStore, Sender
from gilas_conv.server import create_app

API_KEY = UPSTREAM_KEY


def start(client: openai.OpenAI) -> str:
    return client.chat.completions.create(  # type: ignore[no-any-return]
        model="gpt-4o-mini", messages=[{"role": "user", "content": "first"}]
    ).conversation  # type: ignore[attr-defined]


def send_second(client: openai.OpenAI, cid: str, *, streamed: bool) -> None:
    """The message "second" in ``cid``, its stream (if ``streamed``) read to the end."""
    answer = client.chat.completions.create(  # type: ignore[call-overload]
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "second"}],
        extra_body={"conversation": cid},
        stream=streamed,
    )
    if streamed:
        list(answer)


@pytest.mark.parametrize("streamed", [False, True])
def test_upstream_429_is_passed_through_with_retry_after_and_a_client_retry_doubles_nothing(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str, streamed: bool
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = start(client)
    stub.script({"status": 429, "headers": {"Retry-After": "7"}})
    request = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "second"}],
        "extra_body": {"conversation": cid},
    }
    with pytest.raises(openai.RateLimitError) as caught:
        if streamed:
            list(client.chat.completions.create(stream=True, **request))  # type: ignore[call-overload]
        else:
            client.chat.completions.create(**request)  # type: ignore[call-overload]
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.response.headers["x-gilas-conversation"] == cid
    # The client retries the same request: the stored, unanswered message is not stored again.
    client.chat.completions.create(**request)  # type: ignore[call-overload]
    assert stored(store, cid) == [
        ("user", "first", "complete"),
        ("assistant", "echo: first", "complete"),
        ("user", "second", "complete"),
        ("assistant", "echo: second", "complete"),
    ]


def test_a_retried_message_of_a_long_conversation_is_stored_once(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    # Longer than the first messages the gateway compares a request with: the unanswered
    # message is at the end, far from them.
    conv = store.create(model="gpt-4o-mini", owner="alice")
    for i in range(12):
        conv.append("user", f"question {i}")
        conv.append("assistant", f"answer {i}")
    client = sdk_client(gateway, alice_key)
    request = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "again?"}],
        "extra_body": {"conversation": conv.id},
    }
    stub.script({"status": 500})
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**request)  # type: ignore[call-overload]
    client.chat.completions.create(**request)  # type: ignore[call-overload]
    assert stored(store, conv.id)[-3:] == [
        ("assistant", "answer 11", "complete"),
        ("user", "again?", "complete"),
        ("assistant", "echo: again?", "complete"),
    ]


def test_upstream_500_answers_a_stream_with_500(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = start(client)
    stub.script({"status": 500})
    with pytest.raises(openai.InternalServerError) as caught:
        send_second(client, cid, streamed=True)
    assert caught.value.status_code == 500
    assert UPSTREAM_KEY not in caught.value.message
    assert len(stored(store, cid)) == 3  # the message waits for a retry; nothing else stored


@pytest.mark.parametrize("streamed", [False, True])
def test_an_upstream_that_closes_without_answering_is_a_502_that_says_so(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str, streamed: bool
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = start(client)
    stub.script({"drop": True})
    with pytest.raises(openai.APIStatusError) as caught:
        send_second(client, cid, streamed=streamed)
    assert caught.value.status_code == 502
    assert "timed out" not in caught.value.message
    assert len(stored(store, cid)) == 3  # the message waits for a retry; nothing else stored


def test_an_upstream_cut_mid_stream_stores_what_arrived_as_incomplete(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = start(client)
    stub.script({"cut_after": 2, "reply": "one two three four"})
    received = ""
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "second"}],
            extra_body={"conversation": cid},
            stream=True,
        ):
            received += chunk.choices[0].delta.content or ""
    assert received == "one two "
    assert stored(store, cid)[-2:] == [
        ("user", "second", "complete"),
        ("assistant", "one two ", "incomplete"),
    ]
    # The next turn sends the history without the interrupted reply, and stores it once.
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "third"}], extra_body={"conversation": cid}
    )
    sent = [m["content"] for m in stub.requests[-1]["body"]["messages"]]
    assert sent == ["first", "echo: first", "second", "third"]
    assert len(stored(store, cid)) == 6


def test_a_client_leaving_mid_stream_cancels_the_upstream_and_stores_what_arrived(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    cid = start(sdk_client(gateway, alice_key))
    stub.script({"reply": "a b c d e f g h i j", "chunk_delay": 0.3})
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "slow"}],
        "conversation": cid,
        "stream": True,
    }
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST",
            f"{gateway.url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {alice_key}"},
        ) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the first words arrived; the client goes away
    wait_for(lambda: len(stored(store, cid)) == 4)
    time.sleep(0.5)  # nothing more arrives later
    last = stored(store, cid)
    assert len(last) == 4 and last[2] == ("user", "slow", "complete")
    role, content, status = last[3]
    assert role == "assistant" and status == "incomplete"
    assert isinstance(content, str) and content.startswith("a ") and content != "a b c d e f g h i j"


def test_two_requests_on_one_conversation_never_interleave(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = start(client)
    stub.script({"delay": 1.0, "reply": "slow answer"})
    worker = turn_in_background(client, cid, "slow")
    wait_for(lambda: len(stub.requests) == 2)  # the slow turn reached the upstream
    with pytest.raises(openai.ConflictError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "fast"}],
            extra_body={"conversation": cid},
        )
    worker.join()
    assert caught.value.code == "conversation_busy"
    assert [c for _, c, _ in stored(store, cid)] == ["first", "echo: first", "slow", "slow answer"]
    assert len(stub.requests) == 2


def long_conversation(store: ConversationStore) -> str:
    conv = store.create(model="gpt-4o-mini", owner="alice")
    for i in range(6):
        conv.append("user", f"question {i} " + "about the weather " * 30)
        conv.append("assistant", f"answer {i} " + "it is sunny " * 30)
    return conv.id


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("held", ["reply", "summary"])
def test_a_client_that_gives_up_while_the_upstream_holds_frees_the_conversation(
    gateway: GatewayServer,
    store: ConversationStore,
    stub: StubServer,
    alice_key: str,
    streamed: bool,
    held: str,
) -> None:
    # "reply": the turn's own request is held; "summary": the summary made while the turn is
    # prepared (its message stored and its lease taken) is held.
    if held == "reply":
        cid = start(sdk_client(gateway, alice_key))
        extra: dict[str, object] = {"conversation": cid}
    else:
        cid = long_conversation(store)
        extra = {"conversation": cid, "policy": "summarize", "context_limit": 700}
    stub.reset()
    stub.script({"hold": True})
    impatient = openai.OpenAI(base_url=gateway.url, api_key=alice_key, max_retries=0, timeout=2.0)
    with impatient, pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "gone"}],
            max_tokens=100,
            extra_body=extra,
            stream=streamed,
        )
    assert len(stub.requests) == 1  # the client left while that one request was held
    assert ("condense" in str(stub.requests[0]["body"])) == (held == "summary")
    stub.release()  # the held request ends; the turn nobody waits for must free the conversation
    began, reply = time.monotonic(), None
    with sdk_client(gateway, alice_key) as client:
        while reply is None and time.monotonic() - began < 10:
            try:
                reply = client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "back"}],
                    max_tokens=100,
                    extra_body=extra,
                )
            except openai.ConflictError:
                time.sleep(0.1)
    assert reply is not None, "the conversation stayed busy after its client left"
    assert reply.choices[0].message.content == "echo: back"
    kept = stored(store, cid)
    gone = kept.index(("user", "gone", "complete"))
    # The held answer may reach the gateway just as the client leaves: then what arrived of
    # it is stored, once, before the next turn. Nothing else is stored in between.
    between = kept[gone + 1 : -2]
    assert between == [] or (len(between) == 1 and between[0][0] == "assistant"), kept
    assert kept[-2:] == [("user", "back", "complete"), ("assistant", "echo: back", "complete")]


@pytest.mark.parametrize("left", ["before the first chunk", "while a chunk is written"])
def test_a_stream_whose_client_leaves_as_it_begins_frees_the_conversation_at_once(
    store: ConversationStore, stub: StubServer, alice_key: str, left: str
) -> None:
    # The client is there while the turn runs and leaves as the response begins: before its
    # first chunk (the upstream answered just as the client gave up), or while a chunk is
    # being written to it (a slow reader). Driven through the ASGI interface, so that exactly
    # this order happens; the conversation must be free as soon as the response is over,
    # not whenever the server shuts down or the collector runs.
    cid = store.create(model="gpt-4o-mini", owner="alice").id
    stub.script({"reply": "a b c d", "chunk_delay": 0.05})
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "conversation": cid}
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {alice_key}".encode()),
            (b"content-type", b"application/json"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    app = create_app(store=store, base_url=stub.base_url, api_key=UPSTREAM_KEY)
    calls = 0
    writing = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": json.dumps({**body, "stream": True}).encode()}
        if calls == 2:  # read while the turn runs: the client waits
            await asyncio.Event().wait()
        if left == "while a chunk is written":
            await writing.wait()
        return {"type": "http.disconnect"}  # read once the response began: gone

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and left == "while a chunk is written":
            writing.set()
            await asyncio.Event().wait()  # the client reads nothing more

    def turn_again() -> str | None:
        with Sender(store, base_url=stub.base_url, api_key=UPSTREAM_KEY) as sender:
            return sender.send(cid, "again", owner="alice").content  # type: ignore[return-value]

    async def main() -> str | None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)  # type: ignore[arg-type]
            assert calls == 3  # the response began, then saw the client gone
            return await asyncio.to_thread(turn_again)

    assert asyncio.run(main()) == "echo: again"
    kept = stored(store, cid)
    # What arrived of the first reply is stored once (incomplete), or nothing if nothing did.
    assert kept[0] == ("user", "hi", "complete") and kept[-2:] == [
        ("user", "again", "complete"),
        ("assistant", "echo: again", "complete"),
    ]
    assert len(kept) == 3 or kept[1][2] == "incomplete"


def test_items_written_while_a_turn_is_answered_are_refused_and_never_interleave(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    client = sdk_client(gateway, alice_key)
    cid = start(client)
    stub.script({"hold": True, "reply": "slow answer"})
    worker = turn_in_background(client, cid, "slow")
    try:
        wait_for(lambda: len(stub.requests) == 2)  # the slow turn reached the upstream
        note = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "note"}]}
        with pytest.raises(openai.ConflictError) as appended:
            client.conversations.items.create(cid, items=[note])  # type: ignore[list-item]
        with pytest.raises(openai.ConflictError) as deleted:
            client.conversations.items.delete("msg_1", conversation_id=cid)
        assert appended.value.code == deleted.value.code == "conversation_busy"
        assert [c for _, c, _ in stored(store, cid)] == ["first", "echo: first", "slow"]
    finally:
        stub.release()
        worker.join()
    # Once the turn is answered, the same writes go through, after its reply.
    added = client.conversations.items.create(cid, items=[note])  # type: ignore[list-item]
    assert [item.id for item in added.data] == ["msg_5"]
    client.conversations.items.delete("msg_1", conversation_id=cid)
    assert [c for _, c, _ in stored(store, cid)] == ["echo: first", "slow", "slow answer", "note"]
    assert len(stub.requests) == 2
