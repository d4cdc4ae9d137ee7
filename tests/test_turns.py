"""One reply per message (issue 8, A and B), on SQLite and Postgres, against a real server.

A. A response id is the server's label, not a key: a new reply that reuses an earlier
   reply's id is stored and returned, never swapped for the earlier one.
B. One request answers a conversation at a time: the turn lease lives in the
   conversation's row, so concurrent ``send``/``retry`` calls -- threads, processes -- are
   refused with ConversationBusy and store nothing, and a lease left by a killed process
   expires.

Requests are kept in flight with the stub's ``{"hold": true}`` until the test has seen the
others refused, so the overlap is certain, not a matter of timing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.dialects import postgresql
from stub_server import StubServer

from gilas_conv import (
    APIConnectionError,
    AsyncSender,
    BadRequestError,
    ConversationBusy,
    ConversationNotFound,
    ConversationStore,
    Message,
    Sender,
    StoreError,
    StreamInterrupted,
    build_context,
)
from gilas_conv.store import NotAfterReply, _store
from gilas_conv.store._schema import ANCHOR_PREDICATE

API_KEY = "sk-turns-test-5b1e"
TIMEOUT_S = 30
HELD = {"hold": True, "reply": "the one answer"}


@pytest.fixture
def sender(store: ConversationStore, stub: StubServer) -> Iterator[Sender]:
    with Sender(store, api_key=API_KEY, base_url=stub.base_url, max_retries=0) as opened:
        yield opened


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _while_another_holds_the_row(
    store: ConversationStore, writes: list[tuple[str, dict[str, Any]]], call: Callable[[], Any], what: str
) -> Any:
    """Postgres: ``call()`` in a thread while another transaction, having run ``writes``
    (which update the conversation's row), holds the row; that transaction commits once
    ``call`` waits for the row. Returns what ``call`` returned (or raises what it raised)."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["result"] = call()
        except BaseException as err:  # raised below
            done["error"] = err

    with store.engine.connect() as other, store.engine.connect() as watcher:
        watcher.execution_options(isolation_level="AUTOCOMMIT")  # fresh activity each read
        with other.begin():
            for statement, params in writes:
                other.execute(sqlalchemy.text(statement), params)
            worker = threading.Thread(target=run)
            worker.start()
            waiting = sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            _wait_for(lambda: watcher.execute(waiting).scalar() >= 1 or not worker.is_alive(), what)
        worker.join(TIMEOUT_S)
    if "error" in done:
        raise done["error"]
    return done["result"]


def _contents(store: ConversationStore, conversation_id: str) -> list[tuple[str, Any, str]]:
    return [(m.role, m.content, m.status) for m in store.get(conversation_id).messages()]


def _unanswered(store: ConversationStore) -> str:
    """A conversation whose last message waits for its reply (a send that failed)."""
    conversation = store.create(model="gpt-4o-mini", system="Be brief.")
    conversation.append("user", "What is the capital of Iran?")
    return conversation.id


# ---------------------------------------------------------------------------------------------
# A. A reused response id


@pytest.mark.parametrize("streamed", [False, True], ids=["send", "stream"])
def test_a_reply_reusing_a_response_id_is_stored_and_returned(
    store: ConversationStore, sender: Sender, stub: StubServer, streamed: bool
) -> None:
    conversation = store.create(model="gpt-4o-mini")
    questions = ["What is 2+2?", "What is the capital of Iran?", "And of France?"]
    answers = ["4", "Tehran", "Paris"]
    stub.script(*({"reply": answer, "response_id": "chatcmpl-1"} for answer in answers))
    for question, answer in zip(questions, answers, strict=True):
        if streamed:
            with sender.stream(conversation.id, question) as stream:
                assert "".join(chunk.delta for chunk in stream) == answer
            reply = stream.message
        else:
            reply = sender.send(conversation.id, question)
        assert reply is not None and reply.content == answer
        assert reply.response_id == "chatcmpl-1"
    assert _contents(store, conversation.id) == [
        (role, text, "complete")
        for pair in zip(questions, answers, strict=True)
        for role, text in zip(("user", "assistant"), pair, strict=True)
    ]
    # The third request replayed both earlier replies, each its own.
    sent = [(m["role"], m["content"]) for m in stub.requests[-1]["body"]["messages"]]
    assert sent[:4] == [
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", questions[1]),
        ("assistant", "Tehran"),
    ]


def test_async_send_returns_the_new_reply_when_the_id_repeats(
    store: ConversationStore, stub: StubServer
) -> None:
    conversation = store.create(model="gpt-4o-mini")
    stub.script({"reply": "4", "response_id": "r1"}, {"reply": "Tehran", "response_id": "r1"})

    async def run() -> list[Message]:
        async with AsyncSender(store, api_key=API_KEY, base_url=stub.base_url) as sender:
            return [await sender.send(conversation.id, q) for q in ("2+2?", "Capital of Iran?")]

    first, second = asyncio.run(run())
    assert (first.content, second.content) == ("4", "Tehran")
    assert second.seq == 4 and second.reply_to == 3


@pytest.fixture
def cli_env(stub: StubServer, db_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "GILAS_API_KEY": API_KEY,
        "GILAS_BASE_URL": stub.base_url,
        "GILAS_CONV_DATABASE_URL": db_url,
        "COLUMNS": "100",
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gilas_conv", *args]


def test_cli_send_prints_the_new_answer_when_the_id_repeats(
    store: ConversationStore, stub: StubServer, cli_env: dict[str, str]
) -> None:
    conversation = store.create(model="gpt-4o-mini")
    stub.script(
        {"reply": "4", "response_id": "chatcmpl-short"},
        {"reply": "Tehran is the capital of Iran.", "response_id": "chatcmpl-short"},
    )
    for question, answer in (
        ("What is 2+2?", "4"),
        ("What is the capital of Iran?", "Tehran is the capital"),
    ):
        done = subprocess.run(
            _cli("send", "-c", conversation.id, question), env=cli_env, capture_output=True, timeout=TIMEOUT_S
        )
        assert done.returncode == 0, done.stderr.decode()
        assert answer in done.stdout.decode()
    assert (
        "4"
        not in subprocess.run(
            _cli("show", conversation.id), env=cli_env, capture_output=True, timeout=TIMEOUT_S
        )
        .stdout.decode()
        .split("Tehran")[1]
    )
    assert [m.content for m in store.get(conversation.id).messages()][-1] == "Tehran is the capital of Iran."


def test_a_reply_stored_while_its_repeat_waited_for_the_row_is_stored_once(store: ConversationStore) -> None:
    # Postgres: the reply's append waits for the conversation's row while another request
    # stores the same reply (same response id, same message answered, same text). Once that
    # commits, the waiting append must find it and return it, not store the reply twice: a
    # check made by a subquery of the waiting statement reads the snapshot taken before the
    # wait and would not see it.
    if store.dialect != "postgresql":
        pytest.skip("SQLite's write transaction holds the database lock from its BEGIN")
    conversation = store.create(model="gpt-4o-mini")
    question = conversation.append("user", "What is 2+2?")
    repeat = (
        "INSERT INTO messages (conversation_id, seq, role, content, status, pinned, response_id,"
        " reply_to, created_at) VALUES (:id, :seq, 'assistant', '\"4\"', 'complete', false, 'r-same',"
        " :to, now())"
    )
    reply = _while_another_holds_the_row(
        store,
        [
            ("UPDATE conversations SET last_seq = last_seq + 1 WHERE id = :id", {"id": conversation.id}),
            (repeat, {"id": conversation.id, "seq": question.seq + 1, "to": question.seq}),
        ],
        lambda: conversation.append("assistant", "4", response_id="r-same", reply_to=question.seq),
        "the reply to wait for the conversation's row",
    )
    assert reply.seq == question.seq + 1
    assert [(m.role, m.content, m.response_id) for m in conversation.messages()] == [
        ("user", "What is 2+2?", None),
        ("assistant", "4", "r-same"),
    ]


def test_a_turn_does_not_send_a_system_message_deleted_while_its_lease_waited_for_the_row(
    store: ConversationStore, sender: Sender, stub: StubServer
) -> None:
    # Postgres: the turn's lease statement also reads the conversation's system and pinned
    # messages for the window, from the snapshot it took before waiting for the
    # conversation's row. Another transaction deletes the system message and commits while
    # the statement waits: the turn comes after it, so its request must not send it.
    if store.dialect != "postgresql":
        pytest.skip("SQLite's write transaction holds the database lock from its BEGIN")
    conversation = store.create(model="gpt-4o-mini")
    conversation.append("system", "Answer in words.")
    conversation.append("user", "What is 2+2?")
    conversation.append("assistant", "four")
    _while_another_holds_the_row(
        store,
        [  # as delete_message does: the conversation's row is updated too
            ("UPDATE conversations SET updated_at = now() WHERE id = :id", {"id": conversation.id}),
            ("DELETE FROM messages WHERE conversation_id = :id AND seq = 1", {"id": conversation.id}),
        ],
        lambda: sender.send(conversation.id, "And 3+3?"),
        "the turn to wait for the conversation's row",
    )
    sent = [(m["role"], m["content"]) for m in stub.requests[-1]["body"]["messages"]]
    assert sent == [("user", "What is 2+2?"), ("assistant", "four"), ("user", "And 3+3?")]


def test_a_turn_after_a_reply_whose_lease_waited_for_another_turns_reply_is_not_called_busy(
    store: ConversationStore,
) -> None:
    # Postgres, the gateway's turn of one message after a reply (after_reply): its lease
    # statement checks the newest message from the snapshot it began with. Another turn
    # stores its reply and frees the lease while the statement waits for the row: the
    # lease is free, so the answer is "check the long way" (NotAfterReply), never
    # ConversationBusy, and nothing is written.
    if store.dialect != "postgresql":
        pytest.skip("after_reply is a Postgres turn's")
    conversation = store.create(model="gpt-4o-mini")
    conversation.append("user", "What is 2+2?")
    conversation.append("assistant", "four")
    another_turn = [
        ("UPDATE conversations SET last_seq = 4, updated_at = now() WHERE id = :id", {"id": conversation.id}),
        (
            "INSERT INTO messages (conversation_id, seq, role, content, status, created_at) VALUES"
            " (:id, 3, 'user', '\"And 3+3?\"', 'complete', now()),"
            " (:id, 4, 'assistant', '\"six\"', 'complete', now())",
            {"id": conversation.id},
        ),
    ]
    with pytest.raises(NotAfterReply):
        _while_another_holds_the_row(
            store,
            another_turn,
            lambda: store._take_turn(
                conversation.id,
                owner=None,
                lease_seconds=60,
                messages=[{"role": "user", "content": "And 4+4?"}],
                quota=None,
                model="gpt-4o-mini",
                after_reply=True,
            ),
            "the turn to wait for the conversation's row",
        )
    assert [m.content for m in store.get(conversation.id).messages()] == [
        "What is 2+2?",
        "four",
        "And 3+3?",
        "six",
    ]
    # Nothing held either: the long way's lease is free to take.
    token, _, added, _ = store._take_turn(
        conversation.id,
        owner=None,
        lease_seconds=60,
        messages=[{"role": "user", "content": "And 4+4?"}],
        quota=None,
    )
    assert [m.seq for m in added] == [5]
    store._end_turn(conversation.id, token)


def test_a_turn_sends_the_system_message_and_pinned_messages_ahead_of_a_trimmed_history(
    store: ConversationStore, sender: Sender, stub: StubServer
) -> None:
    # The window's anchors (read by the turn's lease statement on Postgres, by the window's
    # first read on SQLite), kept ahead of a history trimmed to the context limit.
    conversation = store.create(model="gpt-4o-mini")
    conversation.append("system", "Be brief.")
    conversation.append("user", "Remember: my name is Sara.", pinned=True)
    conversation.append("assistant", "I will.")
    for i in range(40):
        conversation.append("user", f"question {i} " + "filler " * 60)
        conversation.append("assistant", f"answer {i} " + "filler " * 60)
    conversation.pin(conversation.append("user", "And I live in Shiraz.").seq)
    conversation.append("assistant", "Noted.")
    sender.send(conversation.id, "What is my name?", context_limit=1500)
    sent = [(m["role"], m["content"]) for m in stub.requests[-1]["body"]["messages"]]
    assert sent[:2] == [("system", "Be brief."), ("user", "Remember: my name is Sara.")]
    assert sent[-3:] == [
        ("user", "And I live in Shiraz."),
        ("assistant", "Noted."),
        ("user", "What is my name?"),
    ]
    assert 5 < len(sent) < 40


def test_a_turn_reads_the_window_anchors_with_its_lease_statement_and_sends_them_as_stored(
    store: ConversationStore, sender: Sender, stub: StubServer
) -> None:
    # The statement that takes a turn's lease also reads the conversation's system,
    # developer and pinned messages for the window (SQLite: a JSON array in its RETURNING;
    # Postgres: rows of its WITH): no statement of the turn reads them again, and each is
    # sent as stored (content parts, names).
    conversation = store.create(model="gpt-4o-mini")
    conversation.append("system", "Be brief.")
    conversation.append("developer", 'Quote "exactly", with \\ and \u00e9.')
    parts = [{"type": "text", "text": "Remember: my name is Sara."}]
    conversation.append("user", parts, name="sara", pinned=True)
    conversation.append("assistant", "I will.")
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", record)
    try:
        sender.send(conversation.id, "What is my name?")
    finally:
        sqlalchemy.event.remove(store.engine, "before_cursor_execute", record)
    reading = [sql for sql in statements if ANCHOR_PREDICATE in sql]
    assert len(reading) == 1 and "lease_token" in reading[0], reading
    assert stub.requests[-1]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": 'Quote "exactly", with \\ and \u00e9.'},
        {"role": "user", "content": parts, "name": "sara"},
        {"role": "assistant", "content": "I will."},
        {"role": "user", "content": "What is my name?"},
    ]


def test_a_turn_whose_new_message_is_an_anchor_plans_with_it(store: ConversationStore) -> None:
    # A turn's new system or pinned message is not among the anchors its lease statement
    # read (SQLite: the message is inserted after it; Postgres: the statement's snapshot
    # precedes it): the window then reads the anchors itself.
    conversation = store.create(model="gpt-4o-mini", system="Be brief.")
    conversation.append("user", "Hello")
    conversation.append("assistant", "Hi")
    for new in (
        {"role": "system", "content": "Answer in Persian."},
        {"role": "user", "content": "Sara", "pinned": True},
    ):
        token, planned, _, _ = store._take_turn(
            conversation.id, owner=None, lease_seconds=60, messages=[new], quota=None, window=True
        )
        sent = build_context(planned, context_limit=4000).messages
        assert sent[-1] == {"role": new["role"], "content": new["content"]}
        assert sent[0] == {"role": "system", "content": "Be brief."}
        store._end_turn(conversation.id, token)


def test_a_turn_sends_every_pinned_message_however_many(
    store: ConversationStore, sender: Sender, stub: StubServer
) -> None:
    # More anchors than a lease statement reads (SQLite reads a bounded number under its
    # write lock), far back in a history the window trims: the window reads them all.
    conversation = store.create(model="gpt-4o-mini", system="Be brief.")
    for i in range(70):
        conversation.append("user", f"fact {i}", pinned=True)
    for i in range(60):
        conversation.append("user", f"question {i} " + "word " * 40)
        conversation.append("assistant", f"answer {i} " + "word " * 40)
    sender.send(conversation.id, "Which facts?", context_limit=3000)
    sent = stub.requests[-1]["body"]["messages"]
    facts = [m["content"] for m in sent if m["content"].startswith("fact ")]
    assert facts == [f"fact {i}" for i in range(70)]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert not any(m["content"].startswith("question 0 ") for m in sent)  # the history was trimmed
    assert sent[-1] == {"role": "user", "content": "Which facts?"}


def test_a_conversation_deleted_between_its_lease_and_its_window_sends_nothing(
    store: ConversationStore, sender: Sender, stub: StubServer, db_url: str
) -> None:
    # The lease statement read the anchors; the conversation is deleted (by another process)
    # before the window reads the newest rows. Planned from the anchors alone, the request
    # would carry the pinned secret without the new question.
    conversation = store.create(model="gpt-4o-mini", system="Be brief.")
    conversation.append("user", "My secret is 42", pinned=True)
    conversation.append("assistant", "Noted.")
    take = store._take_turn

    def take_then_delete(*args: Any, **kwargs: Any) -> Any:
        taken = take(*args, **kwargs)
        with ConversationStore(db_url) as other:
            other.delete(conversation.id)
        return taken

    store._take_turn = take_then_delete  # type: ignore[method-assign]
    with pytest.raises(ConversationNotFound):
        sender.send(conversation.id, "What is my secret?")
    assert stub.requests == []


# ---------------------------------------------------------------------------------------------
# B. One request answers a conversation at a time


@pytest.mark.parametrize("method", ["retry", "stream_retry"])
def test_five_threads_retrying_one_message_store_one_reply(
    store: ConversationStore, sender: Sender, stub: StubServer, method: str
) -> None:
    conversation_id = _unanswered(store)
    stub.script(HELD)
    start = threading.Barrier(5, timeout=TIMEOUT_S)
    outcomes: list[Any] = []
    lock = threading.Lock()

    def attempt() -> None:
        start.wait()
        try:
            if method == "retry":
                result: Any = sender.retry(conversation_id)
            else:
                with sender.stream_retry(conversation_id) as stream:
                    for _ in stream:
                        pass
                result = stream.message
        except Exception as err:  # collected and checked below
            result = err
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt) for _ in range(5)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: len(outcomes) == 4, "four refusals")
    refused = list(outcomes)
    stub.release()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert all(isinstance(err, ConversationBusy) for err in refused), refused
    assert "another request is answering" in str(refused[0])
    replies = [o for o in outcomes if isinstance(o, Message)]
    assert [r.content for r in replies] == ["the one answer"]
    assert len(stub.requests) == 1
    assert _contents(store, conversation_id)[1:] == [
        ("user", "What is the capital of Iran?", "complete"),
        ("assistant", "the one answer", "complete"),
    ]
    assert replies[0].reply_to == 2
    # The turn is over: the conversation is free again.
    assert sender.send(conversation_id, "thanks").content == "echo: thanks"


