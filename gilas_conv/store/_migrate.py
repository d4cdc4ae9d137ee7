"""Running the Alembic migrations that ship inside the package.

The migration scripts live in ``migrations/`` at the top of the source tree; the wheel
carries them as ``gilas_conv/migrations`` so an installed gilas-conv can upgrade a database
without a checkout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from .._config import redact_url
from ..exceptions import StoreError
from ._engine import WRITE, begin, create_engine_for_url
from ._schema import SCHEMA_REVISION
from ._tx import _opening

_VERSION_TABLE = "alembic_version"

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported inside the functions: most processes (every CLI command but
# `db upgrade`) only compare one revision string and never need it.

__all__ = ["current_revision", "downgrade_database", "head_revision", "upgrade_database"]


def migrations_dir() -> Path:
    package = Path(__file__).resolve().parent.parent  # gilas_conv/
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(  # a broken install, not a user error
        "gilas-conv's migration scripts are missing from the installation"
    )


def _alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return config


def head_revision() -> str:
    """The newest schema revision this version of gilas-conv knows and needs."""
    return SCHEMA_REVISION


def script_head_revision() -> str | None:
    """The head of the shipped migration scripts (what SCHEMA_REVISION must equal)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it has no gilas-conv schema.

    Read with plain SQL, so opening a store never has to load Alembic.
    """
    with engine.connect() as conn:
        return _revision_on(conn)


def _revision_on(conn: Connection) -> str | None:
    if not inspect(conn).has_table(_VERSION_TABLE):
        return None
    versions = conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars().all()
    if len(versions) > 1:
        raise RuntimeError(f"the database has several schema heads: {', '.join(versions)}")
    return versions[0] if versions else None


def known_revisions() -> set[str]:
    """Every schema revision the shipped migrations know."""
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def check_schema_state(bind: Engine | Connection, current: str | None) -> None:
    """Raise StoreError for the states ``db upgrade`` cannot fix: a schema newer than this
    gilas-conv, or gilas-conv's tables with no record of their revision.

    Before a migration it runs inside the migration's own transaction (see ``_run``): read
    outside it, another process's migration could commit between reading the revision
    and looking for the tables, and a new database would look half made."""
    shown = redact_url(bind.engine.url.render_as_string(hide_password=False))
    if current is None:
        inspector = inspect(bind)
        if inspector.has_table("conversations") or inspector.has_table("messages"):
            raise StoreError(
                f"the database {shown} has gilas-conv tables but no record of their schema "
                f"revision (the {_VERSION_TABLE} table is missing or empty), so it cannot be "
                "upgraded safely; if this gilas-conv made them, record the revision with "
                f"`CREATE TABLE IF NOT EXISTS {_VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY); "
                f"INSERT INTO {_VERSION_TABLE} VALUES ('{SCHEMA_REVISION}')`, "
                "otherwise start over with a new database"
            )
    elif current != SCHEMA_REVISION and current not in known_revisions():
        raise StoreError(
            f"the database {shown} is at schema revision {current}, newer than this "
            f"gilas-conv knows (it needs {SCHEMA_REVISION}); upgrade the package "
            "(pip install -U gilas-conv), do not run `db upgrade`"
        )


def _run(engine: Engine, action: str, revision: str) -> None:
    from alembic import command

    config = _alembic_config()
    # A write transaction from the start: on SQLite, BEGIN IMMEDIATE makes a second process
    # that opens a new file at the same moment wait for the first one's migration (under the
    # busy timeout) and then find the schema current, instead of failing with "locked".
    with engine.connect() as conn, begin(conn.execution_options(**WRITE)):
        if action == "upgrade":
            check_schema_state(conn, _revision_on(conn))
        config.attributes["connection"] = conn
        getattr(command, action)(config, revision)


def upgrade_database(url: str | Engine | None = None, revision: str = "head") -> str:
    """Upgrade the database's schema to ``revision`` (default: the newest).

    ``url`` defaults like ConversationStore's: $GILAS_CONV_DATABASE_URL, else the embedded
    SQLite file. Safe to call on an up-to-date database. Returns the resulting revision.
    """
    from .._config import resolve_database_url

    if isinstance(url, Engine):
        engine, owned = url, False
    else:
        engine, owned = create_engine_for_url(resolve_database_url(url)[0]), True
    try:
        with _opening(engine, redact_url(engine.url.render_as_string(hide_password=False))):
            _run(engine, "upgrade", revision)
            return current_revision(engine) or "base"
    finally:
        if owned:
            engine.dispose()


def downgrade_database(url: str | Engine, revision: str) -> str:
    """Downgrade the schema to ``revision`` (``"base"`` drops every gilas-conv table)."""
    engine = url if isinstance(url, Engine) else create_engine_for_url(url)
    try:
        with _opening(engine, redact_url(engine.url.render_as_string(hide_password=False))):
            _run(engine, "downgrade", revision)
            return current_revision(engine) or "base"
    finally:
        if not isinstance(url, Engine):
            engine.dispose()
