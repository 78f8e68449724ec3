"""One client's odd but well-formed input must never fail or degrade another's call.

Real Redis, real gRPC server, generated stubs. Each poison event is followed by
a valid event from another user, on the same and on another connection, and a
Recommend that must not be degraded.
"""

import asyncio
import time

import grpc
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import log_entries, log_length
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.store import (
    EmbeddedRedis,
    StoredEvent,
    StoreRequestError,
    UserStore,
    user_keys,
)
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

YEAR_9999 = 253_402_300_799  # seconds: the largest a Timestamp may hold


def event(event_id, user="poisoner", item="a1", type_=pb.CLICK, value=0.0, seconds=None):
    message = pb.FeedbackEvent(
        event_id=event_id, user_id=user, item_id=item, type=type_, value=value
    )
    if seconds is not None:
        message.timestamp.CopyFrom(Timestamp(seconds=seconds))
    return message


POISON = {
    "nan rating": (event("p", type_=pb.RATING, value=float("nan")), "finite number"),
    "+inf rating": (event("p", type_=pb.RATING, value=float("inf")), "finite number"),
    "-inf rating": (event("p", type_=pb.RATING, value=float("-inf")), "finite number"),
    "nan on a click": (event("p", value=float("nan")), "finite number"),
    "huge rating": (event("p", type_=pb.RATING, value=1e308), "max_event_value"),
    "weight beyond the bound": (event("p", type_=pb.RATING, value=5e5), "max_event_weight"),
    "year 9999": (event("p", seconds=YEAR_9999), "accepted window"),
    "negative timestamp": (event("p", seconds=-86400), "accepted window"),
    "1970": (event("p", seconds=1), "accepted window"),
    "control character in user_id": (event("p", user="evil\x00user"), "U+0000"),
    "escape in item_id": (event("p", item="a1\x1b[2J"), "U+001B"),
    "C1 control in event_id": (event("p\x85"), "U+0085"),
    "newline in recommendation_id": (
        pb.FeedbackEvent(event_id="p", user_id="poisoner", item_id="a1", type=pb.CLICK,
                         recommendation_id="r\n1"),
        "U+000A",
    ),  # fmt: skip
}


def check_others_unaffected(server, second_stub, tag):
    """A valid event from another user, on this and another connection, is acked;
    a Recommend is not degraded; health stays SERVING."""
    for n, stub in enumerate((server.stub, second_stub)):
        ack = stub.SendFeedback(
            pb.SendFeedbackRequest(events=[event(f"ok-{tag}-{n}", user=f"bystander-{n}")])
        )
        assert ack.accepted == 1
        response = stub.Recommend(pb.RecommendRequest(user_id="u1", k=3))
        assert not response.degraded, response.degraded_reason
        assert len(response.items) == 3
    health = health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(service="recsvc.v1.Recommender")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def second_stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.RecommenderStub(channel)
    channel.close()


