"""The recommendation engine: histories, blending, filters, cold start, feedback.

It knows nothing of gRPC: the servicer converts messages to these calls and
:mod:`recsvc.errors` exceptions to status codes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from redis.exceptions import RedisError

from recsvc.config import Settings
from recsvc.errors import InvalidArgument, NotFound, Unavailable
from recsvc.feedback import FeedbackEvent, describe_problems, to_stored
from recsvc.similarity import CFModel
from recsvc.store import ApplyResult, UserStore

log = logging.getLogger(__name__)

SOURCE_CF = "cf"
SOURCE_POPULARITY = "popularity"


@dataclass
class Recommendation:
    item_ids: list[str]
    scores: np.ndarray
    sources: list[str]
    recommendation_id: str
    model_version: str
    personalized: bool
    degraded_reason: str = ""

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reason)


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

    # -- store health -----------------------------------------------------------

    async def check_store(self) -> bool:
        """Ping Redis and remember the outcome (the health monitor calls this)."""
        try:
            await self.store.ping()
        except (RedisError, OSError) as exc:
            self._mark_store_down(exc)
        else:
            if not self.store_available:
                log.info("redis is reachable again")
            self.store_available, self.store_error = True, ""
        return self.store_available

    def _mark_store_down(self, exc: BaseException) -> None:
        if self.store_available:
            log.warning("redis unavailable: %s", exc)
        self.store_available = False
        self.store_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    # -- validation -----------------------------------------------------------

    def _check_id(self, name: str, value: str) -> None:
        if not value:
            raise InvalidArgument(f"{name} is empty")
        if len(value) > self.settings.max_id_length:
            raise InvalidArgument(f"{name} is longer than {self.settings.max_id_length} characters")

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
        self, model: CFModel, user_id: str
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """The user's merged history (training + feedback), as unique item indices
        and summed weights, and why it is degraded (empty if it is not)."""
        train_items, train_weights = model.training_history(user_id)
        degraded = ""
        feedback_ids: list[str] = []
        feedback_weights = np.empty(0, dtype=np.float64)
        if self.store_available:
            try:
                feedback_ids, feedback_weights = await self.store.get_history(
                    user_id, model.data_until_ms
                )
            except (RedisError, OSError) as exc:
                self._mark_store_down(exc)
        if not self.store_available:
            degraded = f"user state store unavailable ({self.store_error}); served from the model"
        if not feedback_ids:
            return train_items, train_weights, degraded
        feedback_items = model.items.indices(feedback_ids)
        known = feedback_items >= 0
        items = np.concatenate([train_items, feedback_items[known]])
        weights = np.concatenate([train_weights, feedback_weights[known]])
        unique, inverse = np.unique(items, return_inverse=True)
        return unique, np.bincount(inverse, weights=weights), degraded

    async def recommend(
        self,
        user_id: str,
        k: int,
        exclude_item_ids: Sequence[str] = (),
        restrict_item_ids: Sequence[str] = (),
        include_seen: bool = False,
    ) -> Recommendation:
        """Top-k for a user: CF over their history, filled up with popular items."""
        self._check_id("user_id", user_id)
        self._check_k(k)
        self._check_filter("exclude_item_ids", exclude_item_ids)
        self._check_filter("restrict_item_ids", restrict_item_ids)
        model = self.model  # one model for the whole call, even if a reload swaps it
        exclude = model.items.indices(exclude_item_ids) if exclude_item_ids else None
        restrict = None
        if restrict_item_ids:
            restrict = np.unique(model.items.indices(restrict_item_ids))
            restrict = restrict[restrict >= 0]

        items, weights, degraded = await self._history(model, user_id)
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
        ids = model.items.ids
        return Recommendation(
            item_ids=[ids[i] for i in chosen],
            scores=scores,
            sources=[SOURCE_CF] * n_cf + [SOURCE_POPULARITY] * (len(chosen) - n_cf),
            recommendation_id=uuid.uuid4().hex,
            model_version=model.model_version,
            personalized=n_cf > 0,
            degraded_reason=degraded,
        )

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
        return [model.items.ids[i] for i in neighbours], scores, model.model_version

    # -- user state and feedback ------------------------------------------------

    async def user_state(self, user_id: str) -> UserStateView:
        """The user's state: feedback history (most recent first), then training items."""
        self._check_id("user_id", user_id)
        model = self.model
        try:
            stored = await self.store.get_state(user_id)
        except (RedisError, OSError) as exc:
            self._mark_store_down(exc)
            raise Unavailable(
                f"user state store unavailable ({self.store_error}); retry shortly"
            ) from exc
        train_items, train_weights = model.training_history(user_id)
        weights = dict(zip((model.items.ids[i] for i in train_items), train_weights.tolist()))
        for item, w in stored.weights.items():
            if stored.last_event_ms.get(item, 0) > model.data_until_ms:  # else in training
                weights[item] = weights.get(item, 0.0) + w
        recent = sorted(stored.last_event_ms.items(), key=lambda kv: -kv[1])
        history = [HistoryItem(item, weights.pop(item, 0.0), ms) for item, ms in recent]
        history += [HistoryItem(item, w, None) for item, w in weights.items()]
        return UserStateView(
            user_id=user_id,
            history=history,
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
        try:
            return await self.store.apply_events(stored)
        except (RedisError, OSError) as exc:
            self._mark_store_down(exc)
            raise Unavailable(
                f"user state store unavailable ({self.store_error}); feedback not acknowledged, "
                "retry (resending the same event ids is safe)"
            ) from exc
