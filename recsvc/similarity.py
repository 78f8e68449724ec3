"""Fitting and querying the item-item cosine model.

The similarity matrix ``S`` (items x items, CSR, float32) keeps the top-K
neighbours of each item in its row, without the item itself. A user with
history weights ``x`` (a sparse vector over items) scores ``x @ S``: items
similar to what the user touched, weighted by how strongly they touched it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from implicit.nearest_neighbours import CosineRecommender
from implicit.utils import ParameterWarning

from recsvc.bundle import CFBundle


def fit_cosine(
    user_items: sp.csr_matrix,
    neighbours: int = 200,
    num_threads: int = 0,
    show_progress: bool = False,
) -> sp.csr_matrix:
    """Item-item cosine similarity with the top ``neighbours`` per item.

    Uses ``implicit``'s CosineRecommender, whose K counts the item itself and
    whose matrix keeps the diagonal: we ask for one more and drop the diagonal.
    """
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    model = CosineRecommender(K=neighbours + 1, num_threads=num_threads)
    with warnings.catch_warnings():  # implicit converts internally and warns about it
        warnings.simplefilter("ignore", ParameterWarning)
        model.fit(sp.csr_matrix(user_items, dtype=np.float32), show_progress=show_progress)
    similarity = sp.csr_matrix(model.similarity, dtype=np.float32)
    similarity.setdiag(0)
    similarity.eliminate_zeros()
    return keep_top_k_per_row(similarity, neighbours)


# The starting point of the search that ``recsvc train`` runs on its own validation split
# (``recsvc.ranking.knn_search``), and what ``fit_normalised_knn`` does without one. Found on a
# validation split carved from Gowalla's train.txt (benchmarks/cf_tuning.py): test Recall@20
# 0.1866 / NDCG@20 0.1527, against 0.111 / 0.079 for plain cosine. mass=0.85
# (benchmarks/prune_mass.py) keeps 68% of the entries for 0.3% of validation Recall@20:
# serving cost follows the entries a history touches.
TUNED_KNN = {
    "alpha": 0.25, "a": 0.65, "shrink": 5.0, "power": 1.75, "beta": -0.15, "rownorm": True,
    "mass": 0.85,
}  # fmt: skip


def _power(values: np.ndarray, exponent: float) -> np.ndarray:
    """``values ** exponent`` where positive, 0 elsewhere (no division by zero)."""
    out = np.zeros(values.shape, dtype=np.float64)
    positive = values > 0
    out[positive] = np.power(values[positive].astype(np.float64), exponent)
    return out


def fit_normalised_knn(
    user_items: sp.csr_matrix,
    neighbours: int = 100,
    alpha: float = 0.25,
    a: float = 0.65,
    shrink: float = 5.0,
    power: float = 1.75,
    beta: float = -0.15,
    rownorm: bool = True,
    mass: float = 1.0,
) -> sp.csr_matrix:
    """Item-item kNN with the normalisations that matter, generalising cosine.

    With R the users x items matrix and d_u, d_i user and item degrees:

    * ``W = D_u^-alpha R``: heavy users count less;
    * ``C = W^T W`` without its diagonal (weighted co-occurrence);
    * ``S_ij = (C_ij / (d_i^a d_j^(1-a) + shrink)) ** power``: asymmetric cosine
      with shrinkage, sharpened;
    * the top ``neighbours`` per row, then ``S_ij *= d_j^-beta`` (beta < 0
      favours popular candidates a little) and, with ``rownorm``, each row scaled
      to sum to 1 (every history item gets the same say);
    * with ``mass`` < 1, each row keeps only its largest entries that together
      hold that share of the row's total (``keep_row_mass``), not renormalised.

    Plain cosine is ``alpha=0, a=0.5, shrink=0, power=1, beta=0, rownorm=False``.
    The three stages are separate functions so that a parameter search refits
    only the stages its parameters change.
    """
    cooc, item_degree = cooccurrence(user_items, alpha, keep=(neighbours, [(a, shrink)]))
    neighbourhoods = select_neighbours(cooc, item_degree, neighbours, a, shrink)
    return reweight_neighbours(neighbourhoods, item_degree, power, beta, rownorm, mass)


# Above this many multiply-adds in ``W^T W`` (sum of squared user degrees) the product
# is computed in row blocks and pruned as it goes (``cooccurrence``'s ``keep``): the
# whole product of a 10x-Gowalla log (300k users, 400k items, 8M interactions) passed
# 12 GB before its first block could finish.
BLOCKED_ABOVE = 400_000_000
BLOCK_PRODUCTS = 40_000_000  # multiply-adds per block (bounds a block's entries)


def is_large(user_items: sp.csr_matrix) -> bool:
    """Is the co-occurrence product of this log past :data:`BLOCKED_ABOVE` (computed
    by blocks and pruned when :func:`cooccurrence` is given ``keep``)?"""
    user_degree = np.diff(sp.csr_matrix(user_items).indptr).astype(np.float64)
    return float(np.square(user_degree).sum()) > BLOCKED_ABOVE


def cooccurrence(
    user_items: sp.csr_matrix,
    alpha: float,
    keep: tuple[int, Sequence[tuple[float, float]]] | None = None,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``C = W^T W`` without its diagonal, ``W = D_u^-alpha R``; and the item degrees.

    ``keep = (neighbours, [(a, shrink), ...])``: when the product is large
    (:data:`BLOCKED_ABOVE`), it is computed a block of rows at a time and each row
    keeps only its entries among the top ``neighbours`` of some listed (a, shrink)
    normalisation, so :func:`select_neighbours` with any of those settings gives
    what it would on the whole product, in bounded memory."""
    matrix = sp.csr_matrix(user_items, dtype=np.float32)
    user_degree = np.diff(matrix.indptr).astype(np.float64)
    item_degree = np.bincount(matrix.indices, minlength=matrix.shape[1]).astype(np.float64)
    weighted = (sp.diags(_power(user_degree, -alpha).astype(np.float32)) @ matrix).tocsr()
    if keep is not None and is_large(matrix):
        return _pruned_cooccurrence(weighted, user_degree, item_degree, *keep), item_degree
    cooc = (weighted.T @ weighted).tocsr()
    cooc.setdiag(0)
    cooc.eliminate_zeros()
    cooc.sort_indices()
    return cooc, item_degree


