"""The adversarial family tried honestly (issue #11): CFGAN against the Mult-VAE (and, on
ordered data, the SASRec sequence model), each trained with the same wall-clock budget on
the same validation split carved out of the training data; test items are never read.

    python benchmarks/gan_compare.py --data ../shared/data/gowalla/train.txt --minutes 5
    python benchmarks/gan_compare.py --data ../shared/data/ml-1m-seq/ml-1m.txt --minutes 3

* ``user item item ...`` lines (Gowalla, no order): 20% of each user's items held out at
  random; Recall@20 / NDCG@20 (full ranking, training items excluded) on up to
  ``--eval-users`` users.
* ``user item`` lines in order (ML-1M): the protocol's last two items are dropped (they are
  the test), the next-to-last remaining item is the validation target; HR@10 / NDCG@10
  (full ranking, seen items excluded) over all users. The bag models see the rest as a set.

Prints one JSON object: per model, the validation metrics, epochs and seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generators.cfgan import GANConfig, train_cfgan  # noqa: E402
from generators.cfgan import topk as gan_topk  # noqa: E402
from generators.train import ranking_metrics_from_topk, topk_items, train_vae  # noqa: E402
from recsvc.evaluate import holdout_split, items_to_csr, read_user_item_lines  # noqa: E402


def read_ordered(path: Path) -> list[np.ndarray] | None:
    """Per-user items in file order if every line is ``user item``, else None."""
    users: dict[int, list[int]] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                return None
            users.setdefault(int(parts[0]), []).append(int(parts[1]))
    ids = sorted(users)
    return [np.asarray(users[u], dtype=np.int64) for u in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=5.0, help="wall budget per model")
    ap.add_argument("--eval-users", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--models", default="vae,cfgan,sequence")
    ap.add_argument(
        "--gan-patience",
        type=int,
        default=GANConfig.patience,
        help="CFGAN: validations without gain before it stops (large: the whole budget)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.minutes * 60
    models = set(args.models.split(","))
    ordered = read_ordered(args.data)
    rng = np.random.default_rng(0)
    if ordered is not None:  # leave-one-out, as the sequence protocol
        n_items = int(max(s.max() for s in ordered)) + 1
        kept = [s[:-2] for s in ordered]
        inputs = [s[:-1] if len(s) >= 2 else s for s in kept]
        targets = [s[-1:] if len(s) >= 2 else s[:0] for s in kept]
        fit = items_to_csr([np.unique(s) for s in inputs], n_items=n_items)
        users = np.array([u for u, t in enumerate(targets) if len(t)], dtype=np.int64)
        held = [targets[u] for u in users]
        k = 10
    else:
        lists = read_user_item_lines(args.data)
        n_items = int(max(len(x) and x.max() for x in lists)) + 1
        fit, valid = holdout_split(items_to_csr(lists, n_items=n_items), 0.2, seed=0)
        users = np.array([u for u, v in enumerate(valid) if len(v)], dtype=np.int64)
        if len(users) > args.eval_users:
            users = np.sort(rng.choice(users, args.eval_users, replace=False))
        held = [valid[u] for u in users]
        inputs = targets = None
        k = 20
    fit = sp.csr_matrix(fit, dtype=np.float32)
    fit.data[:] = 1.0

    def metrics(top: np.ndarray) -> dict[str, float]:
        m = ranking_metrics_from_topk(top, held, k)
        if ordered is not None:
            m = {f"hr@{k}": m[f"recall@{k}"], f"ndcg@{k}": m[f"ndcg@{k}"], "n_users": m["n_users"]}
        return m

    out: dict[str, object] = {
        "data": str(args.data),
        "minutes_per_model": args.minutes,
        "users": int(fit.shape[0]),
        "items": n_items,
        "validation": "leave-one-out" if ordered is not None else "20% random holdout",
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    if "vae" in models:
        valid_lists = [np.empty(0, np.int64)] * fit.shape[0]
        for u, h in zip(users, held, strict=True):
            valid_lists[int(u)] = h
        started = time.perf_counter()
        vae, hist = train_vae(fit, valid_lists, n_epochs=1000, max_seconds=budget,
                              progress=False, precision="auto")  # fmt: skip
        out["vae"] = {
            **metrics(topk_items(vae, fit, users, k)),
            "epochs": len(hist["epoch"]),
            "best_epoch": hist.get("best_epoch"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps({"vae": out["vae"]}), file=sys.stderr, flush=True)
    if "cfgan" in models:
        cfg = GANConfig(patience=args.gan_patience)
        started = time.perf_counter()
        probe = users[: min(len(users), 2000)]
        probe_held = held[: len(probe)]

        def valid_metric(model: object) -> float:
            top = gan_topk(model, fit, probe, k)  # type: ignore[arg-type]
            return ranking_metrics_from_topk(top, probe_held, k)[f"ndcg@{k}"]

        def progress(line: str) -> None:
            print("cfgan", line, file=sys.stderr, flush=True)

        gan, info = train_cfgan(fit, valid_metric, cfg, max_seconds=budget, log=progress)
        out["cfgan"] = {
            **metrics(gan_topk(gan, fit, users, k)),
            "epochs": info["epochs"],
            "seconds": round(time.perf_counter() - started, 1),
            "config": info["config"],
        }
        print(json.dumps({"cfgan": out["cfgan"]}), file=sys.stderr, flush=True)
    if "sequence" in models and ordered is not None and inputs is not None:
        from generators.sequence import SeqConfig, leave_one_out_topk, train_sasrec

        assert targets is not None
        tg = np.array([t[0] if len(t) else -1 for t in targets], dtype=np.int64)
        started = time.perf_counter()  # best epoch on the same validation targets, as above
        seq, info = train_sasrec(inputs, n_items, SeqConfig(), tg, max_seconds=budget)
        top = leave_one_out_topk(seq, [inputs[int(u)] for u in users], k)
        out["sequence"] = {
            **metrics(top),
            "epochs": info["epochs"],
            "seconds": round(time.perf_counter() - started, 1),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
