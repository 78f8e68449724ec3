"""`stream` mode: many concurrent StreamFeedback streams at a target total event rate.

Each of the N streams sends events on its own fixed schedule (stream s sends its
j-th event at ``t_start + (s + j * N) / rate``, so the total is ``rate`` events
per second, evenly spread); a reader per stream matches every FeedbackAck to
the events it names. Ack latency runs from the event's intended send time to
the ack naming it (a stream that cannot keep up with the schedule shows up as
latency). At the end every stream half-closes and waits (``drain_timeout``)
for the remaining acks; events sent and never acked are reported.

``resend_fraction`` resends some already-acked event ids (the server should
ack them as duplicates); ``malformed_fraction`` sends events without an
item_id and with EVENT_TYPE_UNSPECIFIED (the server should reject them by id,
and the stream should go on).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass

import grpc
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
    now_iso,
    open_channels,
)
from .ids import IdSource
from .run import RequestFactory

ACK = "stream_feedback"


@dataclass
class StreamConfig:
    target: str
    streams: int
    rate: float
    duration: float
    channels: int = 2
    drain_timeout: float = 5.0
    resend_fraction: float = 0.0
    malformed_fraction: float = 0.0
    late_ms: float = 10.0
    batch: int = 1  # events per message; above 1: StreamFeedbackBatches
    seed: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.streams < 1:
            raise UsageError("--streams must be >= 1")
        if not self.rate > 0:
            raise UsageError("--rate must be > 0")
        if not self.duration > 0:
            raise UsageError("--duration must be > 0")
        if self.channels < 1:
            raise UsageError("--channels must be >= 1")
        if self.batch < 1:
            raise UsageError("--batch must be >= 1")
        for name in ("resend_fraction", "malformed_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1)")


class StreamRun:
    def __init__(self, cfg: StreamConfig, ids: IdSource, stop: asyncio.Event | None = None):
        cfg.validate()
        self.cfg = cfg
        self.ids = ids
        self.stop = stop or asyncio.Event()
        self.rng = np.random.default_rng(cfg.seed)
        self.factory = RequestFactory(ids, 1, 1, self.rng)
        self.progress = Progress(cfg.progress)
        self.rec: Recorder | None = None
        self.pending: dict[str, float] = {}  # event_id -> intended send time
        self.resend_pending: dict[str, float] = {}
        self._acked_ring: deque[tuple[str, str, str]] = deque(maxlen=4096)
        self.c: Counter[str] = Counter()
        self.rejected_reasons: Counter[str] = Counter()
        self.stream_errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}  # first message per error name
        self.last_ack = 0.0
        self.t_start = self.t_end = 0.0
        self._cancelled_calls: set = set()  # calls we cancelled at the drain deadline
        self._rand = random.Random(cfg.seed)

    # -- events ----------------------------------------------------------------------

    def _next_event(self) -> tuple[pb.FeedbackEvent, str]:
        """(event, kind) where kind is 'new', 'resend' or 'malformed'."""
        cfg = self.cfg
        if not (cfg.malformed_fraction or cfg.resend_fraction):
            return self.factory.event(), "new"
        u = self._rand.random()
        if u < cfg.malformed_fraction:
            ev = self.factory.event()
            ev.ClearField("item_id")
            ev.type = pb.EVENT_TYPE_UNSPECIFIED
            return ev, "malformed"
        if u < cfg.malformed_fraction + cfg.resend_fraction and self._acked_ring:
            eid, user, item = self._acked_ring.popleft()
            if eid not in self.resend_pending:
                return pb.FeedbackEvent(
                    event_id=eid, user_id=user, item_id=item, type=pb.VIEW
                ), "resend"
        return self.factory.event(), "new"

    # -- acks ------------------------------------------------------------------------

    async def _reader(self, call, sent_ids: list[str], events: dict[str, pb.FeedbackEvent]) -> None:
        pc = time.perf_counter
        record = self.rec.record
        pending, resend_pending = self.pending, self.resend_pending
        c = self.c
        try:
            while True:
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    break
                now = pc()
                self.last_ack = now
                resends = None
                for eid in ack.event_ids:
                    t = pending.pop(eid, None)
                    if t is None:
                        t = resend_pending.pop(eid, None)
                        if t is None:
                            c["unknown_acks"] += 1
                            continue
                        if resends is None:
                            resends = set()
                        resends.add(eid)
                    c["acked"] += 1
                    record(ACK, t, now)
                    ev = events.pop(eid, None)
                    if ev is not None and len(self._acked_ring) < self._acked_ring.maxlen:
                        self._acked_ring.append((eid, ev.user_id, ev.item_id))
                for eid in ack.duplicate_event_ids:
                    c["duplicates"] += 1
                    if resends is None or eid not in resends:
                        c["unexpected_duplicates"] += 1
                for rej in ack.rejected:
                    eid = rej.event_id
                    if not eid and 0 <= rej.index < len(sent_ids):
                        eid = sent_ids[rej.index]
                    c["rejected"] += 1
                    self.rejected_reasons[rej.reason[:80] or "?"] += 1
                    if pending.pop(eid, None) is None and resend_pending.pop(eid, None) is None:
                        c["unknown_rejections"] += 1
                    events.pop(eid, None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            name = error_name(e)
            if name == "CANCELLED" and call in self._cancelled_calls:
                return
            self.stream_errors[name] += 1
            self.error_examples.setdefault(name, error_detail(e))

    # -- streams ---------------------------------------------------------------------

    async def _stream(self, sid: int, stub) -> None:
        cfg = self.cfg
        pc = time.perf_counter
        period = cfg.streams / cfg.rate
        first = self.t_start + sid / cfg.rate
        n = max(0, int(np.ceil((self.t_end - first) / period - 1e-9)))
        late_s = cfg.late_ms / 1000.0
        c = self.c
        j = 0
        while j < n and not self.stop.is_set():
            call = stub.StreamFeedbackBatches() if cfg.batch > 1 else stub.StreamFeedback()
            unsent: list[pb.FeedbackEvent] = []  # the batch being filled
            c["streams_opened"] += 1
            sent_ids: list[str] = []
            events: dict[str, pb.FeedbackEvent] = {}  # sent, not yet acked (this stream)
            reader = asyncio.create_task(self._reader(call, sent_ids, events))
            broken = False
            try:
                while j < n and not self.stop.is_set():
                    intended = first + j * period
                    delay = intended - pc()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif -delay > late_s:
                        c["late"] += 1
                    if reader.done():  # the stream ended under us
                        broken = True
                        break
                    ev, kind = self._next_event()
                    eid = ev.event_id
                    if kind == "resend":
                        self.resend_pending[eid] = intended
                        c["resent"] += 1
                    else:
                        self.pending[eid] = intended
                        events[eid] = ev
                        if kind == "malformed":
                            c["malformed_sent"] += 1
                    sent_ids.append(eid)
                    c["sent"] += 1
                    self.rec.count("sent")
                    j += 1
                    if cfg.batch <= 1:
                        await call.write(ev)
                        continue
                    unsent.append(ev)
                    if len(unsent) >= cfg.batch:
                        await call.write(pb.SendFeedbackRequest(events=unsent))
                        unsent = []
                if unsent:
                    await call.write(pb.SendFeedbackRequest(events=unsent))
                await call.done_writing()
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - the reader records the status
                broken = True
                name = error_name(e)
                if name.startswith("CLIENT_") and name != "CLIENT_InvalidStateError":
                    self.error_examples.setdefault(name, error_detail(e))
            # wait for the acks: until the drain deadline at the end, briefly if broken
            deadline = self.t_end + cfg.drain_timeout
            wait = max(0.0, deadline - pc())
            if broken and j < n:
                wait = min(wait, 1.0)
            done, _ = await asyncio.wait({reader}, timeout=wait)
            if not done:
                self._cancelled_calls.add(call)
                call.cancel()
                c["streams_cancelled_at_drain"] += 1
                await asyncio.gather(reader, return_exceptions=True)
            if j < n and not self.stop.is_set():
                c["reconnects"] += 1
                await asyncio.sleep(0.1)

    def _tick(self, now: float, final: bool = False) -> None:
        entry = self.rec.roll_final(now) if final else self.rec.roll(now)
        if not self.cfg.progress:
            return
        c = self.c
        rps = c["acked"] / max(now - self.t_start, 1e-9) if final else entry["rps"]
        self.progress.show(
            f"[stream{' done' if final else ''}] "
            f"{now - self.t_start:6.1f}s/{self.cfg.duration:g}s  sent={c['sent']}  "
            f"acked={c['acked']}  ack/s={rps:.0f}  p99={fmt_ms(entry['p99_ms'])}  "
            f"pending={len(self.pending) + len(self.resend_pending)}  "
            f"rejected={c['rejected']}  err={sum(self.stream_errors.values())}"
        )

    async def run(self) -> dict:
        from .common import run_ticking

        cfg = self.cfg
        channels, stubs = await open_channels(cfg.target, min(cfg.channels, cfg.streams))
        started_at = now_iso()
        start_unix = time.time()
        cpu = CpuMeter()
        try:
            self.t_start = time.perf_counter()
            self.t_end = self.t_start + cfg.duration
            self.rec = Recorder([ACK], self.t_start)
            await run_ticking(
                asyncio.gather(
                    *(self._stream(s, stubs[s % len(stubs)]) for s in range(cfg.streams))
                ),
                self.t_start,
                self._tick,
                self.progress,
            )
        finally:
            await close_channels(channels)
        rec = self.rec
        c = self.c
        elapsed = max(cfg.duration, self.last_ack - self.t_start)
        summary = rec.summary(elapsed)
        unacked = list(self.pending) + list(self.resend_pending)
        stream_errors = dict(self.stream_errors.most_common())
        report = {
            "mode": "stream",
            "target": cfg.target,
            "started_at": started_at,
            "finished_at": now_iso(),
            "start_unix": round(start_unix, 3),
            "interrupted": self.stop.is_set(),
            "config": {**asdict(cfg), "ids": self.ids.describe()},
            "duration_s": round(elapsed, 4),
            # 'requests' are events sent; throughput is acked events per second
            "requests": c["sent"],
            "ok": c["acked"],
            "errors": sum(stream_errors.values()),
            "errors_by_code": stream_errors,
            "throughput_rps": round(c["acked"] / elapsed, 2),
            "sent_per_s": round(c["sent"] / cfg.duration, 2),
            "latency_ms": summary["latency_ms"],
            "latency_histogram_ms": summary["latency_histogram_ms"],
            "timeline": summary["timeline"],
            "hdr": summary["hdr"],
            "by_call": summary["by_call"],
            "events": {
                "sent": c["sent"],
                "acked": c["acked"],
                "acked_per_s": round(c["acked"] / elapsed, 2),
                "duplicates": c["duplicates"],
                "unexpected_duplicates": c["unexpected_duplicates"],
                "resent": c["resent"],
                "malformed_sent": c["malformed_sent"],
                "rejected": c["rejected"],
                "rejected_reasons": dict(self.rejected_reasons.most_common(10)),
                "unacked": len(unacked),
                "unacked_sample": unacked[:20],
                "unknown_acks": c["unknown_acks"],
                "unknown_rejections": c["unknown_rejections"],
                "late": c["late"],
                "late_threshold_ms": cfg.late_ms,
            },
            "streams": {
                "n": cfg.streams,
                "opened": c["streams_opened"],
                "reconnects": c["reconnects"],
                "cancelled_at_drain": c["streams_cancelled_at_drain"],
                "errors_by_code": stream_errors,
            },
            "client": {**cpu.stop(c["sent"]), "channels": len(channels)},
        }
        report["error_examples"] = self.error_examples
        return report


async def run_streams(cfg: StreamConfig, ids: IdSource, stop: asyncio.Event | None = None) -> dict:
    return await StreamRun(cfg, ids, stop).run()
