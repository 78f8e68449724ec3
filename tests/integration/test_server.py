"""End to end: a real server on port 0, a real Redis, generated stubs."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import log_entries, wait_for

from recsvc.store import EmbeddedRedis, connect_sync
from recsvc.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration


def ids(response):
    return [item.item_id for item in response.items]


def purchase(event_id, user, item, type_=pb.PURCHASE):
    return pb.FeedbackEvent(event_id=event_id, user_id=user, item_id=item, type=type_)


@pytest.fixture
def server(make_server, any_redis):
    """The contract holds on one Redis and on a Redis Cluster alike."""
    url, cluster = any_redis
    return make_server(redis_url=url, redis_cluster=cluster)


def health(server):
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="recsvc.v1.Recommender")).status


def test_known_user_gets_cf_list_without_seen_items(server):
    response = server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3))
    assert len(response.items) == 3 and response.personalized
    assert all(item.item_id.startswith("a") for item in response.items)  # u1 is in cluster a
    assert all(item.source == pb.SOURCE_CF for item in response.items)
    state = server.stub.GetUserState(pb.GetUserStateRequest(user_id="u1"))
    seen = {entry.item_id for entry in state.history}
    assert state.known_to_model and seen and not seen & set(ids(response))
    assert response.model_version and len(response.recommendation_id) == 32


def test_feedback_changes_the_next_list(server):
    before = server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=4))
    # u1 (cluster a) now buys several b items: b items must enter the list
    events = [purchase(f"e{i}", "u1", f"b{i}") for i in range(1, 4)]
    ack = server.stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    assert ack.accepted == 3 and ack.duplicates == 0
    after = server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=4))
    assert ids(after) != ids(before)
    assert any(i.startswith("b") for i in ids(after))
    assert not {"b1", "b2", "b3"} & set(ids(after))  # now seen


def test_resent_event_ids_change_nothing(server):
    events = [purchase("dup-1", "u1", "b1"), purchase("dup-2", "u1", "b2")]
    first = server.stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    state1 = server.stub.GetUserState(pb.GetUserStateRequest(user_id="u1"))
    second = server.stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    state2 = server.stub.GetUserState(pb.GetUserStateRequest(user_id="u1"))
    assert (first.accepted, first.duplicates) == (2, 0)
    assert (second.accepted, second.duplicates) == (0, 2)
    assert state1 == state2 and state2.event_count == 2
    weights = {e.item_id: e.weight for e in state2.history}
    assert weights["b1"] == 8.0


def test_cold_start_gets_k_popular_items(server):
    response = server.stub.Recommend(pb.RecommendRequest(user_id="stranger", k=5))
    assert len(response.items) == 5 and not response.personalized
    assert all(item.source == pb.SOURCE_POPULARITY for item in response.items)
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True)
    # more than the catalogue: every item once
    response = server.stub.Recommend(pb.RecommendRequest(user_id="stranger", k=100))
    assert len(set(ids(response))) == len(response.items) == 16


def test_never_seen_user_is_built_from_streamed_events(server):
    events = [purchase(f"s{i}", "newcomer", f"b{i}") for i in range(3)]
    acks = list(server.stub.StreamFeedback(iter(events)))
    acked = [e for ack in acks for e in ack.event_ids]
    assert sorted(acked) == ["s0", "s1", "s2"]
    response = server.stub.Recommend(pb.RecommendRequest(user_id="newcomer", k=3))
    assert response.personalized
    assert all(i.startswith("b") for i in ids(response))
    state = server.stub.GetUserState(pb.GetUserStateRequest(user_id="newcomer"))
    assert not state.known_to_model and state.event_count == 3
    assert state.history[0].item_id == "b2" or state.history[0].last_event.ToMilliseconds() > 0


def ack_lists(acks):
    """A feedback stream's acks as (acked ids, duplicate ids, (rejected id, index))."""
    acked = [e for ack in acks for e in ack.event_ids]
    duplicates = [e for ack in acks for e in ack.duplicate_event_ids]
    rejected = [(r.event_id, r.index) for ack in acks for r in ack.rejected]
    return acked, duplicates, rejected


