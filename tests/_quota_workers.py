"""A worker process for tests/test_quota.py's races: reserve, then settle with a reply.

    python tests/_quota_workers.py URL CONVERSATION_ID OWNER TOKENS THREADS

Prints ``{"ready": true}``, waits for one line on stdin (so every worker starts together),
then runs THREADS threads, each reserving TOKENS of OWNER's quota and storing a reply that
reports exactly TOKENS used (settling the reservation), until a reservation is refused.
Prints ``{"settled": N}``: the replies it stored.
"""

from __future__ import annotations

import json
import sys
import threading

from gilas_conv import ConversationStore, QuotaExceeded


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


def main() -> None:
    url, conversation_id, owner, tokens, threads = sys.argv[1:6]
    with ConversationStore(url, pool_size=int(threads) + 1) as store:
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        results: list[int] = []
        workers = [
            threading.Thread(target=lambda: results.append(run(store, conversation_id, owner, int(tokens))))
            for _ in range(int(threads))
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        print(json.dumps({"settled": sum(results)}), flush=True)


if __name__ == "__main__":
    main()