def test_five_cli_retry_processes_store_one_reply(
    store: ConversationStore, stub: StubServer, cli_env: dict[str, str]
) -> None:
    conversation_id = _unanswered(store)
    stub.script(HELD)
    processes = [
        subprocess.Popen(
            _cli("retry", "--no-stream", conversation_id),
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(5)
    ]
    try:
        _wait_for(lambda: sum(p.poll() is not None for p in processes) == 4, "four processes refused")
        assert len(stub.requests) == 1
        stub.release()
        results = [
            (p.wait(TIMEOUT_S), *(s.decode() for s in p.communicate(timeout=TIMEOUT_S))) for p in processes
        ]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    answered = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(answered) == 1 and "the one answer" in answered[0][1]
    assert len(refused) == 4
    for code, stdout, stderr in refused:
        assert code == 1 and stdout == ""
        assert "is busy: another request is answering it" in stderr
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert len(stub.requests) == 1
    assert [m.role for m in store.get(conversation_id).messages()] == ["system", "user", "assistant"]


# The process the next test kills: it takes the turn of a retry (with a 3 s lease) and
# waits on the held request until SIGKILL.
_HOLDER = """
import sys
from gilas_conv import ConversationStore, Sender
url, conversation_id, base_url, key, lease = sys.argv[1:]
sender = Sender(ConversationStore(url), api_key=key, base_url=base_url, max_retries=0, timeout=60)
sender._lease_seconds = float(lease)
sender.retry(conversation_id)
"""
_KILLED_LEASE_S = 3.0


def test_a_lease_left_by_a_killed_process_expires(
    store: ConversationStore, sender: Sender, stub: StubServer, db_url: str
) -> None:
    conversation_id = _unanswered(store)
    stub.script(HELD)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _HOLDER,
            db_url,
            conversation_id,
            stub.base_url,
            API_KEY,
            str(_KILLED_LEASE_S),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: len(stub.requests) == 1 or holder.poll() is not None, "the holder's request")
        assert holder.poll() is None, holder.stderr.read() if holder.stderr else ""
        holder.send_signal(signal.SIGKILL)
        holder.wait(TIMEOUT_S)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stderr:
            holder.stderr.close()
    killed_at = time.monotonic()
    stub.release()
    # The dead process still holds the turn until its lease runs out ...
    with pytest.raises(ConversationBusy):
        sender.retry(conversation_id)
    assert len(stub.requests) == 1
    # ... then the conversation is answered once, by whoever asks.
    time.sleep(max(0.0, _KILLED_LEASE_S + 0.2 - (time.monotonic() - killed_at)))
    reply = sender.retry(conversation_id)
    assert reply.content == "echo: What is the capital of Iran?" and reply.reply_to == 2
    assert [m.role for m in store.get(conversation_id).messages()] == ["system", "user", "assistant"]


