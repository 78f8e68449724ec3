"""The co-occurrence product computed by blocks and pruned (large logs) keeps what
select_neighbours needs: the same neighbourhoods as the whole product, for every
(a, shrink) it was pruned for."""

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc import similarity
from recsvc.similarity import cooccurrence, select_neighbours


def random_log(seed=0, users=300, items=120):
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for u in range(users):
        n = int(rng.integers(1, 40))
        picked = rng.choice(items, size=n, replace=False, p=np.arange(items, 0, -1) / 7260)
        rows += [u] * n
        cols += picked.tolist()
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(users, items))


def row_values(matrix):
    return [sorted(np.round(matrix.data[matrix.indptr[r]:matrix.indptr[r + 1]], 5))
            for r in range(matrix.shape[0])]  # fmt: skip


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_blocks_and_pruning_keep_every_settings_neighbours(monkeypatch, alpha):
    log = random_log()
    settings = [(0.5, 0.0), (0.65, 5.0), (0.8, 20.0)]
    whole, degree = cooccurrence(log, alpha)
    monkeypatch.setattr(similarity, "BLOCKED_ABOVE", 0)
    monkeypatch.setattr(similarity, "BLOCK_PRODUCTS", 5_000)  # many blocks
    pruned, degree_too = cooccurrence(log, alpha, keep=(10, settings))
    assert np.array_equal(degree, degree_too)
    assert pruned.nnz < whole.nnz and pruned.shape == whole.shape
    assert pruned.diagonal().sum() == 0
    for a, shrink in settings:
        expected = select_neighbours(whole, degree, 10, a, shrink)
        got = select_neighbours(pruned, degree, 10, a, shrink)
        # the same values per row (which of exactly tied items is kept may differ)
        assert row_values(got) == row_values(expected)
    # a kept entry holds the whole product's value
    rows = np.repeat(np.arange(pruned.shape[0]), np.diff(pruned.indptr))
    assert np.allclose(pruned.data, np.asarray(whole[rows, pruned.indices]).ravel())
