"""The recommendation engine: histories, blending, filters, cold start, feedback.

It knows nothing of gRPC: the servicer converts messages to these calls and
:mod:`recsvc.errors` exceptions to status codes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsvc.bundle import load_bundle
from recsvc.config import Settings
from recsvc.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    RecsvcError,
    ResourceExhausted,
    Unavailable,
)
from recsvc.ranking import UserBatch
from recsvc.ranking.build import pipeline_for
from recsvc.similarity import CFModel
from recsvc.state.feedback import FeedbackEvent, describe_problems, id_problem, to_stored
from recsvc.state.generation_cache import UserStateCache
from recsvc.state.latents import LatentCache
from recsvc.store import (
    ApplyResult,
    CachedVector,
    StoredEvent,
    StoreError,
    StoreFull,
    StoreRequestError,
    StoreUnavailable,
    UserStore,
)

if TYPE_CHECKING:
    from recsvc.generate import GeneratorModel

log = logging.getLogger(__name__)

SOURCE_CF = "cf"
SOURCE_POPULARITY = "popularity"
SOURCE_GENERATOR = "generator"
SOURCE_SEQUENCE = "sequence"

STRATEGY_CF = "cf"
STRATEGY_GENERATOR = "generator"
STRATEGY_BLEND = "blend"
STRATEGY_SEQUENCE = "sequence"
STRATEGIES = (STRATEGY_CF, STRATEGY_GENERATOR, STRATEGY_BLEND, STRATEGY_SEQUENCE)


def blend_scores(
    generator_logits: np.ndarray, cf_scores: np.ndarray | None, generator_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """Batch blend (users x items): ``w * softmax(logits) + (1 - w) * cf / sum(cf)``,
    and where the generator's part is the larger one. Used by serving and eval alike."""
    logits = generator_logits.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    generator_part = generator_weight * probs
    if cf_scores is None or generator_weight >= 1:
        return generator_part, np.ones(generator_part.shape, dtype=bool)
    cf = np.maximum(cf_scores.astype(np.float64), 0)
    totals = cf.sum(axis=1, keepdims=True)
    cf_part = (1 - generator_weight) * np.divide(
        cf, totals, out=np.zeros_like(cf), where=totals > 0
    )
    return generator_part + cf_part, generator_part > cf_part


def new_id() -> str:
    """A random 128-bit id in hex, as uuid4().hex reads but at a fifth of its cost."""
    return os.urandom(16).hex()


def load_model(model_dir: Path) -> CFModel:
    """A bundle ready to serve: the CF model, with its generator when it has one."""
    bundle = load_bundle(model_dir)
    model = CFModel(bundle)
    if bundle.generator_dir is not None:
        from recsvc.generate import GeneratorModel  # imports torch: only when needed

        model.generator = GeneratorModel.load(
            bundle.generator_dir,
            bundle.attributes,
            bundle.item_attributes,
            source=f"catalogue {bundle.params.get('catalogue', 'none')} of bundle {model_dir}",
            session_prior=(bundle.params.get("generate") or {}).get("kappa"),
        )
    if bundle.sequence_dir is not None:
        from recsvc.sequence import SequenceModel  # imports torch: only when needed

        model.sequence = SequenceModel.load(bundle.sequence_dir, bundle.users)
    model.pipeline = pipeline_for(bundle, model.generator, model.sequence)
    return model


@dataclass
class Recommendation:
    item_ids: list[str]
    scores: np.ndarray
    sources: list[str]
    recommendation_id: str
    model_version: str
    personalized: bool
    degraded_reason: str = ""
    strategy: str = ""  # (#13) the strategy that ranked it, for the impression log

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reason)


@dataclass
class GeneratedView:
    content: list[tuple[str, float]]
    nearest: list[tuple[str, float]]
    why_attributes: list[str]
    why_items: list[str]


@dataclass
class Generation:
    items: list[GeneratedView]
    generation_id: str
    model_version: str
    seed: int
    degraded_reason: str = ""
    shortfall: str = ""


@dataclass
class HistoryItem:
    item_id: str
    weight: float
    last_event_ms: int | None  # None: known only from training


@dataclass
class UserStateView:
    user_id: str
    history: list[HistoryItem]
    vector: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    updated_ms: int | None = None
    known_to_model: bool = False
    event_count: int = 0


