"""`freshness` mode: how soon does feedback show up in recommendations?

For each sample: a fresh synthetic user ``fresh-<uuid>`` asks for
recommendations (twice: the cold-start baseline, and a check that this baseline
is stable), sends one PURCHASE of an item (SendFeedback), then polls Recommend
back to back (or every ``poll_interval_ms``) until the response reflects the
event, for at most ``timeout`` seconds. Freshness is the time from just before
SendFeedback is sent to the receipt of the first Recommend response that
reflects it.

What "reflects" means (``criterion``):

* ``personalized``: ``personalized`` is true while the baseline's was false;
* ``changed``: the item list differs from the baseline (only usable when the
  two baseline lists were equal, i.e. the server's cold-start list is
  deterministic; otherwise the sample counts as undetectable);
* ``auto`` (default): either of them.

The contract says SendFeedback returns only once the event is applied, so on a
consistent server the first poll already reflects it and freshness is about one
SendFeedback plus one Recommend round trip; ``reflected_on_first_poll`` counts
those.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from recsvc.v1 import recommender_pb2 as pb

from .common import (
    CpuMeter,
    Progress,
    Recorder,
    UsageError,
    close_channels,
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
from .ids import IdSource
from .run import RequestFactory

KIND = "freshness"


@dataclass
class FreshnessConfig:
    target: str
    samples: int = 100
    concurrency: int = 1
    k: int = 20
    timeout: float = 5.0
    poll_interval_ms: float = 0.0
    max_time: float = 120.0
    criterion: str = "auto"
    rpc_timeout: float = 5.0
    user_prefix: str = "fresh-"
    seed: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.samples < 1:
            raise UsageError("--samples must be >= 1")
        if self.concurrency < 1:
            raise UsageError("--concurrency must be >= 1")
        if not self.timeout > 0:
            raise UsageError("--timeout must be > 0")
        if self.criterion not in ("auto", "personalized", "changed"):
            raise UsageError("--criterion must be auto, personalized or changed")


def _counts(h) -> dict:
    """Summary of a histogram of plain counts (not latencies)."""
    if h.get_total_count() == 0:
        return {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}
    return {
        "count": h.get_total_count(),
        "mean": round(h.get_mean_value(), 2),
        "p50": h.get_value_at_percentile(50),
        "p99": h.get_value_at_percentile(99),
        "max": h.get_max_value(),
    }


def _ids(resp: pb.RecommendResponse) -> list[str]:
    return [it.item_id for it in resp.items]


class FreshnessRun:
    def __init__(self, cfg: FreshnessConfig, ids: IdSource, stop: asyncio.Event | None = None):
        cfg.validate()
        self.cfg = cfg
        self.ids = ids
        self.stop = stop or asyncio.Event()
        self.factory = RequestFactory(ids, cfg.k, 1, np.random.default_rng(cfg.seed))
        self.progress = Progress(cfg.progress)
        self.rec: Recorder | None = None
        self.c: Counter[str] = Counter()
        self.reflected_by: Counter[str] = Counter()
        self.ack_hist = new_hist()
        self.poll_hist = new_hist()
        self.polls_hist = new_hist()  # polls per reflected sample
        self.samples: list[dict] = []
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}  # first message per error name
        self._next = 0
        self.t_start = 0.0

    async def _recommend(self, stub, user: str) -> pb.RecommendResponse:
        t = time.perf_counter()
        resp = await stub.Recommend(
            pb.RecommendRequest(user_id=user, k=self.cfg.k), timeout=self.cfg.rpc_timeout
        )
        self.poll_hist.record_value(to_us(time.perf_counter() - t))
        return resp

    async def _sample(self, stub, feedback_stub) -> None:
        cfg = self.cfg
        pc = time.perf_counter
        user = f"{cfg.user_prefix}{uuid.uuid4()}"
        item = self.factory.items.next()
        out: dict = {"t": round(pc() - self.t_start, 4), "user": user, "item": item}
        try:
            b1 = await self._recommend(stub, user)
            base = _ids(b1)
            stable = True
            if cfg.criterion != "personalized":
                stable = _ids(await self._recommend(stub, user)) == base
                if not stable:
                    self.c["baseline_unstable"] += 1
            use_personalized = cfg.criterion in ("auto", "personalized") and not b1.personalized
            use_changed = cfg.criterion in ("auto", "changed") and stable
            if not (use_personalized or use_changed):
                self.c["undetectable"] += 1
                out["result"] = "undetectable"
                return
            ev = self.factory.event(user_id=user, item_id=item, type_=pb.PURCHASE)
            t0 = pc()
            await feedback_stub.SendFeedback(
                pb.SendFeedbackRequest(events=[ev]), timeout=cfg.rpc_timeout
            )
            t_ack = pc()
            self.ack_hist.record_value(to_us(t_ack - t0))
            out["ack_ms"] = round((t_ack - t0) * 1000, 3)
            deadline = t0 + cfg.timeout
            polls = 0
            while True:
                r = await self._recommend(stub, user)
                polls += 1
                t = pc()
                how = None
                if use_personalized and r.personalized:
                    how = "personalized"
                elif use_changed and _ids(r) != base:
                    how = "changed"
                if how is not None:
                    self.rec.record(KIND, t0, t)
                    self.reflected_by[how] += 1
                    self.polls_hist.record_value(polls)
                    self.c["reflected"] += 1
                    if polls == 1:
                        self.c["reflected_on_first_poll"] += 1
                    out.update(result="reflected", freshness_ms=round((t - t0) * 1000, 3))
                    break
                if t >= deadline or self.stop.is_set():
                    self.c["not_reflected"] += 1
                    out["result"] = "not_reflected"
                    break
                if cfg.poll_interval_ms > 0:
                    await asyncio.sleep(cfg.poll_interval_ms / 1000.0)
            out["polls"] = polls
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            name = error_name(e)
            self.errors[name] += 1
            self.c["failed"] += 1
            out.update(result="error", error=name)
            self.error_examples.setdefault(name, error_detail(e))
        finally:
            self.c["done"] += 1
            self.samples.append(out)

    async def _worker(self, stub, feedback_stub) -> None:
        t_stop = self.t_start + self.cfg.max_time
        while not self.stop.is_set() and self._next < self.cfg.samples:
            if time.perf_counter() >= t_stop:
                self.c["skipped_max_time"] = self.cfg.samples - self._next
                break
            self._next += 1
            await self._sample(stub, feedback_stub)

    def _tick(self, now: float, final: bool = False) -> None:
        if final:
            self.rec.roll_final(now)
        else:
            self.rec.roll(now)
        if not self.cfg.progress:
            return
        c = self.c
        s = summarize(self.rec.hist)
        self.progress.show(
            f"[freshness{' done' if final else ''}] {now - self.t_start:6.1f}s  "
            f"samples={c['done']}/{self.cfg.samples}  "
            f"reflected={c['reflected']}  p50={fmt_ms(s['p50'])}  p99={fmt_ms(s['p99'])}  "
            f"not_reflected={c['not_reflected']}  err={c['failed']}"
        )

    async def run(self) -> dict:
        cfg = self.cfg
        n_ch = max(1, min(cfg.concurrency, 4))
        # several targets (instances of one service): feedback goes to one, the
        # Recommend calls to the next, so freshness is measured across instances
        channels, stubs = await open_channels(cfg.target, n_ch)
        cross = 1 if "," in cfg.target else 0
        started_at = now_iso()
        start_unix = time.time()
        cpu = CpuMeter()
        try:
            self.t_start = time.perf_counter()
            self.rec = Recorder([KIND], self.t_start)
            t_done = await run_ticking(
                asyncio.gather(
                    *(
                        self._worker(stubs[w % len(stubs)], stubs[(w + cross) % len(stubs)])
                        for w in range(cfg.concurrency)
                    )
                ),
                self.t_start,
                self._tick,
                self.progress,
            )
        finally:
            await close_channels(channels)
        elapsed = t_done - self.t_start
        c = self.c
        summary = self.rec.summary(elapsed)
        report = {
            "mode": "freshness",
            "target": cfg.target,
            "started_at": started_at,
            "finished_at": now_iso(),
            "start_unix": round(start_unix, 3),
            "interrupted": self.stop.is_set(),
            "config": {**asdict(cfg), "ids": self.ids.describe()},
            "duration_s": round(elapsed, 4),
            # 'requests' are samples; latency is freshness (feedback sent -> reflected)
            "requests": c["done"],
            "ok": c["reflected"],
            "errors": c["failed"],
            "errors_by_code": dict(self.errors.most_common()),
            "throughput_rps": round(c["done"] / max(elapsed, 1e-9), 2),
            "latency_ms": summary["latency_ms"],
            "latency_histogram_ms": summary["latency_histogram_ms"],
            "timeline": summary["timeline"],
            "hdr": summary["hdr"],
            "freshness": {
                "samples": c["done"],
                "reflected": c["reflected"],
                "not_reflected": c["not_reflected"],
                "failed": c["failed"],
                "undetectable": c["undetectable"],
                "skipped_max_time": c["skipped_max_time"],
                "reflected_on_first_poll": c["reflected_on_first_poll"],
                "reflected_by": dict(self.reflected_by),
                "baseline_unstable": c["baseline_unstable"],
                "criterion": cfg.criterion,
                "timeout_s": cfg.timeout,
                "freshness_ms": summary["latency_ms"],
                "feedback_ack_ms": summarize(self.ack_hist),
                "recommend_ms": summarize(self.poll_hist),
                "polls_per_reflected_sample": _counts(self.polls_hist),
            },
            "samples": self.samples,
            "client": {**cpu.stop(c["done"]), "channels": len(channels)},
        }
        report["error_examples"] = self.error_examples
        return report


async def run_freshness(
    cfg: FreshnessConfig, ids: IdSource, stop: asyncio.Event | None = None
) -> dict:
    return await FreshnessRun(cfg, ids, stop).run()
