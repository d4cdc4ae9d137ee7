"""Alembic environment for gilas-conv.

The connection comes from ``config.attributes["connection"]`` when gilas-conv runs the
migrations itself (``gilas-conv db upgrade``, ``gilas_conv.upgrade_database``), else from
$GILAS_CONV_DATABASE_URL (``alembic upgrade head`` from a source checkout).
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy.engine import Connection

from gilas_conv._config import ENV_DATABASE_URL
from gilas_conv.store._engine import create_engine_for_url
from gilas_conv.store._schema import metadata
from gilas_conv.store._search import unmodeled_table

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # The search tables are built by their migration alone (see store/_search.py).
        include_name=lambda name, type_, _parents: not (type_ == "table" and unmodeled_table(name or "")),
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(ENV_DATABASE_URL)
    if not url:
        raise SystemExit(
            f"{ENV_DATABASE_URL} is not set; export it to the database URL to migrate, "
            "e.g. postgresql+psycopg://user@host/dbname or sqlite:///path/to/conversations.db"
        )
    engine = create_engine_for_url(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("gilas-conv migrations run online only (no --sql mode)")
run_migrations_online()
