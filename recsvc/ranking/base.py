"""The scorer interface and the batch of users it scores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp


class UserBatch:
    """Users to rank: their merged histories (training + feedback) as a
    ``(users, items)`` CSR matrix of summed weights, and what callers already
    hold for them (``latents``: the generator's per-user means, e.g. from the
    serving cache). ``cache`` holds per-batch work shared between scorers.

    A batch of one (:meth:`single`, what serving builds) also keeps the history
    as plain arrays, ``items`` and ``weights``: the scorers' one-user paths use
    them, and the CSR matrix is only built if something asks for it."""

    def __init__(
        self,
        history: sp.csr_matrix | None = None,
        latents: np.ndarray | None = None,
        *,
        items: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        n_items: int = 0,
    ):
        self._history = history
        self.latents = latents
        self.items = items
        self.weights = weights
        self.n_items = n_items if history is None else history.shape[1]
        self.cache: dict[str, Any] = {}

    @classmethod
    def single(
        cls, items: np.ndarray, weights: np.ndarray, n_items: int, latent: np.ndarray | None = None
    ) -> UserBatch:
        """One user from unique item indices and their weights."""
        return cls(
            None, None if latent is None else latent[None, :],
            items=np.asarray(items, dtype=np.int64), weights=np.asarray(weights, np.float64),
            n_items=n_items,
        )  # fmt: skip

    @property
    def history(self) -> sp.csr_matrix:
        if self._history is None:
            assert self.items is not None and self.weights is not None
            self._history = sp.csr_matrix(
                (self.weights.astype(np.float32), self.items.astype(np.int32),
                 np.array([0, len(self.items)])),
                shape=(1, self.n_items),
            )  # fmt: skip
        return self._history

    @property
    def is_single(self) -> bool:
        return self.items is not None

    def __len__(self) -> int:
        return 1 if self.items is not None else int(self.history.shape[0])


def from_batch(
    batch: UserBatch, key: str, compute: Callable[[UserBatch], Any] | None, missing: str
) -> Any:
    """``batch.cache[key]`` (serving puts per-user inputs there), else ``compute(batch)``,
    kept in the cache for the batch's other scorers; ``missing``: the error without either."""
    found = batch.cache.get(key)
    if found is None:
        if compute is None:
            raise ValueError(missing)
        found = batch.cache[key] = compute(batch)
    return found


class Scorer(Protocol):
    """One signal of the mixture. ``score`` returns raw scores of the candidates
    ``(users, C)`` (float64); the pipeline normalises them per user as
    ``normalise`` says: ``"sum"`` (positive part divided by its sum over the
    candidates), ``"softmax"`` (a distribution over the candidates) or
    ``"none"`` (raw scores, on a scale common to all users)."""

    name: str
    source: str  # what a returned item says it came from: "cf", "generator", "popularity"
    normalise: str

    def score(self, batch: UserBatch, candidates: np.ndarray) -> np.ndarray: ...


def normalise(scores: np.ndarray, how: str) -> np.ndarray:
    """Per-row normalisation of ``(users, C)`` scores (see :class:`Scorer`)."""
    if how == "none":
        return scores
    if how == "softmax":
        top = scores.max(axis=1, keepdims=True)
        # a row whose candidates are all filtered out (-inf) stays all zero, not NaN
        probs = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
        totals = probs.sum(axis=1, keepdims=True)
        return np.divide(probs, totals, out=np.zeros_like(probs), where=totals > 0)
    if how == "sum":
        positive = np.maximum(scores, 0.0)
        totals = positive.sum(axis=1, keepdims=True)
        return np.divide(positive, totals, out=np.zeros_like(positive), where=totals > 0)
    raise ValueError(f"unknown normalisation {how!r}")


def gather_rows_dot(
    left: np.ndarray, right: np.ndarray, candidates: np.ndarray, full_above: int = 8
) -> np.ndarray:
    """``(left @ right.T)`` at the candidates: ``out[b, c] = left[b] . right[candidates[b, c]]``.

    Few users: gather the candidates' rows (C x d per user). Many users: one
    dense product over every item is cheaper than the gather's copies."""
    if len(left) == 1:  # serving: one matrix-vector product (BLAS), no einsum
        return (right[candidates[0]] @ left[0])[None, :].astype(np.float64)
    if len(left) > full_above:
        full = left @ right.T
        return np.take_along_axis(full, candidates, axis=1).astype(np.float64)
    return np.einsum("bcd,bd->bc", right[candidates], left).astype(np.float64)
