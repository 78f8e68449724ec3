"""A user's content profile: the distribution generated content is calibrated to.

The *facet* is the catalogue's main content kind (categories, else tags, else
title words: the first that covers at least half of the items, or the widest).
Each item spreads its weight evenly over its facet attributes (Steck 2018), so
a profile is a distribution over the facet's attributes.

A user's profile mixes two parts, as a Dirichlet posterior mean does:

    raw = kappa * p_long + v_session + prior

``p_long``: the normalised profile of the training history (the long-term
taste); ``v_session``: the summed, *signed* weights of what happened since
training (feedback, and the request's context): purchases add mass, dislikes
take it away; ``prior``: one item's worth of the generator's own attribute
distribution (never zero, so untried content can still appear). ``kappa`` is
the strength of the long-term taste in event-weight units: how many units of
recent events weigh as much as the whole past. It is fitted by
:func:`fit_session_prior` on the training log's time order (which recent
events best predict the next ones), not set by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

FACETS = ("category", "tag", "word")
KAPPA_GRID = tuple(float(2**k) for k in range(0, 13))  # 1 .. 4096 weight units
SESSION_LENGTHS = (1, 2, 4, 8, 16, 32)


def choose_facet(names: list[str], item_attributes: sp.csr_matrix) -> tuple[str, np.ndarray]:
    """The facet's name and its attribute indices (see the module docstring)."""
    n_items = max(item_attributes.shape[0], 1)
    coverage = {}
    for facet in FACETS:
        cols = np.array([i for i, n in enumerate(names) if n.startswith(facet + ":")], np.int64)
        if cols.size:
            covered = (item_attributes[:, cols].getnnz(axis=1) > 0).sum()
            coverage[facet] = (covered / n_items, cols)
    if not coverage:  # attributes without a known prefix: all of them
        return "", np.arange(len(names), dtype=np.int64)
    for facet, (share, cols) in coverage.items():
        if share >= 0.5:
            return facet, cols
    facet = max(coverage, key=lambda f: coverage[f][0])
    return facet, coverage[facet][1]


def facet_matrix(item_attributes: sp.csr_matrix, cols: np.ndarray) -> sp.csr_matrix:
    """Items x facet attributes, each row summing to 1 (or 0 for items without any)."""
    m = sp.csr_matrix(item_attributes[:, cols], dtype=np.float64)
    m.data[:] = 1.0
    counts = np.diff(m.indptr)
    m.data /= np.repeat(np.maximum(counts, 1), counts)
    return m


