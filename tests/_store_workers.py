"""Worker processes for tests/test_store_concurrency.py, run as separate Python processes.

    python tests/_store_workers.py append  URL CONVERSATION_ID --worker N --count C [--size S]
    python tests/_store_workers.py replies URL CONVERSATION_ID --worker N --count C
    python tests/_store_workers.py open    URL - --worker N --count C

Protocol, one JSON object per stdout line, flushed at once:

    {"ready": true}          the store is open and the tokenizer loaded; the worker then
                             waits for one line on stdin, so that all workers start together
    {"i": 3, "seq": 17, ...} append number ``i`` returned (so it is committed) with seq 17
    {"done": true}           every append returned

``append`` stores ``content_for(worker, i, size)`` as user messages; ``--count 0`` appends
forever (the crash test kills it with SIGKILL). ``replies`` stores assistant messages, the
same replies in every worker (``response_id`` ``resp-<i>``, content ``reply <i>``), to race
the reply dedupe.
``open`` is ready before it opens the store: released, it opens the (possibly new) database,
creates a conversation and appends ``--count`` messages to it, to race the first use.

The test process imports :func:`content_for` and :func:`parse_marker` from here, so the
contents a worker meant to write can be recomputed and compared exactly.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import random
import sys
from typing import Any

# Text that must survive byte for byte: Persian with ZWNJ and RTL marks, an emoji ZWJ
# sequence, CJK, NUL, controls.
_TEXT_FILLER = (
    "می\u200cخواهم \u200fسلام\u202bدنیا\u202c 👨\u200d👩\u200d👧\u200d👦 漢字かな 𠜎 \x00 tab\tline\n"
)


def content_for(worker: int, index: int, size: int = 0) -> Any:
    """The content worker ``worker`` appends as its message ``index``, about ``size`` chars.

    Most are a list of content parts whose bulk is an inline image: large to write, cheap to
    count, so a kill at a random moment often lands inside the write. Every fourth is one
    long string (a quarter of ``size``), which is as slow to count as to write.
    """
    marker = f"w{worker}-m{index}|"
    if size <= 0:
        return marker
    if index % 4 != 3:
        raw = random.Random(f"{worker}-{index}").randbytes(size * 3 // 4)
        return [
            {"type": "text", "text": marker + _TEXT_FILLER},
            {
                "type": "image_url",
                "image_url": {
                    "url": "data:image/png;base64," + base64.b64encode(raw).decode(),
                    "detail": "low",
                },
            },
        ]
    length = size // 4
    return marker + (_TEXT_FILLER * (length // len(_TEXT_FILLER) + 1))[:length]


def parse_marker(content: Any) -> tuple[int, int]:
    """``(worker, index)`` of a content made by :func:`content_for`."""
    text = content[0]["text"] if isinstance(content, list) else content
    marker = text.split("|", 1)[0]
    worker, index = marker.removeprefix("w").split("-m")
    return int(worker), int(index)


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["append", "replies", "open"])
    parser.add_argument("url")
    parser.add_argument("conversation_id")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--count", type=int, required=True, help="0: forever")
    parser.add_argument("--size", type=int, default=0)
    args = parser.parse_args(argv)

    from gilas_conv import ConversationStore, tokens

    if args.mode == "open":
        tokens.message_tokens(
            {"role": "user", "content": "warm up"}, tokens.encoding_name_for_model("gpt-4o")
        )
        _emit(ready=True)
        sys.stdin.readline()
        with ConversationStore(args.url) as store:
            conversation = store.create(model="gpt-4o-mini", title=f"worker {args.worker}")
            for i in range(args.count):
                _emit(i=i, seq=conversation.append("user", content_for(args.worker, i)).seq)
        _emit(done=True)
        return 0

    with ConversationStore(args.url) as store:
        conversation = store.get(args.conversation_id)
        # Load the vocabulary now, so the workers' appends really overlap.
        tokens.message_tokens(
            {"role": "user", "content": "warm up"}, tokens.encoding_name_for_model(conversation.model)
        )
        _emit(ready=True)
        sys.stdin.readline()
        indices = itertools.count() if args.count == 0 else range(args.count)
        for i in indices:
            if args.mode == "append":
                message = conversation.append("user", content_for(args.worker, i, args.size))
                _emit(i=i, seq=message.seq)
            else:
                message = conversation.append("assistant", f"reply {i}", response_id=f"resp-{i}")
                _emit(i=i, seq=message.seq, content=message.content)
    _emit(done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
