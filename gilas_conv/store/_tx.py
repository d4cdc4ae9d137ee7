"""The one place where transactions open and database errors are translated."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..exceptions import StoreError, StoreIntegrityError
from ._engine import WRITE


class _Transaction:
    """``with store._write() as conn``: one transaction, database errors translated.

    Write transactions ask SQLite for the write lock up front (BEGIN IMMEDIATE). That
    BEGIN runs on the driver's connection from an engine hook, outside SQLAlchemy's error
    wrapping, so the driver's own errors (a busy timeout that ran out: "database is locked")
    are translated here as well.
    """

    def __init__(self, engine: Engine, *, write: bool) -> None:
        self._engine = engine
        self._write = write
        self._conn: Any = None
        self._tx: Any = None

    def __enter__(self) -> Any:
        try:
            self._conn = self._engine.connect()
            if self._write:
                self._conn.execution_options(**WRITE)
            self._tx = self._conn.begin()
        except PoolTimeoutError as err:
            # Every pooled connection stayed checked out for the whole pool timeout.
            raise StoreError(f"no database connection free: {str(err).splitlines()[0]}") from err
        except Exception as err:
            wrapped = _as_dbapi_error(self._engine, err)
            if wrapped is None:
                raise
            if self._conn is not None:
                self._conn.close()
            raise StoreError(f"database error: {_describe(wrapped)}") from err
        return self._conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
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
