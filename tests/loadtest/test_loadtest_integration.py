"""The load-test clients against a REAL grpc.aio empty server on port 0.

Each test starts loadtest.empty_server (or a variant: injected errors, a slow
server, feedback that shows up in recommendations, a stream that drops acks)
in its own event loop and runs a short (about 1-1.5 s) load through the real
client code; the CLI test runs both as subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.empty_server import start_empty_server
from loadtest.freshness import FreshnessConfig, run_freshness
from loadtest.ids import synthetic
from loadtest.run import RunConfig, parse_mix, run_load
from loadtest.stream import StreamConfig, run_streams
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LAT_KEYS = ("p50", "p90", "p99", "p99.9", "max")


def with_server(fn, **variant):
    """Run `await fn(target, servicer)` with an empty server (variant) on port 0."""

    async def main():
        server, port = await start_empty_server(0, **variant)
        try:
            return await fn(f"127.0.0.1:{port}", server.servicer)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def ids():
    import numpy as np

    return synthetic(1000, 500, 1.1, np.random.default_rng(7))


def check_latency(lat: dict, count: int | None = None) -> None:
    assert set(LAT_KEYS) <= set(lat)
    values = [lat[k] for k in LAT_KEYS]
    assert all(v is not None and v > 0 for v in values), lat
    assert values == sorted(values), f"percentiles not monotonic: {lat}"
    assert lat["min"] <= lat["p50"]
    if count is not None:
        assert lat["count"] == count


def check_common(report: dict) -> None:
    for key in (
        "mode",
        "config",
        "started_at",
        "finished_at",
        "start_unix",
        "duration_s",
        "requests",
        "ok",
        "errors",
        "errors_by_code",
        "throughput_rps",
        "latency_ms",
        "timeline",
        "latency_histogram_ms",
        "client",
    ):
        assert key in report, key
    json.dumps(report)  # serializable as is
    assert report["requests"] > 0
    assert report["ok"] + report["errors"] <= report["requests"]
    assert sum(report["errors_by_code"].values()) == report["errors"]
    assert report["timeline"], "no per-interval timeline"
    assert sum(c for _, c in report["latency_histogram_ms"]) == report["latency_ms"]["count"]


def test_empty_server_responses_have_real_shape():
    async def fn(target, servicer):
        import grpc

        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            r1 = await stub.Recommend(pb.RecommendRequest(user_id="u1", k=20))
            r2 = await stub.Recommend(pb.RecommendRequest(user_id="u1", k=20))
            sim = await stub.SimilarItems(pb.SimilarItemsRequest(item_id="i1", k=7))
            fb = await stub.SendFeedback(
                pb.SendFeedbackRequest(
                    events=[pb.FeedbackEvent(event_id="e1", user_id="u", item_id="i", type=2)]
                )
            )
            call = stub.StreamFeedback()
            await call.write(pb.FeedbackEvent(event_id="a", user_id="u", item_id="i", type=1))
            await call.write(pb.FeedbackEvent(event_id="b", user_id="u", type=1))  # no item
            await call.done_writing()
            acks = [a async for a in call]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Recommend(pb.RecommendRequest(user_id="u1", k=5000))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return r1, r2, sim, fb, acks

    r1, r2, sim, fb, acks = with_server(fn)
    assert len(r1.items) == 20 and len(sim.items) == 7
    assert all(re.fullmatch(r"i\d+", it.item_id) for it in r1.items)
    assert [it.score for it in r1.items] == sorted((it.score for it in r1.items), reverse=True)
    assert re.fullmatch(r"[0-9a-f-]{36}", r1.recommendation_id)
    assert r1.recommendation_id != r2.recommendation_id
    assert r1.model_version
    assert fb.accepted == 1
    assert list(acks[0].event_ids) == ["a"]
    assert acks[1].rejected[0].event_id == "b" and acks[1].rejected[0].index == 1


def test_closed_loop_report():
    cfg_holder = {}

    async def fn(target, servicer):
        cfg = RunConfig(
            target=target,
            duration=1.5,
            concurrency=8,
            channels=2,
            progress=False,
            mix=parse_mix("recommend=0.8,similar=0.1,feedback=0.1"),
            k=20,
            seed=1,
        )
        cfg_holder["cfg"] = cfg
        report = await run_load(cfg, ids())
        return report, servicer.calls

    report, server_calls = with_server(fn)
    check_common(report)
    assert report["mode"] == "run" and report["loop"] == "closed"
    assert report["errors"] == 0 and report["errors_by_code"] == {}
    n = report["requests"]
    assert n > 50
    assert server_calls == n  # every call counted once, none lost
    check_latency(report["latency_ms"], n)
    assert 1.5 <= report["duration_s"] < 2.0
    assert report["throughput_rps"] == pytest.approx(n / report["duration_s"], rel=0.01)
    assert report["throughput_rps"] == pytest.approx(n / 1.5, rel=0.15)
    by = report["by_call"]
    assert set(by) == {"recommend", "similar", "feedback"}
    assert sum(b["requests"] for b in by.values()) == n
    assert by["recommend"]["requests"] / n == pytest.approx(0.8, abs=0.1)
    for b in by.values():
        if b["requests"]:
            check_latency(b["latency_ms"], b["requests"])
    assert sum(e["requests"] for e in report["timeline"]) == n
    assert report["client"]["cpu_us_per_request"] > 0
    assert report["client"]["feedback_events_sent"] == by["feedback"]["requests"]
    assert report["config"]["concurrency"] == 8


def test_errors_counted_by_status_code():
    errors = {"INVALID_ARGUMENT": 0.1, "RESOURCE_EXHAUSTED": 0.05}

    async def fn(target, servicer):
        cfg = RunConfig(
            target=target,
            duration=1.0,
            warmup=0.3,
            concurrency=4,
            progress=False,
            mix={"recommend": 0.5, "similar": 0.5},
        )
        return await run_load(cfg, ids()), servicer.calls

    report, server_calls = with_server(fn, errors=errors)
    check_common(report)
    n = report["requests"]
    # warmup calls happened but are not in the report
    assert report["warmup_requests"] > 0
    assert server_calls == n + report["warmup_requests"]
    assert 1.0 <= report["duration_s"] < 1.3
    codes = report["errors_by_code"]
    assert set(codes) == set(errors)
    for name, frac in errors.items():
        assert codes[name] == pytest.approx(frac * n, abs=2), (name, codes, n)
    assert report["ok"] == n - report["errors"]
    assert report["ok_latency_ms"]["count"] == report["ok"]
    per_call = sum(sum(b["errors_by_code"].values()) for b in report["by_call"].values())
    assert per_call == report["errors"]
    assert sum(e["errors"] for e in report["timeline"]) == report["errors"]


def test_open_loop_keeps_send_rate_when_server_is_slow():
    delay, rate, duration = 0.05, 200.0, 1.0

    async def fn(target, servicer):
        open_report = await run_load(
            RunConfig(
                target=target, duration=duration, rate=rate, progress=False, mix={"recommend": 1.0}
            ),
            ids(),
        )
        # the same slow server under a closed loop: the send rate collapses
        closed_report = await run_load(
            RunConfig(
                target=target, duration=0.5, concurrency=2, progress=False, mix={"recommend": 1.0}
            ),
            ids(),
        )
        return open_report, closed_report, servicer.calls

    report, closed, server_calls = with_server(fn, delay_s=delay)
    check_common(report)
    ol = report["open_loop"]
    expected = int(rate * duration)
    assert ol["intended"] == expected
    assert ol["sent"] == expected  # the send rate held: every intended request went out
    assert ol["dropped"] == 0 and ol["unsent_at_end"] == 0 and ol["waited_for_cap"] == 0
    assert ol["send_rate"] == pytest.approx(rate, rel=0.01)
    assert report["requests"] == expected and report["errors"] == 0
    assert server_calls >= expected
    lat = report["latency_ms"]
    check_latency(lat, expected)
    assert lat["min"] >= delay * 1000 * 0.99  # latency includes the server's delay
    assert report["throughput_rps"] == pytest.approx(rate, rel=0.15)
    # closed loop with 2 workers: at most 2 / delay = 40 req/s
    assert closed["throughput_rps"] < 2 / delay * 1.1


def test_open_loop_outstanding_cap_drop_and_wait():
    delay, rate, duration, cap = 0.2, 100.0, 0.7, 5

    async def fn(target, servicer):
        drop = await run_load(
            RunConfig(
                target=target,
                duration=duration,
                rate=rate,
                progress=False,
                mix={"recommend": 1.0},
                max_outstanding=cap,
                on_cap="drop",
            ),
            ids(),
        )
        wait = await run_load(
            RunConfig(
                target=target,
                duration=duration,
                rate=rate,
                progress=False,
                mix={"recommend": 1.0},
                max_outstanding=cap,
                on_cap="wait",
            ),
            ids(),
        )
        return drop, wait

    drop, wait = with_server(fn, delay_s=delay)
    ol = drop["open_loop"]
    assert ol["intended"] == 70
    assert ol["sent"] + ol["dropped"] == 70
    assert ol["dropped"] > 35  # the cap lets through about cap / delay = 25/s
    assert ol["sent"] == drop["requests"]
    assert drop["latency_ms"]["max"] < 500  # dropped ones do not turn into latency

    ol = wait["open_loop"]
    assert ol["intended"] == 70
    assert ol["sent"] + ol["unsent_at_end"] == 70
    assert ol["waited_for_cap"] > 0 and ol["unsent_at_end"] > 0 and ol["late"] > 0
    # queued requests count from their intended send time: far more than the delay
    assert wait["latency_ms"]["max"] > 0.5 * 1000
    assert ol["send_lag_ms"]["max"] > 300


def test_stream_acks_duplicates_rejections():
    async def fn(target, servicer):
        cfg = StreamConfig(
            target=target,
            streams=4,
            rate=400,
            duration=1.0,
            progress=False,
            resend_fraction=0.05,
            malformed_fraction=0.05,
            seed=3,
        )
        return await run_streams(cfg, ids())

    report = with_server(fn)
    check_common(report)
    ev = report["events"]
    assert ev["sent"] == 400 == report["requests"]
    assert ev["malformed_sent"] > 0 and ev["resent"] > 0
    assert ev["rejected"] == ev["malformed_sent"]
    assert ev["acked"] + ev["rejected"] == ev["sent"]
    assert ev["unacked"] == 0 and ev["unacked_sample"] == []
    assert ev["unknown_acks"] == 0 and ev["unknown_rejections"] == 0
    assert report["errors"] == 0
    check_latency(report["latency_ms"], ev["acked"])
    assert report["throughput_rps"] == pytest.approx(ev["acked"] / report["duration_s"], abs=0.02)
    assert report["streams"]["opened"] == 4


def test_batched_stream_acks_duplicates_rejections():
    """--batch: StreamFeedbackBatches, events matched to acks and rejections alike."""

    async def fn(target, servicer):
        cfg = StreamConfig(
            target=target, streams=2, rate=400, duration=1.0, progress=False,
            resend_fraction=0.05, malformed_fraction=0.05, batch=7, seed=3,
        )  # fmt: skip
        return await run_streams(cfg, ids())

    report = with_server(fn)
    ev = report["events"]
    assert ev["sent"] == 400 and ev["malformed_sent"] > 0
    assert ev["rejected"] == ev["malformed_sent"] and ev["unknown_rejections"] == 0
    assert ev["acked"] + ev["rejected"] == ev["sent"] and ev["unacked"] == 0
    assert report["errors"] == 0 and ev["unknown_acks"] == 0


def test_stream_reports_unacked_events():
    async def fn(target, servicer):
        cfg = StreamConfig(
            target=target, streams=2, rate=200, duration=1.0, progress=False, drain_timeout=0.5
        )
        return await run_streams(cfg, ids())

    report = with_server(fn, stream_drop_fraction=0.1)
    ev = report["events"]
    assert ev["sent"] == 200
    assert ev["unacked"] == pytest.approx(20, abs=2)
    assert ev["acked"] + ev["unacked"] == ev["sent"]
    assert len(ev["unacked_sample"]) == min(20, ev["unacked"])


def test_freshness_measures_time_to_reflect():
    lag = 0.03

    async def fn(target, servicer):
        cfg = FreshnessConfig(target=target, samples=8, concurrency=2, timeout=1.0, progress=False)
        return await run_freshness(cfg, ids())

    report = with_server(fn, reflect_feedback=True, reflect_lag_s=lag)
    check_common(report)
    f = report["freshness"]
    assert f["samples"] == 8 and f["reflected"] == 8
    assert f["not_reflected"] == 0 and f["failed"] == 0
    assert f["reflected_by"] == {"personalized": 8}
    lat = report["latency_ms"]
    check_latency(lat, 8)
    assert lat["min"] >= lag * 1000
    assert lat["max"] < 1000
    assert f["polls_per_reflected_sample"]["mean"] > 1  # it polled until the lag passed


def test_freshness_counts_never_reflected():
    async def fn(target, servicer):
        cfg = FreshnessConfig(target=target, samples=3, timeout=0.2, progress=False)
        return await run_freshness(cfg, ids())

    report = with_server(fn)  # feedback never shows up
    f = report["freshness"]
    assert f["not_reflected"] == 3 and f["reflected"] == 0
    assert report["latency_ms"]["count"] == 0
    assert all(s["result"] == "not_reflected" for s in report["samples"])


def _start_server_subprocess(*extra: str):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "empty-server", "--port", "0", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    m = re.search(r"listening on [\d.]+:(\d+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"empty server did not start: {line!r}")
    return proc, int(m.group(1))


def test_cli_run_writes_report_and_plot(tmp_path):
    proc, port = _start_server_subprocess("--errors", "UNAVAILABLE=0.1")
    try:
        out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
        t0 = time.monotonic()
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtest",
                "run",
                "--target",
                f"127.0.0.1:{port}",
                "--duration",
                "1",
                "--concurrency",
                "4",
                "--zipf-users",
                "100",
                "--zipf-items",
                "100",
                "--report",
                str(out_json),
                "--plot",
                str(out_png),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - t0 < 30
        assert "[run]" in res.stderr  # the progress line
        assert "throughput" in res.stdout and "UNAVAILABLE=" in res.stdout
        report = json.loads(out_json.read_text())
        check_common(report)
        assert set(report["errors_by_code"]) == {"UNAVAILABLE"}
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # --fail-on-error turns those errors into exit status 1 (in process, to save time)
        from loadtest.cli import main

        rc = main(
            [
                "run",
                "--target",
                f"127.0.0.1:{port}",
                "--duration",
                "0.3",
                "--concurrency",
                "2",
                "-q",
                "--fail-on-error",
            ]
        )
        assert rc == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_merge_reports_of_two_client_processes():
    """Two concurrent client loads (as two processes would run them) merge exactly."""
    from loadtest.common import new_hist, summarize
    from loadtest.merge import merge_reports

    async def fn(target, servicer):
        cfgs = [
            RunConfig(target=target, duration=0.8, concurrency=c, progress=False, seed=s)
            for c, s in ((2, 1), (3, 2))
        ]
        return await asyncio.gather(*(run_load(c, ids()) for c in cfgs))

    r1, r2 = with_server(fn, errors={"UNAVAILABLE": 0.05})
    m = merge_reports([r1, r2])
    check_common(m)
    assert m["requests"] == r1["requests"] + r2["requests"]
    assert m["errors_by_code"]["UNAVAILABLE"] == r1["errors"] + r2["errors"]
    assert m["throughput_rps"] == pytest.approx(r1["throughput_rps"] + r2["throughput_rps"])
    assert m["config"]["concurrency"] == 5
    # percentiles of the merged histogram, not an average of percentiles
    h = new_hist()
    h.decode_and_add(r1["hdr"]["all"])
    h.decode_and_add(r2["hdr"]["all"])
    assert m["latency_ms"] == summarize(h)
    check_latency(m["latency_ms"], m["requests"])
    assert sum(b["requests"] for b in m["by_call"].values()) == m["requests"]
