"""The gateway driven by the official openai SDK over real HTTP: a uvicorn server on
loopback in front of the stub upstream, on SQLite and Postgres."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from _gateway import UPSTREAM_KEY, GatewayServer, running_gateway, sdk_client, stored
from stub_server import STUB_MODELS, StubServer

from gilas_conv import ConversationStore
from gilas_conv.store import APIKeys

API_KEY = UPSTREAM_KEY  # what the module's stub server accepts


@pytest.fixture
def bob_key(store: ConversationStore) -> str:
    return APIKeys(store).create(owner="bob")[0]


def test_a_conversation_persists_and_only_new_messages_are_sent(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    sdk = sdk_client(gateway, alice_key)
    first = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    )
    completion = first.parse()
    conversation_id = completion.conversation  # type: ignore[attr-defined]
    assert first.headers["x-gilas-conversation"] == conversation_id
    assert completion.choices[0].message.content == "echo: hello"
    assert completion.usage is not None and completion.usage.total_tokens > 0

    second = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "and again"}],
        extra_body={"conversation": conversation_id},
    )
    assert second.conversation == conversation_id  # type: ignore[attr-defined]
    sent = stub.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent] == ["Be brief.", "hello", "echo: hello", "and again"]
    assert stored(store, conversation_id) == [
        ("system", "Be brief.", "complete"),
        ("user", "hello", "complete"),
        ("assistant", "echo: hello", "complete"),
        ("user", "and again", "complete"),
        ("assistant", "echo: and again", "complete"),
    ]


def test_a_resending_client_does_not_duplicate_history(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    sdk = sdk_client(gateway, alice_key)
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "one"}]
    first = sdk.chat.completions.create(model="gpt-4o-mini", messages=history)  # type: ignore[arg-type]
    cid = first.conversation  # type: ignore[attr-defined]
    history += [{"role": "assistant", "content": "echo: one"}, {"role": "user", "content": "two"}]
    sdk.chat.completions.create(model="gpt-4o-mini", messages=history, extra_body={"conversation": cid})  # type: ignore[arg-type]
    # The system prompt again, then only the new message: also fine.
    sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "three"}],
        extra_body={"conversation": cid},
    )
    assert [c for _, c, _ in stored(store, cid)] == [
        "S",
        "one",
        "echo: one",
        "two",
        "echo: two",
        "three",
        "echo: three",
    ]


def test_a_diverged_history_is_refused_with_409_and_nothing_is_stored_or_sent(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    sdk = sdk_client(gateway, alice_key)
    cid = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one"}]
    ).conversation  # type: ignore[attr-defined]
    before, sent = stored(store, cid), len(stub.requests)
    with pytest.raises(openai.ConflictError) as caught:
        sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "something else"},
                {"role": "user", "content": "two"},
            ],
            extra_body={"conversation": cid},
        )
    assert caught.value.code == "conversation_diverged"
    assert "fork" in caught.value.message
    assert stored(store, cid) == before and len(stub.requests) == sent


async def test_async_streaming_names_the_conversation_in_every_chunk(
    gateway: GatewayServer, store: ConversationStore, alice_key: str
) -> None:
    sdk = openai.AsyncOpenAI(base_url=gateway.url, api_key=alice_key, max_retries=0)
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    await sdk.close()
    ids = {chunk.conversation for chunk in chunks}  # type: ignore[attr-defined]
    assert len(ids) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert chunks[-1].usage is not None and not chunks[-1].choices
    (cid,) = ids
    assert stored(store, cid)[-1] == ("assistant", "echo: stream me please", "complete")


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "utf8"])
def test_streamed_chunks_are_the_upstreams_as_sent_with_the_conversation_added(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str, ensure_ascii: bool
) -> None:
    reply = 'سلام "دنیا"، \\ این\tیک آزمون است'
    sdk = sdk_client(gateway, alice_key)
    options = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True}}
    stub.script({"reply": reply, "ensure_ascii": ensure_ascii})
    chunks = list(sdk.chat.completions.create(messages=[{"role": "user", "content": "salam"}], **options))
    cid = chunks[0].conversation  # type: ignore[attr-defined]
    assert all(chunk.conversation == cid for chunk in chunks)  # type: ignore[attr-defined]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert stored(store, cid)[-1] == ("assistant", reply, "complete")

    # On the wire: the upstream's chunks as it wrote them (its escapes or its UTF-8), each
    # with the conversation added.
    stub.script({"reply": reply, "ensure_ascii": ensure_ascii})
    with sdk.chat.completions.with_streaming_response.create(
        messages=[{"role": "user", "content": "again"}], extra_body={"conversation": cid}, **options
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks_sent = [json.loads(line[len("data: ") :]) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["conversation"] == cid for c in chunks_sent)
    assert all(c["system_fingerprint"] == "fp_stub" for c in chunks_sent)
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks_sent if c["choices"]) == reply
    )
    wire = "\n".join(events)
    assert ("\\u0633" in wire) is ensure_ascii and ("س" in wire) is not ensure_ascii
    assert stored(store, cid)[-1] == ("assistant", reply, "complete")


def test_streaming_without_include_usage_sends_no_usage_chunk(gateway: GatewayServer, alice_key: str) -> None:
    chunks = list(
        sdk_client(gateway, alice_key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_calls_round_trip(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str, streamed: bool
) -> None:
    sdk = sdk_client(gateway, alice_key)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    stub.script({"tool_calls": [{"name": "weather", "arguments": '{"city": "Tehran"}', "id": "call_1"}]})
    if streamed:
        chunks = list(
            sdk.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "weather?"}],
                tools=tools,  # type: ignore[arg-type]
                stream=True,
            )
        )
        cid = chunks[0].conversation  # type: ignore[attr-defined]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        first = sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "weather?"}],
            tools=tools,  # type: ignore[arg-type]
        )
        cid = first.conversation  # type: ignore[attr-defined]
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "weather" and call.id == "call_1"
    stub.script({"reply": "Sunny."})
    second = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25C"}],
        tools=tools,  # type: ignore[arg-type]
        extra_body={"conversation": cid},
    )
    assert second.choices[0].message.content == "Sunny."
    roles = [m.role for m in store.get(cid, owner="alice").messages()]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert [m["role"] for m in stub.requests[-1]["body"]["messages"]] == ["user", "assistant", "tool"]


def test_a_tool_result_without_its_call_is_refused_and_nothing_is_stored(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str
) -> None:
    sdk = sdk_client(gateway, alice_key)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "tool", "tool_call_id": "nope", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "wizard", "content": "x"}],  # type: ignore[misc,list-item]
        )
    assert store.count(owner="alice") == 0 and stub.requests == []


def test_conversations_api_with_the_sdk(
    gateway: GatewayServer, store: ConversationStore, alice_key: str
) -> None:
    sdk = sdk_client(gateway, alice_key)
    conv = sdk.conversations.create(
        items=[{"type": "message", "role": "system", "content": "Be brief."}],
        metadata={"topic": "demo"},
    )
    assert conv.object == "conversation" and conv.metadata == {"topic": "demo"}
    assert sdk.conversations.retrieve(conv.id).id == conv.id
    assert sdk.conversations.update(conv.id, metadata={"topic": "changed"}).metadata == {"topic": "changed"}

    added = sdk.conversations.items.create(
        conv.id,
        items=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "assistant", "content": "hello"},
        ],
    )
    assert [item.id for item in added.data] == ["msg_2", "msg_3"]
    sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}], extra_body={"conversation": conv.id}
    )
    ascending = [item.id for item in sdk.conversations.items.list(conv.id, order="asc", limit=2)]
    assert ascending == ["msg_1", "msg_2", "msg_3", "msg_4", "msg_5"]  # auto-paginated, 2 per page
    newest = sdk.conversations.items.list(conv.id, limit=2)
    assert [item.id for item in newest.data] == ["msg_5", "msg_4"] and newest.has_more
    assert [item.id for item in sdk.conversations.items.list(conv.id, limit=2)] == [
        "msg_5",
        "msg_4",
        "msg_3",
        "msg_2",
        "msg_1",
    ]
    reply = sdk.conversations.items.retrieve("msg_5", conversation_id=conv.id)
    assert reply.type == "message" and reply.role == "assistant"  # type: ignore[union-attr]
    assert reply.content[0].text == "echo: q"  # type: ignore[union-attr]
    assert reply.status == "completed"  # type: ignore[union-attr]

    sdk.conversations.items.delete("msg_3", conversation_id=conv.id)
    assert [item.id for item in sdk.conversations.items.list(conv.id, order="asc")] == [
        "msg_1",
        "msg_2",
        "msg_4",
        "msg_5",
    ]
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.items.retrieve("msg_3", conversation_id=conv.id)

    deleted = sdk.conversations.delete(conv.id)
    assert deleted.deleted and deleted.id == conv.id
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.retrieve(conv.id)


def test_listing_conversations_most_recent_first_paginated(gateway: GatewayServer, alice_key: str) -> None:
    sdk = sdk_client(gateway, alice_key)
    made = [sdk.conversations.create().id for _ in range(5)]
    with httpx.Client(headers={"Authorization": f"Bearer {alice_key}"}) as http:
        seen: list[str] = []
        after = None
        while True:
            params = {"limit": 2, **({"after": after} if after else {})}
            page = http.get(f"{gateway.url}/conversations", params=params)
            assert page.status_code == 200
            body = page.json()
            seen += [c["id"] for c in body["data"]]
            if not body["has_more"]:
                break
            after = body["last_id"]
    assert seen == list(reversed(made))


def test_models_are_passed_through(gateway: GatewayServer, alice_key: str) -> None:
    assert [m.id for m in sdk_client(gateway, alice_key).models.list()] == list(STUB_MODELS)


def test_health_and_readiness(gateway: GatewayServer) -> None:
    assert httpx.get(f"{gateway.root}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.root}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_keys_missing_wrong_or_revoked_get_401(
    gateway: GatewayServer, store: ConversationStore, alice_key: str
) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk_client(gateway, "gc-not-a-key").models.list()
    assert httpx.get(f"{gateway.url}/models").status_code == 401
    sdk = sdk_client(gateway, alice_key)
    sdk.models.list()
    APIKeys(store).revoke(alice_key)
    time.sleep(0.6)  # the gateway's key cache lasts 0.5 s in these tests
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()


def test_a_body_over_the_limit_gets_413(store: ConversationStore, stub: StubServer, alice_key: str) -> None:
    with (
        running_gateway(store, stub.base_url, max_body_bytes=1000) as small,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        sdk_client(small, alice_key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 2000}]
        )
    assert caught.value.status_code == 413
    assert store.count(owner="alice") == 0 and stub.requests == []


def test_another_tenants_conversation_does_not_exist_on_any_endpoint(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str, bob_key: str
) -> None:
    alice = sdk_client(gateway, alice_key)
    cid = alice.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "secret"}]
    ).conversation  # type: ignore[attr-defined]
    before, sent = stored(store, cid), len(stub.requests)
    bob = sdk_client(gateway, bob_key)
    attempts = [
        lambda: bob.conversations.retrieve(cid),
        lambda: bob.conversations.update(cid, metadata={"x": "y"}),
        lambda: bob.conversations.delete(cid),
        lambda: bob.conversations.items.create(cid, items=[{"role": "user", "content": "hi"}]),
        lambda: bob.conversations.items.list(cid),
        lambda: bob.conversations.items.retrieve("msg_1", conversation_id=cid),
        lambda: bob.conversations.items.delete("msg_1", conversation_id=cid),
        lambda: bob.conversations.create(extra_body={"fork_from": cid}),
        lambda: bob.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], extra_body={"conversation": cid}
        ),
        lambda: bob.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"conversation": cid},
            stream=True,
        ),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert bob.conversations.with_raw_response.create().http_response.status_code == 200
    listed = httpx.get(f"{gateway.url}/conversations", headers={"Authorization": f"Bearer {bob_key}"}).json()
    assert [c["id"] for c in listed["data"]] != [cid] and cid not in {c["id"] for c in listed["data"]}
    assert stored(store, cid) == before and len(stub.requests) == sent
    assert alice.conversations.retrieve(cid).id == cid


def test_a_request_over_its_owners_quota_gets_429_insufficient_quota_and_nothing_is_stored_or_sent(
    gateway: GatewayServer, store: ConversationStore, stub: StubServer, alice_key: str, bob_key: str
) -> None:
    sdk = sdk_client(gateway, alice_key)
    cid = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one"}], max_tokens=50
    ).conversation  # type: ignore[attr-defined]
    store.set_quota("alice", daily_tokens=10)  # already used more than that
    before, sent = stored(store, cid), len(stub.requests)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "two"}],
            max_tokens=50,
            extra_body={"conversation": cid},
        )
    assert caught.value.status_code == 429
    assert caught.value.code == "insufficient_quota"
    assert caught.value.type == "insufficient_quota"
    assert "quota" in caught.value.message
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert stored(store, cid) == before and len(stub.requests) == sent
    # Another owner is not limited by alice's quota.
    other = sdk_client(gateway, bob_key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50
    )
    assert other.choices[0].message.content == "echo: hi"
