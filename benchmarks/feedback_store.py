"""Durable feedback writes through UserStore.apply_events, by batch size and fsync policy.

    python benchmarks/feedback_store.py

Each row: an embedded Redis with that appendfsync policy, 20,000 events (2,000
for one event per call) over 5,000 users, written in pipelined calls of the
given size; events/s including the AOF write (and fsync, for `always`).
"""

import asyncio
import tempfile
import time

from recsvc.store import EmbeddedRedis, StoredEvent, UserStore


async def rate(url: str, batch: int, n: int) -> float:
    store = UserStore.from_url(url)
    events = [
        StoredEvent(
            f"e{i}", f"u{i % 5000}", f"i{i % 40000}", "click", 0.0, 2.0, 1_700_000_000_000 + i
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    for i in range(0, n, batch):
        await store.apply_events(events[i : i + batch])
    elapsed = time.perf_counter() - start
    await store.close()
    return n / elapsed


def main() -> None:
    for policy in ("everysec", "always"):
        with EmbeddedRedis(tempfile.mkdtemp(), appendfsync=policy) as redis_server:
            rates = [
                asyncio.run(rate(redis_server.url, b, 20_000 if b > 1 else 2_000))
                for b in (1, 50, 500)
            ]
            print(
                policy,
                "  ".join(
                    f"batch {b}: {r:,.0f} events/s"
                    for b, r in zip((1, 50, 500), rates, strict=True)
                ),
            )


if __name__ == "__main__":
    main()
