"""Offline evaluation: full-ranking Recall@k / NDCG@k and a per-user holdout split.

The ranking protocol is the one of LightGCN's published code (He et al., SIGIR 2020),
which is also what the published Gowalla numbers use:

* every item is ranked (no sampled negatives);
* the user's training items are excluded (their scores set to ``-inf``);
* ``Recall@k = hits@k / n_test`` where ``n_test`` is the user's number of test items;
* ``NDCG@k`` uses binary gains, ``DCG = sum_{hit at rank r (0-based)} 1 / log2(r + 2)``,
  and the ideal DCG is taken over ``min(k, n_test)`` positions;
* both are averaged over all users that have at least one test item.

Everything is vectorised per batch of users (``argpartition`` over the items, then a sort
of the top ``k`` only); there is no per-item Python. Equal scores are ranked by item id
(smaller first), so results are deterministic (LightGCN's ``torch.topk`` leaves ties to the
implementation; this only matters for models that emit many exactly equal scores).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "holdout_split",
    "items_to_csr",
    "ranking_metrics",
    "read_user_item_lines",
]

ScoresFn = Callable[[np.ndarray], np.ndarray]
_PART_CHUNK = 256  # rows per argpartition call


def read_user_item_lines(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Read a file in the ``user item item ...`` line format (LightGCN / Gowalla).

    Each non-empty line holds a user id followed by zero or more item ids, separated by
    whitespace; ids are dense non-negative integers. Returns a list indexed by user id whose
    entry is the user's items as a sorted, de-duplicated ``int64`` array (empty for user ids
    that are missing from the file or have no items). A user id that appears on several lines
    gets the union of its items. Use :func:`items_to_csr` to turn the result into a matrix.
    """
    per_user: dict[int, list[np.ndarray]] = {}
    with open(path, encoding="ascii") as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            ids = np.array(fields, dtype=np.int64)
            if (ids < 0).any():
                raise ValueError(f"{path}:{lineno}: negative id")
            per_user.setdefault(int(ids[0]), []).append(ids[1:])
    n_users = max(per_user) + 1 if per_user else 0
    out = [np.empty(0, dtype=np.int64) for _ in range(n_users)]
    for u, chunks in per_user.items():
        out[u] = np.unique(np.concatenate(chunks))
    return out


