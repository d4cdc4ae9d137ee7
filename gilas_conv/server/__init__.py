"""``gilas-conv serve``: a stateful OpenAI-compatible gateway in front of the upstream API.

Any OpenAI SDK pointed at it gets persistent, token-budgeted conversations: name a
conversation (``extra_body={"conversation": id}``), send only the new message, and the
gateway replays the stored history trimmed to the model's window, calls the upstream,
streams the reply back and stores it. ``/v1/conversations`` follows OpenAI's Conversations
API. The app needs the ``server`` extra (``pip install 'gilas-conv[server]'``); importing
this package does not, so ``gilas-conv keys`` works without it.

Layout
    ``_app``      :func:`create_app`: the endpoints, tenancy (keys to owners), streaming
    ``_history``  which messages of a request are new (pure)
    ``_wire``     stored values as OpenAI objects and back (pure)
    ``_errors``   every error as OpenAI's error envelope
    ``_cli``      ``gilas-conv serve`` and ``gilas-conv keys``
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONVERSATION_HEADER", "DEFAULT_MAX_BODY_BYTES", "INSTALL_HINT", "create_app"]

INSTALL_HINT = "the gateway needs the server extra: pip install 'gilas-conv[server]'"


def __getattr__(name: str) -> Any:
    # The app is imported on first use, so a plain install can import this package.
    if name in ("CONVERSATION_HEADER", "DEFAULT_MAX_BODY_BYTES", "create_app"):
        try:
            from . import _app
        except ModuleNotFoundError as err:
            if err.name in ("starlette", "uvicorn", "anyio"):
                raise ModuleNotFoundError(INSTALL_HINT, name=err.name) from err
            raise
        return getattr(_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
