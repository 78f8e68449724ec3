"""Generate on a real catalogue: taste, topic fidelity, steering, latency (issue #15).

    python benchmarks/generate_catalogue.py --data ../shared/data/ml-1m-seq [--model DIR]

The protocol of issue #15, on a sequence file (``user item`` lines, time order)
and its ``catalogue.jsonl`` (title and categories of each item):

1. ``train.csv`` = each user's items minus the last two, with timestamps (the
   line order: one second apart), written to a temp dir at run time (the data
   never enters the repository); ``recsvc train --interactions train.csv
   --catalogue catalogue.jsonl --generator`` (skipped with ``--model``: a
   bundle trained this way before); ``recsvc serve`` as a subprocess.
2. Users devoted to a niche category: >= 10 training items, >= 40% of them in a
   category that covers < 15% of the catalogue; the first 60 of them in a
   seeded shuffle. Their category G is the niche category of largest share.
3. Per user, over gRPC, ``Generate(n=10, seed=1)`` with default settings; each
   generated item is judged by its first nearest catalogue item:

   - taste: share carrying G (against the history's share of G);
   - calibration: KL(history || generated) over the category distribution
     (each item's categories share its unit mass; generated smoothed with 1%
     of the history, Steck 2018);
   - topic fidelity: ``Generate(topic=T)`` with T a category the user never
     touched (seeded choice): share of items whose content *and* first nearest
     item carry T;
   - steering: the user buys 6 T items generated for them (PURCHASE events with
     the generation_id), then ``Generate(n=10, seed=1)`` again: the change in
     the share of T;
   - dislikes: the user dislikes every generated G item, then the share of G;
   - latency: ``Generate(n=10)`` p50/p90/p99 with one call in flight.
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

from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

N = 10
SEED = 1


def read_data(data: Path) -> tuple[dict[str, list[str]], dict[str, set[str]], dict[str, str]]:
    """User sequences, each item's categories, each item's title."""
    sequences: dict[str, list[str]] = {}
    with open(data / "ml-1m.txt") as f:
        for line in f:
            user, item = line.split()
            sequences.setdefault(user, []).append(item)
    categories, titles = {}, {}
    with open(data / "catalogue.jsonl") as f:
        for line in f:
            row = json.loads(line)
            categories[str(row["item_id"])] = {c.lower() for c in row.get("categories", [])}
            titles[str(row["item_id"])] = row.get("title", "")
    return sequences, categories, titles


def write_train(sequences: dict[str, list[str]], path: Path) -> dict[str, list[str]]:
    """train.csv: each user's items minus the last two, one second apart."""
    train = {u: s[:-2] for u, s in sequences.items() if len(s) > 2}
    t = 1_000_000_000
    with open(path, "w") as f:
        f.write("user_id,item_id,timestamp\n")
        for user, items in train.items():
            for item in items:
                f.write(f"{user},{item},{t}\n")
                t += 1
    return train


