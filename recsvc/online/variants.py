"""A/B variants (#13): the ``--variants`` file, and sticky assignment of users.

A file (JSON, or TOML by its ``.toml`` suffix) names the variants::

    salt = "spring-test"          # optional; change it to reshuffle users
    [[variants]]
    name = "control"
    share = 0.5                   # traffic shares sum to 1; 0: reachable by override only
    [[variants]]
    name = "cf-frozen"
    share = 0.5
    strategy = "cf"               # cf | generator | blend (default: the server's)
    bundle = "../models/other"    # a model bundle, relative to the file (default: --model)
    blend_weight = 0.3            # the generator's weight in blend
    max_k = 50                    # k is capped at this
    frozen_state = true           # ignore the user's feedback: training history only
    [[variants]]
    name = "ab-interleaved"
    share = 0
    interleave = ["control", "cf-frozen"]   # team-draft interleaving of two variants

A user is assigned by a hash of the salt and their id, so the same user gets
the same variant in every process and after restarts; a request may name
another variant.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsvc.errors import InvalidArgument

DEFAULT_VARIANT = "default"
STRATEGIES = ("", "cf", "generator", "blend")
_KEYS = {"name", "share", "bundle", "strategy", "blend_weight", "max_k", "frozen_state",
         "interleave"}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """What one arm of an experiment changes; unset fields keep the server's behaviour."""

    name: str
    share: float = 1.0
    bundle: Path | None = None
    strategy: str = ""
    blend_weight: float | None = None
    max_k: int | None = None
    frozen_state: bool = False
    interleave: tuple[str, str] | None = None


def _variant(raw: Any, base: Path, index: int) -> Variant:
    where = f"variant {index + 1}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table/object, got {type(raw).__name__}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isprintable():
        raise ValueError(f"{where}: 'name' must be a non-empty printable string of <= 64 chars")
    where = f"variant {name!r}"
    share = raw.get("share", 0.0)
    if not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ValueError(f"{where}: 'share' must be a number in [0, 1], got {share!r}")
    strategy = raw.get("strategy", "")
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: 'strategy' must be one of cf, generator, blend")
    weight = raw.get("blend_weight")
    if weight is not None and (not isinstance(weight, int | float) or not 0 <= weight <= 1):
        raise ValueError(f"{where}: 'blend_weight' must be in [0, 1], got {weight!r}")
    max_k = raw.get("max_k")
    if max_k is not None and (not isinstance(max_k, int) or max_k < 1):
        raise ValueError(f"{where}: 'max_k' must be a positive integer, got {max_k!r}")
    frozen = raw.get("frozen_state", False)
    if not isinstance(frozen, bool):
        raise ValueError(f"{where}: 'frozen_state' must be true or false")
    pair = raw.get("interleave")
    if pair is not None:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
                and pair[0] != pair[1]):  # fmt: skip
            raise ValueError(f"{where}: 'interleave' must name two different variants")
        if set(raw) - {"name", "share", "interleave"}:
            raise ValueError(f"{where}: an interleaving variant takes only name, share, interleave")
    bundle = raw.get("bundle")
    if bundle is not None and not isinstance(bundle, str):
        raise ValueError(f"{where}: 'bundle' must be a directory path")
    return Variant(
        name=name,
        share=float(share),
        bundle=(base / bundle).resolve() if bundle else None,
        strategy=strategy,
        blend_weight=float(weight) if weight is not None else None,
        max_k=max_k,
        frozen_state=frozen,
        interleave=(pair[0], pair[1]) if pair else None,
    )


class VariantSet:
    """The configured variants, and which one a user gets."""

    def __init__(self, variants: list[Variant], salt: str = ""):
        if not variants:
            raise ValueError("no variants configured")
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        total = sum(v.share for v in variants)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"variant shares must sum to 1, got {total:g} ({names})")
        self.by_name = {v.name: v for v in variants}
        for v in variants:
            if v.interleave is not None:
                for part in v.interleave:
                    inner = self.by_name.get(part)
                    if inner is None or inner.interleave is not None:
                        raise ValueError(
                            f"variant {v.name!r} interleaves {part!r}, which is not a plain "
                            f"variant of this file (known: {names})"
                        )
        self.variants = variants
        self.salt = salt
        bounds, running = [], 0.0
        for v in variants:
            running += v.share
            bounds.append(running)
        self._bounds = bounds

    @classmethod
    def single(cls) -> VariantSet:
        """No experiment: every call is served by the server's defaults."""
        return cls([Variant(DEFAULT_VARIANT, 1.0)])

    @classmethod
    def load(cls, path: Path) -> VariantSet:
        """Read and check a variants file (JSON, or TOML by its suffix)."""
        text = path.read_text()
        try:
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"variants file {path}: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("variants"), list):
            raise ValueError(f"variants file {path}: needs a list 'variants'")
        unknown = set(raw) - {"salt", "variants"}
        if unknown:
            raise ValueError(f"variants file {path}: unknown keys {sorted(unknown)}")
        base = path.resolve().parent
        try:
            return cls(
                [_variant(v, base, i) for i, v in enumerate(raw["variants"])],
                str(raw.get("salt", "")),
            )
        except ValueError as exc:
            raise ValueError(f"variants file {path}: {exc}") from exc

    def bucket(self, user_id: str) -> float:
        """The user's stable position in [0, 1)."""
        digest = hashlib.blake2b(f"{self.salt}\0{user_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def assign(self, user_id: str) -> Variant:
        """The user's variant: sticky, by the hash bucket against cumulative shares."""
        if len(self.variants) == 1:
            return self.variants[0]
        x = self.bucket(user_id)
        for variant, bound in zip(self.variants, self._bounds, strict=True):
            if x < bound and variant.share > 0:
                return variant
        return next(v for v in reversed(self.variants) if v.share > 0)

    def choose(self, user_id: str, override: str) -> Variant:
        """The variant to serve: ``override`` when given (INVALID_ARGUMENT if unknown)."""
        if not override:
            return self.assign(user_id)
        variant = self.by_name.get(override)
        if variant is None:
            raise InvalidArgument(
                f"unknown variant {override!r}; this server has: {', '.join(self.by_name)}"
            )
        return variant

    def load_bundles(self, load: Callable[[Path], Any]) -> dict[str, Any]:
        """Each variant's own model, loaded once per distinct bundle directory (variants
        naming the same bundle share one copy in memory)."""
        loaded: dict[Path, Any] = {}
        models = {}
        for v in self.variants:
            if v.bundle is not None:
                if v.bundle not in loaded:
                    loaded[v.bundle] = load(v.bundle)
                models[v.name] = loaded[v.bundle]
        return models
