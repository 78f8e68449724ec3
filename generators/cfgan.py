"""CFGAN: a generator of users' purchase vectors trained adversarially (Chae et al., CIKM
2018, "CFGAN: A Generic Collaborative Filtering Framework based on Generative Adversarial
Networks"), the adversarial family of issue #11, built to be compared with the Mult-VAE on
the same validation split and time budget (``benchmarks/gan_compare.py``).

Model
-----
``G(c_u)``: the user's purchase vector ``c_u`` (sparse rows, fed like the VAE's input) ->
``hidden`` (tanh) -> a sigmoid score per item, ``r_hat_u``. ``D(r, c_u)``: a purchase vector
and the condition -> ``hidden`` (tanh) -> the probability that ``r`` is real.

Vector-wise training, the paper's "ZP" variant: the real vector is ``e_u`` (1 on purchased
items); the generated one is ``r_hat_u`` masked by ``e_u`` plus a random share
(``pm_ratio``) of unpurchased items ("partial masking", so that G cannot win by scoring
every item 1), and G also pays ``zr_weight * sum (r_hat_uj)^2`` over another random share
(``zr_ratio``) of unpurchased items ("zero reconstruction"). Items are ranked by
``r_hat_u``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GANConfig", "CFGAN", "train_cfgan", "topk"]


@dataclass
class GANConfig:
    hidden: int = 400
    batch_size: int = 256
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    d_steps: int = 1  # D updates per batch
    g_steps: int = 1  # G updates per batch
    pm_ratio: float = 0.5  # share of unpurchased items in the masked generated vector
    zr_ratio: float = 0.5  # share of unpurchased items G must score 0
    zr_weight: float = 0.1
    max_epochs: int = 1000
    patience: int = 5
    seed: int = 0


class _SparseLinear(nn.Module):
    """``x @ W + b`` for sparse binary rows ``x`` (an embedding bag: no dense input)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(n_in, n_out, mode="sum")
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.bag.weight, std=n_in**-0.5)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.bag(indices, offsets) + self.bias


class CFGAN(nn.Module):
    def __init__(self, n_items: int, hidden: int = 400) -> None:
        super().__init__()
        self.n_items = n_items
        self.g_in = _SparseLinear(n_items, hidden)
        self.g_out = nn.Linear(hidden, n_items)
        self.d_cond = _SparseLinear(n_items, hidden)
        self.d_vec = nn.Linear(n_items, hidden, bias=False)
        self.d_out = nn.Linear(hidden, 1)

    def generate(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``r_hat``: a score in (0, 1) per item, ``(batch, n_items)``."""
        return torch.sigmoid(self.g_out(torch.tanh(self.g_in(indices, offsets))))

    def discriminate(
        self, vectors: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        """Logit of "real" for each purchase vector, given its user's condition."""
        return self.d_out(torch.tanh(self.d_vec(vectors) + self.d_cond(indices, offsets)))[:, 0]

    def generator_parameters(self) -> list[nn.Parameter]:
        return [*self.g_in.parameters(), *self.g_out.parameters()]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [*self.d_cond.parameters(), *self.d_vec.parameters(), *self.d_out.parameters()]


def _bag(rows: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(rows.indices.astype(np.int64)),
        torch.from_numpy(rows.indptr[:-1].astype(np.int64)),
    )


def _random_share(shape: tuple[int, int], ratio: float) -> torch.Tensor:
    """A float mask with ~``ratio`` ones (a byte draw: cheaper than ``bernoulli_``)."""
    return (torch.randint(0, 256, shape, dtype=torch.uint8) < round(ratio * 256)).float()


@torch.no_grad()
def topk(
    model: CFGAN, input_csr: sp.csr_matrix, users: np.ndarray, k: int, batch_size: int = 1000
) -> np.ndarray:
    """Top-``k`` items by ``r_hat`` for ``users``, never one of their input items."""
    out = np.empty((len(users), k), dtype=np.int64)
    for s in range(0, len(users), batch_size):
        rows = input_csr[users[s : s + batch_size]]
        scores = model.generate(*_bag(rows))
        coo = rows.tocoo()
        seen = (
            torch.from_numpy(coo.row.astype(np.int64)),
            torch.from_numpy(coo.col.astype(np.int64)),
        )
        scores[seen] = -1.0
        out[s : s + len(scores)] = torch.topk(scores, k, dim=1).indices.numpy()
    return out


def train_cfgan(
    train_csr: sp.csr_matrix,
    valid: Callable[[CFGAN], float] | None = None,
    cfg: GANConfig | None = None,
    max_seconds: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[CFGAN, dict[str, Any]]:
    """Train on the users x items matrix ``train_csr`` (binary). ``valid(model)`` returns the
    validation metric (higher is better), measured after every epoch; the best weights are
    kept and training stops after ``patience`` epochs without gain or when ``max_seconds``
    (wall) runs out."""
    cfg = cfg or GANConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x = sp.csr_matrix(train_csr, dtype=np.float32)
    x.data[:] = 1.0
    users = np.flatnonzero(np.diff(x.indptr))
    model = CFGAN(x.shape[1], cfg.hidden)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=cfg.lr_g)
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=cfg.lr_d)
    started = time.perf_counter()
    best, best_state, bad, epoch = -1.0, None, 0, 0
    history: list[dict[str, float]] = []
    out_of_time = False
    for epoch in range(1, cfg.max_epochs + 1):
        order = rng.permutation(users)
        d_total = g_total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            rows = x[np.sort(order[s : s + cfg.batch_size])]
            bag = _bag(rows)
            real = torch.from_numpy(rows.toarray())
            unbought = 1.0 - real
            for _ in range(cfg.d_steps):
                keep = real + unbought * _random_share(tuple(real.shape), cfg.pm_ratio)
                with torch.no_grad():
                    fake = model.generate(*bag) * keep
                d_real = model.discriminate(real, *bag)
                d_fake = model.discriminate(fake, *bag)
                loss_d = F.binary_cross_entropy_with_logits(
                    d_real, torch.ones_like(d_real)
                ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                d_total += loss_d.item()
            for _ in range(cfg.g_steps):
                keep = real + unbought * _random_share(tuple(real.shape), cfg.pm_ratio)
                zero = unbought * _random_share(tuple(real.shape), cfg.zr_ratio)
                r_hat = model.generate(*bag)
                d_fake = model.discriminate(r_hat * keep, *bag)
                loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
                loss_g = loss_g + cfg.zr_weight * ((r_hat * zero) ** 2).sum(1).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                g_total += loss_g.item()
            if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                out_of_time = True
                break
        n_batches = -(-len(order) // cfg.batch_size)
        row: dict[str, float] = {
            "epoch": epoch,
            "loss_d": d_total / (n_batches * cfg.d_steps),
            "loss_g": g_total / (n_batches * cfg.g_steps),
            "seconds": time.perf_counter() - started,
        }
        if valid is not None:
            row["valid"] = metric = float(valid(model))
            if metric > best:
                best, bad = metric, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
        history.append(row)
        if log:
            log(" ".join(f"{k}={v:.4g}" for k, v in row.items()))
        if out_of_time or (valid is not None and bad >= cfg.patience):
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {
        "config": asdict(cfg),
        "epochs": epoch,
        "seconds": time.perf_counter() - started,
        "best_valid": best if best >= 0 else None,
        "history": history,
    }
