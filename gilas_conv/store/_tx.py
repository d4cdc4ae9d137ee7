"""The one place where transactions open and database errors are translated."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidRequestError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..exceptions import StoreError, StoreIntegrityError
from ._engine import SINGLE_READ, SINGLE_WRITE, WRITE, begin


class _Transaction:
    """``with store._write() as conn``: one transaction, database errors translated.
    (``single``: a read or write of one statement, run in autocommit mode on Postgres, which
    saves the BEGIN and COMMIT round trips: see ``ConversationStore._read_one`` and
    ``_write(single=True)``.)

    Write transactions ask SQLite for the write lock up front (BEGIN IMMEDIATE). That
    BEGIN runs on the driver's connection from the dialect's begin hook (see
    ``_engine.begin``), so its errors (a busy timeout that ran out: "database is locked")
    are translated here as well.
    """

    def __init__(self, engine: Engine, *, write: bool, single: bool = False) -> None:
        self._engine = engine
        self._write = write
        # A write in autocommit mode (Postgres): its statement commits as it runs.
        self._commits_at_once = write and single and engine.dialect.name == "postgresql"
        # One statement: no BEGIN/COMMIT around it (see _engine.SINGLE_READ, SINGLE_WRITE).
        self._options: dict[str, Any] | None
        if write:
            self._options = SINGLE_WRITE[engine.dialect.name] if single else WRITE
        else:
            self._options = SINGLE_READ[engine.dialect.name] if single else None
        self._conn: Any = None
        self._tx: Any = None
        # Set when the write failed in doubt: the connection was lost while the server may
        # have committed it (an autocommit statement, or the COMMIT), so it may be stored.
        # ``backend_pid``: the server process of the write's connection (Postgres), which may
        # still run it (see ConversationStore._lease_in_doubt).
        self.in_doubt = False
        self.backend_pid: int | None = None

    def __enter__(self) -> Any:
        self._open()
        if self._engine.dialect.name == "postgresql":
            return _RetryFirstStatement(self)
        return self._conn

    def _open(self) -> None:
        try:
            self._conn = self._engine.connect()
            if self._options is not None:
                self._conn.execution_options(**self._options)
            if self._write and self._engine.dialect.name == "postgresql":
                # Known to the driver (no round trip); unreadable once the connection is lost.
                self.backend_pid = self._conn.connection.dbapi_connection.info.backend_pid
            self._tx = begin(self._conn)
        except PoolTimeoutError as err:
            # Every pooled connection stayed checked out for the whole pool timeout.
            raise StoreError(f"no database connection free: {str(err).splitlines()[0]}") from err
        except InvalidRequestError as err:
            if self._conn is not None:
                raise  # not the checkout's
            # The pool's checkout found each connection it tried closed by the server
            # (_engine's checkout check) and gave up: "This connection is closed".
            raise StoreError(f"database connection lost: {err}") from err
        except Exception as err:
            wrapped = _as_dbapi_error(self._engine, err)
            if wrapped is None:
                raise
            if self._conn is not None:
                self._conn.close()
            raise StoreError(f"database error: {_describe(wrapped)}") from err

    def _reopen(self) -> None:
        """A fresh connection and transaction in place of a dead one (see _RetryFirstStatement)."""
        with contextlib.suppress(DBAPIError):
            self._conn.close()  # already invalidated: returns nothing to the pool
        # Forgotten before the new checkout: if it fails, __exit__ has nothing to end.
        self._conn = self._tx = None
        self._open()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._tx is None:  # a reconnection that failed: no transaction to end
            if self._conn is not None:
                self._conn.close()
            return
        if isinstance(exc, Exception):
            exc = _as_dbapi_error(self._engine, exc) or exc
        try:
            if exc is None:
                self._tx.commit()
            else:
                self._tx.rollback()
        except IntegrityError as err:
            raise StoreIntegrityError(f"the database refused the write: {_describe(err)}") from err
        except DBAPIError as err:
            if exc is None:
                self.in_doubt = self._write and err.connection_invalidated
                raise StoreError(f"database error: {_describe(err)}") from err
        finally:
            self._conn.close()
        if isinstance(exc, IntegrityError):
            raise StoreIntegrityError(f"the database refused the write: {_describe(exc)}") from exc
        if isinstance(exc, DBAPIError):
            raise StoreError(f"database error: {_describe(exc)}") from exc


class _Checkpoint:
    """``with _Checkpoint(engine, url) as dbapi_connection``: a SQLite driver connection
    outside any transaction (``PRAGMA wal_checkpoint`` cannot run inside one), its
    errors translated like a transaction's."""

    def __init__(self, engine: Engine, shown_url: str) -> None:
        self._engine = engine
        self._url = shown_url
        self._conn: Any = None

    def __enter__(self) -> Any:
        try:
            self._conn = self._engine.connect()
            return self._conn.connection.dbapi_connection
        except Exception as err:
            self.__exit__(type(err), err, None)
            raise

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if isinstance(exc, Exception):
            wrapped = _as_dbapi_error(self._engine, exc)
            if wrapped is not None:
                raise StoreError(f"database error: {_describe(wrapped)}") from exc


