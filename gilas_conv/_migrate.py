"""Running the Alembic migrations that ship inside the package.

The migration scripts live in ``migrations/`` at the top of the source tree; the wheel
carries them as ``gilas_conv/migrations`` so an installed gilas-conv can upgrade a database
without a checkout.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from ._engine import WRITE, create_engine_for_url

__all__ = ["current_revision", "downgrade_database", "head_revision", "upgrade_database"]


def migrations_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(  # a broken install, not a user error
        "gilas-conv's migration scripts are missing from the installation"
    )


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return config


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest revision this version of gilas-conv knows (read once per process)."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the migration scripts have no head"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it has no gilas-conv schema."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _run(engine: Engine, action: str, revision: str) -> None:
    config = _alembic_config()
    # A write transaction from the start: on SQLite, BEGIN IMMEDIATE makes a second process
    # that opens a new file at the same moment wait for the first one's migration (under the
    # busy timeout) and then find the schema current, instead of failing with "locked".
    with engine.connect() as conn, conn.execution_options(**WRITE).begin():
        config.attributes["connection"] = conn
        getattr(command, action)(config, revision)


def upgrade_database(url: str | Engine | None = None, revision: str = "head") -> str:
    """Upgrade the database's schema to ``revision`` (default: the newest).

    ``url`` defaults like ConversationStore's: $GILAS_CONV_DATABASE_URL, else the embedded
    SQLite file. Safe to call on an up-to-date database. Returns the resulting revision.
    """
    from ._config import resolve_database_url

    if isinstance(url, Engine):
        engine, owned = url, False
    else:
        engine, owned = create_engine_for_url(resolve_database_url(url)[0]), True
    try:
        _run(engine, "upgrade", revision)
        return current_revision(engine) or "base"
    finally:
        if owned:
            engine.dispose()


def downgrade_database(url: str | Engine, revision: str) -> str:
    """Downgrade the schema to ``revision`` (``"base"`` drops every gilas-conv table)."""
    engine = url if isinstance(url, Engine) else create_engine_for_url(url)
    try:
        _run(engine, "downgrade", revision)
        return current_revision(engine) or "base"
    finally:
        if not isinstance(url, Engine):
            engine.dispose()
