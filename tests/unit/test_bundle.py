import json

import numpy as np
import pytest

from recsvc.bundle import BundleError, _sha256, load_bundle, read_manifest


def test_round_trip(model_dir):
    bundle = load_bundle(model_dir)
    manifest = read_manifest(model_dir)
    assert manifest["model_version"] == bundle.model_version
    assert manifest["counts"]["items"] == len(bundle.items) == 16
    assert manifest["counts"]["users"] == len(bundle.users) == 40
    assert bundle.similarity.shape == (16, 16)
    assert bundle.params["neighbours"] == 20


def test_tampered_file_is_refused(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    np.save(copy / "popularity.npy", np.zeros(16, dtype=np.float32))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(copy)


def test_pickled_arrays_are_never_loaded(model_dir, tmp_path):
    """Even with a matching checksum, an object (pickled) array is refused."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    np.save(copy / "popularity.npy", np.array([object()] * 16, dtype=object), allow_pickle=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["popularity.npy"] = _sha256(copy / "popularity.npy")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="pickle"):
        load_bundle(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest"):
        load_bundle(tmp_path)
