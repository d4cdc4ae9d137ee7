"""Worker processes for tests/test_quota.py's races.

    python tests/_quota_workers.py reserve URL CONVERSATION_ID OWNER TOKENS THREADS
    python tests/_quota_workers.py send URL BASE_URL OWNER MAX_TOKENS THREADS

Each prints ``{"ready": true}``, waits for one line on stdin (so every worker starts
together), then runs THREADS threads until OWNER's quota refuses them, and prints
``{"settled": N}``: the replies it stored.

- ``reserve``: each thread reserves TOKENS of the quota and stores a reply that reports
  exactly TOKENS used (settling the reservation), in one conversation.
- ``send``: each thread has its own Sender and its own conversation, and sends turns to
  the API at BASE_URL (a stub server) with ``max_tokens=MAX_TOKENS``, as a bot would.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable

from gilas_conv import ConversationStore, QuotaExceeded, Sender


def run(store: ConversationStore, conversation_id: str, owner: str, tokens: int) -> int:
    conv = store.get(conversation_id, owner=owner)
    settled = 0
    while True:
        try:
            reservation = store.reserve_quota(owner, tokens=tokens)
        except QuotaExceeded:
            return settled
        assert reservation is not None
        usage = {"prompt_tokens": tokens - 1, "completion_tokens": 1, "total_tokens": tokens}
        conv.append("assistant", "ok", usage=usage, model="gpt-4o-mini", quota_reservation=reservation)
        settled += 1


def send(store: ConversationStore, base_url: str, owner: str, max_tokens: int) -> int:
    conv = store.create(owner=owner)
    settled = 0
    with Sender(store, base_url=base_url, max_retries=0) as sender:  # the key: $GILAS_API_KEY
        while True:
            try:
                sender.send(conv.id, f"turn {settled}", owner=owner, max_tokens=max_tokens)
            except QuotaExceeded:
                return settled
            settled += 1


def main() -> None:
    mode, url, target, owner, amount, threads = sys.argv[1:7]
    work: Callable[[ConversationStore], int]
    if mode == "reserve":
        work = lambda store: run(store, target, owner, int(amount))  # noqa: E731
    else:
        work = lambda store: send(store, target, owner, int(amount))  # noqa: E731
    with ConversationStore(url, pool_size=int(threads) + 1) as store:
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(work(store))) for _ in range(int(threads))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        print(json.dumps({"settled": sum(results)}), flush=True)


if __name__ == "__main__":
    main()
