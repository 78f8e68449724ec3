"""The real command line: train a bundle, serve it with the embedded Redis, stop it."""

import json
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import alive, redis_pid, start_serving, stop_serving

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def test_train_then_serve_then_sigterm(tmp_path, clustered_csv):
    out = tmp_path / "model"
    train = subprocess.run(
        [sys.executable, "-m", "recsvc.cli", "train", "--interactions", str(clustered_csv),
         "--out", str(out), "--neighbours", "10", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert (out / "manifest.json").exists() and '"items": 16' in train.stdout
    params = json.loads((out / "manifest.json").read_text())["params"]
    search = params["knn_search"]  # the kNN's normalisation was chosen on validation
    best = max(search["tried"], key=lambda t: t["ndcg"])
    assert {name: params[name] for name in ("alpha", "a", "power")} == {
        name: best[name] for name in ("alpha", "a", "power")
    }
    again = subprocess.run(
        [sys.executable, "-m", "recsvc.cli", "train", "--interactions", str(clustered_csv),
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 2 and "--force" in again.stderr

    data_dir = tmp_path / "data"
    proc, port = start_serving(out, data_dir, tmp_path / "serve.log")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.RecommenderStub(channel)
        ack = stub.SendFeedback(
            pb.SendFeedbackRequest(
                events=[
                    pb.FeedbackEvent(event_id="cli-1", user_id="u1", item_id="b1", type=pb.PURCHASE)
                ]
            )
        )
        assert ack.accepted == 1
        redis = redis_pid(data_dir)
        channel.close()
    finally:
        assert stop_serving(proc, tmp_path / "serve.log") == 0
    assert "stopped" in (tmp_path / "serve.log").read_text()
    assert not alive(redis)
    assert (data_dir / "appendonly.aof").stat().st_size > 0


def test_killed_server_leaves_no_redis_and_restarts_with_its_data(tmp_path, model_dir):
    data_dir = tmp_path / "data"
    proc, port = start_serving(model_dir, data_dir, tmp_path / "a.log")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        stub.SendFeedback(
            pb.SendFeedbackRequest(
                events=[
                    pb.FeedbackEvent(event_id="k-1", user_id="zed", item_id="b1", type=pb.PURCHASE)
                ]
            )
        )
    redis = redis_pid(data_dir)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while alive(redis) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(redis), "embedded Redis outlived its killed server"

    proc, port = start_serving(model_dir, data_dir, tmp_path / "b.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            state = pb_grpc.RecommenderStub(channel).GetUserState(
                pb.GetUserStateRequest(user_id="zed")
            )
        assert [e.item_id for e in state.history] == ["b1"] and state.event_count == 1
    finally:
        stop_serving(proc, tmp_path / "b.log")


def test_several_workers_share_the_port_and_the_redis(tmp_path, model_dir):
    data_dir = tmp_path / "data"
    proc, port = start_serving(model_dir, data_dir, tmp_path / "w.log", "--workers", "2")
    try:
        log = tmp_path / "w.log"
        from helpers import wait_for

        assert wait_for(lambda: log.read_text().count("serving on port") == 2, timeout_s=30)
        worker_pids = [
            int(line.split("pid=")[1].split()[0])
            for line in log.read_text().splitlines()
            if "serving on port" in line
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pb_grpc.RecommenderStub(channel).SendFeedback(
                pb.SendFeedbackRequest(
                    events=[
                        pb.FeedbackEvent(
                            event_id="w-1", user_id="wuser", item_id="b1", type=pb.PURCHASE
                        )
                    ]
                )
            )
        # new connections land on either worker: every one sees the same state
        for _ in range(6):
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                rec = pb_grpc.RecommenderStub(channel).Recommend(
                    pb.RecommendRequest(user_id="wuser", k=3)
                )
                assert rec.personalized and "b1" not in [i.item_id for i in rec.items]
        redis = redis_pid(data_dir)
    finally:
        assert stop_serving(proc, tmp_path / "w.log") == 0, (tmp_path / "w.log").read_text()
    assert not alive(redis) and not any(alive(p) for p in worker_pids)


def test_eval_ranks_held_out_cluster_items_far_above_chance(tmp_path):
    import json

    import numpy as np

    rng = np.random.default_rng(3)
    train, test = ["user_id,item_id"], ["user_id,item_id"]
    for u in range(60):
        cluster = "a" if u < 30 else "b"
        items = rng.permutation(10)[:6]
        train += [f"u{u},{cluster}{i}" for i in items[:5]]
        test.append(f"u{u},{cluster}{items[5]}")
    (tmp_path / "train.csv").write_text("\n".join(train) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(test) + "\n")
    assert subprocess.run(
        [sys.executable, "-m", "recsvc.cli", "train", "--interactions", str(tmp_path / "train.csv"),
         "--out", str(tmp_path / "m"), "--quiet"], timeout=120).returncode == 0  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "recsvc.cli", "eval", "--model", str(tmp_path / "m"),
         "--test", str(tmp_path / "test.csv"), "--k", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["users"] == 60 and result["test_pairs_unknown_to_model"] == 0
    # 5 candidates left in the user's own cluster out of 15 unseen items: chance is 3/15
    assert result["recall@3"] > 0.5 and 0 < result["ndcg@3"] <= 1
