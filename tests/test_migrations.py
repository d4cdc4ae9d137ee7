"""Alembic owns the schema; the migrations are tested like code, on SQLite and Postgres.

The first four tests follow pytest-alembic's defaults (single head, upgrade from empty,
models match the migrations, down and up again). The rest pin how a store meets a database
whose schema is missing or behind, the ``alembic`` command from a checkout, and the indexes
the hot queries depend on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url

from gilas_conv import (
    ConversationStore,
    SchemaOutOfDate,
    StoreError,
    downgrade_database,
    head_revision,
    upgrade_database,
)
from gilas_conv.store._engine import create_engine_for_url
from gilas_conv.store._migrate import current_revision, migrations_dir
from gilas_conv.store._schema import metadata
from gilas_conv.store._search import unmodeled_table

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "api_keys",
    "conversations",
    "messages",
    "summaries",
    "usage_events",
    "usage_rollup",
    "quota_limits",
    "quota_reservations",
    "settings",
}
# As conftest.py words it, so every skipped Postgres test gives the same reason.
POSTGRES_SKIP_REASON = (
    "Postgres tests need GILAS_CONV_TEST_POSTGRES_URL=postgresql://user@host:port/dbname "
    "(a server where the user may create databases)"
)
MODEL = "gpt-4o-mini"


def _engine(url: str) -> Engine:
    return create_engine_for_url(url)


def _tables(url: str) -> set[str]:
    """The tables the models describe (the search tables are checked in test_search.py)."""
    engine = _engine(url)
    try:
        return {name for name in inspect(engine).get_table_names() if not unmodeled_table(name)}
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = _engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def _script_directory() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(config)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def migrated_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres_server: Any
) -> str:
    """One database per backend at the current schema, shared by the tests that only inspect
    the schema or query it (a Postgres database costs a forced checkpoint to drop)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('migrated') / 'schema.db'}"
        upgrade_database(url)
        return url
    if postgres_server is None:
        pytest.skip(POSTGRES_SKIP_REASON)
    return str(postgres_server.create(migrated=True))


@pytest.fixture
def postgres_empty_url(postgres_server: Any) -> str:
    """A new Postgres database with no schema (these tests are about non-SQLite databases)."""
    if postgres_server is None:
        pytest.skip(POSTGRES_SKIP_REASON)
    return str(postgres_server.create(migrated=False))


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """A new Postgres database at the current schema."""
    if postgres_server is None:
        pytest.skip(POSTGRES_SKIP_REASON)
    return str(postgres_server.create(migrated=True))


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# pytest-alembic's four


def test_single_head_revision() -> None:
    """Two heads mean two branches nobody merged: `upgrade head` would be ambiguous."""
    script = _script_directory()
    heads = script.get_heads()
    assert heads == [head_revision()]
    # The repository's alembic.ini points at the same scripts the package ships.
    from_ini = ScriptDirectory.from_config(Config(str(REPO_ROOT / "alembic.ini")))
    assert from_ini.get_heads() == heads
    # Linear history: every revision has at most one parent and one child.
    revisions = list(script.walk_revisions())
    assert revisions[-1].down_revision is None
    for revision in revisions:
        assert not isinstance(revision.down_revision, tuple | list), revision.revision
        assert len(revision.nextrev) <= 1, revision.revision


def test_upgrade_from_empty(empty_db_url: str) -> None:
    """Every migration runs, in order, on a database that has nothing."""
    assert _tables(empty_db_url) == set()
    assert upgrade_database(empty_db_url) == head_revision()
    assert _tables(empty_db_url) == TABLES | {"alembic_version"}
    assert _revision(empty_db_url) == head_revision()
    # Running it again is a no-op, not an error.
    assert upgrade_database(empty_db_url) == head_revision()
    with ConversationStore(empty_db_url) as store:
        conversation = store.create(model=MODEL, system="works")
        assert conversation.append("user", "hi").seq == 2


