"""Admission control: refuse unary calls the process cannot serve in time.

Past capacity grpc.aio keeps accepting calls and p99 grows to seconds. Two
signals refuse a call at once, before any servicer code runs, with
RESOURCE_EXHAUSTED and a retry hint in its trailing metadata (``retry-after-ms``
and ``grpc-retry-pushback-ms``, which gRPC's own retry policy honours):

- **calls in progress** beyond ``max_in_flight``: fires when calls wait inside
  the server (a slow Redis). A call counts from the moment its handler task
  starts until that task ends, however it ends, so a cancelled call cannot leak
  a slot.
- **a saturated event loop** (``max_queue_ms``): under CPU overload the backlog
  is not in Python at all. grpc.aio asks its core for one call per method at a
  time, so the calls Python holds stay few while the rest wait in core, unseen.
  But a backlog in core means the loop never runs out of work: while it has
  been busy without a single pause for longer than ``max_queue_ms``, calls are
  refused. A refusal costs a small fraction of a served call, so the loop soon
  catches up, pauses, and admits again; the calls it admits waited in core at
  most about that long. Busy time is the loop thread's CPU time plus its time
  waiting for a CPU (``/proc/thread-self/schedstat``), so a machine short of
  cores reads as busy, not idle.

Feedback streams are not counted: they are long-lived and flow control already
paces them. Operator calls (ReloadModel, GetModelInfo) are never refused.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # read by gRPC clients' retry policies
SMOOTHING = 0.05  # weight of the newest call in the mean duration
IDLE_NS = 300_000  # a gap between two calls with this much idle time in it is a pause
OPERATOR_METHODS = frozenset({"ReloadModel", "GetModelInfo"})
Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class LoopBusy:
    """How long the calling thread (the event loop's) has been busy without a
    pause, sampled at each call: between two samples the thread either worked
    (on a CPU, or waiting for one) or slept in its poller, which it does only
    when it has nothing to do."""

    def __init__(self) -> None:
        self._schedstat: int | None = None
        self._opened = False
        self._last_wall = 0
        self._last_busy = 0
        self.streak_start = 0

    def _busy_ns(self) -> int:
        if not self._opened:  # on the loop thread: /proc/thread-self names this thread
            self._opened = True
            try:
                self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            except OSError:  # not Linux: CPU time alone (waiting for a CPU reads as idle)
                self._schedstat = None
        waited = 0
        if self._schedstat is not None:
            try:
                waited = int(os.pread(self._schedstat, 64, 0).split()[1])
            except (OSError, IndexError, ValueError):
                waited = 0
        return time.thread_time_ns() + waited

    def busy_for_ms(self) -> float:
        """Milliseconds since the thread last paused (0 when it just did)."""
        wall = time.monotonic_ns()
        busy = self._busy_ns()
        if (wall - self._last_wall) - (busy - self._last_busy) > IDLE_NS:
            self.streak_start = wall
        self._last_wall, self._last_busy = wall, busy
        return (wall - self.streak_start) / 1e6


class Admission:
    """Refuses unary calls beyond ``limit`` in progress (0: no bound), or while
    the event loop has been busy for over ``max_queue_ms`` without a pause (0:
    never). :meth:`guard` puts a servicer method behind it."""

    def __init__(self, limit: int, max_queue_ms: float = 0.0):
        self.limit = limit
        self.max_queue_ms = max_queue_ms
        self.loop_busy = LoopBusy()
        self.in_flight = 0
        self.mean_ms = 1.0  # mean duration of admitted calls, smoothed

    def retry_after_ms(self) -> int:
        """About when a slot frees: a call's mean time in the server."""
        return max(1, math.ceil(self.mean_ms))

    def refusal(self, method: str) -> tuple[str, str] | None:
        """Why ``method`` is refused now, and the retry hint in ms; None: admitted."""
        why = None
        if self.limit and self.in_flight >= self.limit:
            why = f"{self.in_flight} calls in progress, max_in_flight {self.limit}"
        elif self.max_queue_ms:
            busy_ms = self.loop_busy.busy_for_ms()
            if busy_ms > self.max_queue_ms:
                why = (f"CPU saturated: busy without a pause for {busy_ms:.0f} ms, "
                       f"max_queue_ms {self.max_queue_ms:g}")  # fmt: skip
        if why is None:
            return None
        return why, str(max(self.retry_after_ms(), math.ceil(self.max_queue_ms / 2)))

    def guard(self, method: str, behaviour: Behaviour) -> Behaviour:
        """``behaviour`` (a unary servicer method) behind this bound. A wrapper, not
        a gRPC interceptor: grpc.aio's interceptor chain cost ~130 us of server CPU a
        call under load (BENCHMARKS.md), this costs a function call."""
        if method in OPERATOR_METHODS:
            return behaviour

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refused = self.refusal(method)
            if refused is not None:
                why, retry_ms = refused
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server at capacity ({why}): {method} refused before any work; retry "
                    f"after {retry_ms} ms with back-off (trailing metadata retry-after-ms)",
                    trailing_metadata=((RETRY_AFTER_KEY, retry_ms), (PUSHBACK_KEY, retry_ms)),
                )  # fmt: skip
            self.in_flight += 1
            started = time.perf_counter()
            try:
                return await behaviour(request, context)
            finally:  # however it ends, cancelled included: no slot can leak
                self.in_flight -= 1
                elapsed_ms = (time.perf_counter() - started) * 1000
                self.mean_ms += SMOOTHING * (elapsed_ms - self.mean_ms)

        return guarded


def admission(limit: int, max_queue_ms: float = 0.0) -> Admission | None:
    """The admission bound; None when both limits are 0."""
    if limit <= 0 and max_queue_ms <= 0:
        return None
    log.info("admission control", extra={"max_in_flight": limit, "max_queue_ms": max_queue_ms})
    return Admission(limit, max_queue_ms)


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
