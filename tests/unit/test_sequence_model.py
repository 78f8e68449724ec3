"""The sequence model (#11): ordered data, training on a cycle, save/load, encoding."""

import numpy as np
import pytest
import torch

from generators.sequence import (
    SASRec,
    SeqConfig,
    SequenceRuntime,
    encode,
    encode_batch,
    hr_ndcg,
    leave_one_out_topk,
    save_sequence,
    train_sasrec,
)
from recsvc.data import build_matrix, read_interactions, user_sequences

CYCLE = 10


def cycle_sequences(n_users=60, seed=0):
    """Users who each follow the cycle 0 -> 1 -> ... -> 9 -> 0 from a random start."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, CYCLE, n_users)
    lengths = rng.integers(5, 9, n_users)
    return [(s + np.arange(n)) % CYCLE for s, n in zip(starts, lengths, strict=True)]


def test_line_files_of_pairs_are_ordered_by_line(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("1 5\n1 3\n2 9\n1 4\n2 1\n")
    log = read_interactions(path)
    assert log.ordered
    _, users, items = build_matrix(log)
    seqs = user_sequences(log, users, items)
    assert [items.ids[i] for i in seqs[users.index("1")]] == ["5", "3", "4"]
    assert [items.ids[i] for i in seqs[users.index("2")]] == ["9", "1"]


def test_last_item_split_holds_out_a_sample_and_trains_on_the_rest(tmp_path):
    from recsvc.sequence import last_item_split

    path = tmp_path / "seq.txt"
    path.write_text("".join(f"{u} {(u + j) % 7}\n" for u in range(20) for j in range(4)))
    log = read_interactions(path)
    user_items, users, items = build_matrix(log)
    seqs = user_sequences(log, users, items)
    fit, valid, inputs = last_item_split(user_items, log, users, items, max_users=5, seed=1)
    held = [u for u, v in enumerate(valid) if len(v)]
    assert len(held) == 5
    for u in range(len(seqs)):
        if u in held:  # the last item is the target, kept out of every fit
            assert valid[u].tolist() == seqs[u][-1:].tolist()
            assert inputs[u].tolist() == seqs[u][:-1].tolist()
            assert fit[u, seqs[u][-1]] == 0
        else:  # trained on whole
            assert inputs[u].tolist() == seqs[u].tolist()
            assert fit[u].nnz == user_items[u].nnz
    assert [len(v) for v in last_item_split(user_items, log, users, items)[1]] == [1] * 20


def test_gowalla_lines_carry_no_order_and_csv_is_ordered_by_time(tmp_path):
    gowalla = tmp_path / "train.txt"
    gowalla.write_text("0 1 2 3\n1 2\n")
    assert not read_interactions(gowalla).ordered
    plain = tmp_path / "plain.csv"
    plain.write_text("user_id,item_id\nu,a\n")
    assert not read_interactions(plain).ordered
    timed = tmp_path / "timed.csv"
    timed.write_text(
        "user_id,item_id,event_type,timestamp\n"
        "u,c,view,300\nu,a,view,100\nu,x,dislike,150\nu,b,view,200\nu,d,view,200\n"
    )
    log = read_interactions(timed)
    assert log.ordered
    _, users, items = build_matrix(log)
    seq = user_sequences(log, users, items)[users.index("u")]
    # by time; equal times keep line order; the dislike is no step of the sequence
    assert [items.ids[i] for i in seq] == ["a", "b", "d", "c"]


def test_batch_encoding_equals_one_at_a_time():
    torch.manual_seed(0)
    model = SASRec(20, dim=16, n_layers=2, n_heads=2, max_len=6).eval()
    seqs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9, 10, 11, 12]), np.array([])]
    batch = encode_batch(model, seqs)
    for seq, row in zip(seqs, batch, strict=True):
        np.testing.assert_allclose(row, encode(model, seq), atol=1e-5)
    assert not batch[3].any()  # an empty sequence has no state
    # only the last max_len items count
    np.testing.assert_allclose(batch[2], encode(model, seqs[2][-6:]), atol=1e-6)


@pytest.mark.parametrize("full_softmax_max", [8192, 4])  # full, and 4 sampled negatives
def test_learns_a_cycle_and_stops_on_validation(full_softmax_max):
    seqs = cycle_sequences()
    inputs, targets = [s[:-1] for s in seqs], np.array([s[-1] for s in seqs])
    cfg = SeqConfig(dim=16, n_layers=1, max_len=10, dropout=0.0, lr=0.01, batch_size=16,
                    max_epochs=40, patience=3, precision="fp32",
                    full_softmax_max=full_softmax_max)  # fmt: skip
    model, info = train_sasrec(inputs, CYCLE + 2, cfg, targets)
    assert info["best_valid_ndcg@10"] > 0.9
    assert info["epochs"] < 40 and len(info["history"]) == info["epochs"]  # stopped early
    probe = [np.array([3, 4, 5]), np.array([8, 9]), np.array([9, 0, 1, 2])]
    top = leave_one_out_topk(model, probe, 1)
    assert top[:, 0].tolist() == [6, 0, 3]
    assert hr_ndcg(top, np.array([6, 0, 3]), 1)["hr@1"] == 1.0


def test_time_budget_stops_training():
    seqs = cycle_sequences()
    cfg = SeqConfig(dim=8, n_layers=1, max_len=10, max_epochs=1000, precision="fp32")
    _, info = train_sasrec(seqs, CYCLE, cfg, max_seconds=0.0)
    assert info["epochs"] == 1


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = SASRec(15, dim=8, n_layers=1, max_len=4).eval()
    tails = [np.array([1, 2, 3, 4, 5, 6]), np.array([], dtype=np.int64), np.array([7])]
    save_sequence(model, tmp_path / "seq", tails, meta={"note": "test"})
    runtime = SequenceRuntime.load(tmp_path / "seq")
    assert runtime.tail(0).tolist() == [3, 4, 5, 6]  # the last max_len items
    assert runtime.tail(1).size == 0 and runtime.tail(2).tolist() == [7]
    assert runtime.tail(-1).size == 0 and runtime.tail(3).size == 0  # unknown users
    np.testing.assert_array_equal(runtime.state(np.array([2, 9])), encode(model, np.array([2, 9])))
    np.testing.assert_allclose(
        runtime.scores(runtime.state(np.array([2]))),
        model.output_weight().detach().numpy() @ encode(model, np.array([2])),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    (tmp_path / "seq" / "weights.pt").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum"):
        SequenceRuntime.load(tmp_path / "seq")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_softmax_loss_matches_cross_entropy(dtype):
    """The training loss computed a chunk at a time (gradients formed in the forward
    pass) equals F.cross_entropy over the whole logits, loss and gradients."""
    from generators.sequence import _ChunkedSoftmaxCE

    gen = torch.Generator().manual_seed(0)
    n_items = 700  # several chunks: (1 << 21) // 700 = 2,995 rows each
    h = torch.randn(7000, 16, generator=gen, requires_grad=True)
    w = (0.3 * torch.randn(n_items, 16, generator=gen)).requires_grad_()
    target = torch.randint(0, n_items, (7000,), generator=gen)
    ref = torch.nn.functional.cross_entropy(h @ w.T, target)
    ref_h, ref_w = torch.autograd.grad(2.0 * ref, (h, w))  # a scaled loss scales the grads
    loss = _ChunkedSoftmaxCE.apply(h, w, target, dtype)
    got_h, got_w = torch.autograd.grad(2.0 * loss, (h, w))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(float(loss.detach()) - float(ref.detach())) <= tol * float(ref.detach())
    for got, want in ((got_h, ref_h), (got_w, ref_w)):
        assert float((got - want).norm() / want.norm()) <= tol
