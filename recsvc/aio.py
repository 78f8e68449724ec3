"""Event-loop helpers: uvloop for recsvc's processes, and batching of concurrent calls.

grpc.aio, redis-py and our handlers spend a large share of a call's CPU in the
event loop itself (scheduling callbacks and tasks, polling sockets); uvloop
runs that in C. The load-test clients and the empty server use the same loop,
so side-by-side numbers compare like with like.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the configured event loop."""
    if os.environ.get("RECSVC_EVENT_LOOP", "uvloop") == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


class Coalescer(Generic[T, R]):
    """Sends what concurrent callers ask for together, one batch in flight at a time.

    ``await submit(request)`` queues ``request``; one task calls ``send`` with
    the queue (at most ``max_batch`` at once) and gives each caller its
    result, ``send``'s results being in request order. Requests made while a
    batch is in flight go in the next batch, so each caller's request is sent
    after it asked. If ``send`` raises, every caller of that batch gets the
    exception. Used for Redis round trips that many calls need at the same
    moment (state cache misses, invalidation fences).
    """

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 256):
        self._send = send
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, request: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._drain())
        return await future

    def cancel(self) -> None:
        """Stop sending; every caller still waiting gets CancelledError."""
        if self._sender is not None:
            self._sender.cancel()  # its batch in flight is cancelled by _send_batch
            self._sender = None  # a later submit starts a new one
        for _, future in self._queue:  # the sender may not have started yet
            future.cancel()
        self._queue.clear()

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send_batch(batch)
        finally:
            if self._sender is asyncio.current_task():  # not replaced since cancel()
                self._sender = None

    async def _send_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._send([request for request, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancelled: the task must end as cancelled
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # else its caller was cancelled
                future.set_result(result)
