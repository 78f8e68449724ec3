"""#13: impressions, A/B variants and ``recsvc report`` on a real server and Redis."""

import json
import time

import grpc
import pytest
import redis
from conftest import train_bundle
from helpers import wait_for

from recsvc.bundle import read_manifest
from recsvc.cli import main as recsvc_main
from recsvc.online.impressions import Impression
from recsvc.store.impressions import read_impressions
from recsvc.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration


def write_variants(path, **extra):
    variants = [
        {"name": "control", "share": 0.5},
        {"name": "frozen", "share": 0.5, "strategy": "cf", "frozen_state": True, "max_k": 3},
        *extra.get("more", []),
    ]
    if extra.get("more"):
        variants[1]["share"] = 0.5
    path.write_text(json.dumps({"salt": "t", "variants": variants}))
    return path


def event(event_id, user, item, kind, rid, ms=None):
    e = pb.FeedbackEvent(event_id=event_id, user_id=user, item_id=item, type=kind,
                         recommendation_id=rid)  # fmt: skip
    if ms is not None:
        e.timestamp.FromMilliseconds(ms)
    return e


def wait_written(server, n):
    log = server.server.impressions
    assert wait_for(lambda: log.written >= n and log.pending == 0, timeout_s=10), (
        log.written, log.pending)  # fmt: skip


