"""The chat-completions wire format: pure functions of data, no I/O.

* :func:`check_params` / :func:`build_request_body`: what is sent. The caller's
  parameters pass through untouched except that ``None`` values are left out (``None``
  means "not given"), ``messages`` and ``stream`` are ours to set, and a stream asks for
  ``stream_options: {"include_usage": true}`` so the last chunk carries the usage.
* :func:`parse_completion`: a non-streamed answer becomes a :class:`Reply`.
* :class:`StreamAccumulator`: the chunks of a streamed answer, assembled into the same
  :class:`Reply` (content by concatenation, tool calls by their ``index``).
* :func:`status_error` / :func:`decode_json_body`: error answers become the typed
  exceptions of :mod:`gilas_conv.exceptions`.

What a :class:`Reply` keeps (and so what is stored)
    Choice 0 is the reply: its content, tool calls and finish reason, with the response's
    id, model and usage. A refusal is kept as a ``{"type": "refusal"}`` content part, the
    form the API accepts back when the history is replayed. With ``n > 1`` the other
    choices are kept whole, as the API sent them (each with its ``index``), in
    ``extra["choices"]``; they are never replayed. ``extra`` also keeps choice 0's
    ``logprobs``, ``annotations`` and ``audio`` and the response's ``system_fingerprint``
    and ``service_tier`` when the API sent them.

Secrets (the API key) are passed in and scrubbed from everything an error carries.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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

__all__ = [
    "DONE",
    "RESERVED_PARAMS",
    "Reply",
    "StreamAccumulator",
    "StreamDelta",
    "build_request_body",
    "check_params",
    "decode_json_body",
    "encode_body",
    "error_fields",
    "loads",
    "parse_completion",
    "redact",
    "status_error",
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


def build_request_body(
    *, model: str, messages: list[dict[str, Any]], params: Mapping[str, Any], stream: bool
) -> dict[str, Any]:
    """The JSON body of ``POST /chat/completions``. ``params`` come from :func:`check_params`."""
    body: dict[str, Any] = {"model": model, "messages": messages}
    body.update((key, value) for key, value in params.items() if key != "model")
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
    *, model: str, previous: str | None, messages: Iterable[Mapping[str, Any]], max_tokens: int
) -> dict[str, Any]:
    """The request that asks the model to fold ``messages`` into the ``previous`` summary."""
    transcript = "\n".join(_transcript_line(m) for m in messages)
    prompt = f"Previous summary:\n{previous}\n\n" if previous else ""
    prompt += f"Messages to summarize:\n{transcript}"
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SUMMARY_INSTRUCTIONS},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": max_tokens,
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


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and the store) does not.
    return json.loads(text, parse_constant=_reject_constant)


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
    """The JSON value of a 2xx body; APIResponseValidationError if it is HTML or not JSON."""
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
        return loads(text)
    except ValueError as err:
        raise APIResponseValidationError(
            f"the API answered HTTP {status} with a body that is not JSON: {_excerpt(text)[:100]!r}",
            status_code=status,
            body=_excerpt(text),
            request_id=request_id,
        ) from err


def _invalid(problem: str, data: Any, *, status: int, request_id: str | None) -> APIResponseValidationError:
    try:
        shown = json.dumps(data, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(data)
    return APIResponseValidationError(
        f"the API's answer is not a valid chat completion: {problem}",
        status_code=status,
        body=_excerpt(shown),
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


def parse_completion(data: Any, *, status: int = 200, request_id: str | None = None) -> Reply:
    """A ``chat.completion`` object as a :class:`Reply`; APIResponseValidationError if it is not one."""
    if not isinstance(data, dict):
        raise _invalid("the body is not a JSON object", data, status=status, request_id=request_id)
    if isinstance(data.get("error"), dict | str):
        raise _invalid("it is an error object", data, status=status, request_id=request_id)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise _invalid("no choices", data, status=status, request_id=request_id)
    ordered = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
    first, others = ordered[0], ordered[1:]
    message = first.get("message")
    if not isinstance(message, dict):
        raise _invalid("choice 0 has no message", data, status=status, request_id=request_id)
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
        raise _invalid(str(err), data, status=status, request_id=request_id) from err
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
            raise _invalid("a streamed chunk is not an object", chunk, status=200, request_id=self.request_id)
        error = chunk.get("error")
        if error is not None:
            message, _type, _code, _param = error_fields({"error": error})
            raise APIError(
                redact(
                    f"the API reported an error in the middle of the stream: {message or error}",
                    self._secrets,
                ),
                request_id=self.request_id,
            )
        choices = chunk.get("choices", [])
        if not isinstance(choices, list):
            raise _invalid(
                "a streamed chunk has no choices list", chunk, status=200, request_id=self.request_id
            )
        if self.response_id is None and isinstance(chunk.get("id"), str) and chunk["id"]:
            self.response_id = chunk["id"]
        if self.model is None and isinstance(chunk.get("model"), str):
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
                raise _invalid(
                    "a streamed choice is not an object", chunk, status=200, request_id=self.request_id
                )
            index = choice.get("index", position)
            if not isinstance(index, int):
                index = position
            state = self._choices.setdefault(index, _ChoiceState())
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise _invalid(
                    "a streamed delta is not an object", chunk, status=200, request_id=self.request_id
                )
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
            # Ids arrive once; some servers repeat them in every delta, so the first one wins.
            if isinstance(call.get("id"), str) and call["id"] and not slot["id"]:
                slot["id"] = call["id"]
            if isinstance(call.get("type"), str) and call["type"]:
                slot["type"] = call["type"]
            function = call.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    slot["name"] += function["name"]
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
            raise _invalid(str(err), message, status=200, request_id=self.request_id) from err
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


def error_fields(data: Any) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, code, param) from the usual error shapes."""
    if not isinstance(data, dict):
        return None, None, None, None
    error = data.get("error", data)
    if isinstance(error, str):
        return error, None, None, None
    if not isinstance(error, dict):
        return None, None, None, None
    message = error.get("message") or error.get("detail") or data.get("message") or data.get("detail")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message, ensure_ascii=False)

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return message, text(error.get("type")), text(error.get("code")), text(error.get("param"))


def status_error(
    status: int,
    content_type: str,
    body: bytes,
    *,
    request_id: str | None = None,
    secrets: Iterable[str] = (),
) -> APIStatusError:
    """The typed exception for an error answer (status >= 400). The API key is scrubbed."""
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
            found, error_type, code, param = error_fields(parsed)
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
