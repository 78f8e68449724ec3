"""Redis clients for a URL: one Redis (or a primary) or, with ``cluster``, a Redis Cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster

from recsvc.store.embedded import EmbeddedRedis


def connect_async(url: str, timeout_s: float, cluster: bool) -> aioredis.Redis | AsyncRedisCluster:
    """The serving client. On a cluster, commands are not retried by redis-py: a
    failure is reported at once (the caller answers UNAVAILABLE and the client
    resends), and the next call reads the slot map again (``UserStore``)."""
    options = dict(
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=False
    )
    if cluster:
        return AsyncRedisCluster.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **options)
    return aioredis.Redis.from_url(url, retry_on_timeout=False, **options)


def connect_sync(url: str, cluster: bool, timeout_s: float = 10.0) -> redis.Redis | RedisCluster:
    """A blocking client, for the tools (``export-feedback``, ``migrate``)."""
    if cluster:
        return RedisCluster.from_url(url, socket_timeout=timeout_s)
    return redis.Redis.from_url(url, socket_timeout=timeout_s)


@contextlib.contextmanager
def tool_client(
    url: str | None, cluster: bool, data_dir: str | os.PathLike[str]
) -> Iterator[redis.Redis | RedisCluster]:
    """A blocking client on ``url`` or, without one, on the server's embedded Redis
    in ``data_dir``: used if it runs, else started on its data for the command."""
    embedded = None
    if not url:
        embedded = EmbeddedRedis(data_dir)
        try:
            with redis.Redis.from_url(embedded.url, socket_timeout=1) as probe:
                probe.ping()
            url, embedded = embedded.url, None
        except (redis.RedisError, OSError):
            url = embedded.start().url
        cluster = False
    try:
        with connect_sync(url, cluster) as client:
            yield client
    finally:
        if embedded is not None:
            embedded.stop()