def report(capsys, redis_url, *extra):
    capsys.readouterr()
    code = recsvc_main(["report", "--redis-url", redis_url, "--json", "--window-s", "60", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_report_gives_exact_counts_per_variant(make_server, redis_url, tmp_path, capsys):
    server = make_server(variants=write_variants(tmp_path / "v.json"))
    stub = server.stub
    lists = {}
    for name, user, variant in [("c1", "u1", "control"), ("c2", "u2", "control"),
                                ("c3", "u3", "control"), ("f1", "u1", "frozen"),
                                ("f2", "u21", "frozen")]:  # fmt: skip
        reply = stub.Recommend(pb.RecommendRequest(user_id=user, k=5, variant=variant))
        assert reply.variant == variant and reply.items
        lists[name] = reply
    assert len(lists["f1"].items) == 3  # the variant's max_k
    item = {name: reply.items[0].item_id for name, reply in lists.items()}
    rid = {name: reply.recommendation_id for name, reply in lists.items()}
    now = int(time.time() * 1000)
    events = [
        event("e1", "u1", item["c1"], pb.CLICK, rid["c1"]),
        event("e2", "u1", item["c1"], pb.PURCHASE, rid["c1"]),
        event("e3", "u2", lists["c2"].items[1].item_id, pb.CLICK, rid["c2"]),
        event("e4", "u2", lists["c2"].items[2].item_id, pb.CLICK, rid["c2"]),  # same list again
        event("e5", "u21", item["f2"], pb.CLICK, rid["f2"]),
        event("e6", "u3", item["c3"], pb.CLICK, "not-a-known-id"),  # unknown impression
        event("e7", "u1", item["f1"], pb.CLICK, rid["f1"], ms=now + 120_000),  # too late
        event("e8", "u3", item["c3"], pb.VIEW, ""),  # no recommendation id
        event("e9", "u3", "b7", pb.CLICK, rid["c3"]),  # not in the list shown
    ]
    stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    # a client resending the same events: the server keeps them once
    dup = stub.SendFeedback(pb.SendFeedbackRequest(events=events[:2]))
    assert dup.duplicates == 2
    wait_written(server, 5)

    out = report(capsys, redis_url)
    control, frozen = out["variants"]["control"], out["variants"]["frozen"]
    assert (control["impressions"], control["clicked"], control["converted"]) == (3, 2, 1)
    assert (frozen["impressions"], frozen["clicked"], frozen["converted"]) == (2, 1, 0)
    assert control["events"] == {"click": 3, "purchase": 1}
    assert control["ctr"] == pytest.approx(2 / 3) and frozen["ctr"] == pytest.approx(0.5)
    assert out["events"] == {
        "total": 9, "attributed": 5, "without_recommendation_id": 1,
        "unattributed": {"late": 1, "no_impression": 1, "not_shown": 1},
    }  # fmt: skip
    assert out["control"] == "control" and 0 < frozen["vs_control"]["ctr_p"] <= 1
    assert control["by_position"]["0"] == {"shown": 3, "clicked": 1, "ctr": pytest.approx(1 / 3)}
    assert control["by_position"]["1"]["clicked"] == 1
    assert set(frozen["by_strategy"]) == {"cf"}
    # per-hour buckets add up to the total
    assert sum(b["impressions"] for b in control["by_time"].values()) == 3
    # a wider window attributes the late click too
    wide = report(capsys, redis_url, "--window-s", "3600")
    assert wide["variants"]["frozen"]["clicked"] == 2 and "late" not in wide["events"][
        "unattributed"]  # fmt: skip
    # the table and the plot
    capsys.readouterr()
    plot = tmp_path / "ctr.png"
    assert recsvc_main(["report", "--redis-url", redis_url, "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "control" in text and "frozen" in text and plot.stat().st_size > 1000


def test_impression_entries_and_sticky_assignment(make_server, redis_url, tmp_path):
    server = make_server(variants=write_variants(tmp_path / "v.json"))
    stub = server.stub
    first = {f"u{i}": stub.Recommend(pb.RecommendRequest(user_id=f"u{i}", k=4)).variant
             for i in range(30)}  # fmt: skip
    assert set(first.values()) == {"control", "frozen"}
    again = {u: stub.Recommend(pb.RecommendRequest(user_id=u, k=4)).variant for u in first}
    assert again == first
    wait_written(server, 60)
    client = redis.Redis.from_url(redis_url)
    logged = [Impression.from_json(f) for f in read_impressions(client)]
    assert len(logged) == 60
    imp = logged[0]
    assert imp.user_id == "u0" and imp.variant == first["u0"] and imp.kind == "recommend"
    assert len(imp.items) == (3 if imp.variant == "frozen" else 4) and imp.model_version
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(pb.RecommendRequest(user_id="u1", k=4, variant="nope"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "control, frozen" in info.value.details()


def test_frozen_variant_ignores_feedback(make_server, tmp_path):
    server = make_server(variants=write_variants(tmp_path / "v.json"))
    stub = server.stub

    def top(variant):
        reply = stub.Recommend(pb.RecommendRequest(user_id="fresh", k=3, variant=variant))
        return [i.item_id for i in reply.items], reply.personalized

    frozen_before = top("frozen")
    stub.SendFeedback(pb.SendFeedbackRequest(events=[
        event(f"p{i}", "fresh", f"b{i}", pb.PURCHASE, "") for i in range(3)]))  # fmt: skip
    items, personalized = top("control")
    assert personalized and not {"b0", "b1", "b2"} & set(items)  # learned, excludes seen
    assert top("frozen") == frozen_before and not frozen_before[1]  # cold start, unchanged


def test_interleaved_variant_credits_teams(make_server, redis_url, tmp_path, capsys):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"variants": [
        {"name": "control", "share": 1.0},
        {"name": "cf", "share": 0.0, "strategy": "cf", "frozen_state": True},
        {"name": "ab", "share": 0.0, "interleave": ["control", "cf"]},
    ]}))  # fmt: skip
    server = make_server(variants=path)
    stub = server.stub
    replies = [stub.Recommend(pb.RecommendRequest(user_id=f"u{i}", k=6, variant="ab"))
               for i in range(4)]  # fmt: skip
    for reply in replies:
        assert reply.variant == "ab" and len(reply.items) == 6
        assert {i.team for i in reply.items} <= {"control", "cf"}
        assert len({i.item_id for i in reply.items}) == 6
    # two lists: a click on a control item; one list: a click for each team (a tie)
    events = []
    for n, reply in enumerate(replies[:3]):
        by_team = {}
        for item in reply.items:
            by_team.setdefault(item.team, item.item_id)
        teams = ["control"] if n < 2 else ["control", "cf"]
        for team in teams:
            if team in by_team:
                events.append(event(f"i{n}{team}", f"u{n}", by_team[team], pb.CLICK,
                                    reply.recommendation_id))  # fmt: skip
    stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    wait_written(server, 4)
    out = report(capsys, redis_url)
    wins = out["variants"]["ab"]["interleaving"]["wins"]
    assert wins == {"control": 2, "tie": 1} and out["variants"]["ab"]["clicked"] == 3


def test_generate_is_logged_and_attributed_by_nearest_item(
    make_server, generator_model_dir, redis_url, capsys
):
    server = make_server(model=generator_model_dir)
    reply = server.stub.Generate(pb.GenerateRequest(user_id="u1", n=2, seed=7))
    assert reply.variant == "default"
    first = {i.item_id for i in reply.items[0].nearest_items}
    # any nearest item of the 2nd generated item (its position: 1)
    clicked = next(i.item_id for i in reply.items[1].nearest_items if i.item_id not in first)
    server.stub.SendFeedback(pb.SendFeedbackRequest(events=[
        event("g1", "u1", clicked, pb.CLICK, reply.generation_id)]))  # fmt: skip
    wait_written(server, 1)
    out = report(capsys, redis_url)
    row = out["variants"]["default"]
    assert (row["impressions"], row["clicked"]) == (1, 1) and set(row["by_strategy"]) == {
        "generate"}  # fmt: skip
    assert row["by_position"]["1"]["clicked"] == 1


def test_impressions_queued_at_shutdown_are_written(make_server, redis_url):
    server = make_server(impression_flush_s=10)  # nothing is written before the stop
    for i in range(7):
        server.stub.Recommend(pb.RecommendRequest(user_id=f"u{i}", k=3))
    assert server.server.impressions.written == 0
    server.run(server.server.stop(0))  # (safe to repeat: the fixture stops it again)
    client = redis.Redis.from_url(redis_url)
    assert len(list(read_impressions(client))) == 7


def test_sampling_logs_the_share_asked_for(make_server, redis_url):
    server = make_server(impression_sample_rate=0.5)
    replies = [server.stub.Recommend(pb.RecommendRequest(user_id=f"u{i % 40}", k=2))
               for i in range(200)]  # fmt: skip
    expected = {r.recommendation_id for r in replies if int(r.recommendation_id[:8], 16) < 2**31}
    assert 60 < len(expected) < 140
    wait_written(server, len(expected))
    logged = {Impression.from_json(f).recommendation_id
              for f in read_impressions(redis.Redis.from_url(redis_url))}  # fmt: skip
    assert logged == expected


def test_variants_with_their_own_bundle_load_it_once(make_server, clustered_csv, tmp_path):
    other = train_bundle(clustered_csv, tmp_path / "models" / "other", neighbours=5)
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"variants": [
        {"name": "control", "share": 0.5},
        {"name": "new", "share": 0.25, "bundle": "models/other"},
        {"name": "new-cf", "share": 0.25, "bundle": "models/other", "strategy": "cf"},
    ]}))  # fmt: skip
    server = make_server(variants=path)
    models = server.server.online.models
    assert models["new"] is models["new-cf"] and "control" not in models  # one copy, shared

    def version(variant):
        return server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3, variant=variant))

    default_version = version("control").model_version
    assert version("new").model_version == version("new-cf").model_version != default_version
    assert version("new").model_version == read_manifest(other)["model_version"]