def test_a_second_send_while_one_is_answered_is_refused_and_stores_nothing(
    store: ConversationStore, sender: Sender, stub: StubServer
) -> None:
    conversation = store.create(model="gpt-4o-mini")
    stub.script(HELD)
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(sender.send(conversation.id, "first question")))
    thread.start()
    try:
        _wait_for(lambda: len(stub.requests) == 1, "the first request")
        before = _contents(store, conversation.id)
        with pytest.raises(ConversationBusy):
            sender.send(conversation.id, "second question")
        with pytest.raises(ConversationBusy):
            sender.stream(conversation.id, "second question")
        assert _contents(store, conversation.id) == before == [("user", "first question", "complete")]
    finally:
        stub.release()
        thread.join(TIMEOUT_S)
    assert first[0].content == "the one answer"
    assert len(stub.requests) == 1
    # Turns never interleave: the second question comes after the first one's answer.
    assert sender.send(conversation.id, "second question").seq == 4
    assert [c for _, c, _ in _contents(store, conversation.id)] == [
        "first question",
        "the one answer",
        "second question",
        "echo: second question",
    ]


def test_async_sends_on_one_conversation_never_interleave(store: ConversationStore, stub: StubServer) -> None:
    conversation = store.create(model="gpt-4o-mini")
    stub.script(HELD)

    async def run() -> tuple[Message, BaseException]:
        async with AsyncSender(store, api_key=API_KEY, base_url=stub.base_url) as sender:
            first = asyncio.ensure_future(sender.send(conversation.id, "first"))
            while not stub.requests:
                await asyncio.sleep(0.01)
            try:
                await sender.send(conversation.id, "second")
            except ConversationBusy as err:
                refused: BaseException = err
            stub.release()
            return await first, refused

    reply, refused = asyncio.run(run())
    assert isinstance(refused, ConversationBusy)
    assert reply.content == "the one answer"
    assert [c for _, c, _ in _contents(store, conversation.id)] == ["first", "the one answer"]


