"""SASRec-style next-item model trained with a full softmax over the catalogue ("SASRec+",
Klenitskiy & Vasilev, RecSys 2023; architecture of Kang & McAuley, ICDM 2018).

Model
-----
Tokens are ``item + 1`` (0 pads). ``x = E[token] * sqrt(d) + P[position]`` -> ``n_layers``
pre-norm causal self-attention blocks (attention, then a two-layer GELU feed-forward, each
with a residual) -> a final LayerNorm gives ``h_t``, the user's state after position ``t``.
The next-item logits are ``h_t @ E[1:].T`` (item embeddings tied with the output layer), and
training minimises the cross-entropy of every next item over the whole catalogue.

Sequences are right-padded: with a causal mask no real position ever attends to a pad, so no
key-padding mask is needed and ``scaled_dot_product_attention(is_causal=True)`` runs its fused
kernel. Positions count from the start of the window (the last ``max_len`` items).

Serving state
-------------
A user's state is ``h`` at their last item, a ``d``-vector: scoring the catalogue is one
``(n_items x d) @ d`` product. Absolute positions shift when an item is appended to a full
window, so an event re-encodes the window (one forward pass of at most ``max_len`` tokens,
about a millisecond); :func:`encode` of the appended window is, by construction, the full
re-encode, and is what the serving path caches after each acknowledged event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SeqConfig",
    "SASRec",
    "encode",
    "encode_batch",
    "train_sasrec",
    "leave_one_out_topk",
    "hr_ndcg",
]


@dataclass
class SeqConfig:
    """Architecture and training settings (defaults: SASRec+ on ML-1M sizes)."""

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 1
    max_len: int = 200
    dropout: float = 0.1
    lr: float = 3e-3  # the peak; decays linearly to the end of the budget
    batch_size: int = 64
    weight_decay: float = 0.0
    max_epochs: int = 200
    patience: int = 5
    eval_every: int = 1
    valid_users: int = 2048  # validation users sampled once (fewer: cheaper, noisier epochs)
    warmup: float = 0.02  # share of the budget with a linearly rising learning rate
    seed: int = 0
    # the output layer's products in training (most of its arithmetic): "fp32", "bf16", or
    # "auto" (bf16 where this CPU runs it at least 1.3x faster); the blocks stay float32
    precision: str = "auto"
    # the softmax over the whole catalogue up to this many items (computed in chunks: its
    # memory stays flat, its time grows with the catalogue); above it, over the target
    # and this many items drawn uniformly per batch (shared by all its positions)
    full_softmax_max: int = 65536


class _Dropout(nn.Module):
    """Inverted dropout with a byte mask: ``p`` rounded to 1/256. ``nn.Dropout``'s
    ``bernoulli_`` is the slowest op of a CPU training step after the output layer
    (7.7 ms vs 2.1 ms to draw the mask for a 64 x 200 x 64 batch, measured here)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self._cut = round(p * 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._cut == 0:
            return x
        keep = torch.randint(0, 256, x.shape, dtype=torch.uint8) >= self._cut
        return x * keep.to(x.dtype).mul_(256 / (256 - self._cut))


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, dim)
        self.ff2 = nn.Linear(dim, dim)
        self.drop = _Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,  # no attention dropout: it would force the unfused kernel
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.ln2(x))))))