def fit_session_prior(
    users: np.ndarray,
    items: np.ndarray,
    weights: np.ndarray,
    order: np.ndarray,
    facet: sp.csr_matrix,
    max_users: int = 3000,
    seed: int = 0,
) -> dict[str, float | None]:
    """``kappa`` (see the module docstring) chosen on the log's time order.

    For each sampled user with >= 10 events, the last tenth of the history is
    the target; for session lengths 1, 2, 4 ... 32, the events just before it are the
    session and the earlier ones the long-term part. ``kappa`` maximises the
    mean log-likelihood of the targets' facet content under
    ``(kappa * p_long + v_session + prior) / (kappa + w_session + 1)``
    (prior: the catalogue's facet distribution). ``order``: event times (ties
    keep the log's row order).
    """
    grid = np.asarray(KAPPA_GRID)
    sort = np.lexsort((np.arange(len(users)), order, users))
    users, items, weights = users[sort], items[sort], np.maximum(weights[sort], 0.0)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    long_enough = np.flatnonzero(ends - starts >= 10)
    rng = np.random.default_rng(seed)
    if len(long_enough) > max_users:
        long_enough = np.sort(rng.choice(long_enough, max_users, replace=False))
    prior = np.asarray(facet.sum(axis=0)).ravel()
    prior /= max(prior.sum(), 1e-12)
    dense = facet.toarray() if facet.shape[1] <= 256 else None
    total = np.zeros(len(grid))
    count = 0
    for u in long_enough:
        s, e = starts[u], ends[u]
        n_target = max(1, (e - s) // 10)
        t0 = e - n_target

        def mass(lo: int, hi: int) -> np.ndarray:
            its, ws = items[lo:hi], weights[lo:hi]
            rows = dense[its] if dense is not None else facet[its].toarray()
            return ws @ rows

        target = mass(t0, e)
        if target.sum() <= 0:
            continue
        target /= target.sum()
        support = target > 0
        for length in SESSION_LENGTHS:
            if t0 - s < 2 * length:
                break
            v_session = mass(t0 - length, t0)
            long = mass(s, t0 - length)
            w_session, w_long = v_session.sum(), long.sum()
            if w_long <= 0:
                continue
            p_long = long / w_long
            q = (grid[:, None] * p_long[support] + v_session[support] + prior[support]) / (
                grid[:, None] + w_session + 1.0
            )[:, :1]
            total += np.log(np.maximum(q, 1e-12)) @ target[support]
            count += 1
    if not count:
        return {"kappa": None, "users": 0}  # too little history: events and history alike
    best = int(np.argmax(total))
    return {
        "kappa": float(grid[best]),
        "users": int(len(long_enough)),
        "log_likelihood": round(float(total[best] / count), 5),
        "log_likelihood_session_only": round(float(total[0] / count), 5),
        "log_likelihood_long_only": round(float(total[-1] / count), 5),
    }


def fit_for_catalogue(
    interactions, users, items, item_attributes: sp.csr_matrix, names: list[str], seed: int = 0
) -> dict[str, float | str | None]:  # type: ignore[no-untyped-def]
    """:func:`fit_session_prior` for a training log (:class:`recsvc.data.Interactions`
    with its user and item :class:`~recsvc.data.IdMap`), on the catalogue's facet."""
    facet, cols = choose_facet(names, item_attributes)
    u = users.indices(interactions.user_ids)
    i = items.indices(interactions.item_ids)
    ok = (u >= 0) & (i >= 0)
    fitted = fit_session_prior(
        u[ok], i[ok], interactions.weights[ok], interactions.timestamps_ms[ok],
        facet_matrix(item_attributes, cols), seed=seed,
    )  # fmt: skip
    return {"facet": facet, **fitted}


@dataclass
class Session:
    """What happened since training, as signed weights: feedback on items, the
    request's context items, and context attributes (each weighing ``attribute_weight``)."""

    items: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    weights: np.ndarray = field(default_factory=lambda: np.empty(0))
    attributes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    attribute_weight: float = 0.0


def since_training(
    items: np.ndarray,
    weights: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The part of a merged history (unique sorted items, summed weights) that is not
    the training history: the feedback since training, per item."""
    delta = weights.astype(np.float64).copy()
    train_items, train_weights = train
    if len(train_items) and len(items):
        pos = np.searchsorted(items, train_items)
        ok = pos < len(items)
        ok[ok] = items[pos[ok]] == train_items[ok]
        np.subtract.at(delta, pos[ok], train_weights[ok])
    keep = np.abs(delta) > 1e-9
    return items[keep], delta[keep]


class ContentProfile:
    """Per-catalogue data for content profiles (built once per model)."""

    def __init__(self, names: list[str], item_attributes: sp.csr_matrix, kappa: float | None):
        self.facet, self.cols = choose_facet(names, item_attributes)
        self.F = facet_matrix(item_attributes, self.cols)  # items x facet, rows sum to 1
        self.FT = self.F.T.tocsr()
        self.A = sp.csr_matrix(item_attributes, dtype=np.float64)
        self.A.data[:] = 1.0
        self.AT = self.A.T.tocsr()
        self.n_items = item_attributes.shape[0]
        self._build_combos()
        # kappa unknown (a bundle from before it was fitted): the past weighs as
        # much as its own mass, i.e. events and history count alike
        self.kappa = kappa if kappa is not None and np.isfinite(kappa) else None

    def _build_combos(self) -> None:
        """Each item's *combination* of facet attributes (its whole facet content,
        e.g. one genre set): ``combo`` per item (-1: none), the items of each
        combination, and the attributes of each (CSR-like arrays)."""
        F = self.F
        seen: dict[tuple[int, ...], int] = {}
        combo = np.full(self.n_items, -1, dtype=np.int64)
        attrs: list[tuple[int, ...]] = []
        for i in range(self.n_items):
            key = tuple(F.indices[F.indptr[i]:F.indptr[i + 1]].tolist())
            if key:
                combo[i] = seen.setdefault(key, len(seen))
                if combo[i] == len(attrs):
                    attrs.append(key)
        self.combo = combo
        self.n_combos = len(attrs)
        has = np.flatnonzero(combo >= 0)
        self.combo_items = has[np.argsort(combo[has], kind="stable")]
        self.combo_ptr = np.r_[0, np.cumsum(np.bincount(combo[has], minlength=self.n_combos))]
        lengths = np.array([len(a) for a in attrs], dtype=np.int64)
        self.combo_attr_ptr = np.r_[0, np.cumsum(lengths)]
        self.combo_attrs = np.array([a for key in attrs for a in key], dtype=np.int64)
        # combos x facet attributes (binary), for per-attribute factors
        self.CA = sp.csr_matrix(
            (np.ones(len(self.combo_attrs)), self.combo_attrs, self.combo_attr_ptr),
            shape=(self.n_combos, len(self.cols)),
        )
        split = sp.csr_matrix(  # each combination's unit mass, split evenly
            (1.0 / np.repeat(lengths, lengths), self.combo_attrs, self.combo_attr_ptr),
            shape=(self.n_combos, len(self.cols)),
        )
        # dense when small (a few MB at most): rows are read on every Generate
        self.combo_split = split.toarray() if split.shape[0] * split.shape[1] <= 2**20 else split

    def combos(
        self,
        train: tuple[np.ndarray, np.ndarray],
        session: Session,
        item_prior: np.ndarray,
        facet: np.ndarray,
        facet_positive: np.ndarray,
    ) -> np.ndarray:
        """The user's distribution over facet combinations (sums to 1).

        ``kappa * p_long(c) + positive session mass of c + prior(c)`` (prior: one
        event's worth of the generator's item distribution, summed per
        combination), times, for negative feedback, the smallest factor
        ``facet(a) / facet_positive(a)`` over the combination's attributes: a
        dislike takes mass from every combination carrying what was disliked."""
        valid = self.combo >= 0
        raw = np.bincount(self.combo[valid], weights=item_prior[valid], minlength=self.n_combos)
        raw /= max(raw.sum(), 1e-12)
        items, weights = train
        keep = (weights > 0) & (self.combo[items] >= 0)
        if keep.any():
            long = np.bincount(self.combo[items[keep]], weights=weights[keep],
                               minlength=self.n_combos)  # fmt: skip
            kappa = self.kappa if self.kappa is not None else long.sum()
            raw += kappa * long / long.sum()
        keep = (session.weights > 0) & (self.combo[session.items] >= 0)
        if keep.any():
            raw += np.bincount(self.combo[session.items[keep]], weights=session.weights[keep],
                               minlength=self.n_combos)  # fmt: skip
        if len(session.attributes):  # context attributes: to the combinations carrying them
            wanted = np.zeros(len(self.cols))
            on_facet = np.isin(self.cols, session.attributes)
            wanted[on_facet] = session.attribute_weight
            carrying = self.CA @ wanted
            prior = np.bincount(self.combo[valid], minlength=self.n_combos).astype(np.float64)
            spread = carrying * prior
            if spread.sum() > 0:
                raw += spread / spread.sum() * wanted.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(facet_positive > 0, facet / facet_positive, 1.0)
        ratio = np.clip(ratio, 0.0, 1.0)
        if (ratio < 1).any():
            worst = np.ones(self.n_combos)
            for a in np.flatnonzero(ratio < 1):  # few: the attributes disliked
                hit = self.CA.getcol(a).nonzero()[0]
                worst[hit] = np.minimum(worst[hit], ratio[a])
            raw *= worst
        total = raw.sum()
        return raw / total if total > 0 else np.full(self.n_combos, 1.0 / max(self.n_combos, 1))

    def _dense(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.bincount(items, weights=weights, minlength=self.n_items).astype(np.float64)

    def user(
        self,
        train: tuple[np.ndarray, np.ndarray],
        session: Session,
        prior_facet: np.ndarray,
        prior_all: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(facet distribution, the same without negative feedback, affinity over
        all attributes) of one user.

        ``train``: training items and weights; ``session``: what happened since
        training; ``prior_*``: the generator's attribute distribution (facet part
        and all attributes)."""
        x_long = self._dense(train[0], np.maximum(train[1], 0.0))
        x_session = self._dense(session.items, session.weights)
        extra = np.bincount(session.attributes, minlength=self.AT.shape[0]) * float(
            session.attribute_weight
        )
        facet = self._mix(self.FT, x_long, x_session, prior_facet, extra[self.cols])
        every = self._mix(self.AT, x_long, x_session, prior_all, extra)
        positive = self._mix(  # the facet profile without negative feedback
            self.FT, x_long, np.maximum(x_session, 0.0), prior_facet, extra[self.cols]
        )
        return facet, positive, every

    def _mix(self, MT, x_long, x_session, prior, extra) -> np.ndarray:  # type: ignore[no-untyped-def]
        long = MT @ x_long
        w_long = long.sum()
        raw = prior.astype(np.float64) + extra
        if w_long > 0:
            kappa = self.kappa if self.kappa is not None else w_long
            raw += kappa * long / w_long
        if x_session.any():
            raw += MT @ x_session
        np.maximum(raw, 0.0, out=raw)
        total = raw.sum()
        return raw / total if total > 0 else np.full(len(raw), 1.0 / max(len(raw), 1))
