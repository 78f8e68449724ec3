"""Admission control side by side (issue #14): the same model served with
``--max-in-flight 0`` (grpc.aio as before: no admission control) and with
each ``--configs`` pair (max_in_flight:max_pending_calls), all running at
once, loaded in turn.

    python benchmarks/admission.py --model models/gowalla [--configs 64:0,64:16,64:64]
        [--duration 10] [--rounds 2] [--shares 0.9,1.5]

1. The closed-loop maximum (64 calls in flight, Recommend k=20) of the server
   without a bound, median of ``--rounds``;
2. for each share of that maximum, an open loop (calls due at a fixed rate,
   latency from the intended send time) against each server in turn,
   ``--rounds`` times: calls sent, ok, refused (RESOURCE_EXHAUSTED), other
   errors by code, and latency percentiles of the calls that succeeded (the
   admitted ones) and of all calls. Prints one markdown row per server and share
   (medians over the rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import loadtest, start  # noqa: E402

from recsvc.store import free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--configs", default="64:0,64:16,64:64",
        help="MAX_IN_FLIGHT:MAX_PENDING_CALLS[:MAX_QUEUE_MS] to compare with no admission (0:0)",
    )  # fmt: skip
    parser.add_argument("--shares", default="0.9,1.5", help="open-loop rates, x closed-loop max")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()
    limits = ["0:0"] + [x.strip() for x in args.configs.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="recsvc-admission-"))
    env = {**os.environ, "RECSVC_MODEL_WATCH_S": "0", "RECSVC_DEFAULT_STRATEGY": "cf"}
    servers = {}
    try:
        for i, limit in enumerate(limits):
            port = str(free_port("127.0.0.1"))
            in_flight, max_pending, *queue = limit.split(":")
            servers[limit] = (port, start(
                [sys.executable, "-m", "recsvc.cli", "serve", "--model", str(args.model),
                 "--port", port, "--host", "127.0.0.1", "--data-dir", str(work / f"data{i}"),
                 "--max-in-flight", in_flight, "--max-queue-ms", (queue or ["0"])[0]],
                work / f"serve{i}.log", "serving on port",
                {**env, "RECSVC_MAX_PENDING_CALLS": max_pending},
            ))  # fmt: skip
        calls = ["--warmup", "1", "--mix", "recommend=1", "--users-from", str(args.model),
                 "--k", "20", "--channels", str(args.channels),
                 "--duration", str(args.duration)]  # fmt: skip
        for port, _ in servers.values():  # the same warm-up for each
            loadtest("run", "--target", f"127.0.0.1:{port}", "--concurrency", "64", *calls)
        maxima: dict[str, list[float]] = {limit: [] for limit in limits}
        for _ in range(args.rounds):  # alternating: the interceptor's cost shows here
            for limit, (port, _) in servers.items():
                maxima[limit].append(loadtest(
                    "run", "--target", f"127.0.0.1:{port}", "--concurrency", "64", *calls
                )["ok_throughput_rps"])  # fmt: skip
        for limit, values in maxima.items():
            print(f"closed loop, 64 in flight, {limit}: {[round(m) for m in values]} rps, "
                  f"median {statistics.median(values):.0f}")  # fmt: skip
        maximum = statistics.median(maxima["0:0"])
        print("| rate | max_in_flight:max_pending_calls | sent | ok | refused (RESOURCE_EXHAUSTED) "
              "| other errors | ok p50 / p99 / p99.9 | all p99 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for share in (float(x) for x in args.shares.split(",")):
            rate = max(1, int(maximum * share))
            results: dict[str, list[dict]] = {limit: [] for limit in limits}
            for _ in range(args.rounds):
                for limit, (port, _) in servers.items():
                    results[limit].append(loadtest(
                        "run", "--target", f"127.0.0.1:{port}", "--rate", str(rate), *calls
                    ))  # fmt: skip
            for limit, reports in results.items():
                print(row(share, rate, limit, reports))
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(30)


def row(share: float, rate: int, limit: str, reports: list[dict]) -> str:
    def med(get) -> float:  # type: ignore[no-untyped-def]
        return statistics.median(get(r) for r in reports)

    refused = med(lambda r: r["errors_by_code"].get("RESOURCE_EXHAUSTED", 0))
    others: dict[str, float] = {}
    for code in {c for r in reports for c in r["errors_by_code"]} - {"RESOURCE_EXHAUSTED"}:
        others[code] = med(lambda r, c=code: r["errors_by_code"].get(c, 0))
    other = ", ".join(f"{c} {v:.0f}" for c, v in sorted(others.items())) or "0"
    ok = med(lambda r: r["requests"] - r["errors"])

    def pct(key: str, p: str) -> float:
        return med(lambda r: r[key].get(p) or 0.0)

    return (
        f"| {share:.0%} ({rate} rps) | {'none' if limit == '0:0' else limit} "
        f"| {med(lambda r: r['requests']):.0f} "
        f"| {ok:.0f} | {refused:.0f} | {other} | {pct('ok_latency_ms', 'p50'):.1f} / "
        f"{pct('ok_latency_ms', 'p99'):.1f} / {pct('ok_latency_ms', 'p99.9'):.1f} ms "
        f"| {pct('latency_ms', 'p99'):.1f} ms |"
    )


if __name__ == "__main__":
    main()
