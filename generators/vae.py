"""Mult-VAE (Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018).

Model
-----
Encoder: ``x -> L2-normalise -> dropout (training only) -> Linear(n_items, hidden) -> tanh
-> Linear(hidden, 2 * latent)`` giving ``mu`` and ``logvar``.
Decoder: ``z -> Linear(latent, hidden) -> tanh -> Linear(hidden, n_items)`` item logits and,
when ``n_attributes > 0``, a second head ``Linear(hidden, n_attributes)`` giving logits over
content attributes (categories, tags, title tokens...).

Loss: multinomial log-likelihood of the user's items (and, with the attribute head, of the
user's attribute bag: the attribute counts of the items in the history) plus ``beta * KL``,
``beta`` rising linearly from 0 to ``beta_max`` over ``total_anneal_steps`` updates.

Layout of the first layer
-------------------------
The first encoder layer is mathematically ``Linear(n_items, hidden)``, ``a = W1 @ x + b1``,
but its weight is stored *transposed*, as an ``(n_items, hidden)`` matrix ``enc_in.weight``
whose row ``i`` is the column ``W1[:, i]``. That is the layout an embedding bag needs (the
sparse training input never materialises a dense ``(batch, n_items)`` matrix) and it makes
the per-event update of the serving path a contiguous row read.

Encoder input and negative weights
----------------------------------
Histories at serving time carry real-valued weights (training weight plus feedback since
training), which can become zero or negative after dislikes / removals. The encoder input is
``x_i = clip(w_i, 0, input_cap)`` (``input_cap`` = None: no upper bound): a negative or zero
weight means "not a positive signal" and contributes nothing to the user vector. We do **not**
feed negative values to the encoder: the model was trained on non-negative inputs only, and
a negative entry would push the L2 normalisation and the first layer into a region the model
never saw (the norm counts it as signal, the pre-activation moves in an arbitrary direction).
Disliked items should instead be excluded from the output by the caller (``exclude=`` in
:mod:`generators.sampling`). The same transform is used in training (training data are
non-negative anyway), in :func:`encode_full` and in :func:`update_state`, which applies the
*clipped* old and new values, so the incremental path always equals a full re-encode.

Incremental user vector
-----------------------
Because the first layer is linear in ``x``, an :class:`EncoderState` keeps the un-normalised
pre-activation ``a = W1 @ x`` (no bias), ``norm2 = ||x||^2`` and the number of positive entries.
One changed weight updates it in O(hidden): ``a += W1[:, i] * (x_new - x_old)``,
``norm2 += x_new^2 - x_old^2``. The latent is ``mu = W2_mu @ tanh(a / sqrt(norm2) + b1) + b2_mu``
(for an empty history, ``tanh(b1)``: exactly what the network computes for an all-zero row).
The state is kept in float64 so that long chains of updates do not drift; when the count of
positive entries drops to zero the state is reset to exact zeros (no cancellation residue).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse as sp

__all__ = [
    "MultVAE",
    "SparseRows",
    "VAEOutput",
    "EncoderState",
    "GeneratorRuntime",
    "encoder_input",
    "encode_full",
    "update_state",
    "latent_from_state",
    "kl_beta",
]

_NORM_EPS = 1e-12  # same eps as torch.nn.functional.normalize


def encoder_input(weights: Any, input_cap: float | None = None) -> Any:
    """The encoder input for raw history weights: ``clip(w, 0, input_cap)``.

    Works on python floats, numpy arrays and torch tensors. Negative and zero weights
    (dislikes, removals) contribute nothing; see the module docstring.
    """
    if isinstance(weights, torch.Tensor):
        return weights.clamp(min=0.0, max=input_cap)
    if np.isscalar(weights):
        w = float(weights)
        if not math.isfinite(w):
            raise ValueError(f"non-finite weight {weights!r}")
        w = max(w, 0.0)
        return min(w, input_cap) if input_cap is not None else w
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        raise ValueError("non-finite weight in history")
    return np.clip(w, 0.0, input_cap if input_cap is not None else np.inf)


def kl_beta(step: int, beta_max: float, total_anneal_steps: int) -> float:
    """KL weight after ``step`` updates: linear from 0 to ``beta_max`` over
    ``total_anneal_steps`` updates, constant afterwards."""
    if total_anneal_steps <= 0:
        return float(beta_max)
    return float(beta_max) * min(1.0, step / total_anneal_steps)


# ---------------------------------------------------------------------------------------
# Sparse batches
# ---------------------------------------------------------------------------------------


class SparseRows(NamedTuple):
    """A batch of sparse rows (CSR-like), the training / batch-scoring input of the encoder.

    ``indices``: column of each non-zero (int64); ``offsets``: start of each row in
    ``indices`` (int64, length ``n_rows``); ``values``: non-negative weights (float32);
    ``row_ids``: row of each non-zero (int64).
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor
    row_ids: torch.Tensor
    n_rows: int

    @classmethod
    def from_csr(cls, csr: sp.csr_matrix, input_cap: float | None = None) -> SparseRows:
        csr = csr.tocsr()
        indptr = np.asarray(csr.indptr, dtype=np.int64)
        n_rows = csr.shape[0]
        counts = np.diff(indptr)
        values = encoder_input(np.asarray(csr.data, dtype=np.float64), input_cap)
        return cls(
            indices=torch.from_numpy(np.asarray(csr.indices, dtype=np.int64)),
            offsets=torch.from_numpy(indptr[:-1].copy()),
            values=torch.from_numpy(values.astype(np.float32)),
            row_ids=torch.from_numpy(np.repeat(np.arange(n_rows, dtype=np.int64), counts)),
            n_rows=n_rows,
        )

    def row_sums(self, values: torch.Tensor | None = None) -> torch.Tensor:
        v = self.values if values is None else values
        return torch.zeros(self.n_rows, dtype=v.dtype).index_add_(0, self.row_ids, v)


