"""The Redis layout (docs/redis-format.md) and the feedback script, on a real Redis."""

import asyncio

import pytest
import redis

from recsvc.store import FEEDBACK_STREAM, StoredEvent, UserStore, user_keys

pytestmark = pytest.mark.integration


def event(event_id, user="alice", item="sku-1", weight=1.0, ms=1_700_000_000_000, type_="view"):
    return StoredEvent(event_id, user, item, type_, 0.0, weight, ms, "rec-1")


def run(coro_fn, redis_url, **kwargs):
    async def main():
        store = UserStore.from_url(redis_url, **kwargs)
        try:
            return await coro_fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_key_layout_is_pinned(redis_url):
    """Golden layout: exact key names, types, encodings and stream fields."""
    run(lambda s: s.apply_events([event("e1", weight=2.0)]), redis_url, ttl_s=3600)
    r = redis.Redis.from_url(redis_url)
    assert sorted(k.decode() for k in r.keys("*")) == [
        "recsvc:v1:feedback",
        "recsvc:v1:user:alice:events",
        "recsvc:v1:user:alice:hist",
        "recsvc:v1:user:alice:meta",
        "recsvc:v1:user:alice:recent",
    ]
    assert user_keys("alice") == (
        "recsvc:v1:user:alice:hist",
        "recsvc:v1:user:alice:recent",
        "recsvc:v1:user:alice:events",
        "recsvc:v1:user:alice:meta",
    )
    assert r.type("recsvc:v1:user:alice:hist") == b"hash"
    assert r.hgetall("recsvc:v1:user:alice:hist") == {b"sku-1": b"2"}
    assert r.type("recsvc:v1:user:alice:recent") == b"zset"
    assert r.zrange("recsvc:v1:user:alice:recent", 0, -1, withscores=True) == [
        (b"sku-1", 1_700_000_000_000.0)
    ]
    assert r.type("recsvc:v1:user:alice:events") == b"zset"
    assert r.zrange("recsvc:v1:user:alice:events", 0, -1) == [b"e1"]
    meta = r.hgetall("recsvc:v1:user:alice:meta")
    assert set(meta) == {b"updated_ms", b"events"} and meta[b"events"] == b"1"
    for key in user_keys("alice"):
        assert 3590 < r.ttl(key) <= 3600
    ((entry_id, fields),) = r.xrange(FEEDBACK_STREAM)
    assert fields == {
        b"event_id": b"e1", b"user_id": b"alice", b"item_id": b"sku-1", b"type": b"view",
        b"value": b"0.0", b"weight": b"2.0", b"ts_ms": b"1700000000000",
        b"recommendation_id": b"rec-1",
    }  # fmt: skip


def test_resent_event_changes_nothing(redis_url):
    async def scenario(store):
        first = await store.apply_events([event("e1", weight=2.0), event("e2", weight=3.0)])
        again = await store.apply_events([event("e1", weight=2.0), event("e3", item="x")])
        return first, again, await store.get_state("alice")

    first, again, state = run(scenario, redis_url)
    assert [r.applied for r in first] == [True, True]
    assert [r.weight for r in first] == [2.0, 5.0]
    assert [r.applied for r in again] == [False, True]
    assert state.weights == {"sku-1": 5.0, "x": 1.0}
    assert state.event_count == 3
    assert redis.Redis.from_url(redis_url).xlen(FEEDBACK_STREAM) == 3


def test_history_cap_drops_least_recent_items(redis_url):
    async def scenario(store):
        events = [event(f"e{i}", item=f"i{i}", ms=1000 + i) for i in range(5)]
        events.append(event("late", item="i0", ms=2000))  # i0 becomes the most recent
        await store.apply_events(events)
        return await store.get_state("alice")

    state = run(scenario, redis_url, history_cap=3)
    assert set(state.weights) == {"i3", "i4", "i0"}
    assert state.weights["i0"] == 1.0  # evicted when i3 came, then added afresh
    assert state.last_event_ms["i0"] == 2000


def test_dedup_window_is_bounded(redis_url):
    async def scenario(store):
        await store.apply_events([event(f"e{i}", ms=1000 + i) for i in range(10)])

    run(scenario, redis_url, dedup_window=4)
    assert redis.Redis.from_url(redis_url).zcard("recsvc:v1:user:alice:events") == 4


def test_script_reloaded_after_redis_lost_it(redis_url):
    async def scenario(store):
        await store.apply_events([event("e1")])
        await store.client.script_flush()
        return await store.apply_events([event("e2")])

    (result,) = run(scenario, redis_url)
    assert result.applied and result.weight == 2.0


def test_history_of_unknown_user_is_empty(redis_url):
    items, weights, vector = run(lambda s: s.get_history("nobody", with_vector=True), redis_url)
    assert items == [] and len(weights) == 0
    assert vector is not None and vector.blob is None and vector.events == 0
