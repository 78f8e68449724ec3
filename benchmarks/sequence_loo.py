"""The leave-one-out protocol of the SASRec / BERT4Rec papers, served live (issue #11).

    python benchmarks/sequence_loo.py --data ../shared/data/ml-1m-seq/ml-1m.txt \
        --work /tmp/seq-ml1m [--minutes 10] [--bundle DIR]

1. Writes each user's items minus the last two (a 'user item' line file, in order) to
   ``--work`` (never into the repository: the data sets are research-only).
2. ``recsvc train --sequence`` on it (``--sequence-minutes``; reuses ``--bundle`` if given).
3. ``recsvc serve`` on that bundle; for every user, the second-to-last item is sent as a live
   event through SendFeedback, then Recommend(STRATEGY_SEQUENCE, k=10) is called over gRPC,
   one call in flight (then the same with STRATEGY_BLEND, the tuned mixture: ``--strategies``);
   HR@10 / NDCG@10 against the last item, over all users, and the Recommend latency
   (p50 / p99) right after the event, then again for up to 2,000 users whose state is
   cached (``recommend_cached_*``).
4. ``recsvc eval --leave-one-out --strategy S`` on the whole file, the same protocol offline.

Prints one JSON object. Wall times on a shared machine are inflated by the neighbours:
``uptime`` is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def read_sequences(path: Path) -> dict[str, list[str]]:
    sequences: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                sequences.setdefault(parts[0], []).append(parts[1])
    return sequences


def recsvc(*args: str, **kwargs) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "recsvc", *args], env=env, **kwargs)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def serve(bundle: Path, work: Path) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    log_path = work / "serve.log"
    log = open(log_path, "w")
    redis_dir = tempfile.mkdtemp(prefix="redis-", dir=work)
    proc = recsvc("serve", "--model", str(bundle), "--port", "0", "--host", "127.0.0.1",
                  "--data-dir", redis_dir, stderr=log)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if "serving on port " in text:
            return proc, int(text.split("serving on port ")[1].split('"')[0].split()[0])
        if proc.poll() is not None:
            raise RuntimeError(text)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start: " + log_path.read_text())


def call(method, request):  # type: ignore[no-untyped-def]
    """A unary call, retried while the server says UNAVAILABLE (a store timeout on a busy
    machine; resending an event id is safe)."""
    for attempt in range(20):
        try:
            return method(request)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 19:
                raise
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="'user item' file, ordered")
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (not the repo)")
    ap.add_argument("--minutes", type=float, default=10.0, help="--sequence-minutes")
    ap.add_argument("--bundle", type=Path, help="an existing bundle trained on the same split")
    ap.add_argument("--threads", type=int, default=0, help="training threads (0: all)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--users", type=int, default=0, help="evaluate the first N users (0: all)")
    ap.add_argument(
        "--strategies", default="sequence,blend",
        help="Recommend strategies measured after each event (sequence, blend: the mixture)",
    )  # fmt: skip
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sequences = read_sequences(args.data)
    result: dict[str, object] = {"data": str(args.data), "uptime_start": uptime()}

    bundle = args.bundle
    if bundle is None:
        train_file = args.work / "train.txt"
        with open(train_file, "w") as f:
            for user, items in sequences.items():
                f.writelines(f"{user} {item}\n" for item in items[:-2])
        bundle = args.work / "bundle"
        started = time.perf_counter()
        code = recsvc("train", "--interactions", str(train_file), "--out", str(bundle),
                      "--sequence", "--sequence-minutes", str(args.minutes),
                      "--force", "--threads", str(args.threads)).wait()  # fmt: skip
        if code:
            raise SystemExit(f"recsvc train failed ({code})")
        result["train_wall_s"] = round(time.perf_counter() - started, 1)
        result["uptime_after_train"] = uptime()
    manifest = json.loads((bundle / "manifest.json").read_text())
    result["sequence_params"] = manifest["params"].get("sequence")

    proc, port = serve(bundle, args.work)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.RecommenderStub(channel)
        users = list(sequences)[: args.users or None]
        strategies = {
            name: {"sequence": pb.STRATEGY_SEQUENCE, "blend": pb.STRATEGY_BLEND}[name]
            for name in args.strategies.split(",")
        }
        hits = dict.fromkeys(strategies, 0)
        ndcg = dict.fromkeys(strategies, 0.0)
        times: dict[str, list[float]] = {name: [] for name in strategies}
        now = int(time.time()) - 3600
        for n, user in enumerate(users):
            items = sequences[user]
            if len(items) >= 2:
                event = pb.FeedbackEvent(
                    event_id=f"loo-{user}", user_id=user, item_id=items[-2], type=pb.VIEW,
                    timestamp=Timestamp(seconds=now + n % 3000),
                )  # fmt: skip
                call(stub.SendFeedback, pb.SendFeedbackRequest(events=[event]))
            for name, strategy in strategies.items():
                started = time.perf_counter()
                response = call(
                    stub.Recommend, pb.RecommendRequest(user_id=user, k=args.k, strategy=strategy)
                )
                times[name].append((time.perf_counter() - started) * 1000)
                ranked = [i.item_id for i in response.items]
                if items[-1] in ranked:
                    hits[name] += 1
                    ndcg[name] += 1.0 / np.log2(ranked.index(items[-1]) + 2)
        # the same users again: the state cached after the event, no feedback in between
        cached_times: dict[str, list[float]] = {name: [] for name in strategies}
        for user in users[:2000]:
            for name, strategy in strategies.items():
                started = time.perf_counter()
                call(stub.Recommend, pb.RecommendRequest(user_id=user, k=args.k, strategy=strategy))
                cached_times[name].append((time.perf_counter() - started) * 1000)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(30)
    result["users"] = len(users)
    for name in strategies:
        p50, p99 = np.percentile(times[name], [50, 99])
        cached = cached_times[name]
        result[name] = {
            f"grpc_hr@{args.k}": round(hits[name] / len(users), 4),
            f"grpc_ndcg@{args.k}": round(ndcg[name] / len(users), 4),
            "recommend_p50_ms": round(float(p50), 3),
            "recommend_p99_ms": round(float(p99), 3),
            "recommend_cached_p50_ms": round(float(np.percentile(cached, 50)), 3),
            "recommend_cached_p99_ms": round(float(np.percentile(cached, 99)), 3),
        }  # fmt: skip
    for name in strategies:
        out = subprocess.run(
            [sys.executable, "-m", "recsvc", "eval", "--model", str(bundle), "--test",
             str(args.data), "--leave-one-out", "--k", str(args.k), "--strategy", name],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )  # fmt: skip
        result[name]["eval"] = json.loads(out.stdout.strip().splitlines()[-1])
    result["uptime_end"] = uptime()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