class VAEOutput(NamedTuple):
    logits: torch.Tensor
    attr_logits: torch.Tensor | None
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


class ItemInputLinear(nn.Module):
    """``Linear(n_items, hidden)`` with the weight stored transposed, ``(n_items, hidden)``.

    ``forward`` takes a dense ``(batch, n_items)`` tensor or (via :meth:`bag`) sparse rows.
    """

    def __init__(self, n_items: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_items, hidden))
        self.bias = nn.Parameter(torch.empty(hidden))
        # Same init as nn.Linear(n_items, hidden) (Kaiming-uniform, fan_in = n_items).
        bound = 1.0 / math.sqrt(n_items)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)

    def bag(
        self, indices: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        out = F.embedding_bag(indices, self.weight, offsets, mode="sum", per_sample_weights=values)
        return out + self.bias


class MultVAE(nn.Module):
    """Mult-VAE with an optional attribute head. See the module docstring."""

    def __init__(
        self,
        n_items: int,
        hidden: int = 600,
        latent: int = 200,
        dropout: float = 0.5,
        n_attributes: int = 0,
        input_cap: float | None = None,
    ) -> None:
        super().__init__()
        if n_items <= 0 or hidden <= 0 or latent <= 0 or n_attributes < 0:
            raise ValueError("n_items, hidden, latent must be > 0 and n_attributes >= 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if input_cap is not None and not input_cap > 0:
            raise ValueError("input_cap must be > 0 or None")
        self.n_items = int(n_items)
        self.hidden = int(hidden)
        self.latent = int(latent)
        self.dropout = float(dropout)
        self.n_attributes = int(n_attributes)
        self.input_cap = None if input_cap is None else float(input_cap)

        self.enc_in = ItemInputLinear(n_items, hidden)
        self.enc_out = nn.Linear(hidden, 2 * latent)
        self.dec_hidden = nn.Linear(latent, hidden)
        self.dec_out = nn.Linear(hidden, n_items)
        self.dec_attr = nn.Linear(hidden, n_attributes) if n_attributes > 0 else None
        # Xavier init of the weights as in the reference implementation, small-normal biases.
        for lin in (self.enc_out, self.dec_hidden, self.dec_out, self.dec_attr):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=0.001)
        nn.init.xavier_uniform_(self.enc_in.weight)
        nn.init.normal_(self.enc_in.bias, std=0.001)

    def config(self) -> dict[str, Any]:
        return {
            "n_items": self.n_items,
            "hidden": self.hidden,
            "latent": self.latent,
            "dropout": self.dropout,
            "n_attributes": self.n_attributes,
            "input_cap": self.input_cap,
        }

    # -- encoder -------------------------------------------------------------------------

    def encode(self, x: torch.Tensor | SparseRows) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` for a dense ``(batch, n_items)`` tensor or :class:`SparseRows`."""
        if isinstance(x, SparseRows):
            v = x.values.to(self.enc_in.weight.dtype).clamp(min=0.0, max=self.input_cap)
            norm = x.row_sums(v * v).sqrt().clamp_min(_NORM_EPS)
            v = v / norm[x.row_ids]
            v = F.dropout(v, self.dropout, self.training)
            pre = self.enc_in.bag(x.indices, x.offsets, v)
        else:
            x = encoder_input(x, self.input_cap)
            x = F.normalize(x, dim=1, eps=_NORM_EPS)
            x = F.dropout(x, self.dropout, self.training)
            pre = self.enc_in(x)
        h = torch.tanh(pre)
        out = self.enc_out(h)
        return out[:, : self.latent], out[:, self.latent :]

    # -- decoder -------------------------------------------------------------------------

    def decode_hidden(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dec_hidden(z))

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.decode_hidden(z)
        attr = self.dec_attr(h) if self.dec_attr is not None else None
        return self.dec_out(h), attr

    def forward(self, x: torch.Tensor | SparseRows) -> VAEOutput:
        mu, logvar = self.encode(x)
        if self.training:
            std = torch.exp(0.5 * logvar)
            z = mu + torch.randn_like(std) * std
        else:
            z = mu
        logits, attr_logits = self.decode(z)
        return VAEOutput(logits, attr_logits, mu, logvar, z)

    # -- loss ----------------------------------------------------------------------------

    @staticmethod
    def multinomial_nll(logits: torch.Tensor, target: torch.Tensor | SparseRows) -> torch.Tensor:
        """Per-row ``-sum_i x_i log softmax(logits)_i`` for dense or sparse targets ``x``."""
        if isinstance(target, SparseRows):
            return _sparse_multinomial_nll(logits, target)
        return -(F.log_softmax(logits, dim=1) * target).sum(dim=1)

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Per-row KL(q(z|x) || N(0, I))."""
        return 0.5 * torch.sum(-logvar + torch.exp(logvar) + mu * mu - 1.0, dim=1)

    def loss(
        self,
        x: torch.Tensor | SparseRows,
        out: VAEOutput,
        beta: float,
        attr_target: torch.Tensor | SparseRows | None = None,
        attr_weight: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Batch-mean negative ELBO: ``nll_items + attr_weight * nll_attrs + beta * KL``."""
        if isinstance(x, SparseRows):
            target: torch.Tensor | SparseRows = x._replace(
                values=x.values.clamp(min=0.0, max=self.input_cap)
            )
        else:
            target = encoder_input(x, self.input_cap)
        nll = self.multinomial_nll(out.logits, target).mean()
        kl = self.kl(out.mu, out.logvar).mean()
        total = nll + beta * kl
        parts = {"nll": nll, "kl": kl}
        if attr_target is not None:
            if out.attr_logits is None:
                raise ValueError("attr_target given but the model has no attribute head")
            attr_nll = self.multinomial_nll(out.attr_logits, attr_target).mean()
            total = total + attr_weight * attr_nll
            parts["attr_nll"] = attr_nll
        parts["loss"] = total
        return parts

    def training_loss(
        self,
        x: SparseRows,
        beta: float,
        attr_target: SparseRows | None = None,
        attr_weight: float = 1.0,
        mm_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Same value as ``loss(x, forward(x), ...)`` for sparse batches, via the fused output
        layer (never materialises logits as an autograd graph node). Used by training.
        ``mm_dtype``: see :func:`fused_output_nll` (item head only)."""
        mu, logvar = self.encode(x)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        h = self.decode_hidden(z)
        target = x._replace(values=x.values.clamp(min=0.0, max=self.input_cap))
        nll = fused_output_nll(h, self.dec_out, target, mm_dtype).mean()
        kl = self.kl(mu, logvar).mean()
        total = nll + beta * kl
        parts = {"nll": nll, "kl": kl}
        if attr_target is not None:
            if self.dec_attr is None:
                raise ValueError("attr_target given but the model has no attribute head")
            attr_nll = fused_output_nll(h, self.dec_attr, attr_target).mean()
            total = total + attr_weight * attr_nll
            parts["attr_nll"] = attr_nll
        parts["loss"] = total
        return parts


class _OutputNLL(torch.autograd.Function):
    """Fused output layer + multinomial NLL for sparse targets (the training hot path).

    Per row ``r``, with ``l_r = W h_r + b`` and ``s_r = sum_j x_rj``:
    ``nll_r = s_r * logsumexp(l_r) - sum_j x_rj l_rj``. The ``(batch, n_out)`` logits buffer is
    turned in place into ``exp(l - max)`` and, in backward, in place into the gradient
    ``s_r * softmax(l_r) - x_r``: a handful of passes over the big buffer instead of the
    dozen autograd would do through addmm / log_softmax / mul / gather. Not twice
    differentiable (backward consumes the buffer).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, indices, row_ids, values, n_rows, mm_dtype):  # type: ignore[override]
        if mm_dtype is None or mm_dtype == h.dtype:
            hc, wc = h, weight
            e = torch.addmm(bias, h, weight.t())
        else:  # mixed precision: low-precision matmuls, float32 softmax / loss / gradients
            hc, wc = h.to(mm_dtype), weight.to(mm_dtype)
            e = torch.mm(hc, wc.t()).to(h.dtype).add_(bias)
        picked = e[row_ids, indices] * values
        m = e.amax(dim=1, keepdim=True)
        e.sub_(m).exp_()
        z = e.sum(dim=1)
        lse = m.squeeze(1) + z.log()
        xs = torch.zeros(n_rows, dtype=e.dtype).index_add_(0, row_ids, values)
        dot = torch.zeros(n_rows, dtype=e.dtype).index_add_(0, row_ids, picked)
        ctx.save_for_backward(hc, wc, z, xs, indices, row_ids, values)
        ctx.e = e
        ctx.out_dtype = h.dtype
        return xs * lse - dot

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hc, wc, z, xs, indices, row_ids, values = ctx.saved_tensors
        g = ctx.e
        ctx.e = None
        if g is None:
            raise RuntimeError("_OutputNLL.backward called twice")
        g.mul_((grad_out * xs / z)[:, None])
        g.index_put_((row_ids, indices), -(grad_out[row_ids] * values), accumulate=True)
        grad_b = g.sum(dim=0) if ctx.needs_input_grad[2] else None
        gc = g if g.dtype == wc.dtype else g.to(wc.dtype)
        del g
        dt = ctx.out_dtype
        grad_h = (gc @ wc).to(dt) if ctx.needs_input_grad[0] else None
        grad_w = (gc.t() @ hc).to(dt) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _sparse_multinomial_nll(logits: torch.Tensor, target: SparseRows) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1)[target.row_ids, target.indices]
    v = target.values.to(logits.dtype)
    return -torch.zeros(target.n_rows, dtype=logits.dtype).index_add(0, target.row_ids, logp * v)


def fused_output_nll(
    h: torch.Tensor, layer: nn.Linear, target: SparseRows, mm_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-row multinomial NLL of ``layer(h)`` against sparse ``target`` (fused, see above).

    ``mm_dtype=torch.bfloat16``: the two big matmuls (forward logits, backward) run in
    bfloat16 (fast with AMX / AVX512-BF16), everything else in ``h.dtype``.
    """
    return _OutputNLL.apply(
        h,
        layer.weight,
        layer.bias,
        target.indices,
        target.row_ids,
        target.values.to(h.dtype),
        target.n_rows,
        mm_dtype,
    )


# ---------------------------------------------------------------------------------------
# Serving runtime (numpy, no autograd)
# ---------------------------------------------------------------------------------------


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


class GeneratorRuntime:
    """The weights of a trained :class:`MultVAE` as numpy arrays, for serving.

    Arrays (float32, C-contiguous):

    - ``W1T`` ``(n_items, hidden)``: first encoder layer, row ``i`` = ``W1[:, i]``; ``b1``.
    - ``W2_mu`` ``(latent, hidden)``, ``b2_mu``: the ``mu`` half of the second encoder layer
      (the ``logvar`` half is not needed at serving time and is dropped).
    - ``Wd1`` ``(hidden, latent)``, ``bd1``: decoder hidden layer.
    - ``Wout`` ``(n_items, hidden)``, ``bout``: item logits; its rows are the item embeddings
      used for diversity.
    - ``Wattr`` ``(n_attributes, hidden)``, ``battr``: attribute head, or None.

    ``item_attributes`` (optional, scipy CSR ``(n_items, n_attributes)``) maps attribute
    biases to item biases for topic steering. ``version`` identifies the weights (a hash of the
    encoder matrix unless given); :class:`EncoderState` objects remember it so a state built on
    other weights is rejected instead of silently mixing models.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray | None],
        config: dict[str, Any],
        meta: dict[str, Any] | None = None,
        item_attributes: sp.csr_matrix | None = None,
        version: str | None = None,
    ) -> None:
        def get(name: str) -> np.ndarray:
            a = arrays[name]
            if a is None:
                raise ValueError(f"missing array {name}")
            return np.ascontiguousarray(a, dtype=np.float32)

        self.config = dict(config)
        self.meta = dict(meta or {})
        self.n_items = int(config["n_items"])
        self.hidden = int(config["hidden"])
        self.latent = int(config["latent"])
        self.n_attributes = int(config.get("n_attributes", 0))
        cap = config.get("input_cap")
        self.input_cap = None if cap is None else float(cap)

        self.W1T = get("W1T")
        self.b1 = get("b1")
        self.W2_mu = get("W2_mu")
        self.b2_mu = get("b2_mu")
        self.Wd1 = get("Wd1")
        self.bd1 = get("bd1")
        self.Wout = get("Wout")
        self.bout = get("bout")
        self.Wattr = get("Wattr") if self.n_attributes > 0 else None
        self.battr = get("battr") if self.n_attributes > 0 else None
        expected = {
            "W1T": (self.n_items, self.hidden),
            "b1": (self.hidden,),
            "W2_mu": (self.latent, self.hidden),
            "b2_mu": (self.latent,),
            "Wd1": (self.hidden, self.latent),
            "bd1": (self.hidden,),
            "Wout": (self.n_items, self.hidden),
            "bout": (self.n_items,),
        }
        if self.n_attributes > 0:
            expected["Wattr"] = (self.n_attributes, self.hidden)
            expected["battr"] = (self.n_attributes,)
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {shape}")
        # float64 copies of the small encoder pieces: latent_from_state stays in float64.
        self._b1_64 = self.b1.astype(np.float64)
        self._W2_mu_64 = self.W2_mu.astype(np.float64)
        self._b2_mu_64 = self.b2_mu.astype(np.float64)
        self._item_norms: np.ndarray | None = None
        self.item_attributes = None
        if item_attributes is not None:
            self.set_item_attributes(item_attributes)
        if version is None:
            version = hashlib.sha256(self.W1T.tobytes()).hexdigest()[:16]
        self.version = str(version)

    @classmethod
    def from_model(
        cls,
        model: MultVAE,
        meta: dict[str, Any] | None = None,
        item_attributes: sp.csr_matrix | None = None,
    ) -> GeneratorRuntime:
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        L = model.latent
        arrays: dict[str, np.ndarray | None] = {
            "W1T": _f32(sd["enc_in.weight"]),
            "b1": _f32(sd["enc_in.bias"]),
            "W2_mu": _f32(sd["enc_out.weight"][:L]),
            "b2_mu": _f32(sd["enc_out.bias"][:L]),
            "Wd1": _f32(sd["dec_hidden.weight"]),
            "bd1": _f32(sd["dec_hidden.bias"]),
            "Wout": _f32(sd["dec_out.weight"]),
            "bout": _f32(sd["dec_out.bias"]),
            "Wattr": _f32(sd["dec_attr.weight"]) if model.dec_attr is not None else None,
            "battr": _f32(sd["dec_attr.bias"]) if model.dec_attr is not None else None,
        }
        return cls(arrays, model.config(), meta=meta, item_attributes=item_attributes)

    def set_item_attributes(self, item_attributes: sp.csr_matrix) -> None:
        import scipy.sparse as sp_

        m = sp_.csr_matrix(item_attributes, dtype=np.float32)
        if m.shape[0] != self.n_items:
            raise ValueError(f"item_attributes has {m.shape[0]} rows, expected {self.n_items}")
        if self.n_attributes and m.shape[1] != self.n_attributes:
            raise ValueError(
                f"item_attributes has {m.shape[1]} columns, expected {self.n_attributes}"
            )
        self.item_attributes = m

    @property
    def item_norms(self) -> np.ndarray:
        """L2 norms of the item embeddings (rows of ``Wout``), computed once."""
        if self._item_norms is None:
            self._item_norms = np.sqrt(np.einsum("ij,ij->i", self.Wout, self.Wout)).astype(
                np.float32
            )
        return self._item_norms

    # convenience wrappers around the module-level functions
    def encode_full(
        self, item_indices: Any, weights: Any = None
    ) -> tuple[EncoderState, np.ndarray]:
        return encode_full(self, item_indices, weights)

    def update_state(
        self, state: EncoderState, item_index: int, old_weight: float, new_weight: float
    ) -> EncoderState:
        return update_state(self, state, item_index, old_weight, new_weight)

    def latent_from_state(self, state: EncoderState) -> np.ndarray:
        return latent_from_state(self, state)

    def decoder_hidden(self, mu: np.ndarray) -> np.ndarray:
        """``tanh(Wd1 @ mu + bd1)`` for a latent ``(latent,)`` or a batch ``(n, latent)``."""
        mu = np.asarray(mu, dtype=np.float32)
        return np.tanh(mu @ self.Wd1.T + self.bd1)


# ---------------------------------------------------------------------------------------
# Encoder state and the incremental path
# ---------------------------------------------------------------------------------------

_STATE_MAGIC = b"RVS1"


@dataclass
class EncoderState:
    """Incremental encoder state of one user (plain numpy).

    ``a``: float64 ``(hidden,)`` un-normalised, bias-free pre-activation ``W1 @ x``;
    ``norm2``: ``||x||^2``; ``nnz``: number of items with a positive encoder input;
    ``version``: the :attr:`GeneratorRuntime.version` it was built with (None for states built
    from a :class:`MultVAE` during training / tests). ``x`` is the clipped history, see
    :func:`encoder_input`.
    """

    a: np.ndarray
    norm2: float = 0.0
    nnz: int = 0
    version: str | None = field(default=None)

    def copy(self) -> EncoderState:
        return EncoderState(self.a.copy(), self.norm2, self.nnz, self.version)

    def to_bytes(self) -> bytes:
        """Compact serialisation (e.g. for a Redis hash field)."""
        v = (self.version or "").encode()
        header = struct.pack("<4sIdqH", _STATE_MAGIC, self.a.shape[0], self.norm2, self.nnz, len(v))
        return header + v + np.ascontiguousarray(self.a, dtype="<f8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> EncoderState:
        magic, hidden, norm2, nnz, vlen = struct.unpack_from("<4sIdqH", data, 0)
        if magic != _STATE_MAGIC:
            raise ValueError("not an EncoderState blob")
        off = struct.calcsize("<4sIdqH")
        version = data[off : off + vlen].decode() or None
        off += vlen
        a = np.frombuffer(data, dtype="<f8", count=hidden, offset=off).astype(np.float64)
        return cls(a, float(norm2), int(nnz), version)


class _Enc(NamedTuple):
    W1T: np.ndarray  # (n_items, hidden)
    b1: np.ndarray
    W2_mu: np.ndarray
    b2_mu: np.ndarray
    n_items: int
    hidden: int
    input_cap: float | None
    version: str | None


def _enc_weights(model: MultVAE | GeneratorRuntime) -> _Enc:
    if isinstance(model, GeneratorRuntime):
        return _Enc(
            model.W1T,
            model._b1_64,
            model._W2_mu_64,
            model._b2_mu_64,
            model.n_items,
            model.hidden,
            model.input_cap,
            model.version,
        )
    if isinstance(model, MultVAE):
        L = model.latent
        w2 = model.enc_out.weight.detach()[:L].double().numpy()
        b2 = model.enc_out.bias.detach()[:L].double().numpy()
        return _Enc(
            model.enc_in.weight.detach().numpy(),  # zero-copy view
            model.enc_in.bias.detach().double().numpy(),
            w2,
            b2,
            model.n_items,
            model.hidden,
            model.input_cap,
            None,
        )
    raise TypeError(f"expected MultVAE or GeneratorRuntime, got {type(model).__name__}")


def _check_state(enc: _Enc, state: EncoderState) -> None:
    if state.a.shape != (enc.hidden,):
        raise ValueError(f"state has hidden size {state.a.shape}, model has {enc.hidden}")
    if state.version is not None and enc.version is not None and state.version != enc.version:
        raise ValueError(
            f"EncoderState was built for model {state.version}, not {enc.version}; re-encode"
        )


def encode_full(
    model: MultVAE | GeneratorRuntime, item_indices: Any, weights: Any = None
) -> tuple[EncoderState, np.ndarray]:
    """Encode a history from scratch: ``(state, mu)``.

    ``item_indices``: item ids (ints in ``[0, n_items)``); ``weights``: raw weights (default
    1.0 each). Repeated items have their weights summed before clipping (one history entry
    per item). Returns the state and ``mu`` (float64 ``(latent,)``).
    """
    enc = _enc_weights(model)
    idx = np.asarray(item_indices, dtype=np.int64).reshape(-1)
    w = np.ones(idx.shape[0]) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.shape != idx.shape:
        raise ValueError("item_indices and weights differ in length")
    if idx.size and (idx.min() < 0 or idx.max() >= enc.n_items):
        raise IndexError("item index out of range")
    if idx.size:
        uniq, inv = np.unique(idx, return_inverse=True)
        if uniq.size != idx.size:
            w = np.bincount(inv, weights=w, minlength=uniq.size)
            idx = uniq
    x = encoder_input(w, enc.input_cap)
    keep = x > 0
    idx, x = idx[keep], x[keep]
    if idx.size:
        a = x @ enc.W1T[idx].astype(np.float64)
    else:
        a = np.zeros(enc.hidden, dtype=np.float64)
    state = EncoderState(a, float(x @ x), int(idx.size), enc.version)
    return state, _latent(enc, state)


def update_state(
    model: MultVAE | GeneratorRuntime,
    state: EncoderState,
    item_index: int,
    old_weight: float,
    new_weight: float,
    inplace: bool = False,
) -> EncoderState:
    """Apply one changed history weight (raw values, clipped here) in O(hidden).

    ``old_weight`` is the item's weight before the event (0.0 if it was not in the history),
    ``new_weight`` after it. With ``x = clip(w, 0, input_cap)``:
    ``a += W1[:, i] * (x_new - x_old)``, ``norm2 += x_new^2 - x_old^2``. Returns a new state
    unless ``inplace``.
    """
    enc = _enc_weights(model)
    _check_state(enc, state)
    i = int(item_index)
    if not 0 <= i < enc.n_items:
        raise IndexError(f"item index {item_index} out of range")
    xo = encoder_input(old_weight, enc.input_cap)
    xn = encoder_input(new_weight, enc.input_cap)
    out = state if inplace else state.copy()
    if out.version is None:
        out.version = enc.version
    if xn == xo:
        return out
    nnz = out.nnz + (xn > 0) - (xo > 0)
    if nnz < 0:
        raise ValueError("update removes an item the state does not contain (old_weight wrong?)")
    out.nnz = int(nnz)
    if nnz == 0:
        # Exact reset: no floating-point residue left from cancelling updates.
        out.a[:] = 0.0
        out.norm2 = 0.0
        return out
    out.a += np.float64(xn - xo) * enc.W1T[i]  # float64 product (the row is float32)
    out.norm2 = max(out.norm2 + (xn * xn - xo * xo), 0.0)
    return out


def _latent(enc: _Enc, state: EncoderState) -> np.ndarray:
    if state.nnz > 0 and state.norm2 > 0.0:
        pre = state.a / max(math.sqrt(state.norm2), _NORM_EPS) + enc.b1
    else:
        pre = enc.b1
    h = np.tanh(pre)
    return enc.W2_mu @ h + enc.b2_mu


def latent_from_state(model: MultVAE | GeneratorRuntime, state: EncoderState) -> np.ndarray:
    """``mu = W2_mu @ tanh(a / sqrt(norm2) + b1) + b2_mu`` (float64 ``(latent,)``)."""
    enc = _enc_weights(model)
    _check_state(enc, state)
    return _latent(enc, state)
