"""The public surface is pinned: a name added to or dropped from gilas_conv.__all__ (or a
module's __all__) must be a decision, made here, not an accident."""

from __future__ import annotations

import importlib

import pytest

import gilas_conv

EXPECTED_TOP_LEVEL = {
    "APIConnectionError", "APIError", "APIResponseValidationError", "APIStatusError",
    "APITimeoutError", "AsyncReplyStream", "AsyncSender", "AuthenticationError",
    "BadRequestError", "ConfigurationError", "ConflictError", "Context",
    "ContextWindowExceeded", "Conversation", "ConversationBusy", "ConversationNotFound", "ConversationStore",
    "GilasConvError", "InternalServerError", "Message", "MessageNotFound",
    "MissingAPIKeyError", "ModelInfo", "ModelRegistry", "NotFoundError",
    "PermissionDeniedError", "Prices", "QuotaExceeded", "RateLimitError", "ReplyStream",
    "SchemaOutOfDate", "Sender",
    "StoreError", "StoreIntegrityError", "StreamChunk", "StreamInterrupted", "Summary",
    "SummaryRequest", "UnprocessableEntityError", "__version__", "build_context",
    "conversation_tokens", "count_tokens", "downgrade_database", "get_model_info",
    "head_revision", "load_prices", "upgrade_database",
}  # fmt: skip

# Names the issues mark as part of the contract.
CONTRACT = {
    "ConversationStore", "ConversationNotFound", "Sender", "AsyncSender", "count_tokens",
    "build_context", "ContextWindowExceeded", "AuthenticationError", "PermissionDeniedError",
    "NotFoundError", "BadRequestError", "RateLimitError", "APIStatusError",
    "APIConnectionError", "APITimeoutError", "QuotaExceeded",
}  # fmt: skip


def test_top_level_all_is_pinned() -> None:
    assert set(gilas_conv.__all__) == EXPECTED_TOP_LEVEL
    assert len(gilas_conv.__all__) == len(set(gilas_conv.__all__))


def test_contract_names_are_exported() -> None:
    assert set(gilas_conv.__all__) >= CONTRACT


@pytest.mark.parametrize("name", sorted(EXPECTED_TOP_LEVEL))
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(gilas_conv, name) is not None


@pytest.mark.parametrize("module", ["store", "truncation", "sender", "tokens", "cli", "exceptions"])
def test_named_modules_declare_their_exports(module: str) -> None:
    mod = importlib.import_module(f"gilas_conv.{module}")
    exported = mod.__all__
    assert exported, f"gilas_conv.{module}.__all__ is empty"
    for name in exported:
        assert hasattr(mod, name), f"gilas_conv.{module}.__all__ names missing {name!r}"
        assert not name.startswith("_") or name == "__version__"


def test_every_error_derives_from_the_root() -> None:
    from gilas_conv import exceptions

    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), gilas_conv.GilasConvError), name


def test_status_errors_are_api_errors() -> None:
    for cls in (
        gilas_conv.AuthenticationError,
        gilas_conv.PermissionDeniedError,
        gilas_conv.NotFoundError,
        gilas_conv.BadRequestError,
        gilas_conv.RateLimitError,
    ):
        assert issubclass(cls, gilas_conv.APIStatusError)
    assert issubclass(gilas_conv.APITimeoutError, gilas_conv.APIConnectionError)
    assert issubclass(gilas_conv.ConversationNotFound, KeyError)
