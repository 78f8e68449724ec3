"""Generate's promises on a synthetic catalogue (issue #15): content calibrated to
the user, coherent with its items, a topic that is a constraint, feedback and
context that steer, and the session prior fitted from the log's time order."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from generators.vae import GeneratorRuntime
from recsvc.data import IdMap
from recsvc.generate import GeneratorModel
from recsvc.generate.profile import Session, fit_session_prior, since_training

# 6 categories, 40 items each; every item also has a second category (a combination)
# and a tag; category "rare" has only 3 items, whose titles have the word "c4"
CATEGORIES = ["c0", "c1", "c2", "c3", "c4", "c5"]
PER = 40


def catalogue() -> tuple[IdMap, sp.csr_matrix, dict[str, np.ndarray]]:
    names = [f"category:{c}" for c in CATEGORIES] + ["category:rare", "tag:x", "tag:y", "word:c4"]
    vocab = IdMap(names)
    rows, cols = [], []
    of: dict[str, list[int]] = {c: [] for c in CATEGORIES + ["rare"]}
    item = 0
    for k, c in enumerate(CATEGORIES):
        for j in range(PER):
            second = CATEGORIES[(k + 1 + j % 2) % len(CATEGORIES)]
            for name in (f"category:{c}", f"category:{second}", f"tag:{'xy'[j % 2]}"):
                rows.append(item)
                cols.append(vocab.index(name))
            of[c].append(item)
            of[second].append(item)
            item += 1
    for _ in range(3):
        rows += [item, item, item]
        cols += [vocab.index("category:rare"), vocab.index("category:c0"), vocab.index("word:c4")]
        of["rare"].append(item)
        of["c0"].append(item)
        item += 1
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(item, len(names)))
    return vocab, matrix, {c: np.unique(v) for c, v in of.items()}


def runtime(n_items: int, n_attrs: int, seed: int = 0) -> GeneratorRuntime:
    rng = np.random.default_rng(seed)
    hidden, latent = 16, 4
    arrays = {
        "W1T": rng.normal(size=(n_items, hidden)) * 0.1,
        "b1": np.zeros(hidden),
        "W2_mu": rng.normal(size=(latent, hidden)) * 0.1,
        "b2_mu": np.zeros(latent),
        "Wd1": rng.normal(size=(hidden, latent)) * 0.1,
        "bd1": np.zeros(hidden),
        "Wout": rng.normal(size=(n_items, hidden)) * 0.1,
        "bout": np.zeros(n_items),
        "Wattr": rng.normal(size=(n_attrs, hidden)) * 0.1,
        "battr": np.zeros(n_attrs),
    }
    config = {"n_items": n_items, "hidden": hidden, "latent": latent, "n_attributes": n_attrs}
    return GeneratorRuntime(arrays, config)


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    vocab, matrix, of = catalogue()
    model = GeneratorModel(runtime(matrix.shape[0], len(vocab)), vocab, matrix, "test",
                           session_prior=8.0)  # fmt: skip
    return model, vocab, matrix, of


def user_history(of, shares: dict[str, int], seed: int = 0) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Items of the given categories (count per category), only those whose first
    category is that one, so the history's shares are exact."""
    rng = np.random.default_rng(seed)
    picked = []
    for c, count in shares.items():
        k = CATEGORIES.index(c)
        own = np.arange(k * PER, (k + 1) * PER)
        picked += rng.choice(own, count, replace=False).tolist()
    return np.unique(np.array(picked, dtype=np.int64))


def run(model, history, n=10, seed=1, topic="", session=None, exclude=None):  # type: ignore[no-untyped-def]
    weights = np.ones(len(history))
    _, mu = model.encode(history, weights)
    return model.generate(mu, history, n, 1.0, seed, 0.5, 3, None, topic, exclude,
                          (history, weights), session)  # fmt: skip


def carries(matrix: sp.csr_matrix, item: int, attr: int) -> bool:
    return bool(matrix[item, attr])


def share(result, of, category: str) -> float:  # type: ignore[no-untyped-def]
    firsts = [g.nearest[0][0] for g in result.items]
    return float(np.isin(firsts, of[category]).mean())