def test_models_match_migrations(migrated_url: str) -> None:
    """What the migrations build is exactly what the SQLAlchemy models describe."""
    engine = _engine(migrated_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_name": lambda name, type_, _p: not (type_ == "table" and unmodeled_table(name)),
                },
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_downgrade_to_base_and_up_again(empty_db_url: str) -> None:
    """Every downgrade undoes its upgrade completely, so down-then-up works, data or not."""
    revisions = [r.revision for r in reversed(list(_script_directory().walk_revisions()))]
    for revision in revisions:
        assert upgrade_database(empty_db_url, revision) == revision
    with ConversationStore(empty_db_url) as store:
        conversation = store.create(model=MODEL, system="s")
        conversation.append("user", "data that the downgrade drops")
    for revision in reversed(revisions):
        parent = _script_directory().get_revision(revision).down_revision
        assert downgrade_database(empty_db_url, parent or "base") == (parent or "base")
    # Nothing is left behind but Alembic's (now empty) bookkeeping table.
    assert _tables(empty_db_url) <= {"alembic_version"}
    assert _revision(empty_db_url) is None
    if empty_db_url.startswith("postgresql"):
        engine = _engine(empty_db_url)
        try:
            with engine.connect() as conn:
                leftovers = conn.execute(
                    text(
                        "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE n.nspname = 'public' AND relname NOT LIKE 'alembic_version%'"
                    )
                ).all()
        finally:
            engine.dispose()
        assert leftovers == []
    assert upgrade_database(empty_db_url) == head_revision()
    assert _tables(empty_db_url) == TABLES | {"alembic_version"}
    with ConversationStore(empty_db_url) as store:
        assert store.list() == []
        assert store.create(model=MODEL, system="again").append("user", "x").seq == 2


def test_downgrade_below_0002_keeps_replies_that_share_a_response_id(empty_db_url: str) -> None:
    """Revision 0001 allows one reply per response id; going back to it keeps every reply
    and leaves the id on the earliest, and going up again changes nothing."""
    upgrade_database(empty_db_url)
    with ConversationStore(empty_db_url, auto_upgrade=False) as store:
        conversation = store.create(model=MODEL)
        for question, answer in (("2+2?", "4"), ("Capital of Iran?", "Tehran")):
            asked = conversation.append("user", question)
            conversation.append("assistant", answer, response_id="chatcmpl-same", reply_to=asked.seq)
        conversation_id = conversation.id
    assert downgrade_database(empty_db_url, "0001") == "0001"
    engine = _engine(empty_db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT seq, response_id FROM messages WHERE conversation_id = :c ORDER BY seq"),
                {"c": conversation_id},
            ).all()
            columns = {c["name"] for c in inspect(conn).get_columns("conversations")}
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(1, None), (2, "chatcmpl-same"), (3, None), (4, None)]
    assert not columns & {"lease_token", "lease_expires_at"}
    assert upgrade_database(empty_db_url) == head_revision()
    with ConversationStore(empty_db_url, auto_upgrade=False) as store:
        stored = store.get(conversation_id).messages()
    assert [m.content for m in stored] == ["2+2?", "4", "Capital of Iran?", "Tehran"]


# ---------------------------------------------------------------------------------------------
# Opening a database that is not at the head


def _assert_out_of_date(url: str, *, current: str | None, **kwargs: Any) -> None:
    with pytest.raises(SchemaOutOfDate) as info:
        ConversationStore(url, **kwargs)
    assert info.value.current == current
    assert info.value.head == head_revision()
    assert "gilas-conv db upgrade" in str(info.value)
    assert head_revision() in str(info.value)


