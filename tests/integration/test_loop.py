"""Closing the loop: the feedback log flows into the next model, which the server
picks up without a restart and without failing a call."""

import csv
import json
import shutil
import threading
import time

import grpc
import pytest
import redis
from conftest import train_bundle
from helpers import wait_for

from recsvc.bundle import read_manifest
from recsvc.cli import main as recsvc_main
from recsvc.store import TRAINER_GROUP, export_feedback, feedback_stream, shard_of
from recsvc.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration


def purchase(event_id, user, item, ms=None):
    event = pb.FeedbackEvent(event_id=event_id, user_id=user, item_id=item, type=pb.PURCHASE)
    if ms is not None:
        event.timestamp.FromMilliseconds(ms)
    return event


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_export_is_at_least_once_and_trims_what_it_exported(server, redis_url, tmp_path):
    server.stub.SendFeedback(pb.SendFeedbackRequest(
        events=[purchase(f"x{i}", "u1", f"b{i}") for i in range(5)]))  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    FEEDBACK_STREAM = feedback_stream(shard_of("u1"))  # noqa: N806 (u1's shard of the log)
    # a previous export read two entries and crashed before acknowledging them
    client.xgroup_create(FEEDBACK_STREAM, TRAINER_GROUP, id="0")
    client.xreadgroup(TRAINER_GROUP, "crashed-exporter", {FEEDBACK_STREAM: ">"}, count=2)

    count, last = export_feedback(client, tmp_path / "fb1.csv")
    exported = rows(tmp_path / "fb1.csv")
    assert count == 5 and sorted(r["event_id"] for r in exported) == [f"x{i}" for i in range(5)]
    assert exported[0]["event_type"] == "purchase" and exported[0]["user_id"] == "u1"
    assert client.xlen(FEEDBACK_STREAM) == 0  # consumed entries trimmed
    assert client.xpending(FEEDBACK_STREAM, TRAINER_GROUP)["pending"] == 0

    server.stub.SendFeedback(pb.SendFeedbackRequest(events=[purchase("x9", "u2", "a1")]))
    count, _ = export_feedback(client, tmp_path / "fb2.csv")
    assert count == 1 and [r["event_id"] for r in rows(tmp_path / "fb2.csv")] == ["x9"]


def test_feedback_reaches_the_next_model_and_hot_reload(
    make_server, redis_url, tmp_path, clustered_csv
):
    models = tmp_path / "models"
    live = train_bundle(clustered_csv, models / "live")
    server = make_server(model=live, model_watch_s=0.1)
    stub = server.stub
    first_version = stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
    with pytest.raises(grpc.RpcError) as info:
        stub.SimilarItems(pb.SimilarItemsRequest(item_id="new-sku", k=3))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # users who buy a1 also buy a brand-new item
    event_ms = int(time.time() * 1000) - 60_000  # after the training log's 2026-01-01
    events = [purchase(f"n{u}", f"u{u}", "new-sku", ms=event_ms) for u in range(6)]
    stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    weight_before = {h.item_id: h.weight for h in
                     stub.GetUserState(pb.GetUserStateRequest(user_id="u1")).history}["new-sku"]  # fmt: skip

    # export the log and train the next version on interactions + feedback
    feedback = tmp_path / "feedback.csv"
    assert recsvc_main(["export-feedback", "--redis-url", redis_url, "--out", str(feedback)]) == 0
    assert recsvc_main(["train", "--interactions", str(clustered_csv), "--interactions",
                        str(feedback), "--out", str(models / "next"), "--quiet",
                        "--neighbours", "20"]) == 0  # fmt: skip
    manifest = read_manifest(models / "next")
    assert manifest["params"]["data_until_ms"] == event_ms

    # load while calls are running: none may fail
    failures, calls, stop = [], [0], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                stub.Recommend(pb.RecommendRequest(user_id="u3", k=5))
                stub.SimilarItems(pb.SimilarItemsRequest(item_id="a1", k=3))
                calls[0] += 1
            except grpc.RpcError as exc:
                failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: calls[0] > 20)
        info = stub.ReloadModel(pb.ReloadModelRequest(model_dir="next"))
        assert info.model_version == manifest["model_version"] != first_version
        wait_for(lambda: calls[0] > 80)
        # the watched directory: a new bundle replacing it is picked up by itself
        shutil.rmtree(live)
        shutil.copytree(models / "next", live)
        stub.ReloadModel(pb.ReloadModelRequest())  # back to the watched directory
        wait_for(lambda: calls[0] > 140)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and calls[0] > 100

    similar = stub.SimilarItems(pb.SimilarItemsRequest(item_id="new-sku", k=3))
    assert similar.model_version == manifest["model_version"] and similar.items
    # the feedback is in the model now: it is not counted a second time from Redis
    state = stub.GetUserState(pb.GetUserStateRequest(user_id="u1"))
    assert {h.item_id: h.weight for h in state.history}["new-sku"] == weight_before == 8.0


def test_watcher_reloads_a_replaced_bundle(make_server, tmp_path, clustered_csv):
    live = train_bundle(clustered_csv, tmp_path / "m" / "live")
    server = make_server(model=live, model_watch_s=0.05)
    before = server.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
    train_bundle(clustered_csv, tmp_path / "m" / "next", neighbours=5)
    shutil.rmtree(live)
    shutil.copytree(tmp_path / "m" / "next", live)
    after = read_manifest(live)["model_version"]
    assert after != before
    assert wait_for(
        lambda: server.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == after
    )
    params = json.loads(server.stub.GetModelInfo(pb.GetModelInfoRequest()).params_json)
    assert params["neighbours"] == 5


def test_empty_reload_and_the_watcher_follow_the_configured_directory(
    make_server, tmp_path, clustered_csv
):
    live = train_bundle(clustered_csv, tmp_path / "m" / "live")
    train_bundle(clustered_csv, tmp_path / "m" / "other", neighbours=5)
    server = make_server(model=live, model_watch_s=0.05)
    stub = server.stub
    configured = stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
    other = stub.ReloadModel(pb.ReloadModelRequest(model_dir="other")).model_version
    assert other != configured
    time.sleep(0.3)  # the watcher leaves an explicit reload alone while --model is unchanged
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == other
    # empty model_dir: the configured --model directory, not the last one loaded
    assert stub.ReloadModel(pb.ReloadModelRequest()).model_version == configured
    stub.ReloadModel(pb.ReloadModelRequest(model_dir="other"))
    # a new bundle in --model: the watcher loads it, though "other" was loaded last
    train_bundle(clustered_csv, tmp_path / "m" / "next", neighbours=3)
    shutil.rmtree(live)
    shutil.copytree(tmp_path / "m" / "next", live)
    newest = read_manifest(live)["model_version"]
    assert newest not in (configured, other)
    assert wait_for(
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == newest
    )


def test_reload_errors(server, tmp_path):
    for model_dir, code in [
        ("../../etc", grpc.StatusCode.INVALID_ARGUMENT),
        ("missing", grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.ReloadModel(pb.ReloadModelRequest(model_dir=model_dir))
        assert info.value.code() == code, info.value.details()
    # a broken bundle: refused, and the old model keeps serving
    broken = server.server.settings.model.parent / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ReloadModel(pb.ReloadModelRequest(model_dir="broken"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "invalid JSON" in info.value.details()
    assert server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=2)).items
