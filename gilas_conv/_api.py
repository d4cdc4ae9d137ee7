"""The chat-completions wire format: pure functions of data, no I/O.

* :func:`check_params` / :func:`build_request_body`: what is sent. The caller's
  parameters pass through untouched except that ``None`` values are left out (``None``
  means "not given"), ``messages`` and ``stream`` are ours to set, a stream asks for
  ``stream_options: {"include_usage": true}`` so the last chunk carries the usage, and a
  reasoning model (o-series, gpt-5: the model registry knows) gets ``max_tokens`` as
  ``max_completion_tokens``, the only reply limit it accepts.
* :func:`parse_completion`: a non-streamed answer becomes a :class:`Reply`.
* :class:`StreamAccumulator`: the chunks of a streamed answer, assembled into the same
  :class:`Reply` (content by concatenation, tool calls by their ``index``).
* :func:`is_event_stream` / :func:`answer_without_stream`: a streaming request answered
  with JSON instead of events (a completion is the reply, an error object the error).
* :func:`status_error` / :func:`decode_json_body` / :func:`stream_error`: error answers
  become the typed exceptions of :mod:`gilas_conv.exceptions`.

What a :class:`Reply` keeps (and so what is stored)
    Choice 0 is the reply: its content, tool calls and finish reason, with the response's
    id, model and usage. A refusal is kept as a ``{"type": "refusal"}`` content part, the
    form the API accepts back when the history is replayed. With ``n > 1`` the other
    choices are kept whole, as the API sent them (each with its ``index``), in
    ``extra["choices"]``; they are never replayed. ``extra`` also keeps choice 0's
    ``logprobs``, ``annotations`` and ``audio`` and the response's ``system_fingerprint``
    and ``service_tier`` when the API sent them.

Secrets (the API key) are passed in and scrubbed (:func:`redact`) from everything an
error carries: from the raw text in every escaped form it may be echoed in (JSON ``\\/``
and ``\\uXXXX``, URL encoding), and again from every string decoded from it.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from typing import Any

from .exceptions import (
    APIError,
    APIResponseValidationError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from .tokens import ModelRegistry, get_default_registry

__all__ = [
    "DONE",
    "RESERVED_PARAMS",
    "Reply",
    "StreamAccumulator",
    "StreamDelta",
    "answer_without_stream",
    "build_request_body",
    "check_params",
    "decode_json_body",
    "encode_body",
    "error_fields",
    "is_event_stream",
    "is_reasoning_model",
    "loads",
    "output_limit_param",
    "parse_completion",
    "redact",
    "redact_value",
    "status_error",
    "stream_error",
    "stream_error_event",
    "summary_request_body",
]

DONE = "[DONE]"
# Parameters the senders set themselves.
RESERVED_PARAMS = frozenset({"messages", "stream"})
# How much of an unparseable body an error keeps, for a human to look at.
MAX_BODY_EXCERPT = 500
REDACTED = "[REDACTED]"

_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}
_KEPT_RESPONSE_FIELDS = ("system_fingerprint", "service_tier")
_KEPT_MESSAGE_FIELDS = ("annotations", "audio")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]+>")


# ---------------------------------------------------------------------------------------------
# Requests


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters to send: ``None`` values dropped, checked to be plain JSON.

    Raises ValueError for a reserved name or a value JSON cannot carry (NaN, an object), so
    a bad call fails before anything is stored.
    """
    reserved = sorted(RESERVED_PARAMS & set(params))
    if reserved:
        raise ValueError(
            f"{', '.join(reserved)} cannot be passed: the sender builds the messages from the "
            "stored conversation and chooses stream by the method called (send or stream)"
        )
    out = {key: value for key, value in params.items() if value is not None}
    model = out.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ValueError("model must be a non-empty string")
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the request parameters are not plain JSON data: {err}") from err
    return out


