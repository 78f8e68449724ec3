"""Saving and loading generators.

A generator directory holds:

- ``weights.pt``: ``torch.save`` of a flat ``{name: tensor}`` dict (tensors only). For a
  saved :class:`~generators.vae.MultVAE` it is the model's ``state_dict`` (``layout:
  "model"``, loadable for further training with :func:`load_model`); for a saved
  :class:`~generators.vae.GeneratorRuntime` it holds the serving arrays (``layout:
  "runtime"``; the ``logvar`` half of the encoder is not part of a runtime).
- ``item_attributes.pt`` (optional): the items x attributes CSR matrix as tensors
  (``indptr``, ``indices``, ``data``, ``shape``), for attribute topic steering.
- ``config.json``: format version, layout, model configuration, the caller's ``meta``, the
  runtime version (used by :class:`~generators.vae.EncoderState`) and the SHA-256 of each
  file. It is written last, so a reader never sees a config without its weights.

Loading uses ``torch.load(..., weights_only=True)``: no pickled code is ever executed, and
the checksums are verified before anything is deserialised.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .vae import GeneratorRuntime, MultVAE

__all__ = ["save_generator", "load_generator", "load_model", "FORMAT", "FORMAT_VERSION"]

FORMAT = "recsvc-generator/mult-vae"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "weights.pt"
ITEM_ATTRS = "item_attributes.pt"

_RUNTIME_KEYS = ("W1T", "b1", "W2_mu", "b2_mu", "Wd1", "bd1", "Wout", "bout", "Wattr", "battr")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _atomic_write(directory: Path, name: str, write: Any) -> str:
    """Write ``directory/name`` via a temp file + ``os.replace``; returns its SHA-256."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        digest = _sha256(tmp_path)
        os.replace(tmp_path, directory / name)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return digest


def save_generator(
    model_or_runtime: MultVAE | GeneratorRuntime,
    directory: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
    item_attributes: sp.spmatrix | None = None,
) -> Path:
    """Save a model or runtime to ``directory`` (created if needed); returns the path.

    ``meta`` must be JSON-serialisable (e.g. dataset, training history summary, item id
    mapping version). ``item_attributes`` defaults to the runtime's own, if any.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    json.dumps(meta)  # fail early on non-serialisable meta

    if isinstance(model_or_runtime, MultVAE):
        model = model_or_runtime
        layout = "model"
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        config = model.config()
        version = GeneratorRuntime.from_model(model).version
    elif isinstance(model_or_runtime, GeneratorRuntime):
        rt = model_or_runtime
        layout = "runtime"
        tensors = {}
        for key in _RUNTIME_KEYS:
            arr = getattr(rt, key)
            if arr is not None:
                tensors[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).copy())
        config = dict(rt.config)
        version = rt.version
        if item_attributes is None:
            item_attributes = rt.item_attributes
    else:
        raise TypeError(
            f"expected MultVAE or GeneratorRuntime, got {type(model_or_runtime).__name__}"
        )

    files = {WEIGHTS: _atomic_write(directory, WEIGHTS, lambda p: torch.save(tensors, p))}
    if item_attributes is not None:
        ia = sp.csr_matrix(item_attributes, dtype=np.float32)
        if ia.shape[0] != config["n_items"]:
            raise ValueError("item_attributes must have n_items rows")
        ia_tensors = {
            "indptr": torch.from_numpy(ia.indptr.astype(np.int64)),
            "indices": torch.from_numpy(ia.indices.astype(np.int64)),
            "data": torch.from_numpy(ia.data.astype(np.float32)),
            "shape": torch.tensor(ia.shape, dtype=torch.int64),
        }
        files[ITEM_ATTRS] = _atomic_write(
            directory, ITEM_ATTRS, lambda p: torch.save(ia_tensors, p)
        )
    elif (directory / ITEM_ATTRS).exists():
        (directory / ITEM_ATTRS).unlink()

    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "config": config,
        "version": version,
        "files": files,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "meta": meta,
    }
    text = json.dumps(doc, indent=2, sort_keys=True)
    _atomic_write(directory, CONFIG, lambda p: p.write_text(text))
    return directory


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict saved by ``torch.save``, read with ``weights_only=True``."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{path} is not a flat dict of tensors")
    return obj


def _read(
    directory: str | os.PathLike[str], verify: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor], sp.csr_matrix | None]:
    directory = Path(directory)
    doc = json.loads((directory / CONFIG).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{directory} is not a generator directory (format {doc.get('format')!r})")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"generator format version {doc['format_version']} is newer than supported"
        )
    files = doc.get("files", {})
    if verify:
        for name, digest in files.items():
            actual = _sha256(directory / name)
            if actual != digest:
                raise ValueError(f"checksum mismatch for {directory / name}")

    def load(name: str) -> dict[str, torch.Tensor]:
        return load_tensors(directory / name)

    tensors = load(WEIGHTS)
    ia = None
    if ITEM_ATTRS in files:
        t = load(ITEM_ATTRS)
        shape = tuple(int(v) for v in t["shape"].tolist())
        ia = sp.csr_matrix(
            (t["data"].numpy(), t["indices"].numpy(), t["indptr"].numpy()), shape=shape
        )
    return doc, tensors, ia


def load_generator(directory: str | os.PathLike[str], verify: bool = True) -> GeneratorRuntime:
    """Load a saved generator as a :class:`GeneratorRuntime` (serving arrays, no autograd).

    ``verify``: check the files' SHA-256 against config.json first.
    """
    doc, tensors, ia = _read(directory, verify)
    config = doc["config"]
    if doc["layout"] == "model":
        L = int(config["latent"])
        arrays: dict[str, np.ndarray | None] = {
            "W1T": tensors["enc_in.weight"].numpy(),
            "b1": tensors["enc_in.bias"].numpy(),
            "W2_mu": tensors["enc_out.weight"][:L].numpy(),
            "b2_mu": tensors["enc_out.bias"][:L].numpy(),
            "Wd1": tensors["dec_hidden.weight"].numpy(),
            "bd1": tensors["dec_hidden.bias"].numpy(),
            "Wout": tensors["dec_out.weight"].numpy(),
            "bout": tensors["dec_out.bias"].numpy(),
            "Wattr": tensors["dec_attr.weight"].numpy() if "dec_attr.weight" in tensors else None,
            "battr": tensors["dec_attr.bias"].numpy() if "dec_attr.bias" in tensors else None,
        }
    elif doc["layout"] == "runtime":
        arrays = {k: (tensors[k].numpy() if k in tensors else None) for k in _RUNTIME_KEYS}
    else:
        raise ValueError(f"unknown layout {doc['layout']!r}")
    return GeneratorRuntime(
        arrays, config, meta=doc.get("meta"), item_attributes=ia, version=doc.get("version")
    )


def load_model(directory: str | os.PathLike[str], verify: bool = True) -> MultVAE:
    """Load a generator saved from a :class:`MultVAE` back as a model (eval mode)."""
    doc, tensors, _ = _read(directory, verify)
    if doc["layout"] != "model":
        raise ValueError("this directory holds a runtime, not a full model")
    cfg = doc["config"]
    model = MultVAE(
        int(cfg["n_items"]),
        hidden=int(cfg["hidden"]),
        latent=int(cfg["latent"]),
        dropout=float(cfg["dropout"]),
        n_attributes=int(cfg.get("n_attributes", 0)),
        input_cap=cfg.get("input_cap"),
    )
    model.load_state_dict(tensors)
    model.eval()
    return model


def load_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json document of a generator directory (no weights loaded)."""
    return json.loads((Path(directory) / CONFIG).read_text())
