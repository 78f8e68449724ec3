"""Side-by-side serving numbers for BENCHMARKS.md (issue: load-test clients).

    python benchmarks/serving_load.py --model models/gowalla [--duration 8] [--rounds 3]
        [--warm-s 15] [--workers 1] [--channels 8]

In one run, on this machine, after --warm-s of load on each server (caches
filled, as in steady state; --warm-s 0 measures from a cold start):
1. closed loop, 64 in flight, Recommend only (k=20), alternating between the
   empty server (same message sizes: the ceiling of Python gRPC here) and
   `recsvc serve` with the model, `--rounds` times each; medians and ratio;
2. open loop at 50% and 90% of recsvc's median maximum: latency percentiles;
3. StreamFeedback at a high target rate: acknowledged (durable) events/s;
4. the freshness probe: feedback sent -> first Recommend reflecting it.
With (1) it prints the CPU time each side spent per call (server processes,
their Redis, the load client; from /proc, so Linux only).
The load client shares the 2 cores with the server, as the performance notes
warn; numbers are medians of alternating runs for that reason. At the end it
prints the server's user state cache hits and misses (warm-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start(
    cmd: list[str], log: Path, ready: str, env: dict | None = None, count: int = 1
) -> subprocess.Popen:
    """Start ``cmd`` and wait until ``ready`` is in its log ``count`` times."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while log.read_text().count(ready) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text())
        time.sleep(0.2)
    return proc


