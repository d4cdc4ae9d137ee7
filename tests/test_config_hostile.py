"""Settings that could leak a secret or mislead: API keys that cannot travel in a header,
credentials in URLs, database URLs gilas-conv cannot use, odd schema states."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import POSTGRES_SKIP_REASON, PostgresServer
from sqlalchemy import create_engine, text

from gilas_conv import ConfigurationError, ConversationStore, Sender, StoreError
from gilas_conv._config import redact_url
from gilas_conv.cli import main

SECRET = "sk-TOPSECRET0123456789"
BAD_KEYS = {
    "line feed": (f"{SECRET}\nX-Evil: 1", "control character at position 23"),
    "carriage return": (f"{SECRET}\rmore", "control character at position 23"),
    "non-ASCII": (f"{SECRET}é", "non-ASCII character at position 23"),
    "tab": (f"sk-a\tb{SECRET}", "control character at position 5"),
}


@pytest.mark.parametrize("kind", list(BAD_KEYS))
def test_a_key_that_cannot_be_sent_is_refused_without_showing_it(db_url: str, kind: str) -> None:
    key, where = BAD_KEYS[kind]
    with ConversationStore(db_url) as store:
        with pytest.raises(ConfigurationError, match=where) as caught:
            Sender(store, api_key=key)
        assert SECRET not in str(caught.value) and "sk-" not in str(caught.value)
        assert store.count() == 0


@pytest.mark.parametrize("kind", list(BAD_KEYS))
def test_cli_send_refuses_a_bad_key_in_one_line_and_stores_nothing(db_url: str, kind: str) -> None:
    key, where = BAD_KEYS[kind]
    result = CliRunner().invoke(
        main, ["--db", db_url, "send", "hello"], env={"GILAS_API_KEY": key}, catch_exceptions=False
    )
    output = result.output
    assert result.exit_code not in (0, None)
    assert SECRET not in output and "sk-" not in output
    assert "GILAS_API_KEY" in output and where in output
    assert len(output.strip().splitlines()) == 1
    with ConversationStore(db_url) as store:
        assert store.count() == 0


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@host/v1", "http://user:***@host/v1"),
        ("https://sk-token@host/v1", "https://***@host/v1"),
        ("https://host/v1?api_key=secret&x=1", "https://host/v1?api_key=***&x=1"),
        ("postgresql://app:se@cr/et@db.example:5432/gc", "postgresql://app:***@db.example:5432/gc"),
        (
            "postgresql://app@db/gc?password=secret&sslmode=require",
            "postgresql://app@db/gc?password=***&sslmode=require",
        ),
        ("postgresql://app@db/gc", "postgresql://app@db/gc"),
        ("sqlite:////tmp/me@home/gc.db", "sqlite:////tmp/me@home/gc.db"),
        ("https://api.gilas.io/v1", "https://api.gilas.io/v1"),
    ],
)
def test_redact_url_masks_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "secret" not in redact_url(url) and "se@cr" not in redact_url(url)


def test_a_database_password_never_appears_in_store_errors_or_reprs(tmp_path: object) -> None:
    url = "postgresql://app:hunter2secret@127.0.0.1:1/nowhere"
    with pytest.raises(StoreError) as caught:
        ConversationStore(url)
    assert "hunter2secret" not in str(caught.value)
    assert "cannot open the database postgresql+psycopg://app:***@127.0.0.1:1/nowhere" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(ConfigurationError) as unsupported:
        ConversationStore("mysql://app:hunter2secret@host/db")
    assert "hunter2secret" not in str(unsupported.value)


@pytest.mark.parametrize(
    "url", ["mysql://u@localhost/db", "http://example.com/db", "oracle://u@h/db", "mssql+pyodbc://u@h/db"]
)
def test_unsupported_database_urls_are_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"gilas-conv supports sqlite and postgresql"):
        ConversationStore(url)


def test_a_missing_postgres_database_is_one_clear_line(postgres_server: PostgresServer | None) -> None:
    from gilas_conv import upgrade_database

    if postgres_server is None:
        pytest.skip(POSTGRES_SKIP_REASON)
    missing = postgres_server.url.set(database="gc_no_such_database_here").render_as_string(False)
    for attempt in (lambda: upgrade_database(missing), lambda: ConversationStore(missing)):
        with pytest.raises(StoreError) as caught:
            attempt()
        message = str(caught.value)
        assert "does not exist" in message and "sqlalche.me" not in message
        assert len(message.splitlines()) == 1


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_cli_refuses_an_in_memory_database(url: str) -> None:
    result = CliRunner().invoke(main, ["--db", url, "list"])
    assert result.exit_code not in (0, None)
    assert "in-memory database" in result.output and "keep nothing" in result.output
    with ConversationStore(url) as store:  # the library still allows one
        assert store.create(model="gpt-4o-mini").append("user", "hi").seq == 1


# -- schema states --------------------------------------------------------------------------------


def test_a_database_newer_than_this_gilas_conv_says_to_upgrade_the_package(db_url: str) -> None:
    from gilas_conv import upgrade_database

    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            old = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
        try:
            for attempt in (lambda: ConversationStore(db_url), lambda: upgrade_database(db_url)):
                with pytest.raises(StoreError, match=r"newer than this gilas-conv.*upgrade the package"):
                    attempt()
        finally:
            with engine.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": old})
    finally:
        engine.dispose()


def test_tables_without_a_recorded_revision_say_how_to_stamp(db_url: str) -> None:
    from gilas_conv import upgrade_database

    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            old = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            conn.execute(text("DELETE FROM alembic_version"))
        try:
            for attempt in (lambda: ConversationStore(db_url), lambda: upgrade_database(db_url)):
                with pytest.raises(StoreError, match=r"no record of their schema revision.*INSERT INTO") as e:
                    attempt()
                assert "start over" in str(e.value)
        finally:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO alembic_version VALUES (:v)"), {"v": old})
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["https://api.example.com:abc/v1", "https://api.example.com:99999/v1"])
def test_a_base_url_with_a_bad_port_is_refused_before_anything_is_stored(tmp_path: Path, url: str) -> None:
    # It passed the check, and every send stored its message, then raised httpx.InvalidURL,
    # which is no GilasConvError.
    with (
        ConversationStore(f"sqlite:///{tmp_path / 'x.db'}") as store,
        pytest.raises(ConfigurationError, match="is not a valid URL"),
    ):
        Sender(store, base_url=url, api_key="sk-test-123456")
