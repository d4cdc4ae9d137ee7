"""Shared fixtures: every test that touches a database runs on a real SQLite file and on a
real Postgres database (GILAS_CONV_TEST_POSTGRES_URL), never on a mock.

Postgres databases are created per test from a template migrated once per session, so each
test starts from an empty, current schema in a few tens of milliseconds.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from gilas_conv import ConversationStore, upgrade_database

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
        self._admin = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=None)
        self._template: str | None = None
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
    return server.create(migrated=migrated)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, postgres_server: PostgresServer | None) -> str:
    """A URL of a database at the current schema: a new SQLite file, or a new Postgres database."""
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
