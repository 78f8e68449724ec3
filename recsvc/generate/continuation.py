"""Generate as a continuation of the user's sequence (#11): the next ``n`` items sampled
one after the other from the sequence model, each appended to the sequence as if it had
happened before the next is drawn (autoregressive).

Per step: the logits of the state after the sequence so far, divided by the temperature;
items seen, excluded or already generated are never drawn; ``topic`` adds
``TOPIC_STRENGTH`` standard deviations of the logits to the items that have the topic's
attributes; ``diversity`` (0..1) subtracts, per candidate, ``diversity`` times its largest
cosine similarity (item embeddings) to the items generated so far, in the same units. One
item is drawn by the Gumbel-max trick from a generator seeded with ``seed``: the same seed and
sequence give the same continuation. Why: the recent items (of the sequence at that step)
whose embeddings are closest to the drawn item's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from generators.sampling import gumbel

TOPIC_STRENGTH = 2.0  # logits' standard deviations added to the topic's items
WHY_WINDOW = 10  # the recent items a step's "why" is chosen among
WHY_ITEMS = 3


@dataclass
class Step:
    item: int
    probability: float  # of the drawn item, under the step's (tempered, steered) softmax
    why: list[int]  # recent item indices that led to it, closest first


def topic_items(attributes: list[str], item_attributes: object, topic: str) -> np.ndarray:
    """Item indices having an attribute the topic names (``category:x``, or a bare value
    ``x`` of any attribute kind); empty if none."""
    import scipy.sparse as sp

    topic = topic.strip().lower()
    named = [
        a for a, name in enumerate(attributes)
        if name == topic or name.split(":", 1)[-1] == topic
    ]  # fmt: skip
    if not named:
        return np.empty(0, dtype=np.int64)
    matrix = sp.csr_matrix(item_attributes)
    return np.flatnonzero(np.asarray(matrix[:, named].sum(axis=1)).ravel() > 0)


def continue_sequence(
    runtime: object,
    sequence: np.ndarray,
    n: int,
    temperature: float,
    seed: int,
    diversity: float,
    banned: np.ndarray,
    boosted: np.ndarray | None = None,
) -> list[Step]:
    """``n`` steps continuing ``sequence`` (item indices, oldest first) with ``runtime`` (a
    :class:`generators.sequence.SequenceRuntime`); ``banned`` items are never drawn,
    ``boosted`` items (a topic's) get :data:`TOPIC_STRENGTH`."""
    rng = np.random.default_rng(seed)
    weight = runtime.out_weight  # type: ignore[attr-defined]
    unit = weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
    allowed = np.ones(len(weight), dtype=bool)
    allowed[np.asarray(banned, dtype=np.int64)] = False
    closeness = np.full(len(weight), -np.inf)  # max cosine to the generated items
    sequence = np.asarray(sequence, dtype=np.int64)
    steps: list[Step] = []
    for _ in range(n):
        if not allowed.any():
            break
        logits = runtime.scores(runtime.state(sequence)).astype(np.float64)  # type: ignore[attr-defined]
        spread = float(logits[allowed].std()) or 1.0
        if boosted is not None and len(boosted):
            logits[boosted] += TOPIC_STRENGTH * spread
        if steps and diversity > 0:
            logits -= diversity * spread * np.maximum(closeness, 0.0)
        logits = np.where(allowed, logits / temperature, -np.inf)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        item = int(np.argmax(np.where(allowed, logits + gumbel(rng, len(logits)), -np.inf)))
        recent = sequence[-WHY_WINDOW:]
        why = recent[np.argsort(-(unit[recent] @ unit[item]), kind="stable")][:WHY_ITEMS]
        steps.append(Step(item, float(probs[item]), list(dict.fromkeys(why.tolist()))))
        allowed[item] = False
        closeness = np.maximum(closeness, unit @ unit[item])
        sequence = np.append(sequence, item)
    return steps