def items_to_csr(
    items: Sequence[np.ndarray], n_users: int | None = None, n_items: int | None = None
) -> sp.csr_matrix:
    """Binary ``users x items`` CSR matrix (float32, sorted indices) from per-user item lists."""
    if n_users is None:
        n_users = len(items)
    if len(items) > n_users:
        raise ValueError("more item lists than n_users")
    lengths = np.array([len(x) for x in items], dtype=np.int64)
    cols = (
        np.concatenate([np.asarray(x, dtype=np.int64) for x in items])
        if len(items)
        else np.empty(0, dtype=np.int64)
    )
    if n_items is None:
        n_items = int(cols.max()) + 1 if cols.size else 0
    if cols.size and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError("item id out of range")
    rows = np.repeat(np.arange(len(items), dtype=np.int64), lengths)
    m = sp.csr_matrix(
        (np.ones(cols.size, dtype=np.float32), (rows, cols)), shape=(n_users, n_items)
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def _dcg_discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _fix_boundary_ties(
    scores: np.ndarray, part: np.ndarray, part_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Make the top-k set deterministic when items tie with the k-th score.

    ``argpartition`` picks an arbitrary subset of the items equal to the k-th largest score.
    For the (usually few) rows where more items share that score than fit, re-select so the
    smallest item ids win, i.e. ties are broken by item id as in a stable descending sort.
    """
    kk = part.shape[1]
    thr = part_scores.min(axis=1)
    n_eq_all = np.count_nonzero(scores == thr[:, None], axis=1)
    n_eq_in = np.count_nonzero(part_scores == thr[:, None], axis=1)
    amb = np.flatnonzero(n_eq_all > n_eq_in)
    if amb.size == 0:
        return part, part_scores
    sub = scores[amb]
    t = thr[amb, None]
    eq = sub == t
    need = kk - np.count_nonzero(sub > t, axis=1)
    take = (sub > t) | (eq & (np.cumsum(eq, axis=1, dtype=np.int32) <= need[:, None]))
    r, c = np.nonzero(take)  # row-major: exactly kk per row, item ids ascending
    part = part.copy()
    part_scores = part_scores.copy()
    part[amb] = c.reshape(amb.size, kk)
    part_scores[amb] = sub[r, c].reshape(amb.size, kk)
    return part, part_scores


def ranking_metrics(
    scores_fn: ScoresFn,
    train: sp.spmatrix,
    test_items: Sequence[np.ndarray],
    k: int = 20,
    batch_users: int = 2048,
) -> dict[str, float]:
    """Full-ranking Recall@k and NDCG@k (LightGCN protocol, see the module docstring).

    Args:
        scores_fn: ``scores_fn(users)`` with ``users`` an ``int64`` array of user indices
            returns a dense ``(len(users), n_items)`` score array (float32 preferred; higher
            is better). Scores must not be NaN. The array may be modified in place while it
            is being evaluated; writeable arrays are restored before the next call, so a
            function returning views of a precomputed matrix is safe.
        train: ``users x items`` sparse matrix of the interactions to exclude from ranking
            (any stored entry counts, whatever its value).
        test_items: per user (index = user id), the held-out items. Users with no entry or
            an empty array are not evaluated. ``len(test_items)`` may be below the number
            of rows of ``train``.
        k: cut-off.
        batch_users: users scored per ``scores_fn`` call.

    Returns:
        ``{"recall": ..., "ndcg": ..., "n_users": ...}`` with the means over the evaluated
        users (``nan`` when there are none) and their count.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    if batch_users < 1:
        raise ValueError("batch_users must be >= 1")
    train = sp.csr_matrix(train)
    n_users, n_items = train.shape
    if len(test_items) > n_users:
        raise ValueError("test_items has more users than train has rows")

    test_lists = [np.asarray(t, dtype=np.int64).ravel() for t in test_items]
    test_csr = items_to_csr(test_lists, n_users=len(test_lists), n_items=n_items)
    n_test = np.diff(test_csr.indptr)
    eval_users = np.flatnonzero(n_test > 0).astype(np.int64)
    if eval_users.size == 0:
        return {"recall": float("nan"), "ndcg": float("nan"), "n_users": 0}

    kk = min(k, n_items)
    disc = _dcg_discounts(kk)
    idcg_table = np.concatenate([[1.0], np.cumsum(disc)])  # idcg_table[m] = ideal DCG, m hits

    recall_sum = 0.0
    ndcg_sum = 0.0
    for start in range(0, eval_users.size, batch_users):
        users = eval_users[start : start + batch_users]
        nb = users.size
        scores = scores_fn(users)
        if sp.issparse(scores):
            scores = scores.toarray()
        scores = np.asarray(scores)
        if scores.shape != (nb, n_items):
            raise ValueError(f"scores_fn returned shape {scores.shape}, expected {(nb, n_items)}")
        if not np.issubdtype(scores.dtype, np.floating):
            scores = scores.astype(np.float32)
        if np.isnan(scores).any():
            raise ValueError("scores_fn returned NaN scores")

        # Exclude the training items: set them to -inf (restored afterwards if we wrote into
        # the caller's array).
        tr = train[users]
        rows = np.repeat(np.arange(nb), np.diff(tr.indptr))
        cols = tr.indices
        restore = None
        if not scores.flags.writeable:
            scores = scores.copy()
        elif cols.size:
            restore = scores[rows, cols].copy()
        scores[rows, cols] = -np.inf
        try:
            # Top-kk per row: partition the negated scores so the kk largest come first
            # (boundary ties re-selected by item id), then sort only those. Partitioning
            # -scores at kk-1 (not scores at n-kk) is ~10x faster on sparse-like score rows
            # with many equal zeros; chunks bound the memory of the negated copy.
            if kk < n_items:
                part = np.empty((nb, kk), dtype=np.intp)
                for c0 in range(0, nb, _PART_CHUNK):
                    neg = np.negative(scores[c0 : c0 + _PART_CHUNK])
                    part[c0 : c0 + _PART_CHUNK] = np.argpartition(neg, kk - 1, axis=1)[:, :kk]
            else:
                part = np.broadcast_to(np.arange(n_items), (nb, n_items)).copy()
            part_scores = np.take_along_axis(scores, part, axis=1)
            if kk < n_items:
                part, part_scores = _fix_boundary_ties(scores, part, part_scores)
        finally:
            if restore is not None:
                scores[rows, cols] = restore
        # Descending score; equal scores ordered by item id (ascending), for determinism.
        order = np.lexsort((part, -part_scores), axis=1)
        top = np.take_along_axis(part, order, axis=1)  # (nb, kk), best first

        # Hits: look up (row, item) keys in the batch's sorted test keys.
        te = test_csr[users]
        te_keys = np.repeat(np.arange(nb, dtype=np.int64), np.diff(te.indptr)) * n_items
        te_keys += te.indices
        top_keys = np.arange(nb, dtype=np.int64)[:, None] * n_items + top
        pos = np.searchsorted(te_keys, top_keys)
        pos[pos == te_keys.size] = 0
        hits = te_keys[pos] == top_keys  # (nb, kk) bool

        nt = n_test[users]
        n_hits = hits.sum(axis=1)
        recall_sum += float(np.sum(n_hits / nt))
        dcg = hits @ disc
        idcg = idcg_table[np.minimum(nt, kk)]
        ndcg_sum += float(np.sum(dcg / idcg))

    n = int(eval_users.size)
    return {"recall": recall_sum / n, "ndcg": ndcg_sum / n, "n_users": n}


def holdout_split(
    train_csr: sp.spmatrix, fraction: float = 0.2, seed: int = 0
) -> tuple[sp.csr_matrix, list[np.ndarray]]:
    """Per-user random holdout of a fraction of each user's items (for validation).

    A user with ``n >= 2`` items gets ``min(n - 1, max(1, round(fraction * n)))`` of them held
    out (rounding half up), chosen uniformly at random; a user with 0 or 1 item keeps
    everything in training. With ``fraction == 0`` nothing is held out.

    Returns ``(train_part, valid_items)``: ``train_part`` is a CSR matrix of the same shape
    holding the remaining entries (values preserved, indices sorted), and ``valid_items[u]``
    the held-out item ids of user ``u`` (sorted ``int64`` array, possibly empty). The split
    is a deterministic function of the matrix and ``seed``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError("fraction must be in [0, 1)")
    m = sp.csr_matrix(train_csr, copy=True)
    m.sum_duplicates()
    m.sort_indices()
    n_users = m.shape[0]
    counts = np.diff(m.indptr).astype(np.int64)
    if fraction == 0.0:
        n_hold = np.zeros(n_users, dtype=np.int64)
    else:
        n_hold = np.floor(fraction * counts + 0.5).astype(np.int64)
        n_hold = np.maximum(n_hold, 1)
        n_hold = np.minimum(n_hold, counts - 1)
        n_hold[counts < 2] = 0

    rng = np.random.default_rng(seed)
    row = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    key = rng.random(m.nnz)
    order = np.lexsort((key, row))  # grouped by row (rows ascending), random within a row
    rank = np.empty(m.nnz, dtype=np.int64)
    rank[order] = np.arange(m.nnz) - m.indptr[row[order]]
    held = rank < n_hold[row]

    keep = ~held
    train_part = sp.csr_matrix(
        (m.data[keep], m.indices[keep], np.concatenate([[0], np.cumsum(counts - n_hold)])),
        shape=m.shape,
    )
    held_idx = m.indices[held].astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(n_hold)])
    valid_items = [held_idx[bounds[u] : bounds[u + 1]] for u in range(n_users)]
    return train_part, valid_items


def leave_one_out(model: object, path: str | os.PathLike[str], strategy: str, k: int = 10) -> dict:
    """The leave-one-out protocol of the SASRec / BERT4Rec papers (#11) on an ordered log:
    per user, the last item is the target and everything before it the input (the model is
    given that input, whatever it was trained on); every item is ranked, the input's items
    removed. HR@k and NDCG@k over all users of the log; a target the model does not know
    counts as a miss. ``strategy``: "sequence" (the sequence model), "cf" (the kNN scores
    of the input as a bag, the served CF ranking) or "blend" (the tuned mixture, its sequence
    member reading the input in order)."""
    from recsvc.data import IdMap, read_interactions, user_sequences

    log_ = read_interactions(path)
    if not log_.ordered:
        raise ValueError(f"{path}: leave-one-out needs ordered interactions (see recsvc.data)")
    items: IdMap = model.items  # type: ignore[attr-defined]
    users = IdMap(dict.fromkeys(log_.user_ids))
    unknown = IdMap(dict.fromkeys(i for i in log_.item_ids if i not in items))
    # items the model lacks get indices past its catalogue: they can be targets (misses)
    both = IdMap([*items.ids, *unknown.ids])
    seqs = [s for s in user_sequences(log_, users, both) if len(s) >= 2]
    n_items = len(items)
    inputs = [s[:-1][s[:-1] < n_items] for s in seqs]
    targets = [np.array([s[-1]]) if s[-1] < n_items else np.empty(0, np.int64) for s in seqs]
    history = items_to_csr(inputs, len(inputs), n_items)
    if strategy == "sequence":
        from generators.sequence import encode_batch

        runtime = model.sequence.runtime  # type: ignore[attr-defined]

        def scores(users_: np.ndarray) -> np.ndarray:
            seqs_ = [inputs[u] for u in users_]
            states = encode_batch(runtime.model, seqs_)
            return model.sequence.next_scores(states, seqs_).astype(np.float32)  # type: ignore[attr-defined,no-any-return]
    elif strategy == "cf":
        def scores(users_: np.ndarray) -> np.ndarray:
            return model.score_users(history[users_])  # type: ignore[attr-defined,no-any-return]
    elif strategy == "blend" and model.pipeline is not None:  # type: ignore[attr-defined]
        from recsvc.ranking import UserBatch
        from recsvc.ranking.sequence import STATES

        def scores(users_: np.ndarray) -> np.ndarray:
            batch = UserBatch(history[users_])
            if model.sequence is not None:  # type: ignore[attr-defined]
                from generators.sequence import encode_batch
                from recsvc.ranking.transitions import RECENT

                runtime = model.sequence.runtime  # type: ignore[attr-defined]
                batch.cache[STATES] = encode_batch(runtime.model, [inputs[u] for u in users_])
                batch.cache[RECENT] = [inputs[u] for u in users_]
            return model.pipeline.dense_scores(batch)  # type: ignore[attr-defined,no-any-return]
    else:
        raise ValueError(
            f"leave-one-out strategy must be sequence, cf or blend (a bundle with a mixture), "
            f"got {strategy!r}"
        )
    found = ranking_metrics(scores, history, targets, k=k, batch_users=256)
    n = len(seqs)  # over all users: users whose target the model lacks count as misses
    scale = found["n_users"] / n if n else float("nan")
    return {
        f"hr@{k}": found["recall"] * scale,
        f"ndcg@{k}": found["ndcg"] * scale,
        "users": n,
        "targets_unknown_to_model": n - int(found["n_users"]),
    }
