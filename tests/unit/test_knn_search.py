"""The kNN normalisation search that `recsvc train` runs on its validation split."""

import numpy as np
import scipy.sparse as sp

from recsvc.evaluate import holdout_split, ranking_metrics
from recsvc.ranking.knn_search import search_knn
from recsvc.similarity import TUNED_KNN, fit_normalised_knn


def skewed_blocks(n_users=400, n_items=120, seed=0):
    """Taste blocks of 20 items with a popular head in each block, plus noise clicks."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    head = np.arange(20) < 4
    for u in range(n_users):
        block = u % 6
        p = np.where(head, 4.0, 1.0)
        for i in rng.choice(20, size=8, replace=False, p=p / p.sum()):
            rows.append(u)
            cols.append(block * 20 + i)
        rows.append(u)
        cols.append(int(rng.integers(n_items)))
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    m.data[:] = 1.0
    return m


def validation_ndcg(fit, valid, params, neighbours=10):
    similarity = fit_normalised_knn(fit, neighbours, **{**params, "mass": 1.0})
    history = sp.csr_matrix(fit, dtype=np.float32)
    return ranking_metrics(lambda users: (history[users] @ similarity).toarray(), fit, valid)


def test_search_never_ends_below_its_start_and_reports_what_a_full_fit_gives():
    fit, valid = holdout_split(skewed_blocks(), 0.2, seed=1)
    choice = search_knn(fit, valid, neighbours=10, budget_s=60, n_users=10_000)
    assert choice.complete
    assert choice.metrics["ndcg"] >= choice.start_metrics["ndcg"]
    assert choice.metrics["ndcg"] == max(t["ndcg"] for t in choice.tried)
    assert len(choice.tried) > 10  # every grid value of every parameter was tried
    # the staged fit inside the search equals the one-shot fit that training serves
    again = validation_ndcg(fit, valid, choice.params)
    assert abs(again["ndcg"] - choice.metrics["ndcg"]) < 1e-4
    assert choice.params["mass"] == TUNED_KNN["mass"]  # serving-time pruning is not searched


def test_no_budget_keeps_the_starting_point():
    fit, valid = holdout_split(skewed_blocks(), 0.2, seed=1)
    choice = search_knn(fit, valid, neighbours=10, budget_s=0.0)
    assert choice.params == TUNED_KNN and not choice.complete and len(choice.tried) == 1


def test_no_held_out_items_means_no_search():
    m = skewed_blocks()
    choice = search_knn(m, [np.empty(0, np.int64)] * m.shape[0], neighbours=10)
    assert choice.params == TUNED_KNN and len(choice.tried) == 0


def test_a_large_log_searches_only_the_reweighting_and_fits_by_blocks(monkeypatch):
    """Past BLOCKED_ABOVE the product is computed by pruned blocks, and the search
    leaves a, shrink and alpha at their start (each would be another pass)."""
    from recsvc import similarity

    monkeypatch.setattr(similarity, "BLOCKED_ABOVE", 0)  # is_large reads it for both
    monkeypatch.setattr(similarity, "BLOCK_PRODUCTS", 2_000)
    fit, valid = holdout_split(skewed_blocks(), 0.2, seed=1)
    # weights in the log so that co-occurrences do not tie: which of exactly tied
    # neighbours a cut keeps may differ between the whole product and the blocks
    fit.data = np.random.default_rng(2).uniform(0.5, 1.5, fit.nnz).astype(np.float32)
    choice = search_knn(fit, valid, neighbours=10, budget_s=60, n_users=10_000)
    assert choice.complete and choice.metrics["ndcg"] >= choice.start_metrics["ndcg"]
    for key in ("a", "shrink", "alpha"):
        assert {t[key] for t in choice.tried} == {TUNED_KNN[key]}
    assert len({t["power"] for t in choice.tried}) > 1
    # the blocked, pruned fit gives what the whole product gives
    blocked = validation_ndcg(fit, valid, choice.params)
    monkeypatch.setattr(similarity, "BLOCKED_ABOVE", 10**18)
    whole = validation_ndcg(fit, valid, choice.params)
    assert blocked == whole
