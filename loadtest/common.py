"""Shared pieces of the load-test modes: targets, channels, latency recording, progress."""

from __future__ import annotations

import asyncio
import datetime as _dt
import ipaddress
import math
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

from recsvc.v1 import recommender_pb2_grpc as pb_grpc

# Latencies are recorded in microseconds, 1 us .. 1 h, 3 significant digits
# (0.1 % value error). Values outside are clamped, never dropped.
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000
HIST_DIGITS = 3

HIST_BASE = 2 ** (1 / 8)  # log-bucket ratio of the exported histogram (9 % wide)

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


class UsageError(Exception):
    """A bad command line or input file: printed without a traceback."""


# -- targets and channels ------------------------------------------------------------


def split_target(target: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    t = target.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"bad target {target!r}: expected [IPv6]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = t.rpartition(":")
        if not sep or not host:
            raise UsageError(f"bad target {target!r}: expected HOST:PORT")
    try:
        port = int(port_s)
    except ValueError:
        raise UsageError(f"bad port in target {target!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"bad port in target {target!r}")
    return host, port


def check_target(target: str, allow_remote: bool = False) -> str:
    """Validate HOST:PORT, or several comma-separated (calls are spread over them);
    unless allow_remote, each HOST must be loopback (127.0.0.0/8, ::1).

    Returns the gRPC target string (comma-separated for several).
    """
    if "," in target:
        return ",".join(check_target(t, allow_remote) for t in target.split(",") if t.strip())
    host, port = split_target(target)
    if not allow_remote:
        try:
            addrs = {ipaddress.ip_address(host)}
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise UsageError(f"cannot resolve {host!r}: {e}") from None
            addrs = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
        if not addrs or not all(a.is_loopback for a in addrs):
            raise UsageError(
                f"target {target!r} is not a loopback address; load tests only send to "
                "127.0.0.1 / localhost (pass --allow-remote to override)"
            )
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


CHANNEL_OPTIONS = [
    # Each channel gets its own subchannel, hence its own TCP connection; by
    # default channels with equal arguments share one connection.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class _BearerToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every call on a plaintext channel
    (on TLS channels the token travels as call credentials instead)."""

    def __init__(self, token: str):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details):  # type: ignore[no-untyped-def]
        metadata = tuple(details.metadata or ()) + self.metadata
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), request)

    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), request_iterator)


class ChannelSecurity:
    """How the load clients reach a server run with --tls-cert / --auth-tokens:
    TLS with a CA (and a client certificate for mutual TLS), a bearer token.
    Set once from the command line by :func:`configure_channels`."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    server_name: str | None = None


SECURITY = ChannelSecurity()


def configure_channels(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    token: str | None = None,
    server_name: str | None = None,
) -> None:
    """TLS and token settings for every channel :func:`open_channels` opens from now on."""
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if cert is not None and ca is None:
        raise UsageError("a client certificate needs --tls-ca")
    SECURITY.ca = open(ca, "rb").read() if ca else None  # noqa: SIM115
    SECURITY.cert = open(cert, "rb").read() if cert else None  # noqa: SIM115
    SECURITY.key = open(key, "rb").read() if key else None  # noqa: SIM115
    SECURITY.token = token or None
    SECURITY.server_name = server_name


def _new_channel(target: str) -> grpc.aio.Channel:
    options = list(CHANNEL_OPTIONS)
    if SECURITY.ca is None:
        interceptors = [_BearerToken(SECURITY.token)] if SECURITY.token else None
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(SECURITY.ca, SECURITY.key, SECURITY.cert)
    if SECURITY.token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(SECURITY.token)
        )
    if SECURITY.server_name:
        options.append(("grpc.ssl_target_name_override", SECURITY.server_name))
    return grpc.aio.secure_channel(target, credentials, options=options)


async def open_channels(
    target: str, n: int, connect_timeout: float = 5.0
) -> tuple[list[grpc.aio.Channel], list[pb_grpc.RecommenderStub]]:
    """n channels (n TCP connections) to target, all connected, and a stub on each
    (TLS and a bearer token as :func:`configure_channels` set them). With several
    comma-separated targets (#12), channel i goes to target i mod their number (n is
    rounded up to a multiple of it): calls spread over the targets."""
    targets = target.split(",")
    n = -(-max(n, 1) // len(targets)) * len(targets)
    channels = [_new_channel(targets[i % len(targets)]) for i in range(n)]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(ch.channel_ready() for ch in channels)), connect_timeout
        )
    except TimeoutError:
        await close_channels(channels)
        raise UsageError(f"could not connect to {target} within {connect_timeout:g} s") from None
    return channels, [pb_grpc.RecommenderStub(ch) for ch in channels]


async def close_channels(channels: Iterable[grpc.aio.Channel]) -> None:
    await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)


