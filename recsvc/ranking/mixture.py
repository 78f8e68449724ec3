"""Choosing the mixture on validation: scorer weights and the low-rank term's rank.

The candidates and every scorer's normalised candidate scores are computed once
for a sample of validation users; each weight setting is then only a weighted
sum and a top-k, so a full grid costs seconds. The metric is the pipeline's own
ranking (items outside the candidates are never ranked, as when serving).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from recsvc.ranking.base import Scorer, UserBatch
from recsvc.ranking.knn import KnnScorer
from recsvc.ranking.lowrank import LowRankScorer
from recsvc.ranking.pipeline import (
    N_CANDIDATES,
    N_POPULAR,
    RankingPipeline,
    normalise_usable,
)
from recsvc.ranking.popularity import PopularityScorer

log = logging.getLogger(__name__)

LOWRANK_WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
GENERATOR_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
# Fewer kNN candidates make every call cheaper. The fewest that keep validation NDCG@20
# within 0.2% (relative) of the full count's best are chosen; on Gowalla validation was
# flat from 100 to 450 candidates.
CANDIDATE_COUNTS = (100, 150, 200)
CANDIDATE_TOLERANCE = 0.002
POPULARITY_WEIGHTS = (0.0, 0.02, 0.1)
# #11: the order-aware members (the sequence model, transitions), up to "that member alone"
SEQUENCE_WEIGHTS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
# Every combination of the weights above is tried while there are at most this many (the
# Gowalla mixture: 5 ranks x 8 x 8 x 3); with more members, coordinate ascent instead
MAX_GRID = 1500
COORDINATE_ROUNDS = 3


@dataclass
class MixtureChoice:
    weights: dict[str, float]
    rank: int | None  # of the low-rank term (None: not used)
    metrics: dict[str, float]
    grid: list[dict] = field(default_factory=list)  # the best settings tried, for the manifest
    alone: dict[str, dict] = field(default_factory=dict)  # each scorer by itself
    n_candidates: int = N_CANDIDATES  # the kNN candidates each call scores


def _metrics(mixed: np.ndarray, relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> dict:
    """Recall@k and NDCG@k of the candidates' ranking (users x C) against the held-out items."""
    k = min(k, mixed.shape[1])
    top = np.argpartition(-mixed, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(mixed, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    gains = np.take_along_axis(relevant, top, axis=1).astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, k) - 1]
    recall = gains.sum(axis=1) / n_relevant
    ndcg = (gains * discounts).sum(axis=1) / ideal
    return {"recall": float(recall.mean()), "ndcg": float(ndcg.mean())}


