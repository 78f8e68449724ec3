"""Item-to-item transitions as a scorer (#11): what followed the user's last items.

``T[i, j]`` counts how often item ``j`` came within ``window`` steps after item ``i`` in the
training sequences (a gap of ``g`` steps counts ``1/g``), each row divided by its sum: an
estimate of "what comes next after ``i``". A user's score of item ``j`` is
``sum_k decay**k * T[s[-1-k], j]`` over their last ``n_last`` items ``s``, newest first.

On short, sparse sequences (Amazon Beauty) this simple model ranks the next item better than
a self-attention model trained in minutes; in the mixture it adds order to the kNN's bag of
items. ``window``, ``decay`` and ``n_last`` are chosen on the validation split
(:func:`choose_transitions`), never fixed for one data set.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.ranking.base import UserBatch, from_batch

log = logging.getLogger(__name__)

SOURCE = "sequence"
RECENT = "sequence_recent"  # batch.cache: each user's ordered items (oldest first)

# STRATEGY_SEQUENCE's share of the transitions beside the sequence model (chosen on validation)
SHARES = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
# on ML-1M and Beauty validation chose the edge of (1, 2, 3) x (1, 3, 5); wider is tried now
WINDOWS = (1, 2, 3, 5, 8)
DECAYS = (0.3, 0.6, 1.0)
N_LAST = (1, 3, 5, 10, 20)


def fit_transitions(sequences: Sequence[np.ndarray], n_items: int, window: int) -> sp.csr_matrix:
    """The row-normalised transition matrix (float32 CSR, ``n_items x n_items``)."""
    rows, cols, vals = [], [], []
    for gap in range(1, window + 1):
        for s in sequences:
            if len(s) > gap:
                rows.append(s[:-gap])
                cols.append(s[gap:])
                vals.append(np.full(len(s) - gap, 1.0 / gap, dtype=np.float32))
    if not rows:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    counts = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_items, n_items), dtype=np.float32,
    )  # fmt: skip
    counts.sum_duplicates()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0
    return (sp.diags((1.0 / totals).astype(np.float32)) @ counts).tocsr().astype(np.float32)


def recent_weights(
    recent: Sequence[np.ndarray], n_items: int, decay: float, n_last: int
) -> sp.csr_matrix:
    """``(users, n_items)``: ``decay**k`` at each user's ``k``-th newest item (k < n_last);
    an item repeated among the last ones adds up."""
    indptr, cols, vals = [0], [], []
    for s in recent:
        last = np.asarray(s, dtype=np.int64)[::-1][:n_last]
        cols.append(last)
        vals.append(decay ** np.arange(len(last), dtype=np.float64))
        indptr.append(indptr[-1] + len(last))
    if not cols:
        return sp.csr_matrix((0, n_items), dtype=np.float32)
    out = sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), np.concatenate(cols), np.array(indptr)),
        shape=(len(recent), n_items),
    )  # fmt: skip
    out.sum_duplicates()
    return out


class TransitionScorer:
    """Transition scores of the candidates. The users' ordered items come with the batch
    (``batch.cache[RECENT]``: serving puts the user's sequence there) or from
    ``recent_of(batch)`` (tuning and evaluation: the users' inputs)."""

    name = "transitions"
    source = SOURCE
    normalise = "sum"

    def __init__(
        self,
        matrix: sp.csr_matrix,
        decay: float,
        n_last: int,
        recent_of: Callable[[UserBatch], Sequence[np.ndarray]] | None = None,
    ):
        self.matrix = matrix.tocsr()
        self.decay, self.n_last = float(decay), int(n_last)
        self.recent_of = recent_of
        self.n_items = matrix.shape[0]

    def user_scores(self, recent: Sequence[np.ndarray]) -> sp.csr_matrix:
        """``(users, n_items)`` sparse scores over the whole catalogue."""
        weights = recent_weights(recent, self.n_items, self.decay, self.n_last)
        return (weights @ self.matrix).tocsr()

    def one_user_scores(self, recent: np.ndarray) -> np.ndarray:
        """One user's scores over the whole catalogue, dense float64 (serving: a few row
        slices and one ``bincount``, no sparse products)."""
        last = np.asarray(recent, dtype=np.int64)[::-1][: self.n_last]
        indptr, indices, data = self.matrix.indptr, self.matrix.indices, self.matrix.data
        spans = [(indptr[i], indptr[i + 1]) for i in last.tolist()]
        if not spans:
            return np.zeros(self.n_items)
        cols = np.concatenate([indices[a:b] for a, b in spans])
        vals = np.concatenate([data[a:b] * self.decay**k for k, (a, b) in enumerate(spans)])
        return np.bincount(cols, weights=vals, minlength=self.n_items)

    def score(self, batch: UserBatch, candidates: np.ndarray) -> np.ndarray:
        recent = from_batch(batch, RECENT, self.recent_of,
                            "the transitions scorer needs the users' ordered items")  # fmt: skip
        if len(recent) == 1:
            return self.one_user_scores(recent[0])[candidates]
        scores = self.user_scores(recent)
        out = np.empty(candidates.shape, dtype=np.float64)
        for start in range(0, len(candidates), 256):  # bounded dense rows
            dense = scores[start : start + 256].toarray()
            out[start : start + 256] = np.take_along_axis(
                dense, candidates[start : start + 256], axis=1
            )
        return out


def _validation_users(
    sequences: Sequence[np.ndarray], valid: Sequence[np.ndarray], n_users: int, seed: int
) -> np.ndarray:
    """Users with a held-out item and a sequence before it, at most ``n_users`` of them
    drawn with ``seed`` (the same users for every choice made with the same arguments)."""
    pairs = zip(valid, sequences, strict=True)
    users = np.flatnonzero([len(v) > 0 and len(s) > 0 for v, s in pairs])
    if len(users) > n_users:
        users = np.sort(np.random.default_rng(seed).choice(users, n_users, replace=False))
    return users


def _ndcg_at(scores: sp.csr_matrix, seen: Sequence[np.ndarray], targets: np.ndarray, k: int):
    """NDCG@k of one held-out item per user over the whole catalogue (seen items never
    ranked; only items with a positive score are)."""
    total = 0.0
    for r in range(scores.shape[0]):
        lo, hi = scores.indptr[r], scores.indptr[r + 1]
        items, vals = scores.indices[lo:hi], scores.data[lo:hi]
        t = targets[r]
        if t not in items or t in seen[r]:
            continue
        mine = vals[items == t][0]
        mask = vals > mine
        better = int(mask.sum()) - int(np.isin(items[mask], seen[r]).sum())
        ties = vals == mine  # ties ranked after the target would be optimistic: count half
        better += (int(ties.sum()) - 1 - int(np.isin(items[ties], seen[r]).sum())) // 2
        if better < k:
            total += 1.0 / np.log2(better + 2)
    return total / max(len(targets), 1)


def choose_transitions(
    sequences: Sequence[np.ndarray],
    valid: Sequence[np.ndarray],
    n_items: int,
    n_users: int = 6000,
    k: int = 10,
    seed: int = 0,
    max_seconds: float = 60.0,
) -> tuple[dict[str, Any], sp.csr_matrix]:
    """``window``, ``decay`` and ``n_last`` with the best NDCG@k of the transitions alone on
    the validation users (``valid[u]``: the item after ``sequences[u]``), each window's
    matrix fitted on ``sequences``. Returns the choice (with every setting's score) and the
    chosen window's matrix."""
    started = time.perf_counter()
    users = _validation_users(sequences, valid, n_users, seed)
    recent = [sequences[u] for u in users.tolist()]
    targets = np.array([valid[u][0] for u in users.tolist()], dtype=np.int64)
    tried: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any], sp.csr_matrix | None] = (-1.0, {}, None)
    for window in WINDOWS:
        matrix = fit_transitions(sequences, n_items, window)
        for decay, n_last in itertools.product(DECAYS, N_LAST):
            if n_last == 1 and decay != DECAYS[0]:
                continue  # one item: the decay plays no part
            scorer = TransitionScorer(matrix, decay, n_last)
            got = _ndcg_at(scorer.user_scores(recent), recent, targets, k)
            setting = {"window": window, "decay": decay, "n_last": n_last}
            setting[f"ndcg@{k}"] = round(float(got), 5)
            tried.append(setting)
            if got > best[0]:
                best = (got, setting, matrix)
        if time.perf_counter() - started > max_seconds:
            break
    assert best[2] is not None
    choice = {**best[1], "validation_users": len(users), "tried": tried,
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    log.info("transitions chosen on %d validation users: %s", len(users), best[1])
    return choice, best[2]


def with_transitions(
    logits: np.ndarray, transitions: sp.csr_matrix | np.ndarray, share: float
) -> np.ndarray:
    """STRATEGY_SEQUENCE's scores over the whole catalogue, ``(users, n_items)`` float64:
    the sequence model's logits when ``share`` is 0, else the mixture of the two next-item
    distributions, ``(1 - share) * softmax(logits) + share * t``, with ``t`` the transition
    scores (sparse or dense, one row per user) divided by their sum (all zero for a user
    whose items never had a successor)."""
    if not share:
        return np.atleast_2d(np.asarray(logits, dtype=np.float64))
    logits = np.atleast_2d(np.asarray(logits, dtype=np.float32))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))  # float32: half the time
    probs *= (1.0 - share) / probs.sum(axis=1, keepdims=True)
    dense = transitions.toarray() if sp.issparse(transitions) else np.atleast_2d(transitions)
    totals = dense.sum(axis=1, keepdims=True)
    scale = np.divide(share, totals, out=np.zeros_like(totals), where=totals > 0)
    return dense * scale + probs


