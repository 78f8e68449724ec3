"""What each per-call feature costs a served Recommend, side by side (issue #10's
serving regression under load).

    python benchmarks/feature_cost.py --model DIR [--duration 8] [--rounds 3]
        [--strategy blend]

Starts one `recsvc serve` per configuration, all at once on the same bundle, each
with its own embedded Redis:
- ``default``: as shipped;
- ``no-impressions``: ``RECSVC_IMPRESSION_SAMPLE_RATE=0`` (#13's impression log);
- ``no-admission``: ``--max-in-flight 0`` (#14's interceptor);
- ``bare``: both off.
Then closed loops of 64 Recommend calls in flight (k=20), the servers in turn,
``--rounds`` times. Prints per configuration the median throughput and the
median CPU per call of the server process and of its Redis (from /proc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import loadtest, measured_run, start  # noqa: E402

from recsvc.store import free_port  # noqa: E402

CONFIGS = {
    "default": ({}, []),
    "no-impressions": ({"RECSVC_IMPRESSION_SAMPLE_RATE": "0"}, []),
    "no-admission": ({}, ["--max-in-flight", "0"]),
    "bare": ({"RECSVC_IMPRESSION_SAMPLE_RATE": "0"}, ["--max-in-flight", "0"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", default="blend")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recsvc-features-"))
    env = {**os.environ, "RECSVC_MODEL_WATCH_S": "0", "RECSVC_DEFAULT_STRATEGY": args.strategy}
    servers = {}
    try:
        for name, (extra_env, flags) in CONFIGS.items():
            port = str(free_port("127.0.0.1"))
            servers[name] = (port, start(
                [sys.executable, "-m", "recsvc", "serve", "--model", str(args.model), "--port",
                 port, "--host", "127.0.0.1", "--data-dir", str(work / name), *flags],
                work / f"{name}.log", "serving on port", {**env, **extra_env},
            ))  # fmt: skip
        calls = ["--mix", "recommend=1", "--users-from", str(args.model), "--k", "20",
                 "--channels", "8", "--concurrency", "64"]  # fmt: skip
        for port, _ in servers.values():  # the same warm-up for each: caches filled
            loadtest("run", "--target", f"127.0.0.1:{port}", "--duration", "10", *calls)
        rps: dict[str, list[float]] = {name: [] for name in servers}
        costs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, (port, proc) in servers.items():
                report = measured_run(proc, costs[name], "--target", f"127.0.0.1:{port}",
                                      "--duration", str(args.duration), "--warmup", "1",
                                      *calls)  # fmt: skip
                rps[name].append(report["ok_throughput_rps"])
        print("| config | closed loop rps (rounds) | median | server CPU / call | Redis CPU / call |")  # noqa: E501
        print("|---|---|---|---|---|")
        for name in servers:
            server = statistics.median(c.get("server", 0.0) for c in costs[name])
            redis = statistics.median(c.get("redis", 0.0) for c in costs[name])
            print(f"| {name} | {', '.join(f'{r:.0f}' for r in rps[name])} | "
                  f"{statistics.median(rps[name]):.0f} | {server:.0f} us | {redis:.0f} us |")
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
