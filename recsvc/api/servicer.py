"""The gRPC servicer: converts messages to engine calls and domain errors to statuses.

No business logic and no Redis keys live here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from recsvc.api.admission import Admission
from recsvc.config import Settings
from recsvc.engine import (
    SOURCE_CF,
    SOURCE_GENERATOR,
    SOURCE_POPULARITY,
    SOURCE_SEQUENCE,
    STRATEGY_BLEND,
    STRATEGY_CF,
    STRATEGY_GENERATOR,
    STRATEGY_SEQUENCE,
    Engine,
)
from recsvc.errors import InvalidArgument, RecsvcError
from recsvc.online.service import OnlineService
from recsvc.similarity import CFModel
from recsvc.state.feedback import FeedbackEvent, event_problems
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SOURCES = {
    SOURCE_CF: pb.SOURCE_CF,
    SOURCE_POPULARITY: pb.SOURCE_POPULARITY,
    SOURCE_GENERATOR: pb.SOURCE_GENERATOR,
    SOURCE_SEQUENCE: pb.SOURCE_SEQUENCE,
}
STRATEGIES = {
    pb.STRATEGY_UNSPECIFIED: "",
    pb.STRATEGY_CF: STRATEGY_CF,
    pb.STRATEGY_GENERATOR: STRATEGY_GENERATOR,
    pb.STRATEGY_BLEND: STRATEGY_BLEND,
    pb.STRATEGY_SEQUENCE: STRATEGY_SEQUENCE,
}
EVENT_TYPES = {v.number: v.name.lower() for v in pb.EventType.DESCRIPTOR.values if v.number}

T = TypeVar("T")


@dataclass(frozen=True)
class Malformed:
    """A request message whose bytes did not parse (bad UTF-8 in a string field,
    a truncated field...). Handed to the servicer instead of failing inside
    gRPC, which would answer UNKNOWN, or end a feedback stream without a word."""

    error: str


def _lenient_parser(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(str(exc))

    return parse


def add_servicer(
    servicer: RecommenderServicer, server: grpc.aio.Server, admission: Admission | None = None
) -> None:
    """Register ``servicer`` like the generated ``add_RecommenderServicer_to_server``,
    but with parsers that turn an unparsable message into :class:`Malformed`, and
    its unary methods behind ``admission`` when given."""
    service = pb.DESCRIPTOR.services_by_name["Recommender"]
    handlers = {}
    for method in service.methods:
        if method.client_streaming and method.server_streaming:
            make_handler = grpc.stream_stream_rpc_method_handler
        elif not (method.client_streaming or method.server_streaming):
            make_handler = grpc.unary_unary_rpc_method_handler
        else:
            raise NotImplementedError(f"{method.full_name}: only unary and bidi calls are served")
        behaviour = getattr(servicer, method.name)
        if admission is not None and not method.client_streaming:
            behaviour = admission.guard(method.name, behaviour)
        handlers[method.name] = make_handler(
            behaviour,
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _status_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn :class:`RecsvcError` into the matching gRPC status with its message,
    and a :class:`Malformed` request into INVALID_ARGUMENT."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(
                    f"malformed {method.__name__} request: {request.error} (string fields "
                    "must be valid UTF-8)"
                )
            return await method(self, request, context)
        except RecsvcError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            raise  # unreachable: abort raises

    return wrapper


def _ms(timestamp: Timestamp) -> int:
    return timestamp.seconds * 1000 + timestamp.nanos // 1_000_000


def _timestamp(ms: int) -> Timestamp:
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def event_from_proto(event: pb.FeedbackEvent) -> FeedbackEvent:
    return FeedbackEvent(
        event_id=event.event_id,
        user_id=event.user_id,
        item_id=event.item_id,
        event_type=EVENT_TYPES.get(event.type),
        type_code=event.type,
        value=event.value,
        timestamp_ms=_ms(event.timestamp) if event.HasField("timestamp") else 0,
        recommendation_id=event.recommendation_id,
    )


def model_info(model: CFModel) -> pb.ModelInfo:
    bundle = model.bundle
    return pb.ModelInfo(
        model_version=bundle.model_version,
        created=bundle.created,
        n_users=len(bundle.users),
        n_items=len(bundle.items),
        n_interactions=int(bundle.user_items.nnz),
        params_json=json.dumps(bundle.params, sort_keys=True),
    )


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        reload_model: Callable[[str], Awaitable[CFModel]],
        online: OnlineService | None = None,
    ):
        self.engine = engine
        self.settings = settings
        self._reload_model = reload_model
        # (#13) Recommend/Generate go through variants and the impression log
        self.online = online or OnlineService(engine)

    @_status_errors
    async def Recommend(self, request: pb.RecommendRequest, context: Any) -> pb.RecommendResponse:
        if request.strategy not in STRATEGIES:
            valid = ", ".join(pb.Strategy.Name(n) for n in STRATEGIES)
            raise InvalidArgument(
                f"unknown strategy: received {request.strategy}; valid values: {valid}"
            )
        served = await self.online.recommend(
            request.user_id,
            request.k,
            variant=request.variant,
            exclude_item_ids=request.exclude_item_ids,
            restrict_item_ids=request.restrict_item_ids,
            include_seen=request.include_seen,
            strategy=STRATEGIES[request.strategy],
            blend_weight=request.blend_weight if request.HasField("blend_weight") else None,
        )
        rec = served.result
        reply = pb.RecommendResponse(
            recommendation_id=rec.recommendation_id,
            model_version=rec.model_version,
            degraded=rec.degraded,
            degraded_reason=rec.degraded_reason,
            personalized=rec.personalized,
            variant=served.variant,
        )
        add = reply.items.add  # ~twice as fast as building a list of ScoredItem messages
        for item_id, score, source in zip(
            rec.item_ids, rec.scores.tolist(), rec.sources, strict=True
        ):
            add(item_id=item_id, score=score, source=SOURCES[source])
        for item, team in zip(reply.items, served.teams, strict=False):
            item.team = team
        return reply

    @_status_errors
    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        served = await self.online.generate(
            request.user_id,
            request.n,
            variant=request.variant,
            topic=request.topic,
            temperature=request.temperature if request.HasField("temperature") else None,
            seed=request.seed if request.HasField("seed") else None,
            diversity=request.diversity if request.HasField("diversity") else None,
            neighbours=request.neighbours,
            exclude_item_ids=request.exclude_item_ids,
            context_item_ids=request.context_item_ids,
            context_attributes=request.context_attributes,
            continuation=request.continuation,
        )
        generation = served.result
        source = pb.SOURCE_SEQUENCE if request.continuation else pb.SOURCE_GENERATOR
        return pb.GenerateResponse(
            items=[
                pb.GeneratedItem(
                    content=[pb.Attribute(name=a, weight=w) for a, w in item.content],
                    nearest_items=[
                        pb.ScoredItem(item_id=i, score=s, source=source) for i, s in item.nearest
                    ],
                    why_attributes=item.why_attributes,
                    why_history_item_ids=item.why_items,
                )
                for item in generation.items
            ],
            generation_id=generation.generation_id,
            model_version=generation.model_version,
            seed=generation.seed,
            degraded=bool(generation.degraded_reason),
            degraded_reason=generation.degraded_reason,
            variant=served.variant,
            shortfall=generation.shortfall,
        )

    @_status_errors
    async def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: Any
    ) -> pb.SimilarItemsResponse:
        ids, scores, version = self.engine.similar_items(request.item_id, request.k)
        reply = pb.SimilarItemsResponse(model_version=version)
        add = reply.items.add
        for item_id, score in zip(ids, scores.tolist(), strict=True):
            add(item_id=item_id, score=score, source=pb.SOURCE_CF)
        return reply

    @_status_errors
    async def SendFeedback(
        self, request: pb.SendFeedbackRequest, context: Any
    ) -> pb.SendFeedbackResponse:
        events = [event_from_proto(e) for e in request.events]
        self.engine.validate_events(events)
        results = await self.engine.apply_feedback(events)
        accepted = sum(r.applied for r in results)
        return pb.SendFeedbackResponse(accepted=accepted, duplicates=len(results) - accepted)

    async def StreamFeedback(
        self, request_iterator: AsyncIterator[pb.FeedbackEvent], context: Any
    ) -> AsyncIterator[pb.FeedbackAck]:
        """One event per message; see :meth:`_feedback_stream`."""
        async for ack in self._feedback_stream(request_iterator, context, batched=False):
            yield ack

    async def StreamFeedbackBatches(
        self, request_iterator: AsyncIterator[pb.SendFeedbackRequest], context: Any
    ) -> AsyncIterator[pb.FeedbackAck]:
        """A batch of events per message (gRPC's per-message cost spread over the
        batch); events are indexed over the whole stream."""
        async for ack in self._feedback_stream(request_iterator, context, batched=True):
            yield ack

    async def _feedback_stream(
        self, request_iterator: AsyncIterator[Any], context: Any, batched: bool
    ) -> AsyncIterator[pb.FeedbackAck]:
        """Events are read into a bounded queue and written in batches of what has
        arrived; a full queue stops reading, so gRPC flow control slows the client."""
        queue: asyncio.Queue[tuple[int, pb.FeedbackEvent | Malformed] | None] = asyncio.Queue(
            maxsize=self.settings.stream_buffer
        )

        read_error: list[str] = []

        async def read() -> None:
            index = 0
            try:
                number = 0
                async for message in request_iterator:
                    if not batched:
                        await queue.put((index, message))
                        index += 1
                    elif isinstance(message, Malformed):  # its events are not counted
                        error = f"message #{number}: {message.error}"
                        await queue.put((index, Malformed(error)))
                    else:
                        for event in message.events:
                            await queue.put((index, event))
                            index += 1
                    number += 1
            except grpc.RpcError:
                pass  # the client went away; what was read is still written and acked
            except grpc.aio.AbortError:
                pass  # the writer below aborted the call (e.g. UNAVAILABLE): its status stands
            except Exception as exc:  # never leave the writer below waiting for events
                error_id = os.urandom(6).hex()
                log.exception("reading a feedback stream failed (error id %s)", error_id)
                read_error.append(f"reading the stream failed (error id {error_id}): {exc}")
            await queue.put(None)  # not reached when cancelled: nobody is waiting then

        reader = asyncio.create_task(read())
        try:
            finished = False
            while not finished:
                batch = [await queue.get()]
                while len(batch) < self.settings.stream_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                if batch[-1] is None:
                    finished = True
                    batch.pop()
                if batch:
                    try:
                        ack = await self._apply_stream_batch(batch)  # type: ignore[arg-type]
                    except RecsvcError as exc:  # the batch is not acked: the client resends it
                        await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
                    yield ack
            if read_error:  # what was read before it is acked above; the rest is not
                await context.abort(grpc.StatusCode.INTERNAL, read_error[0])
        finally:
            reader.cancel()

    async def _apply_stream_batch(
        self, batch: list[tuple[int, pb.FeedbackEvent]]
    ) -> pb.FeedbackAck:
        ack = pb.FeedbackAck()
        valid: list[FeedbackEvent] = []
        now_ms = int(time.time() * 1000)
        for index, message in batch:
            if isinstance(message, Malformed):
                reason = f"malformed message: {message.error} (strings must be valid UTF-8)"
                ack.rejected.add(index=index, reason=reason)
                continue
            event = event_from_proto(message)
            problems = event_problems(event, self.settings, now_ms)
            if problems:
                ack.rejected.add(event_id=event.event_id, index=index, reason="; ".join(problems))
            else:
                valid.append(event)
        results = await self.engine.apply_feedback(valid) if valid else []
        for event, result in zip(valid, results, strict=True):
            ack.event_ids.append(event.event_id)
            if not result.applied:
                ack.duplicate_event_ids.append(event.event_id)
        return ack

    @_status_errors
    async def GetUserState(self, request: pb.GetUserStateRequest, context: Any) -> pb.UserState:
        state = await self.engine.user_state(request.user_id)
        reply = pb.UserState(
            user_id=state.user_id,
            vector=state.vector.tolist(),
            known_to_model=state.known_to_model,
            event_count=state.event_count,
        )
        for entry in state.history:
            item = reply.history.add(item_id=entry.item_id, weight=entry.weight)
            if entry.last_event_ms is not None:
                item.last_event.CopyFrom(_timestamp(entry.last_event_ms))
        if state.updated_ms is not None:
            reply.updated.CopyFrom(_timestamp(state.updated_ms))
        return reply

    @_status_errors
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        return model_info(self.engine.model)

    @_status_errors
    async def ReloadModel(self, request: pb.ReloadModelRequest, context: Any) -> pb.ModelInfo:
        return model_info(await self._reload_model(request.model_dir))