# ---------------------------------------------------------------------------------------------
# Every way a turn ends frees the conversation


def _free(store: ConversationStore, conversation_id: str) -> bool:
    try:
        token, _, _ = store._begin_turn(conversation_id)
    except ConversationBusy:
        return False
    store._end_turn(conversation_id, token)
    return True


FAILURES: dict[str, tuple[dict[str, Any], type[BaseException], list[str]]] = {
    # name: (stub action, error raised, roles stored after the user message)
    "status-400": ({"status": 400}, BadRequestError, []),
    "dropped": ({"drop": True}, APIConnectionError, []),
    "stream-cut-before-content": ({"cut_after": 0}, APIConnectionError, []),
    "stream-cut-mid-reply": (
        {"cut_after": 2, "reply": "one two three four"},
        StreamInterrupted,
        ["assistant"],
    ),
}


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_turn_releases_the_conversation(
    store: ConversationStore, stub: StubServer, failure: str, use_async: bool
) -> None:
    action, error, stored = FAILURES[failure]
    conversation = store.create(model="gpt-4o-mini")
    stub.script(action)
    streamed = "stream" in failure

    def sync_turn() -> None:
        with Sender(store, api_key=API_KEY, base_url=stub.base_url, max_retries=0) as sender:
            if streamed:
                with sender.stream(conversation.id, "question") as stream:
                    for _ in stream:
                        pass
            else:
                sender.send(conversation.id, "question")

    async def async_turn() -> None:
        async with AsyncSender(store, api_key=API_KEY, base_url=stub.base_url, max_retries=0) as sender:
            if streamed:
                async with await sender.stream(conversation.id, "question") as stream:
                    async for _ in stream:
                        pass
            else:
                await sender.send(conversation.id, "question")

    with pytest.raises(error):
        asyncio.run(async_turn()) if use_async else sync_turn()
    assert [m.role for m in store.get(conversation.id).messages()] == ["user", *stored]
    assert _free(store, conversation.id)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_stream_closed_early_stores_what_arrived_and_releases(
    store: ConversationStore, stub: StubServer, use_async: bool
) -> None:
    conversation = store.create(model="gpt-4o-mini")
    stub.script({"reply": " ".join(f"w{i}" for i in range(40)), "chunk_delay": 0.02})

    def sync_turn() -> Message | None:
        with Sender(store, api_key=API_KEY, base_url=stub.base_url) as sender:
            stream = sender.stream(conversation.id, "question")
            next(iter(stream))
            next(iter(stream))
            stream.close()
            return stream.message

    async def async_turn() -> Message | None:
        async with AsyncSender(store, api_key=API_KEY, base_url=stub.base_url) as sender:
            stream = await sender.stream(conversation.id, "question")
            await stream.__anext__()
            await stream.__anext__()
            await stream.aclose()
            return stream.message

    message = asyncio.run(async_turn()) if use_async else sync_turn()
    assert message is not None and message.status == "incomplete"
    assert [(m.role, m.status) for m in store.get(conversation.id).messages()] == [
        ("user", "complete"),
        ("assistant", "incomplete"),
    ]
    assert _free(store, conversation.id)


