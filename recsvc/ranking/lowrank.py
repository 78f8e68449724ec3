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
from scipy.sparse.linalg import svds

from recsvc.ranking.base import UserBatch, gather_rows_dot

SOURCE = "cf"


def fit_item_factors(user_items: sp.csr_matrix, rank: int, seed: int = 0) -> np.ndarray:
    """``V^T`` (items x rank, float32) of the degree-normalised binary matrix."""
    binary = (user_items > 0).astype(np.float64).tocsr()
    user_degree = np.asarray(binary.sum(axis=1)).ravel()
    item_degree = np.asarray(binary.sum(axis=0)).ravel()
    normalised = sp.diags(_inv_sqrt(user_degree)) @ binary @ sp.diags(_inv_sqrt(item_degree))
    rank = max(1, min(rank, min(normalised.shape) - 1))
    v0 = np.random.default_rng(seed).random(min(normalised.shape))
    _, singular, vt = svds(normalised, k=rank, v0=v0)
    order = np.argsort(-singular)
    return np.ascontiguousarray(vt[order].T, dtype=np.float32)


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
        if batch.is_single:
            return (batch.weights.astype(np.float32) @ self.left[batch.items])[None, :]
        return np.asarray(batch.history.astype(np.float32) @ self.left)

    def score(self, batch: UserBatch, candidates: np.ndarray) -> np.ndarray:
        return gather_rows_dot(self.user_vectors(batch), self.right, candidates)
