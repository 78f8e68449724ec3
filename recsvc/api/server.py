"""Process start-up: model, Redis, gRPC server with health and reflection, shutdown."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from threadpoolctl import threadpool_limits

from recsvc.api import metrics as metrics_mod
from recsvc.api.admission import admission, admission_options
from recsvc.api.auth import auth_interceptors
from recsvc.api.reflection import enable_reflection
from recsvc.api.servicer import RecommenderServicer, add_servicer
from recsvc.bundle import BundleError, read_manifest
from recsvc.config import Settings, redact_url
from recsvc.engine import Engine, load_model
from recsvc.errors import FailedPrecondition, InvalidArgument, NotFound, RecsvcError
from recsvc.online.impressions import ImpressionLog
from recsvc.online.service import OnlineService
from recsvc.online.variants import VariantSet
from recsvc.similarity import CFModel
from recsvc.store import EmbeddedRedis, UserStore, die_with_parent, free_port
from recsvc.store.impressions import ImpressionWriter
from recsvc.v1 import recommender_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# after the grace period, how long a stopping process may take before it dumps its
# threads' stacks and exits anyway
SHUTDOWN_MARGIN_S = 15.0


def build_interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors, outermost first: a call is authorised before it
    reaches admission control (in the servicer's methods: :mod:`recsvc.api.admission`).
    Another interceptor joins by adding to this list."""
    return [*auth_interceptors(settings.auth_tokens_file, settings.host, SERVICE_NAME)]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca: clients must
    present a certificate it signed); None: plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class RecsvcServer:
    """One serving process: ``await start()``, then ``await wait()`` or ``await stop()``."""

    def __init__(self, settings: Settings):
        if settings.model is None:
            raise ValueError("no model bundle given (--model DIR or RECSVC_MODEL)")
        self.settings = settings
        self.port = 0
        self.embedded_redis: EmbeddedRedis | None = None
        self.engine: Engine | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._monitor: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._model_dir = Path()  # the configured --model directory, resolved
        self._watched_version = ""  # its model version when last loaded or seen
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        # (#13) impressions, variants, metrics
        self.impressions: ImpressionLog | None = None
        self.online: OnlineService | None = None
        self.metrics: metrics_mod.Metrics | None = None
        self.metrics_port = 0
        self._metrics_http: object | None = None
        self._metrics_poller: asyncio.Task[None] | None = None

    @property
    def redis_url(self) -> str:
        if self.settings.redis_url:
            return self.settings.redis_url
        assert self.embedded_redis is not None
        return self.embedded_redis.url

    async def start(self) -> int:
        """Load the model, connect Redis (starting the embedded one if no URL),
        and listen; returns the bound port."""
        settings = self.settings
        # one BLAS thread per serving process: two processes sharing the cores with
        # multi-threaded BLAS each made p99 jump 10x (docs: performance-notes)
        threadpool_limits(1)
        started = time.perf_counter()
        self._model_dir = settings.model.resolve()  # type: ignore[union-attr]
        model = load_model(self._model_dir)
        self._watched_version = model.model_version
        log.info(
            "model loaded: version=%s items=%d users=%d in %.2fs",
            model.model_version, len(model.items), len(model.users),
            time.perf_counter() - started,
        )  # fmt: skip
        if not settings.redis_url:
            self.embedded_redis = await asyncio.to_thread(
                EmbeddedRedis(settings.data_dir, settings.redis_appendfsync).start
            )
            if settings.embedded_redis_restarts:
                self.embedded_redis.supervise(settings.embedded_redis_restarts)
        log.info("redis: %s", redact_url(self.redis_url))
        store = UserStore.from_url(
            self.redis_url,
            timeout_s=settings.redis_timeout_s,
            cache_items=settings.state_cache_items,
            history_cap=settings.history_cap,
            dedup_window=settings.dedup_window,
            ttl_s=settings.user_ttl_s,
            stream_maxlen=settings.stream_maxlen,
            cluster=settings.redis_cluster,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        if await store.has_v1_data():  # (#12)
            log.warning("redis holds format v1 user state: run `recsvc migrate` to use it")
        self.engine = Engine(model, store, settings)
        online = self._online(model, store)

        interceptors = build_interceptors(settings)  # auth (#14), metrics...
        if settings.metrics_port:
            self.metrics = metrics_mod.Metrics()
            interceptors.append(metrics_mod.MetricsInterceptor(self.metrics))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", int(settings.reuse_port)),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                *admission_options(settings.max_pending_calls),
            ],
        )
        add_servicer(
            RecommenderServicer(self.engine, settings, self.reload_model, online), server,
            admission(settings.max_in_flight, settings.max_queue_ms),
        )  # fmt: skip
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection([SERVICE_NAME, health.SERVICE_NAME], server)
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise RuntimeError(f"could not listen on {settings.host}:{settings.port}")
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        await self._check_health()
        self._monitor = asyncio.create_task(self._monitor_health())
        if settings.model_watch_s > 0:
            self._watcher = asyncio.create_task(self._watch_model())
        self._start_metrics()
        # everything loaded so far lives as long as the process: keep it out of the
        # collector's full passes (~110k container objects, milliseconds per pass)
        gc.freeze()
        log.info(
            "serving on port %d", self.port,
            extra={"rss_mb": rss_mb(), "pid": os.getpid(), "tls": credentials is not None},
        )  # fmt: skip
        return self.port

    def _online(self, model: CFModel, store: UserStore) -> OnlineService:
        """Variants (each variant's bundle loaded once) and the impression log."""
        settings = self.settings
        assert self.engine is not None
        variants = VariantSet.load(settings.variants) if settings.variants else VariantSet.single()
        models = variants.load_bundles(
            lambda path: model if path == self._model_dir else load_model(path)
        )
        if len(variants.variants) > 1:
            log.info("variants: %s", ", ".join(f"{v.name}={v.share:g}" for v in variants.variants))
        self.impressions = ImpressionLog(
            ImpressionWriter(store.client, settings.impression_maxlen,
                             settings.impression_retention_s),
            sample_rate=settings.impression_sample_rate,
            queue_cap=settings.impression_queue,
            flush_s=settings.impression_flush_s,
        )  # fmt: skip
        self.impressions.start()
        self.online = OnlineService(self.engine, variants, self.impressions, models)
        return self.online

    def _start_metrics(self) -> None:
        """Serve /metrics (one process), or only write them (a worker of several)."""
        if self.metrics is None:
            return
        assert self.engine is not None
        self.metrics.poll(self.engine, self.impressions)
        self._metrics_poller = asyncio.create_task(
            self.metrics.poll_forever(self.engine, self.impressions)
        )
        if not self.settings.metrics_worker:  # a worker's parent serves the workers' sum
            http = metrics_mod.serve_metrics(
                self.metrics, self.settings.host, self.settings.metrics_port
            )
            self._metrics_http = http
            self.metrics_port = http.server_port  # type: ignore[attr-defined]
            log.info("metrics on port %d", self.metrics_port)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _check_health(self) -> None:
        assert self.engine is not None
        ok = await self.engine.check_store()
        await self._set_health(SERVING if ok else NOT_SERVING)

    async def _monitor_health(self) -> None:
        """SERVING only while the model is loaded and Redis answers."""
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self._check_health()
            except Exception:  # never let the monitor die
                log.exception("health check failed")

    def _resolve_model_dir(self, model_dir: str) -> Path:
        """Empty: the configured --model directory (not the last one loaded)."""
        if not model_dir:
            return self._model_dir
        root = self._model_dir.parent
        path = (root / model_dir).resolve()
        if root not in path.parents:
            raise InvalidArgument(f"model_dir must be a directory inside {root}, got {model_dir!r}")
        return path

    async def reload_model(self, model_dir: str = "") -> CFModel:
        """Load a bundle off the event loop and swap it in; the old model keeps
        serving until then, and calls that started on it finish on it."""
        assert self.engine is not None
        path = self._resolve_model_dir(model_dir)
        if not path.is_dir():
            raise NotFound(f"no model bundle directory at {path}")
        async with self._reload_lock:
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(load_model, path)
            except (BundleError, OSError, ValueError) as exc:
                raise FailedPrecondition(f"cannot load the model at {path}: {exc}") from exc
            previous = self.engine.model.model_version
            self.engine.swap_model(model)
            if path == self._model_dir:
                self._watched_version = model.model_version
        log.info(
            "model reloaded: %s -> %s from %s in %.2fs",
            previous, model.model_version, path, time.perf_counter() - started,
        )  # fmt: skip
        return model

    async def _watch_model(self) -> None:
        """Reload when the configured --model directory holds a new model version.

        It watches that directory only, whatever ReloadModel loaded since: a
        bundle loaded from elsewhere keeps serving until a new one lands there."""
        assert self.engine is not None
        while True:
            await asyncio.sleep(self.settings.model_watch_s)
            try:
                version = read_manifest(self._model_dir)["model_version"]
            except (BundleError, OSError, KeyError):
                continue  # being replaced right now, or gone: keep serving, look again
            if version != self._watched_version:  # set by a successful load of it
                try:
                    await self.reload_model()
                except RecsvcError as exc:
                    log.warning("model reload failed, keeping the current model: %s", exc)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace``, release Redis.

        Safe to call more than once and concurrently: every caller waits for
        the one shutdown to complete."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown(grace))
        await asyncio.shield(self._stopping)

    async def _shutdown(self, grace: float | None) -> None:
        grace = self.settings.grace_s if grace is None else grace
        for task in (self._monitor, self._watcher):
            if task is not None:
                task.cancel()
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self.impressions is not None:
            await self.impressions.close()
        if self._metrics_poller is not None:
            self._metrics_poller.cancel()
            if self.metrics is not None and self.engine is not None:
                self.metrics.poll(self.engine, self.impressions)  # the last counts
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)  # type: ignore[attr-defined]
        if self.engine is not None:
            cache = self.engine.store.cache
            log.info(
                "user state cache",
                extra={"hits": cache.hits, "misses": cache.misses, "dropped": cache.invalidations},
            )
            await self.engine.store.close()
        if self.embedded_redis is not None:
            await asyncio.to_thread(self.embedded_redis.stop)
        log.info("stopped")
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def _reload_quietly(server: RecsvcServer) -> None:
    try:
        await server.reload_model()
    except RecsvcError as exc:
        log.warning("model reload on SIGHUP failed, keeping the current model: %s", exc)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    server = RecsvcServer(settings)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        # a shutdown that hangs (a stuck thread, a call that ignores cancellation)
        # must not leave the process behind: dump every thread's stack, then exit
        faulthandler.dump_traceback_later(settings.grace_s + SHUTDOWN_MARGIN_S, exit=True)
        asyncio.ensure_future(server.stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload_quietly(server)))
    try:
        await server.start()
        await server.wait()
    finally:
        await server.stop()
    # stopped cleanly: every write is durable and every log line out. Skip the
    # interpreter's teardown (asyncio's executor join, grpc's exit hooks), where a
    # stuck library thread could otherwise keep the process alive
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return 0.0


