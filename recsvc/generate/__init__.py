"""Serving the generator: user latents, catalogue scores, generated item content.

Wraps a trained :class:`generators.vae.GeneratorRuntime` with the catalogue's
content vocabulary. No gRPC here; the engine calls it with dense indices.

With a catalogue, a generated item is content calibrated to the user and
realised by the catalogue (:meth:`GeneratorModel._generate_content`):

1. its *content*: an anchor attribute of the catalogue's main facet
   (categories, else tags, else words), sampled so that the ``n`` anchors follow
   the user's content profile (long-term taste plus feedback and context since
   training, :mod:`recsvc.generate.profile`); with a topic, the topic itself,
   a hard constraint (fewer items, and a ``shortfall`` saying why, when the
   catalogue has too few items carrying it);
2. its *nearest items*: the first, the unseen item carrying the anchor that the
   user's item distribution (the decoder's logits, sampled with the seed) and
   content profile like best; the content lists the anchor and that item's
   other attributes, so content and item agree; the others carry most of it;
3. *why*: the generated attributes the user's history also has most, and the
   history items whose content overlaps the generated content most.

Without a catalogue, generation samples catalogue items directly (Gumbel
top-n, MMR diversity over the decoder's item embeddings); the nearest items are
the sample and its item-item CF neighbours, and "why" names the history items
most similar to it (CF similarity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from generators.io import load_generator
from generators.sampling import gumbel, sample_items
from generators.vae import EncoderState, GeneratorRuntime, encode_full, latent_from_state
from recsvc.data import IdMap
from recsvc.errors import InvalidArgument
from recsvc.generate.profile import ContentProfile, Session, since_training

ATTRIBUTES_PER_ITEM = 4


@dataclass
class Generated:
    content: list[tuple[int, float]]  # (attribute index, probability)
    nearest: list[tuple[int, float]]  # (item index, score)
    why_attributes: list[int]
    why_items: list[int]


@dataclass
class UserState:
    """What Generate derives from a user's state alone (see :meth:`GeneratorModel.user_state`)."""

    logits: np.ndarray  # the decoder's item logits (float32)
    facet: np.ndarray | None = None  # the content profile over the facet
    facet_positive: np.ndarray | None = None  # the same without negative feedback
    affinity: np.ndarray | None = None  # over all attributes
    combos: np.ndarray | None = None  # over facet combinations
    history_attributes: np.ndarray | None = None  # attribute counts of the history

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))


@dataclass
class GenerationResult:
    items: list[Generated] = field(default_factory=list)
    seed: int = 0
    shortfall: str = ""  # why fewer than n items were generated for the topic