def niche_users(
    train: dict[str, list[str]], categories: dict[str, set[str]], count: int, seed: int
) -> tuple[list[tuple[str, str, float]], dict[str, float]]:
    """(user, category, history share) of ``count`` niche users; catalogue shares."""
    n_items = len(categories)
    coverage: dict[str, float] = {}
    for cats in categories.values():
        for c in cats:
            coverage[c] = coverage.get(c, 0) + 1 / n_items
    niche = {c for c, share in coverage.items() if share < 0.15}
    found = []
    for user, items in train.items():
        if len(items) < 10:
            continue
        counts: dict[str, int] = {}
        for item in items:
            for c in categories.get(item, ()):
                counts[c] = counts.get(c, 0) + 1
        best = max(((counts.get(c, 0), c) for c in sorted(niche)), default=(0, ""))
        if best[0] >= 0.4 * len(items):
            found.append((user, best[1], best[0] / len(items)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(found))
    return [found[i] for i in order[:count]], coverage


def category_distribution(items: list[str], categories: dict[str, set[str]]) -> dict[str, float]:
    dist: dict[str, float] = {}
    for item in items:
        cats = categories.get(item, set())
        for c in cats:
            dist[c] = dist.get(c, 0.0) + 1 / len(cats) / len(items)
    return dist


def calibration_kl(p: dict[str, float], q: dict[str, float], alpha: float = 0.01) -> float:
    """KL(p || (1 - alpha) q + alpha p), Steck 2018."""
    return sum(
        pv * np.log(pv / ((1 - alpha) * q.get(c, 0.0) + alpha * pv))
        for c, pv in p.items()
        if pv > 0
    )


def start_server(
    model: Path, work: Path, pythonpath: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    log_path = work / "serve.log"
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsvc", "serve", "--model", str(model), "--port", "0",
             "--host", "127.0.0.1", "--data-dir", str(work / "redis")],
            stderr=log, env=env, cwd=pythonpath,  # (-m puts the working directory first)
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while "serving on port" not in log_path.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.terminate()
            raise RuntimeError(log_path.read_text())
        time.sleep(0.2)
    port = int(log_path.read_text().split("serving on port ")[1].split('"')[0].split()[0])
    return proc, port


def first_nearest(response: pb.GenerateResponse) -> list[str]:
    return [g.nearest_items[0].item_id for g in response.items if g.nearest_items]


def share(items: list[str], category: str, categories: dict[str, set[str]]) -> float:
    return float(np.mean([category in categories.get(i, ()) for i in items])) if items else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="ml-1m.txt + catalogue.jsonl")
    parser.add_argument("--model", type=Path, help="a bundle trained by this protocol before")
    parser.add_argument("--save-model", type=Path, help="where to keep the trained bundle")
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--latency-calls", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--example", action="store_true", help="print one user's generation")
    parser.add_argument(
        "--server-pythonpath", help="serve another checkout's code (side-by-side timings)"
    )
    args = parser.parse_args()

    sequences, categories, titles = read_data(args.data)
    with tempfile.TemporaryDirectory(prefix="recsvc-gen-bench-") as tmp:
        work = Path(tmp)
        train = write_train(sequences, work / "train.csv")
        model = args.model
        if model is None:
            model = args.save_model or work / "model"
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "recsvc", "train", "--interactions",
                 str(work / "train.csv"), "--catalogue", str(args.data / "catalogue.jsonl"),
                 "--generator", "--out", str(model), "--quiet", "--force"],
                check=True,
            )  # fmt: skip
            print(f"trained {model} in {time.perf_counter() - started:.0f} s")
        users, coverage = niche_users(train, categories, args.users, args.seed)
        all_categories = sorted(coverage)
        proc, port = start_server(model, work, args.server_pythonpath)
        try:
            run(args, port, users, train, categories, titles, all_categories)
        finally:
            proc.terminate()
            proc.wait(30)


