"""Named defaults and the few places settings are read from the environment.

Precedence everywhere: an explicit argument, then the environment variable, then the named
default here. The environment is read only when one of these functions is called (from a
constructor or a CLI option), never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from .exceptions import MissingAPIKeyError

ENV_API_KEY = "GILAS_API_KEY"
ENV_BASE_URL = "GILAS_BASE_URL"
ENV_DATABASE_URL = "GILAS_CONV_DATABASE_URL"
ENV_MODELS_FILE = "GILAS_CONV_MODELS"

DEFAULT_BASE_URL = "https://api.gilas.io/v1"
DEFAULT_MODEL = "gpt-4o-mini"
APP_NAME = "gilas-conv"
DEFAULT_DATABASE_FILENAME = "conversations.db"

# SQLite: how long a writer waits for another process's write lock before giving up.
# Appends hold the lock for one short transaction, so 30 s is only reached when something
# is badly stuck.
DEFAULT_SQLITE_BUSY_TIMEOUT_MS = 30_000
# NORMAL in WAL mode: a killed process loses nothing committed; a power cut may lose the
# last few commits but never corrupts the file. FULL also survives a power cut, at the
# price of an fsync per commit.
DEFAULT_SQLITE_SYNCHRONOUS = "NORMAL"
# How long a turn lease lasts (seconds): while one request answers a conversation, others
# are refused (ConversationBusy). It must outlast a whole turn -- the summary request, the
# request with its retries and backoff, and the longest stream -- which the overall request
# deadline caps at about 10 minutes; 15 minutes leaves margin for the store writes and a
# slow summary. A finished or failed turn releases its lease at once; only a process that
# died mid-turn (SIGKILL, power cut) leaves it to expire, blocking that conversation for
# at most this long.
DEFAULT_TURN_LEASE_SECONDS = 15 * 60


def default_data_dir() -> Path:
    """The per-user data directory (e.g. ``~/.local/share/gilas-conv`` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_database_path() -> Path:
    return default_data_dir() / DEFAULT_DATABASE_FILENAME


def resolve_database_url(url: str | None) -> tuple[str, bool]:
    """Return ``(url, is_embedded_default)``: the argument, else $GILAS_CONV_DATABASE_URL,
    else a SQLite file in the user's data directory (created on first use)."""
    if url:
        return url, False
    env = os.environ.get(ENV_DATABASE_URL)
    if env:
        return env, False
    path = default_database_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}", True


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str:
    """The API key from the argument, else $GILAS_API_KEY; raise MissingAPIKeyError if neither."""
    key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
    if not key or not key.strip():
        raise MissingAPIKeyError()
    return key.strip()
