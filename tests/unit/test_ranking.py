"""The ranking pipeline on small synthetic data: scorers, filters, the mixture tuning."""

import numpy as np
import scipy.sparse as sp

from recsvc.evaluate import holdout_split
from recsvc.ranking import RankingPipeline, UserBatch
from recsvc.ranking.base import normalise
from recsvc.ranking.knn import KnnScorer
from recsvc.ranking.lowrank import LowRankScorer, fit_item_factors
from recsvc.ranking.mixture import tune_mixture
from recsvc.ranking.popularity import PopularityScorer
from recsvc.similarity import fit_normalised_knn


def blocks(n_users=120, n_items=30, seed=0):
    """Three taste blocks of 10 items; each user takes 5 items of their block."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for u in range(n_users):
        block = u % 3
        for i in rng.choice(10, size=5, replace=False):
            rows.append(u)
            cols.append(block * 10 + i)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))


def pipeline(matrix, weights, factors=None):
    knn = KnnScorer(fit_normalised_knn(matrix, 10))
    popularity = PopularityScorer(np.asarray(matrix.sum(axis=0)).ravel())
    scorers = [knn, popularity]
    if factors is not None:
        scorers.append(LowRankScorer(factors, np.asarray(matrix.sum(axis=0)).ravel()))
    return RankingPipeline(knn, popularity, scorers, weights, n_candidates=8, n_popular=2)


def test_normalise():
    scores = np.array([[1.0, 3.0, -2.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(normalise(scores, "sum"), [[0.25, 0.75, 0.0], [0, 0, 0]])
    soft = normalise(scores, "softmax")
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    assert soft[0].argmax() == 1


def test_lowrank_scores_are_the_ideal_low_pass_filter():
    matrix = blocks()
    factors = fit_item_factors(matrix, 4)
    degree = np.asarray(matrix.sum(axis=0)).ravel()
    scorer = LowRankScorer(factors, degree)
    v = factors.T.astype(np.float64)  # rank x items
    d = degree.astype(np.float64)
    expected = (matrix[:3].toarray() / np.sqrt(d)) @ v.T @ v * np.sqrt(d)
    candidates = np.tile(np.arange(30), (3, 1))
    np.testing.assert_allclose(scorer.score(UserBatch(matrix[:3]), candidates), expected,
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    # a user of block 0 scores block 0 above the others
    assert expected[0, :10].mean() > 5 * max(expected[0, 10:].mean(), 1e-9)


def test_filters_and_the_mixture():
    matrix = blocks()
    pipe = pipeline(matrix, {"knn": 1.0, "lowrank": 1.0}, fit_item_factors(matrix, 4))
    user = matrix[0]
    items, weights = user.indices.astype(np.int64), user.data
    batch = UserBatch.single(items, weights, 30)
    ranked = pipe.rank(batch, k=5)
    assert len(ranked.items) == 5 and not set(ranked.items) & set(items)
    assert all(i < 10 for i in ranked.items)  # the user's block first
    assert np.all(np.diff(ranked.scores) <= 0)
    excluded = pipe.rank(UserBatch.single(items, weights, 30), k=5, exclude=ranked.items[:2])
    assert not set(excluded.items) & set(ranked.items[:2])
    restricted = pipe.rank(UserBatch.single(items, weights, 30), k=5,
                           restrict=np.array([25, 26, items[0]]))  # fmt: skip
    assert set(restricted.items) <= {25, 26}
    seen = pipe.rank(UserBatch.single(items, weights, 30), k=30, include_seen=True)
    assert set(seen.items.tolist()) & set(items.tolist())  # seen items may come back


def test_tuning_uses_the_low_rank_term_where_it_helps():
    matrix = blocks(n_users=300)
    fit_part, valid = holdout_split(matrix, 0.2, seed=0)
    knn = KnnScorer(fit_normalised_knn(fit_part, 3))  # a kNN too short to see its block
    popularity = PopularityScorer(np.asarray(fit_part.sum(axis=0)).ravel())
    choice = tune_mixture(knn, popularity, fit_part, valid, fit_item_factors(fit_part, 8), [4, 8],
                          n_candidates=8, n_popular=2)  # fmt: skip
    assert choice.weights.get("lowrank", 0) > 0 and choice.rank in (4, 8)
    knn_only = [g for g in choice.grid if set(g["weights"]) <= {"knn", "popularity"}]
    assert not knn_only or knn_only[0]["ndcg"] <= choice.metrics["ndcg"]
