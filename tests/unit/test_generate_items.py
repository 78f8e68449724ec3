"""Generate without a catalogue (items only) and the Gumbel draws sampling rests on."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from test_generate_content import runtime

from generators.sampling import gumbel
from recsvc.generate import GeneratorModel


def test_gumbel_draws_are_standard_and_seeded():
    draws = gumbel(np.random.default_rng(3), 200_000)
    assert draws.dtype == np.float32 and np.isfinite(draws).all()
    assert abs(draws.mean() - np.euler_gamma) < 0.01  # the standard Gumbel's mean
    assert abs(draws.std() - np.pi / np.sqrt(6)) < 0.01  # and its standard deviation
    assert np.array_equal(draws, gumbel(np.random.default_rng(3), 200_000))


def test_items_only_generation_says_why_from_the_history():
    """Each generated item's why is the user's history items most similar to it
    (the similarity row before history items were filtered out of its neighbours)."""
    n = 12
    # items 0-5 and 6-11 are two blocks of mutually similar items
    block = np.kron(np.eye(2), np.ones((6, 6))) - np.eye(n)
    similarity = sp.csr_matrix(block * np.linspace(0.5, 1.0, n)[None, :])
    model = GeneratorModel(runtime(n, 1), None, None)
    assert not model.has_content
    history = np.array([0, 1, 2])
    result = model.generate(
        np.zeros(4, dtype=np.float32), history, 4, 1.0, 5, 0.0, 3, similarity
    )
    assert len(result.items) == 4
    for generated in result.items:
        item = generated.nearest[0][0]
        assert item not in history
        assert all(i not in history for i, _ in generated.nearest)
        if item < 6:  # in the history's block: similar history items explain it
            assert generated.why_items and set(generated.why_items) <= set(history.tolist())
            row = similarity[item].toarray().ravel()
            assert generated.why_items == sorted(history.tolist(), key=lambda h: -row[h])
        else:
            assert generated.why_items == []
    assert any(g.nearest[0][0] < 6 for g in result.items)  # 4 of 9 unseen: some in block a