def _pruned_cooccurrence(
    weighted: sp.csr_matrix,
    user_degree: np.ndarray,
    item_degree: np.ndarray,
    neighbours: int,
    settings: Sequence[tuple[float, float]],
) -> sp.csr_matrix:
    """``W^T W`` by blocks of rows, each row pruned to the union of its top
    ``neighbours`` under each (a, shrink) of ``settings`` (see :func:`cooccurrence`)."""
    transposed = weighted.T.tocsr()  # items x users
    # multiply-adds of each row of the product: the degrees of the item's users
    row_products = transposed.astype(bool).astype(np.float64) @ user_degree
    edges = np.searchsorted(np.cumsum(row_products), np.arange(BLOCK_PRODUCTS,
                            row_products.sum() + BLOCK_PRODUCTS, BLOCK_PRODUCTS))  # fmt: skip
    bounds = np.unique(np.concatenate([[0], np.minimum(edges + 1, len(row_products))]))
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        block = (transposed[start:end] @ weighted).tocsr()
        block.setdiag(0, k=int(start))
        block.eliminate_zeros()
        parts.append(_keep_union_of_tops(block, int(start), item_degree, neighbours, settings))
    cooc = sp.vstack(parts, format="csr")
    cooc.sort_indices()
    return cooc


def _keep_union_of_tops(
    block: sp.csr_matrix,
    first_row: int,
    item_degree: np.ndarray,
    neighbours: int,
    settings: Sequence[tuple[float, float]],
) -> sp.csr_matrix:
    """``block`` (rows ``first_row...`` of C) with, per row, only the entries among
    its top ``neighbours`` by ``C_ij / (d_i^a d_j^(1-a) + shrink)`` for some setting."""
    lengths = np.diff(block.indptr)
    keep = np.zeros(block.nnz, dtype=bool)
    long_rows = np.flatnonzero(lengths > neighbours)
    short = np.repeat(lengths <= neighbours, lengths)
    keep[short] = True  # rows that short are kept whole
    column_factor = {a: _power(item_degree, 1 - a)[block.indices] for a, _ in settings}
    for row in long_rows:
        lo, hi = block.indptr[row], block.indptr[row + 1]
        values = block.data[lo:hi]
        n_drop = hi - lo - neighbours
        d_i = item_degree[first_row + row]
        for a, shrink in settings:
            # the same float32 values select_neighbours ranks
            score = (values / (d_i**a * column_factor[a][lo:hi] + shrink)).astype(np.float32)
            keep[lo + np.argpartition(score, n_drop)[n_drop:]] = True
    row_of = np.repeat(np.arange(block.shape[0]), lengths)
    kept_per_row = np.bincount(row_of[keep], minlength=block.shape[0])
    indptr = np.concatenate([[0], np.cumsum(kept_per_row)])
    return sp.csr_matrix((block.data[keep], block.indices[keep], indptr), shape=block.shape)


