"""`run` mode: unary RPC load (Recommend, SimilarItems, SendFeedback, GetUserState).

Closed loop (``concurrency``): N workers, each issuing its next call as soon as
the previous one returns; latency is measured per call, and a slow server shows
up as a lower request rate.

Open loop (``rate``): request i is due at ``t_start + i / rate`` whatever the
server does, and its latency is measured from that intended send time, so a
slow server shows up as latency, not as a lower send rate (no coordinated
omission). Outstanding requests are capped (``max_outstanding``); when the cap
is hit a due request either waits for a free slot (``on_cap='wait'``: it is
sent late and its latency still counts from the intended time) or is not sent
(``on_cap='drop'``), and the report says how many requests were late
(sent more than ``late_ms`` after their intended time, whatever the reason: cap
or a saturated client), waited for the cap, were dropped, or were never sent
before the end.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from recsvc.v1 import recommender_pb2 as pb

from .common import (
    CpuMeter,
    Progress,
    Recorder,
    UsageError,
    close_channels,
    encode_hist,
    error_detail,
    error_name,
    fmt_ms,
    new_hist,
    now_iso,
    open_channels,
    run_ticking,
    summarize,
    to_us,
)
from .ids import IdSource, WeightedSampler

KIND_ALIASES = {
    "recommend": "recommend",
    "similar": "similar",
    "similar_items": "similar",
    "similaritems": "similar",
    "feedback": "feedback",
    "send_feedback": "feedback",
    "sendfeedback": "feedback",
    "user_state": "user_state",
    "state": "user_state",
    "get_user_state": "user_state",
    "getuserstate": "user_state",
    "generate": "generate",
}

# A realistic funnel: most events are views, few are purchases.
EVENT_TYPE_WEIGHTS = {
    pb.VIEW: 0.70,
    pb.CLICK: 0.20,
    pb.ADD_TO_CART: 0.07,
    pb.PURCHASE: 0.03,
}


def parse_mix(spec: str) -> dict[str, float]:
    """'recommend=0.8,similar=0.1,feedback=0.1' -> normalized weights."""
    mix: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, w = part.partition("=")
        kind = KIND_ALIASES.get(name.strip().lower())
        if kind is None:
            raise UsageError(
                f"unknown call type {name!r} in --mix "
                "(use recommend, similar, feedback, user_state, generate)"
            )
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            raise UsageError(f"bad weight in --mix: {part!r}") from None
        if weight < 0:
            raise UsageError(f"negative weight in --mix: {part!r}")
        mix[kind] = mix.get(kind, 0.0) + weight
    total = sum(mix.values())
    if total <= 0:
        raise UsageError(f"--mix {spec!r} has no positive weight")
    return {k: v / total for k, v in mix.items() if v > 0}


@dataclass
class RunConfig:
    target: str
    duration: float
    concurrency: int | None = None
    rate: float | None = None
    mix: dict[str, float] = field(default_factory=lambda: {"recommend": 1.0})
    k: int = 20
    warmup: float = 0.0
    timeout: float = 5.0
    channels: int = 2
    max_outstanding: int = 2000
    on_cap: str = "wait"
    late_ms: float = 10.0
    max_requests: int | None = None
    feedback_batch: int = 1
    backoff: bool = True  # closed loop: wait retry-after-ms after RESOURCE_EXHAUSTED
    seed: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise UsageError(
                "give exactly one of --concurrency (closed loop) or --rate (open loop)"
            )
        if self.concurrency is not None and self.concurrency < 1:
            raise UsageError("--concurrency must be >= 1")
        if self.rate is not None and not self.rate > 0:
            raise UsageError("--rate must be > 0")
        if not self.duration > 0:
            raise UsageError("--duration must be > 0")
        if self.warmup < 0:
            raise UsageError("--warmup must be >= 0")
        if self.channels < 1:
            raise UsageError("--channels must be >= 1")
        if self.max_outstanding < 1:
            raise UsageError("--max-outstanding must be >= 1")
        if self.on_cap not in ("wait", "drop"):
            raise UsageError("--on-cap must be wait or drop")
        if self.feedback_batch < 1:
            raise UsageError("--feedback-batch must be >= 1")


def retry_after_s(exc: BaseException, cap_s: float = 1.0) -> float:
    """The server's ``retry-after-ms`` trailer of a refused call, in seconds (at
    most ``cap_s``); 0 when it sent none."""
    try:
        trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        return min(cap_s, max(0.0, float(trailers.get("retry-after-ms", 0)) / 1000))
    except (AttributeError, TypeError, ValueError):
        return 0.0


class RequestFactory:
    """Builds the next request of each call type; ids drawn from an IdSource."""

    def __init__(
        self, ids: IdSource, k: int, feedback_batch: int = 1, rng: np.random.Generator | None = None
    ) -> None:
        rng = rng if rng is not None else np.random.default_rng()
        self.users = ids.users
        self.items = ids.items
        self.k = k
        self.feedback_batch = feedback_batch
        self.event_types = WeightedSampler(
            list(EVENT_TYPE_WEIGHTS), list(EVENT_TYPE_WEIGHTS.values()), rng=rng
        )
        # unique per run and process; a counter is much cheaper than uuid4 per event
        self.event_prefix = f"lt-{uuid.uuid4().hex[:16]}-"
        self._seq = itertools.count()
        self.events_made = 0

    def event(self, user_id: str | None = None, item_id: str | None = None, type_=None):
        self.events_made += 1
        return pb.FeedbackEvent(
            event_id=f"{self.event_prefix}{next(self._seq)}",
            user_id=user_id if user_id is not None else self.users.next(),
            item_id=item_id if item_id is not None else self.items.next(),
            type=type_ if type_ is not None else self.event_types.next(),
        )

    def recommend(self, stub):
        return stub.Recommend, pb.RecommendRequest(user_id=self.users.next(), k=self.k)

    def similar(self, stub):
        return stub.SimilarItems, pb.SimilarItemsRequest(item_id=self.items.next(), k=self.k)

    def feedback(self, stub):
        if self.feedback_batch == 1:
            events = [self.event()]
        else:
            user = self.users.next()  # a batch is one user's session
            events = [self.event(user_id=user) for _ in range(self.feedback_batch)]
        return stub.SendFeedback, pb.SendFeedbackRequest(events=events)

    def user_state(self, stub):
        return stub.GetUserState, pb.GetUserStateRequest(user_id=self.users.next())

    def generate(self, stub):
        """Generate n = k items (at most 100), default settings, a fixed seed."""
        request = pb.GenerateRequest(user_id=self.users.next(), n=min(self.k, 100), seed=1)
        return stub.Generate, request

    def builders(self) -> dict:
        return {
            "generate": self.generate,
            "recommend": self.recommend,
            "similar": self.similar,
            "feedback": self.feedback,
            "user_state": self.user_state,
        }


class LoadRun:
    def __init__(self, cfg: RunConfig, ids: IdSource, stop: asyncio.Event | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.ids = ids
        self.stop = stop or asyncio.Event()
        rng = np.random.default_rng(cfg.seed)
        self.factory = RequestFactory(ids, cfg.k, cfg.feedback_batch, rng)
        kinds = list(cfg.mix)
        self.kinds = WeightedSampler(kinds, [cfg.mix[k] for k in kinds], rng=rng)
        self.builders = self.factory.builders()
        self.progress = Progress(cfg.progress)
        self.stubs: list = []
        self.rec: Recorder | None = None
        self.t_start = self.t_measure = self.t_end = 0.0
        self.issued = 0
        self.backed_off_s = 0.0
        self.outstanding = 0
        self.unfinished = 0
        self.error_examples: dict[str, str] = {}  # first message per error name
        # open loop accounting (measured window only)
        self.ol = {
            "intended": 0,
            "sent": 0,
            "late": 0,
            "waited_for_cap": 0,
            "dropped": 0,
            "unsent_at_end": 0,
        }
        self.lag_hist = new_hist()
        self._slot = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # -- one call --------------------------------------------------------------------

    def _note_error(self, name: str, exc: BaseException) -> None:
        if name not in self.error_examples:
            self.error_examples[name] = error_detail(exc)

    async def _worker(self, wid: int) -> None:
        stub = self.stubs[wid % len(self.stubs)]
        next_kind = self.kinds.next
        builders = self.builders
        record = self.rec.record
        timeout = self.cfg.timeout
        t_end = self.t_end
        limit = self.cfg.max_requests
        pc = time.perf_counter
        stop = self.stop
        while not stop.is_set():
            if limit is not None and self.issued >= limit:
                break
            if pc() >= t_end:
                break
            kind = next_kind()
            method, req = builders[kind](stub)
            self.issued += 1
            t0 = pc()
            code = None
            wait_s = 0.0
            try:
                await method(req, timeout=timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure is counted by name
                code = error_name(e)
                self._note_error(code, e)
                if code == "RESOURCE_EXHAUSTED" and self.cfg.backoff:
                    wait_s = retry_after_s(e)
            record(kind, t0, pc(), code)
            if wait_s:
                self.backed_off_s += wait_s
                await asyncio.sleep(wait_s)

    async def _one(self, method, req, kind: str, intended: float, measured: bool) -> None:
        pc = time.perf_counter
        if measured:
            lag = pc() - intended
            self.lag_hist.record_value(to_us(lag))
            if lag * 1000.0 > self.cfg.late_ms:
                self.ol["late"] += 1
        code = None
        try:
            await method(req, timeout=self.cfg.timeout)
        except asyncio.CancelledError:
            self.unfinished += 1
            raise
        except Exception as e:  # noqa: BLE001
            code = error_name(e)
            self._note_error(code, e)
        finally:
            self.outstanding -= 1
            if self.outstanding < self.cfg.max_outstanding:
                self._slot.set()
        self.rec.record(kind, intended, pc(), code)

    # -- loops -----------------------------------------------------------------------

    async def _closed_loop(self) -> None:
        workers = [asyncio.create_task(self._worker(w)) for w in range(self.cfg.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()

    async def _open_loop(self) -> None:
        cfg = self.cfg
        interval = 1.0 / cfg.rate
        n_total = int(cfg.rate * (cfg.warmup + cfg.duration) + 1e-9)
        if cfg.max_requests is not None:
            n_total = min(n_total, cfg.max_requests)
        t_start, t_measure, t_end = self.t_start, self.t_measure, self.t_end
        pc = time.perf_counter
        loop = asyncio.get_running_loop()
        next_kind = self.kinds.next
        builders = self.builders
        stubs = self.stubs
        n_stubs = len(stubs)
        cap = cfg.max_outstanding
        drop = cfg.on_cap == "drop"
        ol = self.ol
        tasks = self._tasks
        i = 0
        since_yield = 0
        while i < n_total and not self.stop.is_set():
            intended = t_start + i * interval
            now = pc()
            if intended > now:
                since_yield = 0
                await asyncio.sleep(intended - now)
                continue
            measured = intended >= t_measure
            if measured:
                ol["intended"] += 1
            if self.outstanding >= cap:
                if drop:
                    if measured:
                        ol["dropped"] += 1
                    i += 1
                    continue
                if measured:
                    ol["waited_for_cap"] += 1
                self._slot.clear()
                try:
                    await asyncio.wait_for(self._slot.wait(), max(t_end - pc(), 0.0))
                except TimeoutError:
                    if measured:
                        ol["intended"] -= 1  # counted below with the rest
                    break
                if self.stop.is_set():
                    if measured:
                        ol["intended"] -= 1
                    break
            kind = next_kind()
            method, req = builders[kind](stubs[i % n_stubs])
            self.outstanding += 1
            self.issued += 1
            if measured:
                ol["sent"] += 1
                self.rec.count("sent")
            task = loop.create_task(self._one(method, req, kind, intended, measured))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            since_yield += 1
            if since_yield >= 32:  # let the due calls start before queueing more
                since_yield = 0
                await asyncio.sleep(0)
        # due requests of the measured window that were never sent (stopped at the cap)
        first_measured = max(0, int(np.ceil((t_measure - t_start) / interval - 1e-9)))
        remaining = n_total - max(i, first_measured)
        if remaining > 0 and not self.stop.is_set():
            ol["unsent_at_end"] += remaining
            ol["intended"] += remaining

    async def _load(self) -> None:
        if self.cfg.rate is not None:
            await self._open_loop()
        else:
            await self._closed_loop()
        await self._drain()

    async def _drain(self) -> None:
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=self.cfg.timeout + 1.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # -- progress --------------------------------------------------------------------

    def _tick(self, now: float, final: bool = False) -> None:
        entry = self.rec.roll_final(now) if final else self.rec.roll(now)
        if not self.cfg.progress:
            return
        if now < self.t_measure:
            text = (
                f"[run] warmup {now - self.t_start:5.1f}s/{self.cfg.warmup:g}s  "
                f"calls={self.rec.warmup_requests}"
            )
        else:
            rec = self.rec
            # the last second's rate while running; the average over the run at the end
            rps = rec.requests / max(now - self.t_measure, 1e-9) if final else entry["rps"]
            text = (
                f"[run{' done' if final else ''}] "
                f"{now - self.t_measure:6.1f}s/{self.cfg.duration:g}s  "
                f"reqs={rec.requests}  rps={rps:.0f}  p99={fmt_ms(entry['p99_ms'])}  "
                f"err={rec.n_errors}"
            )
            if self.cfg.rate is not None:
                ol = self.ol
                text += (
                    f"  out={self.outstanding}  late={ol['late']}  "
                    f"dropped={ol['dropped'] + ol['unsent_at_end']}"
                )
        self.progress.show(text)

    # -- main ------------------------------------------------------------------------

    async def run(self) -> dict:
        cfg = self.cfg
        channels, self.stubs = await open_channels(cfg.target, cfg.channels)
        started_at = now_iso()
        start_unix = time.time()
        cpu = CpuMeter()
        try:
            self.t_start = time.perf_counter()
            self.t_measure = self.t_start + cfg.warmup
            self.t_end = self.t_measure + cfg.duration
            self.rec = Recorder(list(cfg.mix), self.t_measure)
            warm_cpu = asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + cfg.warmup, cpu.start
            )
            try:
                t_done = await run_ticking(self._load(), self.t_start, self._tick, self.progress)
            finally:
                warm_cpu.cancel()
        finally:
            await close_channels(channels)
        rec = self.rec
        elapsed = max(rec.last_end, min(t_done, self.t_end)) - self.t_measure
        report = {
            "mode": "run",
            "loop": "open" if cfg.rate is not None else "closed",
            "target": cfg.target,
            "started_at": started_at,
            "finished_at": now_iso(),
            "start_unix": round(start_unix, 3),
            "measure_start_unix": round(start_unix + cfg.warmup, 3),
            "interrupted": self.stop.is_set(),
            "config": {**asdict(cfg), "ids": self.ids.describe()},
            **rec.summary(elapsed),
            "unfinished": self.unfinished,
        }
        if cfg.rate is not None:
            window = cfg.duration
            report["open_loop"] = {
                "rate": cfg.rate,
                **self.ol,
                "send_rate": round(self.ol["sent"] / window, 2),
                "max_outstanding": cfg.max_outstanding,
                "on_cap": cfg.on_cap,
                "late_threshold_ms": cfg.late_ms,
                "send_lag_ms": summarize(self.lag_hist),
            }
            report["hdr"]["send_lag"] = encode_hist(self.lag_hist)
        else:
            report["closed_loop"] = {
                "concurrency": cfg.concurrency,
                "backoff": cfg.backoff,
                "backed_off_s": round(self.backed_off_s, 3),  # waited on retry-after-ms
            }
        report["client"] = {
            **cpu.stop(rec.requests),
            "channels": cfg.channels,
            "feedback_events_sent": self.factory.events_made,
        }
        report["error_examples"] = self.error_examples
        return report


async def run_load(cfg: RunConfig, ids: IdSource, stop: asyncio.Event | None = None) -> dict:
    """Run one load (in the running event loop) and return its report."""
    return await LoadRun(cfg, ids, stop).run()
