"""A low-rank item-item term: GF-CF's ideal low-pass filter (Shen et al., CIKM 2021).

With ``R~ = D_u^-1/2 R D_i^-1/2`` (``R`` the binary users x items matrix, ``D``
the degrees) and ``V`` its top ``rank`` right singular vectors, a history ``x``
scores ``x D_i^-1/2 V^T V D_i^1/2``: the smooth, global part of the item graph
that a kNN of local co-occurrences misses. Stored as ``V^T`` (items x rank,
float32, largest singular value first), so any smaller rank is a prefix of it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsvc.ranking.base import UserBatch, gather_rows_dot

SOURCE = "cf"


def fit_item_factors(
    user_items: sp.csr_matrix, rank: int, seed: int = 0, power_iterations: int = 4,
    oversample: int = 32,
) -> np.ndarray:  # fmt: skip
    """``V^T`` (items x rank, float32) of the degree-normalised binary matrix.

    A randomized SVD (Halko, Martinsson & Tropp 2011: a Gaussian sketch, a few
    power iterations, then an exact SVD of the small projection). On Gowalla's
    train.txt it takes 6 s at rank 256 where ARPACK (``scipy svds``) took 19 s,
    and 14 s at rank 512 (ARPACK: 73 s); the low-rank term alone ranked
    validation items better with it (Recall@20 0.166 vs 0.162 at rank 256).
    Small matrices take the exact SVD."""
    binary = (user_items > 0).astype(np.float32).tocsr()
    user_degree = np.asarray(binary.sum(axis=1)).ravel()
    item_degree = np.asarray(binary.sum(axis=0)).ravel()
    scale_users = sp.diags(_inv_sqrt(user_degree).astype(np.float32))
    scale_items = sp.diags(_inv_sqrt(item_degree).astype(np.float32))
    normalised = (scale_users @ binary @ scale_items).tocsr()
    rank = max(1, min(rank, min(normalised.shape) - 1))
    width = rank + oversample
    if width >= min(normalised.shape) // 2:
        _, singular, vt = np.linalg.svd(normalised.toarray(), full_matrices=False)
        return np.ascontiguousarray(vt[:rank].T, dtype=np.float32)
    transposed = normalised.T.tocsr()
    sketch = np.random.default_rng(seed).standard_normal((normalised.shape[1], width))
    basis, _ = np.linalg.qr(transposed @ (normalised @ sketch.astype(np.float32)))
    for _ in range(power_iterations):
        basis, _ = np.linalg.qr(transposed @ (normalised @ basis))
    _, _, vt = np.linalg.svd(normalised @ basis, full_matrices=False)
    return np.ascontiguousarray((basis @ vt.T)[:, :rank], dtype=np.float32)


def _inv_sqrt(degree: np.ndarray) -> np.ndarray:
    return np.divide(1.0, np.sqrt(degree), out=np.zeros(len(degree)), where=degree > 0)


class LowRankScorer:
    name = "lowrank"
    source = SOURCE
    normalise = "sum"

    def __init__(self, item_factors: np.ndarray, item_degree: np.ndarray, rank: int | None = None):
        factors = item_factors if rank is None else item_factors[:, :rank]
        degree = np.asarray(item_degree, dtype=np.float64)
        self.rank = factors.shape[1]
        # x D^-1/2 V^T  and  V D^1/2, as item rows
        self.left = np.ascontiguousarray(factors * _inv_sqrt(degree)[:, None], dtype=np.float32)
        self.right = np.ascontiguousarray(factors * np.sqrt(degree)[:, None], dtype=np.float32)

    def user_vectors(self, batch: UserBatch) -> np.ndarray:
        if batch.items is not None and batch.weights is not None:  # one user
            return (batch.weights.astype(np.float32) @ self.left[batch.items])[None, :]
        return np.asarray(batch.history.astype(np.float32) @ self.left)

    def score(self, batch: UserBatch, candidates: np.ndarray) -> np.ndarray:
        return gather_rows_dot(self.user_vectors(batch), self.right, candidates)
