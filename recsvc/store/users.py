"""Per-user state and the feedback log in one Redis: :class:`UserStore`."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from recsvc.aio import Coalescer
from recsvc.store.connect import connect_async
from recsvc.store.errors import UNAVAILABLE_CLASSES, StoreUnavailable, store_errors
from recsvc.store.layout import (
    APPLY_EVENTS_LUA,
    PUT_STATE_LUA,
    PUT_VECTOR_LUA,
    SCRIPT_CHUNK,
    SEQUENCE_STATE,
    V1_FEEDBACK_STREAM,
    V1_PREFIX,
    feedback_stream,
    shard_of,
    user_keys,
)
from recsvc.store.statecache import FEED_CLIENT_NAME, StateCache


@dataclass(frozen=True)
class StoredEvent:
    """A validated feedback event, ready to be written."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str
    value: float
    weight: float
    event_ms: int
    recommendation_id: str = ""

    def script_args(self) -> list[str]:
        """The event as the feedback script reads it (see ``APPLY_EVENTS_LUA``)."""
        return [
            self.event_id, self.user_id, self.item_id, self.event_type, repr(self.value),
            repr(self.weight), str(self.event_ms), self.recommendation_id,
        ]  # fmt: skip


@dataclass(frozen=True)
class ApplyResult:
    applied: bool  # False: a duplicate event id, nothing changed
    weight: float  # the item's feedback weight after the event
    events: int  # the user's applied-event count after the event


@dataclass
class CachedVector:
    """A user's cached generator state, valid if it reflects all their events."""

    blob: bytes | None
    vector_events: int
    events: int
    model: str

    @classmethod
    def from_reply(cls, reply: Sequence[bytes | None]) -> CachedVector:
        """From ``HMGET meta vec vec_events events vec_model``."""
        blob, vector_events, events, model = reply
        return cls(blob, int(vector_events or -1), int(events or 0), (model or b"").decode())

    def fresh_for(self, model_version: str) -> bool:
        return (
            self.blob is not None
            and self.vector_events == self.events
            and self.model == model_version
        )


@dataclass
class SequenceRead:
    """What the sequence model reads for one user: the feedback history (item ids and
    summed weights, as :meth:`UserStore.get_history`), the items of positive weight in
    event-time order, and the cached sequence state."""

    items: list[str]
    weights: np.ndarray
    ordered: list[str]
    cached: CachedVector


def _parse_sequence(has_cutoff: bool, replies: list[Any]) -> tuple[SequenceRead, int]:
    (items, weights, cached), size = _parse_history(has_cutoff, True, replies)
    positive = {item for item, w in zip(items, weights.tolist(), strict=True) if w > 0}
    ordered = [i for i in (raw.decode() for raw in replies[1]) if i in positive]
    return SequenceRead(items, weights, ordered, cached), size + len(ordered)  # type: ignore[arg-type]


@dataclass
class StoredState:
    """What Redis holds for one user (empty containers for an unknown user)."""

    weights: dict[str, float]
    last_event_ms: dict[str, int]
    updated_ms: int | None
    event_count: int


def _parse_history(
    has_cutoff: bool, with_vector: bool, replies: list[Any]
) -> tuple[tuple[list[str], np.ndarray, CachedVector | None], int]:
    """``get_history``'s result from its raw replies (HGETALL as a flat list, then
    ZRANGEBYSCORE if ``has_cutoff``, then HMGET of the vector fields if
    ``with_vector``), and its size in items."""
    hist = replies[0]  # a map under RESP3 (redis-py's default), a flat list under RESP2
    if isinstance(hist, dict):
        keys, values = hist.keys(), hist.values()
    else:
        keys, values = hist[0::2], hist[1::2]
    items = [item.decode() for item in keys]
    weights = np.array(list(values)).astype(np.float64)  # float text, parsed in one call
    if has_cutoff and items:
        recent = {item.decode() for item in replies[1]}
        keep = [item in recent for item in items]
        items = [item for item, kept in zip(items, keep, strict=True) if kept]
        weights = weights[np.array(keep, dtype=bool)]
    if not items:
        weights = np.empty(0, dtype=np.float64)
    weights.flags.writeable = False  # the cache hands the same array to every caller
    cached = CachedVector.from_reply(replies[-1]) if with_vector else None
    return (items, weights, cached), len(items)