@pytest.mark.parametrize("name", list(POISON))
def test_poison_event_in_send_feedback(server, second_stub, redis_url, name):
    poison, reason = POISON[name]
    batch = [event("fine-before", user="poisoner"), poison]
    with pytest.raises(grpc.RpcError) as info:
        server.stub.SendFeedback(pb.SendFeedbackRequest(events=batch))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event 1 (id " in info.value.details() and reason in info.value.details()
    assert "none applied" in info.value.details()
    with redis.Redis.from_url(redis_url) as client:  # none applied: nothing logged
        assert log_length(client) == 0
    check_others_unaffected(server, second_stub, "unary")


@pytest.mark.parametrize("name", list(POISON))
def test_poison_event_in_a_stream(server, second_stub, name):
    poison, reason = POISON[name]
    events = [event("s-1", user="streamer"), poison, event("s-2", user="streamer", item="a2")]
    acks = list(server.stub.StreamFeedback(iter(events)))  # ends OK: the stream went on
    assert [e for a in acks for e in a.event_ids] == ["s-1", "s-2"]
    rejected = [(r.index, r.reason) for a in acks for r in a.rejected]
    assert len(rejected) == 1 and rejected[0][0] == 1 and reason in rejected[0][1]
    check_others_unaffected(server, second_stub, "stream")


def test_the_reproduction_from_the_issue(server):
    nan = pb.FeedbackEvent(
        event_id="p", user_id="u", item_id="a1", type=pb.RATING, value=float("nan")
    )
    with pytest.raises(grpc.RpcError) as info:
        server.stub.SendFeedback(pb.SendFeedbackRequest(events=[nan]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not server.stub.Recommend(pb.RecommendRequest(user_id="u2", k=3)).degraded


def raw_call(channel, method, response_class, stream=False):
    make = channel.stream_stream if stream else channel.unary_unary
    return make(
        f"/recsvc.v1.Recommender/{method}",
        request_serializer=lambda data: data,
        response_deserializer=response_class.FromString,
    )


def test_invalid_utf8_gets_invalid_argument_and_the_stream_goes_on(server, second_stub):
    bad = event("u8", user="UUUU").SerializeToString().replace(b"UUUU", b"\xff\xfeUU")
    unary = raw_call(server.channel, "SendFeedback", pb.SendFeedbackResponse)
    request = pb.SendFeedbackRequest(events=[event("u8", user="UUUU")]).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        unary(request.replace(b"UUUU", b"\xff\xfeUU"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()

    stream = raw_call(server.channel, "StreamFeedback", pb.FeedbackAck, stream=True)
    good = event("after-bad-bytes", user="streamer").SerializeToString()
    acks = list(stream(iter([bad, b"\x0a\xff", good]), timeout=10))
    assert [e for a in acks for e in a.event_ids] == ["after-bad-bytes"]
    assert sorted(r.index for a in acks for r in a.rejected) == [0, 1]
    assert all("malformed message" in r.reason for a in acks for r in a.rejected)

    # a batch message that does not parse counts as no events; the next batch goes on
    batches = raw_call(server.channel, "StreamFeedbackBatches", pb.FeedbackAck, stream=True)
    ok = pb.SendFeedbackRequest(events=[event("b-before", user="streamer")]).SerializeToString()
    after = pb.SendFeedbackRequest(events=[event("b-after", user="streamer")]).SerializeToString()
    broken = pb.SendFeedbackRequest(events=[event("b-u8", user="UUUU"), event("b-ok")])
    broken = broken.SerializeToString().replace(b"UUUU", b"\xff\xfeUU")
    acks = list(batches(iter([ok, broken, after]), timeout=10))
    assert [e for a in acks for e in a.event_ids] == ["b-before", "b-after"]
    rejected = [r for a in acks for r in a.rejected]
    assert [(r.event_id, r.index) for r in rejected] == [("", 1)]
    assert "message #1" in rejected[0].reason and "malformed message" in rejected[0].reason
    check_others_unaffected(server, second_stub, "utf8")


def test_a_command_error_fails_only_that_request(server, second_stub, redis_url):
    """A read that Redis refuses (a key of the wrong type, written by someone else)
    is INTERNAL with an error id for that call, not an outage for everyone."""
    with redis.Redis.from_url(redis_url) as client:
        client.set(user_keys("tampered")[0], "not a hash")
    for call in (
        lambda: server.stub.Recommend(pb.RecommendRequest(user_id="tampered", k=3)),
        lambda: server.stub.GetUserState(pb.GetUserStateRequest(user_id="tampered")),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "error id" in info.value.details()
    check_others_unaffected(server, second_stub, "wrongtype")


def test_redis_out_of_memory_is_resource_exhausted_and_reads_go_on(make_server, tmp_path):
    own = EmbeddedRedis(tmp_path / "r").start()
    try:
        server = make_server(redis_url=own.url)
        with redis.Redis.from_url(own.url) as client:
            client.config_set("maxmemory", 1)
            with pytest.raises(grpc.RpcError) as info:
                server.stub.SendFeedback(pb.SendFeedbackRequest(events=[event("oom")]))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "out of memory" in info.value.details()
            assert not server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3)).degraded
            client.config_set("maxmemory", 0)
        ack = server.stub.SendFeedback(pb.SendFeedbackRequest(events=[event("oom")]))
        assert ack.accepted == 1  # the refused event was not half-applied
    finally:
        own.stop()


def test_the_scripts_own_check_refuses_a_whole_chunk(redis_url):
    """Defence in depth: a non-finite number that got past validation fails its
    chunk before the script writes anything (Redis would not roll back)."""

    async def main():
        store = UserStore.from_url(redis_url)
        try:
            good = StoredEvent("g", "script-user", "a1", "click", 0.0, 2.0, 1, "")
            bad = StoredEvent("b", "script-user", "a2", "rating", float("nan"), float("nan"), 1, "")
            with pytest.raises(StoreRequestError) as info:
                await store.apply_events([good, bad])
            assert info.value.invalid and "RECSVC_INVALID" in str(info.value)
            assert await store.ping()
        finally:
            await store.close()

    asyncio.run(main())
    with redis.Redis.from_url(redis_url) as client:
        assert log_length(client) == 0 and not client.keys("*script-user*")


# --- the property: every event is applied exactly once or rejected with a reason ---

now_s = int(time.time())
VALID = {
    "event_id": st.sampled_from(["e1", "e2", "e3", "e4"]),
    "user": st.sampled_from(["pa", "pb"]),
    "item": st.sampled_from(["a1", "a2", "b3", "zz-new", "x y"]),
    "type": st.integers(min_value=1, max_value=9),
    "value": st.floats(min_value=-10, max_value=10),
    "seconds": st.one_of(
        st.none(), st.integers(min_value=now_s - 7 * 86400, max_value=now_s + 3600)
    ),
    "rec": st.sampled_from(["", "rec-1"]),
}
INVALID = {
    "event_id": st.sampled_from(["", "e\x00"]),
    "user": st.just("p\x7f"),
    "item": st.one_of(st.text(max_size=6), st.just("y" * 300)),  # control characters too
    "type": st.sampled_from([0, 10, 12]),
    "value": st.one_of(st.floats(), st.sampled_from([1e308, 2e6, -1e10])),  # nan, inf, huge
    "seconds": st.integers(min_value=-62_135_596_800, max_value=253_402_300_799),
    "rec": st.just("r\x01"),
}
FIELDS = list(VALID)
valid_event = st.tuples(*(VALID[f] for f in FIELDS))
wild_event = st.tuples(*(st.one_of(VALID[f], INVALID[f]) for f in FIELDS))
raw_events = st.lists(st.one_of(valid_event, wild_event), min_size=1, max_size=12)


def test_every_event_is_applied_once_or_rejected_with_a_reason(server, redis_url):
    round_ = [0]

    @settings(
        max_examples=40, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )  # fmt: skip
    @given(raw_events)
    def check(drawn):
        round_[0] += 1
        prefix = f"r{round_[0]}-"  # a fresh namespace of users for each example
        messages = []
        for eid, user, item, type_, value, seconds, rec in drawn:
            message = pb.FeedbackEvent(
                event_id=eid, user_id=prefix + user, item_id=item, type=type_, value=value,
                recommendation_id=rec,
            )  # fmt: skip
            if seconds is not None:
                message.timestamp.CopyFrom(Timestamp(seconds=seconds))
            messages.append(message)
        acks = list(server.stub.StreamFeedback(iter(messages), timeout=30))
        acked = [i for a in acks for i in a.event_ids]
        duplicates = [i for a in acks for i in a.duplicate_event_ids]
        rejected = {r.index: r.reason for a in acks for r in a.rejected}
        assert all(rejected.values())  # every rejection says why
        assert len(acked) + len(rejected) == len(messages)  # each event answered once
        # what was acked and not a duplicate is in the log exactly once, nothing else is
        with redis.Redis.from_url(redis_url) as client:
            logged = [
                (f[b"user_id"].decode(), f[b"event_id"].decode())
                for _, f in log_entries(client)
                if f[b"user_id"].decode().startswith(prefix)
            ]
        accepted = [m for n, m in enumerate(messages) if n not in rejected]
        first_of_each = {}
        for m in accepted:
            first_of_each.setdefault((m.user_id, m.event_id), m)
        assert sorted(logged) == sorted(first_of_each)
        assert len(duplicates) == len(accepted) - len(first_of_each)
        # and the unary call: all or nothing, with a reason per bad event
        try:
            reply = server.stub.SendFeedback(pb.SendFeedbackRequest(events=messages))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and rejected
            assert f"{len(rejected)} invalid events" in exc.details()
        else:
            assert not rejected and reply.accepted == 0  # all were applied by the stream
        assert not server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3)).degraded

    check()
