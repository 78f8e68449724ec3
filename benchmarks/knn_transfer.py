"""Do the kNN's normalisation parameters transfer? Searched on validation vs the Gowalla values.

For each dataset: the training part (Gowalla: train.txt; a sequence file: each user's
items but the last, which is the test item), a 10% validation split carved from it,
``search_knn`` on that split, then the kNN refitted on the whole training part with the
starting values (``TUNED_KNN``, found on Gowalla) and with the searched ones, both scored on
the test items: Recall@20 / NDCG@20, full ranking, training items excluded (with one test
item per user, Recall@20 is HR@20).

    python benchmarks/knn_transfer.py gowalla ../shared/data/gowalla
    python benchmarks/knn_transfer.py seq ../shared/data/beauty-seq/beauty.txt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recsvc.evaluate import holdout_split, items_to_csr, ranking_metrics, read_user_item_lines
from recsvc.ranking.knn_search import search_knn
from recsvc.similarity import TUNED_KNN, fit_normalised_knn


def gowalla(folder: Path) -> tuple[sp.csr_matrix, list[np.ndarray]]:
    train = read_user_item_lines(folder / "train.txt")
    test = read_user_item_lines(folder / "test.txt")
    n_items = 1 + max(int(x.max(initial=0)) for x in [*train, *test])
    return items_to_csr(train, n_users=len(train), n_items=n_items), test


def sequences(path: Path) -> tuple[sp.csr_matrix, list[np.ndarray]]:
    pairs = np.loadtxt(path, dtype=np.int64)
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]  # each user's lines stay in order
    users, first = np.unique(pairs[:, 0], return_index=True)
    bounds = np.append(first, len(pairs))
    items = pairs[:, 1] - 1
    train, test = [], []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        train.append(np.unique(items[start : end - 1]))
        test.append(items[end - 1 : end])
    n_items = int(items.max()) + 1
    # a test item the user already had is not a recommendation to find: that user is skipped
    test = [
        np.empty(0, np.int64) if np.isin(t, h).any() else t
        for t, h in zip(test, train, strict=True)
    ]
    return items_to_csr(train, n_users=len(train), n_items=n_items), test


def test_metrics(train: sp.csr_matrix, test: list[np.ndarray], params: dict) -> dict:
    similarity = fit_normalised_knn(train, 100, **params)
    history = sp.csr_matrix(train, dtype=np.float32)
    got = ranking_metrics(lambda users: (history[users] @ similarity).toarray(), train, test)
    return {"recall@20": round(got["recall"], 4), "ndcg@20": round(got["ndcg"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["gowalla", "seq"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--budget", type=float, default=600.0)
    args = parser.parse_args()
    train, test = gowalla(args.path) if args.kind == "gowalla" else sequences(args.path)
    fit_part, valid = holdout_split(train, 0.1, seed=0)
    started = time.perf_counter()
    choice = search_knn(fit_part, valid, 100, budget_s=args.budget)
    print(json.dumps({
        "data": str(args.path),
        "search_seconds": round(time.perf_counter() - started, 1),
        "complete": choice.complete,
        "searched": {k: v for k, v in choice.params.items() if k != "mass"},
        "validation": {"start": choice.start_metrics, "searched": choice.metrics},
        "test": {"start": test_metrics(train, test, TUNED_KNN),
                 "searched": test_metrics(train, test, choice.params)},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
