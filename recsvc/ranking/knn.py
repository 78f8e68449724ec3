"""The item kNN scorer: ``score(u, j) = sum_i x_ui S_ij`` over the user's history.

It also proposes the candidates: its top items for the history."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsvc.ranking.base import UserBatch

SOURCE = "cf"


class KnnScorer:
    name = "knn"
    source = SOURCE
    normalise = "sum"

    def __init__(self, similarity: sp.csr_matrix):
        from implicit._nearest_neighbours import NearestNeighboursScorer

        # the bundle's matrix is float32 CSR already: no second copy at load
        self.similarity = similarity.astype(np.float32, copy=False).tocsr()
        self._scorer = NearestNeighboursScorer(self.similarity)  # implicit's C++ top-k
        self._columns = np.empty(0, dtype=np.int64)
        self._column_values = np.empty((self.similarity.shape[0], 0), dtype=np.float32)

    def keep_columns(self, columns: np.ndarray) -> None:
        """Keep dense copies of a few columns (the popular head) for
        :meth:`column_scores`."""
        columns = np.asarray(columns, dtype=np.int64)
        if not np.array_equal(columns, self._columns):
            self._column_values = self.similarity[:, columns].toarray()
            self._columns = columns

    def top_one(
        self, items: np.ndarray, weights: np.ndarray, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best items (of those the history reaches) and their scores, for
        one user, best first; the history's own items may be among them."""
        if len(items) == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        ids, scores = self._scorer.recommend(
            np.array([0, len(items)], dtype=np.int32), items.astype(np.int32),
            weights.astype(np.float32), K=n, remove_own_likes=False,
        )  # fmt: skip
        return ids.astype(np.int64), scores.astype(np.float64)

    def column_scores(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """One user's exact scores of the columns given at construction."""
        return weights @ self._column_values[items].astype(np.float64)

    def sparse_row(self, batch: UserBatch) -> sp.csr_matrix:
        """Scores of the items the history reaches (sparse), computed once per batch;
        negative weights (dislikes) push their neighbours down."""
        if "knn_sparse" not in batch.cache:
            batch.cache["knn_sparse"] = batch.history.astype(np.float32) @ self.similarity
        return batch.cache["knn_sparse"]  # type: ignore[no-any-return]

    def dense(self, batch: UserBatch) -> np.ndarray:
        """Scores over every item ``(users, items)``, computed once per batch."""
        if "knn" not in batch.cache:
            batch.cache["knn"] = self.sparse_row(batch).toarray()
        return batch.cache["knn"]  # type: ignore[no-any-return]

    def score(self, batch: UserBatch, candidates: np.ndarray) -> np.ndarray:
        known = batch.cache.get("knn_at")  # set by the one-user candidate path
        if known is not None and known[0] is candidates:
            return known[1]  # type: ignore[no-any-return]
        return np.take_along_axis(self.dense(batch), candidates, axis=1).astype(np.float64)