class SASRec(nn.Module):
    """Causal self-attention over a user's item sequence; tied item embeddings score the
    catalogue. ``forward(tokens)`` takes right-padded ``(batch, time)`` tokens (item + 1)."""

    def __init__(
        self,
        n_items: int,
        dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 1,
        max_len: int = 200,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError("dim must be a multiple of n_heads")
        self.n_items, self.dim, self.n_layers = n_items, dim, n_layers
        self.n_heads, self.max_len, self.dropout = n_heads, max_len, dropout
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_drop = _Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(dim)
        nn.init.normal_(self.item_emb.weight, std=dim**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def config(self) -> dict[str, Any]:
        return {
            "n_items": self.n_items,
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "max_len": self.max_len,
            "dropout": self.dropout,
        }

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.item_emb(tokens) * math.sqrt(self.dim) + self.pos_emb.weight[:t]
        x = self.emb_drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    def output_weight(self) -> torch.Tensor:
        """``(n_items, dim)`` output embeddings: row ``i`` scores item ``i``."""
        return self.item_emb.weight[1:]


def _window(items: np.ndarray, max_len: int) -> np.ndarray:
    return np.asarray(items, dtype=np.int64)[-max_len:]


def _padded(seqs: Sequence[np.ndarray], length: int) -> torch.Tensor:
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        out[r, : len(s)] = np.asarray(s) + 1
    return torch.from_numpy(out)


@torch.inference_mode()
def encode_batch(model: SASRec, seqs: Sequence[np.ndarray]) -> np.ndarray:
    """States ``(len(seqs), dim)`` float32: ``h`` after the last item of each sequence's window
    (the last ``max_len`` items). An empty sequence has no state: a row of zeros."""
    was = model.training
    model.eval()
    try:
        wins = [_window(s, model.max_len) for s in seqs]
        lengths = np.array([len(w) for w in wins])
        out = np.zeros((len(seqs), model.dim), dtype=np.float32)
        nz = np.flatnonzero(lengths)
        if len(nz):
            h = model(_padded([wins[i] for i in nz], int(lengths[nz].max())))
            last = torch.from_numpy(lengths[nz] - 1)
            out[nz] = h[torch.arange(len(nz)), last].float().numpy()
        return out
    finally:
        model.train(was)


def encode(model: SASRec, items: np.ndarray) -> np.ndarray:
    """The state after ``items`` (oldest first): the full re-encode of one user's window."""
    return encode_batch(model, [np.asarray(items, dtype=np.int64)])[0]


@torch.inference_mode()
def leave_one_out_topk(
    model: SASRec,
    inputs: Sequence[np.ndarray],
    k: int = 10,
    exclude: Sequence[np.ndarray] | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Top-``k`` items (full ranking) after each input sequence, never an item of that
    sequence (or of ``exclude[u]`` when given): the leave-one-out protocol's ranking."""
    weight = model.output_weight().detach()
    out = np.empty((len(inputs), k), dtype=np.int64)
    exclude = inputs if exclude is None else exclude
    for s in range(0, len(inputs), batch_size):
        h = torch.from_numpy(encode_batch(model, inputs[s : s + batch_size]))
        logits = h @ weight.T
        rows = [np.full(len(e), r) for r, e in enumerate(exclude[s : s + batch_size])]
        if rows:
            r = torch.from_numpy(np.concatenate(rows).astype(np.int64))
            c = torch.from_numpy(np.concatenate(exclude[s : s + batch_size]).astype(np.int64))
            logits[r, c] = -math.inf
        out[s : s + len(h)] = torch.topk(logits, k, dim=1).indices.numpy()
    return out


def hr_ndcg(topk: np.ndarray, targets: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k with one relevant item per row (NDCG = 1 / log2(rank + 1))."""
    topk = np.asarray(topk)[:, :k]
    hit = topk == np.asarray(targets)[:, None]
    rank = np.argmax(hit, axis=1)
    found = hit.any(axis=1)
    ndcg = np.where(found, 1.0 / np.log2(rank + 2.0), 0.0)
    return {f"hr@{k}": float(found.mean()), f"ndcg@{k}": float(ndcg.mean()), "n_users": len(hit)}


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of the logits ``h @ w.T`` against ``target``, a chunk of rows at a
    time: the (tokens x catalogue) logits never exist whole, and the gradients are formed in
    the forward pass (the loss ends the graph; ``backward`` only scales them), so each
    chunk's softmax passes run in cache. The three products run in ``dtype`` (bfloat16 where
    the CPU has it: measured ~1.6x faster than float32 here), the softmax and sums in
    float32. Measured on ML-1M sizes (12,800 x 64 x 3,416): 0.13 s per forward+backward vs
    0.47 s for ``F.cross_entropy(h @ w.T)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        n, n_items = h.shape[0], w.shape[0]
        chunk = max(64, (1 << 21) // n_items)  # ~8 MB of float32 logits per chunk
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32)
        wl = w.detach().to(dtype)
        total = torch.zeros((), dtype=torch.float64)
        for s in range(0, n, chunk):
            hc, tc = h[s : s + chunk].detach().to(dtype), target[s : s + chunk]
            rows = torch.arange(len(tc))
            logits = (hc @ wl.T).float()
            picked = logits[rows, tc]
            top = logits.amax(1, keepdim=True)
            logits.sub_(top).exp_()
            z = logits.sum(1, keepdim=True)
            total += (z.log().add_(top).squeeze(1) - picked).sum()
            logits.div_(z)  # the softmax; minus the one-hot target: d loss / d logits
            logits[rows, tc] -= 1
            g = logits.to(dtype)
            grad_h[s : s + chunk] = g @ wl
            grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        ctx.n = n
        return (total / max(n, 1)).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        scale = grad / max(ctx.n, 1)
        return grad_h * scale, grad_w * scale, None, None


def _next_item_loss(
    model: SASRec,
    h: torch.Tensor,
    target: torch.Tensor,
    full_max: int,
    rng: np.random.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cross-entropy of the next item: over the whole catalogue when it has at most
    ``full_max`` items, else over the target and ``full_max`` shared uniform negatives
    (a negative equal to the row's target is masked out)."""
    weight = model.output_weight()
    if model.n_items <= full_max:
        if torch.is_grad_enabled():
            return _ChunkedSoftmaxCE.apply(h, weight, target, dtype)  # type: ignore[no-any-return]
        return F.cross_entropy((h @ weight.T).float(), target)
    negatives = torch.from_numpy(rng.integers(0, model.n_items, full_max))
    positive = (h * weight[target]).sum(-1, keepdim=True)
    others = (h @ weight[negatives].T).masked_fill(negatives[None, :] == target[:, None], -1e4)
    logits = torch.cat([positive, others], dim=1).float()
    return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long))


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar length (less padding): sort by length with random tie-breaking,
    cut, shuffle the batch order."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def train_sasrec(
    seqs: Sequence[np.ndarray],
    n_items: int,
    cfg: SeqConfig | None = None,
    valid_targets: np.ndarray | None = None,
    max_seconds: float | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[SASRec, dict[str, Any]]:
    """Train on ``seqs`` (each user's items, oldest first; ids in ``[0, n_items)``).

    With ``valid_targets`` (one item per sequence, or -1 for none), NDCG@10 of the next item
    after the whole sequence is measured every ``eval_every`` epochs; the best weights are
    kept and, without ``max_seconds``, training stops after ``patience`` evaluations
    without gain. ``max_seconds`` bounds the wall time of the updates (the budget may end
    mid-epoch; a last validation follows). The learning rate rises over the
    first ``warmup`` of the budget and then decays linearly to zero at its end (the budget:
    ``max_seconds`` when given, else ``max_epochs``), which is what a short, fixed budget
    trains best with. Returns the model and a history."""
    cfg = cfg or SeqConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = SASRec(n_items, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.max_len, cfg.dropout)
    precision = cfg.precision
    if precision == "auto":
        from generators.train import faster_precision

        precision = faster_precision(4096, cfg.dim, n_items)
    loss_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # a window of max_len inputs needs max_len + 1 items (the last one only as a target)
    train = [_window(s, cfg.max_len + 1) for s in seqs if len(s) >= 2]
    lengths = np.array([len(s) - 1 for s in train])
    started, cpu_started = time.perf_counter(), time.process_time()
    best, best_state, bad = -1.0, None, 0
    history: list[dict[str, float]] = []
    v_users = v_targets = None
    if valid_targets is not None:
        valid_targets = np.asarray(valid_targets)
        v_users = np.flatnonzero((valid_targets >= 0) & np.array([len(s) > 0 for s in seqs]))
        if len(v_users) > cfg.valid_users:
            v_users = np.sort(rng.choice(v_users, cfg.valid_users, replace=False))
        v_targets = valid_targets[v_users]
    n_batches = -(-len(train) // cfg.batch_size)

    def budget_used(step: int) -> float:
        # whichever bound ends training first sets the schedule: the epochs (then it is
        # deterministic) or the wall-clock budget (then it depends on the machine's speed)
        used = step / (cfg.max_epochs * n_batches)
        if max_seconds:
            used = max(used, (time.perf_counter() - started) / max_seconds)
        return min(used, 1.0)

    step = 0
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        total, count = 0.0, 0
        for batch in _batches(lengths, cfg.batch_size, rng):
            t = int(lengths[batch].max())
            tok = _padded([train[i] for i in batch], t + 1)
            inp, tgt = tok[:, :-1], tok[:, 1:]
            mask = tgt > 0
            h = model(inp)[mask]
            loss = _next_item_loss(model, h, tgt[mask] - 1, cfg.full_softmax_max, rng, loss_dtype)
            used = budget_used(step)
            scale = used / cfg.warmup if used < cfg.warmup else (1 - used) / (1 - cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * max(scale, 0.01)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += float(loss.detach()) * int(mask.sum())
            count += int(mask.sum())
            if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                break  # the budget ends mid-epoch: validate what there is, and stop
        elapsed = time.perf_counter() - started
        row: dict[str, float] = {
            "epoch": epoch, "loss": total / max(count, 1), "seconds": elapsed,
            "cpu_seconds": time.process_time() - cpu_started, "lr": opt.param_groups[0]["lr"],
        }  # fmt: skip
        out_of_time = max_seconds is not None and elapsed >= max_seconds
        if v_users is not None and v_targets is not None and (
            epoch % cfg.eval_every == 0 or out_of_time
        ):
            top = leave_one_out_topk(model, [seqs[int(u)] for u in v_users], 10)
            row.update(hr_ndcg(top, v_targets, 10))
            if row["ndcg@10"] > best:
                best, bad = row["ndcg@10"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                row["best"] = 1
            else:
                bad += 1
        history.append(row)
        if log:
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items()))  # fmt: skip
        # under a time budget the schedule decays to its end, where the model gains most:
        # a noisy validation must not stop it early (the best epoch is still kept)
        if v_users is not None and bad >= cfg.patience and not max_seconds:
            break
        if out_of_time:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {
        "config": asdict(cfg),
        "epochs": epoch,
        "precision": precision,
        "seconds": time.perf_counter() - started,
        "best_valid_ndcg@10": best if best >= 0 else None,
        "history": history,
    }
    return model, info


# --- saving, loading, serving ------------------------------------------------------

SEQ_FORMAT = "recsvc-generator/sasrec"
SEQ_FORMAT_VERSION = 1
_CONFIG, _WEIGHTS, _TAILS = "config.json", "weights.pt", "tails.pt"
_TRANSITIONS = "transitions.npz"


def save_sequence(
    model: SASRec,
    directory: Any,
    tails: Sequence[np.ndarray] | None = None,
    meta: dict[str, Any] | None = None,
    transitions: Any = None,
) -> Any:
    """Write the model (``weights.pt``: a flat dict of tensors) and, optionally, each user's
    last ``max_len`` training items (``tails.pt``: ``indptr`` + ``items``) and an item
    transition matrix (``transitions.npz``, scipy sparse; its settings in
    ``meta["transitions"]``) to ``directory``; ``config.json`` (config, meta, sha256 of each
    file) is written last."""
    import datetime as _dt
    import json
    from pathlib import Path

    from generators.io import _atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    files = {_WEIGHTS: _atomic_write(directory, _WEIGHTS, lambda p: torch.save(tensors, p))}
    if tails is not None:
        wins = [_window(t, model.max_len) for t in tails]
        indptr = np.concatenate([[0], np.cumsum([len(w) for w in wins])]).astype(np.int64)
        flat = np.concatenate(wins) if wins else np.empty(0, np.int64)
        arrays = {"indptr": torch.from_numpy(indptr), "items": torch.from_numpy(flat)}
        files[_TAILS] = _atomic_write(directory, _TAILS, lambda p: torch.save(arrays, p))
    if transitions is not None:
        import scipy.sparse as sp

        matrix = sp.csr_matrix(transitions, dtype=np.float32)

        def write_npz(path: Any) -> None:
            with open(path, "wb") as f:  # a file object: a path would gain an ".npz" suffix
                sp.save_npz(f, matrix, compressed=False)

        files[_TRANSITIONS] = _atomic_write(directory, _TRANSITIONS, write_npz)
    doc = {
        "format": SEQ_FORMAT,
        "format_version": SEQ_FORMAT_VERSION,
        "config": model.config(),
        "files": files,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
    }
    text = json.dumps(doc, indent=2, sort_keys=True)
    _atomic_write(directory, _CONFIG, lambda p: p.write_text(text))
    return directory


class SequenceRuntime:
    """A loaded sequence model for serving: ``state(items)`` (a forward pass, one thread)
    and ``scores(state)`` (one ``(n_items x d) @ d`` product), plus the training tails
    of the users the model knows (``tail(row)``, item indices oldest first), and the item
    transitions when the bundle has them (``transitions``: ``(matrix, settings)`` or None)."""

    def __init__(
        self,
        model: SASRec,
        indptr: np.ndarray,
        items: np.ndarray,
        version: str,
        transitions: tuple[Any, dict[str, Any]] | None = None,
    ):
        self.model = model.eval()
        self.transitions = transitions
        self.version = version
        self.n_items = model.n_items
        self.max_len = model.max_len
        self.out_weight = model.output_weight().detach().numpy().astype(np.float32).copy()
        self._indptr, self._items = indptr, items

    def tail(self, row: int) -> np.ndarray:
        if row < 0 or row + 1 >= len(self._indptr):
            return np.empty(0, dtype=np.int64)
        return self._items[self._indptr[row] : self._indptr[row + 1]]

    def state(self, items: np.ndarray) -> np.ndarray:
        """The user's state after ``items`` (a full re-encode of the last ``max_len``)."""
        return encode(self.model, items)

    def scores(self, states: np.ndarray) -> np.ndarray:
        """Next-item logits over the catalogue, ``(users, n_items)`` or ``(n_items,)``."""
        return states @ self.out_weight.T

    @classmethod
    def load(cls, directory: Any, verify: bool = True) -> SequenceRuntime:
        """Load what :func:`save_sequence` wrote (``torch.load(weights_only=True)``, after
        checking each file's sha256)."""
        import json
        from pathlib import Path

        from generators.io import _sha256, load_tensors

        directory = Path(directory)
        doc = json.loads((directory / _CONFIG).read_text())
        if doc.get("format") != SEQ_FORMAT:
            raise ValueError(f"{directory}: not a sequence model (format {doc.get('format')!r})")
        if int(doc.get("format_version", 0)) > SEQ_FORMAT_VERSION:
            raise ValueError(f"sequence format {doc['format_version']} is newer than supported")
        files = doc["files"]
        if verify:
            for name, digest in files.items():
                if _sha256(directory / name) != digest:
                    raise ValueError(f"checksum mismatch for {directory / name}")

        cfg = doc["config"]
        model = SASRec(
            int(cfg["n_items"]), int(cfg["dim"]), int(cfg["n_layers"]), int(cfg["n_heads"]),
            int(cfg["max_len"]), float(cfg["dropout"]),
        )  # fmt: skip
        model.load_state_dict(load_tensors(directory / _WEIGHTS))
        indptr, items = np.zeros(1, np.int64), np.empty(0, np.int64)
        if _TAILS in files:
            t = load_tensors(directory / _TAILS)
            indptr, items = t["indptr"].numpy(), t["items"].numpy()
        transitions = None
        if _TRANSITIONS in files:
            import scipy.sparse as sp

            matrix = sp.load_npz(directory / _TRANSITIONS).tocsr()  # no pickles: allow_pickle=False
            transitions = (matrix, dict(doc.get("meta", {}).get("transitions") or {}))
        return cls(model, indptr, items, version=files[_WEIGHTS][:16], transitions=transitions)
