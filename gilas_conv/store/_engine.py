"""Engines configured the way the store needs them, on SQLite and on Postgres.

SQLite
    Every connection runs in WAL mode (readers never block the writer) with foreign keys
    on, ``secure_delete`` on (freed space is zeroed), a busy timeout, and ``synchronous``
    NORMAL unless the caller asks for FULL. The
    driver's own transaction handling is switched off and gilas-conv emits ``BEGIN``
    itself: ``BEGIN IMMEDIATE`` for write transactions, so a writer takes the write lock
    up front and waits for it under the busy timeout, instead of failing with "database
    is locked" when it upgrades a read lock mid-transaction. That is what lets several
    processes append to one conversation at once with no error surfacing.

Postgres
    A bare ``postgresql://`` URL is given the psycopg 3 driver, the one gilas-conv
    installs with its ``postgres`` extra. Pooled connections are not pinged when checked
    out (``pool_pre_ping`` would cost a round trip per transaction). Instead a checkout
    looks, without a round trip, whether the server has already closed the connection
    (an idle connection then has something to read: the server's goodbye or the end of
    the stream), and the pool replaces such a connection before anything is sent on it;
    a connection found dead by a transaction's first statement all the same is replaced
    and that statement sent again (see :mod:`._tx`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sqlite3
import time
import urllib.parse
from typing import Any

from sqlalchemy import Connection, Engine, RootTransaction, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError

from .._config import DEFAULT_SQLITE_BUSY_TIMEOUT_MS, DEFAULT_SQLITE_SYNCHRONOUS, redact_url
from ..exceptions import ConfigurationError

__all__ = [
    "SINGLE_READ",
    "SINGLE_WRITE",
    "WRITE",
    "begin",
    "create_engine_for_url",
    "normalize_url",
    "redact_url",
]

# Execution option asking for a write transaction (BEGIN IMMEDIATE on SQLite: see begin()).
WRITE: dict[str, Any] = {"gilas_write": True}
# Execution options of a read that is one statement, which is atomic on its own and needs no
# BEGIN and COMMIT around it (two round trips on Postgres): autocommit.
SINGLE_READ: dict[str, dict[str, Any]] = {
    "sqlite": {"gilas_single": True},
    "postgresql": {"isolation_level": "AUTOCOMMIT"},
}
# A write that is one statement (on Postgres a data-modifying CTE is atomic by itself):
# autocommit on Postgres; on SQLite, where such a write still takes several statements, the
# usual write transaction.
SINGLE_WRITE: dict[str, dict[str, Any]] = {"sqlite": WRITE, "postgresql": SINGLE_READ["postgresql"]}

# The key in a SQLite driver connection's ``info`` for the BEGIN its next transaction issues.
_NEXT_BEGIN = "gilas_conv_next_begin"

_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

# Compact JSON keeping non-ASCII text as it is (Persian stays 2 bytes a letter, not 6). One
# encoder made once (json.dumps with options makes a new one per call; it keeps no state
# between calls, so threads may share it).
_json_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_EXAMPLES = "sqlite:///path.db or postgresql://user@host/dbname"


def normalize_url(url: str) -> str:
    """Give bare Postgres URLs the psycopg 3 driver; refuse what is not a URL of a supported
    backend (SQLite or Postgres) with ConfigurationError."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ConfigurationError(
            f"not a database URL: {redact_url(url)!r}; expected e.g. {_EXAMPLES}"
        ) from err
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ConfigurationError(
            f"unsupported database {parsed.get_backend_name()!r} in {redact_url(url)!r}; "
            f"gilas-conv supports sqlite and postgresql (e.g. {_EXAMPLES})"
        )
    return parsed.render_as_string(hide_password=False)


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
        url, read_only = _prepare_sqlite_file(url)
        engine = _create(url, kwargs)
        _configure_sqlite(
            engine, synchronous=mode, busy_timeout_ms=sqlite_busy_timeout_ms, read_only=read_only
        )
        return engine
    try:
        engine = _create(url, kwargs)
    except (ModuleNotFoundError, NoSuchModuleError) as err:
        driver = make_url(url).get_driver_name()
        hint = (
            "run: pip install 'gilas-conv[postgres]'"
            if driver == "psycopg"
            else "use postgresql:// (psycopg 3, installed by pip install 'gilas-conv[postgres]')"
        )
        raise ConfigurationError(f"the Postgres driver {driver!r} is not installed; {hint}") from err
    if engine.dialect.driver in ("psycopg", "psycopg2"):  # connections with a fileno()
        event.listen(engine, "checkout", _closed_by_server)
    return engine


