"""Versioned model bundles on disk: a JSON manifest plus numpy/scipy arrays.

Layout of a bundle directory (format version 1)::

    manifest.json     format, model_version, created, counts, params, files (sha256)
    users.txt         external user ids, one per line, in matrix row order
    items.txt         external item ids, one per line, in matrix column order
    user_items.npz    training interactions, users x items CSR float32 (scipy)
    similarity.npz    item-item top-K cosine, items x items CSR float32 (scipy)
    popularity.npy    float32 per item: training users who interacted with it
    attributes.txt    (with a catalogue) content attributes, one per line
    item_attributes.npz (with a catalogue) items x attributes CSR float32
    generator/        (optional) the generative model, see generators/io.py
    sequence/         (optional, #11) the sequence model, each user's training tail and the
                      item transitions (transitions.npz),
                      see generators/sequence.py

Nothing in a bundle is unpickled on load (``allow_pickle=False`` throughout),
and every file's checksum is verified against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.data import IdMap

FORMAT = "recsvc-model"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """The directory is not a valid, intact model bundle."""


@dataclass
class CFBundle:
    """Everything the CF model needs at serving time."""

    users: IdMap
    items: IdMap
    user_items: sp.csr_matrix
    similarity: sp.csr_matrix
    popularity: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""
    created: str = ""
    attributes: IdMap | None = None
    item_attributes: sp.csr_matrix | None = None
    # to save: a trained generators.vae.MultVAE; after loading: its directory
    generator: Any = None
    generator_dir: Path | None = None
    # the low-rank term's item factors (items x rank, float32), if the mixture uses it
    item_factors: np.ndarray | None = None
    # to save: (generators.sequence.SASRec, per-user ordered item lists, the item transition
    # matrix or None); after loading: its dir
    sequence: Any = None
    sequence_dir: Path | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {
            "users": len(self.users),
            "items": len(self.items),
            "interactions": int(self.user_items.nnz),
            "similarity_nnz": int(self.similarity.nnz),
        }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_bundle(bundle: CFBundle, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``bundle`` to ``out_dir`` atomically; sets its version and creation time.

    The files are written to a temporary sibling directory that is renamed into
    place, so a reader never sees a half-written bundle.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        bundle.users.save(tmp / "users.txt")
        bundle.items.save(tmp / "items.txt")
        sp.save_npz(tmp / "user_items.npz", bundle.user_items.astype(np.float32))
        sp.save_npz(tmp / "similarity.npz", bundle.similarity.astype(np.float32))
        np.save(tmp / "popularity.npy", bundle.popularity.astype(np.float32))
        if bundle.attributes is not None and bundle.item_attributes is not None:
            bundle.attributes.save(tmp / "attributes.txt")
            sp.save_npz(tmp / "item_attributes.npz", bundle.item_attributes.astype(np.float32))
        if bundle.item_factors is not None:
            np.save(tmp / "item_factors.npy", bundle.item_factors.astype(np.float32))
        if bundle.generator is not None:
            from generators.io import save_generator

            save_generator(bundle.generator, tmp / "generator")
        if bundle.sequence is not None:
            from generators.sequence import save_sequence

            model, tails, *rest = bundle.sequence
            transitions = rest[0] if rest else None
            chosen = (bundle.params.get("sequence") or {}).get("transitions") or {}
            meta = {"transitions": {k: chosen[k] for k in ("window", "decay", "n_last", "share")
                                    if k in chosen}}  # fmt: skip
            save_sequence(model, tmp / "sequence", tails, meta=meta, transitions=transitions)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        created = datetime.now(UTC)
        content_hash = hashlib.sha256("".join(files.values()).encode()).hexdigest()[:8]
        bundle.created = created.isoformat(timespec="seconds")
        bundle.model_version = f"{created:%Y%m%dT%H%M%SZ}-{content_hash}"
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_version": bundle.model_version,
            "created": bundle.created,
            "counts": bundle.counts,
            "params": bundle.params,
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(model_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{model_dir} is not a model bundle: no manifest.json") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {manifest.get('format_version')} is not supported "
            f"(this recsvc reads {FORMAT_VERSION})"
        )
    return manifest


def load_bundle(model_dir: str | os.PathLike[str], verify: bool = True) -> CFBundle:
    """Load a bundle written by :func:`save_bundle`; :class:`BundleError` if broken."""
    root = Path(model_dir)
    manifest = read_manifest(root)
    if verify:
        for name, expected in manifest["files"].items():
            path = root / name
            if not path.is_file():
                raise BundleError(f"{root}: missing {name}")
            if _sha256(path) != expected:
                raise BundleError(f"{root}: {name} does not match its checksum")
    users = IdMap.load(root / "users.txt")
    items = IdMap.load(root / "items.txt")
    user_items = sp.load_npz(root / "user_items.npz").tocsr()
    similarity = sp.load_npz(root / "similarity.npz").tocsr()
    popularity = np.load(root / "popularity.npy", allow_pickle=False)
    if user_items.shape != (len(users), len(items)) or similarity.shape != (len(items),) * 2:
        raise BundleError(f"{root}: array shapes do not match the id maps")
    item_factors = None
    if (root / "item_factors.npy").is_file():
        item_factors = np.load(root / "item_factors.npy", allow_pickle=False)
        if item_factors.ndim != 2 or item_factors.shape[0] != len(items):
            raise BundleError(f"{root}: item_factors.npy does not match the items")
    attributes = item_attributes = None
    if (root / "attributes.txt").is_file():
        attributes = IdMap.load(root / "attributes.txt")
        item_attributes = sp.load_npz(root / "item_attributes.npz").tocsr()
    return CFBundle(
        users=users,
        items=items,
        user_items=user_items,
        similarity=similarity,
        popularity=popularity,
        params=manifest.get("params", {}),
        model_version=manifest["model_version"],
        created=manifest["created"],
        attributes=attributes,
        item_attributes=item_attributes,
        generator_dir=root / "generator" if (root / "generator").is_dir() else None,
        item_factors=item_factors,
        sequence_dir=root / "sequence" if (root / "sequence").is_dir() else None,
    )
