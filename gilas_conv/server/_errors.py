"""Errors as OpenAI's envelope, ``{"error": {"message", "type", "param", "code"}}``.

One function, :func:`error_for`, decides the status and envelope of every exception a
request can raise; nothing else writes an error body. Library errors carry messages meant
for users (the upstream key is already scrubbed from them); anything unexpected becomes a
500 saying only that, and is logged with its traceback on the server.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

from .. import exceptions as exc
from ._history import HistoryDiverged

__all__ = ["GatewayError", "error_body", "error_for"]

logger = logging.getLogger("gilas_conv.server")


class GatewayError(Exception):
    """A request the gateway refuses: its status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _busy_class() -> type[BaseException] | None:
    return getattr(exc, "ConversationBusy", None)


def error_for(err: BaseException) -> GatewayError:
    """The gateway's answer to ``err``."""
    if isinstance(err, GatewayError):
        return err
    busy = _busy_class()
    if busy is not None and isinstance(err, busy):
        return GatewayError(
            409,
            "another request is answering this conversation right now; retry when it has finished",
            code="conversation_busy",
            param="conversation",
            headers={"Retry-After": "1"},
        )
    if isinstance(err, exc.QuotaExceeded):
        # OpenAI's answer to an account out of quota: 429 with type and code
        # "insufficient_quota", which its SDKs raise as RateLimitError. Retry-After: when the
        # period resets.
        wait = max(1, math.ceil((err.resets_at - dt.datetime.now(dt.timezone.utc)).total_seconds()))
        return GatewayError(
            429,
            str(err),
            type="insufficient_quota",
            code="insufficient_quota",
            headers={"Retry-After": str(wait)},
        )
    if isinstance(err, exc.ConversationNotFound):
        return GatewayError(404, "no such conversation", code="conversation_not_found", param="conversation")
    if isinstance(err, exc.MessageNotFound):
        return GatewayError(404, "no such item in this conversation", code="item_not_found", param="item_id")
    if isinstance(err, HistoryDiverged):
        return GatewayError(409, str(err), code="conversation_diverged", param="messages")
    if isinstance(err, exc.ContextWindowExceeded):
        return GatewayError(400, str(err), code="context_length_exceeded", param="messages")
    if isinstance(err, exc.APIStatusError):
        headers = {}
        retry_after = getattr(err, "retry_after", None)
        if retry_after:
            headers["Retry-After"] = retry_after
        return GatewayError(
            err.status_code,
            f"upstream: {err.message}",
            type=err.error_type or ("server_error" if err.status_code >= 500 else "invalid_request_error"),
            code=err.code,
            param=err.param,
            headers=headers,
        )
    if isinstance(err, exc.APITimeoutError):
        return GatewayError(504, f"upstream: {err.message}", type="server_error", code="upstream_timeout")
    if isinstance(err, exc.APIError):  # connection errors, invalid completions, mid-stream errors
        return GatewayError(502, f"upstream: {err.message}", type="server_error", code="upstream_error")
    if isinstance(err, exc.StreamInterrupted):
        return GatewayError(502, str(err), type="server_error", code="upstream_error")
    if isinstance(err, exc.SchemaOutOfDate):
        logger.error("%s", err)
        return GatewayError(503, "the gateway's database is not ready", type="server_error", code="not_ready")
    if isinstance(err, exc.StoreError):
        logger.error("store error: %s", err)
        return GatewayError(503, "the gateway's database failed; try again", type="server_error")
    if isinstance(err, ValueError):
        return GatewayError(400, str(err))
    logger.error("unexpected error", exc_info=err)
    return GatewayError(500, "the gateway failed unexpectedly", type="server_error")
