"""Unit tests of the load-test helpers: id sources, --mix, targets, histograms, reports."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.common import Recorder, UsageError, check_target, new_hist, split_target, summarize
from loadtest.empty_server import parse_errors
from loadtest.ids import WeightedSampler, from_interactions, from_model_dir, load_ids, synthetic
from loadtest.report import format_summary
from loadtest.run import parse_mix

ROOT = Path(__file__).resolve().parents[2]


def draw(sampler, n=20000):
    return [sampler.next() for _ in range(n)]


def test_csv_interactions_weight_by_frequency(tmp_path):
    p = tmp_path / "inter.csv"
    rows = ["user_id,item_id,timestamp"] + ["a,x,1"] * 8 + ["b,y,2"] * 2
    p.write_text("\n".join(rows) + "\n")
    src = from_interactions(p, np.random.default_rng(0))
    users = draw(src.users)
    assert set(users) == {"a", "b"}
    assert users.count("a") / len(users) == pytest.approx(0.8, abs=0.02)
    items = draw(src.items)
    assert items.count("x") / len(items) == pytest.approx(0.8, abs=0.02)
    assert src.describe()["source"] == "interactions"


def test_csv_header_column_order_and_gzip(tmp_path):
    p = tmp_path / "inter.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write("ts,item_id,user_id\n1,i1,u1\n2,i2,u1\n3,i2,u2\n")
    src = from_interactions(p, np.random.default_rng(0))
    assert set(draw(src.users, 2000)) == {"u1", "u2"}
    assert set(draw(src.items, 2000)) == {"i1", "i2"}


def test_line_format_interactions(tmp_path):
    p = tmp_path / "inter.txt"
    p.write_text("u1 i1 i2 i3\nu2 i1\n\nu3\ti1\ti2\n")
    src = from_interactions(p, np.random.default_rng(0))
    users = draw(src.users)
    # u1 has 3 interactions, u2 1, u3 2
    assert users.count("u1") / len(users) == pytest.approx(3 / 6, abs=0.02)
    items = draw(src.items)
    assert items.count("i1") / len(items) == pytest.approx(3 / 6, abs=0.02)


def test_csv_without_header_is_an_error(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("1,2\n3,4\n")
    with pytest.raises(UsageError, match="header"):
        from_interactions(p)


def test_model_dir_popularity_and_zipf_users(tmp_path):
    (tmp_path / "users.txt").write_text("\n".join(f"user{n}" for n in range(100)) + "\n")
    (tmp_path / "items.txt").write_text("A\nB\nC\nD\n")
    np.save(tmp_path / "popularity.npy", np.array([6.0, 3.0, 1.0, 0.0], dtype=np.float32))
    src = load_ids(str(tmp_path), 0, 0, 1.1, np.random.default_rng(0))
    items = draw(src.items)
    assert items.count("A") / len(items) == pytest.approx(0.6, abs=0.02)
    assert "D" not in items  # zero popularity
    users = draw(src.users)
    assert users.count("user0") > users.count("user1") > users.count("user50")
    assert src.describe()["items_weighted_by"] == "popularity.npy"


def test_model_dir_misaligned_popularity(tmp_path):
    (tmp_path / "users.txt").write_text("u\n")
    (tmp_path / "items.txt").write_text("A\nB\n")
    np.save(tmp_path / "popularity.npy", np.ones(3))
    with pytest.raises(UsageError, match="3 values for 2 items"):
        from_model_dir(tmp_path)


def test_synthetic_zipf_is_skewed():
    src = synthetic(1000, 1000, 1.1, np.random.default_rng(0))
    users = draw(src.users)
    assert users.count("u0") > 10 * users.count("u99")
    assert all(u.startswith("u") for u in users[:50])
    assert src.items.next().startswith("i")
    assert src.describe()["users"]["top1pct_share"] > 0.3


def test_uniform_sampler():
    s = WeightedSampler(["a", "b"], None, rng=np.random.default_rng(0))
    xs = draw(s, 4000)
    assert xs.count("a") / len(xs) == pytest.approx(0.5, abs=0.05)


def test_parse_mix():
    assert parse_mix("recommend=0.8,similar=0.1,feedback=0.1") == pytest.approx(
        {"recommend": 0.8, "similar": 0.1, "feedback": 0.1}
    )
    assert parse_mix("recommend=2,state=2") == {"recommend": 0.5, "user_state": 0.5}
    assert parse_mix("generate=1") == {"generate": 1.0}
    with pytest.raises(UsageError):
        parse_mix("recommend=1,bogus=1")
    with pytest.raises(UsageError):
        parse_mix("recommend=0")


def test_targets():
    assert split_target("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_target("[::1]:9") == ("::1", 9)
    assert check_target("localhost:50051") == "localhost:50051"
    assert check_target("[::1]:50051") == "[::1]:50051"
    with pytest.raises(UsageError, match="loopback"):
        check_target("192.0.2.1:50051")
    assert check_target("192.0.2.1:50051", allow_remote=True) == "192.0.2.1:50051"
    # several instances of one service (#12): calls are spread over them
    assert check_target("127.0.0.1:1,[::1]:2") == "127.0.0.1:1,[::1]:2"
    with pytest.raises(UsageError, match="loopback"):
        check_target("127.0.0.1:1,192.0.2.1:2")
    for bad in ("nohost", "127.0.0.1:x", "127.0.0.1:0"):
        with pytest.raises(UsageError):
            split_target(bad)


def test_parse_errors():
    assert parse_errors("invalid_argument=0.1,RESOURCE_EXHAUSTED=0.05") == {
        "INVALID_ARGUMENT": 0.1,
        "RESOURCE_EXHAUSTED": 0.05,
    }
    with pytest.raises(ValueError):
        parse_errors("NOT_A_CODE=0.1")


def test_histogram_summary_and_clamping():
    h = new_hist()
    for us in range(1, 10001):
        h.record_value(us)
    s = summarize(h)
    assert s["count"] == 10000
    assert s["p50"] == pytest.approx(5.0, rel=0.01)
    assert s["p99"] == pytest.approx(9.9, rel=0.01)
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["p99.9"] <= s["max"]
    rec = Recorder(["x"], t0=100.0)
    rec.record("x", 99.0, 100.5)  # started in the warmup: not measured
    rec.record("x", 100.0, 100.0)  # 0 us -> clamped to 1 us, still counted
    rec.record("x", 100.0, 100.0 + 7200, "DEADLINE_EXCEEDED")  # 2 h -> clamped to 1 h
    assert rec.warmup_requests == 1 and rec.requests == 2
    out = rec.summary(1.0)
    assert out["latency_ms"]["max"] == pytest.approx(3600 * 1000, rel=0.001)
    assert out["errors_by_code"] == {"DEADLINE_EXCEEDED": 1}


def _fake_report():
    tl = [
        {
            "t": float(t),
            "dt": 1.0,
            "requests": 100,
            "errors": 1,
            "rps": 100.0,
            "p50_ms": 1.0,
            "p90_ms": 2.0,
            "p99_ms": 3.0,
            "max_ms": 4.0,
            "sent": 100,
        }
        for t in range(1, 4)
    ]
    lat = {
        "count": 300,
        "min": 0.5,
        "mean": 1.2,
        "p50": 1.0,
        "p90": 2.0,
        "p99": 3.0,
        "p99.9": 4.0,
        "max": 4.0,
    }
    return {
        "mode": "run",
        "loop": "closed",
        "target": "127.0.0.1:1",
        "duration_s": 3.0,
        "config": {"concurrency": 4},
        "requests": 300,
        "ok": 297,
        "errors": 3,
        "errors_by_code": {"UNAVAILABLE": 3},
        "throughput_rps": 100.0,
        "latency_ms": lat,
        "latency_histogram_ms": [[1.0, 100], [2.0, 150], [4.0, 50]],
        "timeline": tl,
        "by_call": {
            "recommend": {
                "requests": 300,
                "throughput_rps": 100.0,
                "latency_ms": lat,
                "errors_by_code": {"UNAVAILABLE": 3},
            }
        },
        "client": {
            "cpu_s": 1.0,
            "cpu_utilization": 0.33,
            "cpu_us_per_request": 3333.0,
            "channels": 1,
        },
    }


def test_summary_text():
    # (the PNG is checked by the CLI test in test_loadtest_integration.py)
    r = _fake_report()
    text = format_summary(r)
    assert "throughput 100.0 req/s" in text and "UNAVAILABLE=3" in text and "p99.9" in text
    assert "3333.0 us cpu per request" in text


def test_cli_refuses_remote_target():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "run",
            "--target",
            "192.0.2.1:50051",
            "--duration",
            "1",
            "--concurrency",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "loopback" in res.stderr


def test_model_dir_users_weighted_by_training_rows(tmp_path):
    import scipy.sparse as sp

    (tmp_path / "users.txt").write_text("a\nb\nc\n")
    (tmp_path / "items.txt").write_text("x\ny\n")
    np.save(tmp_path / "popularity.npy", np.array([1.0, 1.0], dtype=np.float32))
    rows = np.array([[1, 1], [0, 1], [1, 1]], dtype=np.float32)  # 2, 1, 2 interactions
    sp.save_npz(tmp_path / "user_items.npz", sp.csr_matrix(rows))
    src = from_model_dir(tmp_path, rng=np.random.default_rng(0))
    users = draw(src.users)
    assert users.count("b") / len(users) == pytest.approx(0.2, abs=0.02)
    assert "user_items.npz" in src.describe()["users_weighted_by"]
