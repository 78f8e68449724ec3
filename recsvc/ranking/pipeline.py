"""Candidates, exact scores, the mixture and the filters: one path for serving,
evaluation and tuning (see the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from recsvc.ranking.base import Scorer, UserBatch, normalise
from recsvc.ranking.knn import KnnScorer
from recsvc.ranking.popularity import PopularityScorer

N_CANDIDATES = 300  # the kNN's best items per user
N_POPULAR = 50  # the popular head, always a candidate unless seen or excluded
MASKED = -1e30  # the score of a non-candidate in dense outputs (finite: metrics need no NaN)


def normalise_usable(scores: np.ndarray, how: str, usable: np.ndarray) -> np.ndarray:
    """:func:`normalise` over the usable candidates only (seen or excluded items
    that filled a short candidate list weigh nothing)."""
    if not usable.all():
        scores = np.where(usable, scores, -np.inf if how == "softmax" else 0.0)
    return normalise(scores, how)


@dataclass
class Ranked:
    """One user's top items, best first, and which scorer contributed most to each."""

    items: np.ndarray
    scores: np.ndarray
    sources: list[str]


class RankingPipeline:
    """Ranks users by a weighted mixture of scorers over a candidate set.

    Candidates: the ``n_candidates`` best items of the kNN for the history,
    plus the ``n_popular`` most popular items, minus seen and excluded items
    (with ``restrict``: exactly the allowed items). Every scorer with a
    positive weight scores each candidate; scores are normalised per user
    (``Scorer.normalise``) and summed with ``weights``. Popularity breaks ties
    by a tiny amount, so that equal mixtures rank the better-known item first.
    """

    def __init__(
        self,
        knn: KnnScorer,
        popularity: PopularityScorer,
        scorers: Sequence[Scorer],
        weights: Mapping[str, float],
        n_candidates: int = N_CANDIDATES,
        n_popular: int = N_POPULAR,
    ):
        self.knn = knn
        self.popularity = popularity
        by_name = {s.name: s for s in scorers}
        unknown = set(weights) - set(by_name)
        if unknown:
            raise ValueError(f"no scorer for weights {sorted(unknown)}; known: {sorted(by_name)}")
        self._by_name = by_name
        self.weights = {name: float(w) for name, w in weights.items() if w > 0}
        self.scorers = [by_name[name] for name in self.weights]
        self.n_candidates = n_candidates
        self.n_popular = n_popular
        self.n_items = len(popularity.popularity)
        top = popularity.popularity.max(initial=0) + 1
        self._tie_break = popularity.popularity / top * 1e-9
        self._popular_head = popularity.order[:n_popular]
        knn.keep_columns(self._popular_head)

    def with_generator_weight(self, weight: float) -> RankingPipeline:
        """The same pipeline with the generator's share of the mixture set to
        ``weight`` (0..1) and the other weights scaled by ``1 - weight``."""
        if "generator" not in self._by_name:
            raise ValueError("this mixture has no generator")
        weights = {n: w * (1 - weight) for n, w in self.weights.items() if n != "generator"}
        weights["generator"] = weight
        return self.with_weights(weights)

    def with_weights(self, weights: Mapping[str, float]) -> RankingPipeline:
        """The same candidates and scorers, mixed with other weights."""
        return RankingPipeline(
            self.knn, self.popularity, list(self._by_name.values()), weights,
            self.n_candidates, self.n_popular,
        )  # fmt: skip

    # -- candidates -----------------------------------------------------------

    def candidates(
        self,
        batch: UserBatch,
        include_seen: bool = False,
        exclude: np.ndarray | None = None,
        restrict: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(users, C)`` candidate item indices and a mask of the usable ones.

        Without ``restrict``, a candidate is an item the kNN scores (not 0) or
        one of the popular head; one user takes a sparse path over just those
        items (what serving runs), a batch a dense one: both choose the same."""
        if restrict is None and batch.is_single:
            return self._candidates_one(batch, include_seen, exclude)
        key = self.knn.dense(batch).astype(np.float64)
        if restrict is None:
            key[key == 0] = -np.inf  # as the sparse path: only items the kNN reaches
        key[:, self._popular_head] = np.inf
        self._ban(key, batch, include_seen, exclude)
        n = self.n_candidates + self.n_popular
        if restrict is not None:
            allowed = np.zeros(self.n_items, dtype=bool)
            allowed[restrict] = True
            key[:, ~allowed] = -np.inf
            n = int(allowed.sum())
        n = max(1, min(n, self.n_items))
        if n < self.n_items:
            candidates = np.argpartition(-key, n - 1, axis=1)[:, :n]
        else:
            candidates = np.broadcast_to(np.arange(self.n_items), key.shape).copy()
        usable = np.take_along_axis(key, candidates, axis=1) > -np.inf
        return candidates.astype(np.int64), usable

    def _candidates_one(
        self, batch: UserBatch, include_seen: bool, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The dense path's choice for one user, without touching every item:
        the unseen popular head, then the kNN's best reached items (implicit's
        C++ top-k) up to the same total. Also leaves the kNN's exact scores of
        these candidates in the batch's cache."""
        assert batch.items is not None and batch.weights is not None
        items, weights = batch.items, batch.weights
        banned = np.zeros(self.n_items, dtype=bool)  # a mask: np.isin costs ~60 us a call
        if not include_seen:
            banned[items] = True
        if exclude is not None and len(exclude):
            banned[exclude] = True
        head = self._popular_head
        head_ok = ~banned[head]
        n_knn = self.n_candidates + self.n_popular - int(head_ok.sum())
        ids, scores = self.knn.top_one(items, weights, n_knn + len(items) + len(head))
        banned[head] = True  # already candidates
        keep = (scores != 0) & ~banned[ids]
        ids, scores = ids[keep][:n_knn], scores[keep][:n_knn]
        head_scores = self.knn.column_scores(items, weights)[head_ok] if len(items) else (
            np.zeros(int(head_ok.sum()))
        )  # fmt: skip
        candidates = np.concatenate([head[head_ok], ids])[None, :]
        batch.cache["knn_at"] = (candidates, np.concatenate([head_scores, scores])[None, :])
        return candidates, np.ones(candidates.shape, dtype=bool)

    def _ban(
        self, key: np.ndarray, batch: UserBatch, include_seen: bool, exclude: np.ndarray | None
    ) -> None:
        if not include_seen:
            rows = np.repeat(np.arange(len(batch)), np.diff(batch.history.indptr))
            key[rows, batch.history.indices] = -np.inf
        if exclude is not None and len(exclude):
            key[:, exclude] = -np.inf

    # -- scores ---------------------------------------------------------------

    def component_scores(
        self, batch: UserBatch, candidates: np.ndarray, usable: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each weighted scorer's normalised scores of the (usable) candidates."""
        return {
            scorer.name: normalise_usable(scorer.score(batch, candidates), scorer.normalise, usable)
            for scorer in self.scorers
        }

    def mix(
        self,
        components: Mapping[str, np.ndarray],
        candidates: np.ndarray,
        usable: np.ndarray,
        weights: Mapping[str, float] | None = None,
    ) -> np.ndarray:
        weights = self.weights if weights is None else weights
        mixed = self._tie_break[candidates].copy()
        for name, w in weights.items():
            if w > 0:
                mixed += w * components[name]
        mixed[~usable] = -np.inf
        return mixed

    # -- outputs --------------------------------------------------------------

    def rank(
        self,
        batch: UserBatch,
        k: int,
        include_seen: bool = False,
        exclude: np.ndarray | None = None,
        restrict: np.ndarray | None = None,
    ) -> Ranked:
        """The top ``k`` of one user (a batch of one)."""
        candidates, usable = self.candidates(batch, include_seen, exclude, restrict)
        components = self.component_scores(batch, candidates, usable)
        mixed = self.mix(components, candidates, usable)[0]
        n = min(k, int(np.isfinite(mixed).sum()))
        if n == 0:
            return Ranked(np.empty(0, dtype=np.int64), np.empty(0), [])
        top = np.argpartition(-mixed, n - 1)[:n]
        top = top[np.argsort(-mixed[top], kind="stable")]
        return Ranked(candidates[0, top], mixed[top], self._sources(components, top))

    def _sources(self, components: Mapping[str, np.ndarray], positions: np.ndarray) -> list[str]:
        if not self.scorers:
            return [self.popularity.source] * len(positions)
        parts = np.stack([self.weights[s.name] * components[s.name][0, positions]
                          for s in self.scorers])  # fmt: skip
        best = parts.argmax(axis=0)
        names = [s.source for s in self.scorers]
        return [names[b] if parts[b, i] > 0 else self.popularity.source
                for i, b in enumerate(best.tolist())]  # fmt: skip

    def dense_scores(self, batch: UserBatch) -> np.ndarray:
        """``(users, items)`` float32: the mixture on the candidates, ``MASKED``
        elsewhere; seen items stay candidates' non-members, as in :meth:`rank`."""
        candidates, usable = self.candidates(batch)
        mixed = self.mix(self.component_scores(batch, candidates, usable), candidates, usable)
        out = np.full((len(batch), self.n_items), MASKED, dtype=np.float32)
        np.put_along_axis(out, candidates, np.where(usable, mixed, MASKED).astype(np.float32), 1)
        return out