def error_name(exc: BaseException) -> str:
    """gRPC status code name for an RPC error; CLIENT_<Type> for anything else."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        try:
            return exc.code().name  # type: ignore[attr-defined]
        except Exception:  # pragma: no cover
            pass
    return f"CLIENT_{type(exc).__name__}"


def error_detail(exc: BaseException) -> str:
    """A short example message for an error (the gRPC status details, or the repr)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return (exc.details() or "")[:300]
    return repr(exc)[:300]


# -- histograms ----------------------------------------------------------------------


class Histogram(HdrHistogram):
    """HdrHistogram with its read side vectorized over the counts array.

    hdrh's pure-Python percentile/mean/reset loop over all ~23k counters (7-90 ms
    each); these numpy versions take microseconds and return the same values
    (highest equivalent value of the bucket holding the target count, like hdrh).
    """

    _tables: dict = {}

    def __init__(self) -> None:
        super().__init__(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)
        self._np_counts = np.ctypeslib.as_array(self.counts)
        key = self.counts_len
        if key not in Histogram._tables:
            highest = np.empty(self.counts_len, dtype=np.float64)
            median = np.empty(self.counts_len, dtype=np.float64)
            for i in range(self.counts_len):
                v = self.get_value_from_index(i)
                highest[i] = self.get_highest_equivalent_value(v)
                median[i] = self._hdr_median_equiv_value(v)
            Histogram._tables[key] = (highest, median)
        self._highest, self._median = Histogram._tables[key]

    def values_at_percentiles(self, percentiles) -> list[int]:
        total = self.total_count
        if not total:
            return [0 for _ in percentiles]
        cum = np.cumsum(self._np_counts)
        targets = [max(int(min(p, 100.0) * total / 100 + 0.5), 1) for p in percentiles]
        idx = np.searchsorted(cum, targets, side="left")
        np.minimum(idx, self.counts_len - 1, out=idx)
        return [int(self._highest[i]) for i in idx]

    def get_value_at_percentile(self, percentile):
        return self.values_at_percentiles([percentile])[0]

    def get_mean_value(self):
        if not self.total_count:
            return 0.0
        return float(np.dot(self._np_counts.astype(np.float64), self._median) / self.total_count)

    def reset(self):
        self._np_counts[:] = 0
        self.total_count = 0
        self.min_value = sys.maxsize
        self.max_value = 0
        self.start_time_stamp_msec = sys.maxsize
        self.end_time_stamp_msec = 0


def new_hist() -> Histogram:
    return Histogram()


def encode_hist(h: HdrHistogram) -> str:
    """The histogram as HdrHistogram's compressed base64 text (for JSON reports)."""
    return h.encode().decode("ascii")


def to_us(seconds: float) -> int:
    us = int(seconds * 1e6)
    if us < HIST_LOWEST_US:
        return HIST_LOWEST_US
    if us > HIST_HIGHEST_US:
        return HIST_HIGHEST_US
    return us


def _ms(us: float) -> float:
    return round(us / 1000.0, 3)


def summarize(h: HdrHistogram) -> dict:
    """count, min, mean, p50, p90, p99, p99.9, max in milliseconds (None when empty)."""
    n = h.get_total_count()
    out: dict = {"count": n}
    if n == 0:
        out.update({"min": None, "mean": None, **{k: None for k, _ in PERCENTILES}, "max": None})
        return out
    out["min"] = _ms(h.get_min_value())
    out["mean"] = _ms(h.get_mean_value())
    values = h.values_at_percentiles([p for _, p in PERCENTILES])
    for (key, _), v in zip(PERCENTILES, values, strict=True):
        out[key] = _ms(v)
    out["max"] = _ms(h.get_max_value())
    return out


