"""Shared fixtures: every test that touches a database runs on a real SQLite file and on a
real Postgres database (GILAS_CONV_TEST_POSTGRES_URL), never on a mock.

On Postgres most tests share one migrated database, emptied (TRUNCATE) before each test:
creating and dropping a database per test costs seconds on a loaded machine, since each
DROP DATABASE forces a checkpoint. Tests that need a database of their own (migrations,
an empty schema) get a fresh one from a template migrated once per session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from stub_server import StubServer

from gilas_conv import ConversationStore, head_revision, upgrade_database
from gilas_conv.store import APIKeys

POSTGRES_ENV = "GILAS_CONV_TEST_POSTGRES_URL"
POSTGRES_SKIP_REASON = (
    f"Postgres tests need {POSTGRES_ENV}=postgresql://user@host:port/dbname "
    "(a server where the user may create databases)"
)
BACKENDS = ["sqlite", "postgres"]

_ENV_TO_CLEAR = (
    "GILAS_API_KEY",
    "GILAS_BASE_URL",
    "GILAS_CONV_DATABASE_URL",
    "GILAS_CONV_MODELS",
)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's settings or writes to the real home directory."""
    for name in _ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))


class PostgresServer:
    """Creates and drops throwaway databases on the test server."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url).set(drivername="postgresql+psycopg")
        self._admin = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self._template: str | None = None
        self._shared: str | None = None
        self._created: list[str] = []

    def _url_for(self, name: str) -> str:
        return self.url.set(database=name).render_as_string(hide_password=False)

    def create(self, *, migrated: bool) -> str:
        name = f"gc_test_{uuid.uuid4().hex[:16]}"
        with self._admin.connect() as conn:
            if migrated:
                conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template()}"'))
            else:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        self._created.append(name)
        return self._url_for(name)

    def template(self) -> str:
        if self._template is None:
            name = f"gc_template_{uuid.uuid4().hex[:12]}"
            with self._admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            self._created.append(name)
            upgrade_database(self._url_for(name))
            self._template = name
        return self._template

    def shared(self) -> str:
        """The database reused between tests, at the current schema and empty."""
        if self._shared is not None:
            try:
                self._empty(self._shared)
                return self._shared
            except Exception:
                # A test left it locked or changed its schema; start a fresh one.
                self._shared = None
        self._shared = self.create(migrated=True)
        return self._shared

    def _empty(self, url: str) -> None:
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))
                version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                if version != head_revision():
                    raise RuntimeError(f"shared test database is at {version}")
                conn.execute(
                    text(
                        "TRUNCATE messages, summaries, conversations, api_keys, usage_events, usage_rollup,"
                        " quota_limits, quota_reservations, settings CASCADE"
                    )
                )
        finally:
            engine.dispose()

    def drop_all(self) -> None:
        with self._admin.connect() as conn:
            for name in reversed(self._created):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._admin.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        yield None
        return
    server = PostgresServer(url)
    yield server
    server.drop_all()


def _database_url(backend: str, tmp_path: Path, server: PostgresServer | None, *, migrated: bool) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'gilas-{uuid.uuid4().hex[:8]}.db'}"
    if server is None:
        pytest.skip(POSTGRES_SKIP_REASON)
    return server.shared() if migrated else server.create(migrated=False)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, postgres_server: PostgresServer | None) -> str:
    """A URL of an empty database at the current schema (a new SQLite file; on Postgres the
    shared test database, emptied)."""
    url = _database_url(backend, tmp_path, postgres_server, migrated=True)
    if backend == "sqlite":
        upgrade_database(url)
    return url


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path, postgres_server: PostgresServer | None) -> str:
    """A URL of an empty database with no gilas-conv schema."""
    return _database_url(backend, tmp_path, postgres_server, migrated=False)


@pytest.fixture
def store(db_url: str) -> Iterator[ConversationStore]:
    with ConversationStore(db_url) as opened:
        yield opened


@pytest.fixture(scope="module")
def _stub_server(request: pytest.FixtureRequest) -> Iterator[StubServer]:
    """One stub server per test module (stopping one takes half a second), accepting that
    module's ``API_KEY``."""
    with StubServer(api_key=request.module.API_KEY) as server:
        yield server


@pytest.fixture
def stub(_stub_server: StubServer) -> StubServer:
    """The local OpenAI-compatible stub server, with no script and no recorded requests."""
    _stub_server.reset()
    return _stub_server


@pytest.fixture
def gateway(store: ConversationStore, stub: StubServer) -> Iterator[Any]:
    """The gateway (tests/_gateway.py) serving ``store`` in front of the stub upstream; a
    key's owner is remembered half a second (a revoked key stops working that fast)."""
    from _gateway import running_gateway

    with running_gateway(store, stub.base_url, key_cache_seconds=0.5) as server:
        yield server


@pytest.fixture
def alice_key(store: ConversationStore) -> str:
    """A gateway client key of the owner "alice"."""
    return APIKeys(store).create(owner="alice")[0]
