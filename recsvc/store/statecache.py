"""A per-process cache of user state reads, kept exact by Redis itself.

Recommend reads the user's feedback history from Redis on every call. Under
load that round trip (redis-py's per-command work, a wake-up for the reply,
Redis's own time on the shared cores) costs more CPU than scoring; most calls
find the same state as last time. This cache skips it without serving stale
state, using Redis's server-assisted client-side caching (``CLIENT TRACKING``,
Redis >= 6):

* cacheable reads go over one *tracked* connection; Redis remembers every key
  read on it (missing keys too);
* when any client changes (or expires, evicts, flushes) one of those keys,
  Redis sends its name to our *invalidation* connection, subscribed to
  ``__redis__:invalidate`` (the RESP2 "redirect" form), and we drop the user;
* before every lookup we drain that connection without blocking, so every
  invalidation Redis has sent is applied before we answer from the cache.

Freshness across processes: Redis queues the invalidation while it runs the
write and writes it out in the same event-loop pass as the writer's reply, but
not necessarily first. So a writer that needs read-your-writes through other
processes' caches makes one more round trip after the write (any command, not
pipelined with it) before it reports the write done: by that reply, Redis has
put the invalidation on our socket. ``UserStore.apply_events`` does this
whenever a connection named ``FEED_CLIENT_NAME`` other than its own process's
is there. Writes this process makes itself drop the user at once. If either
connection breaks, Redis stops telling us about changes: the cache is emptied
and bypassed until both are re-established (``check``, called by the health
monitor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import hiredis
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from recsvc.aio import Coalescer
from recsvc.store.layout import user_of_key

log = logging.getLogger(__name__)

CHANNEL = b"__redis__:invalidate"
FEED_CLIENT_NAME = "recsvc-invalidations"  # the name our invalidation connections go by
Command = tuple[Any, ...]


def _tls_context(params: dict[str, Any]) -> ssl.SSLContext:
    """The TLS settings of a ``rediss://`` URL as redis-py reads them (``ssl_ca_certs``,
    ``ssl_cert_reqs``, ``ssl_certfile``/``ssl_keyfile``), for our own socket."""
    context = ssl.create_default_context(cafile=params.get("ssl_ca_certs"))
    if str(params.get("ssl_cert_reqs", "required")).lower() in ("none", "0"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if params.get("ssl_certfile"):
        context.load_cert_chain(params["ssl_certfile"], params.get("ssl_keyfile"))
    return context


class _InvalidationFeed:
    """The connection Redis sends invalidated key names to: a plain socket of
    our own (non-blocking once subscribed), parsed by hiredis."""

    def __init__(self, url: str, timeout_s: float):
        self._params = parse_url(url)
        self._tls = (
            _tls_context(self._params)
            if self._params.get("connection_class") is SSLConnection
            else None
        )
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._reader = hiredis.Reader()

    def open(self) -> int:
        """Connect, subscribe, and return this connection's Redis client id (blocking)."""
        params = self._params
        if params.get("path"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout_s)
            sock.connect(params["path"])
        else:
            host = params.get("host", "localhost")
            sock = socket.create_connection((host, params.get("port", 6379)), self._timeout_s)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=host)
        self._sock = sock
        if params.get("password"):
            username = [params["username"]] if params.get("username") else []
            self._call("AUTH", *username, params["password"])
        client_id = int(self._call("CLIENT", "ID"))
        self._call("CLIENT", "SETNAME", FEED_CLIENT_NAME)
        self._call("SUBSCRIBE", CHANNEL)
        sock.setblocking(False)
        return client_id

    def _call(self, *args: Any) -> Any:
        assert self._sock is not None
        self._sock.sendall(hiredis.pack_command(args))
        while (reply := self._reader.gets()) is False:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("Redis closed the invalidation connection")
            self._reader.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        return reply

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def messages(self) -> list[Any]:
        """What Redis has sent so far (never blocks); ``ConnectionError`` if closed."""
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            if not data:
                raise ConnectionError("Redis closed the invalidation connection")
            self._reader.feed(data)
            # drained: what was sent before this call is in (TLS hands out one record
            # per recv, and may hold decrypted bytes the socket no longer signals)
            if len(data) < 65536 and not (self._tls is not None and self._sock.pending()):  # type: ignore[attr-defined]
                break
        out = []
        while (message := self._reader.gets()) is not False:
            out.append(message)
        return out

    def ping(self) -> None:
        assert self._sock is not None
        self._sock.send(hiredis.pack_command(("PING",)))  # tiny: never blocks in practice

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class StateCache:
    """Users' state as last read from Redis, dropped as soon as Redis says it changed.

    ``get`` answers from the cache or reads over the tracked connection (reads
    of concurrent misses go out together). Bounded by ``max_items`` (an entry
    costs one plus its number of history items), least recently used first out.
    """

    def __init__(
        self,
        client: Any,
        url: str,
        max_items: int = 500_000,
        timeout_s: float = 0.5,
    ):
        self._client = client
        self._url = url
        self._timeout_s = timeout_s
        self.max_items = max_items
        self._entries: OrderedDict[str, tuple[Hashable, Any, int]] = OrderedDict()
        self._size = 0
        self._feed: _InvalidationFeed | None = None
        self._tracked: Any = None  # a redis.asyncio Connection with tracking on
        # misses waiting now go to Redis together (the connection answers in order)
        self._reads: Coalescer[Sequence[Command], list[Any]] = Coalescer(self._send)
        self._reading: dict[str, int] = {}  # reads in flight per user
        self._dirty: set[str] = set()  # invalidated while a read was in flight
        self._epoch = 0  # bumped by every reset and flush
        self._ping_outstanding = False
        self._unsupported = False
        self.ready = False
        self.feed_client_id: int | None = None  # Redis's id of our invalidation connection
        self.hits = self.misses = self.invalidations = 0

    # -- connections -------------------------------------------------------------

    async def start(self) -> bool:
        """Open both connections and turn tracking on; False (and the cache stays
        bypassed) if Redis is unreachable or too old, or the cache is sized 0."""
        if self.ready or self._unsupported or self.max_items <= 0:
            return self.ready
        feed, tracked = None, None
        try:
            feed = _InvalidationFeed(self._url, self._timeout_s)
            client_id = await asyncio.to_thread(feed.open)
            tracked = self._client.connection_pool.make_connection()
            await tracked.connect()
            await tracked.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id)
            await tracked.read_response()
        except (ResponseError, ValueError) as exc:
            self._unsupported = True
            log.warning("user state cache off: %s", exc)
        except (RedisError, OSError) as exc:
            log.info("user state cache not started yet: %s", exc)
        else:
            asyncio.get_running_loop().add_reader(feed.fileno(), self._drain)
            self._feed, self._tracked = feed, tracked
            self.feed_client_id = client_id
            self._ping_outstanding = False
            self._epoch += 1  # reads sent untracked before now must not be kept
            self.ready = True
            log.info("user state cache on", extra={"max_items": self.max_items})
            return True
        if feed is not None:
            feed.close()
        if tracked is not None:
            await tracked.disconnect()
        return False

    async def check(self) -> None:
        """Periodic: (re)start if off; else ping the invalidation connection and
        reset if the previous ping went unanswered (a silently dead connection)."""
        if not self.ready:
            await self.start()
            return
        self._drain()
        if not self.ready:
            return
        if self._ping_outstanding:
            self._reset("no answer to PING on the invalidation connection")
            return
        try:
            assert self._feed is not None
            self._feed.ping()
            self._ping_outstanding = True
        except OSError as exc:
            self._reset(f"invalidation connection: {exc}")

    def _reset(self, reason: str) -> None:
        """Redis may no longer tell us about changes: forget everything."""
        if self.ready:
            log.warning("user state cache reset: %s", reason)
        self.ready = False
        self._epoch += 1
        self._entries.clear()
        self._size = 0
        if self._feed is not None:
            with contextlib.suppress(ValueError, OSError):  # the fd may be closed already
                asyncio.get_running_loop().remove_reader(self._feed.fileno())
            self._feed.close()
            self._feed = None
        if self._tracked is not None:
            tracked, self._tracked = self._tracked, None
            task = asyncio.get_running_loop().create_task(tracked.disconnect(nowait=True))
            # retrieve the outcome so asyncio does not log it; nothing to do on failure
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        tracked, self._tracked = self._tracked, None
        self.ready = False  # quietly
        self._reset("closing")
        self._reads.cancel()
        if tracked is not None:
            await tracked.disconnect()

    # -- invalidations -------------------------------------------------------------

    def _drain(self) -> None:
        feed = self._feed
        if feed is None:
            return
        try:
            messages = feed.messages()
        except OSError as exc:
            self._reset(f"invalidation connection: {exc}")
            return
        for message in messages:
            kind = message[0]
            if kind == b"message" and message[1] == CHANNEL:
                keys = message[2]
                if keys is None:  # FLUSHDB / FLUSHALL
                    self._entries.clear()
                    self._size = 0
                    self._epoch += 1
                else:
                    for key in keys:
                        user_id = user_of_key(key)
                        if user_id is not None:
                            self.invalidate(user_id)
            elif kind == b"pong":
                self._ping_outstanding = False

    def invalidate(self, user_id: str) -> None:
        """Forget ``user_id`` (Redis said so, or this process just wrote their state)."""
        entry = self._entries.pop(user_id, None)
        if entry is not None:
            self._size -= entry[2]
            self.invalidations += 1
        if user_id in self._reading:
            self._dirty.add(user_id)

    # -- reads -----------------------------------------------------------------------

    async def get(
        self,
        user_id: str,
        variant: Hashable,
        commands: Sequence[Command],
        parse: Callable[[list[Any]], tuple[Any, int]],
    ) -> Any:
        """The parsed replies to ``commands`` (reads of ``user_id``'s keys):
        cached if ``variant`` (what the commands ask for) matches, else read
        over the tracked connection (over a pooled one while the cache is off,
        and then not kept). ``parse`` returns (value, size in items)."""
        self._drain()
        entry = self._entries.get(user_id)
        if entry is not None and entry[0] == variant:
            self._entries.move_to_end(user_id)
            self.hits += 1
            return entry[1]
        self.misses += 1
        epoch = self._epoch
        self._reading[user_id] = self._reading.get(user_id, 0) + 1
        try:
            replies = await self._reads.submit(commands)
        finally:
            # invalidations that crossed our read in flight, applied while it
            # still counts as in flight, so they mark it dirty
            self._drain()
            dirty = user_id in self._dirty
            left = self._reading.pop(user_id) - 1
            if left:
                self._reading[user_id] = left
            else:
                self._dirty.discard(user_id)
        value, size = parse(replies)
        if self.ready and epoch == self._epoch and not dirty:
            self._put(user_id, variant, value, 1 + size)
        return value

    def _put(self, user_id: str, variant: Hashable, value: Any, size: int) -> None:
        old = self._entries.pop(user_id, None)
        if old is not None:
            self._size -= old[2]
        if size > self.max_items:
            return
        self._entries[user_id] = (variant, value, size)
        self._size += size
        while self._size > self.max_items:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self._size -= dropped

    async def _send(self, batch: list[Sequence[Command]]) -> list[list[Any]]:
        """Each read's replies, the reads sent as one pipeline."""
        commands = [command for commands in batch for command in commands]
        if self.ready:
            replies = await self._round_trip_tracked(commands)
        else:
            try:
                replies = await self._round_trip_pooled(commands)
            except RedisConnectionError:  # e.g. a pooled connection from before a restart
                replies = await self._round_trip_pooled(commands)
        out, start = [], 0
        for commands in batch:
            out.append(replies[start : start + len(commands)])
            start += len(commands)
        return out

    async def _round_trip_tracked(self, commands: list[Command]) -> list[Any]:
        tracked = self._tracked
        try:
            await tracked.send_packed_command(tracked.pack_commands(commands), check_health=False)
            return [await tracked.read_response() for _ in commands]
        except BaseException as exc:
            # the connection's state is unknown (replies may be half read): start over
            self._reset(f"tracked connection: {type(exc).__name__}: {exc}")
            raise

    async def _round_trip_pooled(self, commands: list[Command]) -> list[Any]:
        """The same read, untracked (the cache is off or being re-established)."""
        if not hasattr(self._client, "connection_pool"):  # Redis Cluster: routed per key
            async with self._client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute()  # type: ignore[no-any-return]
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(
                connection.pack_commands(commands), check_health=False
            )
            return [await connection.read_response() for _ in commands]
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            await pool.release(connection)
