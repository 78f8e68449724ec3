"""The generator (Mult-VAE) as a scorer: its logits for the candidates.

The per-user part (the decoder's hidden layer, from the latent mean) is small;
only the candidates' output rows are multiplied, never the whole catalogue."""

from __future__ import annotations

from typing import Any

import numpy as np

from recsvc.ranking.base import UserBatch, gather_rows_dot

SOURCE = "generator"


class GeneratorScorer:
    name = "generator"
    source = SOURCE
    normalise = "softmax"

    def __init__(self, generator: Any):  # a recsvc.generate.GeneratorModel
        self.generator = generator
        runtime = generator.runtime
        self.out_weight = runtime.Wout
        self.out_bias = runtime.bout.astype(np.float64)

    def latents(self, batch: UserBatch) -> np.ndarray:
        if batch.latents is None:
            batch.latents = self.generator.batch_latents(batch.history)
        return batch.latents

    def score(self, batch: UserBatch, candidates: np.ndarray) -> np.ndarray:
        hidden = self.generator.runtime.decoder_hidden(self.latents(batch)).reshape(
            len(candidates), -1
        )
        return gather_rows_dot(hidden, self.out_weight, candidates) + self.out_bias[candidates]
