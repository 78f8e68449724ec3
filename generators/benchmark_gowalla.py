"""Quality check of the Mult-VAE generator on Gowalla (LightGCN split).

Validation split (for tuning / early stopping) is carved out of train.txt only: for
``--valid-users`` random users, ``--valid-frac`` of their train items (at least one) are held
out. The model trains on the rest; test.txt is used only for the final report, with the
users' full train.txt rows as encoder input and all train items excluded from the ranking
(LightGCN protocol: all items ranked, recall = hits / n_test, NDCG with binary gains and
ideal DCG over min(20, n_test)).

Run from the repository root::

    python -m generators.benchmark_gowalla --threads 2 --out reports/gowalla_vae.json

``--no-test`` stops after training (validation numbers only) for tuning runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

DATA = Path("/work/shared/data/gowalla")


def load_lists(path: Path) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            out[int(parts[0])] = np.asarray(parts[1:], dtype=np.int64)
    return out


def to_csr(lists: dict[int, np.ndarray], n_users: int, n_items: int) -> sp.csr_matrix:
    rows = np.concatenate([np.full(len(v), u, dtype=np.int64) for u, v in lists.items()])
    cols = np.concatenate(list(lists.values()))
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def split_validation(
    train: dict[int, np.ndarray], n_valid_users: int, frac: float, seed: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    users = np.array(sorted(u for u, v in train.items() if len(v) >= 2))
    chosen = set(rng.choice(users, size=min(n_valid_users, len(users)), replace=False).tolist())
    fit: dict[int, np.ndarray] = {}
    valid: dict[int, np.ndarray] = {}
    for u, items in train.items():
        if u in chosen:
            n_hold = max(1, int(round(frac * len(items))))
            perm = rng.permutation(items)
            valid[u] = np.sort(perm[:n_hold])
            fit[u] = np.sort(perm[n_hold:])
        else:
            fit[u] = items
    return fit, valid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--valid-users", type=int, default=5000)
    ap.add_argument("--valid-frac", type=float, default=0.2)
    ap.add_argument("--split-seed", type=int, default=12345)
    ap.add_argument("--epochs", type=int, default=None, help="default: train_vae's default")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--beta-max", type=float, default=None)
    ap.add_argument("--anneal-steps", type=int, default=None)
    ap.add_argument("--dropout", type=float, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--latent", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--no-test", action="store_true", help="skip the test-set evaluation")
    ap.add_argument("--save", type=Path, default=None, help="save the generator here")
    ap.add_argument("--out", type=Path, default=None, help="write a JSON report here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    # Thread limits before the heavy imports initialise their pools.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from .train import evaluate, train_vae

    t0 = time.perf_counter()
    train = load_lists(args.data / "train.txt")
    test = load_lists(args.data / "test.txt")
    n_users = max(max(train), max(test)) + 1
    n_items = (
        int(
            max(
                max(v.max() for v in train.values() if len(v)),
                max(v.max() for v in test.values() if len(v)),
            )
        )
        + 1
    )
    fit, valid = split_validation(train, args.valid_users, args.valid_frac, args.split_seed)
    X_fit = to_csr(fit, n_users, n_items)
    X_full = to_csr(train, n_users, n_items)
    print(
        f"users {n_users} items {n_items} train nnz {X_full.nnz} fit nnz {X_fit.nnz} "
        f"valid users {len(valid)} valid nnz {sum(len(v) for v in valid.values())} "
        f"(load {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )

    kwargs = {}
    for name, key in [
        ("epochs", "n_epochs"),
        ("batch_size", "batch_size"),
        ("lr", "lr"),
        ("seed", "seed"),
        ("patience", "early_stopping_patience"),
    ]:
        if getattr(args, name) is not None:
            kwargs[key] = getattr(args, name)
    for name, key in [
        ("beta_max", "beta_max"),
        ("anneal_steps", "total_anneal_steps"),
        ("dropout", "dropout"),
        ("hidden", "hidden"),
        ("latent", "latent"),
    ]:
        if getattr(args, name) is not None:
            kwargs[key] = getattr(args, name)

    t_train = time.perf_counter()

    def log_epoch(ep: int, h: dict) -> None:
        print(
            f"epoch {ep:3d} loss {h['loss'][-1]:.3f} beta {h['beta'][-1]:.4f} "
            f"val_ndcg@20 {h['val_ndcg'][-1]:.4f} val_recall@20 {h['val_recall'][-1]:.4f} "
            f"({h['epoch_seconds'][-1]:.1f}s, total {time.perf_counter() - t_train:.0f}s)",
            flush=True,
        )

    model, history = train_vae(
        X_fit,
        valid,
        progress=not args.no_progress,
        max_seconds=args.max_seconds,
        on_epoch=log_epoch,
        **kwargs,
    )
    train_s = time.perf_counter() - t_train
    print(
        f"training {train_s:.1f}s, best epoch {history['best_epoch']} "
        f"val ndcg@20 {history['best_val_ndcg']:.4f}, stopped: {history['stopped']}",
        flush=True,
    )

    report: dict = {
        "command": " ".join([sys.executable, "-m", "generators.benchmark_gowalla", *sys.argv[1:]]),
        "threads": args.threads,
        "train_seconds": train_s,
        "history": history,
    }
    if not args.no_test:
        t_eval = time.perf_counter()
        users = np.array(sorted(u for u, v in test.items() if len(v)), dtype=np.int64)
        held = [np.unique(test[u]) for u in users]
        metrics = evaluate(model, X_full, users, held, k=20, exclude_csr=X_full)
        report["test"] = metrics
        report["eval_seconds"] = time.perf_counter() - t_eval
        print(
            f"TEST recall@20 {metrics['recall@20']:.4f} ndcg@20 {metrics['ndcg@20']:.4f} "
            f"over {metrics['n_users']} users (eval {report['eval_seconds']:.1f}s); "
            f"published Mult-VAE: 0.1641 / 0.1335",
            flush=True,
        )
        try:  # cross-check with the service's evaluator when it exists
            from recsvc.evaluate import ranking_metrics
        except ImportError:
            ranking_metrics = None
        if ranking_metrics is not None:
            from .vae import SparseRows

            def scores_fn(u: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    mu, _ = model.encode(SparseRows.from_csr(X_full[u]))
                    return model.decode(mu)[0].numpy()

            empty = np.zeros(0, dtype=np.int64)
            per_user = [test.get(u, empty) for u in range(n_users)]
            m2 = ranking_metrics(scores_fn, X_full, per_user, k=20, batch_users=1000)
            report["test_recsvc_evaluate"] = m2
            print(
                f"TEST (recsvc.evaluate.ranking_metrics) recall@20 {m2['recall']:.4f} "
                f"ndcg@20 {m2['ndcg']:.4f} over {m2['n_users']} users",
                flush=True,
            )
    if args.save is not None:
        from .io import save_generator

        save_generator(
            model, args.save, {"dataset": "gowalla", "history_best_epoch": history["best_epoch"]}
        )
    report["wall_seconds"] = time.perf_counter() - t0
    print(f"wall {report['wall_seconds']:.1f}s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