def tune_mixture(
    knn: KnnScorer,
    popularity: PopularityScorer,
    fit_part: sp.csr_matrix,
    valid: Sequence[np.ndarray],
    item_factors: np.ndarray | None = None,
    ranks: Sequence[int] = (),
    generator: Scorer | None = None,
    n_users: int = 6000,
    k: int = 20,
    seed: int = 0,
    n_candidates: int = N_CANDIDATES,
    n_popular: int = N_POPULAR,
    sequence: Sequence[Scorer] = (),
) -> MixtureChoice:
    """The weights (kNN fixed at 1) and rank that maximise NDCG@k on ``valid``,
    with every scorer fitted on ``fit_part`` alone. ``sequence``: the order-aware
    members (each weighed from ``SEQUENCE_WEIGHTS``)."""
    users = np.flatnonzero([len(v) > 0 for v in valid])
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(users, size=min(len(users), n_users), replace=False))
    degree = np.asarray((fit_part > 0).sum(axis=0)).ravel()
    lowranks = {}
    if item_factors is not None:
        lowranks = {r: LowRankScorer(item_factors, degree, r) for r in ranks}
    base = RankingPipeline(knn, popularity, [knn], {"knn": 1.0}, n_candidates, n_popular)

    raw: dict[str, list[np.ndarray]] = {}  # before normalisation (fewer candidates renormalise)
    how: dict[str, str] = {}
    relevant_rows, candidate_rows, usable_rows = [], [], []
    for start in range(0, len(users), 1024):
        chunk = users[start : start + 1024]
        batch = UserBatch(fit_part[chunk])
        batch.cache["users"] = chunk  # rows, for scorers that keep per-user data (sequence)
        candidates, usable = base.candidates(batch)
        scorers: list[tuple[str, Scorer]] = [("knn", knn), ("popularity", popularity)]
        scorers += [(f"lowrank@{r}", s) for r, s in lowranks.items()]
        if generator is not None:
            scorers.append(("generator", generator))
        scorers += [(s.name, s) for s in sequence]
        for name, scorer in scorers:
            raw.setdefault(name, []).append(scorer.score(batch, candidates))
            how[name] = scorer.normalise
        held = [valid[u] for u in chunk.tolist()]
        relevant_rows.append(
            np.array([np.isin(c, h) for c, h in zip(candidates, held, strict=True)])
        )
        candidate_rows.append(candidates)
        usable_rows.append(usable)
    candidates = np.concatenate(candidate_rows)
    usable = np.concatenate(usable_rows)
    relevant = np.concatenate(relevant_rows) & usable
    n_relevant = np.array([len(valid[u]) for u in users.tolist()])
    tie_break = base._tie_break[candidates]
    raw_scores = {name: np.concatenate(parts) for name, parts in raw.items()}
    comp = {name: normalise_usable(r, how[name], usable) for name, r in raw_scores.items()}

    def evaluate(weights: dict[str, float]) -> dict:
        mixed = tie_break.copy()
        for name, w in weights.items():
            if w > 0:
                mixed += w * comp[name]
        mixed[~usable] = -np.inf
        return _metrics(mixed, relevant, n_relevant, k)

    alone = {name: {m: round(v, 5) for m, v in evaluate({name: 1.0}).items()} for name in comp}
    rank_options: list[int | None] = list(lowranks) or [None]
    # each member's options; the low-rank term's are (rank, weight) pairs
    options: dict[str, list] = {
        "lowrank": [(rank_options[0], 0.0)]
        + [(r, w) for r in rank_options for w in LOWRANK_WEIGHTS if w > 0 and lowranks],
        "generator": list(GENERATOR_WEIGHTS) if generator is not None else [0.0],
        "popularity": list(POPULARITY_WEIGHTS),
        **{s.name: list(SEQUENCE_WEIGHTS) for s in sequence},
    }

    def as_weights(setting: dict[str, object]) -> tuple[int | None, dict[str, float]]:
        rank, w_low = setting["lowrank"]  # type: ignore[misc]
        weights = {"knn": 1.0, "popularity": float(setting["popularity"])}  # type: ignore[arg-type]
        if rank is not None:
            weights[f"lowrank@{rank}"] = w_low
        if generator is not None:
            weights["generator"] = float(setting["generator"])  # type: ignore[arg-type]
        weights.update({s.name: float(setting[s.name]) for s in sequence})  # type: ignore[arg-type]
        return rank, weights

    tried: dict[tuple, tuple[dict, int | None, dict[str, float]]] = {}

    def score(setting: dict[str, object]) -> float:
        key = tuple(setting[name] for name in options)
        if key not in tried:
            rank, weights = as_weights(setting)
            tried[key] = (evaluate(weights), rank, weights)
        return float(tried[key][0]["ndcg"])

    names = list(options)
    if math.prod(len(o) for o in options.values()) <= MAX_GRID:
        for values in itertools.product(*options.values()):
            score(dict(zip(names, values, strict=True)))
    else:  # too many: coordinate ascent from "the kNN alone", one member at a time
        setting: dict[str, object] = {name: opts[0] for name, opts in options.items()}
        best = score(setting)
        for _ in range(COORDINATE_ROUNDS):
            moved = False
            for name in names:
                for value in options[name]:
                    trial = {**setting, name: value}
                    if score(trial) > best:
                        setting, best, moved = trial, score(trial), True
            if not moved:
                break
    results = list(tried.values())
    results.sort(key=lambda r: -r[0]["ndcg"])
    best_metrics, best_rank, best_weights = results[0]
    head = np.zeros(base.n_items, dtype=bool)
    head[base._popular_head] = True
    fewer = fewest_candidates(
        raw_scores, how, candidates, usable, head[candidates], relevant, n_relevant,
        tie_break, [ws for _, _, ws in results[:10]], best_metrics["ndcg"], n_candidates,
        n_popular, k,
    )  # fmt: skip
    n_chosen = n_candidates
    if fewer is not None:
        n_chosen, best_metrics, best_weights = fewer
        best_rank = next(r for _, r, ws in results[:10] if ws is best_weights)
    chosen = {("lowrank" if n.startswith("lowrank@") else n): w for n, w in best_weights.items()}
    grid = [
        {"rank": r, "weights": {n: w for n, w in ws.items() if w > 0},
         **{m: round(v, 5) for m, v in met.items()}}
        for met, r, ws in results[:10]
    ]  # fmt: skip
    log.info("mixture chosen on %d validation users: %s rank=%s %s",
             len(users), chosen, best_rank, best_metrics)  # fmt: skip
    uses_lowrank = chosen.get("lowrank", 0) > 0
    return MixtureChoice(
        {n: w for n, w in chosen.items() if w > 0},
        best_rank if uses_lowrank else None,
        {m: round(v, 5) for m, v in best_metrics.items()},
        grid,
        alone,
        n_chosen,
    )


