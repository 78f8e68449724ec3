"""The Redis layout (docs/redis-format.md) and the feedback script, on a real Redis."""

import asyncio
import zlib

import pytest
import redis
from helpers import log_entries, log_length
from redis.crc import key_slot

from recsvc.store import (
    SHARDS,
    StoredEvent,
    UserStore,
    connect_sync,
    feedback_stream,
    feedback_streams,
    shard_of,
    user_keys,
)  # fmt: skip
from recsvc.store.layout import SHARD_TAGS, compute_tags

pytestmark = pytest.mark.integration


def event(event_id, user="alice", item="sku-1", weight=1.0, ms=1_700_000_000_000, type_="view"):
    return StoredEvent(event_id, user, item, type_, 0.0, weight, ms, "rec-1")


def run(coro_fn, redis_url, cluster=False, **kwargs):
    async def main():
        store = UserStore.from_url(redis_url, cluster=cluster, **kwargs)
        try:
            return await coro_fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_key_layout_is_pinned(redis_url):
    """Golden layout: exact key names, types, encodings and stream fields."""
    run(lambda s: s.apply_events([event("e1", weight=2.0)]), redis_url, ttl_s=3600)
    r = redis.Redis.from_url(redis_url)
    assert shard_of("alice") == zlib.crc32(b"alice") % 256 == 71
    assert sorted(k.decode() for k in r.keys("*")) == [
        "recsvc:v2:{6831}:feedback",
        "recsvc:v2:{6831}:user:alice:events",
        "recsvc:v2:{6831}:user:alice:hist",
        "recsvc:v2:{6831}:user:alice:meta",
        "recsvc:v2:{6831}:user:alice:recent",
    ]
    assert user_keys("alice") == (
        "recsvc:v2:{6831}:user:alice:hist",
        "recsvc:v2:{6831}:user:alice:recent",
        "recsvc:v2:{6831}:user:alice:events",
        "recsvc:v2:{6831}:user:alice:meta",
    )
    assert r.type("recsvc:v2:{6831}:user:alice:hist") == b"hash"
    assert r.hgetall("recsvc:v2:{6831}:user:alice:hist") == {b"sku-1": b"2"}
    assert r.type("recsvc:v2:{6831}:user:alice:recent") == b"zset"
    assert r.zrange("recsvc:v2:{6831}:user:alice:recent", 0, -1, withscores=True) == [
        (b"sku-1", 1_700_000_000_000.0)
    ]
    assert r.type("recsvc:v2:{6831}:user:alice:events") == b"zset"
    assert r.zrange("recsvc:v2:{6831}:user:alice:events", 0, -1) == [b"e1"]
    meta = r.hgetall("recsvc:v2:{6831}:user:alice:meta")
    assert set(meta) == {b"updated_ms", b"events"} and meta[b"events"] == b"1"
    for key in user_keys("alice"):
        assert 3590 < r.ttl(key) <= 3600
    ((entry_id, fields),) = r.xrange("recsvc:v2:{6831}:feedback")
    assert fields == {
        b"event_id": b"e1", b"user_id": b"alice", b"item_id": b"sku-1", b"type": b"view",
        b"value": b"0.0", b"weight": b"2.0", b"ts_ms": b"1700000000000",
        b"recommendation_id": b"rec-1",
    }  # fmt: skip


def test_shard_tags_spread_evenly_over_the_hash_slots():
    """Shard s's tag is the smallest decimal whose slot is s * 64; a user's keys
    and their shard's stream share that slot, whatever the user id holds."""
    streams = feedback_streams()
    assert len(streams) == SHARDS == 256
    assert compute_tags() == SHARD_TAGS
    assert streams[:2] == ["recsvc:v2:{3560}:feedback", "recsvc:v2:{11423}:feedback"]
    for shard, stream in enumerate(streams):  # compute_tags() is the rule, minimality included
        assert key_slot(stream.encode()) == shard * 64
    for user in ("alice", "a}b", "{x}", "}", "", "ü:1:hist"):
        slots = {key_slot(k.encode()) for k in user_keys(user)}
        assert slots == {key_slot(feedback_stream(shard_of(user)).encode())}


def test_layout_on_a_cluster_spreads_users_over_all_primaries(cluster_url, redis_cluster):
    events = [event(f"e{u}", user=f"user-{u}") for u in range(60)]
    results = run(lambda s: s.apply_events(events), cluster_url, cluster=True)
    assert all(r.applied for r in results)
    primaries = {redis_cluster.primary_of(user_keys(f"user-{u}")[0]) for u in range(60)}
    assert len(primaries) == 3  # writes spread over the cluster
    with connect_sync(cluster_url, cluster=True) as client:
        assert sorted(f[b"user_id"].decode() for _, f in log_entries(client)) == sorted(
            f"user-{u}" for u in range(60)
        )
        assert client.hgetall(user_keys("user-7")[0]) == {b"sku-1": b"1"}


def test_resent_event_changes_nothing(any_redis):
    redis_url, cluster = any_redis

    async def scenario(store):
        first = await store.apply_events([event("e1", weight=2.0), event("e2", weight=3.0)])
        again = await store.apply_events([event("e1", weight=2.0), event("e3", item="x")])
        return first, again, await store.get_state("alice")

    first, again, state = run(scenario, redis_url, cluster)
    assert [r.applied for r in first] == [True, True]
    assert [r.weight for r in first] == [2.0, 5.0]
    assert [r.applied for r in again] == [False, True]
    assert state.weights == {"sku-1": 5.0, "x": 1.0}
    assert state.event_count == 3
    with connect_sync(redis_url, cluster) as client:
        assert log_length(client) == 3


def test_history_cap_drops_least_recent_items(any_redis):
    redis_url, cluster = any_redis

    async def scenario(store):
        events = [event(f"e{i}", item=f"i{i}", ms=1000 + i) for i in range(5)]
        events.append(event("late", item="i0", ms=2000))  # i0 becomes the most recent
        await store.apply_events(events)
        return await store.get_state("alice")

    state = run(scenario, redis_url, cluster, history_cap=3)
    assert set(state.weights) == {"i3", "i4", "i0"}
    assert state.weights["i0"] == 1.0  # evicted when i3 came, then added afresh
    assert state.last_event_ms["i0"] == 2000


def test_dedup_window_is_bounded(redis_url):
    async def scenario(store):
        await store.apply_events([event(f"e{i}", ms=1000 + i) for i in range(10)])

    run(scenario, redis_url, dedup_window=4)
    assert redis.Redis.from_url(redis_url).zcard(user_keys("alice")[2]) == 4


def test_script_reloaded_after_redis_lost_it(any_redis):
    redis_url, cluster = any_redis

    async def scenario(store):
        await store.apply_events([event("e1")])
        await store.client.script_flush()
        return await store.apply_events([event("e2")])

    (result,) = run(scenario, redis_url, cluster)
    assert result.applied and result.weight == 2.0


def test_history_of_unknown_user_is_empty(redis_url):
    items, weights, vector = run(lambda s: s.get_history("nobody", with_vector=True), redis_url)
    assert items == [] and len(weights) == 0
    assert vector is not None and vector.blob is None and vector.events == 0