def test_report_reads_exported_feedback_and_counts_a_repeat_once(
    make_server, redis_url, tmp_path, capsys
):
    server = make_server()
    reply = server.stub.Recommend(pb.RecommendRequest(user_id="u1", k=3))
    rid, item = reply.recommendation_id, reply.items[0].item_id
    events = [event("x1", "u1", item, pb.CLICK, rid), event("x2", "u1", item, pb.PURCHASE, rid)]
    server.stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    wait_written(server, 1)
    exported = tmp_path / "feedback.csv"  # exported for training: trimmed from the stream
    assert recsvc_main(["export-feedback", "--redis-url", redis_url, "--out", str(exported)]) == 0
    assert report(capsys, redis_url)["variants"]["default"]["clicked"] == 0
    out = report(capsys, redis_url, "--feedback", str(exported))
    row = out["variants"]["default"]
    assert (row["clicked"], row["converted"], row["events"]) == (1, 1, {"click": 1, "purchase": 1})
    assert out["events"]["unattributed"] == {}
    # the same export given twice: each event counts once, the repeats are named
    twice = report(capsys, redis_url, "--feedback", str(exported), "--feedback", str(exported))
    assert twice["variants"]["default"] == row
    assert twice["events"]["unattributed"] == {"duplicate": 2}