def select_neighbours(
    cooc: sp.csr_matrix, item_degree: np.ndarray, neighbours: int, a: float, shrink: float
) -> sp.csr_matrix:
    """The top ``neighbours`` of each row by ``C_ij / (d_i^a d_j^(1-a) + shrink)``, those values.

    ``power``, ``beta`` and ``rownorm`` do not change which neighbours are kept (a positive
    power is monotone; beta and rownorm apply after the cut), so they are left to
    :func:`reweight_neighbours`."""
    rows = np.repeat(np.arange(cooc.shape[0]), np.diff(cooc.indptr))
    denominator = _power(item_degree, a)[rows] * _power(item_degree, 1 - a)[cooc.indices] + shrink
    data = np.divide(cooc.data, denominator, out=np.zeros(cooc.nnz), where=denominator > 0)
    return keep_top_k_per_row(
        sp.csr_matrix((data.astype(np.float32), cooc.indices, cooc.indptr), shape=cooc.shape),
        neighbours,
    )


def reweight_neighbours(
    neighbourhoods: sp.csr_matrix,
    item_degree: np.ndarray,
    power: float,
    beta: float,
    rownorm: bool,
    mass: float = 1.0,
) -> sp.csr_matrix:
    """The kNN matrix from :func:`select_neighbours`' output (see :func:`fit_normalised_knn`)."""
    similarity = sp.csr_matrix(neighbourhoods, copy=True)
    if power != 1.0:
        similarity.data = _power(similarity.data, power).astype(np.float32)
    if beta:
        similarity = (similarity @ sp.diags(_power(item_degree, -beta).astype(np.float32))).tocsr()
    if rownorm:
        sums = np.asarray(similarity.sum(axis=1)).ravel()
        inverse = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
        similarity = (sp.diags(inverse.astype(np.float32)) @ similarity).tocsr()
    similarity.eliminate_zeros()
    if mass < 1.0:
        return keep_row_mass(similarity, mass)
    similarity.sort_indices()
    return similarity


