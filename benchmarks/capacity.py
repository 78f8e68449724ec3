"""Redis-side capacity numbers for BENCHMARKS.md's capacity model (#12).

    python benchmarks/capacity.py [--users 20000] [--events-per-user 20]

On an embedded Redis (appendfsync always), writes ``--events-per-user``
events (distinct items) for each of ``--users`` users through
UserStore.apply_events in batches of 500, then prints:
* Redis memory per active user (``used_memory`` growth / users; the feedback
  log's share separately: the log is trimmed by exports, user state is not);
* Redis CPU per event: EVALSHA's ``usec`` in ``INFO commandstats`` over the
  events written, so events/s one primary's core can take;
* the client's events/s (wall) for the record.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import redis

from recsvc.store import EmbeddedRedis, StoredEvent, UserStore, feedback_streams


async def write(url: str, users: int, per_user: int) -> float:
    store = UserStore.from_url(url, timeout_s=10)
    events = [
        StoredEvent(f"e{u}-{j}", f"user-{u}", f"item-{(u * 7 + j * 13) % 400_000}", "click", 0.0,
                    2.0, 1_700_000_000_000 + j)
        for j in range(per_user) for u in range(users)
    ]  # fmt: skip
    start = time.perf_counter()
    for i in range(0, len(events), 500):
        await store.apply_events(events[i : i + 500])
    elapsed = time.perf_counter() - start
    await store.close()
    return len(events) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events-per-user", type=int, default=20)
    args = parser.parse_args()
    with EmbeddedRedis(tempfile.mkdtemp()) as server:
        client = redis.Redis.from_url(server.url)
        client.config_resetstat()
        before = client.info("memory")["used_memory"]
        rate = asyncio.run(write(server.url, args.users, args.events_per_user))
        after = client.info("memory")["used_memory"]
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        log_bytes = sum(client.memory_usage(s) or 0 for s in feedback_streams() if client.exists(s))
        n_events = args.users * args.events_per_user
    per_user = (after - before - log_bytes) / args.users
    print(f"{args.users} users x {args.events_per_user} events (distinct items), "
          f"appendfsync always:")  # fmt: skip
    print(f"  Redis memory per active user (state): {per_user:,.0f} bytes")
    print(f"  feedback log: {log_bytes / n_events:,.0f} bytes per event until exported")
    usec = stats.get("usec", 0) / n_events
    print(f"  Redis CPU in EVALSHA: {usec:.1f} us per event -> {1e6 / usec:,.0f} events/s "
          f"per primary core")  # fmt: skip
    print(f"  client, one coroutine, 500 per call: {rate:,.0f} events/s")


if __name__ == "__main__":
    main()
