"""The one place where transactions open and database errors are translated."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..exceptions import StoreError, StoreIntegrityError
from ._engine import WRITE


class _Transaction:
    """``with store._write() as conn``: one transaction, database errors translated.

    Write transactions ask SQLite for the write lock up front (BEGIN IMMEDIATE).
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
        except DBAPIError as err:
            if self._conn is not None:
                self._conn.close()
            raise StoreError(f"database error: {_describe(err)}") from err
        except PoolTimeoutError as err:
            # Every pooled connection stayed checked out for the whole pool timeout.
            raise StoreError(f"no database connection free: {str(err).splitlines()[0]}") from err
        return self._conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        driver_errors = self._engine.dialect.loaded_dbapi
        if isinstance(exc, driver_errors.Error) and not isinstance(exc, DBAPIError):
            # Raised by the driver's own cursor (the SQLite append path): wrap it as
            # SQLAlchemy would have, so one translation below serves both.
            exc = DBAPIError.instance(None, None, exc, driver_errors.Error)
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


def _describe(err: DBAPIError) -> str:
    """The driver's message alone: SQLAlchemy's text would echo every bound parameter."""
    text = str(err.orig).strip().splitlines()
    return text[0][:500] if text else type(err.orig).__name__