def _worker_env(settings: Settings, redis_url: str, port: int) -> dict[str, str]:
    """The settings as RECSVC_* variables, for a worker process to rebuild them."""
    env = dict(os.environ)
    values = settings.model_dump(mode="json", exclude_none=True)
    values.update(redis_url=redis_url, port=port, reuse_port=True, workers=1)
    for name, value in values.items():
        env[f"RECSVC_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    return env


def serve_workers(settings: Settings) -> int:
    """Run ``settings.workers`` serving processes on one port (SO_REUSEPORT) and
    one shared Redis; each loads the model itself. SIGTERM/SIGINT stops them all."""
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(settings.data_dir, settings.redis_appendfsync).start()
        if settings.embedded_redis_restarts:
            embedded.supervise(settings.embedded_redis_restarts)
        redis_url = embedded.url
    port = settings.port or free_port(settings.host)
    env = _worker_env(settings, redis_url, port)
    metrics_dir, metrics_http = None, None
    if settings.metrics_port:  # (#13) workers write files, this process serves their sum
        metrics_dir = metrics_mod.prepare_multiprocess_dir(
            (settings.metrics_dir or settings.data_dir / "metrics").resolve()
        )
        env[metrics_mod.MULTIPROC_ENV] = str(metrics_dir)  # read by prometheus-client
        env["RECSVC_METRICS_WORKER"] = "true"
        metrics_http = metrics_mod.serve_multiprocess(
            metrics_dir, settings.host, settings.metrics_port
        )
        log.info("metrics on port %d", metrics_http.server_port)
    command = [sys.executable, "-m", "recsvc.cli", "serve"]
    workers = [
        subprocess.Popen(command, env=env, preexec_fn=die_with_parent)
        for _ in range(settings.workers)
    ]
    log.info("started %d workers on port %d", len(workers), port,
             extra={"pids": ",".join(str(w.pid) for w in workers)})  # fmt: skip

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        while all(w.poll() is None for w in workers):
            time.sleep(0.2)
    finally:
        forward(signal.SIGTERM, None)  # one worker died: stop the rest too
        codes = [_reap(w, settings.grace_s + 2 * SHUTDOWN_MARGIN_S) for w in workers]
        if metrics_http is not None and metrics_dir is not None:
            metrics_http.shutdown()
            for worker in workers:
                metrics_mod.worker_exited(metrics_dir, worker.pid)
        if embedded is not None:
            embedded.stop()
    # a worker still starting when we asked it to stop dies of the SIGTERM itself
    return max((abs(c) for c in codes if c != -signal.SIGTERM), default=0)


def _reap(worker: subprocess.Popen[bytes], timeout_s: float) -> int:
    """The worker's exit code; SIGKILL (logged) if it has not exited within ``timeout_s``
    (its own watchdog should have ended it well before)."""
    try:
        return worker.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.error("worker %d did not stop within %.0f s: killed", worker.pid, timeout_s)
        worker.kill()
        return worker.wait()
