import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.bundle import CFBundle
from recsvc.data import IdMap
from recsvc.similarity import CFModel, fit_cosine, keep_top_k_per_row, score_history

# users x items; item columns: 0 -> users {0,1,3}, 1 -> {0,2,3}, 2 -> {1,2,3}, 3 -> {4}
R = sp.csr_matrix(
    np.array(
        [[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=np.float32
    )
)


def test_cosine_values_by_hand():
    s = fit_cosine(R, neighbours=10, num_threads=1).toarray()
    # cos(0,1) = |{0,3}| / sqrt(3 * 3) = 2/3, and likewise for (0,2) and (1,2)
    expected = np.array(
        [[0, 2 / 3, 2 / 3, 0], [2 / 3, 0, 2 / 3, 0], [2 / 3, 2 / 3, 0, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_weighted_cosine_by_hand():
    weighted = sp.csr_matrix(np.array([[2, 1], [0, 3], [1, 1]], dtype=np.float32))
    s = fit_cosine(weighted, neighbours=5, num_threads=1).toarray()
    # columns (2,0,1) and (1,3,1): dot 3, norms sqrt(5), sqrt(11)
    assert s[0, 1] == pytest.approx(3 / np.sqrt(5 * 11), rel=1e-6)
    assert s[0, 0] == 0


def test_neighbours_cap_excludes_the_item_itself():
    s = fit_cosine(R, neighbours=1, num_threads=1)
    assert np.diff(s.indptr).tolist() == [1, 1, 1, 0]
    assert (s.diagonal() == 0).all()


def test_keep_top_k_per_row_keeps_largest():
    m = sp.csr_matrix(np.array([[0.1, 0.5, 0.3, 0.9], [0.2, 0, 0, 0]], dtype=np.float32))
    top = keep_top_k_per_row(m, 2).toarray()
    np.testing.assert_allclose(top, [[0, 0.5, 0, 0.9], [0.2, 0, 0, 0]])


def test_score_history_equals_sparse_product():
    rng = np.random.default_rng(1)
    s = sp.random(30, 30, density=0.2, random_state=2, format="csr", dtype=np.float32)
    items = np.array([3, 7, 11])
    weights = rng.normal(size=3)
    expected = weights @ s[items].toarray()
    np.testing.assert_allclose(score_history(s, items, weights), expected, rtol=1e-5)


def _model() -> CFModel:
    similarity = fit_cosine(R, neighbours=10, num_threads=1)
    popularity = np.asarray((R > 0).sum(axis=0), dtype=np.float32).ravel()
    bundle = CFBundle(
        IdMap(f"u{i}" for i in range(5)),
        IdMap(f"i{i}" for i in range(4)),
        R,
        similarity,
        popularity,
    )
    return CFModel(bundle)


def test_recommend_excludes_seen_and_scores_by_hand():
    model = _model()
    items, scores = model.recommend(np.array([0]), np.array([2.0]), k=5)
    # history {item 0: weight 2}: items 1 and 2 score 2 * 2/3; item 3 has no similarity
    assert sorted(items.tolist()) == [1, 2]
    np.testing.assert_allclose(scores, [4 / 3, 4 / 3], rtol=1e-6)


def test_recommend_include_seen_exclude_and_restrict():
    model = _model()
    items, _ = model.recommend(np.array([0, 1]), np.array([1.0, 1.0]), k=5, include_seen=True)
    assert set(items.tolist()) == {0, 1, 2}
    items, _ = model.recommend(np.array([0]), np.array([1.0]), k=5, exclude=np.array([1]))
    assert items.tolist() == [2]
    items, _ = model.recommend(np.array([0]), np.array([1.0]), k=5, restrict=np.array([2, 3]))
    assert items.tolist() == [2]


def test_negative_weight_pushes_similar_items_down():
    model = _model()
    items, scores = model.recommend(np.array([0, 1]), np.array([1.0, -3.0]), k=5)
    # item 2 scores 1 * 2/3 - 3 * 2/3 < 0: never recommended from CF
    assert items.tolist() == []


def test_popular_skips_banned_and_respects_restrict():
    model = _model()
    assert model.popular(2, banned=np.array([0])).tolist() == [1, 2]
    assert model.popular(
        5, banned=np.array([], dtype=np.int64), restrict=np.array([3, 0])
    ).tolist() == [0, 3]


def test_similar_items_best_first():
    model = _model()
    items, scores = model.similar_items(0, 1)
    assert items.tolist() in ([1], [2]) and scores[0] == pytest.approx(2 / 3)


def test_normalised_knn_generalises_cosine():
    from recsvc.similarity import fit_normalised_knn

    rng = np.random.default_rng(4)
    r = sp.csr_matrix((rng.random((40, 25)) < 0.2).astype(np.float32))
    plain = fit_normalised_knn(
        r, 100, alpha=0, a=0.5, shrink=0, power=1, beta=0, rownorm=False
    ).toarray()
    np.testing.assert_allclose(plain, fit_cosine(r, 100, num_threads=1).toarray(), atol=1e-6)


def test_normalised_knn_by_hand():
    from recsvc.similarity import fit_normalised_knn

    # items 0,1 co-occur for user 0 (degree 2) and user 2 (degree 3)
    r = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=np.float32))
    s = fit_normalised_knn(r, 10, alpha=1.0, a=0.5, shrink=1.0, power=2.0, beta=0, rownorm=False)
    # C_01 = 1/2 * 1/2 + 1/3 * 1/3; degrees: item 0 -> 3, item 1 -> 2
    expected = ((0.25 + 1 / 9) / (np.sqrt(3) * np.sqrt(2) + 1.0)) ** 2
    assert s[0, 1] == pytest.approx(expected, rel=1e-5)
    rows = fit_normalised_knn(r, 10).toarray().sum(axis=1)
    np.testing.assert_allclose(rows, 1.0, rtol=1e-5)  # rownorm: each history item has one vote


def test_keep_row_mass_keeps_the_largest_entries_up_to_the_share():
    from recsvc.similarity import keep_row_mass

    rows = [[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.0, 0.8]]
    m = sp.csr_matrix(np.array(rows, dtype=np.float32))
    # row 0: 0.5 alone is below 0.7 of the sum, 0.5 + 0.3 reaches it; row 1 stays empty
    np.testing.assert_allclose(
        keep_row_mass(m, 0.7).toarray(),
        [[0.5, 0.3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.8]],
    )
    assert keep_row_mass(m, 1.0).nnz == m.nnz
    with pytest.raises(ValueError):
        keep_row_mass(m, 0.0)


def test_tuned_knn_prunes_rows_by_mass():
    from recsvc.similarity import TUNED_KNN, fit_normalised_knn

    rng = np.random.default_rng(5)
    r = sp.csr_matrix((rng.random((200, 60)) < 0.15).astype(np.float32))
    full = fit_normalised_knn(r, 50, **{**TUNED_KNN, "mass": 1.0})
    pruned = fit_normalised_knn(r, 50, **TUNED_KNN)
    assert 0 < pruned.nnz < full.nnz
    sums = np.asarray(pruned.sum(axis=1)).ravel()
    kept_rows = np.diff(full.indptr) > 0
    assert (sums[kept_rows] >= TUNED_KNN["mass"] - 1e-5).all() and (sums <= 1 + 1e-5).all()
