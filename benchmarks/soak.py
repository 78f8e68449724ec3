"""Soak (issue #14): the mixed load at half capacity for ten minutes; memory,
errors and p99 per minute.

    python benchmarks/soak.py --model models/gowalla [--minutes 10] [--share 0.5]
        [--stream-rate 100] [--impression-retention-s 60] [--no-export]
        [--plot docs/img/soak.png]

1. `recsvc serve --model M` on its embedded Redis (the default deployment);
2. its capacity: a closed loop, 64 calls in flight, of the mixed unary load
   (recommend 0.8, similar 0.1, feedback 0.1), after a warm-up, with the
   feedback stream running beside it;
3. ``--minutes`` consecutive one-minute rounds, each an open loop of that mix
   at ``--share`` of the capacity plus StreamFeedback at ``--stream-rate``
   events/s beside it, while the RSS of the server and of its Redis is sampled
   every 2 s. After each minute `recsvc export-feedback` takes the feedback
   log (and trims what it exported), as a deployment's training pipeline would;
   impressions are kept ``--impression-retention-s``. Both bound what Redis
   holds, so that its memory can reach a steady state within the run (with the
   defaults, 14 days of impressions and a log kept until exported, Redis grows
   by what it keeps: ``--no-export --impression-retention-s 1209600``).
Prints one markdown row per minute (calls, errors by code, p50/p99, stream
events acked, unacked, ack p99, RSS at the end of the minute) and whether RSS
stayed within 10% after the first minute (the warm-up: caches fill); writes a
PNG of RSS over time and p99 per minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import loadtest, start  # noqa: E402

from recsvc.store import free_port  # noqa: E402

MIX = "recommend=0.8,similar=0.1,feedback=0.1"


class RssSampler(threading.Thread):
    """RSS (MiB) of the server process and of its Redis child, every ``every`` s."""

    def __init__(self, server_pid: int, every: float = 2.0):
        super().__init__(daemon=True)
        self.server = psutil.Process(server_pid)
        self.every = every
        self.samples: list[tuple[float, float, float]] = []  # (t, server, redis)
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def redis(self) -> psutil.Process | None:
        for child in self.server.children(recursive=True):
            if child.name().startswith("redis"):
                return child
        return None

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                redis = self.redis()
                self.samples.append((
                    time.monotonic() - self.t0,
                    self.server.memory_info().rss / 2**20,
                    redis.memory_info().rss / 2**20 if redis else 0.0,
                ))  # fmt: skip
            except psutil.Error:
                continue


def one_minute(target: str, model: Path, rate: float, stream_rate: float, seed: int) -> tuple:
    """An open-loop minute of the mix and, beside it, a minute of StreamFeedback."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        stream_report = Path(f.name)
    stream = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "stream", "--target", target, "--rate",
         str(stream_rate), "--duration", "60", "--streams", "4", "--users-from", str(model),
         "--seed", str(seed), "--report", str(stream_report), "--quiet"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    run = loadtest("run", "--target", target, "--rate", str(rate), "--duration", "60",
                   "--mix", MIX, "--users-from", str(model), "--k", "20", "--channels", "8",
                   "--seed", str(seed))  # fmt: skip
    stream.wait(120)
    return run, json.loads(stream_report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--stream-rate", type=float, default=100.0)
    parser.add_argument("--impression-retention-s", type=int, default=60)
    parser.add_argument("--no-export", action="store_true", help="never export the log")
    parser.add_argument("--plot", type=Path, default=Path("soak.png"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recsvc-soak-"))
    port = str(free_port("127.0.0.1"))
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "RECSVC_MODEL_WATCH_S": "0",
           "RECSVC_IMPRESSION_RETENTION_S": str(args.impression_retention_s)}  # fmt: skip
    server = start(
        [sys.executable, "-m", "recsvc", "serve", "--model", str(args.model), "--port", port,
         "--host", "127.0.0.1", "--data-dir", str(work / "data")],
        work / "serve.log", "serving on port", env,
    )  # fmt: skip
    try:
        sampler = RssSampler(server.pid)
        sampler.start()
        calls = ["--mix", MIX, "--users-from", str(args.model), "--k", "20", "--channels", "8"]
        # capacity with the stream running beside it: its after-ack work takes CPU too
        stream = subprocess.Popen(
            [sys.executable, "-m", "loadtest", "stream", "--target", target, "--rate",
             str(args.stream_rate), "--duration", "30", "--streams", "4", "--users-from",
             str(args.model), "--quiet"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        loadtest("run", "--target", target, "--concurrency", "64", "--duration", "8", *calls)
        capacity = loadtest(
            "run", "--target", target, "--concurrency", "64", "--duration", "15", *calls
        )["ok_throughput_rps"]
        stream.wait(120)
        rate = round(capacity * args.share)
        print(f"capacity (closed loop, 64 in flight, the mix): {capacity:.0f} calls/s; "
              f"soak at {args.share:.0%}: {rate} calls/s + {args.stream_rate:.0f} "
              "stream events/s")  # fmt: skip
        print("| minute | calls | errors | p50 / p99 ms | stream acked | unacked | ack p99 ms "
              "| server RSS MiB | Redis RSS MiB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        minutes = []
        for minute in range(1, args.minutes + 1):
            run, stream = one_minute(target, args.model, rate, args.stream_rate, seed=minute)
            if not args.no_export:
                subprocess.run(
                    [sys.executable, "-m", "recsvc", "export-feedback", "--data-dir",
                     str(work / "data"), "--out", str(work / f"feedback-{minute}.csv")],
                    check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            _, server_rss, redis_rss = sampler.samples[-1]
            errors = run["errors_by_code"] | {
                f"stream {k}": v for k, v in stream.get("errors_by_code", {}).items()
            }
            minutes.append((minute, run, stream, sampler.samples[-1][0]))
            print(f"| {minute} | {run['requests']} | {errors or 0} | "
                  f"{run['latency_ms']['p50']:.1f} / {run['latency_ms']['p99']:.1f} | "
                  f"{stream['events']['acked']} | {stream['events']['unacked']} | "
                  f"{stream['latency_ms']['p99']:.1f} | {server_rss:.0f} | "
                  f"{redis_rss:.0f} |", flush=True)  # fmt: skip
        sampler.stop.set()
        # the per-process caches (bounded) fill for several minutes: both warm-ups shown
        for warm in (1, 5):
            if warm >= len(minutes):
                continue
            after = [s for s in sampler.samples if s[0] > minutes[warm - 1][3]]
            for name, column in (("server", 1), ("Redis", 2)):
                values = [s[column] for s in after]
                spread = (max(values) - min(values)) / min(values)
                print(
                    f"{name} RSS after minute {warm}: {min(values):.0f}-{max(values):.0f} MiB, "
                    f"spread {spread:.1%} ({'within' if spread <= 0.10 else 'beyond'} 10%)"
                )
        total_errors = sum(sum(r["errors_by_code"].values()) for _, r, _, _ in minutes)
        total_errors += sum(sum(s["errors_by_code"].values()) for _, _, s, _ in minutes)
        unacked = sum(s["events"]["unacked"] for _, _, s, _ in minutes)
        print(f"errors in all: {total_errors}; stream events unacked: {unacked}")
        plot(args.plot, sampler.samples, minutes)
        print(f"plot: {args.plot}")
    finally:
        server.terminate()
        server.wait(30)


def plot(path: Path, samples: list, minutes: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t = [s[0] / 60 for s in samples]
    top.plot(t, [s[1] for s in samples], label="server RSS")
    top.plot(t, [s[2] for s in samples], label="Redis RSS")
    top.set_ylabel("MiB")
    top.set_ylim(bottom=0)
    top.legend()
    top.set_title("soak: mixed load at half capacity + StreamFeedback")
    ends = [m[3] / 60 for m in minutes]
    bottom.plot(ends, [m[1]["latency_ms"]["p99"] for m in minutes], "o-", label="unary p99")
    bottom.plot(ends, [m[2]["latency_ms"]["p99"] for m in minutes], "s-", label="ack p99")
    bottom.set_ylabel("ms (per minute)")
    bottom.set_xlabel("minutes since the server started")
    bottom.set_ylim(bottom=0)
    bottom.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
