"""Reading interaction logs; id maps from external string ids to dense ints.

Two input formats are accepted (chosen by :func:`read_interactions`):

* CSV or TSV with a header: ``user_id,item_id`` plus optional ``event_type``,
  ``value``, ``weight``, ``timestamp`` (epoch s/ms or ISO 8601) and
  ``event_id`` columns (rows repeating an event id count once). Ids are
  arbitrary strings.
* The line format of the Gowalla split: ``user item item ...`` per line.

Event order (issue #11): a CSV/TSV log is ordered by its ``timestamp`` column
(rows with equal times keep their line order). A line file whose every line is
``user item`` (the ML-1M / Beauty sequence files of SASRec and BERT4Rec) is
ordered by line: each user's lines are oldest first. A line file with several
items on a line (Gowalla) carries no order. :attr:`Interactions.ordered` says
which; :func:`user_sequences` gives each user's items in order.

Each row gets a weight: the ``weight`` column when present, else the weight of
its event type (ratings: ``weight * (value - rating_midpoint)``), else 1. The
matrix sums the weights per (user, item) and keeps only positive sums, so
negative feedback (dislike, skip, low ratings) never counts as a like.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from recsvc.config import DEFAULT_EVENT_WEIGHTS


class IdMap:
    """A bijection between external string ids and dense indices ``0..n-1``."""

    def __init__(self, ids: Iterable[str]):
        self.ids: list[str] = list(ids)
        self._index = {id_: i for i, id_ in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError("duplicate ids in IdMap")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._index

    def index(self, id_: str) -> int:
        """The dense index of ``id_``; ``KeyError`` if unknown."""
        return self._index[id_]

    def get(self, id_: str, default: int = -1) -> int:
        return self._index.get(id_, default)

    def indices(self, ids: Sequence[str]) -> np.ndarray:
        """Dense indices of ``ids`` as int64, ``-1`` for unknown ids."""
        get = self._index.get
        return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def save(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{id_}\n" for id_ in self.ids)

    @classmethod
    def load(cls, path: Path) -> IdMap:
        with open(path, encoding="utf-8") as f:
            return cls(line.rstrip("\n") for line in f)


def normalise_event_type(name: str) -> str:
    """``"Add-To-Cart"`` -> ``"add_to_cart"``."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def event_weight(
    event_type: str,
    value: float,
    event_weights: dict[str, float],
    rating_midpoint: float,
) -> float:
    """The weight of one event; ``ValueError`` for an unknown type."""
    try:
        weight = event_weights[event_type]
    except KeyError:
        raise ValueError(
            f"unknown event type {event_type!r}; known: {sorted(event_weights)}"
        ) from None
    if event_type == "rating":
        return weight * (value - rating_midpoint)
    return weight


@dataclass
class Interactions:
    """Parallel arrays: one row per interaction (external ids, weight, time).

    ``timestamps_ms`` is 0 where the log gave no time. ``ordered``: the rows of
    each user, sorted stably by time, are in the order the events happened.
    """

    user_ids: list[str]
    item_ids: list[str]
    weights: np.ndarray
    timestamps_ms: np.ndarray
    ordered: bool = False

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def latest_ms(self) -> int:
        """The latest event time in the log (0 if it has none)."""
        return int(self.timestamps_ms.max(initial=0))

    @classmethod
    def concat(cls, parts: Sequence[Interactions]) -> Interactions:
        return cls(
            [u for p in parts for u in p.user_ids],
            [i for p in parts for i in p.item_ids],
            np.concatenate([p.weights for p in parts]),
            np.concatenate([p.timestamps_ms for p in parts]),
            all(p.ordered for p in parts),
        )


