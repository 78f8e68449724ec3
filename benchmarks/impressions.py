"""What logging impressions costs a Recommend call (#13), side by side.

    python benchmarks/impressions.py --model models/gowalla [--calls 3000] [--k 20]

Two `recsvc serve` subprocesses on the same bundle, each with its own embedded
Redis (appendfsync always): one logs every response as an impression
(`--impression-sample-rate 1`), the other none (0). One call in flight from a
sync client, alternating between the two servers call by call so that the
machine's drift hits both alike. Prints p50/p90/p99 of each, the p50 ratio,
and the impressions the first server wrote; then the in-process cost of
recording one impression and of writing a batch of them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import redis

from recsvc.bundle import load_bundle
from recsvc.online.impressions import Impression, ImpressionLog
from recsvc.store import EmbeddedRedis
from recsvc.store.impressions import ImpressionWriter
from recsvc.store.layout import IMPRESSION_STREAM
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc


def start(model: Path, rate: float) -> tuple[subprocess.Popen[bytes], int, str]:
    data_dir = tempfile.mkdtemp(prefix="recsvc-imp-")
    log_path = Path(data_dir) / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsvc.cli", "serve", "--model", str(model), "--port", "0",
             "--host", "127.0.0.1", "--data-dir", data_dir, "--impression-sample-rate", str(rate)],
            stderr=log,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while "serving on port" not in log_path.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log_path.read_text())
        time.sleep(0.1)
    port = int(log_path.read_text().split("serving on port ")[1].split('"')[0].split()[0])
    return proc, port, data_dir


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids(server: tuple[subprocess.Popen[bytes], int, str]) -> tuple[int, int]:
    """The server's pid and its embedded Redis's."""
    return server[0].pid, int((Path(server[2]) / "redis.pid").read_text())


def stats(ms: list[float]) -> tuple[float, str]:
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return p50, f"p50 {p50:.3f} ms  p90 {p90:.3f} ms  p99 {p99:.3f} ms  (n={len(ms)})"


async def in_process(n: int, k: int) -> None:
    items = [f"item{i}" for i in range(k)]
    with EmbeddedRedis(tempfile.mkdtemp(prefix="recsvc-imp-")) as server:
        client = redis.asyncio.Redis.from_url(server.url)
        log = ImpressionLog(ImpressionWriter(client, 5_000_000, 86400), queue_cap=n)
        impressions = [
            Impression(os.urandom(16).hex(), f"u{i}", "default", "cf", "m", "recommend", items,
                       int(time.time() * 1000))
            for i in range(n)
        ]  # fmt: skip
        started = time.perf_counter()
        for impression in impressions:
            log.record(impression)
        record_us = (time.perf_counter() - started) / n * 1e6
        started = time.perf_counter()
        await log.flush()
        write_us = (time.perf_counter() - started) / n * 1e6
        assert await client.xlen(IMPRESSION_STREAM) == n
        await client.aclose()
    print(f"in-process, k={k}: record {record_us:.2f} us per impression (on the reply's path); "
          f"background write {write_us:.1f} us per impression in batches of {log.batch} "
          "(JSON + one script call per 200, appendfsync always)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    rng = np.random.default_rng(42)
    users = [bundle.users.ids[i] for i in rng.integers(len(bundle.users), size=args.calls)]
    print(f"model {bundle.model_version}: {len(bundle.users)} users, {len(bundle.items)} items; "
          f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    servers = [start(args.model, 1.0), start(args.model, 0.0)]
    try:
        stubs = [pb_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
                 for _, port, _ in servers]  # fmt: skip
        for user in users[:300]:  # warm-up
            for stub in stubs:
                stub.Recommend(pb.RecommendRequest(user_id=user, k=args.k))
        times: list[list[float]] = [[], []]
        before = [[cpu_s(p) for p in pids(s)] for s in servers]
        for n, user in enumerate(users):
            order = (0, 1) if n % 2 else (1, 0)
            for s in order:
                started = time.perf_counter()
                stubs[s].Recommend(pb.RecommendRequest(user_id=user, k=args.k))
                times[s].append((time.perf_counter() - started) * 1000)
        time.sleep(0.2)  # the last batch of impressions
        after = [[cpu_s(p) for p in pids(s)] for s in servers]
        cpu_us = [[(a - b) / len(users) * 1e6 for a, b in zip(aa, bb, strict=True)]
                  for aa, bb in zip(after, before, strict=True)]  # fmt: skip
        on, off = stats(times[0]), stats(times[1])
        print("gRPC Recommend, impressions on:  " + on[1])
        print("gRPC Recommend, impressions off: " + off[1])
        print(f"p50 on / off: {on[0] / off[0]:.3f}")
        for name, (server_us, redis_us) in zip(("on", "off"), cpu_us, strict=True):
            tick_us = 1e4 / len(users)  # /proc counts 10 ms clock ticks
            print(f"CPU per call, impressions {name}: server {server_us:.0f} us, "
                  f"its Redis {redis_us:.0f} us (+-{tick_us:.0f} us)")  # fmt: skip
        time.sleep(0.5)
        with redis.Redis.from_url(EmbeddedRedis(servers[0][2]).url) as client:
            print(f"impressions logged by the first server: {client.xlen(IMPRESSION_STREAM)} "
                  f"(calls made: {args.calls + 300})")  # fmt: skip
    finally:
        for proc, _, _ in servers:
            proc.terminate()
            proc.wait(30)
    asyncio.run(in_process(5000, args.k))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
