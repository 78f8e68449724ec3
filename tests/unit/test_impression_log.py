"""#13: the impression log never makes a reply wait, and keeps what Redis refused."""

import asyncio

import redis.asyncio as aioredis

from recsvc.online.impressions import Impression, ImpressionLog
from recsvc.store import free_port
from recsvc.store.impressions import ImpressionWriter


def test_a_down_redis_keeps_impressions_queued_and_drops_past_the_cap():
    async def main():
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                         socket_connect_timeout=0.2)  # fmt: skip
        log = ImpressionLog(ImpressionWriter(client, 10_000, 3600), queue_cap=5)
        queued = [log.record(Impression(f"{i:032x}", "u", "v", "cf", "m", "recommend", ["a"], 0))
                  for i in range(7)]  # fmt: skip
        assert queued == [True] * 5 + [False] * 2 and log.dropped == 2
        assert await log.flush() is False  # nothing listens there
        assert log.pending == 5 and log.write_errors == 1 and log.written == 0
        await client.aclose()

    asyncio.run(main())
