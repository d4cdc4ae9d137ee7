"""Named defaults and the few places settings are read from the environment.

Precedence everywhere: an explicit argument, then the environment variable, then the named
default here. The environment is read only when one of these functions is called (from a
constructor or a CLI option), never at import time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from .exceptions import ConfigurationError, MissingAPIKeyError

ENV_API_KEY = "GILAS_API_KEY"
ENV_BASE_URL = "GILAS_BASE_URL"
ENV_DATABASE_URL = "GILAS_CONV_DATABASE_URL"
ENV_MODELS_FILE = "GILAS_CONV_MODELS"

DEFAULT_BASE_URL = "https://api.gilas.io/v1"
DEFAULT_MODEL = "gpt-4o-mini"
APP_NAME = "gilas-conv"
DEFAULT_DATABASE_FILENAME = "conversations.db"
# The data directory is created private to its user (the database file inside is 0600).
DATA_DIR_MODE = 0o700

# The longest message the store accepts, in characters (of its text, tool-call arguments
# and any other strings in it). Ten million is several times the largest context window
# of any model (about a million tokens); longer content could never be sent whole, and
# refusing it up front keeps one message from exhausting a small host's memory. Change it
# with ConversationStore(max_message_chars=...).
DEFAULT_MAX_MESSAGE_CHARS = 10_000_000

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
    if not path.parent.exists():
        # Private to its user: the history is nobody else's business. An existing
        # directory keeps the permissions its owner gave it.
        path.parent.mkdir(parents=True, exist_ok=True, mode=DATA_DIR_MODE)
    return f"sqlite:///{path}", True


def resolve_base_url(base_url: str | None) -> str:
    """The API's base URL from the argument, else $GILAS_BASE_URL, else the Gilas API.

    It must be an http(s) URL with a host and no user name or password: the API key travels
    as a Bearer token, and credentials in the URL would replace it (HTTP clients turn them
    into Basic auth), so every request would be refused for a missing key. The error shows
    the URL with its credentials masked.
    """
    raw = base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
    url = raw.rstrip("/")
    shown = repr(redact_url(raw)) + ("" if base_url else f" (from ${ENV_BASE_URL})")
    try:
        parts = urlsplit(url)
        has_credentials = parts.username is not None or parts.password is not None
        hostname = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError:
        raise ConfigurationError(f"the base URL {shown} is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not hostname:
        raise ConfigurationError(
            f"the base URL must start with http:// or https:// and name a host, not {shown}; "
            f"set it with base_url=, --base-url or {ENV_BASE_URL}"
        )
    if has_credentials:
        raise ConfigurationError(
            f"the base URL {shown} carries a user name or password: remove them (gilas-conv "
            "sends the API key as a Bearer token, which URL credentials would replace)"
        )
    return url


def resolve_api_key(api_key: str | None) -> str:
    """The API key from the argument, else $GILAS_API_KEY; raise MissingAPIKeyError if neither.

    A key must be printable ASCII (it travels in an HTTP header): a control character (CR,
    LF, ...) or a non-ASCII character raises ConfigurationError naming the kind of character
    and its position, never the key itself, before any request is made or anything stored.
    """
    from_env = api_key is None
    key = os.environ.get(ENV_API_KEY) if from_env else api_key
    if not key or not key.strip():
        raise MissingAPIKeyError()
    key = key.strip()
    for position, char in enumerate(key, start=1):
        if " " <= char <= "~":
            continue
        kind = "a control character" if char < " " or char == "\x7f" else "a non-ASCII character"
        where = f"${ENV_API_KEY}" if from_env else "the API key"
        raise ConfigurationError(
            f"{where} contains {kind} at position {position} of {len(key)}; an API key is "
            "printable ASCII (check for a pasted line break or a stray character)"
        )
    return key


# Query parameters whose values are secrets in database and base URLs.
_SECRET_PARAMETER = re.compile(r"pass|pwd|secret|token|key|auth|sig|credential", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` as it may be shown (in messages, reprs, logs): credentials masked.

    The password of ``scheme://user:password@host`` becomes ``***``; so does a user name
    alone on http(s) URLs (``https://TOKEN@host`` is a common way to pass a token), and the
    value of any query parameter named like a secret (``?password=``, ``?api_key=``). Used
    for every base URL and database URL gilas-conv shows. Never raises.
    """
    if not isinstance(url, str):
        return "<not a URL>"
    scheme_match = _SCHEME.match(url)
    if scheme_match is None:
        return url
    scheme = scheme_match.group(0)
    rest = url[len(scheme) :]
    query_start = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    # The last "@" before the query: an unescaped "@" or "/" inside a password must not leave
    # part of it in view (masking too much is harmless, too little is not).
    at = rest.rfind("@", 0, query_start)
    if at >= 0 and not scheme.lower().startswith("sqlite"):
        userinfo, rest = rest[:at], rest[at:]
        user, has_password, _password = userinfo.partition(":")
        if has_password:
            userinfo = f"{user}:{REDACTED}"
        elif scheme.lower().startswith("http"):
            userinfo = REDACTED
        rest = userinfo + rest
        query_start = rest.find("?", len(userinfo)) if "?" in rest[len(userinfo) :] else len(rest)
    if query_start < len(rest) and rest[query_start] == "?":
        query, hash_sign, fragment = rest[query_start + 1 :].partition("#")
        parts = []
        for item in query.split("&"):
            name, equals, _value = item.partition("=")
            parts.append(f"{name}={REDACTED}" if equals and _SECRET_PARAMETER.search(name) else item)
        rest = rest[:query_start] + "?" + "&".join(parts) + hash_sign + fragment
    return scheme + rest


def check_cli_database_url(url: str) -> None:
    """Refuse a database the CLI cannot keep: an in-memory SQLite database would answer
    and forget everything when the command ends. (The library allows it.)"""
    lowered = url.strip().lower()
    if lowered.startswith("sqlite") and (
        lowered.rstrip("/") in ("sqlite:", "sqlite+pysqlite:")
        or ":memory:" in lowered
        or "mode=memory" in lowered
    ):
        raise ConfigurationError(
            f"{redact_url(url)} is an in-memory database: nothing would be kept after this command "
            "(each gilas-conv command would start empty and keep nothing); use a file "
            "(--db sqlite:///path/to/file.db) or a Postgres URL"
        )
