"""Engines configured the way the store needs them, on SQLite and on Postgres.

SQLite
    Every connection runs in WAL mode (readers never block the writer) with foreign keys
    on, a busy timeout, and ``synchronous`` NORMAL unless the caller asks for FULL. The
    driver's own transaction handling is switched off and gilas-conv emits ``BEGIN``
    itself: ``BEGIN IMMEDIATE`` for write transactions, so a writer takes the write lock
    up front and waits for it under the busy timeout, instead of failing with "database
    is locked" when it upgrades a read lock mid-transaction. That is what lets several
    processes append to one conversation at once with no error surfacing.

Postgres
    A bare ``postgresql://`` URL is given the psycopg 3 driver, the one gilas-conv
    installs with its ``postgres`` extra.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .._config import DEFAULT_SQLITE_BUSY_TIMEOUT_MS, DEFAULT_SQLITE_SYNCHRONOUS
from ..exceptions import ConfigurationError

__all__ = ["WRITE", "create_engine_for_url", "normalize_url", "redact_url"]

# Execution option asking for a write transaction (BEGIN IMMEDIATE on SQLite).
WRITE = {"gilas_write": True}

_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

# Compact JSON keeping non-ASCII text as it is (Persian stays 2 bytes a letter, not 6).
_json_dumps = partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


def normalize_url(url: str) -> str:
    """Give bare Postgres URLs the psycopg 3 driver; refuse what is not a URL."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ConfigurationError(
            f"not a database URL: {redact_url(url)!r}; expected e.g. sqlite:///path.db "
            "or postgresql+psycopg://user@host/dbname"
        ) from err
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """The URL with any password masked, for messages and reprs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def create_engine_for_url(
    url: str,
    *,
    sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS,
    sqlite_busy_timeout_ms: int = DEFAULT_SQLITE_BUSY_TIMEOUT_MS,
    **engine_kwargs: Any,
) -> Engine:
    url = normalize_url(url)
    backend = make_url(url).get_backend_name()
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps, **engine_kwargs}
    if backend == "sqlite":
        mode = sqlite_synchronous.upper()
        if mode not in _SYNCHRONOUS_MODES:
            raise ConfigurationError(
                f"sqlite_synchronous must be one of {', '.join(_SYNCHRONOUS_MODES)}, "
                f"not {sqlite_synchronous!r}"
            )
        if sqlite_busy_timeout_ms < 0:
            raise ConfigurationError("sqlite_busy_timeout_ms must be >= 0")
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine, synchronous=mode, busy_timeout_ms=sqlite_busy_timeout_ms)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        try:
            return create_engine(url, **kwargs)
        except ModuleNotFoundError as err:
            raise ConfigurationError(
                "the Postgres driver is not installed; run: pip install 'gilas-conv[postgres]'"
            ) from err
    # Other SQLAlchemy backends may work but are not tested; let the user try.
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine, *, synchronous: str, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to the "begin" hook below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not _is_memory(engine):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("gilas_write", False)
        # Straight to the driver: this runs for every transaction, and SQLAlchemy's
        # statement machinery would cost more than the BEGIN itself.
        conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")  # type: ignore[union-attr]


def _is_memory(engine: Engine) -> bool:
    database = engine.url.database
    return not database or database == ":memory:" or database.startswith("file::memory:")