def test_postgres_without_schema_raises_schema_out_of_date(postgres_empty_url: str) -> None:
    # The test server trusts local connections, so the password is never checked: only
    # whether the message shows it.
    with_password = (
        make_url(postgres_empty_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    )
    _assert_out_of_date(with_password, current=None)
    with pytest.raises(SchemaOutOfDate) as info:
        ConversationStore(with_password)
    assert "s3cret-pw" not in str(info.value)
    assert "***" in str(info.value)
    # Refusing is all it did: no table was created behind the user's back.
    assert _tables(postgres_empty_url) == set()


def test_a_postgres_older_than_13_is_refused_in_one_line_before_anything_runs(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server here is newer: the driver's report of its version is what is replaced.
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    monkeypatch.setattr(PGDialect_psycopg, "_get_server_version_info", lambda self, conn: (12, 17))
    with pytest.raises(StoreError) as info:
        ConversationStore(postgres_url)
    assert str(info.value).endswith("runs PostgreSQL 12.17; gilas-conv needs PostgreSQL 13 or later")
    assert "\n" not in str(info.value)


def test_postgres_behind_raises_schema_out_of_date(postgres_url: str) -> None:
    # (A revision this version does not know is newer, not behind: see
    # test_config_hostile.py::test_a_database_newer_than_this_gilas_conv_says_to_upgrade_the_package.)
    downgrade_database(postgres_url, "base")
    _assert_out_of_date(postgres_url, current=None)
    assert _tables(postgres_url) <= {"alembic_version"}


def test_auto_upgrade_false_refuses_on_sqlite_too(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'manual.db'}"
    _assert_out_of_date(url, current=None, auto_upgrade=False)
    assert _tables(url) == set()


def test_auto_upgrade_true_upgrades_any_backend_when_asked(empty_db_url: str) -> None:
    with ConversationStore(empty_db_url, auto_upgrade=True) as store:
        assert store.create(model=MODEL, system="s").message_count == 1
    assert _revision(empty_db_url) == head_revision()


def test_a_new_sqlite_file_upgrades_itself_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "new.db"
    path.parent.mkdir()
    assert not path.exists()
    with ConversationStore(f"sqlite:///{path}") as store:
        assert store.create(model=MODEL, system="s").append("user", "u").seq == 2
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
    finally:
        raw.close()


def test_a_downgraded_sqlite_file_upgrades_itself_on_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade_database(url)
    downgrade_database(url, "base")
    assert _revision(url) is None
    with ConversationStore(url) as store:
        assert store.list() == []
        store.create(model=MODEL)
    assert _revision(url) == head_revision()
    assert _tables(url) == TABLES | {"alembic_version"}


# ---------------------------------------------------------------------------------------------
# `alembic` from a source checkout


def test_alembic_command_from_the_repository_root(empty_db_url: str) -> None:
    env = _subprocess_env(GILAS_CONV_DATABASE_URL=empty_db_url)
    upgrade = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert _revision(empty_db_url) == head_revision()
    assert _tables(empty_db_url) == TABLES | {"alembic_version"}
    # `alembic check` autogenerates against the models: nothing to do.
    check = subprocess.run(
        [sys.executable, "-m", "alembic", "check"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_alembic_command_without_a_database_url_says_which_variable_to_set() -> None:
    env = _subprocess_env()
    env.pop("GILAS_CONV_DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "GILAS_CONV_DATABASE_URL is not set" in result.stderr


# ---------------------------------------------------------------------------------------------
# Indexes the hot queries use

NEWEST_MESSAGES = (
    "SELECT seq, role, content FROM messages WHERE conversation_id = :cid ORDER BY seq DESC LIMIT 20"
)
ANCHORS = (
    "SELECT seq FROM messages WHERE conversation_id = :cid "
    "AND (role IN ('system', 'developer') OR pinned) ORDER BY seq"
)


def _fill(store: ConversationStore) -> str:
    """A few conversations with enough rows that a planner has something to choose."""
    keep = ""
    for _ in range(3):
        conversation = store.create(model=MODEL, system="s")
        for i in range(40):
            conversation.append("user" if i % 2 else "assistant", f"m{i}")
        keep = conversation.id
    return keep


def test_partial_indexes_exist(migrated_url: str) -> None:
    engine = _engine(migrated_url)
    try:
        indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes("messages")}
        assert indexes["ix_messages_anchor"]["column_names"] == ["conversation_id", "seq"]
        assert not indexes["ix_messages_anchor"]["unique"]
        # Not unique: servers reuse response ids, and every reply is stored.
        assert indexes["ix_messages_response"]["column_names"] == ["conversation_id", "response_id"]
        assert not indexes["ix_messages_response"]["unique"]
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                definitions = dict(
                    conn.execute(
                        text(
                            "SELECT name, sql FROM sqlite_master"
                            " WHERE type = 'index' AND tbl_name = 'messages'"
                        )
                    ).all()
                )
            else:
                definitions = dict(
                    conn.execute(
                        text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'messages'")
                    ).all()
                )
    finally:
        engine.dispose()
    anchor = definitions["ix_messages_anchor"].replace('"', "")
    assert " WHERE " in anchor
    assert "'system'" in anchor and "'developer'" in anchor and "pinned" in anchor
    assert "response_id IS NOT NULL" in definitions["ix_messages_response"].split(" WHERE ", 1)[1]


def _postgres_plan(conn: Any, query: str, cid: str) -> dict[str, Any]:
    raw = conn.execute(text("EXPLAIN (FORMAT JSON) " + query), {"cid": cid}).scalar_one()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    return plan[0]["Plan"]


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(node for child in plan.get("Plans", []) for node in _nodes(child))]


def test_query_plans_use_the_primary_key_and_the_anchor_index(migrated_url: str) -> None:
    """The newest messages of one conversation, and its anchors, are index range scans."""
    with ConversationStore(migrated_url) as store:
        cid = _fill(store)
        with store.engine.connect() as conn:
            # The plan answers the question it was asked.
            rows = conn.execute(text(NEWEST_MESSAGES), {"cid": cid}).all()
            assert [r.seq for r in rows] == list(range(41, 21, -1))
            assert conn.execute(text(ANCHORS), {"cid": cid}).scalars().all() == [1]
            if store.dialect == "sqlite":
                conn.exec_driver_sql("ANALYZE")
                newest = [
                    r.detail
                    for r in conn.execute(text("EXPLAIN QUERY PLAN " + NEWEST_MESSAGES), {"cid": cid})
                ]
                anchors = [
                    r.detail for r in conn.execute(text("EXPLAIN QUERY PLAN " + ANCHORS), {"cid": cid})
                ]
            else:
                conn.execute(text("ANALYZE messages"))
                # Without an index the planner would still have to pick a seq scan.
                conn.execute(text("SET enable_seqscan = off"))
                newest_nodes = _nodes(_postgres_plan(conn, NEWEST_MESSAGES, cid))
                anchor_nodes = _nodes(_postgres_plan(conn, ANCHORS, cid))
            conn.rollback()
    if store.dialect == "sqlite":
        assert any("USING" in d and "messages" in d for d in newest), newest
        assert not any(d.startswith("SCAN messages") and "USING" not in d for d in newest), newest
        # The primary key already orders by seq: no sort step.
        assert not any("TEMP B-TREE" in d for d in newest), newest
        assert any("USING" in d and "ix_messages_anchor" in d for d in anchors), anchors
        return
    scans = [n for n in newest_nodes if n["Node Type"].endswith("Scan")]
    assert [n["Node Type"] for n in scans] == ["Index Scan"], newest_nodes
    assert (scans[0]["Index Name"], scans[0]["Scan Direction"]) == ("pk_messages", "Backward")
    assert not any(n["Node Type"] == "Sort" for n in newest_nodes), newest_nodes
    # Which index serves the anchors (the partial one or the key plus a filter) is the
    # planner's call on a table this small; that one is used is not.
    assert any(n.get("Index Name") in ("ix_messages_anchor", "pk_messages") for n in anchor_nodes), (
        anchor_nodes
    )
    assert not any(n["Node Type"] == "Seq Scan" for n in anchor_nodes), anchor_nodes
