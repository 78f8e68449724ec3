"""Admission control: a bound on the unary calls in progress in this process.

Past capacity grpc.aio keeps accepting calls, queues them on the event loop and
sheds the oldest as CANCELLED while p99 grows to seconds. Here a call that
would be the ``limit + 1``-th in progress is refused at once, before any
servicer code runs, with RESOURCE_EXHAUSTED and a retry hint in its trailing
metadata: ``retry-after-ms`` and ``grpc-retry-pushback-ms`` (which gRPC's own
retry policy honours). A call counts from the moment its handler task starts
(it has been accepted from the transport) until that task ends, however it
ends, so a cancelled call cannot leak a slot. Feedback streams are not
counted: they are long-lived and flow control already paces them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

import grpc

from recsvc.api.interceptors import method_name, refusal

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # read by gRPC clients' retry policies
SMOOTHING = 0.05  # weight of the newest call in the mean duration


class Admission(grpc.aio.ServerInterceptor):
    """Refuses unary calls to ``service`` beyond ``limit`` in progress."""

    def __init__(self, limit: int, service: str):
        self.limit = limit
        self.service = service
        self.in_flight = 0
        self.admitted = 0
        self.refused = 0
        self.mean_ms = 1.0  # mean duration of admitted calls, smoothed

    def retry_after_ms(self) -> int:
        """About when a slot frees: a call's mean time in the server."""
        return max(1, math.ceil(self.mean_ms))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service, method = method_name(details)
        if handler is None or service != self.service or handler.request_streaming:
            return handler
        if self.in_flight >= self.limit:
            self.refused += 1
            retry_ms = str(self.retry_after_ms())
            return refusal(
                handler, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server at capacity ({self.in_flight} calls in progress, max_in_flight "
                f"{self.limit}): {method} refused before any work; retry after {retry_ms} ms "
                "with back-off (trailing metadata retry-after-ms)",
                ((RETRY_AFTER_KEY, retry_ms), (PUSHBACK_KEY, retry_ms)),
            )  # fmt: skip
        task = asyncio.current_task()
        if task is None:  # not in a handler task (never in grpc.aio): do not count it
            return handler
        self.in_flight += 1
        self.admitted += 1
        loop = asyncio.get_running_loop()
        started = loop.time()

        def done(_task: object) -> None:
            self.in_flight -= 1
            elapsed_ms = (loop.time() - started) * 1000
            self.mean_ms += SMOOTHING * (elapsed_ms - self.mean_ms)

        task.add_done_callback(done)
        return handler


def admission_interceptors(limit: int, service: str) -> list[grpc.aio.ServerInterceptor]:
    """The admission interceptor for ``limit`` calls in progress; none when 0."""
    if limit <= 0:
        return []
    log.info("admission control", extra={"max_in_flight": limit})
    return [Admission(limit, service)]


def admission_options(max_pending: int) -> list[tuple[str, int]]:
    """gRPC core server options bounding the calls core holds that Python has
    not taken yet: grpc.aio takes calls one at a time on its event loop, so past
    capacity the backlog waits there, unseen by the interceptor above. Beyond
    ``max_pending`` core refuses new calls itself (beyond half of it, some), and
    answers them CANCELLED: core's status, which the server cannot change.
    0: no bound (core's defaults)."""
    if max_pending <= 0:
        return []
    return [
        ("grpc.server.max_pending_requests", max(1, max_pending // 2)),
        ("grpc.server.max_pending_requests_hard_limit", max_pending),
    ]
