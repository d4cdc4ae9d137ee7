"""An OpenAI-compatible chat-completions server for tests: real HTTP, scripted faults.

Standard library only, so it runs anywhere the tests run::

    python tests/stub_server.py --port 8765 [--api-key sk-test] [--script faults.json]

prints ``stub server listening on http://127.0.0.1:8765/v1`` (flushed) once it accepts
connections; ``--port 0`` picks a free port. In-process (tests)::

    with StubServer(api_key="sk-test") as server:      # 127.0.0.1, a free port, a thread
        sender = Sender(store, api_key="sk-test", base_url=server.base_url)
        server.script({"status": 429, "headers": {"Retry-After": "1"}}, {"reply": "Paris"})
        ...
        server.requests                                 # what it received, in order

What it answers
    ``POST <anything>/chat/completions``. Without a script the reply is ``"echo: "`` plus
    the text of the last user message (``n`` choices; choice i > 0 gets `` [i]``
    appended), as a ``chat.completion`` object, or as ``chat.completion.chunk`` events
    (one per word, then a finish chunk, a usage chunk when ``stream_options.include_usage``
    is set, and ``data: [DONE]``) when ``"stream": true``. Response ids are unique per
    server; every answer carries an ``x-request-id``. A wrong key (when ``api_key`` is set)
    or no ``Authorization`` header gets a 401 whose message echoes the key it was given
    (so tests can check that clients scrub it). Usage figures are rough (not tiktoken).

Scripted actions (``script(...)``, ``--script FILE`` or ``POST /_stub/script`` with a JSON
list); each one answers one request, in order, then the default behaviour resumes:

    {"status": 429, "headers": {"Retry-After": "1"}}   an error status with an OpenAI-style
        JSON error body; "error": {...} replaces the body's error object, "body" (a string,
        sent as is, or JSON) and "content_type" replace the whole body
    {"html": true}                       an HTML error page (status 502 unless given)
    {"drop": true}                       close the connection without answering
    {"delay": 2.0}                       wait before answering (combine with anything)
    {"hold": true}                       wait until ``release()`` (or ``POST /_stub/release``;
                                         at most HOLD_LIMIT_S), then answer: a request kept
                                         in flight for exactly as long as a test needs
    {"reply": "text"}                    the reply text
    {"tool_calls": [{"name": "f", "arguments": "{}", "id": "call_1"}]}   a tool-call reply
    {"finish_reason": "length"}, {"response_id": "chatcmpl-x"}, {"usage": {...} | null}
    streams only:
    {"cut_after": 2}                     2 content chunks, then the connection is aborted
    {"end_after": 2}                     2 content chunks, then a clean end without a
                                         finish_reason or [DONE]
    {"no_done": true}                    everything but the final [DONE]
    {"error_event_after": 1}             1 content chunk, then data: {"error": {...}}
        with "error_event": {...} (JSON) or "..." (sent as is) as that frame's data, and
        "event_name": "error" to send it as a named ``event: error`` frame
    {"chunk_delay": 0.5}                 wait before each content chunk
    {"stall_after": 1, "stall": 2.0}     1 content chunk, then a 2 s silence, then the rest
    {"line_ending": "\\r\\n"}            the SSE line ending ("\\n" by default)
    {"ensure_ascii": false}              chunks' JSON with non-ASCII text as UTF-8, not \\u escapes
    {"endless": "keepalive", "every": 0.1}   after 1 content chunk ("endless_after"), send
                                         forever (until the client leaves or the server
                                         closes) a ": keep-alive" comment every 0.1 s;
                                         "empty": an empty delta chunk; "content": a "."

``GET <anything>/models`` lists :data:`STUB_MODELS`.

Control endpoints: ``POST /_stub/script``, ``POST /_stub/reset`` (clears the script and the
recorded requests), ``POST /_stub/release`` (ends every hold), ``GET /_stub/requests`` (the
recorded requests as JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["StubServer"]

DEFAULT_HOST = "127.0.0.1"
# The longest a held request waits for release(): a test that forgets it still ends.
HOLD_LIMIT_S = 30.0
HTML_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
# What ``GET <anything>/models`` lists.
STUB_MODELS = ("gpt-4o-mini", "stub-model")
_WORDS = re.compile(r"\S+\s*|\s+")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _rough_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(4 + len(_text_of(m.get("content")) if isinstance(m, dict) else "") // 4 for m in messages) + 3


class StubServer:
    """The server on a thread. ``base_url`` ends in ``/v1``; ``requests`` records each
    request as ``{"method", "path", "headers" (lower-case names), "body", "client_port"}``."""

    def __init__(self, *, host: str = DEFAULT_HOST, port: int = 0, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self._actions: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self._closing = threading.Event()
        self._released = threading.Event()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.stub = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}/v1"

    def start(self) -> StubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="stub-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._released.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def script(self, *actions: dict[str, Any]) -> None:
        """Queue actions; each answers one request, in order."""
        with self._lock:
            self._actions.extend(dict(a) for a in actions)

    def reset(self) -> None:
        with self._lock:
            self._actions.clear()
            self.requests.clear()
            self._released.clear()

    def release(self) -> None:
        """Let every held request (``{"hold": true}``) answer, now and until ``reset()``."""
        self._released.set()

    @property
    def pending_actions(self) -> int:
        with self._lock:
            return len(self._actions)

    # -- used by the handler ----------------------------------------------------------------------

    def _next_action(self) -> dict[str, Any]:
        with self._lock:
            return self._actions.popleft() if self._actions else {}

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{self._prefix}-{next(self._ids)}"

    def _sleep(self, seconds: float) -> None:
        self._closing.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # many clients connect at once in the concurrency tests
    stub: StubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked bodies for streams
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # -- plumbing --------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", self.server.stub._new_id("req"))
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", headers)

    def _abort(self) -> None:
        """Close the socket at once: the client sees the connection drop."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            # SO_LINGER 0: a reset, not a tidy FIN, like a crashed proxy.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client gave up (a timeout test); nothing to do

    # -- routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        if self.path == "/_stub/requests":
            with self.server.stub._lock:
                data = list(self.server.stub.requests)
            self._send_json(200, data)
        elif self.path.endswith("/models"):
            models = [{"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in STUB_MODELS]
            self._send_json(200, {"object": "list", "data": models})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        raw = self._read_body()
        stub = self.server.stub
        if self.path == "/_stub/script":
            actions = json.loads(raw or b"[]")
            stub.script(*(actions if isinstance(actions, list) else [actions]))
            self._send_json(200, {"queued": stub.pending_actions})
            return
        if self.path == "/_stub/reset":
            stub.reset()
            self._send_json(200, {"ok": True})
            return
        if self.path == "/_stub/release":
            stub.release()
            self._send_json(200, {"ok": True})
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        stub._record(
            {
                "method": "POST",
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
                "client_port": self.client_address[1],
            }
        )
        if not self.path.endswith("/chat/completions"):
            self._send_json(
                404, {"error": {"message": f"unknown path {self.path}", "type": "invalid_request_error"}}
            )
            return
        auth = self.headers.get("Authorization", "")
        given = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if not given or (stub.api_key is not None and given != stub.api_key):
            self._send_json(
                401,
                {
                    "error": {
                        "message": f"Incorrect API key provided: {given or '(none)'}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._send_json(
                400, {"error": {"message": "'messages' is required", "type": "invalid_request_error"}}
            )
            return
        action = stub._next_action()
        if action.get("hold"):
            stub._released.wait(HOLD_LIMIT_S)
        if action.get("delay"):
            stub._sleep(float(action["delay"]))
        if action.get("drop"):
            self._abort()
            return
        if action.get("html"):
            self._send(int(action.get("status", 502)), HTML_PAGE.encode(), "text/html", action.get("headers"))
            return
        if "status" in action or "body" in action:
            self._error(action)
            return
        if body.get("stream"):
            self._stream(body, action)
        else:
            self._send_json(200, self._completion(body, action), action.get("headers"))

    def _error(self, action: dict[str, Any]) -> None:
        status = int(action.get("status", 200))
        headers = action.get("headers")
        if "body" in action:
            payload = action["body"]
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self._send(status, data, action.get("content_type", "application/json"), headers)
            return
        error = action.get("error") or {
            "message": f"stub error {status}",
            "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": None,
            "code": None,
        }
        self._send_json(status, {"error": error}, headers)

    # -- replies ---------------------------------------------------------------------------------

    def _reply_text(self, body: dict[str, Any], action: dict[str, Any]) -> str:
        if "reply" in action:
            return str(action["reply"])
        users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return "echo: " + (_text_of(users[-1].get("content")) if users else "")

    def _tool_calls(self, action: dict[str, Any]) -> list[dict[str, Any]] | None:
        calls = action.get("tool_calls")
        if not calls:
            return None
        return [
            {
                "id": call.get("id") or self.server.stub._new_id("call"),
                "type": "function",
                "function": {"name": call["name"], "arguments": call.get("arguments", "{}")},
            }
            for call in calls
        ]

    def _usage(self, body: dict[str, Any], completion: int, action: dict[str, Any]) -> dict[str, Any] | None:
        if "usage" in action:
            return action["usage"]  # type: ignore[no-any-return]
        prompt = _rough_tokens(body["messages"])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion(self, body: dict[str, Any], action: dict[str, Any]) -> dict[str, Any]:
        text = self._reply_text(body, action)
        calls = self._tool_calls(action)
        finish = action.get("finish_reason") or ("tool_calls" if calls else "stop")
        choices = []
        for index in range(int(body.get("n") or 1)):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if calls else (text if index == 0 else f"{text} [{index}]"),
                "refusal": None,
                "annotations": [],
            }
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
        data = {
            "id": action.get("response_id") or self.server.stub._new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub-model"),
            "choices": choices,
            "system_fingerprint": "fp_stub",
        }
        usage = self._usage(body, len(_WORDS.findall(text)), action)
        if usage is not None:
            data["usage"] = usage
        return data

    def _stream(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        stub = self.server.stub
        newline = action.get("line_ending", "\n")
        ascii_only = bool(action.get("ensure_ascii", True))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": action.get("response_id") or stub._new_id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "stub-model"),
            "system_fingerprint": "fp_stub",
        }
        n = int(body.get("n") or 1)

        def chunk(choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
            data = {**base, "choices": choices, **more}
            if include_usage and "usage" not in data:
                data["usage"] = None
            return data

        text = self._reply_text(body, action)
        calls = self._tool_calls(action)
        pieces: list[dict[str, Any]] = []  # content deltas of choice 0..n-1, in order
        if calls:
            for position, call in enumerate(calls):
                first = {"index": position, "id": call["id"], "type": "function"}
                first["function"] = {"name": call["function"]["name"], "arguments": ""}
                pieces.append({"index": 0, "delta": {"tool_calls": [first]}})
                args = call["function"]["arguments"]
                for start in range(0, len(args), 5):
                    delta = {"index": position, "function": {"arguments": args[start : start + 5]}}
                    pieces.append({"index": 0, "delta": {"tool_calls": [delta]}})
        else:
            for index in range(n):
                own = text if index == 0 else f"{text} [{index}]"
                for word in _WORDS.findall(own) or [""]:
                    pieces.append({"index": index, "delta": {"content": word}})
        finish = action.get("finish_reason") or ("tool_calls" if calls else "stop")

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", stub._new_id("req"))
        for name, value in (action.get("headers") or {}).items():
            self.send_header(name, str(value))
        self.end_headers()

        def write(text: str) -> None:
            data = text.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def event(data: Any, name: str | None = None) -> None:
            payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=ascii_only)
            field = f"event: {name}{newline}" if name else ""
            write(f"{field}data: {payload}{newline}{newline}")

        delay = float(action.get("chunk_delay") or 0)
        write(f": keep-alive{newline}{newline}")
        event(
            chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    for i in range(n)
                ]
            )
        )
        for count, piece in enumerate(pieces):
            if action.get("endless") and count == int(action.get("endless_after", 1)):
                self._endless(str(action["endless"]), float(action.get("every", 0.1)), write, event, chunk)
                return
            if count == action.get("cut_after"):
                self._abort()
                return
            if count == action.get("end_after"):
                write("")  # the chunked body's end: a clean close, but the reply is unfinished
                return
            if count == action.get("error_event_after"):
                default = {"error": {"message": "stub error mid-stream", "type": "server_error"}}
                event(action.get("error_event", default), action.get("event_name"))
                write("")
                return
            if count == action.get("stall_after"):
                stub._sleep(float(action.get("stall", 0)))
            if delay:
                stub._sleep(delay)
            event(chunk([{**piece, "finish_reason": None}]))
        event(chunk([{"index": i, "delta": {}, "finish_reason": finish} for i in range(n)]))
        if include_usage:
            usage = self._usage(body, len(pieces), action)
            event(chunk([], usage=usage))
        if not action.get("no_done"):
            event("[DONE]")
        write("")

    def _endless(self, kind: str, every: float, write: Any, event: Any, chunk: Any) -> None:
        """Send something that is not a finished reply every ``every`` s, until the client
        leaves (the write fails) or the server closes; at most a minute, as a safety net."""
        stub = self.server.stub
        stop = time.monotonic() + 60
        while not stub._closing.is_set() and time.monotonic() < stop:
            if kind == "keepalive":
                write(": keep-alive\n\n")
            elif kind == "empty":
                event(chunk([{"index": 0, "delta": {}, "finish_reason": None}]))
            else:
                event(chunk([{"index": 0, "delta": {"content": "."}, "finish_reason": None}]))
            stub._sleep(every)
        self._abort()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An OpenAI-compatible stub server for tests.")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="the only key accepted (default: any)")
    parser.add_argument("--script", default=None, help="a JSON file holding a list of actions")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    server = StubServer(host=args.host, port=args.port, api_key=args.api_key)
    server._httpd.verbose = args.verbose  # type: ignore[attr-defined]
    if args.script:
        with open(args.script, encoding="utf-8") as handle:
            server.script(*json.load(handle))
    print(f"stub server listening on {server.base_url}", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
