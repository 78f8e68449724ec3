"""The sequence model as a scorer (#11): next-item logits of the user's state at the
candidates. States come with the batch (``batch.cache["sequence_states"]``, users x dim:
serving puts the cached one there, tuning the encoded validation inputs), or from
``states_of(batch)`` when the scorer was built with one."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from recsvc.ranking.base import UserBatch, from_batch, gather_rows_dot

SOURCE = "sequence"
STATES = "sequence_states"


class SequenceScorer:
    name = "sequence"
    source = SOURCE
    normalise = "softmax"

    def __init__(
        self,
        out_weight: np.ndarray,
        states_of: Callable[[UserBatch], np.ndarray] | None = None,
    ):
        self.out_weight = out_weight  # (n_items, dim): row i scores item i
        self.states_of = states_of

    def score(self, batch: UserBatch, candidates: np.ndarray) -> np.ndarray:
        states = from_batch(batch, STATES, self.states_of,
                            "the sequence scorer needs the users' states in the batch")  # fmt: skip
        return gather_rows_dot(np.asarray(states, dtype=np.float32), self.out_weight, candidates)