def fewest_candidates(
    raw: dict[str, np.ndarray],
    how: dict[str, str],
    candidates: np.ndarray,
    usable: np.ndarray,
    in_head: np.ndarray,
    relevant: np.ndarray,
    n_relevant: np.ndarray,
    tie_break: np.ndarray,
    settings: list[dict[str, float]],
    best_ndcg: float,
    n_candidates: int,
    n_popular: int,
    k: int,
    counts: Sequence[int] = CANDIDATE_COUNTS,
    tolerance: float = CANDIDATE_TOLERANCE,
) -> tuple[int, dict, dict[str, float]] | None:
    """The fewest kNN candidates (of ``counts``) with which one of ``settings``
    keeps NDCG@k within ``tolerance`` (relative) of ``best_ndcg``:
    ``(count, its metrics, its weights)``, or None if only ``n_candidates`` does.

    Each call scores fewer candidates when fewer suffice (every scorer's cost is
    per candidate). A smaller candidate set is what the pipeline would choose with
    that count: the unseen popular head, then the kNN's best items up to the same
    total, every scorer renormalised over it."""
    knn_order = np.where(usable & ~in_head, raw["knn"], -np.inf)
    knn_rank = np.empty_like(candidates)
    np.put_along_axis(
        knn_rank, np.argsort(-knn_order, axis=1, kind="stable"),
        np.broadcast_to(np.arange(candidates.shape[1]), candidates.shape), axis=1,
    )  # fmt: skip
    head_used = (usable & in_head).sum(axis=1, keepdims=True)
    for count in counts:
        if count >= n_candidates:
            return None
        kept = usable & (in_head | (knn_rank < count + n_popular - head_used))
        best: tuple[dict, dict[str, float]] | None = None
        for weights in settings:
            mixed = tie_break.copy()
            for name, w in weights.items():
                if w > 0:
                    mixed += w * normalise_usable(raw[name], how[name], kept)
            mixed[~kept] = -np.inf
            got = _metrics(mixed, relevant & kept, n_relevant, k)
            if best is None or got["ndcg"] > best[0]["ndcg"]:
                best = (got, weights)
        assert best is not None
        if best[0]["ndcg"] >= best_ndcg * (1 - tolerance):
            log.info("mixture: %d candidates keep validation NDCG@%d at %.5f (best %.5f)",
                     count, k, best[0]["ndcg"], best_ndcg)  # fmt: skip
            return count, best[0], best[1]
    return None