def parse_timestamp_ms(text: str) -> int:
    """Epoch seconds or milliseconds (told apart by size), or ISO 8601 -> ms."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return int(stamp.timestamp() * 1000)
    return int(number if number > 1e11 else number * 1000)


def _progress_lines(path: Path, desc: str, show: bool) -> Iterator[str]:
    size = os.path.getsize(path)
    with (
        open(path, encoding="utf-8", newline="") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=desc, disable=not show, leave=False
        ) as bar,
    ):
        for line in f:
            bar.update(len(line))
            yield line


def _looks_like_header(first_line: str) -> bool:
    fields = first_line.replace("\t", ",").split(",")
    return "user_id" in [f.strip().lower() for f in fields]


def read_many(
    paths: Sequence[str | os.PathLike[str]],
    event_weights: dict[str, float] | None = None,
    rating_midpoint: float = 3.0,
    show_progress: bool = False,
) -> Interactions:
    """Several logs (e.g. the original interactions plus feedback exports) as one."""
    return Interactions.concat(
        [read_interactions(p, event_weights, rating_midpoint, show_progress) for p in paths]
    )


def read_interactions(
    path: str | os.PathLike[str],
    event_weights: dict[str, float] | None = None,
    rating_midpoint: float = 3.0,
    show_progress: bool = False,
) -> Interactions:
    """Read an interaction log in either accepted format (detected from line 1)."""
    path = Path(path)
    weights_by_type = event_weights or DEFAULT_EVENT_WEIGHTS
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    if _looks_like_header(first):
        result = _read_table(path, first, weights_by_type, rating_midpoint, show_progress)
    elif "," in first:
        raise ValueError(
            f"{path}:1: a CSV/TSV log needs a header with user_id and item_id columns, got {first!r}"
        )
    else:
        result = _read_lines(path, show_progress)
    if not len(result):
        raise ValueError(f"{path}: no interactions found")
    return result


def _read_lines(path: Path, show_progress: bool) -> Interactions:
    users: list[str] = []
    items: list[str] = []
    pairs_only = True  # every line ``user item``: the sequence format, ordered by line
    for line in _progress_lines(path, "reading", show_progress):
        parts = line.split()
        if len(parts) < 2:
            continue  # blank, or a user with no items
        pairs_only = pairs_only and len(parts) == 2
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
    n = len(users)
    return Interactions(
        users, items, np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.int64), pairs_only
    )


def _read_table(
    path: Path,
    header_line: str,
    event_weights: dict[str, float],
    rating_midpoint: float,
    show_progress: bool,
) -> Interactions:
    delimiter = "\t" if "\t" in header_line else ","
    lines = _progress_lines(path, "reading", show_progress)
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader)]
    col = {name: i for i, name in enumerate(header)}
    missing = {"user_id", "item_id"} - set(col)
    if missing:
        raise ValueError(f"{path}: header lacks {sorted(missing)} (has {header})")
    u_col, i_col = col["user_id"], col["item_id"]
    type_col, value_col, weight_col = col.get("event_type"), col.get("value"), col.get("weight")
    time_col, event_col = col.get("timestamp"), col.get("event_id")

    users: list[str] = []
    items: list[str] = []
    weights: list[float] = []
    times: list[int] = []
    seen_events: set[str] = set()
    for lineno, row in enumerate(reader, 2):
        if not row:
            continue
        if event_col is not None and row[event_col]:
            # a feedback export may hold an event twice (at-least-once): count it once
            if row[event_col] in seen_events:
                continue
            seen_events.add(row[event_col])
        try:
            user, item = row[u_col].strip(), row[i_col].strip()
            if not user or not item:
                raise ValueError("empty user_id or item_id")
            if weight_col is not None and row[weight_col].strip():
                weight = float(row[weight_col])
            elif type_col is not None and row[type_col].strip():
                value = float(row[value_col]) if value_col is not None and row[value_col] else 0.0
                weight = event_weight(
                    normalise_event_type(row[type_col]), value, event_weights, rating_midpoint
                )
            else:
                weight = 1.0
            stamp = row[time_col] if time_col is not None else ""
            times.append(parse_timestamp_ms(stamp) if stamp.strip() else 0)
        except (ValueError, IndexError) as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
        users.append(user)
        items.append(item)
        weights.append(weight)
    return Interactions(
        users, items, np.asarray(weights, dtype=np.float32), np.asarray(times, dtype=np.int64),
        ordered=time_col is not None,
    )


def user_sequences(interactions: Interactions, users: IdMap, items: IdMap) -> list[np.ndarray]:
    """Each user's positive events as item indices, oldest first (``users`` order).

    Rows are sorted stably by time, so rows of equal time keep their line order;
    events with a weight <= 0 (dislikes, low ratings) are left out. Meaningful
    only when ``interactions.ordered``."""
    rows = users.indices(interactions.user_ids)
    cols = items.indices(interactions.item_ids)
    keep = (interactions.weights > 0) & (rows >= 0) & (cols >= 0)
    rows, cols, times = rows[keep], cols[keep], interactions.timestamps_ms[keep]
    order = np.lexsort((times, rows))  # by user, then time; stable within equal keys
    counts = np.bincount(rows, minlength=len(users))
    return np.split(cols[order], np.cumsum(counts)[:-1])


def build_matrix(
    interactions: Interactions,
    users: IdMap | None = None,
    items: IdMap | None = None,
) -> tuple[sp.csr_matrix, IdMap, IdMap]:
    """The user x item CSR matrix of summed positive weights, and the id maps.

    Ids not in the given maps are appended (in order of first appearance), so a
    previous model's maps can be extended. Entries whose summed weight is not
    positive are dropped.
    """
    users = IdMap(dict.fromkeys([*(users.ids if users else []), *interactions.user_ids]))
    items = IdMap(dict.fromkeys([*(items.ids if items else []), *interactions.item_ids]))
    rows = users.indices(interactions.user_ids)
    cols = items.indices(interactions.item_ids)
    matrix = sp.csr_matrix(
        (interactions.weights.astype(np.float32), (rows, cols)),
        shape=(len(users), len(items)),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    matrix.data[matrix.data <= 0] = 0
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix, users, items


# --- catalogues: item content ---------------------------------------------------

_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)
_STOPWORDS = frozenset(
    "the and for with from this that your you are was were has have not but all any can "
    "its our out new one two its into per via set".split()
)


def content_attributes(
    categories: Iterable[str] = (), tags: Iterable[str] = (), text: str = ""
) -> list[str]:
    """An item's content as attribute names: ``category:x``, ``tag:x``, ``word:x``."""
    attrs = [f"category:{c.strip().lower()}" for c in categories if c.strip()]
    attrs += [f"tag:{t.strip().lower()}" for t in tags if t.strip()]
    attrs += [f"word:{w}" for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]
    return list(dict.fromkeys(attrs))


