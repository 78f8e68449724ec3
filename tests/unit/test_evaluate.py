"""Unit tests for recsvc.evaluate (tiny hand-made examples; no shared data needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.evaluate import (
    holdout_split,
    items_to_csr,
    ranking_metrics,
    read_user_item_lines,
)

L2 = math.log2


def _fixed_scores(matrix):
    matrix = np.asarray(matrix, dtype=np.float32)
    return lambda users: matrix[users]


# 4 users x 5 items.
TRAIN = items_to_csr(
    [np.array([0]), np.array([], dtype=np.int64), np.array([2]), np.array([1])], n_items=5
)
SCORES = [
    [9, 5, 4, 3, 1],  # u0: item 0 is a train item -> ranking 1, 2, 3, 4
    [1, 2, 3, 4, 5],  # u1: ranking 4, 3, 2, 1, 0
    [5, 4, 3, 2, 1],  # u2: no test items -> not evaluated
    [0, 1, 2, 3, 4],  # u3: ranking 4, 3, 2, 0 (1 is a train item)
]
TEST = [np.array([1, 3]), np.array([4]), np.array([], dtype=np.int64), np.array([0])]


def test_hand_computed_k2():
    res = ranking_metrics(_fixed_scores(SCORES), TRAIN, TEST, k=2)
    # u0: top2 = [1, 2], hits [1, 0]; recall 1/2; dcg 1; idcg 1 + 1/log2(3)
    # u1: top2 = [4, 3], hits [1, 0]; recall 1;   ndcg 1 (one test item)
    # u3: top2 = [4, 3], no hits;     recall 0;   ndcg 0
    exp_recall = (0.5 + 1.0 + 0.0) / 3
    exp_ndcg = (1.0 / (1.0 + 1.0 / L2(3)) + 1.0 + 0.0) / 3
    assert res["n_users"] == 3
    assert res["recall"] == pytest.approx(exp_recall)
    assert res["ndcg"] == pytest.approx(exp_ndcg)


def test_hand_computed_k3_hit_positions():
    res = ranking_metrics(_fixed_scores(SCORES), TRAIN, TEST, k=3)
    # u0: top3 = [1, 2, 3], hits at ranks 0 and 2: recall 1; dcg 1 + 1/log2(4) = 1.5;
    #     idcg over min(3, 2) = 2 positions: 1 + 1/log2(3)
    # u1: top3 = [4, 3, 2]: recall 1, ndcg 1
    # u3: top3 = [4, 3, 2]: 0, 0
    exp_recall = (1.0 + 1.0 + 0.0) / 3
    exp_ndcg = (1.5 / (1.0 + 1.0 / L2(3)) + 1.0 + 0.0) / 3
    assert res["recall"] == pytest.approx(exp_recall)
    assert res["ndcg"] == pytest.approx(exp_ndcg)


def test_more_test_items_than_k_and_hit_at_second_rank():
    train = items_to_csr([np.array([], dtype=np.int64)] * 2, n_items=5)
    scores = [[5, 4, 3, 2, 1], [5, 4, 3, 2, 1]]
    test = [np.array([0, 2, 3]), np.array([1])]
    res = ranking_metrics(_fixed_scores(scores), train, test, k=2)
    # u0: top2 = [0, 1]: 1 hit of 3 -> recall 1/3; ideal DCG over min(2, 3) = 2 positions
    # u1: top2 = [0, 1]: hit at rank 1 -> recall 1, ndcg (1/log2(3)) / 1
    assert res["recall"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert res["ndcg"] == pytest.approx((1.0 / (1.0 + 1.0 / L2(3)) + 1.0 / L2(3)) / 2)


def test_train_items_excluded_even_with_top_score():
    train = items_to_csr([np.array([0, 1])], n_items=5)
    scores = [[100, 90, 1, 2, 3]]
    res = ranking_metrics(_fixed_scores(scores), train, [np.array([0, 4])], k=1)
    # 0 and 1 are excluded -> top1 = [4]: hit. recall 1/2, ndcg 1/1
    assert res["recall"] == pytest.approx(0.5)
    assert res["ndcg"] == pytest.approx(1.0)


def test_batching_does_not_change_results_and_scores_restored():
    full = np.asarray(SCORES, dtype=np.float32)
    backup = full.copy()
    calls = []

    def fn(users):
        calls.append(users.copy())
        return full[users[0] : users[0] + 1]  # a view into the caller's matrix

    a = ranking_metrics(_fixed_scores(SCORES), TRAIN, TEST, k=2, batch_users=1024)
    b = ranking_metrics(fn, TRAIN, TEST, k=2, batch_users=1)
    assert a == pytest.approx(b)
    assert [c.tolist() for c in calls] == [[0], [1], [3]]  # users without test are skipped
    np.testing.assert_array_equal(full, backup)  # views of the caller's matrix untouched


def test_read_only_scores_are_not_modified():
    full = np.asarray(SCORES, dtype=np.float32)
    full.setflags(write=False)
    # slices of a read-only array are read-only views
    res = ranking_metrics(lambda u: full[u[0] : u[0] + 1], TRAIN, TEST, k=2, batch_users=1)
    ref = ranking_metrics(_fixed_scores(SCORES), TRAIN, TEST, k=2)
    assert res == pytest.approx(ref)


def test_k_at_least_n_items():
    res = ranking_metrics(_fixed_scores(SCORES), TRAIN, TEST, k=10)
    # everything is retrieved: recall 1 for all; u0 ranks 1, 2, 3, 4 -> hits at 0 and 2
    # u1 ranks 4, ... -> hit at 0; u3 ranks 4, 3, 2, 0 (1 excluded, placed last) -> hit at 3
    exp_ndcg = (1.5 / (1 + 1 / L2(3)) + 1.0 + (1 / L2(5))) / 3
    assert res["recall"] == pytest.approx(1.0)
    assert res["ndcg"] == pytest.approx(exp_ndcg)


def test_ties_broken_by_item_id():
    train = items_to_csr([np.array([], dtype=np.int64)], n_items=5)
    scores = [[1, 1, 1, 1, 1]]
    res = ranking_metrics(_fixed_scores(scores), train, [np.array([1])], k=2)
    # ties -> ranking 0, 1, ...: hit at rank 1
    assert res["ndcg"] == pytest.approx(1 / L2(3))


def test_nan_scores_rejected_and_shape_checked():
    with pytest.raises(ValueError):
        ranking_metrics(lambda u: np.full((len(u), 5), np.nan, np.float32), TRAIN, TEST)
    with pytest.raises(ValueError):
        ranking_metrics(lambda u: np.zeros((len(u), 4), np.float32), TRAIN, TEST)


def test_no_test_users():
    res = ranking_metrics(_fixed_scores(SCORES), TRAIN, [np.array([], dtype=np.int64)] * 4)
    assert res["n_users"] == 0 and math.isnan(res["recall"])


def _reference(scores, train, test, k):
    """Plain per-user implementation of the LightGCN protocol."""
    rec, nd = [], []
    for u, t in enumerate(test):
        if len(t) == 0:
            continue
        s = np.asarray(scores[u], dtype=np.float64).copy()
        s[train[u].indices] = -np.inf
        ranking = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
        hits = [1.0 if i in set(t.tolist()) else 0.0 for i in ranking]
        rec.append(sum(hits) / len(t))
        dcg = sum(h / L2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / L2(r + 2) for r in range(min(k, len(t))))
        nd.append(dcg / idcg)
    return np.mean(rec), np.mean(nd), len(rec)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_matches_reference_on_random_data(k, monkeypatch):
    monkeypatch.setattr("recsvc.evaluate._PART_CHUNK", 2)  # exercise the chunked partition
    rng = np.random.default_rng(1)
    n_users, n_items = 23, 17
    scores = rng.integers(0, 6, size=(n_users, n_items)).astype(np.float32)  # many ties
    train = sp.csr_matrix(rng.random((n_users, n_items)) < 0.2, dtype=np.float32)
    test = []
    for u in range(n_users):
        free = np.setdiff1d(np.arange(n_items), train[u].indices)
        test.append(np.sort(rng.choice(free, size=rng.integers(0, 5), replace=False)))
    res = ranking_metrics(_fixed_scores(scores), train, test, k=k, batch_users=5)
    r, n, cnt = _reference(scores, train, test, k)
    assert res["n_users"] == cnt
    assert res["recall"] == pytest.approx(r)
    assert res["ndcg"] == pytest.approx(n)


def test_read_user_item_lines(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("0 3 1 2\n2 4\n\n3\n")
    items = read_user_item_lines(p)
    assert len(items) == 4
    assert items[0].tolist() == [1, 2, 3]
    assert items[1].tolist() == []  # missing user
    assert items[2].tolist() == [4]
    assert items[3].tolist() == []  # user with no items
    m = items_to_csr(items, n_items=6)
    assert m.shape == (4, 6)
    assert m.toarray().tolist()[0] == [0, 1, 1, 1, 0, 0]
    assert m.nnz == 4


def test_holdout_split_properties():
    rng = np.random.default_rng(0)
    counts = [1, 2, 3, 5, 10, 0, 20]
    items = [np.sort(rng.choice(50, size=c, replace=False)) for c in counts]
    m = items_to_csr(items, n_items=50)
    part, valid = holdout_split(m, fraction=0.2, seed=0)
    assert part.shape == m.shape and len(valid) == m.shape[0]
    # rounding half up, at least one held out, at least one kept (n >= 2)
    expected_hold = [0, 1, 1, 1, 2, 0, 4]
    assert [len(v) for v in valid] == expected_hold
    for u in range(len(counts)):
        kept = part[u].indices
        assert np.intersect1d(kept, valid[u]).size == 0
        np.testing.assert_array_equal(np.union1d(kept, valid[u]), items[u])
        assert np.all(np.diff(valid[u]) > 0)
    assert part.nnz + sum(expected_hold) == m.nnz
    # deterministic given the seed; another seed gives another split
    part2, valid2 = holdout_split(m, fraction=0.2, seed=0)
    assert (part2 != part).nnz == 0
    assert all(np.array_equal(a, b) for a, b in zip(valid, valid2, strict=True))
    _, valid3 = holdout_split(m, fraction=0.2, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(valid, valid3, strict=True))
    # the input is not modified
    assert m.nnz == sum(counts)


def test_holdout_split_is_roughly_uniform():
    m = items_to_csr([np.arange(5)] * 2000, n_items=5)
    _, valid = holdout_split(m, fraction=0.2, seed=3)
    freq = np.bincount(np.concatenate(valid), minlength=5) / 2000
    assert np.all(np.abs(freq - 0.2) < 0.04)