class Engine:
    """Serves one model against one user store."""

    def __init__(self, model: CFModel, store: UserStore, settings: Settings):
        self.model = model
        self.store = store
        self.settings = settings
        self.store_available = True
        self.store_error = ""
        self._background: set[asyncio.Task[None]] = set()
        self._latents = LatentCache(settings.latent_cache_users)
        self.user_states = UserStateCache(settings.generate_cache_mb * 2**20)

    # -- store health -----------------------------------------------------------

    async def check_store(self) -> bool:
        """Ping Redis and remember the outcome (the health monitor calls this)."""
        try:
            await self.store.ping()
        except StoreError as exc:  # whatever it is, a failed PING means not serving
            self._mark_store_down(exc)
        else:
            if not self.store_available:
                log.info("redis is reachable again")
            self.store_available, self.store_error = True, ""
        return self.store_available

    def _mark_store_down(self, exc: BaseException) -> None:
        """Only for :class:`StoreUnavailable` (and failed health probes): this
        degrades every call until the next probe finds Redis again."""
        if self.store_available:
            log.warning("redis unavailable: %s", exc)
        self.store_available = False
        self.store_error = str(exc) or type(exc).__name__

    def _store_failed(self, exc: StoreError, doing: str) -> Exception:
        """The error to raise for a store call that failed for this request only
        (:class:`StoreUnavailable` is handled by the callers: it marks the store down)."""
        if isinstance(exc, StoreFull):
            return ResourceExhausted(
                f"user state store is out of memory ({exc}); {doing} failed, retry later"
            )
        if isinstance(exc, StoreRequestError) and exc.invalid:
            # the store's own check refused what validation let through
            return InvalidArgument(f"{doing} refused by the store: {exc}")
        if isinstance(exc, StoreRequestError):
            return Internal(
                f"{doing} failed in the user state store (error id {exc.error_id}, logged "
                "by the server); nothing else is affected"
            )
        return Internal(f"{doing} failed: {exc}")

    # -- validation -----------------------------------------------------------

    def _check_id(self, name: str, value: str) -> None:
        problem = id_problem(name, value, self.settings.max_id_length)
        if problem:
            raise InvalidArgument(problem)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.settings.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.settings.max_k}, got {k}")

    def _check_filter(self, name: str, ids: Sequence[str]) -> None:
        if len(ids) > self.settings.max_filter_ids:
            raise InvalidArgument(
                f"{name} has {len(ids)} ids; at most {self.settings.max_filter_ids} are allowed"
            )

    # -- recommendations ------------------------------------------------------

    def swap_model(self, model: CFModel) -> None:
        """Serve ``model`` from now on; calls already running keep the one they took."""
        self.model = model

    async def _history(
        self, model: CFModel, user_id: str, with_vector: bool = False, feedback: bool = True
    ) -> tuple[np.ndarray, np.ndarray, str, CachedVector | None]:
        """The user's merged history (training + feedback), as unique item indices
        and summed weights, why it is degraded (empty if it is not), and the
        cached generator vector when asked for. Without ``feedback``, the
        training history alone (an A/B variant whose user state is frozen)."""
        train_items, train_weights = model.training_history(user_id)
        degraded = ""
        feedback_ids: list[str] = []
        feedback_weights = np.empty(0, dtype=np.float64)
        cached = None
        if not feedback:
            return train_items, train_weights, degraded, cached
        if self.store_available:
            try:
                feedback_ids, feedback_weights, cached = await self.store.get_history(
                    user_id, model.data_until_ms, with_vector
                )
            except StoreUnavailable as exc:
                self._mark_store_down(exc)
            except StoreError as exc:
                raise self._store_failed(exc, "reading the user's state") from exc
        if not self.store_available:
            degraded = f"user state store unavailable ({self.store_error}); served from the model"
        if not feedback_ids:
            return train_items, train_weights, degraded, cached
        feedback_items = model.items.indices(feedback_ids)
        known = feedback_items >= 0
        items = np.concatenate([train_items, feedback_items[known]])
        weights = np.concatenate([train_weights, feedback_weights[known]])
        unique, inverse = np.unique(items, return_inverse=True)
        return unique, np.bincount(inverse, weights=weights), degraded, cached

    async def _latent(
        self,
        generator: GeneratorModel,
        user_id: str,
        items: np.ndarray,
        weights: np.ndarray,
        cached: CachedVector | None,
    ) -> np.ndarray:
        """The user's latent: from this process's cache, else from the cached
        encoder state when it reflects all their events, else encoded from the
        history. Only a user with feedback gets their encoder state written to
        Redis (it is what per-event updates start from); a user known only from
        training is re-encoded by each process once, at no Redis write."""
        events = cached.events if cached is not None else -1
        latent = self._latents.get(user_id, generator.version, events)
        if latent is not None:
            return latent
        if cached is not None and cached.fresh_for(generator.version):
            assert cached.blob is not None
            latent = generator.latent(generator.state_from_bytes(cached.blob))
        else:
            state, latent = generator.encode(items, weights)
            if cached is not None and cached.events > 0 and self.store_available:
                # for the next event's incremental update, off this call's path (a
                # Redis write costs a round trip); compare-and-set, never a stale state
                self._in_background(
                    self._cache_vector(user_id, cached.events, state.to_bytes(), generator.version)
                )
        if cached is not None:  # a degraded read (no store) is not cached
            self._latents.put(user_id, generator.version, events, latent)
        return latent

    async def _cache_vector(self, user_id: str, events: int, blob: bytes, version: str) -> None:
        try:
            await self.store.put_vector(user_id, events, blob, version)
        except StoreUnavailable as exc:
            self._mark_store_down(exc)
        except StoreError as exc:  # only a cache of derived data: serve without it
            log.warning("user vector not cached: %s", exc)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _strategy(self, model: CFModel, strategy: str) -> str:
        has_blend = model.generator is not None or model.pipeline is not None
        strategy = (
            strategy
            or self.settings.default_strategy
            or (STRATEGY_BLEND if has_blend else STRATEGY_CF)
        )
        if strategy not in STRATEGIES:
            raise InvalidArgument(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        if (strategy == STRATEGY_GENERATOR and model.generator is None) or (
            strategy == STRATEGY_BLEND and not has_blend
        ):
            raise InvalidArgument(
                f"strategy {strategy!r} needs a generator, and model {model.model_version} has "
                "none: train with --generator, or ask for strategy cf"
            )
        if strategy == STRATEGY_SEQUENCE and getattr(model, "sequence", None) is None:
            raise InvalidArgument(
                f"strategy 'sequence' needs a sequence model, and model {model.model_version} "
                "has none: train with --sequence on ordered data, or ask for another strategy"
            )
        return strategy

    async def recommend(
        self,
        user_id: str,
        k: int,
        exclude_item_ids: Sequence[str] = (),
        restrict_item_ids: Sequence[str] = (),
        include_seen: bool = False,
        strategy: str = "",
        blend_weight: float | None = None,
        model: CFModel | None = None,
        feedback: bool = True,
    ) -> Recommendation:
        """Top-k for a user by CF (filled up with popular items), by the
        generator, or by a blend of the two; with ``model`` (an A/B variant's
        bundle) instead of the served one, and without ``feedback``, from the
        training history alone."""
        self._check_id("user_id", user_id)
        self._check_k(k)
        self._check_filter("exclude_item_ids", exclude_item_ids)
        self._check_filter("restrict_item_ids", restrict_item_ids)
        if blend_weight is not None and not 0 <= blend_weight <= 1:
            raise InvalidArgument(f"blend_weight must be in [0, 1], got {blend_weight}")
        model = model or self.model  # one model for the whole call, even if a reload swaps it
        strategy = self._strategy(model, strategy)
        exclude = model.items.indices(exclude_item_ids) if exclude_item_ids else None
        restrict = None
        if restrict_item_ids:
            restrict = np.unique(model.items.indices(restrict_item_ids))
            restrict = restrict[restrict >= 0]

        if strategy == STRATEGY_SEQUENCE:
            ranked = await self._rank_sequence(model, user_id, k, exclude, restrict, include_seen)
            return self._recommendation(model, *ranked, strategy)
        use_generator = model.generator is not None and strategy != STRATEGY_CF
        items, weights, degraded, cached = await self._history(
            model, user_id, with_vector=use_generator and feedback, feedback=feedback
        )
        if strategy == STRATEGY_BLEND and model.pipeline is not None and len(items):
            pipeline = model.pipeline
            if blend_weight is not None:
                if model.generator is None:
                    raise InvalidArgument(
                        f"blend_weight needs a generator, and model {model.model_version} has none"
                    )
                pipeline = pipeline.with_generator_weight(blend_weight)
            latent = None
            if model.generator is not None and "generator" in pipeline.weights:
                latent = await self._latent(model.generator, user_id, items, weights, cached)
            batch = UserBatch.single(items, weights, model.n_items, latent)
            if "sequence" in pipeline.weights or "transitions" in pipeline.weights:
                await self._sequence_state_into(batch, model, user_id)
            ranked = pipeline.rank(
                batch, k, include_seen, exclude[exclude >= 0] if exclude is not None else None,
                restrict,
            )  # fmt: skip
            chosen, scores, sources = ranked.items, ranked.scores, ranked.sources
            personalized = True
        elif (
            strategy == STRATEGY_CF
            or model.generator is None
            or (strategy == STRATEGY_BLEND and model.pipeline is not None)
        ):  # (the last: a user with no history under the mixture gets the cold-start list)
            chosen, scores, sources = self._rank_cf(
                model, items, weights, k, exclude, restrict, include_seen
            )
            personalized = SOURCE_CF in sources
        else:
            assert model.generator is not None
            mu = await self._latent(model.generator, user_id, items, weights, cached)
            if blend_weight is None:
                blend_weight = float(model.params.get("blend_weight", self.settings.blend_weight))
            chosen, scores, sources = self._rank_generator(
                model, items, weights, mu, k, exclude, restrict, include_seen,
                1.0 if strategy == STRATEGY_GENERATOR else blend_weight,
            )  # fmt: skip
            personalized = len(items) > 0
        return self._recommendation(
            model, chosen, scores, sources, personalized, degraded, strategy
        )

    async def _sequence_view(self, model: CFModel, user_id: str) -> tuple[Any, str]:
        """The user's sequence view (#11) and why it is degraded: with Redis down, the
        training tail alone."""
        from recsvc.state import sequence as seq

        if self.store_available:
            try:
                return await seq.read_view(self.store, model, user_id), ""
            except StoreUnavailable as exc:
                self._mark_store_down(exc)
            except StoreError as exc:
                raise self._store_failed(exc, "reading the user's state") from exc
        tail = model.sequence.sequence(user_id, np.empty(0, np.int64))
        view = seq.SequenceView(
            model.training_history(user_id)[0], tail,
            model.sequence.state(tail) if len(tail) else None, 0, True,
        )  # fmt: skip
        return view, f"user state store unavailable ({self.store_error}); served from the model"

    async def _continue(  # type: ignore[no-untyped-def]
        self, model, user_id, n, topic, temperature, seed, diversity, exclude_item_ids
    ) -> Generation:
        """Generate's continuation of the user's sequence (#11)."""
        from recsvc.generate.continuation import continue_sequence, topic_items

        if model.sequence is None:
            raise InvalidArgument(
                f"continuation needs a sequence model, and model {model.model_version} has "
                "none: train with --sequence on ordered data"
            )
        boosted = None
        if topic:
            bundle = model.bundle
            if bundle.attributes is None:
                raise InvalidArgument(
                    "this model has no catalogue, so a continuation cannot be steered by "
                    "topic: train with --catalogue FILE"
                )
            boosted = topic_items(bundle.attributes.ids, bundle.item_attributes, topic)
            if not len(boosted):
                raise InvalidArgument(f"unknown topic {topic!r}: no catalogue item has it")
        if seed is None:
            seed = int(np.random.default_rng().integers(2**63))
        view, degraded = await self._sequence_view(model, user_id)
        banned = [view.seen]
        if exclude_item_ids:
            excluded = model.items.indices(exclude_item_ids)
            banned.append(excluded[excluded >= 0])
        steps = continue_sequence(
            model.sequence.runtime, view.sequence, n, temperature, seed, diversity,
            np.concatenate(banned), boosted,
        )  # fmt: skip
        ids = model.items.ids
        return Generation(
            items=[
                GeneratedView(content=[], nearest=[(ids[s.item], s.probability)],
                              why_attributes=[], why_items=[ids[i] for i in s.why])
                for s in steps
            ],  # fmt: skip
            generation_id=new_id(),
            model_version=model.model_version,
            seed=seed,
            degraded_reason=degraded,
        )

    async def _sequence_state_into(self, batch: UserBatch, model: CFModel, user_id: str) -> None:
        """The mixture's order-aware members need the user's state (#11; cached or
        encoded) and ordered items (the transitions)."""
        from recsvc.ranking.sequence import STATES
        from recsvc.ranking.transitions import RECENT
        from recsvc.state import sequence as seq

        state = sequence = None
        if self.store_available:
            try:
                view = await seq.read_view(self.store, model, user_id)
                state, sequence = view.state, view.sequence
                if not view.fresh:
                    self._in_background(seq.cache_state(self.store, model, user_id, view))
            except StoreError as exc:
                log.info("sequence state unavailable for %s: %s", user_id, exc)
        if sequence is None:
            sequence = model.sequence.sequence(user_id, np.empty(0, np.int64))
        if state is None:
            state = model.sequence.state(sequence) if len(sequence) else None
        if state is None:
            state = np.zeros(model.sequence.dim)
        batch.cache[STATES] = np.asarray(state, dtype=np.float32)[None, :]
        batch.cache[RECENT] = [sequence]

    @staticmethod
    def _recommendation(  # type: ignore[no-untyped-def]
        model, chosen, scores, sources, personalized, degraded, strategy
    ) -> Recommendation:
        ids = model.items.ids
        return Recommendation(
            item_ids=[ids[i] for i in chosen.tolist()],
            scores=scores,
            sources=sources,
            recommendation_id=new_id(),
            model_version=model.model_version,
            personalized=personalized,
            degraded_reason=degraded,
            strategy=strategy,
        )

    async def _rank_sequence(  # type: ignore[no-untyped-def]
        self, model, user_id, k, exclude, restrict, include_seen
    ) -> tuple[np.ndarray, np.ndarray, list[str], bool, str]:
        """Top-k by the sequence model (#11); a user with no sequence gets the cold-start
        list; with Redis down, the training tail alone."""
        from recsvc.state import sequence as seq

        view, degraded = await self._sequence_view(model, user_id)
        if not view.fresh:
            self._in_background(seq.cache_state(self.store, model, user_id, view))
        if view.state is None:
            chosen, scores, sources = self._rank_cf(
                model, view.seen, np.zeros(len(view.seen)), k, exclude, restrict, include_seen
            )
        else:
            banned = [] if include_seen else [view.seen]
            if exclude is not None:
                banned.append(exclude[exclude >= 0])
            chosen, scores = seq.top_k(seq.sequence_scores(model, view), k, banned, restrict)
            sources = [SOURCE_SEQUENCE] * len(chosen)
        return chosen, scores, sources, view.state is not None, degraded

    @staticmethod
    def _rank_cf(model, items, weights, k, exclude, restrict, include_seen):  # type: ignore[no-untyped-def]
        cf_items, cf_scores = model.recommend(items, weights, k, exclude, restrict, include_seen)
        chosen, scores = cf_items, cf_scores.astype(np.float64)
        n_cf = len(cf_items)
        if n_cf < k and (restrict is None or len(restrict) > n_cf):
            banned = [cf_items]
            if not include_seen:
                banned.append(items)
            if exclude is not None:
                banned.append(exclude)
            popular = model.popular(k - n_cf, np.concatenate(banned), restrict)
            chosen = np.concatenate([cf_items, popular])
            scores = np.concatenate([scores, model.popularity[popular] / max(len(model.users), 1)])
        return chosen, scores, [SOURCE_CF] * n_cf + [SOURCE_POPULARITY] * (len(chosen) - n_cf)

    @staticmethod
    def _rank_generator(  # type: ignore[no-untyped-def]
        model, items, weights, mu, k, exclude, restrict, include_seen, generator_weight
    ):
        """Mix two distributions over the catalogue: the generator's softmax and
        the CF scores normalised to sum to one (no CF: popularity)."""
        mixed, from_generator = blend_scores(
            model.generator.item_scores(mu)[None, :],
            model.score_history_dense(items, weights)[None, :] if generator_weight < 1 else None,
            generator_weight,
        )
        mixed, from_generator = mixed[0], from_generator[0]
        banned = [] if include_seen else [items]
        if exclude is not None:
            banned.append(exclude)
        if restrict is not None:
            allowed = np.zeros(len(mixed), dtype=bool)
            allowed[restrict] = True
            mixed[~allowed] = -np.inf
        if banned:
            mixed[np.concatenate(banned)] = -np.inf
        n = min(k, int(np.isfinite(mixed).sum()))
        if n == 0:
            return np.empty(0, dtype=np.int64), np.empty(0), []
        top = np.argpartition(-mixed, n - 1)[:n]
        top = top[np.argsort(-mixed[top], kind="stable")]
        sources = [SOURCE_GENERATOR if g else SOURCE_CF for g in from_generator[top].tolist()]
        return top, mixed[top], sources

    async def generate(
        self,
        user_id: str,
        n: int,
        topic: str = "",
        temperature: float | None = None,
        seed: int | None = None,
        diversity: float | None = None,
        neighbours: int = 0,
        exclude_item_ids: Sequence[str] = (),
        model: CFModel | None = None,
        feedback: bool = True,
        context_item_ids: Sequence[str] = (),
        context_attributes: Sequence[str] = (),
        continuation: bool = False,
    ) -> Generation:
        """``n`` generated items for a user (see :mod:`recsvc.generate`); ``model``
        and ``feedback`` as in :meth:`recommend`; with ``continuation``, the next ``n``
        items of their sequence (:mod:`recsvc.generate.continuation`)."""
        self._check_id("user_id", user_id)
        if not 1 <= n <= self.settings.max_generate:
            raise InvalidArgument(f"n must be between 1 and {self.settings.max_generate}, got {n}")
        temperature = 1.0 if temperature is None else temperature
        if not (temperature > 0 and np.isfinite(temperature)):
            raise InvalidArgument(f"temperature must be > 0, got {temperature}")
        diversity = 0.5 if diversity is None else diversity
        if not 0 <= diversity <= 1:
            raise InvalidArgument(f"diversity must be in [0, 1], got {diversity}")
        neighbours = neighbours or 3
        if not 1 <= neighbours <= 20:
            raise InvalidArgument(f"neighbours must be between 1 and 20, got {neighbours}")
        self._check_filter("exclude_item_ids", exclude_item_ids)
        self._check_filter("context_item_ids", context_item_ids)
        self._check_filter("context_attributes", context_attributes)
        model = model or self.model
        if continuation:
            return await self._continue(
                model, user_id, n, topic, temperature, seed, diversity, exclude_item_ids
            )
        generator = model.generator
        if generator is None:
            raise InvalidArgument(
                f"model {model.model_version} has no generator: train with --generator"
            )
        if topic:
            generator.topic_attributes(topic)  # bad topics fail before any I/O
        context_attrs = generator.context_attributes(context_attributes)
        if seed is None:
            seed = int(np.random.default_rng().integers(2**63))
        exclude = model.items.indices(exclude_item_ids) if exclude_item_ids else None
        if exclude is not None:
            exclude = exclude[exclude >= 0]
        items, weights, degraded, cached = await self._history(
            model, user_id, with_vector=feedback, feedback=feedback
        )
        context = model.items.indices(context_item_ids) if context_item_ids else None
        if context is not None:  # what the user is looking at is not generated again
            exclude = context if exclude is None else np.concatenate([exclude, context])
            exclude = exclude[exclude >= 0]
        # what depends on the user's state alone is cached per event count (#15)
        key = None
        if cached is not None and context is None and not len(context_attrs):
            key = (model.model_version, user_id, cached.events)
        state = self.user_states.get(key) if key is not None else None
        if state is None:
            state = await self._user_state(model, user_id, items, weights, cached,
                                           context, context_attrs, key)  # fmt: skip
        result = generator.generate(
            None, items, n, temperature, seed, diversity, neighbours,
            model.bundle.similarity, topic, exclude, state=state,
        )  # fmt: skip
        item_ids = model.items.ids
        attribute_ids = generator.attributes.ids if generator.attributes is not None else []
        return Generation(
            items=[
                GeneratedView(
                    content=[(attribute_ids[a], p) for a, p in g.content],
                    nearest=[(item_ids[i], score) for i, score in g.nearest],
                    why_attributes=[attribute_ids[a] for a in g.why_attributes],
                    why_items=[item_ids[i] for i in g.why_items],
                )
                for g in result.items
            ],
            generation_id=new_id(),
            model_version=model.model_version,
            seed=result.seed,
            degraded_reason=degraded,
            shortfall=result.shortfall,
        )

    async def _user_state(  # type: ignore[no-untyped-def]
        self, model, user_id, items, weights, cached, context=None, context_attrs=(), key=None
    ):
        """The generator's :class:`~recsvc.generate.UserState` for a user (cached
        under ``key`` when given)."""
        generator = model.generator
        mu = await self._latent(generator, user_id, items, weights, cached)
        train = model.training_history(user_id)
        session = generator.session(items, weights, train, context, context_attrs,
                                    self.settings.event_weights["like"])  # fmt: skip
        state = generator.user_state(mu, items, train, session)
        if key is not None:
            self.user_states.put(key, state)
        return state

    async def _refresh_user_state(self, model: CFModel, user_id: str) -> None:
        """After feedback (off the request path): recompute the cached generation
        state of a user who has one, so their next Generate finds it fresh."""
        items, weights, _, cached = await self._history(model, user_id, with_vector=True)
        if cached is not None:
            key = (model.model_version, user_id, cached.events)
            await self._user_state(model, user_id, items, weights, cached, key=key)

    def similar_items(self, item_id: str, k: int) -> tuple[list[str], np.ndarray, str]:
        """The k items most similar to ``item_id``; :class:`NotFound` if unknown."""
        self._check_id("item_id", item_id)
        self._check_k(k)
        model = self.model
        index = model.items.get(item_id)
        if index < 0:
            raise NotFound(
                f"item {item_id!r} is not in model {model.model_version}; "
                "items seen only in feedback become known at the next training"
            )
        neighbours, scores = model.similar_items(index, k)
        return [model.items.ids[i] for i in neighbours.tolist()], scores, model.model_version

    # -- user state and feedback ------------------------------------------------

    async def user_state(self, user_id: str) -> UserStateView:
        """The user's state: feedback history (most recent first), then training items."""
        self._check_id("user_id", user_id)
        model = self.model
        try:
            stored = await self.store.get_state(user_id)
        except StoreUnavailable as exc:
            self._mark_store_down(exc)
            raise Unavailable(
                f"user state store unavailable ({self.store_error}); retry shortly"
            ) from exc
        except StoreError as exc:
            raise self._store_failed(exc, "reading the user's state") from exc
        train_items, train_weights = model.training_history(user_id)
        weights = dict(
            zip((model.items.ids[i] for i in train_items), train_weights.tolist(), strict=True)
        )
        for item, w in stored.weights.items():
            if stored.last_event_ms.get(item, 0) > model.data_until_ms:  # else in training
                weights[item] = weights.get(item, 0.0) + w
        recent = sorted(stored.last_event_ms.items(), key=lambda kv: -kv[1])
        history = [HistoryItem(item, weights.pop(item, 0.0), ms) for item, ms in recent]
        history += [HistoryItem(item, w, None) for item, w in weights.items()]
        vector = np.empty(0, dtype=np.float32)
        if model.generator is not None:
            items, item_weights, _, cached = await self._history(model, user_id, with_vector=True)
            vector = np.asarray(
                await self._latent(model.generator, user_id, items, item_weights, cached),
                dtype=np.float32,
            )
        return UserStateView(
            user_id=user_id,
            history=history,
            vector=vector,
            updated_ms=stored.updated_ms,
            known_to_model=user_id in model.users,
            event_count=stored.event_count,
        )

    def validate_events(self, events: Sequence[FeedbackEvent]) -> None:
        """:class:`InvalidArgument` naming every bad event of a batch."""
        if not events:
            raise InvalidArgument("no events in the request")
        if len(events) > self.settings.max_events_per_request:
            raise InvalidArgument(
                f"{len(events)} events in one request; at most "
                f"{self.settings.max_events_per_request} (split the batch, or use StreamFeedback)"
            )
        problems = describe_problems(events, self.settings)
        if problems:
            shown = "; ".join(problems[:10])
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise InvalidArgument(f"{len(problems)} invalid events, none applied: {shown}{more}")

    async def apply_feedback(self, events: Sequence[FeedbackEvent]) -> list[ApplyResult]:
        """Write valid events durably (log + user state); :class:`Unavailable` if
        Redis cannot take them, in which case none may be treated as accepted."""
        if not self.store_available:
            raise Unavailable(
                f"user state store unavailable ({self.store_error}); feedback not accepted, "
                "retry shortly (resending the same event ids is safe)"
            )
        now_ms = int(time.time() * 1000)
        stored = [to_stored(e, self.settings, now_ms) for e in events]
        model = self.model
        try:
            results = await self.store.apply_events(stored)
        except StoreUnavailable as exc:
            self._mark_store_down(exc)
            raise Unavailable(
                f"user state store unavailable ({self.store_error}); feedback not acknowledged, "
                "retry (resending the same event ids is safe)"
            ) from exc
        except StoreError as exc:
            raise self._store_failed(exc, "writing feedback") from exc
        if model.generator is not None:
            # derived data: updated after the ack; a read that finds it behind re-encodes
            self._in_background(self._update_vectors(model, stored, results))
        if getattr(model, "sequence", None) is not None:
            from recsvc.state.sequence import refresh_states

            users = [e.user_id for e, r in zip(stored, results, strict=True) if r.applied]
            self._in_background(refresh_states(self.store, model, users))
        return results

    async def _reencode_vector(self, model: CFModel, user: str) -> None:
        """Encode the user's whole merged history and cache it (compare-and-set on
        the event count read with it, so a state overtaken meanwhile is not stored)."""
        assert model.generator is not None
        try:
            items, weights, _, cached = await self._history(model, user, with_vector=True)
        except RecsvcError as exc:  # a failed read, already logged: the next read encodes
            log.info("user vector not re-encoded: %s", exc)
            return
        if cached is None or cached.fresh_for(model.generator.version):
            return
        state, _ = model.generator.encode(items, weights)
        await self.store.put_vector(user, cached.events, state.to_bytes(), model.generator.version)

    async def _update_vectors(
        self, model: CFModel, events: Sequence[StoredEvent], results: Sequence[ApplyResult]
    ) -> None:
        """Move each user's cached encoder state by the events just applied, without
        re-reading their history (the first encoder layer is linear in the input)."""
        generator = model.generator
        assert generator is not None
        per_user: dict[str, list[tuple[int, float, float, int]]] = {}
        for event, result in zip(events, results, strict=True):
            if result.applied:
                per_user.setdefault(event.user_id, []).append(
                    (model.items.get(event.item_id), event.weight, result.weight, result.events)
                )
        users = list(per_user)
        try:
            cached = await self.store.get_vectors(users)
            for user, vector in zip(users, cached, strict=True):
                updates = per_user[user]
                first = updates[0][3] - 1
                consecutive = [u[3] for u in updates] == list(
                    range(first + 1, first + 1 + len(updates))
                )
                if vector.blob and vector.model == generator.version and consecutive and (
                    vector.vector_events == first
                ):
                    state = generator.state_from_bytes(vector.blob)
                elif first == 0 and consecutive:  # first events: from the training history
                    state, _ = generator.encode(*model.training_history(user))
                else:
                    # missing or behind (e.g. an earlier batch's update has not landed
                    # yet): encode the whole stored history, as a read would
                    await self._reencode_vector(model, user)
                    continue
                for item, delta, feedback_weight, _ in updates:
                    if item >= 0:
                        trained = model.training_weight(user, item)
                        state = generator.update(
                            state,
                            item,
                            trained + feedback_weight - delta,
                            trained + feedback_weight,
                        )
                await self.store.put_vector(
                    user, updates[-1][3], state.to_bytes(), generator.version
                )
            for user in users:
                if self.user_states.has_user(model.model_version, user):
                    await self._refresh_user_state(model, user)
        except StoreError as exc:
            log.info("user vectors not updated (%s); they are re-encoded on the next read", exc)
