"""``gilas-conv serve`` and ``gilas-conv keys``: run the gateway, manage its client keys.

Registered on the main command group by the CLI (``main.add_command``). They take the
global ``--db`` and ``--base-url`` like every other command; the upstream key comes from
``$GILAS_API_KEY`` only. ``keys`` works without the server extra; ``serve`` says how to
install it when it is missing.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import sys
from typing import Any

import click

from .._config import ENV_BASE_URL, ENV_DATABASE_URL, redact_url, resolve_api_key, resolve_base_url
from ..store import APIKeys, ConversationStore

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "keys", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# Seconds streams in flight get to finish after SIGTERM; then they are cut, and what
# arrived is stored as incomplete.
DEFAULT_GRACEFUL_SECONDS = 30
# Tells the worker processes of `serve --workers N` to run without keys (set by serve only).
_ENV_NO_AUTH = "GILAS_CONV_SERVE_NO_AUTH"


def _settings() -> Any:
    return click.get_current_context().find_root().obj


def _store() -> ConversationStore:
    settings = _settings()
    if settings is not None and hasattr(settings, "store"):
        return settings.store()
    store = ConversationStore()
    click.get_current_context().call_on_close(store.close)
    return store


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _settle_heap() -> None:
    """Leave what the process holds once the app is built (modules, the store, caches: about
    a hundred thousand objects) out of the garbage collector's full passes: each would
    otherwise walk all of it, some 40 ms with every stream waiting, to find nothing to free."""
    gc.collect()
    gc.freeze()


def app_factory() -> Any:
    """The app of one worker process of ``serve --workers N`` (configured by environment)."""
    from . import create_app

    app = create_app(auth=os.environ.get(_ENV_NO_AUTH) != "1")
    _settle_heap()
    return app


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535), help="Port.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes (on SQLite, one host; on Postgres, any number of hosts may run serve).",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve without client keys, as the conversations with no owner (loopback hosts only).",
)
@click.option(
    "--graceful-timeout",
    default=DEFAULT_GRACEFUL_SECONDS,
    show_default=True,
    type=click.IntRange(min=0),
    metavar="SECONDS",
    help="On SIGTERM, how long streams in flight may finish before they are cut (and stored as incomplete).",
)
def serve(host: str, port: int, workers: int, no_auth: bool, graceful_timeout: int) -> None:
    """Run the OpenAI-compatible gateway: persistent conversations for any OpenAI client.

    Clients call POST /v1/chat/completions with `conversation` in the body (the OpenAI
    SDKs: extra_body={"conversation": ID}) and a key from `gilas-conv keys create` as their
    API key. The upstream key is read from GILAS_API_KEY.
    """
    from . import INSTALL_HINT

    try:
        import uvicorn
    except ModuleNotFoundError as err:
        raise click.ClickException(INSTALL_HINT) from err
    if no_auth and not _is_loopback(host):
        raise click.UsageError(
            f"--no-auth serves every conversation without a key: only on a loopback address, not {host!r}"
        )
    settings = _settings()
    db = getattr(settings, "db", None)
    base_url = getattr(settings, "base_url", None)
    resolve_api_key(None)  # MissingAPIKeyError now, not in every worker
    store = ConversationStore(db)  # creates or upgrades a SQLite file; a stale schema fails here
    database = store.url
    auth = "client keys required" if not no_auth else "no auth"
    where = f"http://{host}:{port}/v1"
    click.echo(
        f"gilas-conv gateway listening on {where} ({workers} worker{'s' if workers != 1 else ''}, "
        f"{auth}, database {database}, upstream {redact_url(resolve_base_url(base_url))})",
        err=True,
    )
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "timeout_graceful_shutdown": graceful_timeout,
        "log_level": "info",
        "access_log": False,
        "proxy_headers": False,
    }
    if workers == 1:
        from . import create_app

        app = create_app(store=store, base_url=base_url, auth=not no_auth)
        _settle_heap()
        try:
            uvicorn.run(app, **common)
        finally:
            store.close()
        return
    store.close()
    # Each worker builds its own app from the environment (create_app reads it there).
    if db:
        os.environ[ENV_DATABASE_URL] = db
    if base_url:
        os.environ[ENV_BASE_URL] = base_url
    os.environ[_ENV_NO_AUTH] = "1" if no_auth else "0"
    uvicorn.run("gilas_conv.server._cli:app_factory", factory=True, workers=workers, **common)


@click.group()
def keys() -> None:
    """Manage the gateway's client keys (one owner per key; only a hash is stored)."""


@keys.command("create")
@click.option("--owner", required=True, metavar="NAME", help="Whose conversations the key reaches.")
def keys_create(owner: str) -> None:
    """Create a key for OWNER and print it alone on stdout (it is shown only this once).

    KEY=$(gilas-conv keys create --owner alice)
    """
    key, record = APIKeys(_store()).create(owner=owner)
    click.echo(key)
    if sys.stderr.isatty():
        click.echo(f"Key {record.id} for owner {owner!r}: store it now, it is not shown again.", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def keys_list(as_json: bool) -> None:
    """List the keys: id, owner, prefix, created, revoked (never the keys themselves)."""
    found = APIKeys(_store()).list()
    if as_json:
        click.echo(json.dumps([k.to_json() for k in found], ensure_ascii=False))
        return
    if not found:
        click.echo("No keys yet: `gilas-conv keys create --owner NAME` makes one.", err=True)
        return
    for key in found:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        click.echo(f"{key.id}  {key.prefix}…  {key.owner}  created {key.created_at:%Y-%m-%d %H:%M}  {state}")


@keys.command("revoke")
@click.argument("key_or_id", metavar="KEY_OR_ID")
def keys_revoke(key_or_id: str) -> None:
    """Revoke a key (give the key itself or its id); it stops working within seconds."""
    record = APIKeys(_store()).revoke(key_or_id)
    click.echo(f"revoked {record.id} (owner {record.owner!r})", err=True)
