"""Search latency over a large store, and what indexing adds to an append.

    python benchmarks/search.py [--messages 1000000] [--db PATH | --url URL]

Builds (or reuses, when the file exists with enough messages) a store of synthetic
Persian and English conversations, 50 messages each, through the store's own import path
(``import_conversations``: validated, indexed in the same transaction), then prints the
median latency of ``store.search`` for several kinds of query, and the cost of an append
with and without a search row (per append, and per append over blocks of FTS5_BATCH): the same
texts appended as ``user`` messages (indexed) and as ``system`` messages (not searched, so
not indexed). The text is
synthetic: words drawn with a Zipf-like skew from a fixed vocabulary, so frequent words
match hundreds of thousands of messages, as they do in real history.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from gilas_conv import ConversationStore
from gilas_conv.store import _search as store_search

_words = str.split  # the vocabulary reads better as text

PERSIAN = _words(
    "من تو او ما شما آنها این آن که را به از در با برای تا اما یا اگر چون هم نیز بسیار خیلی "
    "کتاب خانه شهر تهران اصفهان شیراز تبریز مشهد سفر هوا باران برف آفتاب بهار تابستان پاییز "
    "زمستان کار برنامه کد پایتون داده پایگاه جستجو پیام گفتگو مدل زبان فارسی انگلیسی ترجمه "
    "سوال جواب مشکل راه حل خطا نسخه سرور کاربر رمز امنیت شبکه اینترنت سرعت زمان روز شب "
    "هفته ماه سال امروز فردا دیروز خوب بد بزرگ کوچک جدید قدیمی سریع آهسته ساده سخت"
)
PERSIAN_ZWNJ = ["می\u200cخواهم", "می\u200cروم", "کتاب\u200cها", "نمی\u200cدانم", "خانه\u200cها"]
ENGLISH = _words(
    "the a of to and in is it you that for on with as this be are have not error python code "
    "database query search message model token window context summary stream retry server client "
    "request response json file import export history memory budget sqlite postgres index latency"
)
RARE = [f"zeta{n}" for n in range(2000)]
MESSAGES_PER_CONVERSATION = 50
BATCH_CONVERSATIONS = 200
# Appends per timed block: SQLite's FTS5 batch (gilas_conv/store/_search.py), so that each
# block counts one copy into FTS5 (32 for a gilas-conv from before batches).
BLOCK = getattr(store_search, "FTS5_BATCH", 32)


def _vocabulary() -> tuple[list[str], list[float]]:
    words = PERSIAN + PERSIAN_ZWNJ + ENGLISH
    weights = [1 / (rank + 1) ** 0.9 for rank in range(len(words))]
    random.Random(7).shuffle(weights)
    return words, weights


def _message(rng: random.Random, words: list[str], weights: list[float]) -> str:
    count = rng.randint(8, 40)
    picked = rng.choices(words, weights, k=count)
    if rng.random() < 0.01:
        picked[rng.randrange(count)] = rng.choice(RARE)
    return " ".join(picked)


def build(store: ConversationStore, total: int) -> None:
    rng = random.Random(13)
    words, weights = _vocabulary()
    conversations = total // MESSAGES_PER_CONVERSATION
    started = time.perf_counter()
    for first in range(0, conversations, BATCH_CONVERSATIONS):
        batch = []
        for number in range(first, min(conversations, first + BATCH_CONVERSATIONS)):
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": _message(rng, words, weights)}
                for i in range(MESSAGES_PER_CONVERSATION)
            ]
            batch.append({"title": f"گفتگو {number}", "model": "gpt-4o-mini", "messages": messages})
        store.import_conversations(batch)
        done = (first + len(batch)) * MESSAGES_PER_CONVERSATION
        rate = done / (time.perf_counter() - started)
        print(f"\r  built {done:,} messages ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def _median_ms(action, runs: int) -> float:  # type: ignore[no-untyped-def]
    action()  # warm the cache: the figures are for a store in use, not a cold disk
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


QUERIES = [
    ("frequent word", "تهران"),
    ("ZWNJ word, other spelling", "ميخواهم"),
    ("two words (AND)", "کتاب پایتون"),
    ("phrase", '"search query"'),
    ("prefix", "تهر*"),
    ("rare word", "zeta1234"),
    ("no match", "xylophone"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=Path("/tmp/gilas-search-bench.db"))
    parser.add_argument("--url", help="a database URL instead of --db (e.g. Postgres, already upgraded)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--appends", type=int, default=960, help="texts appended as user and as system")
    args = parser.parse_args()
    url = args.url or f"sqlite:///{args.db}"
    from sqlalchemy import text

    with ConversationStore(url, auto_upgrade=True) as store:
        with store.engine.connect() as conn:
            have = conn.execute(text("SELECT count(*) FROM messages")).scalar_one()
        if have < args.messages:
            print(f"building {args.messages - have:,} messages in {url} ...", file=sys.stderr)
            build(store, args.messages - have)
            if store.dialect == "postgresql":
                # Without statistics after a bulk build the planner picked a plan that ran a
                # frequent-word search for minutes; autovacuum would analyze later.
                with store.engine.connect() as conn:
                    conn.execute(text("ANALYZE"))
                    conn.commit()
        print(f"\n{store.dialect}, {max(have, args.messages):,} messages\n")
        print("| query | hits (limit 20) | median ms |")
        print("|---|---:|---:|")
        for label, query in QUERIES:
            found = len(store.search(query))
            median = _median_ms(lambda q=query: store.search(q), args.runs)
            print(f"| {label}: `{query}` | {found} | {median:.1f} |")

        rng = random.Random(5)
        words, weights = _vocabulary()
        conversation = store.create(model="gpt-4o-mini", title="append bench")
        texts = [_message(rng, words, weights) for _ in range(args.appends)]
        # Blocks of BLOCK appends, user (indexed) and system (not indexed) alternating, the
        # same texts in each. On SQLite one indexed append in FTS5_BATCH copies the batch
        # into FTS5: a block's time per append counts that share, which the median append
        # does not see, and the median block leaves out the blocks a WAL checkpoint hit.
        timings: dict[str, list[float]] = {"user": [], "system": []}
        blocks: dict[str, list[float]] = {"user": [], "system": []}
        cpu: dict[str, list[float]] = {"user": [], "system": []}
        for first in range(0, len(texts) - BLOCK + 1, BLOCK):
            for role in ("user", "system"):
                block_started, cpu_started = time.perf_counter(), time.process_time()
                for value in texts[first : first + BLOCK]:
                    started = time.perf_counter()
                    conversation.append(role, value)
                    timings[role].append((time.perf_counter() - started) * 1e6)
                blocks[role].append((time.perf_counter() - block_started) * 1e6 / BLOCK)
                cpu[role].append((time.process_time() - cpu_started) * 1e6 / BLOCK)
        print(
            f"\n| append (same text) | median µs | median of {BLOCK}-append blocks, µs per append"
            " | the same, CPU µs | mean CPU µs per append, all blocks |"
        )
        print("|---|---:|---:|---:|---:|")
        got = {
            role: [
                *(statistics.median(found[role]) for found in (timings, blocks, cpu)),
                statistics.fmean(cpu[role]),
            ]
            for role in timings
        }
        for label, role in (("not indexed (system message)", "system"), ("indexed (user message)", "user")):
            print(f"| {label} | " + " | ".join(f"{value:.0f}" for value in got[role]) + " |")
        cost = []
        for indexed, plain in zip(got["user"], got["system"], strict=True):
            cost.append(f"{indexed - plain:+.0f} µs ({(indexed / plain - 1) * 100:+.0f}%)")
        print(f"| cost of indexing | {' | '.join(cost)} |")

        # Search again with new rows not yet in SQLite's FTS5 index (the newest appends'
        # rows, at most FTS5_BATCH - 1 of them, are matched in Python: see _search.py).
        for value in texts[: BLOCK - 1]:
            conversation.append("user", value)
        pending = "?"
        if store.dialect == "sqlite":
            with store.engine.connect() as conn:
                try:
                    pending = conn.execute(
                        text(
                            "SELECT count(*) FROM message_search"
                            " WHERE id > (SELECT indexed_to FROM message_search_mark)"
                        )
                    ).scalar_one()
                except Exception:  # a store from before batches: every row is indexed
                    pending = 0
        print(f"\n| query, {pending} search rows pending | hits (limit 20) | median ms |")
        print("|---|---:|---:|")
        for label, query in QUERIES:
            found = len(store.search(query))
            median = _median_ms(lambda q=query: store.search(q), args.runs)
            print(f"| {label}: `{query}` | {found} | {median:.1f} |")
        store.delete(conversation.id)


if __name__ == "__main__":
    main()