def test_stream_rejects_malformed_events_by_id_and_keeps_going(server):
    events = [
        purchase("ok-1", "streamer", "a1"),
        pb.FeedbackEvent(event_id="bad-type", user_id="streamer", item_id="a2"),
        purchase("", "streamer", "a3"),
        purchase("ok-2", "streamer", "a4"),
        purchase("ok-1", "streamer", "a1"),
    ]
    acks = list(server.stub.StreamFeedback(iter(events)))
    acked, duplicates, rejected = ack_lists(acks)
    assert acked == ["ok-1", "ok-2", "ok-1"] and duplicates == ["ok-1"]
    assert rejected == [("bad-type", 1), ("", 2)]
    reasons = " ".join(r.reason for ack in acks for r in ack.rejected)
    assert "EVENT_TYPE_UNSPECIFIED" in reasons and "event_id is empty" in reasons


def test_batched_stream_acks_rejects_by_stream_index_and_keeps_going(server):
    """StreamFeedbackBatches: the same acks as StreamFeedback, the rejected events'
    indexes counted over the whole stream."""
    batches = [
        pb.SendFeedbackRequest(events=[purchase("bb-1", "batcher", "a1"),
                                       pb.FeedbackEvent(event_id="bb-bad", user_id="batcher",
                                                        item_id="a2")]),  # fmt: skip
        pb.SendFeedbackRequest(),  # an empty batch is no events
        pb.SendFeedbackRequest(events=[purchase("", "batcher", "a3"),
                                       purchase("bb-2", "batcher", "a4"),
                                       purchase("bb-1", "batcher", "a1")]),  # fmt: skip
    ]
    acks = list(server.stub.StreamFeedbackBatches(iter(batches)))
    acked, duplicates, rejected = ack_lists(acks)
    assert acked == ["bb-1", "bb-2", "bb-1"] and duplicates == ["bb-1"]
    assert rejected == [("bb-bad", 1), ("", 2)]
    state = server.stub.GetUserState(pb.GetUserStateRequest(user_id="batcher"))
    assert state.event_count == 2 and {h.item_id for h in state.history} == {"a1", "a4"}
    rec = server.stub.Recommend(pb.RecommendRequest(user_id="batcher", k=3))
    assert not {"a1", "a4"} & set(ids(rec))  # the next call reflects the acked events


def test_unknown_item_feedback_is_kept(server):
    server.stub.SendFeedback(pb.SendFeedbackRequest(events=[purchase("n1", "u1", "brand-new")]))
    state = server.stub.GetUserState(pb.GetUserStateRequest(user_id="u1"))
    assert state.history[0].item_id == "brand-new"
    assert server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3)).items


def test_exclude_and_restrict(server):
    full = ids(server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3)))
    excluded = ids(
        server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3, exclude_item_ids=full[:1]))
    )
    assert full[0] not in excluded and len(excluded) == 3
    restricted = server.stub.Recommend(
        pb.RecommendRequest(user_id="u1", k=5, restrict_item_ids=["b5", "a6", "nope"])
    )
    assert set(ids(restricted)) <= {"b5", "a6"} and len(restricted.items) >= 1


def test_similar_items(server):
    response = server.stub.SimilarItems(pb.SimilarItemsRequest(item_id="a1", k=3))
    assert len(response.items) == 3 and "a1" not in ids(response)
    assert all(i.startswith("a") for i in ids(response))


MISSPELT_ENUM = (
    "received 0 (EVENT_TYPE_UNSPECIFIED), which is also what a misspelt or unknown enum name "
    "arrives as; valid values: VIEW, CLICK"
)
BAD_STRATEGY = "unknown strategy: received 9; valid values: STRATEGY_UNSPECIFIED, STRATEGY_CF"


