"""Peak memory of storing one large message: an append of 30 MB and an import of 100 MB.

Each case runs in a fresh process and reports the growth of its peak resident memory
(ru_maxrss) over what the process held once the text was built, and that growth per
character of the message. Usage: ``python benchmarks/memory.py [--append-mb 30]
[--import-mb 100]``. The text is diff-like lines (code, spaces, some Persian), the kind
of input ``git diff | gilas-conv send -`` produces.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LINES = [
    "+    def handle(self, request: Request) -> Response:\n",
    "-        return self._cache.get(key, default)\n",
    "+        # سلام دنیا: a comment in Persian\n",
    " \n",
    "@@ -120,7 +120,9 @@ class Store:\n",
    "+        total += len(values[index]) * 31 + 7\n",
]


def _text(chars: int) -> str:
    block = "".join(_LINES)
    return (block * (chars // len(block) + 1))[:chars]


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(case: str, chars: int) -> None:
    from gilas_conv import ConversationStore

    options = {}
    if "max_message_chars" in inspect.signature(ConversationStore).parameters:
        options["max_message_chars"] = chars + 1
    with tempfile.TemporaryDirectory() as folder:
        store = ConversationStore(f"sqlite:///{Path(folder) / 'memory.db'}", **options)
        conv = store.create(model="gpt-4o-mini")
        data = [{"role": "user", "content": _text(chars)}] if case == "import" else None
        text = _text(chars) if case == "append" else None
        before = _peak_kb()
        started = time.perf_counter()
        if case == "append":
            conv.append("user", text)
        else:
            store.import_conversation(data)  # type: ignore[arg-type]
        seconds = time.perf_counter() - started
        grown = (_peak_kb() - before) * 1024
        store.close()
    print(json.dumps({"case": case, "chars": chars, "peak_growth": grown, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append-mb", type=float, default=30)
    parser.add_argument("--import-mb", type=float, default=100)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return
    for case, megs in (("append", args.append_mb), ("import", args.import_mb)):
        chars = int(megs * 1_000_000)
        out = subprocess.run(
            [sys.executable, __file__, "--child", case, str(chars)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = json.loads(out)
        print(
            f"{case:>6} {chars / 1e6:6.0f}M chars: peak memory +{result['peak_growth'] / 1e6:7.0f} MB "
            f"({result['peak_growth'] / chars:5.1f} bytes/char), {result['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