def _largest_first(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Each stored entry's row, and the entries' order by row, largest value first
    within a row."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    return rows, np.lexsort((-matrix.data, rows))


def _entries(matrix: sp.csr_matrix, rows: np.ndarray, keep: np.ndarray) -> sp.csr_matrix:
    """A CSR matrix of ``matrix``'s shape with only the entries at positions ``keep``."""
    kept = sp.csr_matrix(
        (matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape
    )
    kept.sort_indices()
    return kept


def keep_top_k_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """A copy of ``matrix`` with only the ``k`` largest entries of each row, sorted indices.

    One ``argpartition`` per row longer than ``k``: a training-time loop over rows,
    linear in each row, where a global sort of every entry (the earlier version) cost
    O(nnz log nnz): on a Gowalla co-occurrence matrix (36M entries) 2 s against 127 s,
    timed side by side on a loaded machine."""
    matrix = sp.csr_matrix(matrix)
    indptr, data = matrix.indptr, matrix.data
    lengths = np.diff(indptr)
    keep = np.ones(matrix.nnz, dtype=bool)
    for row in np.flatnonzero(lengths > k):
        start, end = indptr[row], indptr[row + 1]
        n_drop = end - start - k
        keep[start + np.argpartition(data[start:end], n_drop)[:n_drop]] = False
    indptr_kept = np.concatenate([[0], np.cumsum(np.minimum(lengths, k))])
    kept = sp.csr_matrix((data[keep], matrix.indices[keep], indptr_kept), shape=matrix.shape)
    kept.sort_indices()
    return kept


def keep_row_mass(matrix: sp.csr_matrix, mass: float) -> sp.csr_matrix:
    """A copy of ``matrix`` (non-negative) keeping, in each row, the fewest largest
    entries whose sum reaches ``mass`` times the row's sum; sorted indices."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    matrix = sp.csr_matrix(matrix)
    lengths = np.diff(matrix.indptr)
    rows, order = _largest_first(matrix)
    values = matrix.data[order].astype(np.float64)
    # running sums from the start of the matrix; a row's own are those minus its start
    running = np.concatenate([[0.0], np.cumsum(values)])
    at_row_start = running[matrix.indptr]
    before = running[:-1] - np.repeat(at_row_start[:-1], lengths)
    row_total = np.repeat(np.diff(at_row_start), lengths)
    return _entries(matrix, rows, order[before < mass * row_total])


def gather_rows(
    matrix: sp.csr_matrix, rows: np.ndarray, row_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and weighted values of the given rows, concatenated.

    The vectorised core of ``row_weights @ matrix[rows]`` without building a
    sparse submatrix.
    """
    starts = matrix.indptr[rows]
    lengths = matrix.indptr[rows + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float64)
    # position of every gathered entry: start of its row + offset within the row
    row_of_entry = np.repeat(np.arange(len(rows)), lengths)
    first_entry = np.cumsum(lengths) - lengths
    positions = starts[row_of_entry] + (np.arange(total) - first_entry[row_of_entry])
    values = matrix.data[positions] * row_weights[row_of_entry]
    return matrix.indices[positions], values


def score_history(similarity: sp.csr_matrix, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Dense scores over all items (float64) for one history: ``weights @ S[items]``."""
    cols, values = gather_rows(similarity, items, weights.astype(np.float64))
    return np.bincount(cols, weights=values, minlength=similarity.shape[1])


def top_k_row(similarity: sp.csr_matrix, item: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar items to ``item`` and their similarities, best first."""
    start, end = similarity.indptr[item], similarity.indptr[item + 1]
    cols, values = similarity.indices[start:end], similarity.data[start:end]
    order = np.argsort(-values, kind="stable")[:k]
    return cols[order], values[order]


class CFModel:
    """The loaded item-item model: scores a user's history, finds similar items.

    Works on dense item indices; mapping external ids is the caller's job. The
    top-k of a history is computed by ``implicit``'s C++ scorer (about twice
    as fast as scoring all items in numpy); a ``restrict`` list takes the numpy
    path, which scores every item once and picks from the list.
    """

    def __init__(self, bundle: CFBundle):
        from implicit._nearest_neighbours import NearestNeighboursScorer

        self.bundle = bundle
        self.users = bundle.users
        self.items = bundle.items
        self.model_version = bundle.model_version
        # feedback up to this time is in the training data (0: unknown)
        self.data_until_ms = int(bundle.params.get("data_until_ms", 0))
        self._scorer = NearestNeighboursScorer(bundle.similarity)
        self._user_items = bundle.user_items
        self.params = bundle.params
        self.generator: Any = None  # a recsvc.generate.GeneratorModel, set by the loader
        self.pipeline: Any = None  # a recsvc.ranking.RankingPipeline, set by the loader
        self.sequence: Any = None  # a recsvc.sequence.SequenceModel, set by the loader (#11)
        self.popularity = bundle.popularity.astype(np.float64)
        self.popularity_order = np.argsort(-self.popularity, kind="stable")
        self._popularity_tie_break = (
            self.popularity / (self.popularity.max(initial=0) + 1) * 1e-6
        ).astype(np.float32)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def training_history(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        """Item indices and weights the user had in training (empty if unknown)."""
        row = self.users.get(user)
        if row < 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        start, end = self._user_items.indptr[row], self._user_items.indptr[row + 1]
        return (
            self._user_items.indices[start:end].astype(np.int64),
            self._user_items.data[start:end].astype(np.float64),
        )

    def training_weight(self, user: str, item: int) -> float:
        """The user's training weight for one item (0 if none)."""
        row = self.users.get(user)
        if row < 0:
            return 0.0
        start, end = self._user_items.indptr[row], self._user_items.indptr[row + 1]
        cols = self._user_items.indices[start:end]
        pos = int(np.searchsorted(cols, item))
        return (
            float(self._user_items.data[start + pos])
            if pos < len(cols) and cols[pos] == item
            else 0.0
        )

    def recommend(
        self,
        items: np.ndarray,
        weights: np.ndarray,
        k: int,
        exclude: np.ndarray | None = None,
        restrict: np.ndarray | None = None,
        include_seen: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` items with a positive CF score for a history, best first.

        ``items``/``weights``: the history (unique indices). Items in the history
        are left out unless ``include_seen``; so are ``exclude``; with
        ``restrict``, only those items are candidates.
        """
        if len(items) == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        if restrict is not None:
            scores = score_history(self.bundle.similarity, items, weights)
            candidates = restrict
            banned = [] if include_seen else [items]
            if exclude is not None:
                banned.append(exclude)
            if banned:
                candidates = candidates[~np.isin(candidates, np.concatenate(banned))]
            candidate_scores = scores[candidates]
            positive = candidate_scores > 0
            candidates, candidate_scores = candidates[positive], candidate_scores[positive]
            if len(candidates) > k:
                top = np.argpartition(-candidate_scores, k - 1)[:k]
                candidates, candidate_scores = candidates[top], candidate_scores[top]
            order = np.argsort(-candidate_scores, kind="stable")
            return candidates[order].astype(np.int64), candidate_scores[order]

        n_excluded = 0 if exclude is None else len(exclude)
        ids, scores = self._scorer.recommend(
            np.array([0, len(items)], dtype=np.int32),
            items.astype(np.int32),
            weights.astype(np.float32),
            K=k + n_excluded,
            remove_own_likes=not include_seen,
        )
        keep = scores > 0
        if n_excluded:
            keep &= ~np.isin(ids, exclude)
        return ids[keep][:k].astype(np.int64), scores[keep][:k]

    def popular(self, n: int, banned: np.ndarray, restrict: np.ndarray | None = None) -> np.ndarray:
        """The ``n`` most popular items not in ``banned`` (from ``restrict`` if given)."""
        if restrict is None:
            order = self.popularity_order
        else:
            order = restrict[np.argsort(-self.popularity[restrict], kind="stable")]
        head = order[: n + len(banned)]
        return head[~np.isin(head, banned)][:n]

    def score_history_dense(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """CF scores of one history over every item (float64)."""
        return score_history(self.bundle.similarity, items, weights)

    def score_users(self, history: sp.csr_matrix) -> np.ndarray:
        """Dense scores (users x items, float32) for a batch of histories, ranked as
        ``recommend`` then ``popular`` rank them: CF score first, popularity
        breaking ties (and ordering the items CF cannot score)."""
        scores = (history @ self.bundle.similarity).toarray().astype(np.float32)
        scores += self._popularity_tie_break
        return scores

    def similar_items(self, item: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_k_row(self.bundle.similarity, item, k)
