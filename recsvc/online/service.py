"""Serving through variants: pick the user's variant, call the engine as it says,
log the impression (#13). The servicer calls this instead of the engine for
Recommend and Generate."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recsvc.engine import Engine, Generation, Recommendation, new_id
from recsvc.online.impressions import KIND_GENERATE, KIND_RECOMMEND, Impression, ImpressionLog
from recsvc.online.interleave import team_draft
from recsvc.online.variants import Variant, VariantSet

STRATEGY_INTERLEAVED = "interleaved"


@dataclass
class Served:
    """A response, the variant that served it, and per position the variant that
    contributed the item (interleaved lists only)."""

    result: Any  # Recommendation | Generation
    variant: str
    teams: list[str] = field(default_factory=list)


class OnlineService:
    def __init__(
        self,
        engine: Engine,
        variants: VariantSet | None = None,
        impressions: ImpressionLog | None = None,
        models: dict[str, Any] | None = None,
    ):
        self.engine = engine
        self.variants = variants or VariantSet.single()
        self.impressions = impressions
        self.models = models or {}  # variant name -> its own bundle's model
        self._rng = random.Random()

    async def _recommend_as(
        self, variant: Variant, user_id: str, k: int, strategy: str,
        blend_weight: float | None, filters: dict[str, Any],
    ) -> Recommendation:  # fmt: skip
        if variant.max_k is not None:
            k = min(k, variant.max_k)
        return await self.engine.recommend(
            user_id, k,
            strategy=strategy or variant.strategy,
            blend_weight=blend_weight if blend_weight is not None else variant.blend_weight,
            model=self.models.get(variant.name),
            feedback=not variant.frozen_state,
            **filters,
        )  # fmt: skip

    async def recommend(
        self,
        user_id: str,
        k: int,
        *,
        variant: str = "",
        strategy: str = "",
        blend_weight: float | None = None,
        exclude_item_ids: Sequence[str] = (),
        restrict_item_ids: Sequence[str] = (),
        include_seen: bool = False,
    ) -> Served:
        """The user's list from their variant (or ``variant``); a request's explicit
        strategy and blend weight win over the variant's."""
        chosen = self.variants.choose(user_id, variant)
        filters = {"exclude_item_ids": exclude_item_ids, "restrict_item_ids": restrict_item_ids,
                   "include_seen": include_seen}  # fmt: skip
        if chosen.interleave is None:
            rec = await self._recommend_as(chosen, user_id, k, strategy, blend_weight, filters)
            served = Served(rec, chosen.name)
        else:
            served = await self._interleaved(chosen, user_id, k, strategy, blend_weight, filters)
        rec = served.result
        if self.impressions is not None:
            self.impressions.record(Impression(
                rec.recommendation_id, user_id, served.variant, rec.strategy, rec.model_version,
                KIND_RECOMMEND, rec.item_ids, int(time.time() * 1000), served.teams,
            ))  # fmt: skip
        return served

    async def _interleaved(
        self, chosen: Variant, user_id: str, k: int, strategy: str,
        blend_weight: float | None, filters: dict[str, Any],
    ) -> Served:  # fmt: skip
        assert chosen.interleave is not None
        parts = [self.variants.by_name[name] for name in chosen.interleave]
        a, b = [
            await self._recommend_as(p, user_id, k, strategy, blend_weight, filters) for p in parts
        ]
        teams, indices = team_draft(a.item_ids, b.item_ids, k, self._rng)
        recs = (a, b)
        pick = [(recs[t], i) for t, i in zip(teams, indices, strict=True)]
        versions = dict.fromkeys((a.model_version, b.model_version))
        rec = Recommendation(
            item_ids=[r.item_ids[i] for r, i in pick],
            scores=np.array([r.scores[i] for r, i in pick], dtype=np.float64),
            sources=[r.sources[i] for r, i in pick],
            recommendation_id=new_id(),
            model_version="|".join(versions),
            personalized=a.personalized or b.personalized,
            degraded_reason=a.degraded_reason or b.degraded_reason,
            strategy=f"{STRATEGY_INTERLEAVED}:{a.strategy}|{b.strategy}",
        )
        return Served(rec, chosen.name, [parts[t].name for t in teams])

    async def generate(self, user_id: str, n: int, *, variant: str = "", **kwargs: Any) -> Served:
        """Generated items from the user's variant's bundle (interleaving does not
        apply to Generate: an interleaving variant serves its first part)."""
        chosen = self.variants.choose(user_id, variant)
        source = chosen
        if chosen.interleave is not None:
            source = self.variants.by_name[chosen.interleave[0]]
        generation: Generation = await self.engine.generate(
            user_id, n, model=self.models.get(source.name), feedback=not source.frozen_state,
            **kwargs,
        )  # fmt: skip
        if self.impressions is not None:
            self.impressions.record(Impression(
                generation.generation_id, user_id, chosen.name, "generate",
                generation.model_version, KIND_GENERATE,
                [[item_id for item_id, _ in g.nearest] for g in generation.items],  # type: ignore[misc]
                int(time.time() * 1000),
            ))  # fmt: skip
        return Served(generation, chosen.name)
