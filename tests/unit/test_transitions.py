"""Item transitions (#11): the matrix, the scorer, the choice on validation."""

import numpy as np
import scipy.sparse as sp

from recsvc.ranking import UserBatch
from recsvc.ranking.transitions import (
    RECENT,
    TransitionScorer,
    choose_transitions,
    fit_transitions,
    with_transitions,
)


def test_a_gap_of_g_steps_counts_one_over_g_and_rows_sum_to_one():
    matrix = fit_transitions([np.array([0, 1, 2]), np.array([0, 2])], 4, window=2).toarray()
    # from 0: 1 (gap 1), 2 (gap 2: 1/2, and gap 1 in the second sequence: 1) -> 1 : 1.5
    np.testing.assert_allclose(matrix[0], [0, 1 / 2.5, 1.5 / 2.5, 0], rtol=1e-6)
    np.testing.assert_allclose(matrix[1], [0, 0, 1, 0])
    assert not matrix[2].any() and not matrix[3].any()  # nothing ever followed them


def test_scores_weigh_the_newest_items_by_decay():
    matrix = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]],
                                    dtype=np.float32))  # fmt: skip
    scorer = TransitionScorer(matrix, decay=0.5, n_last=2)
    batch = UserBatch(sp.csr_matrix((2, 4), dtype=np.float32))
    batch.cache[RECENT] = [np.array([2, 0, 1]), np.array([3])]
    got = scorer.score(batch, np.array([[3, 1, 0], [0, 1, 2]]))
    # user 0: newest 1 (weight 1) -> 3; then 0 (weight 0.5) -> 1; 2 is past n_last
    np.testing.assert_allclose(got, [[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]])


def test_choice_on_validation_finds_the_window_that_predicts():
    # item a is always followed by a + 10 two steps later, a random item in between: the
    # validation item comes after "..., a, noise" and only a two-step window sees it
    rng = np.random.default_rng(0)
    seqs, valid = [], []
    for _ in range(200):
        a = rng.choice(10, 3, replace=False)
        noise = rng.integers(20, 60, 3)
        pattern = [a[0], noise[0], a[0] + 10, a[1], noise[1], a[1] + 10, a[2], noise[2]]
        seqs.append(np.array(pattern))
        valid.append(np.array([a[2] + 10]))
    choice, matrix = choose_transitions(seqs, valid, 60, n_users=100)
    assert choice["validation_users"] == 100 and len(choice["tried"]) >= 1
    assert choice["ndcg@10"] == max(t["ndcg@10"] for t in choice["tried"])
    assert choice["window"] >= 2 and choice["n_last"] >= 2 and choice["ndcg@10"] > 0.9
    assert matrix.shape == (60, 60)


def test_the_sequence_strategy_mixes_two_next_item_distributions():
    logits = np.array([[2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    transitions = sp.csr_matrix(np.array([[0, 3, 1, 0], [0, 0, 0, 0]], dtype=np.float32))
    np.testing.assert_array_equal(with_transitions(logits, transitions, 0.0), logits)
    mixed = with_transitions(logits, transitions, 0.25)
    softmax = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(mixed[0], 0.75 * softmax + 0.25 * np.array([0, 0.75, 0.25, 0]))
    # no successor known: the model's distribution alone, scaled (the ranking is the model's)
    np.testing.assert_allclose(mixed[1], [0.1875] * 4)
    np.testing.assert_allclose(mixed[0].sum(), 1.0)