@pytest.mark.parametrize(
    "call, code, message",
    [
        (lambda s: s.Recommend(pb.RecommendRequest(user_id="", k=3)), "INVALID_ARGUMENT", "user_id is empty"),
        (lambda s: s.Recommend(pb.RecommendRequest(user_id="u1", k=0)), "INVALID_ARGUMENT", "k must be between 1 and 1000"),
        (lambda s: s.Recommend(pb.RecommendRequest(user_id="u1", k=1001)), "INVALID_ARGUMENT", "got 1001"),
        (lambda s: s.Recommend(pb.RecommendRequest(user_id="u" * 300, k=1)), "INVALID_ARGUMENT", "longer than 256"),
        (lambda s: s.SimilarItems(pb.SimilarItemsRequest(item_id="zzz", k=3)), "NOT_FOUND", "item 'zzz' is not in model"),
        (lambda s: s.SimilarItems(pb.SimilarItemsRequest(item_id="a1", k=-1)), "INVALID_ARGUMENT", "k must be"),
        (lambda s: s.SendFeedback(pb.SendFeedbackRequest()), "INVALID_ARGUMENT", "no events"),
        (lambda s: s.SendFeedback(pb.SendFeedbackRequest(events=[purchase(f"e{i}", "u", "i") for i in range(1001)])), "INVALID_ARGUMENT", "at most 1000"),
        (lambda s: s.SendFeedback(pb.SendFeedbackRequest(events=[purchase("e", "u", "i", type_=42)])), "INVALID_ARGUMENT", "unknown event type: received 42; valid values: VIEW"),
        (lambda s: s.SendFeedback(pb.SendFeedbackRequest(events=[purchase("e", "", "i")])), "INVALID_ARGUMENT", "user_id is empty"),
        (lambda s: s.SendFeedback(pb.SendFeedbackRequest(events=[purchase("e", "u", "i", type_=0)])), "INVALID_ARGUMENT", MISSPELT_ENUM),  # noqa: E501
        (lambda s: s.Recommend(pb.RecommendRequest(user_id="u1", k=3, strategy=9)), "INVALID_ARGUMENT", BAD_STRATEGY),  # noqa: E501
        (lambda s: s.GetUserState(pb.GetUserStateRequest()), "INVALID_ARGUMENT", "user_id is empty"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_clear_status(server, call, code, message):
    with pytest.raises(grpc.RpcError) as info:
        call(server.stub)
    assert info.value.code() == getattr(grpc.StatusCode, code)
    assert message in info.value.details()


def test_invalid_batch_applies_nothing(server):
    events = [purchase("good", "u7", "a1"), purchase("bad", "u7", "a2", type_=0)]
    with pytest.raises(grpc.RpcError):
        server.stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    assert server.stub.GetUserState(pb.GetUserStateRequest(user_id="u7")).event_count == 0


def test_health_and_reflection(server):
    assert health(server) == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (reply,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"recsvc.v1.Recommender", "grpc.health.v1.Health"} <= names
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.n_items == 16 and info.n_users == 40 and info.model_version


def test_redis_stopped_mid_test(make_server, tmp_path):
    own_redis = EmbeddedRedis(tmp_path / "r").start()
    try:
        server = make_server(redis_url=own_redis.url)
        stub = server.stub
        stub.SendFeedback(pb.SendFeedbackRequest(events=[purchase("before", "u1", "b1")]))
        personalised = ids(stub.Recommend(pb.RecommendRequest(user_id="u1", k=3)))

        own_redis.stop()
        # feedback: never a false ack
        with pytest.raises(grpc.RpcError) as info:
            stub.SendFeedback(pb.SendFeedbackRequest(events=[purchase("during", "u1", "b2")]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamFeedback(iter([purchase("during-s", "u1", "b2")])))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # recommend: still answers from the model, and says so
        degraded = stub.Recommend(pb.RecommendRequest(user_id="u1", k=3))
        assert degraded.degraded and "unavailable" in degraded.degraded_reason
        assert len(degraded.items) == 3 and degraded.personalized
        assert wait_for(lambda: health(server) == health_pb2.HealthCheckResponse.NOT_SERVING)

        own_redis.start()  # same data dir: the AOF brings back what was acknowledged
        assert wait_for(lambda: health(server) == health_pb2.HealthCheckResponse.SERVING)
        recovered = stub.Recommend(pb.RecommendRequest(user_id="u1", k=3))
        assert not recovered.degraded and ids(recovered) == personalised
        ack = stub.SendFeedback(pb.SendFeedbackRequest(events=[purchase("after", "u1", "b2")]))
        assert ack.accepted == 1
        state = stub.GetUserState(pb.GetUserStateRequest(user_id="u1"))
        assert state.event_count == 2
        assert {"b1", "b2"} <= {e.item_id for e in state.history}
    finally:
        own_redis.stop()


def test_feedback_is_in_the_log(server, any_redis):
    server.stub.SendFeedback(
        pb.SendFeedbackRequest(
            events=[purchase("log-1", "u3", "a2"), purchase("log-2", "u3", "zz")]
        )
    )
    with connect_sync(*any_redis) as client:
        entries = log_entries(client)
    assert [fields[b"event_id"] for _, fields in entries] == [b"log-1", b"log-2"]
    assert entries[0][1][b"type"] == b"purchase"
