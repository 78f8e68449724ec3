"""Prometheus metrics for operators (#13): a gRPC server interceptor and a poller.

The interceptor times every call and counts it by method and status code, and
reads feedback outcomes off the feedback responses, so no handler carries
metrics code. Counters kept by other parts (the state cache, the impression
log) are copied in by a poller once a second.

With ``--workers N`` each worker writes its values to files in a shared
directory (prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``)
and the parent process serves their sum (:func:`serve_multiprocess`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prom_multiprocess

from recsvc.store.errors import CALLS as STORE_CALLS
from recsvc.v1 import recommender_pb2 as pb

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                   0.512, 1.024, 2.048, 4.096)  # fmt: skip
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EVENT_TYPE_NAMES = {v.number: v.name.lower() for v in pb.EventType.DESCRIPTOR.values}


class Metrics:
    """The service's metrics, in one registry per server."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "recsvc_rpc_requests",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "recsvc_rpc_latency_seconds",
            "gRPC call latency by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            "recsvc_feedback_events",
            "feedback events by outcome (applied, duplicate, rejected)",
            ["outcome"],
            registry=r,
        )
        self.cache = Counter(
            "recsvc_state_cache_lookups",
            "user state cache lookups by result (hit, miss)",
            ["result"],
            registry=r,
        )
        self.redis_down = Gauge("recsvc_redis_unavailable", "1 while the state store is "
                                "unreachable", registry=r, multiprocess_mode="livemax")  # fmt: skip
        self.store_calls = Counter(
            "recsvc_store_calls",
            "calls into the Redis store, each at most one pipelined round trip (reads the "
            "state cache answers make none)",
            registry=r,
        )
        self.store_errors = Counter(
            "recsvc_redis_errors", "failed Redis store calls by kind", ["kind"], registry=r
        )
        self.store_fences = Counter(
            "recsvc_redis_fences",
            "invalidation fence round trips to Redis after feedback writes",
            registry=r,
        )
        self.model = Gauge("recsvc_model_info", "the served model version (value 1)",
                           ["version"], registry=r, multiprocess_mode="livemax")  # fmt: skip
        self.impressions = Counter(
            "recsvc_impressions", "impressions logged by variant", ["variant"], registry=r
        )
        self.impressions_written = Counter(
            "recsvc_impressions_written", "impressions written to Redis", registry=r
        )
        self.impressions_dropped = Counter(
            "recsvc_impressions_dropped",
            "impressions dropped (queue full while Redis was slow)",
            registry=r,
        )
        self.impression_errors = Counter(
            "recsvc_impression_write_errors", "failed impression writes (retried)", registry=r
        )
        self.attributed = Counter(
            "recsvc_attributed_events",
            "feedback events received with a recommendation id, by the variant of the list "
            "this process served under that id (unknown: not served here recently)",
            ["variant", "type"],
            registry=r,
        )
        # process-wide counters count from here (several servers in one test process)
        self._seen: dict[str, float] = {"store:" + k: n for k, n in STORE_CALLS.items()}
        self._version = ""
        self._lists: dict[str, str] = {}  # recent recommendation id -> variant, oldest first
        self.recent_lists = 50_000

    # -- the interceptor's bookkeeping ------------------------------------------

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def feedback_response(self, response: Any) -> None:
        """Count the outcomes a SendFeedbackResponse or FeedbackAck reports."""
        if hasattr(response, "accepted"):
            self.feedback.labels("applied").inc(response.accepted)
            self.feedback.labels("duplicate").inc(response.duplicates)
        elif hasattr(response, "event_ids"):
            dup = len(response.duplicate_event_ids)
            self.feedback.labels("applied").inc(len(response.event_ids) - dup)
            self.feedback.labels("duplicate").inc(dup)
            self.feedback.labels("rejected").inc(len(response.rejected))

    def served(self, response: Any) -> None:
        """Remember which variant served a Recommend/Generate response."""
        rid = getattr(response, "recommendation_id", "") or getattr(response, "generation_id", "")
        if rid:
            self._lists[rid] = response.variant
            if len(self._lists) > self.recent_lists:
                del self._lists[next(iter(self._lists))]

    def feedback_events(self, events: Any) -> None:
        for event in events:
            if event.recommendation_id:
                variant = self._lists.get(event.recommendation_id, "unknown")
                self.attributed.labels(variant, EVENT_TYPE_NAMES.get(event.type, "other")).inc()

    # -- the poller ------------------------------------------------------------

    def _delta(self, key: str, value: float) -> float:
        previous = self._seen.get(key, 0.0)
        self._seen[key] = value
        return max(value - previous, 0.0)

    def poll(self, engine: Any, impressions: Any) -> None:
        """Copy counters kept elsewhere (cumulative) into the registry."""
        cache = engine.store.cache
        self.cache.labels("hit").inc(self._delta("hit", cache.hits))
        self.cache.labels("miss").inc(self._delta("miss", cache.misses))
        self.store_fences.inc(self._delta("fences", engine.store.fences))
        for kind, n in list(STORE_CALLS.items()):
            if kind == "calls":
                self.store_calls.inc(self._delta("store:calls", n))
            else:
                self.store_errors.labels(kind).inc(self._delta("store:" + kind, n))
        self.redis_down.set(0 if engine.store_available else 1)
        version = engine.model.model_version
        if version != self._version:
            if self._version:
                self.model.labels(self._version).set(0)  # (remove() leaves a worker's file)
            self.model.labels(version).set(1)
            self._version = version
        if impressions is not None:
            for variant, n in list(impressions.recorded.items()):
                self.impressions.labels(variant).inc(self._delta("imp:" + variant, n))
            self.impressions_written.inc(self._delta("written", impressions.written))
            self.impressions_dropped.inc(self._delta("dropped", impressions.dropped))
            self.impression_errors.inc(self._delta("errors", impressions.write_errors))

    async def poll_forever(self, engine: Any, impressions: Any, every_s: float = 1.0) -> None:
        while True:
            try:
                self.poll(engine, impressions)
            except Exception:  # never let the poller die
                log.exception("metrics poll failed")
            await asyncio.sleep(every_s)


