"""The ranking pipeline: candidates, scorers on candidates, a tuned mixture, filters.

One code path ranks for ``recsvc serve`` (one user per call), ``recsvc eval``
and the mixture tuning inside ``recsvc train`` (batches of users), so what is
evaluated is exactly what is served:

1. candidates: the item kNN's top items for the user's history, plus the most
   popular items (``RankingPipeline.candidates``);
2. every scorer of the mixture scores those candidates exactly
   (:class:`~recsvc.ranking.base.Scorer`, one module per scorer);
3. each scorer's scores are normalised per user over the candidates and mixed
   with weights chosen on a validation split (:mod:`recsvc.ranking.mixture`);
4. seen, excluded and non-restricted items are filtered, the top k returned.

Nothing here knows gRPC or Redis.
"""

from recsvc.ranking.base import Scorer, UserBatch
from recsvc.ranking.pipeline import Ranked, RankingPipeline

__all__ = ["Ranked", "RankingPipeline", "Scorer", "UserBatch"]