@pytest.mark.parametrize("streamed", [False, True], ids=["send", "stream"])
def test_an_async_turn_cancelled_while_it_is_prepared_releases_the_conversation(
    store: ConversationStore, stub: StubServer, streamed: bool
) -> None:
    # The turn's message is stored with the lease in a worker thread. Another transaction
    # holds the conversation's row (a write lock on SQLite), so that thread waits inside the
    # store while the caller is cancelled; then the lock goes, the thread takes the lease
    # and returns a turn no one will send, which must free the conversation.
    conversation = store.create(model="gpt-4o-mini")

    async def run() -> bool:
        async with AsyncSender(store, api_key=API_KEY, base_url=stub.base_url, max_retries=0) as sender:
            call = sender.stream if streamed else sender.send
            with store.engine.begin() as blocker:
                blocker.execute(
                    sqlalchemy.text("UPDATE conversations SET title = title WHERE id = :id"),
                    {"id": conversation.id},
                )
                task = asyncio.ensure_future(call(conversation.id, "gone"))
                await asyncio.sleep(0.5)  # the worker thread is waiting for the row
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if _free(store, conversation.id):
                    return True
            return False

    assert asyncio.run(run()), "the conversation stayed busy after its turn was cancelled"
    assert _contents(store, conversation.id) == [("user", "gone", "complete")]
    assert stub.requests == []  # the cancelled turn was never sent


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_stream_longer_than_its_lease_keeps_the_conversation(
    store: ConversationStore, stub: StubServer, use_async: bool
) -> None:
    # A 1 s lease and a reply streaming for about 4 s: the stream renews the lease as chunks
    # arrive, so the conversation stays busy until the reply is stored.
    conversation = store.create(model="gpt-4o-mini")
    words = " ".join(f"w{i}" for i in range(16))
    stub.script({"reply": words, "chunk_delay": 0.25})
    lease, checks, first_chunk = 1.0, [], []

    def check() -> None:
        # Timed from the first chunk: the lease was taken before it (preparing may be slow).
        first_chunk.append(first_chunk[0] if first_chunk else time.monotonic())
        if time.monotonic() - first_chunk[0] > 2 * lease and len(checks) < 3:
            checks.append(_free(store, conversation.id))

    def sync_turn() -> Message | None:
        with Sender(store, api_key=API_KEY, base_url=stub.base_url) as sender:
            sender._lease_seconds = lease
            with sender.stream(conversation.id, "question") as stream:
                for _ in stream:
                    check()
            return stream.message

    async def async_turn() -> Message | None:
        async with AsyncSender(store, api_key=API_KEY, base_url=stub.base_url) as sender:
            sender._lease_seconds = lease
            async with await sender.stream(conversation.id, "question") as stream:
                async for _ in stream:
                    check()
            return stream.message

    message = asyncio.run(async_turn()) if use_async else sync_turn()
    assert checks == [False, False, False]  # no one else could take the turn meanwhile
    assert message is not None and message.content == words and message.status == "complete"
    assert _free(store, conversation.id)