def is_reasoning_model(model: str, *, registry: ModelRegistry | None = None) -> bool:
    """Whether ``model`` is a reasoning model (o-series, gpt-5 family) per the registry.

    Unknown models are not (and are not warned about here: the token budget does that).
    """
    info = (registry if registry is not None else get_default_registry()).lookup(model)
    return info is not None and info.reasoning


def output_limit_param(model: str, *, registry: ModelRegistry | None = None) -> str:
    """The name of the reply-length parameter ``model`` accepts.

    ``max_completion_tokens`` for a reasoning model (which refuses ``max_tokens``),
    ``max_tokens`` otherwise: older OpenAI-compatible servers know only that one.
    """
    return "max_completion_tokens" if is_reasoning_model(model, registry=registry) else "max_tokens"


def build_request_body(
    *,
    model: str,
    messages: list[dict[str, Any]],
    params: Mapping[str, Any],
    stream: bool,
    registry: ModelRegistry | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /chat/completions``. ``params`` come from :func:`check_params`.

    For a reasoning model (``ModelInfo.reasoning`` in ``registry``, else the default
    registry) a caller's ``max_tokens`` is sent as ``max_completion_tokens``, the only
    one such a model accepts; when both are given, ``max_completion_tokens`` is kept and
    ``max_tokens`` dropped. For any other model both pass through as the caller gave them.
    """
    body: dict[str, Any] = {"model": model, "messages": messages}
    body.update((key, value) for key, value in params.items() if key != "model")
    if "max_tokens" in body and is_reasoning_model(model, registry=registry):
        limit = body.pop("max_tokens")
        body.setdefault("max_completion_tokens", limit)
    if stream:
        body["stream"] = True
        options = dict(body.get("stream_options") or {})
        options.setdefault("include_usage", True)
        body["stream_options"] = options
    else:
        body.pop("stream_options", None)  # the API rejects it without stream
    return body


SUMMARY_INSTRUCTIONS = (
    "You condense the earlier part of a conversation so that it can continue without it. "
    "Write a concise summary in the conversation's language, keeping names, numbers, decisions, "
    "open questions and anything the user asked to remember. If a previous summary is given, "
    "fold the new messages into it and return one summary. Return only the summary."
)


def _transcript_line(message: Mapping[str, Any]) -> str:
    role = str(message.get("role", "?"))
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(
            str(part.get("text") or part.get("refusal") or f"[{part.get('type')}]")
            for part in content
            if isinstance(part, Mapping)
        )
    text = content if isinstance(content, str) else ""
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        text += f" [calls {function.get('name')}({function.get('arguments', '')})]"
    if role == "tool":
        role = f"tool result for {message.get('tool_call_id')}"
    return f"{role}: {text.strip()}"


def summary_request_body(
    *,
    model: str,
    previous: str | None,
    messages: Iterable[Mapping[str, Any]],
    max_tokens: int,
    registry: ModelRegistry | None = None,
) -> dict[str, Any]:
    """The request that asks the model to fold ``messages`` into the ``previous`` summary.

    ``max_tokens`` bounds the summary; it is sent under the name the model accepts
    (:func:`output_limit_param`).
    """
    transcript = "\n".join(_transcript_line(m) for m in messages)
    prompt = f"Previous summary:\n{previous}\n\n" if previous else ""
    prompt += f"Messages to summarize:\n{transcript}"
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SUMMARY_INSTRUCTIONS},
            {"role": "user", "content": prompt},
        ],
        output_limit_param(model, registry=registry): max_tokens,
    }


def encode_body(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True, slots=True)
class Reply:
    """An assistant reply as it is stored (see the module docstring)."""

    content: Any
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str | None
    response_id: str | None
    model: str | None
    usage: dict[str, Any] | None
    extra: dict[str, Any] | None


def _char_forms(char: str) -> str:
    """A regex matching ``char`` in any form a server or proxy may echo it in."""
    forms = [re.escape(char)]
    code = ord(char)
    if code < 0x10000:
        forms.append(rf"\\u(?i:{code:04x})")  # JSON's \uXXXX, either case
    else:  # JSON escapes it as a surrogate pair
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        forms.append(rf"\\u(?i:{high:04x})\\u(?i:{low:04x})")
    if char == "/":
        forms.append(r"\\/")  # JSON may escape a slash
    forms.append("".join(f"%(?i:{byte:02x})" for byte in char.encode("utf-8")))  # URL-encoded
    if char == " ":
        forms.append(r"\+")  # form-encoded
    return "(?:" + "|".join(forms) + ")"


@lru_cache(maxsize=16)
def _secret_pattern(secret: str) -> re.Pattern[str]:
    return re.compile("".join(_char_forms(char) for char in secret))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``[REDACTED]``.

    A secret is found in any mix of the forms it takes when echoed back: as is,
    JSON-escaped (``\\/``, ``\\u0073`` in either case) and URL-encoded (``%2F``, ``+`` for
    a space), so this is safe to run on a raw body before it is decoded. Run it again on
    every string decoded from one: decoding can produce the secret from escapes.
    """
    for secret in secrets:
        if secret:
            text = _secret_pattern(secret).sub(REDACTED, text)
    return text


def redact_value(value: Any, secrets: Iterable[str]) -> Any:
    """A decoded JSON value with :func:`redact` applied to every string in it, keys too."""
    secrets = tuple(s for s in secrets if s)
    if not secrets:
        return value
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact_value(k, secrets): redact_value(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(item, secrets) for item in value]
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Python's json accepts NaN and Infinity; JSON (and the store) does not. One decoder for
# every call: json.loads with an option builds a new one each time (a streamed reply
# decodes a chunk per token).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def loads(text: str) -> Any:
    return _DECODER.decode(text)


def _looks_like_html(content_type: str, text: str) -> bool:
    if "html" in content_type.lower():
        return True
    head = text.lstrip()[:100].lower()
    return head.startswith(("<!doctype html", "<html", "<head", "<body"))


def _html_summary(text: str) -> str:
    """The page's title (or its first words): what a proxy's error page has to say."""
    found = _TITLE.search(text)
    words = found.group(1) if found else _TAG.sub(" ", text)
    summary = " ".join(html.unescape(words).split())
    return summary[:120] or "no title"


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_BODY_EXCERPT else text[:MAX_BODY_EXCERPT] + "..."


def decode_json_body(
    status: int,
    content_type: str,
    body: bytes,
    *,
    request_id: str | None = None,
    secrets: Iterable[str] = (),
) -> Any:
    """The JSON value of a 2xx body; APIResponseValidationError if it is HTML or not JSON.

    ``secrets`` are scrubbed, in every escaped form, from the raw text and again from the
    decoded value, so an echoed key reaches neither an error nor the store.
    """
    secrets = tuple(secrets)
    text = redact(body.decode("utf-8", errors="replace"), secrets)
    if _looks_like_html(content_type, text):
        raise APIResponseValidationError(
            f"the API answered HTTP {status} with an HTML page ({_html_summary(text)!r}), not JSON; "
            "check the base URL, or a proxy in between may have answered",
            status_code=status,
            body=_excerpt(text),
            request_id=request_id,
        )
    try:
        data = loads(text)
    except ValueError as err:
        raise APIResponseValidationError(
            f"the API answered HTTP {status} with a body that is not JSON: {_excerpt(text)[:100]!r}",
            status_code=status,
            body=_excerpt(text),
            request_id=request_id,
        ) from err
    return redact_value(data, secrets)


def is_event_stream(content_type: str) -> bool:
    """Whether an answer to a streaming request is to be read as server-sent events.

    Only a body declared JSON (``application/json``, ``…+json``) or HTML is not: some
    servers and proxies label an event stream ``text/plain`` or not at all, so anything
    else is streamed as before.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    return not (media.endswith("json") or media.endswith("+json") or "html" in media)


def answer_without_stream(
    status: int,
    content_type: str,
    body: bytes,
    *,
    request_id: str | None = None,
    secrets: Iterable[str] = (),
) -> Reply:
    """The reply in an answer to a streaming request that is not an event stream.

    For a success ``status`` whose ``content_type`` :func:`is_event_stream` rejects: a
    JSON completion is the reply, whole (the server chose not to stream); a JSON error
    object raises APIResponseValidationError carrying the API's message; HTML or other
    non-JSON raises APIResponseValidationError saying what came. An error status raises
    the typed :func:`status_error`. ``secrets`` are scrubbed from every error.
    """
    secrets = tuple(secrets)
    if status >= 400:
        raise status_error(status, content_type, body, request_id=request_id, secrets=secrets)
    data = decode_json_body(status, content_type, body, request_id=request_id, secrets=secrets)
    return parse_completion(data, status=status, request_id=request_id, secrets=secrets)


def _invalid(
    problem: str, data: Any, *, status: int, request_id: str | None, secrets: Iterable[str] = ()
) -> APIResponseValidationError:
    try:
        shown = json.dumps(data, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(data)
    return APIResponseValidationError(
        redact(f"the API's answer is not a valid chat completion: {problem}", secrets),
        status_code=status,
        body=_excerpt(redact(shown, secrets)),
        request_id=request_id,
    )


def _error_in_body(
    data: dict[str, Any], *, status: int, request_id: str | None, secrets: Iterable[str]
) -> APIResponseValidationError:
    """A success status whose body is an error object: the error, with the API's message."""
    message, _type, _code, _param = error_fields(data, secrets=secrets)
    shown = message or redact(json.dumps(data.get("error"), ensure_ascii=False), secrets)
    return APIResponseValidationError(
        f"the API answered HTTP {status} with an error instead of a completion: {shown}",
        status_code=status,
        body=_excerpt(redact(json.dumps(data, ensure_ascii=False), secrets)),
        request_id=request_id,
    )


def _check_tool_calls(calls: Any) -> list[dict[str, Any]] | None:
    """The tool calls as stored; ValueError naming what is wrong."""
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise ValueError("tool_calls is not a list")
    out = []
    for index, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not call["id"]:
            raise ValueError(f"tool_calls[{index}] has no id")
        if call.get("type", "function") == "function":
            function = call.get("function")
            if (
                not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or not function["name"]
                or not isinstance(function.get("arguments"), str)
            ):
                raise ValueError(f"tool_calls[{index}].function needs a name and string arguments")
        out.append(dict(call))
    return out or None


def _stored_content(content: Any, refusal: Any, has_tool_calls: bool) -> Any:
    """Content in the form the store keeps and the API accepts back on replay."""
    if refusal is not None and not isinstance(refusal, str):
        raise ValueError("refusal is not a string")
    if content is not None and not isinstance(content, str):
        raise ValueError("message content is not a string or null")
    if refusal:
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
        parts.append({"type": "refusal", "refusal": refusal})
        return parts
    if content is None and not has_tool_calls:
        return ""  # e.g. finish_reason "content_filter" with nothing said
    return content


def parse_completion(
    data: Any, *, status: int = 200, request_id: str | None = None, secrets: Iterable[str] = ()
) -> Reply:
    """A ``chat.completion`` object as a :class:`Reply`; APIResponseValidationError if it is not one.

    An error object (``{"error": ...}``) sent with a success status raises that error with
    the API's message. ``secrets`` are scrubbed from everything the error carries.
    """
    secrets = tuple(secrets)
    if not isinstance(data, dict):
        raise _invalid(
            "the body is not a JSON object", data, status=status, request_id=request_id, secrets=secrets
        )
    if isinstance(data.get("error"), dict | str):
        raise _error_in_body(data, status=status, request_id=request_id, secrets=secrets)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise _invalid("no choices", data, status=status, request_id=request_id, secrets=secrets)
    ordered = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
    first, others = ordered[0], ordered[1:]
    message = first.get("message")
    if not isinstance(message, dict):
        raise _invalid("choice 0 has no message", data, status=status, request_id=request_id, secrets=secrets)
    response_id, model, usage = data.get("id"), data.get("model"), data.get("usage")
    try:
        if response_id is not None and (not isinstance(response_id, str) or not response_id):
            raise ValueError("id is not a string")
        if model is not None and not isinstance(model, str):
            raise ValueError("model is not a string")
        if usage is not None and not isinstance(usage, dict):
            raise ValueError("usage is not an object")
        finish_reason = first.get("finish_reason")
        if finish_reason is not None and not isinstance(finish_reason, str):
            raise ValueError("finish_reason is not a string")
        tool_calls = _check_tool_calls(message.get("tool_calls"))
        content = _stored_content(message.get("content"), message.get("refusal"), tool_calls is not None)
    except ValueError as err:
        raise _invalid(str(err), data, status=status, request_id=request_id, secrets=secrets) from err
    extra: dict[str, Any] = {}
    for key in _KEPT_RESPONSE_FIELDS:
        if data.get(key) is not None:
            extra[key] = data[key]
    for key in _KEPT_MESSAGE_FIELDS:
        if message.get(key):
            extra[key] = message[key]
    if first.get("logprobs") is not None:
        extra["logprobs"] = first["logprobs"]
    if others:
        extra["choices"] = others
    return Reply(
        content=content,
        tool_calls=tool_calls,
        finish_reason=finish_reason,
        response_id=response_id,
        model=model,
        usage=usage,
        extra=extra or None,
    )


# ---------------------------------------------------------------------------------------------
# Streams


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """What one chunk added to choice 0 (the reply), and the chunk itself."""

    content: str
    refusal: str
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str | None
    usage: dict[str, Any] | None
    raw: dict[str, Any]


@dataclass
class _ChoiceState:
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    @property
    def empty(self) -> bool:
        return not (any(self.content) or any(self.refusal) or self.tool_calls or self.finish_reason)


class StreamAccumulator:
    """Assembles ``chat.completion.chunk`` events into a :class:`Reply`.

    ``finished`` is True once the API said the reply is whole: ``[DONE]`` arrived, or every
    choice seen has its ``finish_reason``. A stream that stops before that was cut off,
    even if the connection closed cleanly.
    """

    def __init__(self, *, request_id: str | None = None, secrets: Iterable[str] = ()) -> None:
        self.request_id = request_id
        self._secrets = tuple(secrets)
        self.response_id: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False
        self._choices: dict[int, _ChoiceState] = {}
        self._response_extra: dict[str, Any] = {}

    @property
    def finished(self) -> bool:
        if self.done:
            return True
        return bool(self._choices) and all(c.finish_reason for c in self._choices.values())

    @property
    def empty(self) -> bool:
        """True while nothing of a reply has arrived (role-only chunks do not count)."""
        return all(c.empty for c in self._choices.values())

    def _invalid(self, problem: str, data: Any) -> APIResponseValidationError:
        """What is wrong with a part of this stream (its 200 answer), as the error to raise."""
        return _invalid(problem, data, status=200, request_id=self.request_id, secrets=self._secrets)

    def add(self, data: str) -> StreamDelta | None:
        """Take one event's data; None for ``[DONE]``.

        Raises APIResponseValidationError for a chunk that is not a completion chunk, and
        APIError when the API reports an error in the middle of the stream.
        """
        if data.strip() == DONE:
            self.done = True
            return None
        try:
            chunk = loads(data)
        except ValueError as err:
            shown = _excerpt(redact(data, self._secrets))
            raise APIResponseValidationError(
                f"a streamed chunk is not JSON: {shown[:100]!r}",
                status_code=200,
                body=shown,
                request_id=self.request_id,
            ) from err
        if not isinstance(chunk, dict):
            raise self._invalid("a streamed chunk is not an object", chunk)
        error = chunk.get("error")
        if error is not None:
            raise stream_error({"error": error}, data, request_id=self.request_id, secrets=self._secrets)
        choices = chunk.get("choices", [])
        if not isinstance(choices, list):
            raise self._invalid("a streamed chunk has no choices list", chunk)
        if self.response_id is None and isinstance(chunk.get("id"), str) and chunk["id"]:
            self.response_id = chunk["id"]
        # Azure opens with a prompt_filter_results chunk whose model is "": the served
        # model is the first non-empty one.
        if not self.model and isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        for key in _KEPT_RESPONSE_FIELDS:
            if chunk.get(key) is not None:
                self._response_extra[key] = chunk[key]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        reply_delta = StreamDelta("", "", None, None, usage if isinstance(usage, dict) else None, chunk)
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise self._invalid("a streamed choice is not an object", chunk)
            index = choice.get("index", position)
            if not isinstance(index, int):
                index = position
            state = self._choices.setdefault(index, _ChoiceState())
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise self._invalid("a streamed delta is not an object", chunk)
            content = delta.get("content")
            if isinstance(content, str):
                state.content.append(content)
            refusal = delta.get("refusal")
            if isinstance(refusal, str):
                state.refusal.append(refusal)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                self._add_tool_calls(state, calls)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish:
                state.finish_reason = finish
            if index == 0:
                reply_delta = StreamDelta(
                    content=content if isinstance(content, str) else "",
                    refusal=refusal if isinstance(refusal, str) else "",
                    tool_calls=[dict(c) for c in calls if isinstance(c, dict)]
                    if isinstance(calls, list)
                    else None,
                    finish_reason=finish if isinstance(finish, str) and finish else None,
                    usage=reply_delta.usage,
                    raw=chunk,
                )
        return reply_delta

    @staticmethod
    def _add_tool_calls(state: _ChoiceState, calls: list[Any]) -> None:
        for position, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            index = call.get("index", position)
            slot = state.tool_calls.setdefault(
                index if isinstance(index, int) else position,
                {"id": "", "type": "function", "name": "", "arguments": ""},
            )
            # OpenAI sends a call's id, type and name once, in its first delta, and then only
            # pieces of the arguments. Some servers (LiteLLM) restate id, type and name in
            # every delta: the id and type are kept once, and a name is added only when it is
            # new text (a name split across deltas), never when its delta restates the id or
            # repeats the whole name so far, so "search" stays "search", not "searchsearch".
            call_id = call.get("id")
            restated = isinstance(call_id, str) and bool(call_id) and bool(slot["id"])
            if isinstance(call_id, str) and call_id and not slot["id"]:
                slot["id"] = call_id
            if isinstance(call.get("type"), str) and call["type"]:
                slot["type"] = call["type"]
            function = call.get("function")
            if isinstance(function, dict):
                name = function.get("name")
                if isinstance(name, str) and name and not restated and name != slot["name"]:
                    slot["name"] += name
                if isinstance(function.get("arguments"), str):
                    slot["arguments"] += function["arguments"]

    @staticmethod
    def _assembled(state: _ChoiceState) -> list[dict[str, Any]]:
        return [
            {
                "id": slot["id"],
                "type": slot["type"],
                "function": {"name": slot["name"], "arguments": slot["arguments"]},
            }
            for _, slot in sorted(state.tool_calls.items())
        ]

    def _message(self, state: _ChoiceState) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(state.content) or None,
        }
        if state.refusal:
            message["refusal"] = "".join(state.refusal)
        if state.tool_calls:
            message["tool_calls"] = self._assembled(state)
        return message

    def reply(self, *, complete: bool) -> Reply:
        """What arrived, as a Reply. An incomplete one keeps only tool calls that have an id
        and a name (the rest go to ``extra["partial_tool_calls"]``)."""
        indexes = sorted(self._choices) or [0]
        state = self._choices.get(indexes[0], _ChoiceState())
        message = self._message(state)
        extra: dict[str, Any] = dict(self._response_extra)
        calls = message.get("tool_calls")
        if calls and not complete:
            whole = [c for c in calls if c["id"] and c["function"]["name"]]
            if len(whole) < len(calls):
                extra["partial_tool_calls"] = [c for c in calls if c not in whole]
            calls = whole
        try:
            tool_calls = _check_tool_calls(calls or None)
            content = _stored_content(
                message["content"] or None, message.get("refusal"), tool_calls is not None
            )
        except ValueError as err:
            raise self._invalid(str(err), message) from err
        others = [
            {
                "index": index,
                "message": self._message(self._choices[index]),
                "finish_reason": self._choices[index].finish_reason,
            }
            for index in indexes[1:]
        ]
        if others:
            extra["choices"] = others
        return Reply(
            content=content,
            tool_calls=tool_calls,
            finish_reason=state.finish_reason,
            response_id=self.response_id,
            model=self.model,
            usage=self.usage,
            extra=extra or None,
        )


