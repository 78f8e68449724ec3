"""`merge`: combine the JSON reports of several `run` client processes into one.

One Python client process drives a few thousand calls per second at most (see
README.md here); to push harder, start several ``python -m loadtest run ...
--report rN.json`` processes at the same time and merge their reports. Counts,
errors and throughputs add up; latency percentiles come from the merged
HdrHistograms that every report carries (``hdr``), so they are exact. The
per-second timeline is merged by interval index: counts add up, and the
per-interval percentiles are the maximum over the processes (an upper bound;
the per-interval histograms are not kept).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .common import UsageError, encode_hist, histogram_buckets, new_hist, summarize

OPEN_LOOP_SUMS = (
    "rate",
    "intended",
    "sent",
    "late",
    "waited_for_cap",
    "dropped",
    "unsent_at_end",
    "send_rate",
    "max_outstanding",
)


def _hist(encoded_list):
    h = new_hist()
    for enc in encoded_list:
        if enc:
            h.decode_and_add(enc)
    return h


def merge_reports(reports: list[dict]) -> dict:
    if not reports:
        raise UsageError("nothing to merge")
    modes = {r.get("mode") for r in reports}
    if modes != {"run"}:
        raise UsageError(
            f"merge handles reports of the run mode only, got {sorted(map(str, modes))}"
        )
    missing = [i for i, r in enumerate(reports) if "hdr" not in r]
    if missing:
        raise UsageError(f"report(s) {missing} carry no histograms ('hdr'): cannot merge exactly")
    duration = max(r["duration_s"] for r in reports)
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors_by_code"])
    all_h = _hist(r["hdr"]["all"] for r in reports)
    ok_h = _hist(r["hdr"]["ok"] for r in reports)
    kinds = sorted({k for r in reports for k in r["by_call"]})
    by_call = {}
    kind_hists = {}
    for k in kinds:
        parts = [r["by_call"][k] for r in reports if k in r["by_call"]]
        kerr: Counter[str] = Counter()
        for p in parts:
            kerr.update(p["errors_by_code"])
        h = kind_hists[k] = _hist(r["hdr"]["by_call"].get(k) for r in reports)
        by_call[k] = {
            "requests": sum(p["requests"] for p in parts),
            "ok": sum(p["ok"] for p in parts),
            "errors": sum(p["errors"] for p in parts),
            "errors_by_code": dict(kerr.most_common()),
            "throughput_rps": round(sum(p["throughput_rps"] for p in parts), 2),
            "latency_ms": summarize(h),
        }
    n_tl = max(len(r["timeline"]) for r in reports)
    timeline = []
    for i in range(n_tl):
        entries = [r["timeline"][i] for r in reports if i < len(r["timeline"])]
        e = {
            "t": max(x["t"] for x in entries),
            "dt": max(x["dt"] for x in entries),
            "processes": len(entries),
        }
        for key in ("requests", "errors", "rps", "sent"):
            if any(key in x for x in entries):
                e[key] = round(sum(x.get(key, 0) for x in entries), 1)
        for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
            vals = [x[key] for x in entries if x.get(key) is not None]
            e[key] = max(vals) if vals else None
        timeline.append(e)
    requests = sum(r["requests"] for r in reports)
    n_err = sum(r["errors"] for r in reports)
    out = {
        "mode": "run",
        "loop": reports[0].get("loop"),
        "target": reports[0].get("target"),
        "merged_from": len(reports),
        "started_at": min(r["started_at"] for r in reports),
        "finished_at": max(r["finished_at"] for r in reports),
        "start_unix": min(r["start_unix"] for r in reports),
        "interrupted": any(r.get("interrupted") for r in reports),
        "config": {**reports[0]["config"], "per_process": [r["config"] for r in reports]},
        "duration_s": duration,
        "requests": requests,
        "ok": requests - n_err,
        "errors": n_err,
        "errors_by_code": dict(errors.most_common()),
        "throughput_rps": round(sum(r["throughput_rps"] for r in reports), 2),
        "ok_throughput_rps": round(sum(r.get("ok_throughput_rps", 0) for r in reports), 2),
        "latency_ms": summarize(all_h),
        "ok_latency_ms": summarize(ok_h),
        "by_call": by_call,
        "unfinished": sum(r.get("unfinished", 0) for r in reports),
        "timeline_percentiles": "max over the merged processes",
        "client": {
            "processes": len(reports),
            "cpu_s": round(sum(r["client"]["cpu_s"] for r in reports), 3),
            "cpu_utilization": round(sum(r["client"]["cpu_utilization"] for r in reports), 3),
            "cpu_us_per_request": (
                round(sum(r["client"]["cpu_s"] for r in reports) / requests * 1e6, 1)
                if requests
                else None
            ),
            "channels": sum(r["client"].get("channels", 0) for r in reports),
        },
        "error_examples": {k: v for r in reports for k, v in r.get("error_examples", {}).items()},
    }
    if out["config"].get("concurrency") is not None:
        out["config"]["concurrency"] = sum(r["config"].get("concurrency") or 0 for r in reports)
        out["closed_loop"] = {"concurrency": out["config"]["concurrency"]}
    ols = [r["open_loop"] for r in reports if "open_loop" in r]
    if ols:
        ol = {k: round(sum(o.get(k, 0) for o in ols), 2) for k in OPEN_LOOP_SUMS}
        ol["on_cap"] = ols[0]["on_cap"]
        ol["late_threshold_ms"] = ols[0]["late_threshold_ms"]
        lag = _hist(r["hdr"].get("send_lag") for r in reports)
        ol["send_lag_ms"] = summarize(lag)
        out["open_loop"] = ol
        out["config"]["rate"] = ol["rate"]
    out["latency_histogram_ms"] = histogram_buckets(all_h)
    out["timeline"] = timeline
    out["hdr"] = {
        "unit": "us",
        "all": encode_hist(all_h),
        "ok": encode_hist(ok_h),
        "by_call": {k: encode_hist(h) for k, h in kind_hists.items()},
    }
    return out


def load_reports(paths: list[str]) -> list[dict]:
    reports = []
    for p in paths:
        try:
            reports.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{p}: {e}") from None
    return reports