def histogram_buckets(h: HdrHistogram, first_us: int = 10, base: float = HIST_BASE) -> list:
    """Log-spaced buckets [[upper_ms, count], ...] up to the max value (for plots)."""
    if h.get_total_count() == 0:
        return []
    out = []
    for step in h.get_log_iterator(first_us, base):
        out.append([round(step.value_iterated_to / 1000.0, 4), step.count_added_in_this_iter_step])
    # drop the empty leading buckets below the minimum, keep one for the plot's left edge
    while len(out) > 1 and out[0][1] == 0 and out[1][1] == 0:
        out.pop(0)
    return out


# -- recording -------------------------------------------------------------------------


class KindStats:
    __slots__ = ("name", "hist", "requests", "errors")

    def __init__(self, name: str) -> None:
        self.name = name
        self.hist = new_hist()
        self.requests = 0
        self.errors: Counter[str] = Counter()


class Recorder:
    """Latencies (all completed calls, OK or not) overall, per call type and per interval.

    ``record(kind, start, end, code)`` with perf_counter times; calls that started
    before ``t0`` (warmup) are only counted in ``warmup_requests``. ``roll(now)``
    closes the current interval (about once a second, from the progress ticker)
    into ``timeline``.
    """

    def __init__(self, kinds: Iterable[str], t0: float) -> None:
        self.t0 = t0
        self.hist = new_hist()
        self.ok_hist = new_hist()
        self.kinds = {k: KindStats(k) for k in kinds}
        self.errors: Counter[str] = Counter()
        self.requests = 0
        self.n_errors = 0
        self.warmup_requests = 0
        self.last_end = t0
        self.timeline: list[dict] = []
        self._iv = new_hist()
        self._iv_n = 0
        self._iv_err = 0
        self._iv_start = t0
        self._iv_extra: Counter[str] = Counter()

    def kind(self, name: str) -> KindStats:
        ks = self.kinds.get(name)
        if ks is None:
            ks = self.kinds[name] = KindStats(name)
        return ks

    def record(self, kind: str, start: float, end: float, code: str | None = None) -> None:
        if start < self.t0:
            self.warmup_requests += 1
            return
        us = to_us(end - start)
        self.requests += 1
        self._iv_n += 1
        self.hist.record_value(us)
        self._iv.record_value(us)
        ks = self.kinds.get(kind) or self.kind(kind)
        ks.requests += 1
        ks.hist.record_value(us)
        if code is None:
            self.ok_hist.record_value(us)
        else:
            self.n_errors += 1
            self._iv_err += 1
            self.errors[code] += 1
            ks.errors[code] += 1
        if end > self.last_end:
            self.last_end = end

    def count(self, key: str, n: int = 1) -> None:
        """A per-interval counter shown in the timeline (e.g. 'sent')."""
        self._iv_extra[key] += n

    def roll(self, now: float) -> dict:
        # an interval that began in the warmup only holds what came after t0
        dt = max(now - max(self._iv_start, self.t0), 1e-9)
        h = self._iv
        entry = {
            "t": round(now - self.t0, 3),
            "dt": round(dt, 3),
            "requests": self._iv_n,
            "errors": self._iv_err,
            "rps": round(self._iv_n / dt, 1),
        }
        if self._iv_n:
            p50, p90, p99 = h.values_at_percentiles((50, 90, 99))
            entry["p50_ms"] = _ms(p50)
            entry["p90_ms"] = _ms(p90)
            entry["p99_ms"] = _ms(p99)
            entry["max_ms"] = _ms(h.get_max_value())
        else:
            entry.update({"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None})
        for key, n in self._iv_extra.items():
            entry[key] = n
        if now >= self.t0 and (dt > 0.05 or self._iv_n):
            self.timeline.append(entry)
        h.reset()
        self._iv_n = self._iv_err = 0
        self._iv_extra.clear()
        self._iv_start = now
        return entry

    def roll_final(self, now: float) -> dict:
        """Close the last, partial interval (unless it is negligibly short and empty);
        returns the last timeline entry (for the final progress line)."""
        if now - self._iv_start > 0.05 or self._iv_n or not self.timeline:
            entry = self.roll(now)
            return self.timeline[-1] if self.timeline else entry
        return self.timeline[-1]

    def summary(self, elapsed: float) -> dict:
        """The common report fields."""
        elapsed = max(elapsed, 1e-9)
        by_call = {}
        for name, ks in self.kinds.items():
            by_call[name] = {
                "requests": ks.requests,
                "ok": ks.requests - sum(ks.errors.values()),
                "errors": sum(ks.errors.values()),
                "errors_by_code": dict(ks.errors.most_common()),
                "throughput_rps": round(ks.requests / elapsed, 2),
                "latency_ms": summarize(ks.hist),
            }
        return {
            "duration_s": round(elapsed, 4),
            "requests": self.requests,
            "ok": self.requests - self.n_errors,
            "errors": self.n_errors,
            "errors_by_code": dict(self.errors.most_common()),
            "throughput_rps": round(self.requests / elapsed, 2),
            "ok_throughput_rps": round((self.requests - self.n_errors) / elapsed, 2),
            "latency_ms": summarize(self.hist),
            "ok_latency_ms": summarize(self.ok_hist),
            "latency_histogram_ms": histogram_buckets(self.hist),
            "by_call": by_call,
            "timeline": self.timeline,
            "warmup_requests": self.warmup_requests,
            # the histograms themselves (HdrHistogram base64, microseconds), so reports of
            # several client processes can be merged exactly: python -m loadtest merge
            "hdr": {
                "unit": "us",
                "all": encode_hist(self.hist),
                "ok": encode_hist(self.ok_hist),
                "by_call": {name: encode_hist(ks.hist) for name, ks in self.kinds.items()},
            },
        }


# -- progress and timing -------------------------------------------------------------


class Progress:
    """The live progress line on stderr: rewritten in place on a terminal, one line per
    update otherwise (logs, CI)."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._dirty = False

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._dirty = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False


def fmt_ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v >= 100:
        return f"{v:.0f}ms"
    if v >= 10:
        return f"{v:.1f}ms"
    return f"{v:.2f}ms"


async def run_ticking(work, t_start: float, on_tick, progress) -> float:
    """Await ``work`` while ``on_tick(now)`` reports progress every second; then a
    final tick, and the progress line closed. Returns when the work finished."""
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(1.0, t_start, on_tick, stop))
    try:
        await work
    finally:
        stop.set()
        await tick
    t_done = time.perf_counter()
    on_tick(t_done, final=True)
    progress.done()
    return t_done


async def ticker(interval: float, t_start: float, fn, stop: asyncio.Event) -> None:
    """Call fn(now) every `interval` seconds (aligned on t_start) until stop is set."""
    n = 1
    while not stop.is_set():
        due = t_start + n * interval
        delay = due - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass
        else:
            n = int((time.perf_counter() - t_start) / interval)  # skip missed ticks
        fn(time.perf_counter())
        n += 1


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class CpuMeter:
    """This process's CPU time (all threads, gRPC core included) over a window."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()

    def stop(self, requests: int) -> dict:
        cpu = time.process_time() - self._cpu0
        wall = max(time.perf_counter() - self._wall0, 1e-9)
        out = {
            "cpu_s": round(cpu, 3),
            "cpu_utilization": round(cpu / wall, 3),
            "cpu_us_per_request": round(cpu / requests * 1e6, 1) if requests else None,
            "pid": os.getpid(),
            "cpu_count": os.cpu_count(),
        }
        try:
            out["loadavg_1m"] = round(os.getloadavg()[0], 2)
        except OSError:  # pragma: no cover
            pass
        return out


def install_stop_signals(stop: asyncio.Event) -> None:
    """First Ctrl-C / SIGTERM: stop early and still report; the second one kills."""
    import signal

    loop = asyncio.get_running_loop()

    def handler(sig):
        if stop.is_set():
            loop.remove_signal_handler(sig)
            os.kill(os.getpid(), sig)
            return
        print("\nstopping early (again to abort)...", file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
