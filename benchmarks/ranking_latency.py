"""Per-call cost of the ranking pipeline, in process (no gRPC, no Redis).

    python benchmarks/ranking_latency.py --model MODEL_DIR [--users 2000] [--k 20]

For a sample of training users (drawn by activity, as the load client draws
them), times ``RankingPipeline.rank`` for one user (what a Recommend call
runs) with the generator's latent given (as from the serving cache), and the
same with the old full-catalogue blend for comparison when the bundle has a
generator. Prints medians and p99 in microseconds, one thread, as served.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from threadpoolctl import threadpool_limits

from recsvc.engine import Engine, load_model
from recsvc.ranking import UserBatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    threadpool_limits(1)
    model = load_model(args.model)
    pipeline = model.pipeline
    assert pipeline is not None, "a bundle with a mixture (trained by this version)"
    train = model.bundle.user_items
    activity = np.diff(train.indptr).astype(np.float64)
    rng = np.random.default_rng(0)
    users = rng.choice(len(activity), size=args.users, p=activity / activity.sum())
    timings: dict[str, list[float]] = {"pipeline": [], "old_blend": []}
    for user in users.tolist():
        start, end = train.indptr[user], train.indptr[user + 1]
        items = train.indices[start:end].astype(np.int64)
        weights = train.data[start:end].astype(np.float64)
        latent = None
        if model.generator is not None:
            _, latent = model.generator.encode(items, weights)
        t = time.perf_counter()
        pipeline.rank(UserBatch.single(items, weights, model.n_items, latent), args.k)
        timings["pipeline"].append(time.perf_counter() - t)
        if model.generator is not None:
            t = time.perf_counter()
            Engine._rank_generator(model, items, weights, latent, args.k, None, None, False, 0.1)
            timings["old_blend"].append(time.perf_counter() - t)
    out = {"model": args.model, "users": args.users, "mixture": pipeline.weights}
    for name, values in timings.items():
        if values:
            us = np.array(values) * 1e6
            out[name] = {"p50_us": round(float(np.median(us)), 1),
                         "p99_us": round(float(np.percentile(us, 99)), 1)}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