def _closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Postgres: refuse (the pool then connects anew) a pooled connection that has something
    to read while idle. The server has closed it (a terminated backend, a restart: its last
    message, or the end of the stream, is waiting), so nothing must be sent on it. A poll
    of the socket, not a round trip. A connection the server closes later still fails on
    its first statement (see ``_tx._RetryFirstStatement``)."""
    try:
        fd = dbapi_connection.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            ready = bool(poller.poll(0))
        else:  # Windows
            ready = bool(select.select([fd], [], [], 0)[0])
    except Exception as err:  # closed on this side already (the driver's error, or the OS's)
        raise DisconnectionError(f"pooled connection unusable: {err}") from err
    if ready:
        raise DisconnectionError("the server closed this pooled connection")


def _create(url: str, kwargs: dict[str, Any]) -> Engine:
    try:
        return create_engine(url, **kwargs)
    except TypeError as err:  # an engine option this pool or dialect does not take
        raise ConfigurationError(f"invalid engine option for {redact_url(url)}: {err}") from err


# Permissions of a SQLite file gilas-conv creates (its -wal and -shm files inherit them):
# the history is private to its user.
NEW_DATABASE_FILE_MODE = 0o600


def _sqlite_path(url: str) -> str | None:
    """The file of a plain ``sqlite:///path`` URL (not in-memory, not a ``file:`` URI)."""
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query:
        return None
    return database


def _prepare_sqlite_file(url: str) -> tuple[str, bool]:
    """Create a new database file private to its user; open an existing file that this
    process may not write read-only, so reading still works. Returns ``(url, read_only)``.

    A file that exists keeps the permissions its owner gave it. Read-only access to a WAL
    database needs its -shm file: when the directory is not writable either and there is
    no -wal file to miss, the file is opened ``immutable`` (nobody can be writing it).
    """
    path = _sqlite_path(url)
    if path is None:
        return url, False
    if not os.path.exists(path):
        # On failure SQLite reports the problem in its own words when it opens the file.
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, NEW_DATABASE_FILE_MODE))
        return url, False
    directory = os.path.dirname(os.path.abspath(path))
    if os.access(path, os.W_OK) and os.access(directory, os.W_OK):
        return url, False
    query = {"mode": "ro", "uri": "true"}
    if not os.access(directory, os.W_OK) and not os.path.exists(path + "-wal"):
        query["immutable"] = "1"
    uri = "file:" + urllib.parse.quote(os.path.abspath(path))
    return make_url(url).set(database=uri, query=query).render_as_string(hide_password=False), True


def _configure_sqlite(engine: Engine, *, synchronous: str, busy_timeout_ms: int, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to the "begin" hook below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if not _is_memory(engine) and not read_only:
                _journal_mode_wal(cursor, busy_timeout_ms)
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
            # Deleted rows are overwritten with zeros, not just marked free: a deleted
            # conversation's text must not stay readable in the file (benchmarks/quota.py
            # measures what this costs an append). Some builds default to it; not all do.
            cursor.execute("PRAGMA secure_delete = ON")
        finally:
            cursor.close()

    def _do_begin(dbapi_connection: Any) -> None:
        # Straight to the driver: this runs for every transaction, and SQLAlchemy's
        # statement machinery would cost more than the BEGIN itself.
        statement = dbapi_connection.info.pop(_NEXT_BEGIN, "BEGIN")
        if statement is not None:
            dbapi_connection.driver_connection.execute(statement)

    # The dialect's own hook for "begin a transaction" (a no-op for pysqlite, which would
    # begin one implicitly before a write only), set on this engine's dialect alone. Not an
    # engine "begin" event: with any engine event listener SQLAlchemy runs its event
    # dispatch for every statement (about a tenth of a statement's cost here).
    engine.dialect.do_begin = _do_begin  # type: ignore[method-assign]


def begin(conn: Connection) -> RootTransaction:
    """``conn.begin()`` as ``conn``'s execution options ask (:data:`WRITE`,
    :data:`SINGLE_READ`). On SQLite the BEGIN the transaction needs (``BEGIN IMMEDIATE``
    for a write, none for a single read) is left for the dialect's ``do_begin`` (see
    ``_configure_sqlite``) on the driver connection's ``info``; a transaction begun
    otherwise (``engine.begin()``) gets a plain ``BEGIN``."""
    if conn.dialect.name == "sqlite":
        options = conn.get_execution_options()
        conn.connection.info[_NEXT_BEGIN] = (
            None
            if options.get("gilas_single", False)
            else "BEGIN IMMEDIATE"
            if options.get("gilas_write", False)
            else "BEGIN"
        )
    return conn.begin()


def _journal_mode_wal(cursor: sqlite3.Cursor, busy_timeout_ms: int) -> None:
    """Switch the file to WAL, waiting up to the busy timeout for the lock that takes.

    The switch needs the file to itself, and SQLite reports "database is locked" at once
    instead of waiting when other processes hold it: several processes opening a new file
    together (workers of one app starting) would fail. Once the file is in WAL mode the
    statement is a no-op that always succeeds at once.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _is_memory(engine: Engine) -> bool:
    database = engine.url.database
    return not database or database == ":memory:" or database.startswith("file::memory:")
