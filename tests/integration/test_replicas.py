"""Stateless replicas: several servers on one Redis (or one Redis Cluster) serve as
one; feedback acknowledged by one is seen by the next Recommend on another."""

import asyncio

import pytest

from loadtest.freshness import FreshnessConfig, run_freshness
from loadtest.ids import from_model_dir
from recsvc.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration


def test_feedback_on_one_instance_is_seen_by_the_next_call_on_another(
    make_server, any_redis, model_dir
):
    url, cluster = any_redis
    a = make_server(redis_url=url, redis_cluster=cluster)
    b = make_server(redis_url=url, redis_cluster=cluster)
    # warm b's state cache for the user, so a stale cached read would show
    b.stub.Recommend(pb.RecommendRequest(user_id="walker", k=5))
    a.stub.SendFeedback(pb.SendFeedbackRequest(events=[
        pb.FeedbackEvent(event_id="w1", user_id="walker", item_id="a1", type=pb.PURCHASE)
    ]))  # fmt: skip
    state = b.stub.GetUserState(pb.GetUserStateRequest(user_id="walker"))
    assert [e.item_id for e in state.history] == ["a1"]
    assert b.stub.Recommend(pb.RecommendRequest(user_id="walker", k=5)).personalized

    # the load client's freshness probe across the two: feedback to one, reads on the other
    cfg = FreshnessConfig(target=f"127.0.0.1:{a.port},127.0.0.1:{b.port}", samples=20,
                          concurrency=2, timeout=2.0, progress=False)  # fmt: skip
    report = asyncio.run(run_freshness(cfg, from_model_dir(model_dir)))
    f = report["freshness"]
    assert f["failed"] == 0 and f["undetectable"] == 0
    assert f["reflected_on_first_poll"] == f["samples"] == 20
