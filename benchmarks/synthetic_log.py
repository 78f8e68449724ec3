"""A synthetic interaction log at a chosen scale, for capacity runs (#12).

    python benchmarks/synthetic_log.py --users 300000 --items 400000 \
        --interactions 8000000 --out /tmp/synth10x.txt

Writes Gowalla's format (one line per user: ``user item item ...``). Users'
activity and items' popularity are Zipf-like; each user draws most items from
one of ``--clusters`` taste clusters (contiguous item ranges, shuffled), so
item-item similarity has structure to find, as in real logs. Seeded.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--users", type=int, default=300_000)
    parser.add_argument("--items", type=int, default=400_000)
    parser.add_argument("--interactions", type=int, default=8_000_000)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--in-cluster", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    # per-user counts: Zipf-like activity, at least 3, summing to about --interactions
    activity = 1.0 / np.arange(1, args.users + 1) ** 0.6
    counts = np.maximum(3, np.round(activity / activity.sum() * args.interactions)).astype(int)
    rng.shuffle(counts)
    # items: Zipf popularity within each cluster; clusters are contiguous id ranges
    item_ids = rng.permutation(args.items)
    per_cluster = args.items // args.clusters
    within = np.cumsum(1.0 / np.arange(1, per_cluster + 1) ** 0.9)
    within /= within[-1]
    overall = np.cumsum(1.0 / np.arange(1, args.items + 1) ** 0.9)
    overall /= overall[-1]
    user_cluster = rng.integers(0, args.clusters, size=args.users)
    total = 0
    with open(args.out, "w") as f:
        for user in range(args.users):
            n = counts[user]
            items = np.empty(0, dtype=np.int64)
            for _ in range(20):  # draw until n distinct items (popular ones repeat)
                k = 2 * (n - len(items))
                in_cluster = rng.random(k) < args.in_cluster
                local = np.searchsorted(within, rng.random(k))
                anywhere = np.searchsorted(overall, rng.random(k))
                drawn = np.where(in_cluster, local + user_cluster[user] * per_cluster, anywhere)
                drawn = item_ids[np.minimum(drawn, args.items - 1)]
                items = np.unique(np.concatenate([items, drawn]))
                if len(items) >= n:
                    break
            items = rng.permutation(items)[:n]
            total += len(items)
            f.write(f"{user} " + " ".join(map(str, np.sort(items).tolist())) + "\n")
    print(f"{args.users} users, {args.items} items, {total} interactions -> {args.out}")


if __name__ == "__main__":
    main()