def choose_share(
    logits_of: Callable[[np.ndarray], np.ndarray],
    scorer: TransitionScorer,
    sequences: Sequence[np.ndarray],
    valid: Sequence[np.ndarray],
    n_users: int = 6000,
    k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """The transitions' share in STRATEGY_SEQUENCE (of ``SHARES``) with the best NDCG@k on
    the validation users, ranking the whole catalogue without seen items, as served.
    ``logits_of(users)``: the sequence model's logits after each user's sequence."""
    users = _validation_users(sequences, valid, n_users, seed)
    gains = np.zeros(len(SHARES))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for start in range(0, len(users), 512):
        chunk = users[start : start + 512]
        recent = [sequences[u] for u in chunk.tolist()]
        logits = logits_of(chunk)
        transitions = scorer.user_scores(recent)
        targets = np.array([valid[u][0] for u in chunk.tolist()])
        rows = np.repeat(np.arange(len(chunk)), [len(r) for r in recent])
        for n, share in enumerate(SHARES):
            mixed = with_transitions(logits, transitions, share)
            mixed[rows, np.concatenate(recent)] = -np.inf
            top = np.argpartition(-mixed, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(
                top, np.argsort(-np.take_along_axis(mixed, top, axis=1), axis=1), axis=1
            )
            gains[n] += ((top == targets[:, None]) * discounts).sum()
    ndcg = gains / max(len(users), 1)
    best = int(np.argmax(ndcg))
    log.info("STRATEGY_SEQUENCE: transitions share %.2f on %d validation users (NDCG@%d %.5f)",
             SHARES[best], len(users), k, ndcg[best])  # fmt: skip
    return {"share": SHARES[best],
            "shares": {str(s): round(float(v), 5) for s, v in zip(SHARES, ndcg, strict=True)}}
