"""Choosing the kNN's normalisation on the validation split that ``recsvc train`` carves.

The parameters of :func:`recsvc.similarity.fit_normalised_knn` were first found on
Gowalla. A dataset with other degree distributions (longer sessions, a flatter
catalogue) wants other values, so ``recsvc train`` searches them again on its own
validation split, starting from those values, within a time budget:

* coordinate ascent, one parameter at a time over a short grid, keeping a value only
  if it raises NDCG@20 of the kNN alone (full ranking, training items excluded) on
  a sample of validation users without lowering Recall@20. A random holdout favours
  sharper, more local similarities than a real future does (docs: the validation
  trap); on Gowalla a change that raised validation NDCG while lowering its recall
  (power 2.5) lost 0.004 of test NDCG, so a change must win on both;
* the cheap parameters first (``power``, ``beta``, ``rownorm`` only reweight the
  kept neighbours), then those that change which neighbours are kept (``a``,
  ``shrink``: a new top-k cut; ``alpha``: a new co-occurrence product), each cached;
* when the budget runs out the best setting so far is kept, so a small budget only
  means a shorter search, never a worse model than the starting point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.evaluate import ranking_metrics
from recsvc.similarity import (
    TUNED_KNN,
    cooccurrence,
    is_large,
    reweight_neighbours,
    select_neighbours,
)

log = logging.getLogger(__name__)

# Each parameter's grid; the search also always tries the starting value.
GRID: dict[str, tuple[Any, ...]] = {
    "power": (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0),
    "beta": (-0.3, -0.15, 0.0, 0.15, 0.3),
    "rownorm": (True, False),
    "a": (0.5, 0.65, 0.8),
    "shrink": (0.0, 5.0, 20.0),
    "alpha": (0.0, 0.25, 0.5),
}
ORDER = ("power", "beta", "rownorm", "a", "shrink", "alpha")


@dataclass
class KnnChoice:
    params: dict[str, Any]  # fit_normalised_knn's keyword arguments, mass included
    metrics: dict[str, float]  # of the chosen setting on the validation users
    start_metrics: dict[str, float]  # of the starting setting
    tried: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = True  # False: the budget ran out before every parameter was tried


def search_knn(
    fit_part: sp.csr_matrix,
    valid: Sequence[np.ndarray],
    neighbours: int,
    budget_s: float = 90.0,
    n_users: int = 6000,
    start: dict[str, Any] | None = None,
    seed: int = 0,
    k: int = 20,
) -> KnnChoice:
    """The kNN parameters that maximise NDCG@k of the kNN alone on ``valid``.

    ``fit_part`` (users x items) is what the kNN is fitted on; ``valid[u]`` the
    held-out items of user ``u``. ``mass`` (serving-time pruning) is not searched:
    it is kept from ``start``."""
    started = time.perf_counter()
    params = dict(start or TUNED_KNN)
    fit_part = sp.csr_matrix(fit_part, dtype=np.float32)
    users = np.flatnonzero([len(v) > 0 for v in valid])
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(users, size=min(len(users), n_users), replace=False))
    sample_valid: list[np.ndarray] = [np.empty(0, np.int64)] * fit_part.shape[0]
    for user in users:
        sample_valid[user] = valid[user]
    history = fit_part[users]
    if len(users) == 0:  # nothing held out: nothing to choose on
        nothing = {"recall": float("nan"), "ndcg": float("nan")}
        return KnnChoice(params, nothing, nothing, complete=False)

    item_degree = np.bincount(fit_part.indices, minlength=fit_part.shape[1]).astype(np.float64)
    # A large product is computed by blocks and pruned to what the (a, shrink) settings
    # the search may try can keep. Past BLOCKED_ABOVE each setting costs a pass over
    # every block and each alpha a new product, so there only the parameters that
    # reweight the kept neighbours are searched; a, shrink and alpha keep their start.
    order = ORDER
    settings = [(a, shrink) for a in {*GRID["a"], params["a"]}
                for shrink in {*GRID["shrink"], params["shrink"]}]  # fmt: skip
    if is_large(fit_part):
        order = tuple(n for n in ORDER if n not in ("a", "shrink", "alpha"))
        settings = [(params["a"], params["shrink"])]
        log.info("knn search: a large log; searching %s only", ", ".join(order))
    keep = (neighbours, sorted(settings))
    cooc_of: dict[float, sp.csr_matrix] = {}  # one co-occurrence matrix in memory at a time
    cut_of: dict[tuple[float, float, float], sp.csr_matrix] = {}

    def similarity(p: dict[str, Any]) -> sp.csr_matrix:
        key = (p["alpha"], p["a"], p["shrink"])
        if key not in cut_of:
            if p["alpha"] not in cooc_of:
                cooc_of.clear()
                cooc_of[p["alpha"]] = cooccurrence(fit_part, p["alpha"], keep=keep)[0]
            cut_of[key] = select_neighbours(
                cooc_of[p["alpha"]], item_degree, neighbours, p["a"], p["shrink"]
            )
        return reweight_neighbours(cut_of[key], item_degree, p["power"], p["beta"], p["rownorm"])

    def evaluate(p: dict[str, Any]) -> dict[str, float]:
        scores = (history @ similarity(p)).tocsr()

        def scores_fn(batch: np.ndarray) -> np.ndarray:
            return scores[np.searchsorted(users, batch)].toarray()

        got = ranking_metrics(scores_fn, fit_part, sample_valid, k=k, batch_users=1024)
        return {"recall": round(got["recall"], 5), "ndcg": round(got["ndcg"], 5)}

    best = evaluate(params)
    choice = KnnChoice(dict(params), best, dict(best))
    choice.tried.append({**_searched(params), **best})
    log.info("knn search: start %s -> %s", _searched(params), best)
    for name in order:
        for value in GRID[name]:
            if value == params[name]:
                continue
            if time.perf_counter() - started > budget_s:
                choice.complete = False
                break
            trial = {**params, name: value}
            got = evaluate(trial)
            choice.tried.append({**_searched(trial), **got})
            if got["ndcg"] > best["ndcg"] and got["recall"] >= best["recall"]:
                best, params = got, trial
                log.info("knn search: %s=%s -> %s", name, value, got)
        if not choice.complete:
            break
        # cuts of other (a, shrink) settings at this alpha are no longer needed
        kept = (params["alpha"], params["a"], params["shrink"])
        for key in [key for key in cut_of if key != kept]:
            del cut_of[key]
    choice.params, choice.metrics = params, best
    choice.seconds = round(time.perf_counter() - started, 1)
    log.info(
        "knn search: chose %s (validation %s, start %s) in %.1fs%s",
        _searched(params), best, choice.start_metrics, choice.seconds,
        "" if choice.complete else " (budget reached)",
    )  # fmt: skip
    return choice


def _searched(params: dict[str, Any]) -> dict[str, Any]:
    return {name: params[name] for name in ORDER}