def test_retry_with_nothing_to_answer_releases_the_conversation(
    store: ConversationStore, sender: Sender
) -> None:
    conversation = store.create(model="gpt-4o-mini")
    conversation.append("user", "q")
    conversation.append("assistant", "a")
    with pytest.raises(ValueError, match="already a complete assistant reply"):
        sender.retry(conversation.id)
    assert _free(store, conversation.id)


# ---------------------------------------------------------------------------------------------
# The lease API in the store (used by the senders and the gateway)


def test_begin_turn_appends_with_the_lease_and_refuses_while_held(store: ConversationStore) -> None:
    conversation = store.create(model="gpt-4o-mini", owner="alice")
    token, fresh, added = store._begin_turn(
        conversation.id, owner="alice", messages=[{"role": "user", "content": "hi"}]
    )
    assert [(m.seq, m.role, m.content) for m in added] == [(1, "user", "hi")]
    assert fresh.message_count == 1 and added[0].tokens
    with pytest.raises(ConversationBusy) as busy:
        store._begin_turn(conversation.id, owner="alice", messages=[{"role": "user", "content": "again"}])
    assert busy.value.expires_at is not None
    assert len(str(busy.value).splitlines()) == 1
    assert [m.content for m in store.get(conversation.id, owner="alice").messages()] == ["hi"]
    # Another owner's conversation does not exist, busy or not.
    with pytest.raises(StoreError, match="not found"):
        store._begin_turn(conversation.id, owner="bob")
    # The reply stores and releases in one step.
    reply = store.get(conversation.id, owner="alice").append("assistant", "hello", reply_to=1, lease=token)
    assert reply.seq == 2
    assert _free_owned(store, conversation.id, "alice")


