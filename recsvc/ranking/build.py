"""The served pipeline of a loaded bundle, as its manifest's ``mixture`` says."""

from __future__ import annotations

from typing import Any

from recsvc.ranking.base import Scorer
from recsvc.ranking.generator import GeneratorScorer
from recsvc.ranking.knn import KnnScorer
from recsvc.ranking.lowrank import LowRankScorer
from recsvc.ranking.pipeline import N_CANDIDATES, N_POPULAR, RankingPipeline
from recsvc.ranking.popularity import PopularityScorer


def pipeline_for(
    bundle: Any, generator: Any = None, sequence: Any = None
) -> RankingPipeline | None:
    """The tuned mixture of a :class:`~recsvc.bundle.CFBundle` (None for bundles
    trained before it existed: they serve the older blend)."""
    mixture = bundle.params.get("mixture")
    if not mixture:
        return None
    knn = KnnScorer(bundle.similarity)
    popularity = PopularityScorer(bundle.popularity)
    scorers: list[Scorer] = [knn, popularity]
    weights = dict(mixture["weights"])
    if bundle.item_factors is not None:
        degree = (bundle.user_items > 0).sum(axis=0).A1
        scorers.append(LowRankScorer(bundle.item_factors, degree, mixture.get("rank")))
    elif weights.get("lowrank", 0) > 0:
        raise ValueError("the mixture weighs a low-rank term but the bundle has no factors")
    if generator is not None:  # also when unweighted: a request may ask for a share
        scorers.append(GeneratorScorer(generator))
    elif weights.get("generator", 0) > 0:
        raise ValueError("the mixture weighs the generator but the bundle has none")
    if sequence is not None:  # #11: a recsvc.sequence.SequenceModel
        scorers += sequence.scorers()
    elif weights.get("sequence", 0) > 0 or weights.get("transitions", 0) > 0:
        raise ValueError("the mixture weighs the sequence model but the bundle has none")
    return RankingPipeline(
        knn, popularity, scorers, weights,
        n_candidates=int(mixture.get("n_candidates", N_CANDIDATES)),
        n_popular=int(mixture.get("n_popular", N_POPULAR)),
    )  # fmt: skip