def test_content_is_carried_by_its_first_nearest_item_and_never_seen(setup):
    model, vocab, matrix, of = setup
    history = user_history(of, {"c0": 12, "c3": 4})
    for seed in range(5):
        result = run(model, history, seed=seed)
        assert len(result.items) == 10
        firsts = [g.nearest[0][0] for g in result.items]
        assert len(set(firsts)) == 10 and not set(firsts) & set(history.tolist())
        for g in result.items:
            first = g.nearest[0][0]
            assert g.content and all(carries(matrix, first, a) for a, _ in g.content)
            anchor = g.content[0][0]  # every nearest item carries the anchor
            assert all(carries(matrix, i, anchor) for i, _ in g.nearest)


def test_generated_content_follows_the_users_taste(setup):
    """Taste: the share of the user's main category is calibrated to the history's
    (0.7), not to the catalogue's (1/3 of items carry c2)."""
    model, _, _, of = setup
    history = user_history(of, {"c2": 14, "c4": 3, "c5": 3})  # 70% c2, no c0/c1/c3
    shares = [share(run(model, history, seed=s), of, "c2") for s in range(8)]
    assert abs(np.mean(shares) - 0.7) <= 0.1
    # and the other categories follow the history too, not the catalogue (1/3 each)
    for c in ("c0", "c1", "c3"):
        history_share = np.isin(history, of[c]).mean()
        generated = np.mean([share(run(model, history, seed=s), of, c) for s in range(8)])
        assert abs(generated - history_share) <= 0.15, c


def test_a_topic_is_a_constraint_and_a_shortfall_is_said(setup):
    model, vocab, matrix, of = setup
    history = user_history(of, {"c2": 10})
    result = run(model, history, topic="c4")  # the category, not the title word
    topic = vocab.index("category:c4")
    assert len(result.items) == 10 and not result.shortfall
    for g in result.items:
        assert topic in [a for a, _ in g.content]
        assert all(carries(matrix, i, topic) for i, _ in g.nearest)
    rare = run(model, history, topic="rare")
    assert len(rare.items) == 3 and "only 3 catalogue items" in rare.shortfall
    assert all(g.nearest[0][0] in of["rare"] for g in rare.items)
    # excluded items do not count as available
    fewer = run(model, history, topic="rare", exclude=of["rare"][:1])
    assert len(fewer.items) == 2 and "only 2" in fewer.shortfall


def test_purchases_pull_and_dislikes_push(setup):
    model, _, _, of = setup
    history = user_history(of, {"c2": 14, "c4": 6})
    before = run(model, history)
    # 6 purchases (weight 8) of c0 items since training: c0 takes a large share
    bought = np.setdiff1d(of["c0"], history)[:6]
    session = Session(bought, np.full(6, 8.0))
    after = run(model, np.union1d(history, bought), session=session)
    assert share(after, of, "c0") >= share(before, of, "c0") + 0.4
    # disliking the c2 items just generated pushes c2 out
    disliked = np.array([g.nearest[0][0] for g in before.items if g.nearest[0][0] in of["c2"]])
    assert len(disliked) >= 3
    session = Session(disliked, np.full(len(disliked), -4.0))
    pushed = run(model, np.union1d(history, disliked), session=session)
    assert share(pushed, of, "c2") < share(before, of, "c2") - 0.3


def test_context_attributes_and_items_steer_one_call(setup):
    model, vocab, _, of = setup
    history = user_history(of, {"c2": 14, "c4": 6})
    before = share(run(model, history), of, "c5")
    by_attribute = Session(attributes=model.context_attributes(["c5", "c5", "c5"]),
                           attribute_weight=4.0)  # fmt: skip
    assert share(run(model, history, session=by_attribute), of, "c5") >= before + 0.3
    items = np.setdiff1d(of["c5"], history)[:3]
    by_items = model.session(history, np.ones(len(history)), (history, np.ones(len(history))),
                             items, np.empty(0, dtype=np.int64), 4.0)  # fmt: skip
    steered = run(model, history, session=by_items, exclude=items)
    assert share(steered, of, "c5") >= before + 0.3
    assert not {g.nearest[0][0] for g in steered.items} & set(items.tolist())


def test_same_seed_same_output(setup):
    model, _, _, of = setup
    history = user_history(of, {"c1": 8, "c3": 8})
    first, again = run(model, history, seed=3), run(model, history, seed=3)
    assert first.items == again.items
    assert any(run(model, history, seed=s).items != first.items for s in range(4, 8))