class UserStore:
    """Async access to per-user state and the feedback log in one Redis.

    Its coroutines raise only :mod:`recsvc.store.errors`' classes: a failed
    call says whether the store is down or only this request failed."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        history_cap: int = 500,
        dedup_window: int = 10_000,
        ttl_s: int = 30 * 86400,
        stream_maxlen: int = 0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 250,
        cache: StateCache | None = None,
    ):
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        # reads of user state go through it: cached while Redis tracks them for
        # us (see recsvc.store.statecache), read over a pooled connection otherwise
        self.cache = cache or StateCache(client, "", max_items=0)
        self.history_cap = history_cap
        self.dedup_window = dedup_window
        self.ttl_s = ttl_s
        self.stream_maxlen = stream_maxlen
        # > 0: acknowledge a write only once that many replicas have it (WAIT)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._script_sha = hashlib.sha1(APPLY_EVENTS_LUA.encode()).hexdigest()
        self._put_sha = hashlib.sha1(PUT_VECTOR_LUA.encode()).hexdigest()
        self._put_state = client.register_script(PUT_STATE_LUA)  # reloads itself on NOSCRIPT
        self._fences: Coalescer[None, None] = Coalescer(self._send_fence)
        self.fences = 0  # fence PINGs sent

    @classmethod
    def from_url(
        cls,
        url: str,
        timeout_s: float = 0.5,
        cache_items: int = 0,
        cluster: bool = False,
        **kwargs: int,
    ) -> UserStore:
        """A store on ``url`` (a Redis Cluster node's URL with ``cluster``);
        ``cache_items`` > 0 caches user state reads in this process (up to that
        many history items), kept exact by Redis. On a cluster the cache is
        off: see ``docs/redis-format.md``."""
        client = connect_async(url, timeout_s, cluster)
        cache = StateCache(client, url, 0 if cluster else cache_items, timeout_s)
        return cls(client, cache=cache, **kwargs)

    async def close(self) -> None:
        await self.cache.close()
        await self.client.aclose()

    @store_errors
    async def ping(self) -> bool:
        """Is Redis answering? Also (re)starts or checks the state cache."""
        try:
            ok = bool(await self.client.ping())
        except Exception:
            await self._rediscover()
            raise
        await self.cache.check()
        return ok

    async def has_v1_data(self) -> bool:
        """Does Redis still hold format v1 data (``recsvc migrate`` not run)?
        A quick look (the v1 log, one SCAN page); False if Redis is unreachable."""
        try:
            if await self.client.exists(V1_FEEDBACK_STREAM):
                return True
            if self.cluster:
                return False  # v1 never ran on a cluster
            _, keys = await self.client.scan(0, match=f"{V1_PREFIX}user:*", count=1000)
            return bool(keys)
        except Exception:  # the health probe reports an unreachable Redis
            return False

    async def _rediscover(self) -> None:
        """On a cluster, after a failure: read the slot map again on the next call
        (a failed-over primary's slots now live on its promoted replica).

        redis-py does this itself after a failed single command, not after a
        failed pipeline. Its flag is set rather than calling ``aclose()``: that
        would drop every node's connections, failing the calls in flight on the
        healthy nodes, whose failures would close them again."""
        if self.cluster:
            self.client._initialize = True  # type: ignore[union-attr]

    @store_errors
    async def get_history(
        self, user_id: str, since_ms: int = 0, with_vector: bool = False
    ) -> tuple[list[str], np.ndarray, CachedVector | None]:
        """The user's feedback history: item ids and summed weights, and with
        ``with_vector`` their cached generator vector, in one round trip (none
        when this process's state cache has it).

        With ``since_ms``, only items with an event after that time: the model
        was trained on data up to then, so older feedback is already in it.
        """
        hist, recent, _, meta = user_keys(user_id)
        commands: list[tuple[str, ...]] = [("HGETALL", hist)]
        if since_ms > 0:
            commands.append(("ZRANGEBYSCORE", recent, f"({since_ms}", "+inf"))
        if with_vector:
            commands.append(("HMGET", meta, "vec", "vec_events", "events", "vec_model"))
        parse = functools.partial(_parse_history, since_ms > 0, with_vector)
        return await self.cache.get(user_id, (since_ms, with_vector), commands, parse)  # type: ignore[no-any-return]

    @store_errors
    async def get_sequence(self, user_id: str, since_ms: int = 0) -> SequenceRead:
        """The user's history, their items in event order (events after ``since_ms``) and
        cached sequence state, in one round trip (none when the state cache has it)."""
        hist, recent, _, meta = user_keys(user_id)
        commands: list[tuple[str, ...]] = [
            ("HGETALL", hist),
            ("ZRANGEBYSCORE", recent, f"({since_ms}" if since_ms > 0 else "-inf", "+inf"),
            ("HMGET", meta, *SEQUENCE_STATE),
        ]
        parse = functools.partial(_parse_sequence, since_ms > 0)
        return await self.cache.get(user_id, ("seq", since_ms), commands, parse)  # type: ignore[no-any-return]

    @store_errors
    async def put_sequence_state(self, user_id: str, events: int, blob: bytes, model: str) -> bool:
        """Cache a sequence state computed after ``events`` events; refused (False) if more
        events arrived meanwhile."""
        self.cache.invalidate(user_id)
        args = (user_keys(user_id)[3], events, blob, model, SEQUENCE_STATE[0])
        return bool(await self._put_state(keys=args[:1], args=args[1:]))

    @store_errors
    async def get_vectors(self, user_ids: Sequence[str]) -> list[CachedVector]:
        """Cached generator vectors of several users (one round trip)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for user in user_ids:
                pipe.hmget(user_keys(user)[3], "vec", "vec_events", "events", "vec_model")
            replies = await pipe.execute()
        return [CachedVector.from_reply(reply) for reply in replies]

    @store_errors
    async def put_vector(self, user_id: str, events: int, blob: bytes, model: str) -> bool:
        """Cache a vector computed from the state after ``events`` events; refused
        (False) if more events arrived meanwhile."""
        self.cache.invalidate(user_id)
        sha = self._put_sha
        args = (1, user_keys(user_id)[3], events, blob, model)
        try:
            return bool(await self.client.evalsha(sha, *args))
        except NoScriptError:
            await self.client.script_load(PUT_VECTOR_LUA)
            return bool(await self.client.evalsha(sha, *args))

    @store_errors
    async def get_state(self, user_id: str) -> StoredState:
        hist, recent, _, meta = user_keys(user_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(hist)
            pipe.zrange(recent, 0, -1, withscores=True)
            pipe.hgetall(meta)
            raw_hist, raw_recent, raw_meta = await pipe.execute()
        updated = raw_meta.get(b"updated_ms")
        return StoredState(
            weights={k.decode(): float(v) for k, v in raw_hist.items()},
            last_event_ms={k.decode(): int(s) for k, s in raw_recent},
            updated_ms=int(updated) if updated is not None else None,
            event_count=int(raw_meta.get(b"events", 0)),
        )

    @store_errors
    async def apply_events(self, events: Sequence[StoredEvent]) -> list[ApplyResult]:
        """Apply events in one pipelined round trip; returns only once all are in
        Redis (and, with ``wait_replicas``, on that many replicas)."""
        if not events:
            return []
        now_ms = int(time.time() * 1000)
        calls = _script_calls(events, by_shard=self.cluster)
        try:
            if self.cluster:
                await self.client.initialize()  # the slot map, for WAIT's nodes
            try:
                replies, other_caches = await self._run_apply(calls, now_ms)
            except NoScriptError:  # Redis restarted (a replica was promoted) without it
                await self._rediscover()
                await self.client.script_load(APPLY_EVENTS_LUA)
                try:
                    replies, other_caches = await self._run_apply(calls, now_ms)
                except NoScriptError as exc:  # the topology moved under the reload
                    raise StoreUnavailable(f"NOSCRIPT after reloading the script: {exc}") from exc
        except (StoreUnavailable, *UNAVAILABLE_CLASSES):
            await self._rediscover()
            raise
        for user_id in {e.user_id for e in events}:  # this process knows it changed
            self.cache.invalidate(user_id)
        if other_caches:
            await self._invalidation_fence()
        results: list[ApplyResult | None] = [None] * len(events)
        for call, call_replies in zip(calls, replies, strict=True):
            for index, r in zip(call.indexes, call_replies, strict=True):
                results[index] = ApplyResult(bool(r[0]), float(r[1]), int(r[2]))
        return results  # type: ignore[return-value]

    async def _invalidation_fence(self) -> None:
        """Return only once Redis has sent every process's state cache the
        invalidations of the write just made.

        Redis queues them while it runs the write but may put the writer's reply
        on the wire first, in the same event-loop pass; a command sent after
        that reply arrived runs in a later pass, so by its reply the
        invalidations are on the readers' sockets, and a reader drains its
        socket before every lookup. Without this a caller could act on the ack
        (in CI: the very next statement) before another process's cache heard
        of the change. Pipelining the PING with the write would not do: Redis
        would run both in the same pass. Only needed while another process
        caches state (see ``_other_caches``); with appendfsync always it costs
        the ack one more fsync wait.

        Concurrent writers share fences: every caller waits for a PING sent
        after it asked, and one PING serves all who asked while the previous
        one was out.
        """
        await self._fences.submit(None)

    async def _send_fence(self, batch: list[None]) -> list[None]:
        self.fences += 1
        await self.client.ping()
        return batch

    async def _run_apply(self, calls: list[_ScriptCall], now_ms: int) -> tuple[list[Any], bool]:
        """Each script call's results, and whether another process may cache user state."""
        settings = (now_ms, self.ttl_s, self.history_cap, self.dedup_window, self.stream_maxlen)
        sha = self._script_sha
        wait = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
        if not self.cluster:
            commands = [("EVALSHA", sha, len(c.keys), *c.keys, *settings, c.events) for c in calls]
            if self.wait_replicas > 0:
                commands.append(wait)
            # in the same Redis pass as the writes: which caches could hold stale state
            commands.append(("CLIENT", "LIST", "TYPE", "pubsub"))
            try:
                everything = await self._round_trip(commands)
            except RedisConnectionError:  # e.g. a pooled connection from before a restart
                everything = await self._round_trip(commands)  # idempotent: safe to resend
            nodes = None
        else:
            everything, nodes = await self._cluster_round_trip(calls, settings, wait)
        replies, extra = everything[: len(calls)], everything[len(calls) :]
        for reply in everything:
            if isinstance(reply, NoScriptError):
                raise reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if self.wait_replicas > 0:
            self._check_replicated(calls, extra[: len(nodes) if nodes else 1], nodes)
        return replies, (not self.cluster and self._other_caches(extra[-1]))

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` on one pooled connection in one write, read every
        reply (an error reply as its exception). Packed by hiredis: redis-py's
        own packing of a script call's KEYS cost more than the rest of the
        write path."""
        pool = self.client.connection_pool
        connection = await pool.get_connection()
        try:
            packed = b"".join([hiredis.pack_command(command) for command in commands])
            await connection.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # read whole: the connection stays in step
                    replies.append(exc)
            return replies
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)

    async def _cluster_round_trip(
        self, calls: list[_ScriptCall], settings: tuple[int, ...], wait: tuple[Any, ...]
    ) -> tuple[list[Any], dict[str, Any]]:
        """The script calls through the cluster pipeline (each node's commands on
        one connection, in order, the nodes in parallel), then with
        ``wait_replicas`` a WAIT for each node written, on that connection."""
        nodes = {}
        async with self.client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.execute_command(
                    "EVALSHA", self._script_sha, len(call.keys), *call.keys, *settings, call.events
                )
                node = self.client.get_node_from_key(call.keys[0])
                nodes[node.name] = node
            if self.wait_replicas > 0:
                for node in nodes.values():
                    pipe.execute_command(*wait, target_nodes=node)
            return await pipe.execute(raise_on_error=False), nodes

    def _check_replicated(
        self, calls: list[_ScriptCall], waits: list[Any], nodes: dict[str, Any] | None
    ) -> None:
        """Refuse the ack unless every WAIT saw enough replicas, on the node that
        still serves each call's slot (a slot that moved meanwhile was written
        on a connection the WAIT did not cover)."""
        for reply in waits:
            if isinstance(reply, Exception):
                raise reply
            if int(reply) < self.wait_replicas:
                raise StoreUnavailable(
                    f"NOREPLICAS: the write reached {int(reply)} of {self.wait_replicas} "
                    f"replicas within {self.wait_timeout_ms} ms"
                )
        if nodes is not None:
            for call in calls:
                if self.client.get_node_from_key(call.keys[0]).name not in nodes:
                    raise StoreUnavailable("MOVED: a slot moved during the write; retry")

    def _other_caches(self, client_list: Any) -> bool:
        """Does a process other than this one listen for invalidations? A cache
        that starts after this pass turns tracking on after the write, so it can
        only read the new state. If Redis refuses CLIENT LIST, assume one does."""
        if isinstance(client_list, Exception):
            return True
        own = f"id={self.cache.feed_client_id}".encode()
        marker = f" name={FEED_CLIENT_NAME} ".encode()
        for line in client_list.splitlines():
            if marker in line and line.split(b" ", 1)[0] != own:
                return True
        return False


@dataclass
class _ScriptCall:
    """One ``APPLY_EVENTS_LUA`` call: its KEYS, its events (JSON) and their
    positions in the batch."""

    keys: list[str]
    events: str
    indexes: list[int]


def _script_calls(events: Sequence[StoredEvent], by_shard: bool) -> list[_ScriptCall]:
    """The batch as script calls of up to ``SCRIPT_CHUNK`` events, each user's
    events in order; with ``by_shard`` (Redis Cluster) one shard per call, so
    each call's keys share a hash slot."""
    keys_of = [user_keys(e.user_id) for e in events]  # cached per user
    if by_shard:
        groups: dict[int, list[int]] = {}
        for index, event in enumerate(events):
            groups.setdefault(shard_of(event.user_id), []).append(index)
        index_groups = list(groups.values())
    else:
        index_groups = [list(range(len(events)))]
    calls = []
    for indexes in index_groups:
        for start in range(0, len(indexes), SCRIPT_CHUNK):
            chunk = indexes[start : start + SCRIPT_CHUNK]
            keys: list[str] = []
            stream_at: dict[int, int] = {}  # shard -> its stream's index in KEYS
            # user -> (their shard's stream's index in KEYS, the index of their first key)
            user_at: dict[str, tuple[int, int]] = {}
            args = []
            for i in chunk:
                event = events[i]
                at = user_at.get(event.user_id)
                if at is None:
                    shard = shard_of(event.user_id)
                    if shard not in stream_at:
                        keys.append(feedback_stream(shard))
                        stream_at[shard] = len(keys)
                    at = user_at[event.user_id] = (stream_at[shard], len(keys) + 1)
                    keys.extend(keys_of[i])
                args.append([*event.script_args(), *at])
            calls.append(_ScriptCall(keys, json.dumps(args), chunk))
    return calls
