"""Fuzzed input against a real server (real Redis, real gRPC, raw bytes where the
stubs would refuse to build the message): every call gets a clear status, the
server stays up, and nothing accepted before is lost.

The event-level fuzzing (NaN, control characters, timestamps, garbage between
valid events on a stream) is in ``test_poison_events.py``; this file covers
the rest of the surface: raw bytes to every method, oversized messages, huge
k and filter lists, odd strings and numbers in every request type."""

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import log_entries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration

SERVICE = "/recsvc.v1.Recommender/"
UNARY = {
    "Recommend": pb.RecommendResponse,
    "Generate": pb.GenerateResponse,
    "SimilarItems": pb.SimilarItemsResponse,
    "SendFeedback": pb.SendFeedbackResponse,
    "GetUserState": pb.UserState,
    "GetModelInfo": pb.ModelInfo,
}
# what a caller may get for input it made up; never UNKNOWN, INTERNAL or UNAVAILABLE
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


@pytest.fixture
def server(make_server, generator_model_dir):
    """The generator bundle: Generate has a model to answer with."""
    return make_server(model=generator_model_dir)


@pytest.fixture
def accepted(server, redis_url):
    """An event acknowledged before the fuzzing, which must survive it."""
    event = pb.FeedbackEvent(event_id="before", user_id="keeper", item_id="a1", type=pb.PURCHASE)
    assert server.stub.SendFeedback(pb.SendFeedbackRequest(events=[event])).accepted == 1
    return event


def raw(channel, method):
    return channel.unary_unary(
        SERVICE + method,
        request_serializer=lambda data: data,
        response_deserializer=UNARY[method].FromString,
    )


