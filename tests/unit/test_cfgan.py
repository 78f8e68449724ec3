"""CFGAN (#11, the adversarial family): trains on clustered synthetic users and ranks their
held-out items far above chance."""

import numpy as np
import scipy.sparse as sp

from generators.cfgan import GANConfig, topk, train_cfgan
from generators.train import ranking_metrics_from_topk


def clustered(n_users=240, n_items=60, n_clusters=4, per_user=8, seed=0):
    rng = np.random.default_rng(seed)
    size = n_items // n_clusters
    rows, cols, held = [], [], []
    for u in range(n_users):
        c = u % n_clusters
        items = rng.choice(np.arange(c * size, (c + 1) * size), per_user + 2, replace=False)
        rows += [u] * per_user
        cols += list(items[:per_user])
        held.append(items[per_user:])
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    return x, held


def test_cfgan_learns_the_clusters():
    x, held = clustered()
    users = np.arange(x.shape[0])
    cfg = GANConfig(hidden=64, batch_size=32, lr_g=1e-3, lr_d=1e-3, max_epochs=30, patience=30)

    def valid(model):
        return ranking_metrics_from_topk(topk(model, x, users, 5), held, 5)["recall@5"]

    model, info = train_cfgan(x, valid, cfg)
    recall = ranking_metrics_from_topk(topk(model, x, users, 5), held, 5)["recall@5"]
    # chance: 5 of the 52 unseen items; the user's cluster holds both held-out items
    assert recall == info["best_valid"] and recall > 3 * 5 / 52, info["history"][-3:]
    top = topk(model, x, users, 5)
    assert not any(np.isin(top[u], x[u].indices).any() for u in users)  # never a seen item
