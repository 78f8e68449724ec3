"""The impression log in Redis (#13): appending batches with trimming, reading back.

What an entry holds is :data:`recsvc.store.layout.IMPRESSION_FIELDS`; the
online package decides what goes in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import redis
import redis.asyncio as aioredis

from recsvc.store.errors import store_errors
from recsvc.store.layout import FEEDBACK_STREAM, IMPRESSION_STREAM


class ImpressionWriter:
    """Appends impressions to the stream, each batch in one pipelined round trip,
    trimming it by length and by age as it goes."""

    def __init__(self, client: aioredis.Redis, maxlen: int, retention_s: int):
        self.client = client
        self.maxlen = maxlen
        self.retention_ms = retention_s * 1000

    @store_errors
    async def append(self, entries: Sequence[Mapping[str, str]], now_ms: int) -> None:
        """Write ``entries``; returns once Redis has them (fsynced under appendfsync always)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xadd(IMPRESSION_STREAM, entry, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            pipe.xtrim(IMPRESSION_STREAM, minid=now_ms - self.retention_ms, approximate=True)
            await pipe.execute()


def _read_stream(
    client: redis.Redis, key: str, since_ms: int, batch: int
) -> Iterator[dict[str, str]]:
    start = f"{since_ms}-0" if since_ms > 0 else "-"
    while True:
        entries = client.xrange(key, min=start, max="+", count=batch)
        for _, fields in entries:
            yield {k.decode(): v.decode() for k, v in fields.items()}
        if len(entries) < batch:
            return
        start = "(" + entries[-1][0].decode()


def read_impressions(
    client: redis.Redis, since_ms: int = 0, batch: int = 10_000
) -> Iterator[dict[str, str]]:
    """The impressions still in the log (newer than ``since_ms``), oldest first."""
    return _read_stream(client, IMPRESSION_STREAM, since_ms, batch)


def read_feedback_log(
    client: redis.Redis, since_ms: int = 0, batch: int = 10_000
) -> Iterator[dict[str, str]]:
    """The feedback events still in the log (not yet trimmed by an export), oldest
    first, with the fields ``APPLY_EVENTS_LUA`` writes (type, ts_ms, recommendation_id...)."""
    return _read_stream(client, FEEDBACK_STREAM, since_ms, batch)
