"""Serving the generator: user latents, catalogue scores, generated item content.

Wraps a trained :class:`generators.vae.GeneratorRuntime` with the catalogue's
content vocabulary. No gRPC here; the engine calls it with dense indices.

A generated item is built from the user's latent ``mu``:

1. its *content*: a few catalogue attributes sampled (temperature, seed) from
   the decoder's attribute distribution, steered by the topic (each item
   carries one of the topic's attributes, and the rest lean towards it), with
   attributes already used in this response penalised (diversity);
2. its *nearest items*: catalogue items ranked by the user's item logits plus
   how much of the generated content they carry;
3. *why*: the generated attributes the user's history also has most, and the
   history items whose content overlaps the generated content most.

Without a catalogue, generation samples catalogue items directly (Gumbel
top-n, MMR diversity over the decoder's item embeddings); the nearest items are
the sample and its item-item CF neighbours, and "why" names the history items
most similar to it (CF similarity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from generators.io import load_generator
from generators.sampling import attribute_scores, generate_attributes, sample_items
from generators.vae import EncoderState, GeneratorRuntime, encode_full, latent_from_state
from recsvc.data import IdMap
from recsvc.errors import InvalidArgument

ATTRIBUTES_PER_ITEM = 4
TOPIC_STRENGTH = 4.0  # logits added to the topic's attributes (and items carrying them)


@dataclass
class Generated:
    content: list[tuple[int, float]]  # (attribute index, probability)
    nearest: list[tuple[int, float]]  # (item index, score)
    why_attributes: list[int]
    why_items: list[int]


@dataclass
class GenerationResult:
    items: list[Generated] = field(default_factory=list)
    seed: int = 0


class GeneratorModel:
    """A loaded generator plus the content vocabulary it decodes."""

    def __init__(
        self,
        runtime: GeneratorRuntime,
        attributes: IdMap | None,
        item_attributes: sp.csr_matrix | None,
        source: str = "",
    ):
        self.runtime = runtime
        self.attributes = attributes
        self.item_attributes = item_attributes
        self.source = source  # where the vocabulary came from, for error messages
        self.version = runtime.version
        self.has_content = (
            attributes is not None and item_attributes is not None and runtime.Wattr is not None
        )
        if self.has_content:
            assert item_attributes is not None and attributes is not None
            self._attribute_items = item_attributes.T.tocsr()
            self._by_value: dict[str, list[int]] = {}
            for index, name in enumerate(attributes.ids):
                self._by_value.setdefault(name.split(":", 1)[-1], []).append(index)

    @classmethod
    def load(cls, directory: Path, attributes: IdMap | None, item_attributes: sp.csr_matrix | None,
             source: str) -> GeneratorModel:  # fmt: skip
        return cls(load_generator(directory), attributes, item_attributes, source)

    # -- user latents -----------------------------------------------------------

    def encode(self, items: np.ndarray, weights: np.ndarray) -> tuple[EncoderState, np.ndarray]:
        """Encoder state and latent mean of a history (unique item indices, weights)."""
        return encode_full(self.runtime, items, weights)

    @staticmethod
    def state_from_bytes(blob: bytes) -> EncoderState:
        return EncoderState.from_bytes(blob)

    def latent(self, state: EncoderState) -> np.ndarray:
        return latent_from_state(self.runtime, state)

    def update(
        self, state: EncoderState, item: int, old_weight: float, new_weight: float
    ) -> EncoderState:
        return self.runtime.update_state(state, item, old_weight, new_weight)

    def batch_item_scores(self, history: sp.csr_matrix) -> np.ndarray:
        """Logits (users x items, float32) for a batch of histories, exactly as
        :meth:`encode` then :meth:`item_scores` compute them one user at a time."""
        return self.item_scores(self.batch_latents(history))

    def batch_latents(self, history: sp.csr_matrix) -> np.ndarray:
        """Latent means (users x latent, float32) of a batch of histories, as
        :meth:`encode` computes them one user at a time."""
        rt = self.runtime
        x = sp.csr_matrix(history, dtype=np.float64, copy=True)
        x.data = np.clip(x.data, 0.0, rt.input_cap if rt.input_cap is not None else np.inf)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        pre = np.asarray(x @ rt.W1T.astype(np.float64))
        has = norms > 0
        pre[has] /= np.maximum(norms[has], 1e-12)[:, None]
        mu = np.tanh(pre + rt.b1) @ rt.W2_mu.T.astype(np.float64) + rt.b2_mu
        return mu.astype(np.float32)

    def item_scores(self, mu: np.ndarray) -> np.ndarray:
        """Logits over the whole catalogue (float32)."""
        h = self.runtime.decoder_hidden(mu)
        return h @ self.runtime.Wout.T + self.runtime.bout

    # -- topics -----------------------------------------------------------------

    def topic_attributes(self, topic: str) -> np.ndarray:
        """Attribute indices a topic names; :class:`InvalidArgument` if none."""
        topic = topic.strip().lower()
        if not self.has_content:
            raise InvalidArgument(
                "this model has no content vocabulary, so it cannot be steered by topic: "
                "train with --catalogue FILE (categories, tags, titles) to enable topics"
            )
        assert self.attributes is not None
        exact = self.attributes.get(topic)
        if exact >= 0:
            return np.array([exact])
        found = self._by_value.get(topic, [])
        if not found:
            for word in topic.replace(",", " ").split():
                found += self._by_value.get(word, [])
        if not found:
            examples = ", ".join(self.attributes.ids[:: max(1, len(self.attributes) // 8)][:8])
            raise InvalidArgument(
                f"unknown topic {topic!r}: topics are the categories, tags and title words of "
                f"the catalogue this model was trained with ({self.source}; "
                f"{len(self.attributes)} attributes, e.g. {examples})"
            )
        return np.unique(np.array(found, dtype=np.int64))

    # -- generation -------------------------------------------------------------

    def generate(
        self,
        mu: np.ndarray,
        history: np.ndarray,
        n: int,
        temperature: float,
        seed: int,
        diversity: float,
        neighbours: int,
        similarity: sp.csr_matrix,
        topic: str = "",
        exclude: np.ndarray | None = None,
    ) -> GenerationResult:
        """``n`` generated items for a user latent; deterministic for a seed."""
        banned = history if exclude is None else np.union1d(history, exclude)
        topic_attrs = self.topic_attributes(topic) if topic else None
        if self.has_content:
            items = self._generate_content(
                mu, history, banned, n, temperature, seed, diversity, neighbours, topic_attrs
            )
        else:
            items = self._generate_items(mu, history, banned, n, temperature, seed, diversity,
                                         neighbours, similarity)  # fmt: skip
        return GenerationResult(items, seed)

    def _generate_content(
        self, mu, history, banned, n, temperature, seed, diversity, neighbours, topic_attrs
    ) -> list[Generated]:  # type: ignore[no-untyped-def]
        assert self.item_attributes is not None
        n_attrs = self.runtime.n_attributes
        attr_bias = np.zeros(n_attrs)
        if topic_attrs is not None:
            attr_bias[topic_attrs] = TOPIC_STRENGTH
        item_logits = self.item_scores(mu).astype(np.float64)
        item_logits += self.item_attributes @ attr_bias
        item_logits[banned] = -np.inf
        user_attrs = np.asarray(self.item_attributes[history].sum(axis=0)).ravel()
        used_items: list[int] = []
        results = []
        for position in range(n):
            logits = attribute_scores(self.runtime, mu, attr_bias)
            if topic_attrs is not None:
                # a topic is a constraint: each item carries one of its attributes,
                # the one this user's (steered) distribution likes best
                anchor = topic_attrs[np.argmax(logits[topic_attrs])]
                rest = generate_attributes(
                    self.runtime, mu, ATTRIBUTES_PER_ITEM - 1, temperature=temperature,
                    seed=[seed, position], topic_bias=attr_bias, exclude=[anchor],
                )  # fmt: skip
                picked = np.concatenate([[anchor], rest]).astype(np.int64)
            else:
                picked = generate_attributes(
                    self.runtime, mu, ATTRIBUTES_PER_ITEM, temperature=temperature,
                    seed=[seed, position], topic_bias=attr_bias,
                )  # fmt: skip
            probs = np.exp(logits - logits.max())
            probs = (probs / probs.sum())[picked]
            content = np.zeros(n_attrs)
            content[picked] = 1.0
            # items carrying the generated content, ranked by the user's taste
            overlap = self.item_attributes @ content
            ranked = item_logits + 2.0 * overlap
            if used_items and diversity > 0:
                ranked[used_items] -= 10.0 * diversity
            top = np.argpartition(-ranked, min(neighbours, len(ranked) - 1))[:neighbours]
            top = top[np.argsort(-ranked[top], kind="stable")]
            top = top[np.isfinite(ranked[top])]
            used_items.extend(top.tolist())
            attr_bias[picked] -= 2.0 * diversity  # the next item leans elsewhere
            why_attrs = picked[np.argsort(-user_attrs[picked], kind="stable")]
            why_attrs = why_attrs[user_attrs[why_attrs] > 0][:3]
            if len(history):
                shared = np.asarray(self.item_attributes[history] @ content).ravel()
                why_items = history[np.argsort(-shared, kind="stable")][:3]
                why_items = why_items[shared[np.argsort(-shared, kind="stable")][:3] > 0]
            else:
                why_items = np.empty(0, dtype=np.int64)
            results.append(Generated(
                content=list(zip(picked.tolist(), np.asarray(probs, dtype=float).tolist(), strict=True)),
                nearest=list(zip(top.tolist(), ranked[top].tolist(), strict=True)),
                why_attributes=why_attrs.tolist(),
                why_items=why_items.tolist(),
            ))  # fmt: skip
        return results

    def _generate_items(
        self, mu, history, banned, n, temperature, seed, diversity, neighbours, similarity
    ) -> list[Generated]:  # type: ignore[no-untyped-def]
        picked, logits = sample_items(
            self.runtime, mu, n, temperature=temperature, seed=seed, exclude=banned,
            diversity=diversity, return_scores=True,
        )  # fmt: skip
        results = []
        for item, logit in zip(
            picked.tolist(), np.asarray(logits, dtype=float).tolist(), strict=True
        ):
            start, end = similarity.indptr[item], similarity.indptr[item + 1]
            cols, values = similarity.indices[start:end], similarity.data[start:end]
            keep = ~np.isin(cols, banned)
            cols, values = cols[keep], values[keep]
            order = np.argsort(-values, kind="stable")[: neighbours - 1]
            nearest = [(item, logit)] + list(
                zip(cols[order].tolist(), values[order].tolist(), strict=True)
            )
            in_history = np.isin(cols, history) if len(history) else np.zeros(0, dtype=bool)
            why = cols[in_history][np.argsort(-values[in_history], kind="stable")][:3]
            results.append(Generated([], nearest, [], why.tolist()))
        return results