def test_since_training_is_the_feedback_part():
    items = np.array([1, 3, 5, 7])
    weights = np.array([1.0, 9.0, -4.0, 2.0])
    got_items, got_weights = since_training(items, weights, (np.array([1, 3, 7]), np.ones(3)))
    assert got_items.tolist() == [3, 5, 7] and got_weights.tolist() == [8.0, -4.0, 1.0]


def sequences(local: bool, seed: int = 0):  # type: ignore[no-untyped-def]
    """Users whose events come in runs of one category (local) or shuffled."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(300):
        runs = [rng.integers(6) for _ in range(6)]
        seq = [c * PER + rng.integers(PER) for c in runs for _ in range(8)]
        if not local:
            seq = rng.permutation(seq).tolist()
        users += [u] * len(seq)
        items += seq
    return np.array(users), np.array(items)


def test_session_prior_is_small_when_recent_events_predict_the_next():
    vocab, matrix, _ = catalogue()
    cols = np.array([vocab.index(f"category:{c}") for c in CATEGORIES])
    facet = sp.csr_matrix(matrix[:, cols], dtype=np.float64)
    facet = sp.csr_matrix(facet.multiply(1.0 / np.maximum(facet.sum(axis=1), 1)))
    results = {}
    for local in (True, False):
        users, items = sequences(local)
        results[local] = fit_session_prior(
            users, items, np.ones(len(users)), np.arange(len(users)), facet
        )["kappa"]
    assert results[True] <= 16 < results[False]


def test_user_state_cache_is_exact_per_event_count_and_bounded():
    from recsvc.generate import UserState
    from recsvc.state.generation_cache import UserStateCache

    def state(size: int) -> UserState:
        return UserState(np.zeros(size, dtype=np.float32))

    cache = UserStateCache(max_bytes=3 * 400)
    first = state(100)  # 400 bytes
    cache.put(("v1", "u1", 3), first)
    assert cache.get(("v1", "u1", 3)) is first
    assert cache.get(("v1", "u1", 4)) is None  # a new event: stale
    assert cache.get(("v2", "u1", 3)) is None  # another model
    cache.put(("v1", "u1", 4), state(100))  # replaces the user's entry
    assert len(cache) == 1 and cache.get(("v1", "u1", 3)) is None
    for user in ("u2", "u3", "u4"):
        cache.put(("v1", user, 0), state(100))
    assert len(cache) == 3 and not cache.has_user("v1", "u1")  # least recent out
    cache.put(("v1", "big", 0), state(1000))  # larger than the whole cache: not kept
    assert not cache.has_user("v1", "big")


def test_low_temperature_stays_finite_and_concentrates(setup):
    model, _, _, of = setup
    history = user_history(of, {"c2": 14, "c4": 6})
    weights = np.ones(len(history))
    _, mu = model.encode(history, weights)
    cold = model.generate(mu, history, 10, 0.01, 1, 0.5, 3, None, "", None, (history, weights))
    assert len(cold.items) == 10
    assert share(cold, of, "c2") >= share(run(model, history), of, "c2")


def test_a_catalogue_without_categories_uses_its_tags():
    """The same code on another kind of catalogue: tags only (and title words)."""
    from recsvc.generate.profile import choose_facet

    rng = np.random.default_rng(3)
    tags = [f"tag:t{k}" for k in range(5)]
    words = [f"word:w{k}" for k in range(20)]
    vocab = IdMap(tags + words)
    rows, cols = [], []
    for item in range(150):
        for name in {tags[item % 5], tags[(item // 5) % 5], words[rng.integers(20)]}:
            rows.append(item)
            cols.append(vocab.index(name))
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(150, len(vocab)))
    facet, _ = choose_facet(vocab.ids, matrix)
    assert facet == "tag"
    model = GeneratorModel(runtime(150, len(vocab), seed=1), vocab, matrix, "tags", None)
    t0 = np.array([i for i in range(150) if i % 5 == 0 and (i // 5) % 5 == 0])  # t0 only
    history = t0[:5]
    result = run(model, history, n=6)
    t0_index = vocab.index("tag:t0")
    firsts = [g.nearest[0][0] for g in result.items]
    assert np.mean([matrix[i, t0_index] > 0 for i in firsts]) >= 0.5
    for g in result.items:  # content is carried by the item it names
        assert all(matrix[g.nearest[0][0], a] > 0 for a, _ in g.content)
    topical = run(model, history, n=6, topic="t3")
    assert all(matrix[g.nearest[0][0], vocab.index("tag:t3")] > 0 for g in topical.items)
