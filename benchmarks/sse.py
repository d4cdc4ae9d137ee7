"""How long the SSE decoder takes on one long line, as the line grows.

A line of N MB with no newline, fed in 64 KB pieces (as a network delivers it), then its
end. A linear decoder takes about twice as long for twice the size; the decoder before
issue 9.6 searched the whole open line again with every piece and took 0.02 / 0.05 /
0.20 / 0.91 s for 2 / 4 / 8 / 16 MB (200 MB did not finish in 60 s).

    python benchmarks/sse.py                 # 2, 4, 8, 16 and 64 MB
    python benchmarks/sse.py --sizes 1,256   # other sizes, in MB

Speed is measured here, never in the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from gilas_conv._sse import SSEDecoder
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gilas_conv._sse import SSEDecoder

MB = 1024 * 1024
PIECE = 64 * 1024


def decode_one_line(size: int) -> float:
    """Seconds to decode one ``size``-byte data line fed in PIECE-byte pieces."""
    body = b"data: " + b"x" * (size - 6)
    decoder = SSEDecoder(max_event_size=size + 1)
    start = time.perf_counter()
    for offset in range(0, len(body), PIECE):
        decoder.feed(body[offset : offset + PIECE])
    events = decoder.feed(b"\n\n")
    elapsed = time.perf_counter() - start
    assert len(events) == 1 and len(events[0].data) == size - 6
    assert decoder.scanned == size + 2
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="2,4,8,16,64", help="line sizes in MB (default: 2,4,8,16,64)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"one data line fed in {PIECE // 1024} KB pieces, best of 3")
    print(f"{'MB':>6}  {'seconds':>8}  {'MB/s':>8}")
    for mb in sizes:
        best = min(decode_one_line(mb * MB) for _ in range(3))
        print(f"{mb:>6}  {best:>8.3f}  {mb / best:>8.0f}")


if __name__ == "__main__":
    main()
