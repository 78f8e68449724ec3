"""Popularity: how many users interacted with the item in training (log-scaled)."""

from __future__ import annotations

import numpy as np

from recsvc.ranking.base import UserBatch

SOURCE = "popularity"


class PopularityScorer:
    name = "popularity"
    source = SOURCE
    normalise = "sum"

    def __init__(self, popularity: np.ndarray):
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self.log_popularity = np.log1p(self.popularity)
        self.order = np.argsort(-self.popularity, kind="stable")

    def score(self, batch: UserBatch, candidates: np.ndarray) -> np.ndarray:
        return self.log_popularity[candidates]