def _free_owned(store: ConversationStore, conversation_id: str, owner: str) -> bool:
    try:
        token, _, _ = store._begin_turn(conversation_id, owner=owner)
    except ConversationBusy:
        return False
    return store._end_turn(conversation_id, token)


def test_bad_turn_messages_write_nothing_and_take_no_lease(store: ConversationStore) -> None:
    conversation = store.create(model="gpt-4o-mini")
    for bad in ({"role": "robot", "content": "x"}, {"role": "user", "content": "x", "seq": 9}):
        with pytest.raises(ValueError):
            store._begin_turn(conversation.id, messages=[{"role": "user", "content": "ok"}, bad])
    assert store.get(conversation.id).messages() == []
    assert _free(store, conversation.id)


def test_a_lease_is_released_only_by_its_holder(store: ConversationStore) -> None:
    conversation = store.create(model="gpt-4o-mini")
    token, _, _ = store._begin_turn(conversation.id)
    assert not store._end_turn(conversation.id, "not-the-token")
    assert not _free(store, conversation.id)
    assert store._end_turn(conversation.id, token)
    assert not store._end_turn(conversation.id, token)  # a second release does nothing


def test_an_expired_lease_is_taken_over_and_the_late_reply_refused(store: ConversationStore) -> None:
    conversation = store.create(model="gpt-4o-mini")
    conversation.append("user", "q")
    stale, _, _ = store._begin_turn(conversation.id, lease_seconds=0.2)
    assert store._renew_turn(conversation.id, stale, lease_seconds=0.2)
    time.sleep(0.3)
    fresh, _, _ = store._begin_turn(conversation.id)  # the first holder is presumed dead
    assert not store._renew_turn(conversation.id, stale)
    # The first holder's late reply would answer the same message twice: refused, not stored.
    with pytest.raises(ConversationBusy):
        conversation.append("assistant", "late", reply_to=1, lease=stale)
    assert not store._end_turn(conversation.id, stale)
    conversation.append("assistant", "on time", reply_to=1, lease=fresh)
    assert [m.content for m in store.get(conversation.id).messages()] == ["q", "on time"]
    assert _free(store, conversation.id)


def test_a_reply_after_its_own_lease_expired_is_stored_when_nobody_took_over(
    store: ConversationStore,
) -> None:
    conversation = store.create(model="gpt-4o-mini")
    conversation.append("user", "q")
    token, _, _ = store._begin_turn(conversation.id, lease_seconds=0.1)
    time.sleep(0.2)
    assert conversation.append("assistant", "slow", reply_to=1, lease=token).seq == 2
    assert _free(store, conversation.id)


def test_every_postgres_lease_statement_stays_in_psycopgs_query_cache() -> None:
    # psycopg parses a query longer than 4,096 characters again on every execution (its
    # cache takes shorter ones only); the lease statement runs once a turn.
    dialect = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    longest = max(len(str(s.compile(dialect=dialect))) for s in _store._TAKE_LEASE_WITH_MESSAGE.values())
    assert longest < 4096
