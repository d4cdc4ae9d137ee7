"""The senders and quotas: a turn reserves the owner's quota before anything is stored or
sent, the reply settles it, a failure releases it, and summary requests are charged too.
Each test runs for Sender and AsyncSender."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from _sender_fixtures import Driver, FakeAPI, completion, error_response, stream_response, text_stream

from gilas_conv import APIConnectionError, ConversationStore, InternalServerError, QuotaExceeded

pytest_plugins = ["_sender_fixtures"]

Store = ConversationStore


def _usage(total: int) -> dict[str, Any]:
    return {"prompt_tokens": total - 1, "completion_tokens": 1, "total_tokens": total}


def _state(store: Store, owner: str) -> tuple[int, int]:
    [status] = store.quota(owner)
    return int(status.used), int(status.reserved)


def test_over_the_quota_nothing_is_stored_or_sent(make_driver: Any, sqlite_store: Store) -> None:
    api = FakeAPI(default=completion("hi", usage=_usage(40)))
    driver: Driver = make_driver(sqlite_store, transport=api.transport())
    sqlite_store.set_quota("alice", daily_tokens=200)
    conv = sqlite_store.create(owner="alice")
    reply = driver.send(conv.id, "hello", owner="alice", max_tokens=50)
    assert reply.content == "hi"
    assert _state(sqlite_store, "alice") == (40, 0)  # settled to what the API reported
    before = [m.seq for m in conv.messages()]
    with pytest.raises(QuotaExceeded) as info:
        driver.send(conv.id, "more", owner="alice", max_tokens=150)  # 40 + prompt + 150 > 200
    assert info.value.used == 40 and info.value.limit == 200
    assert [m.seq for m in conv.messages()] == before
    assert len(api.requests) == 1
    with pytest.raises(QuotaExceeded):  # the stream and retry paths check as well
        driver.stream(conv.id, "more", owner="alice", max_tokens=150)
    with pytest.raises(QuotaExceeded):
        driver.retry(conv.id, owner="alice", max_tokens=190)
    assert len(api.requests) == 1 and [m.seq for m in conv.messages()] == before
    assert _state(sqlite_store, "alice") == (40, 0)
    # The reservation is the prompt about to be sent plus max_tokens.
    driver.send(conv.id, "fits", owner="alice", max_tokens=20)
    assert len(api.requests) == 2


def test_a_failed_request_releases_its_reservation(make_driver: Any, sqlite_store: Store) -> None:
    api = FakeAPI(error_response(500), httpx.ConnectError("down"))
    driver: Driver = make_driver(sqlite_store, transport=api.transport(), max_retries=0)
    sqlite_store.set_quota("bob", daily_tokens=10_000)
    conv = sqlite_store.create(owner="bob")
    with pytest.raises(InternalServerError):
        driver.send(conv.id, "hello", owner="bob", max_tokens=100)
    assert _state(sqlite_store, "bob") == (0, 0)
    with pytest.raises(APIConnectionError):
        driver.stream(conv.id, owner="bob", again=True, max_tokens=100)
    assert _state(sqlite_store, "bob") == (0, 0)
    # A stream settles with the usage of its last chunk.
    api.script(stream_response(text_stream("streamed")))
    _chunks, message = driver.stream(conv.id, owner="bob", again=True, max_tokens=100)
    assert message is not None and message.usage is not None
    used, reserved = _state(sqlite_store, "bob")
    assert (used, reserved) == (message.usage["total_tokens"], 0)


def test_summary_requests_are_charged_to_the_owner(make_driver: Any, sqlite_store: Store) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "condense" in body["messages"][0]["content"]:
            return httpx.Response(200, json=completion("A summary.", usage=_usage(300)))
        return httpx.Response(200, json=completion("reply", usage=_usage(500)))

    api = FakeAPI(default=answer)
    driver: Driver = make_driver(sqlite_store, transport=api.transport(), policy="summarize")
    conv = sqlite_store.create(system="Be brief.", owner="carol")
    for i in range(6):
        conv.append("user", f"question {i} " + "about the weather " * 30)
        conv.append("assistant", f"answer {i} " + "it is sunny " * 30)
    sqlite_store.set_quota("carol", monthly_tokens=100_000)
    driver.send(conv.id, "and tomorrow?", owner="carol", context_limit=700, max_tokens=100)
    kinds = {r.key: r.total_tokens for r in sqlite_store.usage(by="owner")}
    assert kinds == {"carol": 800}
    assert _state(sqlite_store, "carol") == (800, 0)


def test_the_reservation_is_the_window_sent_plus_max_tokens(make_driver: Any, sqlite_store: Store) -> None:
    held: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        [status] = sqlite_store.quota("dora")
        held.append(int(status.reserved))  # what the turn holds while its request is out
        return httpx.Response(200, json=completion("ok", usage=_usage(30)))

    api = FakeAPI(default=answer)
    driver: Driver = make_driver(sqlite_store, transport=api.transport())
    sqlite_store.set_quota("dora", daily_tokens=100_000)
    conv = sqlite_store.create(system="Be brief.", owner="dora")
    for i in range(3):
        conv.append("user", f"question {i} " + "words " * 20)
        conv.append("assistant", f"answer {i}")
    for max_tokens in (64, 128):
        message = driver.send(conv.id, "one more " * 10, owner="dora", max_tokens=max_tokens)
        assert message.predicted_prompt_tokens is not None
        assert held[-1] == message.predicted_prompt_tokens + max_tokens
    assert int(sqlite_store.quota("dora")[0].reserved) == 0


def test_a_limited_turn_takes_its_reservation_in_its_one_transaction(
    make_driver: Any, sqlite_store: Store
) -> None:
    # A sender's first turn for a limited owner reads no window before the turn and rolls
    # no transaction back: whether a limit applies, and the history the reservation is for,
    # come from the turn's own lease statement.
    from sqlalchemy import event

    api = FakeAPI(default=completion("ok", usage=_usage(30)))
    driver: Driver = make_driver(sqlite_store, transport=api.transport())
    sqlite_store.set_quota("erin", daily_tokens=100_000)
    conv = sqlite_store.create(system="Be brief.", owner="erin")
    conv.append("user", "question " + "words " * 20)
    conv.append("assistant", "answer")
    rollbacks: list[object] = []

    def count(conn: object) -> None:
        rollbacks.append(conn)

    event.listen(sqlite_store.engine, "rollback", count)
    try:
        driver.send(conv.id, "one more", owner="erin", max_tokens=64)
    finally:
        event.remove(sqlite_store.engine, "rollback", count)
    assert rollbacks == []
    assert _state(sqlite_store, "erin") == (30, 0)


def test_a_limited_owner_may_drop_a_large_last_turn(make_driver: Any, sqlite_store: Store) -> None:
    # The window of a turn drops the oldest turns that do not fit, the last stored one
    # included, whether or not a limit applies (planning the reservation over the stored
    # history alone once refused this with ContextWindowExceeded under a limit only).
    api = FakeAPI(default=completion("ok", usage=_usage(30)))
    driver: Driver = make_driver(sqlite_store, transport=api.transport())
    sqlite_store.set_quota("fay", daily_tokens=100_000)
    sent = []
    for owner in ("gus", "fay"):  # without a limit, then with one
        conv = sqlite_store.create(system="Be brief.", owner=owner)
        conv.append("user", "x " * 200)
        conv.append("assistant", "y " * 200)
        message = driver.send(conv.id, "z " * 250, owner=owner, context_limit=700, max_tokens=100)
        sent.append(json.loads(api.requests[-1].content)["messages"])
        assert message.predicted_prompt_tokens is not None
    assert sent[0] == sent[1] and len(sent[1]) == 2  # the system message and the new one
    assert _state(sqlite_store, "fay") == (30, 0)