# ---------------------------------------------------------------------------------------------
# Errors


def error_fields(
    data: Any, *, secrets: Iterable[str] = ()
) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, code, param) from the usual error shapes, ``secrets`` scrubbed."""
    if not isinstance(data, dict):
        return None, None, None, None
    error = data.get("error", data)
    if isinstance(error, str):
        return redact(error, secrets), None, None, None
    if not isinstance(error, dict):
        return None, None, None, None
    message = error.get("message") or error.get("detail") or data.get("message") or data.get("detail")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message, ensure_ascii=False)

    def text(value: Any) -> str | None:
        return None if value is None else redact(str(value), secrets)

    return text(message), text(error.get("type")), text(error.get("code")), text(error.get("param"))


def stream_error(
    data: Any, raw: str, *, request_id: str | None = None, secrets: Iterable[str] = ()
) -> APIError:
    """The error for an error reported in the middle of a stream: a chunk carrying
    ``error``, or an ``event: error`` frame. ``data`` is the frame's decoded JSON (None if
    it was not JSON) and ``raw`` its text, shown when no message can be found in it.
    ``secrets`` are scrubbed, before and after decoding."""
    message, _type, _code, _param = error_fields(data, secrets=secrets)
    if not message and isinstance(data, dict) and data.get("error") is not None:
        message = json.dumps(data["error"], ensure_ascii=False)
    shown = message or _excerpt(raw)
    return APIError(
        redact(f"the API reported an error in the middle of the stream: {shown}", secrets),
        request_id=request_id,
    )


def stream_error_event(data: str, *, request_id: str | None = None, secrets: Iterable[str] = ()) -> APIError:
    """The error for a named ``event: error`` SSE frame whose data is ``data``."""
    try:
        decoded = loads(data)
    except ValueError:
        decoded = None
    return stream_error(decoded, data, request_id=request_id, secrets=secrets)


def status_error(
    status: int,
    content_type: str,
    body: bytes,
    *,
    request_id: str | None = None,
    secrets: Iterable[str] = (),
) -> APIStatusError:
    """The typed exception for an error answer (status >= 400).

    ``secrets`` (the API key) are scrubbed from the raw text, in every escaped form, and
    again from every string decoded from it: the message, type, code, param and body.
    """
    secrets = tuple(secrets)
    text = redact(body.decode("utf-8", errors="replace"), secrets)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "error"
    parsed: Any = None
    error_type = code = param = None
    if _looks_like_html(content_type, text):
        message = (
            f"{reason}: the body was an HTML page ({_html_summary(text)!r}), not JSON; "
            "a proxy or gateway in front of the API probably answered"
        )
    elif not text.strip():
        message = f"{reason} (empty body)"
    else:
        try:
            parsed = loads(text)
        except ValueError:
            message = f"{reason}: {_excerpt(text)[:200]}"
        else:
            parsed = redact_value(parsed, secrets)
            found, error_type, code, param = error_fields(parsed, secrets=secrets)
            message = found or f"{reason}: {_excerpt(text)[:200]}"
    cls = _STATUS_ERRORS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return cls(
        message,
        status_code=status,
        request_id=request_id,
        error_type=error_type,
        code=code,
        param=param,
        body=parsed if parsed is not None else (_excerpt(text) or None),
    )
