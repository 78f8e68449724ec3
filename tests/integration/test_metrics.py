"""#13: Prometheus /metrics counts match the calls made (one process, and --workers 2)."""

import shutil
import urllib.request

import grpc
import pytest
from helpers import start_serving, stop_serving, wait_for
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from recsvc.store import free_port
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            samples[key] = samples.get(key, 0) + s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def make_calls(stub):
    rid = ""
    for i in range(5):
        rid = stub.Recommend(pb.RecommendRequest(user_id=f"u{i}", k=3)).recommendation_id
    with pytest.raises(grpc.RpcError):
        stub.Recommend(pb.RecommendRequest(user_id="u1", k=0))  # INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        stub.SimilarItems(pb.SimilarItemsRequest(item_id="nope", k=3))  # NOT_FOUND
    events = [pb.FeedbackEvent(event_id=f"e{i}", user_id="u1", item_id="a1", type=pb.CLICK)
              for i in range(3)]  # fmt: skip
    events[1].recommendation_id = rid  # served by this process
    events[2].recommendation_id = "elsewhere"
    stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    stub.SendFeedback(pb.SendFeedbackRequest(events=events[:1]))  # a duplicate
    with pytest.raises(grpc.RpcError):  # two invalid events
        bad = pb.FeedbackEvent(event_id="", user_id="u1", item_id="a1", type=pb.CLICK)
        stub.SendFeedback(pb.SendFeedbackRequest(events=[bad, bad]))
    acks = list(stub.StreamFeedback(iter([
        pb.FeedbackEvent(event_id="s1", user_id="u2", item_id="a2", type=pb.CLICK),
        pb.FeedbackEvent(event_id="", user_id="u2", item_id="a2", type=pb.CLICK),
    ])))  # fmt: skip
    assert sum(len(a.event_ids) for a in acks) == 1


def check_counts(samples):
    rpc = "recsvc_rpc_requests_total"
    assert value(samples, rpc, method="Recommend", code="OK") == 5
    assert value(samples, rpc, method="Recommend", code="INVALID_ARGUMENT") == 1
    assert value(samples, rpc, method="SimilarItems", code="NOT_FOUND") == 1
    assert value(samples, rpc, method="SendFeedback", code="OK") == 2
    assert value(samples, rpc, method="SendFeedback", code="INVALID_ARGUMENT") == 1
    assert value(samples, rpc, method="StreamFeedback", code="OK") == 1
    assert value(samples, "recsvc_rpc_latency_seconds_count", method="Recommend") == 6
    fb = "recsvc_feedback_events_total"
    assert value(samples, fb, outcome="applied") == 4
    assert value(samples, fb, outcome="duplicate") == 1
    assert value(samples, fb, outcome="rejected") == 3
    attributed = "recsvc_attributed_events_total"
    assert value(samples, attributed, variant="default", type="click") == 1
    assert value(samples, attributed, variant="unknown", type="click") == 1


def worker_recommends(directory, scratch):
    """Successful Recommend calls counted by each worker's own file."""
    counts = []
    for path in sorted(directory.glob("counter_*.db")):
        scratch.mkdir(exist_ok=True)
        for old in scratch.glob("*.db"):
            old.unlink()
        shutil.copy(path, scratch / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(scratch))
        counts.append(registry.get_sample_value(
            "recsvc_rpc_requests_total", {"method": "Recommend", "code": "OK"}) or 0)  # fmt: skip
    return counts


def test_metrics_count_the_calls_made(make_server):
    port = free_port("127.0.0.1")
    server = make_server(metrics_port=port)
    make_calls(server.stub)
    assert wait_for(lambda: value(scrape(port), "recsvc_impressions_total", variant="default")
                    == 5, timeout_s=5)  # fmt: skip
    samples = scrape(port)
    check_counts(samples)
    version = server.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
    assert value(samples, "recsvc_model_info", version=version) == 1
    assert value(samples, "recsvc_redis_unavailable") == 0
    lookups = "recsvc_state_cache_lookups_total"
    assert value(samples, lookups, result="hit") + value(samples, lookups, result="miss") >= 5
    assert value(samples, "recsvc_store_calls_total") >= 4  # at least: 3 writes, 1 cache miss


def test_metrics_add_up_over_workers(tmp_path, model_dir):
    metrics_port = free_port("127.0.0.1")
    log = tmp_path / "log.txt"
    proc, port = start_serving(model_dir, tmp_path / "data", log,
                               "--workers", "2", "--metrics-port", str(metrics_port))  # fmt: skip
    try:
        assert wait_for(lambda: log.read_text().count("serving on port") == 2, timeout_s=60)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.RecommenderStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        make_calls(stub)
        # calls spread over both workers: new connections land on either
        for i in range(20):  # (SO_REUSEPORT spreads connections by their address hash)
            own = [("grpc.use_local_subchannel_pool", 1)]  # a new connection each
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=own) as other:
                pb_grpc.RecommenderStub(other).Recommend(pb.RecommendRequest(user_id=f"w{i}", k=2))
        samples = scrape(metrics_port)
        rpc = "recsvc_rpc_requests_total"
        assert value(samples, rpc, method="Recommend", code="OK") == 25
        samples = {
            k: (v - 20 if k == (rpc, (("code", "OK"), ("method", "Recommend"))) else v)
            for k, v in samples.items()
        }
        samples[("recsvc_rpc_latency_seconds_count", (("method", "Recommend"),))] -= 20
        check_counts(samples)
        per_worker = worker_recommends(tmp_path / "data" / "metrics", tmp_path / "one")
        assert len(per_worker) == 2 and all(per_worker), per_worker  # both served calls
        assert sum(per_worker) == 25
        channel.close()
    finally:
        assert stop_serving(proc, log) == 0, log.read_text()