def loadtest(*args: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = f.name
    subprocess.run([sys.executable, "-m", "loadtest", *args, "--report", report, "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return json.loads(Path(report).read_text())


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU time (user + system) of ``root`` and its descendants, by command name."""
    parent, name, used = {}, {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            pid = int(entry)
            name[pid] = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            parent[pid] = int(fields[1])
            used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid in used:
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parent:
            ancestor = parent[ancestor]
        if ancestor == root:
            key = "redis" if name[pid].startswith("redis") else "server"
            totals[key] = totals.get(key, 0.0) + used[pid]
    return totals


def measured_run(server: subprocess.Popen, costs: list, *args: str) -> dict:
    """``loadtest run`` with the CPU each side spent per call (us) added to ``costs``."""
    before, client_before = cpu_seconds(server.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    report = loadtest("run", *args)
    after, client_after = cpu_seconds(server.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    calls = report["requests"] + report["warmup_requests"]
    cost = {key: (after[key] - before.get(key, 0.0)) / calls * 1e6 for key in after}
    client = client_after.ru_utime + client_after.ru_stime
    cost["client"] = (client - client_before.ru_utime - client_before.ru_stime) / calls * 1e6
    costs.append(cost)
    return report


def median_costs(costs: list[dict[str, float]]) -> str:
    keys = sorted({key for cost in costs for key in cost}, key=["server", "redis", "client"].index)
    return ", ".join(f"{k} {statistics.median(c.get(k, 0.0) for c in costs):.0f}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-rate", type=int, default=40_000)
    parser.add_argument("--strategy", default="cf", help="RECSVC_DEFAULT_STRATEGY of the server")
    parser.add_argument("--workers", type=int, default=1, help="recsvc serve --workers")
    parser.add_argument("--warm-s", type=float, default=15.0,
                        help="closed-loop load on each server before measuring (fills caches)")
    parser.add_argument("--channels", type=int, default=8,
                        help="client connections (SO_REUSEPORT spreads connections over workers)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recsvc-load-"))
    env = {**os.environ, "RECSVC_MODEL_WATCH_S": "0", "RECSVC_DEFAULT_STRATEGY": args.strategy}
    empty = start([sys.executable, "-m", "loadtest", "empty-server", "--port", "50997"],
                  work / "empty.log", "50997")  # fmt: skip
    server = start([sys.executable, "-m", "recsvc.cli", "serve", "--model", str(args.model),
                    "--port", "50996", "--host", "127.0.0.1", "--data-dir", str(work / "data"),
                    "--workers", str(args.workers)],
                   work / "serve.log", "serving on port", env,
                   args.workers)  # fmt: skip
    calls = ["--warmup", "1", "--mix", "recommend=1", "--users-from", str(args.model),
             "--k", "20", "--channels", str(args.channels)]  # fmt: skip
    common = ["--duration", str(args.duration), *calls]
    try:
        if args.warm_s > 0:
            for port in ("50997", "50996"):
                loadtest("run", "--target", f"127.0.0.1:{port}", "--concurrency", "64",
                         "--duration", str(args.warm_s), *calls)  # fmt: skip
        empty_rps, recsvc_rps, empty_cost, recsvc_cost = [], [], [], []
        for _ in range(args.rounds):
            r = measured_run(empty, empty_cost, "--target", "127.0.0.1:50997",
                             "--concurrency", "64", *common)  # fmt: skip
            empty_rps.append(r["ok_throughput_rps"])
            r = measured_run(server, recsvc_cost, "--target", "127.0.0.1:50996",
                             "--concurrency", "64", *common)  # fmt: skip
            recsvc_rps.append(r["ok_throughput_rps"])
        e, s = statistics.median(empty_rps), statistics.median(recsvc_rps)
        print(f"closed loop, 64 in flight, Recommend k=20, {args.rounds} alternating rounds "
              f"of {args.duration:.0f}s")  # fmt: skip
        print(f"  empty server: {[round(x) for x in empty_rps]} rps, median {e:.0f}")
        print(f"  recsvc ({args.strategy}): {[round(x) for x in recsvc_rps]} rps, median {s:.0f}")
        print(f"  ratio recsvc / empty: {s / e:.2f}")
        print(f"  CPU per call (us, median), empty: {median_costs(empty_cost)}")
        print(f"  CPU per call (us, median), recsvc: {median_costs(recsvc_cost)}")
        for share in (0.5, 0.9):
            rate = max(1, int(s * share))
            r = loadtest("run", "--target", "127.0.0.1:50996", "--rate", str(rate), *common)
            lat = r["latency_ms"]
            print(f"  open loop at {share:.0%} of max ({rate} rps): sent {r['requests']}, "
                  f"errors {r['errors']}, p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, "
                  f"p99 {lat['p99']:.2f} ms, p99.9 {lat['p99.9']:.2f} ms")  # fmt: skip
        st = loadtest("stream", "--target", "127.0.0.1:50996", "--streams", "8", "--rate",
                      str(args.stream_rate), "--duration", str(args.duration))  # fmt: skip
        ev = st["events"]
        print(f"  StreamFeedback, 8 streams, target {args.stream_rate}/s: "
              f"acked {ev['acked_per_s']:.0f} events/s, unacked {ev.get('unacked')}, "
              f"ack latency p50 {st['latency_ms']['p50']:.1f} ms "
              f"p99 {st['latency_ms']['p99']:.1f} ms")  # fmt: skip
        fr = loadtest("freshness", "--target", "127.0.0.1:50996", "--samples", "200",
                      "--users-from", str(args.model))  # fmt: skip
        f = fr.get("freshness_ms") or fr["latency_ms"]
        print(f"  freshness (200 samples): p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms, "
              f"max {f['max']:.2f} ms, not reflected {fr.get('not_reflected')}")  # fmt: skip
        rss = next(line for line in (work / "serve.log").read_text().splitlines()
                   if "serving on port" in line).split("rss_mb=")[1].split()[0]  # fmt: skip
        print(f"  server RSS at start: {rss} MiB")
    finally:
        for proc in (empty, server):
            proc.terminate()
            proc.wait(30)
    for line in (work / "serve.log").read_text().splitlines():
        if "user state cache" in line and "hits=" in line:
            print("  " + line.split("msg=")[1])


if __name__ == "__main__":
    main()
