"""Where user and item ids come from, with realistic skew.

Three sources:

* an interaction file: CSV/TSV with a header naming ``user_id`` and ``item_id``
  columns (other columns ignored), or the line format ``user item item ...``;
  plain or .gz. Users and items are drawn in proportion to how often they
  occur in the file.
* a model bundle directory with ``users.txt`` and ``items.txt`` (one id per
  line) and ``popularity.npy`` (floats aligned with items.txt): items are drawn
  in proportion to popularity; users in proportion to their training
  interactions when the bundle has recsvc's ``user_items.npz`` (CSR, rows
  aligned with users.txt), else Zipf over the listed order.
* synthetic Zipf ids ``u0..u{N-1}`` / ``i0..i{M-1}`` (rank 1 = ``u0``).

Draws are pre-computed in numpy batches so the per-request cost is a list index.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import UsageError


def zipf_weights(n: int, s: float) -> np.ndarray:
    if n <= 0:
        raise UsageError("Zipf needs at least one id")
    return 1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), s)


class WeightedSampler:
    """Draws values with probability proportional to weights (uniform if None)."""

    def __init__(
        self,
        values: Sequence,
        weights: np.ndarray | Sequence[float] | None = None,
        *,
        rng: np.random.Generator | None = None,
        batch: int = 8192,
    ) -> None:
        if len(values) == 0:
            raise UsageError("no ids to draw from")
        self.values = np.asarray(values, dtype=object)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.batch = batch
        self._cdf: np.ndarray | None = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(values),):
                raise UsageError(f"{len(w)} weights for {len(values)} ids")
            w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
            if w.sum() > 0:
                cdf = np.cumsum(w)
                self._cdf = cdf / cdf[-1]
        self._buf: list = []
        self._pos = 0

    def __len__(self) -> int:
        return len(self.values)

    def probabilities(self) -> np.ndarray:
        if self._cdf is None:
            return np.full(len(self.values), 1.0 / len(self.values))
        return np.diff(self._cdf, prepend=0.0)

    def _refill(self) -> None:
        n = len(self.values)
        if self._cdf is None:
            idx = self.rng.integers(0, n, self.batch)
        else:
            idx = np.searchsorted(self._cdf, self.rng.random(self.batch), side="right")
            np.minimum(idx, n - 1, out=idx)
        self._buf = self.values[idx].tolist()
        self._pos = 0

    def next(self):
        pos = self._pos
        if pos >= len(self._buf):
            self._refill()
            pos = 0
        self._pos = pos + 1
        return self._buf[pos]

    def describe(self) -> dict:
        p = np.sort(self.probabilities())[::-1]
        n = len(p)
        top = max(1, n // 100)
        return {
            "n": n,
            "top1pct_share": round(float(p[:top].sum()), 4),
            "max_share": round(float(p[0]), 6),
        }


@dataclass
class IdSource:
    users: WeightedSampler
    items: WeightedSampler
    description: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {**self.description, "users": self.users.describe(), "items": self.items.describe()}


def synthetic(
    n_users: int, n_items: int, s: float = 1.1, rng: np.random.Generator | None = None
) -> IdSource:
    rng = rng if rng is not None else np.random.default_rng()
    users = WeightedSampler([f"u{n}" for n in range(n_users)], zipf_weights(n_users, s), rng=rng)
    items = WeightedSampler([f"i{n}" for n in range(n_items)], zipf_weights(n_items, s), rng=rng)
    return IdSource(users, items, {"source": "zipf", "zipf_s": s})


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_interactions(path: str | os.PathLike) -> tuple[Counter, Counter]:
    """(user counts, item counts) from a CSV/TSV with header, or `user item item ...` lines."""
    path = Path(path)
    users: Counter = Counter()
    items: Counter = Counter()
    with _open_text(path) as f:
        first = ""
        for line in f:
            if line.strip():
                first = line
                break
        if not first:
            raise UsageError(f"{path}: no interactions")
        delim = "," if "," in first else ("\t" if "\t" in first else None)
        header: list[str] = []
        if delim is not None:
            header = [c.strip().lower() for c in next(csv.reader([first], delimiter=delim))]
        has_header = ("user_id" in header and "item_id" in header) or (
            "user" in header and "item" in header
        )
        if delim == "\t" and not has_header:
            delim = None  # `user<TAB>item<TAB>item ...` lines
        if delim is not None:
            if "user_id" in header and "item_id" in header:
                ui, ii = header.index("user_id"), header.index("item_id")
            elif has_header:
                ui, ii = header.index("user"), header.index("item")
            else:
                raise UsageError(
                    f"{path}: a CSV/TSV interaction file needs a header with user_id and "
                    f"item_id columns, got {header[:6]}"
                )
            need = max(ui, ii)
            for row in csv.reader(f, delimiter=delim):
                if len(row) > need and row[ui] and row[ii]:
                    users[row[ui].strip()] += 1
                    items[row[ii].strip()] += 1
        else:
            for line in [first] + [ln for ln in f]:
                parts = line.split()
                if len(parts) < 2:
                    continue
                users[parts[0]] += len(parts) - 1
                items.update(parts[1:])
    if not users or not items:
        raise UsageError(f"{path}: no interactions found")
    return users, items


def from_interactions(path: str | os.PathLike, rng: np.random.Generator | None = None) -> IdSource:
    rng = rng if rng is not None else np.random.default_rng()
    users, items = read_interactions(path)
    return IdSource(
        WeightedSampler(list(users), np.fromiter(users.values(), np.float64), rng=rng),
        WeightedSampler(list(items), np.fromiter(items.values(), np.float64), rng=rng),
        {"source": "interactions", "path": str(path), "n_interactions": sum(items.values())},
    )


def _read_ids(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [s for s in (line.strip() for line in f) if s]


def from_model_dir(
    path: str | os.PathLike, zipf_s: float = 1.1, rng: np.random.Generator | None = None
) -> IdSource:
    rng = rng if rng is not None else np.random.default_rng()
    d = Path(path)
    missing = [n for n in ("users.txt", "items.txt") if not (d / n).is_file()]
    if missing:
        raise UsageError(f"{d}: not a model bundle (missing {', '.join(missing)})")
    user_ids = _read_ids(d / "users.txt")
    item_ids = _read_ids(d / "items.txt")
    desc: dict = {"source": "model", "path": str(d)}
    pop_path = d / "popularity.npy"
    if pop_path.is_file():
        pop = np.load(pop_path, allow_pickle=False).astype(np.float64).ravel()
        if len(pop) != len(item_ids):
            raise UsageError(
                f"{pop_path}: {len(pop)} values for {len(item_ids)} items in items.txt"
            )
        desc["items_weighted_by"] = "popularity.npy"
        item_w = pop
    else:
        desc["items_weighted_by"] = f"zipf over items.txt order (no popularity.npy), s={zipf_s}"
        item_w = zipf_weights(len(item_ids), zipf_s)
    user_w = _user_counts(d / "user_items.npz", len(user_ids))
    if user_w is not None:
        desc["users_weighted_by"] = "training interactions per user (user_items.npz)"
    else:
        desc["users_weighted_by"] = f"zipf over users.txt order, s={zipf_s}"
        user_w = zipf_weights(len(user_ids), zipf_s)
    return IdSource(
        WeightedSampler(user_ids, user_w, rng=rng),
        WeightedSampler(item_ids, item_w, rng=rng),
        desc,
    )


def _user_counts(path: Path, n_users: int) -> np.ndarray | None:
    """Interactions per user from a recsvc bundle's users x items CSR matrix, if present.

    Reads only the CSR row pointers (no scipy needed, no pickles); None when the
    file is absent or does not match users.txt.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "indptr" not in npz.files:
                return None
            indptr = np.asarray(npz["indptr"], dtype=np.int64)
            shape = tuple(npz["shape"]) if "shape" in npz.files else None
    except (OSError, ValueError):
        return None
    if len(indptr) != n_users + 1 or (shape is not None and shape[0] != n_users):
        return None
    counts = np.diff(indptr).astype(np.float64)
    return counts if counts.sum() > 0 else None


def load_ids(
    users_from: str | None,
    zipf_users: int,
    zipf_items: int,
    zipf_s: float,
    rng: np.random.Generator | None = None,
) -> IdSource:
    """--users-from (model dir or interaction file) if given, else synthetic Zipf ids."""
    if users_from:
        p = Path(users_from)
        if p.is_dir():
            return from_model_dir(p, zipf_s, rng)
        if p.is_file():
            return from_interactions(p, rng)
        raise UsageError(f"--users-from {users_from}: no such file or directory")
    return synthetic(zipf_users, zipf_items, zipf_s, rng)