class GeneratorModel:
    """A loaded generator plus the content vocabulary it decodes."""

    def __init__(
        self,
        runtime: GeneratorRuntime,
        attributes: IdMap | None,
        item_attributes: sp.csr_matrix | None,
        source: str = "",
        session_prior: float | None = None,
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
            self.profile = ContentProfile(attributes.ids, item_attributes, session_prior)

    @classmethod
    def load(cls, directory: Path, attributes: IdMap | None, item_attributes: sp.csr_matrix | None,
             source: str, session_prior: float | None = None) -> GeneratorModel:  # fmt: skip
        return cls(load_generator(directory), attributes, item_attributes, source, session_prior)

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
        # a bare value that names several kinds means the most structured one
        found = self._most_structured(self._by_value.get(topic, []))
        if not found:
            for word in topic.replace(",", " ").split():
                found += self._most_structured(self._by_value.get(word, []))
        if not found:
            examples = ", ".join(self.attributes.ids[:: max(1, len(self.attributes) // 8)][:8])
            raise InvalidArgument(
                f"unknown topic {topic!r}: topics are the categories, tags and title words of "
                f"the catalogue this model was trained with ({self.source}; "
                f"{len(self.attributes)} attributes, e.g. {examples})"
            )
        return np.unique(np.array(found, dtype=np.int64))

    def context_attributes(self, names: Sequence[str]) -> np.ndarray:
        """Attribute indices of a request's context attributes (each resolved as a
        topic is); :class:`InvalidArgument` names any that match nothing."""
        if not names:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([self.topic_attributes(name) for name in names])

    def session(
        self,
        items: np.ndarray,
        weights: np.ndarray,
        train: tuple[np.ndarray, np.ndarray],
        context_items: np.ndarray | None,
        context_attributes: np.ndarray,
        context_weight: float,
    ) -> Session:
        """What shapes the content profile beyond training: the feedback since
        training (merged history minus training history) and the request's
        context (items and attributes, each weighing ``context_weight``)."""
        session_items, session_weights = since_training(items, weights, train)
        if context_items is not None and len(context_items):
            known = context_items[context_items >= 0]
            session_items = np.concatenate([session_items, known])
            session_weights = np.concatenate([session_weights, np.full(len(known), context_weight)])
        return Session(session_items, session_weights, context_attributes, context_weight)

    def _most_structured(self, found: list[int]) -> list[int]:
        """Of attributes a bare value matched, those of the most structured kind
        (category, then tag, then word): "war" is the category, not the title word."""
        assert self.attributes is not None
        names = self.attributes.ids
        for kind in ("category:", "tag:", "word:"):
            of_kind = [a for a in found if names[a].startswith(kind)]
            if of_kind:
                return of_kind
        return found

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
        train: tuple[np.ndarray, np.ndarray] | None = None,
        session: Session | None = None,
        state: UserState | None = None,
    ) -> GenerationResult:
        """``n`` generated items for a user latent; deterministic for a seed.

        ``train``: the user's training items and weights; ``session``: items and
        signed weights since training (feedback, the request's context items and
        attributes as items); both only shape the content profile. ``state``:
        :meth:`user_state` for these, when the caller has it cached."""
        banned = history if exclude is None else np.union1d(history, exclude)
        topic_attrs = self.topic_attributes(topic) if topic else None
        if state is None:
            state = self.user_state(mu, history, train, session)
        if self.has_content:
            items, shortfall = self._generate_content(
                mu, history, banned, n, temperature, seed, diversity, neighbours, topic_attrs,
                state,
            )  # fmt: skip
            return GenerationResult(items, seed, shortfall)
        items = self._generate_items(state.logits, history, banned, n, temperature, seed,
                                     diversity, neighbours, similarity)  # fmt: skip
        return GenerationResult(items, seed)

    # -- content generation -------------------------------------------------------

    def _prior(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The attribute head's distribution for a decoder state: (facet part, all)."""
        assert self.runtime.Wattr is not None and self.runtime.battr is not None
        logits = self.runtime.Wattr @ h + self.runtime.battr
        p = np.exp(logits - logits.max())
        p /= p.sum()
        facet = p[self.profile.cols]
        return facet / max(facet.sum(), 1e-12), p

    def user_state(
        self,
        mu: np.ndarray,
        history: np.ndarray,
        train: tuple[np.ndarray, np.ndarray] | None = None,
        session: Session | None = None,
    ) -> UserState:
        """What generation computes from the user's state alone (no seed, topic or
        request option): cacheable until the user's next event."""
        h = self.runtime.decoder_hidden(mu)
        logits = (self.runtime.Wout @ h + self.runtime.bout).astype(np.float32)
        if not self.has_content:
            return UserState(logits)
        train = train or (np.empty(0, dtype=np.int64), np.empty(0))
        session = session or Session()
        profile = self.profile
        prior_facet, prior_all = self._prior(h)
        facet, positive, affinity = profile.user(train, session, prior_facet, prior_all)
        item_prior = np.exp(logits.astype(np.float64) - logits.max())
        combos = profile.combos(train, session, item_prior, facet, positive)
        history_attributes = None
        if len(history):
            in_history = np.zeros(len(logits))
            in_history[history] = 1.0
            history_attributes = profile.AT @ in_history
        return UserState(logits, facet, positive, affinity, combos, history_attributes)

    def _generate_content(  # type: ignore[no-untyped-def]
        self, mu, history, banned, n, temperature, seed, diversity, neighbours, topic_attrs,
        state,
    ) -> tuple[list[Generated], str]:  # fmt: skip
        """Calibrated content, realised by the catalogue items that fit the user.

        1. The user's distribution over the facet's *combinations* (an item's whole
           facet content, e.g. its genre set): long-term taste, feedback and
           context since training (:meth:`~recsvc.generate.profile.ContentProfile.combos`),
           sharpened by the temperature.
        2. ``n`` combinations by systematic sampling (a seeded start, evenly spaced
           points): each gets ``floor`` or ``ceil`` of ``n`` times its share, so the
           content is calibrated to the user, not to the catalogue's blockbusters.
        3. The first nearest item of a combination: the unseen item carrying it
           with the best ``logit / T + Gumbel`` (the user's item distribution,
           sampled with the seed). With a topic, the candidates are the unseen
           items carrying it, ranked by that plus how well the rest of their
           content fits the profile (``sum of log P`` over their facet attributes).
        4. Content: the anchor (the combination's attribute the user likes most,
           or the topic), then the item's other attributes by the user's
           affinity, so content and item agree by construction; the other
           nearest items carry the anchor and most of the rest.
        """
        profile = self.profile
        P, affinity = state.facet, state.affinity
        logits = state.logits.astype(np.float64)
        rng = np.random.default_rng(seed)
        score = logits / temperature + gumbel(rng, len(logits))
        score[banned] = -np.inf
        shortfall = ""
        if topic_attrs is not None:
            attr_items = self._attribute_items
            cands = np.unique(np.concatenate(
                [attr_items.indices[attr_items.indptr[a]:attr_items.indptr[a + 1]]
                 for a in topic_attrs]))  # fmt: skip
            available = cands[np.isfinite(score[cands])]
            if len(available) < n:
                names = ", ".join(self.attributes.ids[a] for a in topic_attrs)  # type: ignore[union-attr]
                shortfall = (
                    f"only {len(available)} catalogue items carry the topic ({names}) and are "
                    f"not already in the user's history or excluded; {len(available)} of {n} "
                    "generated"
                )
            with np.errstate(divide="ignore"):  # how well the rest of their content fits
                fit = score[available] + (profile.F @ np.log(P))[available]
            order = available[np.argsort(-np.nan_to_num(fit, neginf=-1e300), kind="stable")][:n]
            anchors: list[int | None] = [None] * len(order)
            firsts = order.tolist()
        else:
            with np.errstate(divide="ignore"):  # (log space: no underflow at low T)
                log_weights = np.log(state.combos) / temperature
            weights = np.exp(log_weights - log_weights.max())
            drawn = _systematic(weights / weights.sum(), 2 * n, rng)
            drawn = _calibrated_subset(drawn, n, profile.combo_split, P)
            firsts, anchors = [], []
            for c in drawn:
                cands = profile.combo_items[profile.combo_ptr[c]:profile.combo_ptr[c + 1]]
                vals = score[cands]
                best = int(np.argmax(vals)) if len(cands) else -1
                if best < 0 or not np.isfinite(vals[best]):
                    # nothing left in that combination: the best item carrying its
                    # attribute the user likes most
                    attrs = profile.cols[profile.combo_attrs[
                        profile.combo_attr_ptr[c]:profile.combo_attr_ptr[c + 1]]]  # fmt: skip
                    col = int(attrs[np.argmax(affinity[attrs])])
                    cands = self._attribute_items.indices[
                        self._attribute_items.indptr[col]:self._attribute_items.indptr[col + 1]]
                    vals = score[cands]
                    best = int(np.argmax(vals)) if len(cands) else -1
                    if best < 0 or not np.isfinite(vals[best]):
                        continue
                item = int(cands[best])
                firsts.append(item)
                F = profile.F
                carried = profile.cols[F.indices[F.indptr[item]:F.indptr[item + 1]]]
                anchors.append(int(carried[np.argmax(affinity[carried])]))
                score[item] = -np.inf
            if len(firsts) < n:  # the catalogue ran dry: the best items left, any content
                extra = np.argsort(-score, kind="stable")[: n - len(firsts)]
                extra = extra[np.isfinite(score[extra])]
                firsts += extra.tolist()
                anchors += [None] * len(extra)
            score[firsts] = -np.inf
        results = []
        A = profile.A
        user_attrs = state.history_attributes
        if user_attrs is not None:  # the history's (row, attribute) pairs, gathered once
            history_rows, history_attrs = _gather(A, history)
        first_set = np.zeros(len(logits), dtype=bool)
        first_set[firsts] = True
        penalty = np.zeros(len(affinity))
        wanted = np.zeros(len(affinity), dtype=np.int32)  # the content of the current item
        for item, anchor in zip(firsts, anchors, strict=True):
            carried = A.indices[A.indptr[item]:A.indptr[item + 1]]
            if anchor is None and topic_attrs is not None:
                on_topic = carried[np.isin(carried, topic_attrs)]
                anchor = int(on_topic[np.argmax(affinity[on_topic])])
            others = carried[carried != anchor] if anchor is not None else carried
            rank = affinity[others] * np.exp(-penalty[others])
            others = others[np.argsort(-rank, kind="stable")][: ATTRIBUTES_PER_ITEM - 1]
            picked = np.concatenate([[anchor], others]) if anchor is not None else others
            picked = picked.astype(np.int64)
            penalty[picked] += diversity  # the next items' content leans elsewhere
            wanted[picked] = 1
            nearest = [(item, float(logits[item]))]
            if neighbours > 1 and len(picked):
                nearest += self._more_nearest(item, picked[0], wanted, score, first_set,
                                              neighbours - 1)  # fmt: skip
            why_attrs = np.empty(0, dtype=np.int64)
            why_items = np.empty(0, dtype=np.int64)
            if user_attrs is not None:
                why_attrs = picked[np.argsort(-user_attrs[picked], kind="stable")]
                why_attrs = why_attrs[user_attrs[why_attrs] > 0][:3]
                shared = np.bincount(history_rows, weights=wanted[history_attrs],
                                     minlength=len(history))  # fmt: skip
                top = np.argsort(-shared, kind="stable")[:3]
                why_items = history[top][shared[top] > 0]
            wanted[picked] = 0
            results.append(Generated(
                content=list(zip(picked.tolist(), affinity[picked].tolist(), strict=True)),
                nearest=nearest,
                why_attributes=why_attrs.tolist(),
                why_items=why_items.tolist(),
            ))  # fmt: skip
        return results, shortfall

    def _more_nearest(self, item, anchor, wanted, score, first_set, k):  # type: ignore[no-untyped-def]
        """Up to ``k`` more items: the user's best of the item's own facet combination
        (they carry all of its facet content) when it has ``k`` left, else those
        carrying the anchor and the most of the rest of the content (``wanted``: 1
        for the content's attributes), among the user's 8k best such items; never
        the first nearest item of any generated item."""
        profile = self.profile
        c = profile.combo[item]
        if c >= 0:
            mates = profile.combo_items[profile.combo_ptr[c]:profile.combo_ptr[c + 1]]
            vals = score[mates]
            ok = np.isfinite(vals) & ~first_set[mates]
            if ok.sum() >= k:
                mates, vals = mates[ok], vals[ok]
                order = np.argsort(-vals, kind="stable")[:k]
                return [(int(m), float(v)) for m, v in zip(mates[order], vals[order], strict=True)]
        attr_items = self._attribute_items
        cands = attr_items.indices[attr_items.indptr[anchor]:attr_items.indptr[anchor + 1]]
        vals = score[cands]
        ok = np.isfinite(vals) & ~first_set[cands]
        cands, vals = cands[ok], vals[ok]
        if len(cands) > 8 * k:
            top = np.argpartition(-vals, 8 * k)[: 8 * k]
            cands, vals = cands[top], vals[top]
        order = np.lexsort((-vals, -_carrying(self.profile.A, cands, wanted)))[:k]
        return [(int(c), float(v)) for c, v in zip(cands[order], vals[order], strict=True)]

    def _generate_items(
        self, user_logits, history, banned, n, temperature, seed, diversity, neighbours,
        similarity,
    ) -> list[Generated]:  # type: ignore[no-untyped-def]
        # masks, built once: sample_items takes one as is, and the loop needs no np.isin
        is_banned = np.zeros(self.runtime.n_items, dtype=bool)
        is_banned[np.asarray(banned, dtype=np.int64)] = True
        is_history = np.zeros(self.runtime.n_items, dtype=bool)
        is_history[np.asarray(history, dtype=np.int64)] = True
        picked, logits = sample_items(
            self.runtime, None, n, temperature=temperature, seed=seed, exclude=is_banned,
            diversity=diversity, return_scores=True, logits=user_logits,
        )  # fmt: skip
        results = []
        for item, logit in zip(
            picked.tolist(), np.asarray(logits, dtype=float).tolist(), strict=True
        ):
            start, end = similarity.indptr[item], similarity.indptr[item + 1]
            row, row_values = similarity.indices[start:end], similarity.data[start:end]
            keep = ~is_banned[row]
            cols, values = row[keep], row_values[keep]
            order = np.argsort(-values, kind="stable")[: neighbours - 1]
            nearest = [(item, logit)] + list(
                zip(cols[order].tolist(), values[order].tolist(), strict=True)
            )
            # why: the history items most like it (the unfiltered row: history is banned)
            in_history = is_history[row]
            liked = row[in_history]
            why = liked[np.argsort(-row_values[in_history], kind="stable")][:3]
            results.append(Generated([], nearest, [], why.tolist()))
        return results


def _systematic(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices drawn from ``weights`` by systematic sampling, in a seeded order:
    index ``a`` comes ``floor(n w_a)`` or ``ceil(n w_a)`` times (calibrated by
    construction, unlike ``n`` independent draws)."""
    order = rng.permutation(len(weights))
    edges = np.cumsum(weights[order])
    points = (rng.random() + np.arange(n)) / n * edges[-1]
    picked = order[np.minimum(np.searchsorted(edges, points, side="right"), len(order) - 1)]
    return picked[rng.permutation(n)]


def _gather(A: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (position in ``rows``, column) pairs of ``rows`` of a CSR matrix
    (vectorised: no per-row Python)."""
    starts, ends = A.indptr[rows], A.indptr[rows + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    positions = np.arange(total) + np.repeat(starts - first, lengths)
    return np.repeat(np.arange(len(rows)), lengths), A.indices[positions]


def _carrying(A: sp.csr_matrix, rows: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each of ``rows`` of a binary CSR matrix, how many of its columns are ``wanted``."""
    row, col = _gather(A, rows)
    return np.bincount(row, weights=wanted[col], minlength=len(rows))


def _calibrated_subset(
    pool: np.ndarray, n: int, split: Any, target: np.ndarray, alpha: float = 0.01
) -> np.ndarray:
    """``n`` of the combinations in ``pool`` (a calibrated sample), chosen greedily so
    that their facet content (``split``: combinations x facet, rows summing to 1)
    has the smallest KL divergence from ``target`` (Steck 2018's calibration
    measure, ``alpha`` its smoothing), in the pool's order among equals."""
    rows = split[pool] if isinstance(split, np.ndarray) else split[pool].toarray()
    support = target > 0
    rows = rows[:, support]  # only the target's support enters the divergence
    p = target[support]
    smoothing = alpha * p
    chosen: list[int] = []
    total = np.zeros(len(p))
    taken = np.zeros(len(pool), dtype=bool)
    for step in range(min(n, len(pool))):
        # KL(p || mix) = sum p log p - sum p log mix: the first term is the same for
        # every candidate, so the smallest KL is the largest p . log(mix)
        mix = (total + rows) * ((1 - alpha) / (step + 1)) + smoothing
        fit = np.log(mix) @ p
        fit[taken] = -np.inf
        best = int(np.argmax(fit))
        chosen.append(best)
        taken[best] = True
        total += rows[best]
    return pool[np.asarray(chosen, dtype=np.int64)]