def status_of(call):
    """(code, details) of a call, OK included."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def assert_clear(code, details):
    assert code in CLEAR, (code, details)
    if code != grpc.StatusCode.OK:
        assert details and len(details) > 10, (code, details)  # a message a caller can act on


def still_whole(server, redis_url, accepted):
    """Health SERVING, the earlier event still in the log and in the user's state,
    and a Recommend that is not degraded."""
    health = health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(service="recsvc.v1.Recommender"), timeout=10
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with redis.Redis.from_url(redis_url) as client:
        logged = {f[b"event_id"].decode() for _, f in log_entries(client)}
    assert accepted.event_id in logged
    state = server.stub.GetUserState(pb.GetUserStateRequest(user_id=accepted.user_id))
    assert state.event_count >= 1
    response = server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3), timeout=10)
    assert not response.degraded and len(response.items) == 3


@pytest.mark.parametrize("method", list(UNARY))
def test_random_bytes_get_a_clear_status(server, redis_url, accepted, method):
    call = raw(server.channel, method)

    @FUZZ
    @given(st.binary(max_size=300))
    def check(data):
        assert_clear(*status_of(lambda: call(data, timeout=10)))

    check()
    still_whole(server, redis_url, accepted)


def valid_then_mangled(message, data):
    """A valid request's bytes with some of them replaced: mostly well-formed
    framing with odd values, which random bytes rarely reach."""
    wire = bytearray(message.SerializeToString())
    for position, value in data:
        if wire:
            wire[position % len(wire)] = value
    return bytes(wire)


REQUESTS = {
    "Recommend": pb.RecommendRequest(
        user_id="u1", k=5, exclude_item_ids=["a1"], restrict_item_ids=["a2", "b3"],
        strategy=pb.STRATEGY_BLEND, blend_weight=0.5,
    ),
    "Generate": pb.GenerateRequest(
        user_id="u1", n=3, topic="alpha", temperature=0.7, seed=3, diversity=0.2,
        neighbours=2, context_item_ids=["a1"], context_attributes=["category:alpha"],
    ),
    "SimilarItems": pb.SimilarItemsRequest(item_id="a1", k=4),
    "SendFeedback": pb.SendFeedbackRequest(events=[
        pb.FeedbackEvent(event_id="m1", user_id="mangled", item_id="a2", type=pb.RATING, value=4)
    ]),
    "GetUserState": pb.GetUserStateRequest(user_id="u1"),
}  # fmt: skip


@pytest.mark.parametrize("method", list(REQUESTS))
def test_mangled_requests_get_a_clear_status(server, redis_url, accepted, method):
    call = raw(server.channel, method)

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
    def check(data):
        assert_clear(
            *status_of(lambda: call(valid_then_mangled(REQUESTS[method], data), timeout=10))
        )

    check()
    still_whole(server, redis_url, accepted)


ODD_STRINGS = ["", "\x00", "a1\x1b[2J", "\ud7ff" * 3, "é" * 300, "a" * 100_000, " ", "\u202e"]
ODD_NUMBERS = [float("nan"), float("inf"), float("-inf"), -1.0, 1e30, -1e-30]


def generate(server, **fields):
    return server.stub.Generate(pb.GenerateRequest(user_id="u1", n=2, **fields))


def test_odd_values_in_every_field(server, redis_url, accepted):
    calls = []
    for text in ODD_STRINGS:
        calls += [
            lambda t=text: server.stub.Recommend(pb.RecommendRequest(user_id=t, k=3)),
            lambda t=text: server.stub.Recommend(
                pb.RecommendRequest(user_id="u1", k=3, exclude_item_ids=[t], restrict_item_ids=[t])
            ),
            lambda t=text: server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3, variant=t)),
            lambda t=text: server.stub.Generate(pb.GenerateRequest(user_id="u1", n=2, topic=t)),
            lambda t=text: server.stub.Generate(
                pb.GenerateRequest(user_id="u1", n=2, context_item_ids=[t], context_attributes=[t])
            ),
            lambda t=text: server.stub.SimilarItems(pb.SimilarItemsRequest(item_id=t, k=3)),
            lambda t=text: server.stub.GetUserState(pb.GetUserStateRequest(user_id=t)),
        ]  # fmt: skip
    for number in ODD_NUMBERS:
        calls += [
            lambda x=number: generate(server, temperature=x),
            lambda x=number: generate(server, diversity=x),
            lambda x=number: server.stub.Recommend(
                pb.RecommendRequest(user_id="u1", k=3, strategy=pb.STRATEGY_BLEND, blend_weight=x)
            ),
        ]  # fmt: skip
    for big in (2**31 - 1, -(2**31)):
        calls += [
            lambda b=big: server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=b)),
            lambda b=big: server.stub.Generate(pb.GenerateRequest(user_id="u1", n=b)),
            lambda b=big: server.stub.Generate(pb.GenerateRequest(user_id="u1", n=2, neighbours=b)),
            lambda b=big: server.stub.SimilarItems(pb.SimilarItemsRequest(item_id="a1", k=b)),
        ]  # fmt: skip
    for call in calls:
        code, details = status_of(lambda c=call: c())
        assert_clear(code, details)
    still_whole(server, redis_url, accepted)


def test_an_oversized_message_is_refused_and_the_server_goes_on(server, redis_url, accepted):
    call = raw(server.channel, "Recommend")
    huge = pb.RecommendRequest(user_id="u1", k=3, exclude_item_ids=["x" * 1000] * 17_000)
    code, details = status_of(lambda: call(huge.SerializeToString(), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    still_whole(server, redis_url, accepted)


@pytest.mark.parametrize("field", ["exclude_item_ids", "restrict_item_ids"])
def test_huge_filter_lists_are_answered_or_refused_clearly(server, redis_url, accepted, field):
    ids = [f"a{i % 8}" if i % 3 == 0 else f"unknown-{i}" for i in range(300_000)]
    request = pb.RecommendRequest(user_id="u1", k=3, **{field: ids})
    code, details = status_of(lambda: server.stub.Recommend(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "at most" in details and field in details
    # the bound itself is served
    within = pb.RecommendRequest(user_id="u1", k=3, **{field: ids[:10_000]})
    assert_clear(*status_of(lambda: server.stub.Recommend(within, timeout=30)))
    still_whole(server, redis_url, accepted)


def test_garbage_between_valid_events_on_one_stream(server, redis_url, accepted):
    """Random bytes in between valid events on one stream: each is rejected by
    index with a reason, every valid event is acked and logged once."""
    stream = server.channel.stream_stream(
        SERVICE + "StreamFeedback",
        request_serializer=lambda data: data,
        response_deserializer=pb.FeedbackAck.FromString,
    )
    round_ = [0]

    @FUZZ
    @given(
        st.lists(st.one_of(st.binary(min_size=1, max_size=40), st.none()), min_size=1, max_size=20)
    )
    def check(drawn):
        round_[0] += 1
        messages, valid = [], {}
        for n, data in enumerate(drawn):
            if data is None:
                event_id = f"g{round_[0]}-{n}"
                valid[n] = event_id
                data = pb.FeedbackEvent(
                    event_id=event_id, user_id=f"streamer{round_[0]}", item_id="a3", type=pb.VIEW
                ).SerializeToString()
            messages.append(data)
        acks = list(stream(iter(messages), timeout=30))
        acked = [i for a in acks for i in a.event_ids]
        rejected = {r.index: r.reason for a in acks for r in a.rejected}
        assert all(rejected.values())
        assert len(acked) + len(rejected) == len(messages)
        assert set(valid.values()) <= set(acked)  # a valid event is never lost to garbage
        with redis.Redis.from_url(redis_url) as client:
            logged = [
                f[b"event_id"].decode() for _, f in log_entries(client)
                if f[b"user_id"].decode() == f"streamer{round_[0]}"
            ]  # fmt: skip
        assert len(logged) == len(set(logged))  # none applied twice
        assert set(valid.values()) <= set(logged)

    check()
    still_whole(server, redis_url, accepted)
