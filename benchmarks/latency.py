"""Recommend latency in-process and over gRPC, and server memory.

    python benchmarks/latency.py --model models/gowalla [--calls 3000]

In-process: Engine.recommend against a real (embedded) Redis, one call at a
time. Over gRPC: a `recsvc serve` subprocess, one call in flight from a sync
client. Users are drawn uniformly from the model's users; a tenth of them get
five feedback events first, so the Redis history path is exercised.
Prints medians, p90, p99 in milliseconds and the server's RSS.
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

from recsvc.bundle import load_bundle
from recsvc.config import Settings
from recsvc.engine import Engine, load_model
from recsvc.state.feedback import FeedbackEvent
from recsvc.store import EmbeddedRedis, UserStore
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc


def percentiles(ms: list[float]) -> str:
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return f"p50 {p50:.3f} ms  p90 {p90:.3f} ms  p99 {p99:.3f} ms  (n={len(ms)})"


async def in_process(
    model_dir: Path, users: list[str], items: list[str], k: int, strategy: str
) -> list[float]:
    with EmbeddedRedis(tempfile.mkdtemp(prefix="recsvc-bench-")) as redis_server:
        settings = Settings()
        store = UserStore.from_url(redis_server.url)
        engine = Engine(load_model(model_dir), store, settings)
        rng = np.random.default_rng(0)
        events = [
            FeedbackEvent(f"b{u}-{j}", u, items[rng.integers(len(items))], "click", 2)
            for u in users[::10]
            for j in range(5)
        ]
        await engine.apply_feedback(events)
        for user in users[:200]:  # warm-up
            await engine.recommend(user, k, strategy=strategy)
        times = []
        for user in users:
            start = time.perf_counter()
            await engine.recommend(user, k, strategy=strategy)
            times.append((time.perf_counter() - start) * 1000)
        await store.close()
        return times


def over_grpc(
    model_dir: Path, users: list[str], items: list[str], k: int, strategy: int
) -> tuple[list[float], float]:
    data_dir = tempfile.mkdtemp(prefix="recsvc-bench-")
    log_path = Path(data_dir) / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsvc.cli", "serve", "--model", str(model_dir),
             "--port", "0", "--host", "127.0.0.1", "--data-dir", data_dir],
            stderr=log,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "serving on port" not in log_path.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(log_path.read_text())
            time.sleep(0.1)
        port = int(log_path.read_text().split("serving on port ")[1].split('"')[0].split()[0])
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.RecommenderStub(channel)
        rng = np.random.default_rng(1)
        stub.SendFeedback(pb.SendFeedbackRequest(events=[
            pb.FeedbackEvent(event_id=f"g{u}-{j}", user_id=u, item_id=items[rng.integers(len(items))],
                             type=pb.CLICK)
            for u in users[::10] for j in range(5)][:1000]))  # fmt: skip
        for user in users[:200]:
            stub.Recommend(pb.RecommendRequest(user_id=user, k=k, strategy=strategy))
        times = []
        for user in users:
            start = time.perf_counter()
            stub.Recommend(pb.RecommendRequest(user_id=user, k=k, strategy=strategy))
            times.append((time.perf_counter() - start) * 1000)
        with open(f"/proc/{proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        channel.close()
        return times, rss
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--strategy", choices=["cf", "generator", "blend"], default="cf")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    rng = np.random.default_rng(42)
    users = [bundle.users.ids[i] for i in rng.integers(len(bundle.users), size=args.calls)]
    items = bundle.items.ids
    size_mb = sum(f.stat().st_size for f in args.model.rglob("*") if f.is_file()) / 2**20
    print(f"model {bundle.model_version}: {len(bundle.users)} users, {len(items)} items, "
          f"similarity nnz {bundle.similarity.nnz}, bundle {size_mb:.1f} MiB")  # fmt: skip
    print(f"cpu count {os.cpu_count()}, k={args.k}, strategy {args.strategy}")
    print(
        "in-process Engine.recommend: "
        + percentiles(asyncio.run(in_process(args.model, users, items, args.k, args.strategy)))
    )
    strategy = pb.Strategy.Value(f"STRATEGY_{args.strategy.upper()}")
    times, rss = over_grpc(args.model, users, items, args.k, strategy)
    print("gRPC Recommend, 1 in flight: " + percentiles(times))
    print(f"server RSS after the run: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
