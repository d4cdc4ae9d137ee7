"""An OpenAI-compatible upstream for ``benchmarks/gateway.py`` that holds the load.

A bare ASGI app under uvicorn (one asyncio process): ``POST .../chat/completions`` answers
``"echo"`` plus a fixed reply of ``--words`` words, as a ``chat.completion`` or, with
``"stream": true``, as one ``chat.completion.chunk`` event per word, a finish chunk, a usage
chunk when ``stream_options.include_usage`` is set, and ``data: [DONE]``; ``GET .../models``
lists one model. Nothing is stored and nothing waits, so what it adds is the same whoever
calls it. (tests/stub_server.py is a thread per connection with the default backlog: at 100
concurrent streams it would measure itself.)

    python benchmarks/gateway_stub.py --port 9100 [--words 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

import uvicorn

_ids = itertools.count(1)


def make_app(words: int) -> Any:
    reply = [f"w{i} " for i in range(words)]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if scope["method"] == "GET" and path.endswith("/models"):
            await _json(send, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw or b"{}")
        rid = f"chatcmpl-{next(_ids)}"
        created = int(time.time())
        model = body.get("model", "gpt-4o-mini")
        usage = {"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words}
        if not body.get("stream"):
            await _json(
                send,
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(reply)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"x-request-id", rid.encode())],
            }
        )

        def event(choices: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
            data = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                **more,
            }
            return {
                "type": "http.response.body",
                "body": f"data: {json.dumps(data)}\n\n".encode(),
                "more_body": True,
            }

        await send(
            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        )
        for word in reply:
            await send(event([{"index": 0, "delta": {"content": word}, "finish_reason": None}]))
        await send(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            await send(event([], usage=usage))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


async def _json(send: Any, data: Any) -> None:
    payload = json.dumps(data).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--words", type=int, default=8)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.words),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        backlog=2048,
    )


if __name__ == "__main__":
    main()
