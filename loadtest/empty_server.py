"""A Recommender server that does no work: the ceiling of gRPC in Python here.

Responses have the size and shape of the real server's (k ScoredItems with ids
like ``i12345`` and scores, a uuid recommendation_id, a model_version; feedback
acks naming every event), but nothing is computed: lists come from templates
built once per k. Running a load against this server and against the real one
on the same machine gives the real server's throughput as a ratio of what
gRPC in Python can do at all.

Variants for tests (and for checking a client's error handling):

* ``errors={"INVALID_ARGUMENT": 0.1}``: that fraction of unary calls fails with
  that status code (deterministically: every 10th call here);
* ``delay_s=0.05``: every call sleeps that long first (an asyncio sleep, so the
  server stays responsive: a slow server, not a stuck one);
* ``reflect_feedback=True``: Recommend answers ``personalized=True`` with a
  different list for users that sent feedback (``reflect_lag_s`` after it),
  so the freshness mode has something to measure;
* ``stream_drop_fraction``: that fraction of streamed events is never acked.

Streamed events without event_id, user_id or item_id, or with type
EVENT_TYPE_UNSPECIFIED, are rejected in the ack (the stream goes on), like the
contract says for malformed events.

``python -m loadtest empty-server --port N`` runs it; ``start_empty_server``
starts one in the running event loop (port 0 picks a free port).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Mapping

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from recsvc import aio
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

MAX_K = 1000
DEFAULT_K = 20
MODEL_VERSION = "empty-server-0"
N_ITEMS = 50_000  # ids i0..i49999, so list sizes match a mid-size catalogue


def _code(name: str) -> grpc.StatusCode:
    try:
        code = grpc.StatusCode[name.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown gRPC status code name: {name!r}") from None
    if code is grpc.StatusCode.OK:
        raise ValueError("OK is not an error code")
    return code


class _FractionGate:
    """Deterministic 'fraction of calls': fires exactly round(n * fraction) times in n."""

    __slots__ = ("fraction", "_acc")

    def __init__(self, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self._acc = 0.0

    def fire(self) -> bool:
        if self.fraction <= 0.0:
            return False
        self._acc += self.fraction
        if self._acc >= 1.0 - 1e-9:
            self._acc -= 1.0
            return True
        return False


def _malformed(ev: pb.FeedbackEvent) -> bool:
    """What the streams of the empty server reject: no ids, or no event type."""
    return not (ev.event_id and ev.user_id and ev.item_id) or (ev.type == pb.EVENT_TYPE_UNSPECIFIED)


class EmptyRecommender(pb_grpc.RecommenderServicer):
    def __init__(
        self,
        *,
        errors: Mapping[str, float] | None = None,
        delay_s: float = 0.0,
        reflect_feedback: bool = False,
        reflect_lag_s: float = 0.0,
        stream_drop_fraction: float = 0.0,
        model_version: str = MODEL_VERSION,
        seed: int = 12345,
    ) -> None:
        # one gate for 'some error' at the total fraction, then the code furthest behind
        # its share: exact fractions for every code, deterministically
        self._errors = [(_code(name), float(f)) for name, f in (errors or {}).items() if f > 0]
        total = sum(f for _, f in self._errors)
        if total > 1.0 + 1e-9:
            raise ValueError("error fractions add up to more than 1")
        self._error_gate = _FractionGate(min(total, 1.0))
        self._error_counts = [0] * len(self._errors)
        self._errors_fired = 0
        self._delay_s = max(0.0, delay_s)
        self._reflect = reflect_feedback
        self._reflect_lag_s = max(0.0, reflect_lag_s)
        self._stream_drop = _FractionGate(stream_drop_fraction)
        self._model_version = model_version
        self._rng = random.Random(seed)
        self._templates: dict[tuple[str, int], object] = {}
        self._feedback_at: dict[str, float] = {}  # user -> monotonic time feedback applies
        self.calls = 0  # unary calls answered (OK or not), for tests

    # -- helpers -----------------------------------------------------------------

    def _items(self, k: int, source: int) -> list[pb.ScoredItem]:
        ids = self._rng.sample(range(N_ITEMS), k)
        return [
            pb.ScoredItem(item_id=f"i{n}", score=1.0 - j / (k + 1.0), source=source)
            for j, n in enumerate(ids)
        ]

    def _template(self, kind: str, k: int):
        key = (kind, k)
        t = self._templates.get(key)
        if t is None:
            if kind == "recommend":
                t = pb.RecommendResponse(
                    items=self._items(k, pb.SOURCE_POPULARITY),
                    model_version=self._model_version,
                )
            elif kind == "personal":
                t = pb.RecommendResponse(
                    items=self._items(k, pb.SOURCE_CF),
                    model_version=self._model_version,
                    personalized=True,
                )
            else:
                t = pb.SimilarItemsResponse(
                    items=self._items(k, pb.SOURCE_CF), model_version=self._model_version
                )
            self._templates[key] = t
        return t

    async def _pre(self, context: grpc.aio.ServicerContext) -> None:
        """The variant behaviour shared by unary calls: delay, then maybe an error."""
        self.calls += 1
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        if self._errors and self._error_gate.fire():
            self._errors_fired += 1
            total = self._error_gate.fraction
            n = self._errors_fired
            i = max(
                range(len(self._errors)),
                key=lambda j: self._errors[j][1] / total * n - self._error_counts[j],
            )
            self._error_counts[i] += 1
            code = self._errors[i][0]
            await context.abort(code, f"empty server: injected {code.name}")

    @staticmethod
    async def _check_k(k: int, context: grpc.aio.ServicerContext) -> int:
        if k == 0:
            return DEFAULT_K
        if not 1 <= k <= MAX_K:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be in 1..{MAX_K}")
        return k

    # -- RPCs --------------------------------------------------------------------

    async def Recommend(self, request, context):
        await self._pre(context)
        if not request.user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is required")
        k = await self._check_k(request.k, context)
        kind = "recommend"
        if self._reflect:
            at = self._feedback_at.get(request.user_id)
            if at is not None and time.monotonic() >= at:
                kind = "personal"
        resp = pb.RecommendResponse()
        resp.CopyFrom(self._template(kind, k))
        resp.recommendation_id = str(uuid.uuid4())
        return resp

    async def SimilarItems(self, request, context):
        await self._pre(context)
        if not request.item_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "item_id is required")
        k = await self._check_k(request.k, context)
        return self._template("similar", k)

    def _note_feedback(self, user_id: str) -> None:
        if self._reflect and user_id not in self._feedback_at:
            self._feedback_at[user_id] = time.monotonic() + self._reflect_lag_s

    async def SendFeedback(self, request, context):
        await self._pre(context)
        for ev in request.events:
            if not (ev.event_id and ev.user_id and ev.item_id):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "event_id, user_id and item_id are required"
                )
        for ev in request.events:
            self._note_feedback(ev.user_id)
        return pb.SendFeedbackResponse(accepted=len(request.events))

    async def StreamFeedback(
        self, request_iterator: AsyncIterator[pb.FeedbackEvent], context
    ) -> AsyncIterator[pb.FeedbackAck]:
        index = 0
        async for ev in request_iterator:
            if _malformed(ev):
                yield pb.FeedbackAck(
                    rejected=[
                        pb.RejectedEvent(
                            event_id=ev.event_id, index=index, reason="malformed event"
                        )
                    ]
                )
            elif self._stream_drop.fire():
                pass  # never acked: a test of the client's 'unacked' report
            else:
                self._note_feedback(ev.user_id)
                yield pb.FeedbackAck(event_ids=[ev.event_id])
            index += 1

    async def StreamFeedbackBatches(
        self, request_iterator: AsyncIterator[pb.SendFeedbackRequest], context
    ) -> AsyncIterator[pb.FeedbackAck]:
        index = 0
        async for batch in request_iterator:
            ack = pb.FeedbackAck()
            for ev in batch.events:
                if _malformed(ev):
                    ack.rejected.add(event_id=ev.event_id, index=index, reason="malformed event")
                elif not self._stream_drop.fire():  # (dropped: never acked)
                    self._note_feedback(ev.user_id)
                    ack.event_ids.append(ev.event_id)
                index += 1
            yield ack

    async def GetUserState(self, request, context):
        await self._pre(context)
        now = Timestamp()
        now.GetCurrentTime()
        history = [
            pb.HistoryEntry(item_id=it.item_id, weight=1.0 + j % 3, last_event=now)
            for j, it in enumerate(self._template("similar", DEFAULT_K).items)
        ]
        return pb.UserState(
            user_id=request.user_id,
            history=history,
            updated=now,
            known_to_model=True,
            event_count=len(history),
        )

    async def ReloadModel(self, request, context):
        """Nothing to reload: answers like GetModelInfo (kept for contract completeness)."""
        return await self.GetModelInfo(request, context)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(
            model_version=self._model_version,
            created="1970-01-01T00:00:00Z",
            n_users=100_000,
            n_items=N_ITEMS,
            n_interactions=1_000_000,
            params_json='{"model": "empty"}',
        )


SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 10_000),
]


async def start_empty_server(
    port: int = 0, host: str = "127.0.0.1", **variant
) -> tuple[grpc.aio.Server, int]:
    """Start an empty server in the running event loop; returns (server, bound port).

    ``variant`` goes to EmptyRecommender (errors=, delay_s=, reflect_feedback=, ...);
    the servicer is reachable as ``server.servicer`` for tests. Stop it with
    ``await server.stop(None)``.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = EmptyRecommender(**variant)
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    server.servicer = servicer  # type: ignore[attr-defined]
    return server, bound


def parse_errors(spec: str | None) -> dict[str, float]:
    """'INVALID_ARGUMENT=0.05,RESOURCE_EXHAUSTED=0.01' -> {name: fraction}."""
    out: dict[str, float] = {}
    if not spec:
        return out
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, frac = part.partition("=")
        _code(name)
        out[name.strip().upper()] = float(frac) if frac else 0.1
    return out


async def serve(port: int, host: str = "127.0.0.1", **variant) -> None:
    server, bound = await start_empty_server(port, host, **variant)
    print(f"empty server listening on {host}:{bound}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    await stop.wait()
    await server.stop(0.5)


def main(args) -> int:
    variant = dict(
        errors=parse_errors(args.errors),
        delay_s=args.delay_ms / 1000.0,
        reflect_feedback=args.reflect_feedback,
        reflect_lag_s=args.reflect_lag_ms / 1000.0,
        stream_drop_fraction=args.stream_drop_fraction,
    )
    aio.run(serve(args.port, args.host, **variant))
    return 0