@contextmanager
def _opening(engine: Engine, shown_url: str) -> Iterator[None]:
    """Translate database errors raised while a database is opened, checked or migrated
    (outside a :class:`_Transaction`) into one-line StoreErrors naming the database."""
    try:
        yield
    except Exception as err:
        wrapped = _as_dbapi_error(engine, err)
        if wrapped is None:
            raise
        raise StoreError(f"cannot open the database {shown_url}: {_describe(wrapped)}") from err


def _as_dbapi_error(engine: Engine, err: Exception) -> DBAPIError | None:
    """``err`` as a SQLAlchemy DBAPIError (a raw driver error wrapped as SQLAlchemy would
    wrap it), or None when it is no database error."""
    if isinstance(err, DBAPIError):
        return err
    driver_errors = engine.dialect.loaded_dbapi
    if isinstance(err, driver_errors.Error):
        return cast(DBAPIError, DBAPIError.instance(None, None, err, driver_errors.Error))
    return None


def _describe(err: DBAPIError) -> str:
    """The driver's message alone: SQLAlchemy's text would echo every bound parameter."""
    text = str(err.orig).strip().splitlines()
    return text[0][:500] if text else type(err.orig).__name__


class _RetryFirstStatement:
    """A Postgres transaction's connection that survives a pooled connection found dead.

    Connections are not pinged when checked out of the pool (a round trip each time); a
    checkout only refuses a connection the server is already known to have closed (see
    ``_engine._closed_by_server``). When the first statement of a transaction fails all the
    same because the connection was already dead (the server restarted, or the backend was
    terminated, while it sat in the pool), the transaction is begun again on a fresh
    connection and that statement is sent again, once. That is the only failure retried:
    nothing of the transaction had run, so nothing can be done twice (a statement the
    server might have run before the connection broke was in an uncommitted transaction,
    which the server rolled back). A connection that dies later in a transaction is a
    StoreError, as before. SQLAlchemy marks the other pooled connections stale on such a
    failure, so they are replaced when next checked out.

    A write of one statement in autocommit mode (``_write(single=True)``) commits as it
    runs, so a statement whose connection broke may have been committed: it is sent again
    only when the server said it ended the session (SQLSTATE 57P01, a terminated backend
    or a server shut down: a statement then running was rolled back); a connection lost
    without a word (a network failure, a crashed server) is a StoreError, since the write
    may be stored, and the transaction says so (``in_doubt``), as it does for a COMMIT
    whose connection was lost.
    """

    def __init__(self, transaction: _Transaction) -> None:
        self._transaction = transaction

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._first("execute", args, kwargs)

    def exec_driver_sql(self, *args: Any, **kwargs: Any) -> Any:
        return self._first("exec_driver_sql", args, kwargs)

    def _first(self, method: str, args: Any, kwargs: Any) -> Any:
        for resent in (False, True):
            conn = self._transaction._conn
            # From the second statement on, straight to the connection.
            self.execute = conn.execute  # type: ignore[method-assign]
            self.exec_driver_sql = conn.exec_driver_sql  # type: ignore[method-assign]
            try:
                return getattr(conn, method)(*args, **kwargs)
            except DBAPIError as err:
                if not err.connection_invalidated:
                    raise
                ended = getattr(err.orig, "sqlstate", None) == "57P01"
                if self._transaction._commits_at_once and (resent or not ended):
                    self._transaction.in_doubt = True
                    raise
                if resent:
                    raise
            self._transaction._reopen()
        raise AssertionError("unreachable: the second attempt returns or raises")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transaction._conn, name)
