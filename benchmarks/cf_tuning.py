"""Tune the normalisation of item-item cosine CF on Gowalla (validation split of train.txt only).

Usage (from the repository root; the report's numbers come from the first command)::

    python benchmarks/cf_tuning.py --stage all --rank-max 384 --json /tmp/cf_valid.json
    python benchmarks/cf_tuning.py --stage valid --json /tmp/cf_valid.json [--resume]
    python benchmarks/cf_tuning.py --stage test --from-json /tmp/cf_valid.json
    python benchmarks/cf_tuning.py --stage all --quick --rank-max 64   # smoke run, ~10 min

``valid`` carves a per-user 20 % holdout out of train.txt (``holdout_split``, seed 0), fits
every configuration on the remaining 80 % and reports Recall@20 / NDCG@20 on the holdout.
The knn grid is a coordinate descent (stages 2-8, ``--passes`` times, each stage starting from
the best configuration so far, then a finer second look in stage 10), not an exhaustive grid.
``--resume`` reuses the rows already in ``--json`` and replays the same decisions.
``test`` refits the best configuration of each family (chosen by validation Recall@20 only:
knn, gfcf, knn_ideal) on the full train.txt and reports Recall@20 / NDCG@20 on test.txt, plus
unselected references (implicit's plain cosine, GF-CF with its published w=0.3, r=256).

Model (all families): the score of user u for item j is ``x_u @ S[:, j]`` (``x_u`` = binary
history row) where ``S`` is an item x item matrix, rows = history item, columns = candidate.

``knn`` family, built from the binary users x items matrix R:
    W      = D_u^-alpha R                     (user-degree normalisation, rows of R)
    C      = W^T W, diagonal removed          (weighted co-occurrence)
    n_i    = ||W[:, i]||^2 (norm="weighted")  or  deg(i) (norm="raw")
    S_ij   = C_ij / (n_i^a * n_j^b + shrink)  (a = b = 1/2: cosine; b = 1 - a: asymmetric)
    S_ij  <- S_ij^power
    keep the top-K entries of each row i (K = None: all)
    S_ij  <- S_ij * deg(j)^-beta              (item-degree normalisation of the result)
    rownorm: S_i. <- S_i. / sum_j S_ij        (every history item gets the same total weight)
    scorenorm: score_uj <- score_uj / sum_{i in u} S_ij  (classic kNN weighted average)
    GF-CF's linear filter R~^T R~ with R~ = D_u^-1/2 R D_i^-1/2 is alpha=1/2, norm="raw",
    a=b=1/2, K=None.

``gfcf`` family: GF-CF (Shen et al., CIKM 2021), linear filter + ideal low-pass filter:
    score_u = x_u R~^T R~  +  w * (x_u D_i^-1/2 V_r^T) V_r D_i^1/2
    with V_r the top-r right singular vectors of R~ (scipy.sparse.linalg.svds).

``gfcf_pruned``: the GF-CF item x item operator P + w D_i^-1/2 V_r^T V_r D_i^1/2 computed in
    dense row blocks and pruned to its top-K entries per row, i.e. a single sparse item x item
    matrix (what the service can hold).

``knn_ideal``: the best knn matrix plus GF-CF's ideal low-pass term,
    score_u = x_u S_knn + w * c * (x_u D_i^-1/2 V_r^T) V_r D_i^1/2,
    c = sum(S_knn) / sum(R~^T R~) so that w is on GF-CF's scale.

Runs on 1 thread by default (OMP/OpenBLAS/MKL env vars are set before numpy is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--threads" in sys.argv:
    _threads = sys.argv[sys.argv.index("--threads") + 1]
else:
    _threads = "1"
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, _threads)

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from scipy.sparse.linalg import svds  # noqa: E402

from recsvc.evaluate import (  # noqa: E402
    holdout_split,
    items_to_csr,
    ranking_metrics,
    read_user_item_lines,
)

N_USERS, N_ITEMS = 29858, 40981
K_EVAL = 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- sparse helpers


def _row_ids(m: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(m.shape[0], dtype=np.int32), np.diff(m.indptr))


def _order_key_desc(x: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the descending order of float32 ``x``."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    asc = u ^ np.where(u & np.uint32(0x80000000), np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return ~asc


def topk_per_row(m: sp.csr_matrix, k: int | None, rows: np.ndarray | None = None) -> sp.csr_matrix:
    """Keep the k largest stored values of every row (ties: smaller column first). Vectorised:
    one argsort of uint64 keys (row << 32 | descending-value key) over the stored entries."""
    m = m.tocsr()
    nnz_row = np.diff(m.indptr)
    if k is None or nnz_row.max(initial=0) <= k:
        return m
    if rows is None:
        rows = _row_ids(m)
    key = (rows.astype(np.uint64) << np.uint64(32)) | _order_key_desc(m.data).astype(np.uint64)
    order = np.argsort(key, kind="stable")
    rank = np.arange(m.nnz, dtype=np.int64) - m.indptr[rows[order]]
    sel = np.sort(order[rank < k])  # back to CSR order (row, column)
    out = sp.csr_matrix(
        (m.data[sel], m.indices[sel], np.concatenate([[0], np.cumsum(np.minimum(nnz_row, k))])),
        shape=m.shape,
    )
    return out


def csr_nbytes(m: sp.csr_matrix) -> int:
    return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)


def _safe_pow(x: np.ndarray, e: float) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    pos = x > 0
    out[pos] = np.power(x[pos].astype(np.float64), e)
    return out


# --------------------------------------------------------------------------- models


class CoocCache:
    """C = W^T W (diag removed) for W = D_u^-alpha R; one alpha cached at a time."""

    def __init__(self, R: sp.csr_matrix):
        self.R = R.tocsr().astype(np.float32)
        self.deg_u = np.diff(self.R.indptr).astype(np.float64)
        self.deg_i = np.bincount(self.R.indices, minlength=R.shape[1]).astype(np.float64)
        self._alpha: float | None = None

    def get(self, alpha: float):
        if self._alpha != alpha:
            self._alpha = None
            self.C = self.rows = self.sqnorm = None  # free memory first
            t = time.time()
            W = sp.diags(_safe_pow(self.deg_u, -alpha).astype(np.float32)) @ self.R
            W = W.tocsr()
            sqnorm = np.asarray(W.multiply(W).sum(axis=0)).ravel().astype(np.float64)
            C = (W.T @ W).tocsr()
            C.setdiag(0)
            C.eliminate_zeros()
            C.sort_indices()
            self.C, self.rows, self.sqnorm = C, _row_ids(C), sqnorm
            self._alpha = alpha
            self.cooc_time = time.time() - t
            log(f"cooc alpha={alpha}: nnz={C.nnz:,} in {self.cooc_time:.1f}s")
        return self.C, self.rows, self.sqnorm


def build_knn(cache: CoocCache, p: dict) -> tuple[sp.csr_matrix, float]:
    """Returns (S, fit seconds); fit = co-occurrence product + normalisation + top-K, i.e. what
    a fresh fit costs even when the co-occurrence came from the cache."""
    C, rows, sqnorm = cache.get(p.get("alpha", 0.0))
    t0 = time.time()
    n = sqnorm if p.get("norm", "weighted") == "weighted" else cache.deg_i
    a = p.get("a", 0.5)
    b = p.get("b", 1.0 - a)
    shrink = p.get("shrink", 0.0)
    na = _safe_pow(n, a)
    nb = _safe_pow(n, b)
    denom = na[rows] * nb[C.indices] + shrink
    data = np.zeros(C.nnz, dtype=np.float32)
    ok = denom > 0
    data[ok] = (C.data[ok] / denom[ok]).astype(np.float32)
    power = p.get("power", 1.0)
    if power != 1.0:
        np.power(data, power, out=data)
    S = sp.csr_matrix((data, C.indices, C.indptr), shape=C.shape)
    S = topk_per_row(S, p.get("K"), rows)
    beta = p.get("beta", 0.0)
    if beta:
        S = (S @ sp.diags(_safe_pow(cache.deg_i, -beta).astype(np.float32))).tocsr()
    if p.get("rownorm"):
        rs = np.asarray(S.sum(axis=1)).ravel()
        inv = np.zeros_like(rs)
        np.divide(1.0, rs, out=inv, where=rs > 0)
        S = (sp.diags(inv.astype(np.float32)) @ S).tocsr()
    S.eliminate_zeros()
    return S, (time.time() - t0) + cache.cooc_time


def knn_scores_fn(R: sp.csr_matrix, S: sp.csr_matrix, scorenorm: bool = False):
    Sabs = abs(S) if scorenorm else None

    def fn(users):
        X = R[users]
        out = (X @ S).toarray().astype(np.float32, copy=False)
        if scorenorm:
            den = (X @ Sabs).toarray()
            np.divide(out, den, out=out, where=den > 0)
            out[den <= 0] = 0.0
        return out

    return fn


class GFCF:
    """GF-CF: score = x R~^T R~ + w * x D^-1/2 V^T V D^1/2 (rank r from one svds solve)."""

    def __init__(self, R: sp.csr_matrix, rank_max: int, seed: int = 0):
        t = time.time()
        R = R.tocsr().astype(np.float32)
        du = np.diff(R.indptr).astype(np.float64)
        di = np.bincount(R.indices, minlength=R.shape[1]).astype(np.float64)
        self.di_mhalf = _safe_pow(di, -0.5).astype(np.float32)
        self.di_half = np.sqrt(di).astype(np.float32)
        Rn = sp.diags(_safe_pow(du, -0.5).astype(np.float32)) @ R @ sp.diags(self.di_mhalf)
        self.Rn = Rn.tocsr()
        self.RnT = self.Rn.T.tocsr()
        self.R = R
        self.P = (self.RnT @ self.Rn).tocsr()  # linear filter, item x item (with diagonal)
        self.t_norm = time.time() - t
        t = time.time()
        v0 = np.random.default_rng(seed).standard_normal(min(Rn.shape))
        _, s, vt = svds(self.Rn.astype(np.float64), k=rank_max, v0=v0)
        order = np.argsort(-s)
        self.s = s[order]
        self.vt = np.ascontiguousarray(vt[order], dtype=np.float32)  # (rank_max, n_items)
        self.t_svd = time.time() - t
        log(f"svds k={rank_max}: {self.t_svd:.1f}s, s[0]={self.s[0]:.4f} s[-1]={self.s[-1]:.4f}")

    def P_nnz(self) -> int:
        return int(self.P.nnz)

    def ideal_fn(self, rank: int):
        left = (self.vt[:rank] * self.di_mhalf).T.copy()  # (n_items, r): D^-1/2 V^T
        right = self.vt[:rank] * self.di_half  # (r, n_items): V D^1/2
        return lambda users: (self.R[users] @ left) @ right

    def scores_fn(self, w: float, rank: int):
        left = (self.vt[:rank] * self.di_mhalf).T.copy()  # (n_items, r): D^-1/2 V^T
        right = self.vt[:rank] * self.di_half  # (r, n_items): V D^1/2

        def fn(users):
            X = self.R[users]
            out = (X @ self.P).toarray().astype(np.float32, copy=False)
            if w:
                out += w * ((X @ left) @ right)
            return out

        return fn

    def pruned(self, w: float, rank: int, K: int, block: int = 1024) -> tuple[sp.csr_matrix, float]:
        """Top-K per row of P + w D^-1/2 V^T V D^1/2 as one sparse item x item matrix."""
        t = time.time()
        P = self.P
        left = (self.vt[:rank] * self.di_mhalf).T.copy()
        right = self.vt[:rank] * self.di_half
        n = P.shape[0]
        idx_parts, val_parts = [], []
        for s0 in range(0, n, block):
            s1 = min(n, s0 + block)
            D = P[s0:s1].toarray()
            if w:
                D += w * (left[s0:s1] @ right)
            D[np.arange(s1 - s0), np.arange(s0, s1)] = -np.inf  # drop the diagonal
            part = np.argpartition(D, n - K, axis=1)[:, n - K :]
            vals = np.take_along_axis(D, part, axis=1)
            idx_parts.append(part.astype(np.int32))
            val_parts.append(vals.astype(np.float32))
        idx = np.concatenate(idx_parts)
        val = np.concatenate(val_parts)
        S = sp.csr_matrix((val.ravel(), idx.ravel(), np.arange(0, n * K + 1, K)), shape=(n, n))
        S.sort_indices()
        S.eliminate_zeros()
        return S, time.time() - t + self.t_norm + self.t_svd


# --------------------------------------------------------------------------- experiment


def describe(cfg: dict) -> str:
    p = {k: v for k, v in cfg.items() if k not in ("family",)}
    return f"{cfg['family']}(" + ", ".join(f"{k}={v}" for k, v in p.items()) + ")"


def evaluate_config(cfg: dict, R_fit: sp.csr_matrix, held: list, cache, gf) -> dict:
    fam = cfg["family"]
    t0 = time.time()
    S = None
    if fam == "implicit_cosine":
        from implicit.nearest_neighbours import CosineRecommender

        model = CosineRecommender(K=cfg["K_implicit"], num_threads=1)
        model.fit(R_fit, show_progress=False)
        S = model.similarity.tocsr().astype(np.float32)
        fit = time.time() - t0
        fn = knn_scores_fn(R_fit, S)
    elif fam == "knn":
        S, fit = build_knn(cache, cfg)
        fn = knn_scores_fn(R_fit, S, scorenorm=cfg.get("scorenorm", False))
    elif fam == "gfcf":
        fn = gf.scores_fn(cfg["w"], cfg["rank"])
        fit = gf.t_norm + gf.t_svd  # one svds solve at rank_max, shared by all ranks
    elif fam == "knn_ideal":
        p = {k: v for k, v in cfg.items() if k not in ("w", "rank")}
        S, fit = build_knn(cache, p)
        scale = float(S.sum() / gf.P.sum())  # so w is comparable to GF-CF's weight
        fn_knn = knn_scores_fn(R_fit, S)
        fn_ideal = gf.ideal_fn(cfg["rank"])
        w_eff = np.float32(cfg["w"] * scale)

        def fn(users):
            out = fn_knn(users)
            out += w_eff * fn_ideal(users)
            return out

        fit += gf.t_norm + gf.t_svd
    elif fam == "gfcf_pruned":
        S, fit = gf.pruned(cfg["w"], cfg["rank"], cfg["K"])
        fn = knn_scores_fn(R_fit, S)
    else:
        raise ValueError(fam)
    t1 = time.time()
    res = ranking_metrics(fn, R_fit, held, k=K_EVAL, batch_users=2048)
    row = {
        "config": cfg,
        "recall": res["recall"],
        "ndcg": res["ndcg"],
        "n_users": res["n_users"],
        "fit_s": round(fit, 2),
        "eval_s": round(time.time() - t1, 2),
    }
    if S is not None:
        row["nnz"] = int(S.nnz)
        row["mb"] = round(csr_nbytes(S) / 2**20, 1)
    if fam == "gfcf":
        row["nnz"] = gf.P_nnz()  # linear filter R~^T R~ (with diagonal)
        row["mb"] = round(csr_nbytes(gf.P) / 2**20, 1)
    if fam in ("gfcf", "knn_ideal"):  # plus one dense float32 factor V_r (rank x n_items)
        row["dense_factor_mb"] = round(cfg["rank"] * R_fit.shape[1] * 4 / 2**20, 1)
    log(
        f"{describe(cfg)}: recall={row['recall']:.4f} ndcg={row['ndcg']:.4f} "
        f"fit={row['fit_s']}s eval={row['eval_s']}s nnz={row.get('nnz')}"
    )
    return row


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n## {title}\n")
    print("| # | configuration | Recall@20 | NDCG@20 | fit s | eval s | nnz(S) | MB(S) |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        extra = f" (+dense {r['dense_factor_mb']} MB)" if "dense_factor_mb" in r else ""
        print(
            f"| {i} | {describe(r['config'])} | {r['recall']:.4f} | {r['ndcg']:.4f} | "
            f"{r['fit_s']} | {r['eval_s']} | {r.get('nnz', '')} | {r.get('mb', '')}{extra} |"
        )
    sys.stdout.flush()


def best_of(rows: list[dict], pred) -> dict:
    cand = [r for r in rows if pred(r["config"])]
    return max(cand, key=lambda r: r["recall"])


def run_valid(R: sp.csr_matrix, args) -> list[dict]:
    R_fit, held = holdout_split(R, fraction=0.2, seed=args.seed)
    log(f"validation split: fit nnz={R_fit.nnz:,}, held={sum(len(h) for h in held):,}")
    cache = CoocCache(R_fit)
    stored: list[dict] = []  # rows from --json (--resume): reused, not refitted
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as fh:
            stored = json.load(fh)
        log(f"resume: {len(stored)} rows from {args.json}")
    # rows reached by this run's sequence so far; all the "best so far" decisions use only
    # these, so a resumed run replays exactly the path of a fresh one
    rows: list[dict] = []
    gf_holder: list[GFCF] = []

    def get_gf() -> GFCF:
        if not gf_holder:
            gf_holder.append(GFCF(R_fit, rank_max=args.rank_max, seed=args.seed))
        return gf_holder[0]

    def run(cfg: dict) -> dict:
        key = json.dumps(cfg, sort_keys=True)
        for r in rows:
            if json.dumps(r["config"], sort_keys=True) == key:
                return r
        for r in stored:
            if json.dumps(r["config"], sort_keys=True) == key:
                rows.append(r)
                return r
        needs_gf = cfg["family"] in ("gfcf", "gfcf_pruned", "knn_ideal")
        r = evaluate_config(cfg, R_fit, held, cache, get_gf() if needs_gf else None)
        rows.append(r)
        if args.json:  # checkpoint after every configuration (for --resume)
            done = {json.dumps(x["config"], sort_keys=True) for x in rows}
            extra = [x for x in stored if json.dumps(x["config"], sort_keys=True) not in done]
            with open(args.json, "w") as fh:
                json.dump(rows + extra, fh, indent=1)
        return r

    def knn_best() -> dict:
        return dict(best_of(rows, lambda c: c["family"] == "knn")["config"])

    q = args.quick
    # 0. baselines: implicit CosineRecommender (its K counts the item itself) and our cosine
    for K in [21, 101] if not q else [101]:
        run({"family": "implicit_cosine", "K_implicit": K})
    base = {"family": "knn", "alpha": 0.0, "a": 0.5, "shrink": 0.0, "K": 100}
    run(base)
    # 1. neighbourhood size, plain cosine
    for K in [50, 200, 500, None] if not q else [200]:
        run({**base, "K": K})
    # Stages 2-8 form one coordinate-descent pass, each stage starting from the best knn
    # configuration so far; --passes 2 repeats them once from the pass-1 optimum.
    for _pass in range(args.passes if not q else 1):
        # 2. user-degree normalisation of the rows before the cosine (weighted norms / raw degree)
        for alpha in [0.25, 0.5, 0.75, 1.0] if not q else [0.5]:
            run({**knn_best(), "alpha": alpha})
        run({**knn_best(), "norm": "raw"})
        # 3. asymmetric cosine: S_ij = C_ij / (n_i^a n_j^(1-a))
        for a in [0.2, 0.35, 0.65, 0.8] if not q else [0.65]:
            run({**knn_best(), "a": a})
        # 4. shrinkage, relative to the scale of the denominators (median of n_i)
        cfg = knn_best()
        med = float(np.median(cache.get(cfg["alpha"])[2][cache.deg_i > 0]))
        if cfg.get("norm", "weighted") == "raw":
            med = float(np.median(cache.deg_i[cache.deg_i > 0]))
        for f in [0.1, 0.5, 2.0] if not q else [0.5]:
            run({**cfg, "shrink": round(f * med, 4)})
        # 5. neighbourhood size again around the current best
        for K in [50, 100, 200, 500, None] if not q else [100]:
            run({**knn_best(), "K": K})
        # 6. power on the similarities
        for pw in [0.5, 1.5, 2.0] if not q else [1.5]:
            run({**knn_best(), "power": pw})
        # 7. item-degree normalisation of the result (candidate popularity)
        for beta in [-0.2, -0.1, 0.1, 0.2] if not q else [0.1]:
            run({**knn_best(), "beta": beta})
        # 8. normalisations of the score: per history item (row) / classic kNN weighted average
        run({**knn_best(), "rownorm": True})
        run({**knn_best(), "scorenorm": True})

    # 9. GF-CF: linear filter (= knn alpha .5 raw, K all) + ideal low-pass (svds)
    if not args.no_gfcf:
        run({"family": "knn", "alpha": 0.5, "norm": "raw", "a": 0.5, "shrink": 0.0, "K": None})
        ranks = [r for r in (64, 128, 256, 384, 512) if r <= args.rank_max]
        r0 = 256 if 256 in ranks else ranks[-1]
        for w in [0.1, 0.3, 0.5, 1.0] if not q else [0.3]:
            run({"family": "gfcf", "w": w, "rank": r0})
        wb = best_of(rows, lambda c: c["family"] == "gfcf")["config"]["w"]
        for rk in ranks:
            run({"family": "gfcf", "w": wb, "rank": rk})
        bg = best_of(rows, lambda c: c["family"] == "gfcf")["config"]
        for K in [100, 200, 500] if not q else [200]:
            run({"family": "gfcf_pruned", "w": bg["w"], "rank": bg["rank"], "K": K})

    # 10. second coordinate pass over the knn parameters, finer grids around the best
    if not q:
        for alpha in [0.0, 0.125, 0.375, 0.5]:
            run({**knn_best(), "alpha": alpha})
        run({**knn_best(), "norm": "weighted" if knn_best().get("norm") == "raw" else "raw"})
        a0 = knn_best()["a"]
        for a in sorted({round(min(1.0, max(0.0, a0 + d)), 3) for d in (-0.1, 0.1, 0.2)}):
            run({**knn_best(), "a": a})
        for K in [100, 500, 1000, None]:
            run({**knn_best(), "K": K})
        p0 = knn_best().get("power", 1.0)
        for pw in [p0 - 0.25, p0 + 0.25]:
            run({**knn_best(), "power": pw})
        b0 = knn_best().get("beta", 0.0)
        for beta in [round(b0 - 0.05, 3), round(b0 + 0.05, 3)]:
            run({**knn_best(), "beta": beta})
        run({**knn_best(), "rownorm": not knn_best().get("rownorm", False)})

    # 11. best knn + GF-CF's ideal low-pass term (w relative to the scale of S vs R~^T R~)
    if not args.no_gfcf:
        bg = best_of(rows, lambda c: c["family"] == "gfcf")["config"]
        for w in [0.1, 0.3, 1.0] if not q else [0.3]:
            kb = {k: v for k, v in knn_best().items() if k != "family"}
            run({"family": "knn_ideal", **kb, "w": w, "rank": bg["rank"]})
    return rows


def run_test(R: sp.csr_matrix, test: list, chosen: list[dict], args) -> list[dict]:
    cache = CoocCache(R)
    gf = None
    rows = []
    rank_max = max([c["rank"] for c in chosen if "rank" in c], default=0)
    for cfg in chosen:
        if cfg["family"] in ("gfcf", "gfcf_pruned", "knn_ideal") and gf is None:
            gf = GFCF(R, rank_max=rank_max, seed=args.seed)
        rows.append(evaluate_config(cfg, R, test, cache, gf))
    return rows


def choose(valid_rows: list[dict]) -> list[dict]:
    """Best validation Recall@20 per family: knn (sparse item x item only), gfcf (reference
    reproduction), knn_ideal (knn + low-rank term)."""
    chosen = []
    for fam in ("knn", "gfcf", "knn_ideal"):
        cand = [r for r in valid_rows if r["config"]["family"] == fam]
        if cand:
            chosen.append(max(cand, key=lambda r: r["recall"])["config"])
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="/work/shared/data/gowalla")
    ap.add_argument("--stage", choices=["valid", "test", "all"], default="all")
    ap.add_argument("--json", help="write the validation rows here (stage valid/all)")
    ap.add_argument("--from-json", help="validation rows to choose the test configs from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank-max", type=int, default=256)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--quick", action="store_true", help="tiny grid (smoke run)")
    ap.add_argument("--no-gfcf", action="store_true")
    ap.add_argument("--passes", type=int, default=2, help="coordinate-descent passes (2-8)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the rows already in --json (same seed/data) instead of refitting",
    )
    args = ap.parse_args()

    t = time.time()
    train_items = read_user_item_lines(os.path.join(args.data_dir, "train.txt"))
    n_users = max(len(train_items), N_USERS)
    R = items_to_csr(train_items, n_users=n_users, n_items=N_ITEMS)
    log(f"train: {R.shape} nnz={R.nnz:,} ({time.time() - t:.1f}s)")

    valid_rows = None
    if args.stage in ("valid", "all"):
        valid_rows = run_valid(R, args)
        print_table(
            valid_rows,
            f"Validation (80/20 holdout of train.txt, seed {args.seed}), Recall@20 / NDCG@20",
        )
        if args.json:  # this run's rows, then any other rows the resumed file held
            extra = []
            if args.resume and os.path.exists(args.json):
                with open(args.json) as fh:
                    done = {json.dumps(x["config"], sort_keys=True) for x in valid_rows}
                    extra = [
                        x
                        for x in json.load(fh)
                        if json.dumps(x["config"], sort_keys=True) not in done
                    ]
            with open(args.json, "w") as fh:
                json.dump(valid_rows + extra, fh, indent=1)
    if args.stage in ("test", "all"):
        if valid_rows is None:
            if not args.from_json:
                ap.error("--stage test needs --from-json")
            with open(args.from_json) as fh:
                valid_rows = json.load(fh)
        chosen = choose(valid_rows)
        for c in chosen:
            print(f"selected on validation: {describe(c)}")
        # references only (not selected): plain cosine as in implicit (K=20 / K=100
        # neighbours + the item itself) and GF-CF with its published setting (w=0.3, r=256)
        refs = [
            {"family": "implicit_cosine", "K_implicit": 21},
            {"family": "implicit_cosine", "K_implicit": 101},
            {"family": "gfcf", "w": 0.3, "rank": 256},
        ]
        chosen += [r for r in refs if r not in chosen]
        test_items = read_user_item_lines(os.path.join(args.data_dir, "test.txt"))
        test_rows = run_test(R, test_items, chosen, args)
        print_table(test_rows, "Test (fit on full train.txt), Recall@20 / NDCG@20")


if __name__ == "__main__":
    main()