def _code_name(context: Any, default: str) -> str:
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode(code).name if isinstance(code, tuple) else str(code)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call (by method and final status code)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]  # type: ignore[attr-defined]
        metrics = self.metrics
        feedback = method in ("SendFeedback", "StreamFeedback", "StreamFeedbackBatches")
        serves_lists = method in ("Recommend", "Generate")
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                started = time.perf_counter()
                code = "UNKNOWN"
                try:
                    response = await inner(request, context)
                    code = "OK"
                    if feedback:
                        metrics.feedback_response(response)
                        metrics.feedback_events(request.events)
                    elif serves_lists:
                        metrics.served(response)
                    return response
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                finally:
                    code = _code_name(context, code)
                    if feedback and code == "INVALID_ARGUMENT":
                        metrics.feedback.labels("rejected").inc(len(getattr(request, "events", ())))
                    metrics.observe(method, code, time.perf_counter() - started)

            return handler._replace(unary_unary=unary)  # type: ignore[attr-defined, no-any-return]
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                started = time.perf_counter()
                code = "UNKNOWN"
                try:
                    if feedback:
                        requests = _tap_events(requests, metrics)
                    async for response in inner_stream(requests, context):
                        if feedback:
                            metrics.feedback_response(response)
                        yield response
                    code = "OK"
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                finally:
                    metrics.observe(
                        method, _code_name(context, code), time.perf_counter() - started
                    )

            return handler._replace(stream_stream=stream)  # type: ignore[attr-defined, no-any-return]
        return handler  # unary-stream and stream-unary: not served by recsvc


async def _tap_events(requests: AsyncIterator[Any], metrics: Metrics) -> AsyncIterator[Any]:
    """Pass a feedback stream's messages on, counting attributed events as they arrive."""
    async for message in requests:
        if isinstance(message, pb.SendFeedbackRequest):  # a StreamFeedbackBatches message
            metrics.feedback_events(message.events)
        elif isinstance(message, pb.FeedbackEvent):  # not a message that failed to parse
            metrics.feedback_events((message,))
        yield message


def listen_host(host: str) -> str:
    return host.strip("[]")


def serve_metrics(metrics: Metrics, host: str, port: int) -> Any:
    """Serve ``/metrics`` of one process; returns the HTTP server (``.shutdown()``)."""
    server, _ = start_http_server(port, addr=listen_host(host), registry=metrics.registry)
    return server


def serve_multiprocess(directory: Path, host: str, port: int) -> Any:
    """Serve the sum of every worker's metrics files in ``directory``."""
    registry = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(registry, path=str(directory))
    server, _ = start_http_server(port, addr=listen_host(host), registry=registry)
    return server


def prepare_multiprocess_dir(directory: Path) -> Path:
    """An empty directory for the workers' metric files (old files would add up)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory


def worker_exited(directory: Path, pid: int) -> None:
    """Drop a dead worker's live gauges."""
    prom_multiprocess.mark_process_dead(pid, str(directory))
