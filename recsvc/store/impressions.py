"""The impression log in Redis (#13): appending batches with trimming, reading back.

What an entry holds is :data:`recsvc.store.layout.IMPRESSION_FIELDS`; the
online package decides what goes in it.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from recsvc.store.errors import store_errors
from recsvc.store.layout import (
    APPEND_IMPRESSIONS_LUA,
    IMPRESSION_CHUNK,
    IMPRESSION_FIELD,
    IMPRESSION_STREAM,
    feedback_streams,
)


class ImpressionWriter:
    """Appends impressions to the stream (``APPEND_IMPRESSIONS_LUA``), trimming it
    by length and by age as it goes; a batch is one pipelined round trip."""

    def __init__(self, client: aioredis.Redis, maxlen: int, retention_s: int):
        self.client = client
        self.maxlen = maxlen
        self.retention_ms = retention_s * 1000
        self._sha = hashlib.sha1(APPEND_IMPRESSIONS_LUA.encode()).hexdigest()

    @store_errors
    async def append(self, entries: Sequence[str], now_ms: int) -> None:
        """Write ``entries`` (each an impression's JSON text); returns once Redis
        has them (fsynced under appendfsync always)."""
        try:
            await self._append(entries, now_ms)
        except NoScriptError:  # Redis restarted and lost its script cache
            await self.client.script_load(APPEND_IMPRESSIONS_LUA)
            await self._append(entries, now_ms)

    async def _append(self, entries: Sequence[str], now_ms: int) -> None:
        min_id = max(now_ms - self.retention_ms, 0)
        async with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, len(entries), IMPRESSION_CHUNK):
                chunk = entries[start : start + IMPRESSION_CHUNK]
                # (#12) execute_command: a cluster pipeline refuses its evalsha()
                pipe.execute_command(
                    "EVALSHA", self._sha, 1, IMPRESSION_STREAM, self.maxlen, min_id, *chunk
                )
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply


def _read_stream(
    client: redis.Redis, key: str, since_ms: int, batch: int
) -> Iterator[dict[str, str]]:
    """A stream's entries (field -> value, decoded) from ``since_ms`` on, oldest first."""
    for _, fields in _read_entries(client, key, since_ms, batch):
        yield fields


def _read_entries(
    client: redis.Redis, key: str, since_ms: int, batch: int
) -> Iterator[tuple[tuple[int, int], dict[str, str]]]:
    """(entry id as (ms, seq), fields) of a stream from ``since_ms`` on, oldest first."""
    start = f"{since_ms}-0" if since_ms > 0 else "-"
    while True:
        entries: Any = client.xrange(key, min=start, max="+", count=batch)
        for entry_id, fields in entries:
            ms, _, seq = entry_id.decode().partition("-")
            yield (int(ms), int(seq)), {k.decode(): v.decode() for k, v in fields.items()}
        if len(entries) < batch:
            return
        start = "(" + entries[-1][0].decode()


def read_impressions(client: redis.Redis, since_ms: int = 0, batch: int = 10_000) -> Iterator[str]:
    """The impressions still in the log (newer than ``since_ms``), oldest first,
    each as the JSON text it was written as."""
    for fields in _read_stream(client, IMPRESSION_STREAM, since_ms, batch):
        yield fields[IMPRESSION_FIELD]


def read_feedback_log(
    client: redis.Redis, since_ms: int = 0, batch: int = 10_000
) -> Iterator[dict[str, str]]:
    """The feedback events still in the log (not yet trimmed by an export), oldest
    first, with the fields ``APPLY_EVENTS_LUA`` writes (type, ts_ms, recommendation_id...).
    (#12) The log is sharded: the shards' entries are merged by entry id."""
    with client.pipeline(transaction=False) as pipe:
        for stream in feedback_streams():
            pipe.exists(stream)
        present = [s for s, n in zip(feedback_streams(), pipe.execute(), strict=True) if n]
    shards = [_read_entries(client, stream, since_ms, batch) for stream in present]
    return (fields for _, fields in heapq.merge(*shards, key=lambda entry: entry[0]))