def run(args, port, users, train, categories, titles, all_categories) -> None:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.RecommenderStub(channel)
    rng = np.random.default_rng(args.seed)
    popularity: dict[str, int] = {}
    for items in train.values():
        for item in items:
            popularity[item] = popularity.get(item, 0) + 1
    rows: dict[str, list[float]] = {k: [] for k in (
        "history", "taste", "kl", "topic", "topic_returned", "steer_before", "steer_after",
        "dislike_before", "dislike_after", "shortfall", "kl_own", "pop_generated",
        "pop_history")}  # fmt: skip
    event = 0

    def feedback(user: str, items: list[str], kind: int, generation_id: str) -> None:
        nonlocal event
        events = []
        for item in items:
            event += 1
            events.append(pb.FeedbackEvent(event_id=f"bench-{event}", user_id=user, item_id=item,
                                           type=kind, recommendation_id=generation_id))  # fmt: skip
        stub.SendFeedback(pb.SendFeedbackRequest(events=events))

    if args.example:
        user, genre, _ = users[0]
        response = stub.Generate(pb.GenerateRequest(user_id=user, n=5, seed=SEED))
        print(f"example: user {user} ({genre} fan)")
        for g in response.items:
            first = g.nearest_items[0].item_id if g.nearest_items else ""
            print(f"  content {[a.name for a in g.content]} -> {titles.get(first)} "
                  f"{sorted(categories.get(first, ()))}")  # fmt: skip

    for user, genre, history_share in users:
        rows["history"].append(history_share)
        # reference for the KL: 10 of the user's own training items (the last ones)
        rows["kl_own"].append(calibration_kl(category_distribution(train[user], categories),
                                             category_distribution(train[user][-N:], categories)))
        base = stub.Generate(pb.GenerateRequest(user_id=user, n=N, seed=SEED))
        got = first_nearest(base)
        rows["taste"].append(share(got, genre, categories))
        rows["pop_generated"].append(float(np.median([popularity.get(i, 0) for i in got])))
        rows["pop_history"].append(float(np.median([popularity[i] for i in train[user]])))
        rows["kl"].append(calibration_kl(category_distribution(train[user], categories),
                                         category_distribution(got, categories)))  # fmt: skip
        touched = set().union(*(categories.get(i, set()) for i in train[user]))
        untouched = [c for c in all_categories if c not in touched]
        if not untouched:
            continue
        topic = untouched[rng.integers(len(untouched))]
        topical = stub.Generate(pb.GenerateRequest(user_id=user, n=N, seed=SEED, topic=topic))
        ok = [
            any(a.name == f"category:{topic}" for a in g.content)
            and bool(g.nearest_items) and topic in categories.get(g.nearest_items[0].item_id, ())
            for g in topical.items
        ]
        rows["topic"].append(float(np.mean(ok)) if ok else 0.0)
        rows["topic_returned"].append(len(topical.items))
        rows["shortfall"].append(float(bool(topical.shortfall)))
        # steering: buy 6 generated items of the new category, same seed again
        rows["steer_before"].append(share(got, topic, categories))
        bought = [i for i in first_nearest(topical) if topic in categories.get(i, ())][:6]
        feedback(user, bought, pb.PURCHASE, topical.generation_id)
        time.sleep(0.01)  # the cached user vector is updated after the ack
        after = stub.Generate(pb.GenerateRequest(user_id=user, n=N, seed=SEED))
        after_items = first_nearest(after)
        rows["steer_after"].append(share(after_items, topic, categories))
        # dislikes: every generated item of the user's category, then again
        rows["dislike_before"].append(share(after_items, genre, categories))
        disliked = [i for i in after_items if genre in categories.get(i, ())]
        if disliked:
            feedback(user, disliked, pb.DISLIKE, after.generation_id)
            time.sleep(0.01)
        again = stub.Generate(pb.GenerateRequest(user_id=user, n=N, seed=SEED))
        rows["dislike_after"].append(share(first_nearest(again), genre, categories))

    # latency: one call in flight; 200 users drawn from all training users, each
    # called several times in a seeded order (an interactive session calls again)
    ids = sorted(train)
    pool = [ids[i] for i in rng.choice(len(ids), 200, replace=False)]
    seen: set[str] = set()
    first_times, repeat_times = [], []
    for j in range(args.latency_calls + 100):
        user = pool[rng.integers(len(pool))]
        start = time.perf_counter()
        stub.Generate(pb.GenerateRequest(user_id=user, n=N))
        elapsed = (time.perf_counter() - start) * 1000
        if j >= 100:  # warm-up
            (repeat_times if user in seen else first_times).append(elapsed)
        seen.add(user)
    times = first_times + repeat_times
    channel.close()
    m = {k: float(np.mean(v)) if v else float("nan") for k, v in rows.items()}
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    print(f"users: {len(users)} niche-category fans; topic users: {len(rows['topic'])}")
    print(f"taste: share of the user's category among generated items {m['taste']:.3f} "
          f"(history {m['history']:.3f})")
    print(f"calibration KL(history || generated): {m['kl']:.3f} (the user's own last {N} "
          f"training items: {m['kl_own']:.3f})")
    print(f"popularity: median training users of generated items {m['pop_generated']:.0f} "
          f"(of the users' history items {m['pop_history']:.0f}; averaged over users)")
    print(f"topic fidelity: {m['topic']:.3f} (items returned per topic call "
          f"{m['topic_returned']:.1f} of {N}; shortfall said for {m['shortfall']:.0%} of calls)")
    print(f"steering: share of the new category {m['steer_before']:.3f} -> "
          f"{m['steer_after']:.3f} after 6 purchases ({m['steer_after'] - m['steer_before']:+.3f})")
    print(f"dislikes: share of the user's category {m['dislike_before']:.3f} -> "
          f"{m['dislike_after']:.3f} after disliking those items")
    print(f"latency Generate n={N}, 1 in flight: p50 {p50:.2f} ms  p90 {p90:.2f} ms  "
          f"p99 {p99:.2f} ms (n={len(times)}); a user's first call p50 "
          f"{np.median(first_times) if first_times else float('nan'):.2f} ms "
          f"(n={len(first_times)}), later calls p50 {np.median(repeat_times):.2f} ms "
          f"(n={len(repeat_times)})")


if __name__ == "__main__":
    main()
