"""Unit tests of the generators package (Mult-VAE generator) on tiny synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from generators.io import load_generator, load_model, save_generator
from generators.sampling import (
    attribute_scores,
    generate_attributes,
    sample_items,
    scores,
    top_items,
    topic_bias,
)
from generators.train import evaluate, train_vae
from generators.vae import (
    EncoderState,
    GeneratorRuntime,
    MultVAE,
    SparseRows,
    encode_full,
    kl_beta,
    latent_from_state,
    update_state,
)

N_USERS, N_ITEMS, N_ATTRS = 60, 30, 6
CLUSTER_A = np.arange(0, 15)
CLUSTER_B = np.arange(15, 30)
SMALL = dict(hidden=32, latent=8, dropout=0.2)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _clustered(seed: int = 0):
    """60 users x 30 items: users 0-29 take 6 items of cluster A (0-14), users 30-59 of B.
    Held-out: one more item of the user's cluster. Attributes: A items carry attributes 0-2,
    B items 3-5 (two each)."""
    rng = np.random.default_rng(seed)
    rows, cols, valid = [], [], []
    for u in range(N_USERS):
        cluster = CLUSTER_A if u < N_USERS // 2 else CLUSTER_B
        items = rng.choice(cluster, size=7, replace=False)
        rows += [u] * 6
        cols += items[:6].tolist()
        valid.append(items[6:])
    X = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))
    arows, acols = [], []
    for i in range(N_ITEMS):
        base = 0 if i < 15 else 3
        arows += [i, i]
        acols += [base + i % 3, base + (i + 1) % 3]
    A = sp.csr_matrix((np.ones(len(arows), np.float32), (arows, acols)), shape=(N_ITEMS, N_ATTRS))
    return X, valid, A


@pytest.fixture(scope="module")
def data():
    return _clustered()


@pytest.fixture(scope="module")
def trained(data):
    X, valid, A = data
    torch.set_num_threads(1)
    model, hist = train_vae(
        X,
        valid,
        n_epochs=60,
        batch_size=20,
        lr=1e-2,
        seed=0,
        early_stopping_patience=None,
        progress=False,
        attributes_csr=A,
        total_anneal_steps=100,
        **SMALL,
    )
    return model, hist


# ---------------------------------------------------------------------------- model


def test_shapes_dense_and_sparse_agree():
    torch.manual_seed(0)
    model = MultVAE(N_ITEMS, n_attributes=N_ATTRS, **SMALL).eval()
    X, _, _ = _clustered()
    dense = torch.from_numpy(X[:5].toarray())
    out_d = model(dense)
    out_s = model(SparseRows.from_csr(X[:5]))
    assert out_d.logits.shape == (5, N_ITEMS)
    assert out_d.attr_logits.shape == (5, N_ATTRS)
    assert out_d.mu.shape == out_d.logvar.shape == (5, SMALL["latent"])
    torch.testing.assert_close(out_d.mu, out_s.mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_d.logits, out_s.logits, rtol=1e-5, atol=1e-5)
    no_attr = MultVAE(N_ITEMS, **SMALL)
    assert no_attr.dec_attr is None
    assert no_attr(dense).attr_logits is None


def test_fused_training_loss_matches_reference_loss_and_grads(data):
    X, _, A = data
    torch.manual_seed(1)
    model = MultVAE(N_ITEMS, n_attributes=N_ATTRS, **SMALL).double().eval()
    x = SparseRows.from_csr(X[:10])
    x = x._replace(values=x.values.double())
    at = SparseRows.from_csr((X[:10] @ A).tocsr())
    at = at._replace(values=at.values.double())
    fused = model.training_loss(x, 0.3, at, 0.5)
    model.zero_grad()
    fused["loss"].backward()
    g_fused = {k: p.grad.clone() for k, p in model.named_parameters()}
    ref = model.loss(x, model(x), 0.3, at, 0.5)
    model.zero_grad()
    ref["loss"].backward()
    for key in ("loss", "nll", "kl", "attr_nll"):
        assert float(fused[key].detach()) == pytest.approx(float(ref[key].detach()), rel=1e-10)
    for k, p in model.named_parameters():
        torch.testing.assert_close(g_fused[k], p.grad, rtol=1e-8, atol=1e-10)
    # dense targets give the same value
    dense = torch.from_numpy(X[:10].toarray()).double()
    dense_attr = torch.from_numpy((X[:10] @ A).toarray()).double()
    ref_dense = model.loss(dense, model(dense), 0.3, dense_attr, 0.5)
    assert float(ref_dense["loss"].detach()) == pytest.approx(
        float(ref["loss"].detach()), rel=1e-10
    )


def test_kl_beta_anneals_linearly():
    assert kl_beta(0, 0.2, 100) == 0.0
    assert kl_beta(50, 0.2, 100) == pytest.approx(0.1)
    assert kl_beta(500, 0.2, 100) == pytest.approx(0.2)
    assert kl_beta(3, 0.2, 0) == 0.2


# ---------------------------------------------------------------------------- training


def test_training_loss_decreases_and_learns_clusters(trained, data):
    model, hist = trained
    X, valid, _ = data
    assert hist["loss"][-1] < 0.8 * hist["loss"][0]
    assert hist["nll"][-1] < hist["nll"][0]
    assert hist["attr_nll"][-1] < hist["attr_nll"][0]
    assert len(hist["val_ndcg"]) == len(hist["epoch"]) == 60
    assert hist["best_epoch"] == 1 + int(np.argmax(hist["val_ndcg"]))
    # the returned model holds the best weights
    users = np.arange(N_USERS)
    m20 = evaluate(model, X, users, [valid[u] for u in users], k=20)
    assert m20["ndcg@20"] == pytest.approx(hist["best_val_ndcg"], abs=1e-9)
    rt = GeneratorRuntime.from_model(model)
    for u in (0, 45):
        _, mu = encode_full(rt, X[u].indices)
        top, _ = top_items(rt, mu, 5, exclude=X[u].indices)
        cluster = CLUSTER_A if u < 30 else CLUSTER_B
        assert np.isin(top, cluster).all()


def test_training_is_reproducible_and_respects_budget(data):
    X, valid, _ = data
    kw = dict(
        n_epochs=3, batch_size=16, lr=1e-2, early_stopping_patience=None, progress=False, **SMALL
    )
    m1, h1 = train_vae(X, None, seed=7, **kw)
    m2, h2 = train_vae(X, None, seed=7, **kw)
    m3, _ = train_vae(X, None, seed=8, **kw)
    assert h1["loss"] == h2["loss"]
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not torch.equal(m1.dec_out.weight, m3.dec_out.weight)
    assert h1["best_epoch"] == 3 and h1["val_ndcg"] == []
    _, h4 = train_vae(X, valid, seed=7, max_seconds=0.0, **kw)
    assert h4["stopped"] == "max_seconds" and len(h4["epoch"]) == 1


def test_early_stopping(data):
    X, valid, _ = data
    _, hist = train_vae(
        X,
        valid,
        n_epochs=50,
        batch_size=20,
        lr=0.0,
        seed=0,
        early_stopping_patience=2,
        progress=False,
        **SMALL,
    )
    # lr=0: validation never improves after epoch 1
    assert hist["stopped"] == "early_stopping"
    assert len(hist["epoch"]) == 3 and hist["best_epoch"] == 1


# ---------------------------------------------------------------------------- incremental


def _runtime(seed=0, n_items=N_ITEMS, n_attributes=0, input_cap=None):
    torch.manual_seed(seed)
    model = MultVAE(n_items, n_attributes=n_attributes, input_cap=input_cap, **SMALL)
    with torch.no_grad():  # non-trivial biases
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), GeneratorRuntime.from_model(model)


def test_encode_full_matches_torch_encoder():
    model, rt = _runtime()
    items = np.array([3, 7, 11, 20])
    weights = np.array([1.0, 2.5, -1.0, 0.5])
    x = torch.zeros(1, N_ITEMS, dtype=torch.float64)
    x[0, items] = torch.tensor(np.clip(weights, 0, None))
    with torch.no_grad():
        mu_torch = model.double().encode(x)[0][0].numpy()
    model.float()
    for m in (model, rt):
        state, mu = encode_full(m, items, weights)
        np.testing.assert_allclose(mu, mu_torch, rtol=1e-5, atol=1e-5)
        assert state.nnz == 3
        assert state.norm2 == pytest.approx(1 + 2.5**2 + 0.5**2)
    # empty history == all-zero input row
    with torch.no_grad():
        mu0 = model.encode(torch.zeros(1, N_ITEMS))[0][0].numpy()
    state0, mu_empty = encode_full(rt, [], [])
    np.testing.assert_allclose(mu_empty, mu0, rtol=1e-5, atol=1e-6)
    assert state0.nnz == 0 and state0.norm2 == 0.0


def test_incremental_update_equals_full_reencode():
    _, rt = _runtime(seed=3)
    rng = np.random.default_rng(0)
    history: dict[int, float] = {2: 1.0, 5: 3.0, 9: 1.0}
    state, _ = encode_full(rt, list(history), list(history.values()))
    # random events, including weights going to zero, negative, and back up
    events = [(5, -3.0), (9, -1.0), (2, -2.5), (17, 1.0), (2, +4.0), (9, +0.25)]
    events += [
        (int(rng.integers(N_ITEMS)), float(rng.choice([-2.0, -1.0, 0.5, 1.0, 3.0])))
        for _ in range(300)
    ]
    for i, delta in events:
        old = history.get(i, 0.0)
        new = old + delta
        state = update_state(rt, state, i, old, new)
        history[i] = new
        ref_state, ref_mu = encode_full(rt, list(history), list(history.values()))
        np.testing.assert_allclose(latent_from_state(rt, state), ref_mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.a, ref_state.a, rtol=1e-9, atol=1e-9)
        assert state.norm2 == pytest.approx(ref_state.norm2, rel=1e-9, abs=1e-9)
        assert state.nnz == ref_state.nnz
    assert any(w < 0 for w in history.values()) and any(w == 0 for w in history.values())


def test_update_to_empty_history_resets_exactly_and_inplace():
    _, rt = _runtime(seed=4)
    state, _ = encode_full(rt, [1, 4], [0.3, 0.7])
    s1 = update_state(rt, state, 1, 0.3, -1.0)
    assert s1 is not state and state.nnz == 2  # not in place by default
    s2 = update_state(rt, s1, 4, 0.7, 0.0, inplace=True)
    assert s2 is s1
    assert s2.nnz == 0 and s2.norm2 == 0.0 and not s2.a.any()
    np.testing.assert_allclose(latent_from_state(rt, s2), encode_full(rt, [], [])[1])
    # a non-positive weight changing to another non-positive weight changes nothing
    s3 = update_state(rt, s2, 7, -1.0, -5.0)
    assert s3.nnz == 0 and not s3.a.any()
    with pytest.raises(ValueError):
        update_state(rt, s3, 7, 1.0, 0.0)  # removes an item the state does not hold


def test_input_cap_and_state_bytes_and_version_check():
    _, rt = _runtime(seed=5, input_cap=2.0)
    state, mu = encode_full(rt, [1, 2], [1.0, 10.0])
    ref, mu_ref = encode_full(rt, [1, 2], [1.0, 2.0])
    np.testing.assert_allclose(mu, mu_ref)
    s = update_state(rt, state, 2, 10.0, 3.0)  # both above the cap: no change
    np.testing.assert_array_equal(s.a, state.a)
    blob = state.to_bytes()
    back = EncoderState.from_bytes(blob)
    np.testing.assert_array_equal(back.a, state.a)
    assert (back.norm2, back.nnz, back.version) == (state.norm2, state.nnz, rt.version)
    _, other = _runtime(seed=6)
    with pytest.raises(ValueError, match="re-encode"):
        latent_from_state(other, state)


# ---------------------------------------------------------------------------- io


def test_save_load_roundtrip(tmp_path, trained, data):
    model, _ = trained
    X, _, A = data
    rt = GeneratorRuntime.from_model(model, item_attributes=A)
    d = save_generator(model, tmp_path / "gen", {"dataset": "toy"}, item_attributes=A)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["layout"] == "model" and cfg["meta"] == {"dataset": "toy"}
    raw = torch.load(d / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in raw.values())
    loaded = load_generator(d)
    assert loaded.version == rt.version
    state, mu = encode_full(rt, X[3].indices)
    state2, mu2 = encode_full(loaded, X[3].indices)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(scores(rt, mu), scores(loaded, mu2))
    np.testing.assert_array_equal(attribute_scores(rt, mu), attribute_scores(loaded, mu))
    assert (loaded.item_attributes != rt.item_attributes).nnz == 0
    # a state built before the restart stays valid with the reloaded weights
    np.testing.assert_array_equal(latent_from_state(loaded, state), mu)
    # runtime layout round trip and full-model reload
    d2 = save_generator(loaded, tmp_path / "rt", {"x": 1})
    again = load_generator(d2)
    np.testing.assert_array_equal(scores(again, mu), scores(rt, mu))
    np.testing.assert_array_equal(
        sample_items(again, mu, 5, seed=3, attribute_bias={0: 2.0}),
        sample_items(rt, mu, 5, seed=3, attribute_bias={0: 2.0}),
    )
    m2 = load_model(d)
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError):
        load_model(d2)
    # tampering is detected before deserialisation
    with open(d / "weights.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="checksum"):
        load_generator(d)


# ---------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def served(trained, data):
    model, _ = trained
    X, _, A = data
    rt = GeneratorRuntime.from_model(model, item_attributes=A)
    _, mu_a = encode_full(rt, X[0].indices)
    return rt, mu_a, X


def test_seeded_sampling_is_reproducible(served):
    rt, mu, _ = served
    a = sample_items(rt, mu, 8, temperature=2.0, seed=123)
    b = sample_items(rt, mu, 8, temperature=2.0, seed=123)
    c = sample_items(rt, mu, 8, temperature=2.0, seed=124)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(set(a.tolist())) == 8
    d1 = sample_items(rt, mu, 8, temperature=2.0, seed=5, diversity=3.0)
    d2 = sample_items(rt, mu, 8, temperature=2.0, seed=5, diversity=3.0)
    np.testing.assert_array_equal(d1, d2)
    assert len(set(d1.tolist())) == 8
    ga = generate_attributes(rt, mu, 3, temperature=1.0, seed=9)
    np.testing.assert_array_equal(ga, generate_attributes(rt, mu, 3, temperature=1.0, seed=9))
    assert len(set(ga.tolist())) == 3


def test_sampling_exclude_temperature_zero_and_exhaustion(served):
    rt, mu, X = served
    seen = X[0].indices
    greedy = sample_items(rt, mu, 5, temperature=0.0, exclude=seen)
    top, _ = top_items(rt, mu, 5, exclude=seen)
    np.testing.assert_array_equal(greedy, top)
    for seed in range(5):
        s = sample_items(rt, mu, 10, temperature=1.0, seed=seed, exclude=seen)
        assert not np.isin(s, seen).any()
    every = sample_items(rt, mu, 100, seed=0, exclude=seen)
    assert sorted(every.tolist()) == sorted(set(range(N_ITEMS)) - set(seen.tolist()))
    mask = np.zeros(N_ITEMS, dtype=bool)
    mask[CLUSTER_A] = True
    assert np.isin(sample_items(rt, mu, 5, seed=1, exclude=mask), CLUSTER_B).all()
    ids, logits = sample_items(rt, mu, 3, seed=1, return_scores=True)
    np.testing.assert_allclose(logits, scores(rt, mu)[ids], rtol=1e-6)


def test_sampling_follows_softmax_distribution(served):
    rt, mu, _ = served
    p = np.exp(scores(rt, mu).astype(np.float64) / 3.0)
    p /= p.sum()
    counts = np.bincount(
        [sample_items(rt, mu, 1, temperature=3.0, seed=s)[0] for s in range(3000)],
        minlength=N_ITEMS,
    )
    np.testing.assert_allclose(counts / 3000, p, atol=0.03)


def test_diversity_spreads_items(served):
    rt, mu, _ = served
    emb = rt.Wout / rt.item_norms[:, None]

    def mean_max_sim(items):
        e = emb[items]
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.max(axis=1).mean()

    plain = sample_items(rt, mu, 6, temperature=0.0)
    diverse = sample_items(rt, mu, 6, temperature=0.0, diversity=50.0)
    assert mean_max_sim(diverse) < mean_max_sim(plain)


def test_topic_steering(served):
    rt, mu, _ = served  # a cluster-A user
    assert np.isin(sample_items(rt, mu, 5, temperature=0.0), CLUSTER_A).all()
    bias = topic_bias(N_ITEMS, CLUSTER_B, 50.0)
    assert np.isin(
        sample_items(rt, mu, 5, temperature=1.0, seed=0, item_bias=bias), CLUSTER_B
    ).all()
    # steering by attribute: attributes 3-5 belong to cluster B items
    steered = sample_items(
        rt, mu, 5, temperature=1.0, seed=0, attribute_bias={3: 40.0, 4: 40.0, 5: 40.0}
    )
    assert np.isin(steered, CLUSTER_B).all()
    with pytest.raises(ValueError):
        scores(rt, mu, item_bias=np.zeros(3))


def test_attribute_head_generates_user_content(served, data):
    rt, mu_a, X = served
    _, mu_b = encode_full(rt, X[45].indices)
    for mu, own in ((mu_a, [0, 1, 2]), (mu_b, [3, 4, 5])):
        assert np.isin(generate_attributes(rt, mu, 3, temperature=0.0), own).all()
    steered = generate_attributes(rt, mu_a, 2, temperature=0.0, topic_bias={4: 100.0, 5: 100.0})
    assert sorted(steered.tolist()) == [4, 5]
    _, plain = _runtime()
    with pytest.raises(ValueError, match="attribute head"):
        generate_attributes(plain, encode_full(plain, [1])[1], 2)
    with pytest.raises(ValueError, match="item_attributes"):
        sample_items(plain, encode_full(plain, [1])[1], 2, attribute_bias=np.ones(N_ATTRS))


def test_bf16_matmul_option_approximates_fp32(data):
    X, _, _ = data
    torch.manual_seed(2)
    model = MultVAE(N_ITEMS, **SMALL).eval()
    x = SparseRows.from_csr(X[:10])
    ref = model.training_loss(x, 0.1)["nll"].detach()
    low = model.training_loss(x, 0.1, mm_dtype=torch.bfloat16)["nll"].detach()
    assert float(low) == pytest.approx(float(ref), rel=2e-2)
    _, hist = train_vae(
        X, None, n_epochs=2, batch_size=20, seed=0, progress=False, precision="bf16", **SMALL
    )
    assert np.isfinite(hist["loss"]).all()
