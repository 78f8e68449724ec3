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


def test_many_members_are_tuned_by_coordinate_ascent(monkeypatch):
    """Past MAX_GRID settings, one member's weight moves at a time: far fewer settings
    tried, and on these blocks the same best as the whole grid."""
    import recsvc.ranking.mixture as mixture

    matrix = blocks(n_users=300)
    fit_part, valid = holdout_split(matrix, 0.2, seed=0)
    knn = KnnScorer(fit_normalised_knn(fit_part, 3))
    popularity = PopularityScorer(np.asarray(fit_part.sum(axis=0)).ravel())
    factors = fit_item_factors(fit_part, 8)

    def tune():
        return tune_mixture(knn, popularity, fit_part, valid, factors, [4, 8], n_candidates=8,
                            n_popular=2)  # fmt: skip

    tried = []
    real_metrics = mixture._metrics
    monkeypatch.setattr(mixture, "_metrics", lambda *a: tried.append(1) or real_metrics(*a))
    grid = tune()
    n_grid, tried[:] = len(tried), []
    monkeypatch.setattr(mixture, "MAX_GRID", 1)
    ascent = tune()
    assert len(tried) < n_grid / 2
    assert ascent.weights.get("lowrank", 0) > 0
    assert ascent.metrics["ndcg"] >= grid.metrics["ndcg"] - 1e-9


def test_fewest_candidates_keeps_the_smallest_count_that_ranks_as_well():
    from recsvc.ranking.mixture import fewest_candidates

    # two users, six candidates each (no popular head); the kNN orders them 0..5
    knn = np.array([[6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]])
    other = np.array([[0.0, 0, 0, 0, 0, 9], [0.0, 0, 0, 0, 0, 9]])  # likes the kNN's last
    candidates = np.tile(np.arange(6), (2, 1))
    usable = np.ones((2, 6), dtype=bool)
    in_head = np.zeros((2, 6), dtype=bool)
    n_relevant = np.array([1, 1])
    common = dict(raw={"knn": knn, "other": other}, how={"knn": "sum", "other": "sum"},
                  candidates=candidates, usable=usable, in_head=in_head, n_relevant=n_relevant,
                  tie_break=np.zeros((2, 6)), n_candidates=6, n_popular=0, k=2)  # fmt: skip
    # the held-out items are the kNN's favourites: two candidates rank them as well as six
    top = np.zeros((2, 6), dtype=bool)
    top[:, 0] = True
    got = fewest_candidates(relevant=top, settings=[{"knn": 1.0}], best_ndcg=1.0,
                            counts=(2, 4), **common)  # fmt: skip
    assert got is not None and got[0] == 2 and got[1]["ndcg"] == 1.0
    # held out: the item only the other scorer finds, last in the kNN's order: fewer
    # candidates would drop it, so the full count stays
    last = np.zeros((2, 6), dtype=bool)
    last[:, 5] = True
    assert fewest_candidates(relevant=last, settings=[{"knn": 0.1, "other": 1.0}],
                             best_ndcg=1.0, counts=(2, 4), **common) is None  # fmt: skip
