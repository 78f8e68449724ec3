"""How much of each similarity row the served CF model needs (validation only).

    python benchmarks/prune_mass.py [--train ../shared/data/gowalla/train.txt]

Fits the tuned kNN matrix (``TUNED_KNN`` without its ``mass``) on 80% of each
user's items in train.txt (``holdout_split``, seed 0), then for each ``mass``
keeps the largest entries of every row holding that share of the row's sum
(``keep_row_mass``) and prints: entries kept, Recall@20 / NDCG@20 on the
held-out 20%, and the median and mean time of implicit's scorer for 3000 users
drawn in proportion to their history length (as the load test draws them).
test.txt is never read.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
from implicit._nearest_neighbours import NearestNeighboursScorer

from recsvc.evaluate import holdout_split, items_to_csr, ranking_metrics, read_user_item_lines
from recsvc.similarity import TUNED_KNN, fit_normalised_knn, keep_row_mass


def scorer_times_us(similarity: sp.csr_matrix, histories: list[np.ndarray]) -> np.ndarray:
    scorer = NearestNeighboursScorer(similarity)
    times = []
    for items in histories:
        weights = np.ones(len(items), dtype=np.float32)
        start = time.perf_counter()
        scorer.recommend(np.array([0, len(items)], dtype=np.int32), items, weights, K=20)
        times.append(time.perf_counter() - start)
    return np.array(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default="../shared/data/gowalla/train.txt")
    parser.add_argument("--neighbours", type=int, default=100)
    parser.add_argument("--masses", default="1.0,0.95,0.9,0.85,0.8,0.7")
    args = parser.parse_args()

    lines = read_user_item_lines(args.train)
    n_items = max(int(items.max()) for items in lines if len(items)) + 1
    full = items_to_csr(lines, n_users=len(lines), n_items=n_items)
    fit_part, held_out = holdout_split(full, 0.2, seed=0)
    fit_part = sp.csr_matrix(fit_part, dtype=np.float32)
    params = {name: value for name, value in TUNED_KNN.items() if name != "mass"}
    similarity = fit_normalised_knn(fit_part, args.neighbours, **params)

    lengths = np.diff(fit_part.indptr).astype(np.float64)
    rng = np.random.default_rng(0)
    users = rng.choice(len(lengths), 3000, p=lengths / lengths.sum())
    histories = [
        fit_part.indices[fit_part.indptr[u] : fit_part.indptr[u + 1]].astype(np.int32)
        for u in users
    ]
    print(f"{'mass':>5} {'entries':>9} {'recall@20':>9} {'ndcg@20':>8} {'scorer p50/mean us':>19}")
    for mass in (float(m) for m in args.masses.split(",")):
        pruned = keep_row_mass(similarity, mass) if mass < 1 else similarity
        metrics = ranking_metrics(
            lambda u, s=pruned: (fit_part[u] @ s).toarray().astype(np.float32),
            fit_part, held_out, k=20,
        )  # fmt: skip
        times = scorer_times_us(pruned, histories)
        print(
            f"{mass:5.2f} {pruned.nnz:9d} {metrics['recall']:9.4f} {metrics['ndcg']:8.4f} "
            f"{np.median(times):9.1f} / {times.mean():6.1f}"
        )


if __name__ == "__main__":
    main()