def _as_list(value: object, separator: str = "|") -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v for v in str(value).split(separator) if v.strip()]


def read_catalogue(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Item id -> content attributes, from JSONL or CSV/TSV.

    JSONL: one object per line with ``item_id`` and any of ``category`` /
    ``categories``, ``tags`` (list or ``a|b``), ``title`` / ``text``.
    CSV/TSV: a header with ``item_id`` and any of the same columns (lists
    separated by ``|``).
    """
    path = Path(path)
    rows: list[dict[str, object]] = []
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.lstrip().startswith("{"):
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: invalid JSON ({exc})") from None
        else:
            rows = list(csv.DictReader(f, delimiter="\t" if "\t" in first else ","))
    catalogue: dict[str, list[str]] = {}
    for lineno, row in enumerate(rows, 1):
        item = str(row.get("item_id") or "").strip()
        if not item:
            raise ValueError(f"{path}: row {lineno} has no item_id")
        catalogue[item] = content_attributes(
            _as_list(row.get("categories")) + _as_list(row.get("category")),
            _as_list(row.get("tags")),
            " ".join(str(row.get(k) or "") for k in ("title", "text")),
        )
    if not catalogue:
        raise ValueError(f"{path}: no items found")
    return catalogue


def build_item_attributes(
    items: IdMap, catalogue: dict[str, list[str]], min_items: int = 2
) -> tuple[sp.csr_matrix, IdMap]:
    """The binary items x attributes matrix for the model's items, and the
    attribute vocabulary (attributes of fewer than ``min_items`` items dropped)."""
    counts: dict[str, int] = {}
    for item in items.ids:
        for attr in catalogue.get(item, ()):
            counts[attr] = counts.get(attr, 0) + 1
    vocab = IdMap(sorted(a for a, c in counts.items() if c >= min_items))
    rows, cols = [], []
    for row, item in enumerate(items.ids):
        for attr in catalogue.get(item, ()):
            col = vocab.get(attr)
            if col >= 0:
                rows.append(row)
                cols.append(col)
    matrix = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(items), len(vocab))
    )
    return matrix, vocab
