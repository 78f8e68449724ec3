"""A user's sequence state for serving (#11): read, encode, cache, rank.

The state is a function of the user's ordered items (training tail + streamed events).
Recommend uses the state cached in Redis when it reflects all the user's events; else it
encodes the sequence on the call and caches it off the call's path. After each acknowledged
feedback batch, :func:`refresh_states` re-encodes the users it touched, off the request path,
and stores each state with a compare-and-set on the user's event count: a state computed from
a sequence that has since moved on is never stored."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsvc.store import StoreError, UserStore

log = logging.getLogger(__name__)


@dataclass
class SequenceView:
    """What ranking needs: the user's seen items (indices, training + feedback, positive or
    not), their ordered sequence (item indices, oldest first) and its state (None: empty)."""

    seen: np.ndarray
    sequence: np.ndarray
    state: np.ndarray | None
    events: int
    fresh: bool  # the state came from the cache


async def read_view(store: UserStore, model: Any, user_id: str) -> SequenceView:
    """One Redis round trip (or none, from the state cache) and at most one encode."""
    seq_model = model.sequence
    read = await store.get_sequence(user_id, model.data_until_ms)
    train_items, _ = model.training_history(user_id)
    feedback = model.items.indices(read.items) if read.items else np.empty(0, np.int64)
    seen = np.union1d(train_items, feedback[feedback >= 0])
    ordered = model.items.indices(read.ordered) if read.ordered else np.empty(0, np.int64)
    sequence = seq_model.sequence(user_id, ordered[ordered >= 0])
    cached = read.cached
    if cached.fresh_for(seq_model.version):
        assert cached.blob is not None
        return SequenceView(seen, sequence, seq_model.state_from_bytes(cached.blob),
                            cached.events, True)  # fmt: skip
    state = seq_model.state(sequence) if len(sequence) else None
    return SequenceView(seen, sequence, state, cached.events, False)


def sequence_scores(model: Any, view: SequenceView) -> np.ndarray:
    """STRATEGY_SEQUENCE's scores (float64, all items) of a user's view: the model's
    logits, with the transitions from their last items where the bundle mixes them in."""
    assert view.state is not None
    return model.sequence.next_scores(view.state, [view.sequence])[0]


def top_k(
    scores: np.ndarray,
    k: int,
    banned: Sequence[np.ndarray],
    restrict: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items (and their scores) of a score vector, never a banned item and,
    with ``restrict``, only items of that list."""
    scores = scores.copy()
    if restrict is not None:
        allowed = np.zeros(len(scores), dtype=bool)
        allowed[restrict] = True
        scores[~allowed] = -np.inf
    for b in banned:
        if len(b):
            scores[b] = -np.inf
    n = min(k, int(np.isfinite(scores).sum()))
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    top = np.argpartition(-scores, n - 1)[:n]
    top = top[np.argsort(-scores[top], kind="stable")]
    return top, scores[top]


async def cache_state(store: UserStore, model: Any, user_id: str, view: SequenceView) -> None:
    """Store the view's state (compare-and-set on its event count); a cache of derived
    data, so failures only cost a re-encode later."""
    if view.state is None or view.fresh:
        return
    seq_model = model.sequence
    try:
        await store.put_sequence_state(
            user_id, view.events, seq_model.state_to_bytes(view.state), seq_model.version
        )
    except StoreError as exc:
        log.info("sequence state not cached for %s: %s", user_id, exc)


async def refresh_states(store: UserStore, model: Any, user_ids: Sequence[str]) -> None:
    """After the ack of a feedback batch: re-encode and cache each user's state."""
    for user_id in dict.fromkeys(user_ids):
        try:
            view = await read_view(store, model, user_id)
        except StoreError as exc:
            log.info("sequence state of %s not refreshed: %s", user_id, exc)
            continue
        await cache_state(store, model, user_id, view)

