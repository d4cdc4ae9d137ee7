"""The store when the network fails mid-write (Postgres): a write whose connection is lost
after the server committed it, but before its answer arrived, is "in doubt". A real
Postgres sits behind a small TCP proxy on loopback that cuts one connection at the moment
the test picks: it forwards a chunk of the client's stream holding a marker (a message's
unique text, sent as a bound parameter), then drops the client's side and discards the
server's answer, leaving the server to run and commit the statement."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from _gateway import UPSTREAM_KEY, running_gateway, sdk_client, stored
from sqlalchemy.engine import make_url
from stub_server import StubServer

from gilas_conv import ConversationStore, Sender, StoreError
from gilas_conv.store import APIKeys

API_KEY = UPSTREAM_KEY


class CuttingProxy:
    """A TCP proxy in front of a Postgres server, on a free loopback port. Once the client's
    stream holds ``marker`` (and then, with ``then``, a chunk holding ``then``, e.g. the
    COMMIT that follows), that chunk is forwarded, the server's answer awaited (so the
    server has run the statement) and dropped, and the client's socket closed: a write
    committed whose answer was lost. With ``hold``, the chunk is not forwarded but kept
    (``forward_held`` sends it later): a write still on its way to the server when the
    client gave up. The server's side stays open until the server or the proxy closes it.
    One cut per proxy; every other connection is forwarded untouched."""

    def __init__(self, host: str, port: int, marker: bytes, then: bytes | None, hold: bool) -> None:
        self._target = (host, port)
        self._marker = marker
        self._then = then
        self._hold = hold
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cut = threading.Event()
        self.answered = threading.Event()  # the cut connection's server answered after the cut
        self.server_closed = threading.Event()  # ... or closed the connection
        self._held: tuple[socket.socket, bytes] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def forward_held(self) -> None:
        assert self._held is not None
        server, chunk = self._held
        with contextlib.suppress(OSError):
            server.sendall(chunk)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:  # the server refused: so does the proxy
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            dropped = threading.Event()
            threading.Thread(target=self._upstream, args=(client, server, dropped), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, dropped), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, dropped: threading.Event) -> None:
        seen = b""
        armed = False
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                window = seen + chunk
                seen = window[-len(self._marker) :]
                if not self.cut.is_set():
                    armed = armed or self._marker in window
                    if armed and (self._then is None or self._then in chunk):
                        self.cut.set()
                        dropped.set()  # the server's answers are dropped from now on
                        if self._hold:
                            self._held = (server, chunk)
                        else:
                            server.sendall(chunk)
                            self.answered.wait(10)
                        client.shutdown(socket.SHUT_RDWR)
                        client.close()
                        return
                server.sendall(chunk)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _downstream(self, server: socket.socket, client: socket.socket, dropped: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while chunk := server.recv(65536):
                if not dropped.is_set():
                    client.sendall(chunk)
                else:
                    self.answered.set()
        if dropped.is_set():
            self.server_closed.set()
        else:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()


@contextlib.contextmanager
def cut_store(
    db_url: str, marker: str, then: bytes | None = None, *, hold: bool = False
) -> Iterator[tuple[ConversationStore, CuttingProxy]]:
    """A store on ``db_url`` reached through a :class:`CuttingProxy` cutting at ``marker``."""
    url = make_url(db_url)
    proxy = CuttingProxy(url.host or "127.0.0.1", url.port or 5432, marker.encode(), then, hold)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        with ConversationStore(proxied) as store:
            yield store, proxy
    finally:
        proxy.close()


def wait_until_stored(store: ConversationStore, conversation_id: str, content: str, owner: str) -> None:
    """Until the server has committed the cut write (bounded)."""
    deadline = time.monotonic() + 10
    while not any(m.content == content for m in store.get(conversation_id, owner=owner).messages()):
        assert time.monotonic() < deadline, "the cut write was never committed"
        time.sleep(0.02)


def check_one_line(err: BaseException) -> None:
    text = str(err)
    assert "\n" not in text and API_KEY not in text
    assert "may have been stored" in text and "retrying the turn answers" in text


def assert_free(store: ConversationStore, conversation_id: str) -> None:
    """Not busy: a new turn of the conversation is taken at once."""
    token, _, _ = store._begin_turn(conversation_id, owner="alice")
    assert store._end_turn(conversation_id, token)


def assert_answered_once(store: ConversationStore, conversation_id: str, marker: str) -> None:
    assert stored(store, conversation_id) == [
        ("user", marker, "complete"),
        ("assistant", f"echo: {marker}", "complete"),
    ]


@pytest.fixture
def postgres_url(db_url: str, backend: str) -> str:
    if backend != "postgres":
        pytest.skip("a network cut needs a database server")
    return db_url


@pytest.mark.parametrize("quota", [False, True], ids=["one-statement", "reserving-transaction"])
def test_a_turn_whose_lease_write_is_cut_after_it_committed_leaves_the_conversation_free(
    postgres_url: str, stub: StubServer, quota: bool
) -> None:
    """The lease write commits on the server, but its answer is lost: the sender says so
    (StoreError), the lease is released (before: the conversation answered
    ConversationBusy for the lease's whole life, though nobody held its turn), and a retry
    answers the stored message once."""
    marker = f"in doubt {uuid.uuid4().hex}"
    with ConversationStore(postgres_url) as direct:
        conv = direct.create(model="gpt-4o-mini", owner="alice")
        if quota:  # a limit applies: the lease is taken in a transaction that reserves
            direct.set_quota("alice", daily_tokens=10**9)
        # With a quota the cut is at the reserving transaction's COMMIT.
        then = b"COMMIT\x00" if quota else None
        with (
            cut_store(postgres_url, marker, then) as (proxied, proxy),
            Sender(proxied, api_key=API_KEY, base_url=stub.base_url, max_retries=0) as sender,
        ):
            with pytest.raises(StoreError) as caught:
                sender.send(conv.id, marker, owner="alice")
            assert proxy.cut.is_set()
            wait_until_stored(direct, conv.id, marker, "alice")
            assert_free(direct, conv.id)
            check_one_line(caught.value)
            reply = sender.retry(conv.id, owner="alice")
        assert reply.content == f"echo: {marker}"
        assert_answered_once(direct, conv.id, marker)


@pytest.fixture
def url_with_a_role_set(postgres_url: str) -> Iterator[str]:
    """The test database's URL for a login whose connections set another role at once
    (``options=-c role=...``), as deployments do: ``current_user`` is then not the login."""
    import psycopg

    suffix = uuid.uuid4().hex[:12]
    app, login = f"gc_app_{suffix}", f"gc_login_{suffix}"
    admin_url = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{app}" SUPERUSER NOLOGIN')
        admin.execute(f'CREATE ROLE "{login}" LOGIN IN ROLE "{app}"')
    try:
        url = make_url(postgres_url).set(username=login, query={"options": f"-c role={app}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            gone = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s"
            admin.execute(gone, (login,))
            admin.execute(f'DROP ROLE "{login}"')
            admin.execute(f'DROP ROLE "{app}"')


@pytest.mark.parametrize("login", ["the database's user", "a role set at login"])
def test_a_lease_write_that_reaches_the_server_after_the_turn_gave_up_takes_nothing(
    postgres_url: str, stub: StubServer, login: str, request: pytest.FixtureRequest
) -> None:
    """The lease write is still on its way when its connection is lost: the release that
    follows must not run before it, or the write would take the lease after the release
    and the conversation stay busy. The lost connection's server process is ended first,
    so the late write is never run: nothing stored, the conversation free. Also when the
    store's connections set a role at login (the session is found by its login)."""
    url = postgres_url if login == "the database's user" else request.getfixturevalue("url_with_a_role_set")
    marker = f"in doubt {uuid.uuid4().hex}"
    with ConversationStore(postgres_url) as direct:
        conv = direct.create(model="gpt-4o-mini", owner="alice")
        with (
            cut_store(url, marker, hold=True) as (proxied, proxy),
            Sender(proxied, api_key=API_KEY, base_url=stub.base_url, max_retries=0) as sender,
        ):
            with pytest.raises(StoreError) as caught:
                sender.send(conv.id, marker, owner="alice")
            assert proxy.cut.is_set()
            check_one_line(caught.value)
            proxy.forward_held()  # the write arrives late
            # The server ran it (answered) or had closed that connection: either way, decided.
            deadline = time.monotonic() + 10
            while not (proxy.answered.is_set() or proxy.server_closed.is_set()):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert_free(direct, conv.id)
            assert stored(direct, conv.id) == []
            reply = sender.send(conv.id, marker, owner="alice")
        assert reply.content == f"echo: {marker}"
        assert_answered_once(direct, conv.id, marker)


def test_a_reply_write_cut_after_it_committed_leaves_the_conversation_free(
    postgres_url: str, stub: StubServer
) -> None:
    """The reply's write (which also releases the lease) commits, its answer is lost: a
    StoreError, the reply stored once, the conversation free, nothing left to retry."""
    marker = f"in doubt {uuid.uuid4().hex}"
    with ConversationStore(postgres_url) as direct:
        conv = direct.create(model="gpt-4o-mini", owner="alice")
        stub.script({"reply": marker})
        with (
            cut_store(postgres_url, marker) as (proxied, proxy),
            Sender(proxied, api_key=API_KEY, base_url=stub.base_url, max_retries=0) as sender,
        ):
            with pytest.raises(StoreError) as caught:
                sender.send(conv.id, "question", owner="alice")
            assert proxy.cut.is_set()
            assert "\n" not in str(caught.value) and API_KEY not in str(caught.value)
            wait_until_stored(direct, conv.id, marker, "alice")
            assert_free(direct, conv.id)
            with pytest.raises(ValueError):
                sender.retry(conv.id, owner="alice")
        assert stored(direct, conv.id) == [
            ("user", "question", "complete"),
            ("assistant", marker, "complete"),
        ]


def test_a_gateway_turn_cut_after_its_lease_committed_is_answered_when_the_client_sends_it_again(
    postgres_url: str, stub: StubServer
) -> None:
    marker = f"in doubt {uuid.uuid4().hex}"
    with ConversationStore(postgres_url) as direct:
        key = APIKeys(direct).create(owner="alice")[0]
        conv = direct.create(model="gpt-4o-mini", owner="alice")
        with (
            cut_store(postgres_url, marker) as (proxied, proxy),
            running_gateway(proxied, stub.base_url) as gateway,
            sdk_client(gateway, key) as client,
        ):
            request: dict[str, Any] = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": marker}],
                "extra_body": {"conversation": conv.id},
            }
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(**request)
            assert caught.value.status_code == 503
            assert proxy.cut.is_set()
            wait_until_stored(direct, conv.id, marker, "alice")
            # The client sends the same message again: not busy, stored once, answered.
            answer = client.chat.completions.create(**request)
        assert answer.choices[0].message.content == f"echo: {marker}"
        assert_answered_once(direct, conv.id, marker)
