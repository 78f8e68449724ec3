"""The sequence model of a bundle (issue #11): training it inside ``recsvc train``, and
serving it (a user's ordered items -> state -> next-item scores).

A user's sequence is their training tail (the last ``max_len`` items the model was trained
on, kept in the bundle) followed by the items of their streamed feedback events, in event
time order (Redis keeps them, bounded, in the user's ``recent`` ZSET). A user unknown to
the model has no tail: their sequence starts with their first events. The state is the
model's output after the last item, a float32 vector cached in Redis after each
acknowledged event (see :class:`SequenceModel.state_from_bytes`)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from recsvc.data import IdMap, Interactions, user_sequences

log = logging.getLogger("recsvc")


class SequenceModel:
    """A loaded sequence model plus the id maps of its bundle."""

    def __init__(self, runtime: Any, users: IdMap):  # runtime: generators.sequence.SequenceRuntime
        self.runtime = runtime
        self.users = users
        self.version = runtime.version
        self.dim = runtime.model.dim
        from recsvc.ranking.transitions import TransitionScorer

        self.transitions_share, self._transitions = 0.0, None
        if runtime.transitions is not None:
            matrix, setting = runtime.transitions
            self.transitions_share = float(setting.get("share", 0.0))
            self._transitions = TransitionScorer(
                matrix, setting["decay"], setting["n_last"], self._tails_of
            )

    @classmethod
    def load(cls, directory: Path, users: IdMap) -> SequenceModel:
        import torch

        from generators.sequence import SequenceRuntime

        torch.set_num_threads(1)  # serving shares the cores (performance-notes.md)
        return cls(SequenceRuntime.load(directory), users)

    def sequence(self, user_id: str, feedback_items: np.ndarray) -> np.ndarray:
        """The user's items in order: training tail, then ``feedback_items`` (known
        item indices, oldest first)."""
        tail = self.runtime.tail(self.users.get(user_id))
        if not len(feedback_items):
            return tail
        return np.concatenate([tail, np.asarray(feedback_items, dtype=np.int64)])

    def state(self, sequence: np.ndarray) -> np.ndarray:
        return self.runtime.state(sequence)

    def scores(self, state: np.ndarray) -> np.ndarray:
        return self.runtime.scores(state)

    def next_scores(self, states: np.ndarray, sequences: list[np.ndarray]) -> np.ndarray:
        """STRATEGY_SEQUENCE's scores of every item, ``(users, n_items)`` float64: the
        model's logits, mixed with the transitions from each user's last items when the
        bundle chose a share for them on validation."""
        from recsvc.ranking.transitions import with_transitions

        logits = self.runtime.scores(np.atleast_2d(states))
        scorer = self._transitions
        if scorer is None or not self.transitions_share:
            return logits.astype(np.float64)
        if len(sequences) == 1:  # serving
            found = scorer.one_user_scores(sequences[0])
        else:
            found = scorer.user_scores(sequences)
        return with_transitions(logits, found, self.transitions_share)

    def scorers(self) -> list[Any]:
        """The mixture's order-aware members: the model (states from the batch when
        serving, else encoded from the training tails of the batch's user rows,
        ``batch.cache["users"]``) and, in bundles that have them, the transitions (the
        user's ordered items from the batch, else those tails)."""
        from generators.sequence import encode_batch
        from recsvc.ranking.sequence import SequenceScorer

        def states_of(batch: Any) -> np.ndarray:
            return encode_batch(self.runtime.model, self._tails_of(batch))

        out: list[Any] = [SequenceScorer(self.runtime.out_weight, states_of)]
        if self._transitions is not None:
            out.append(self._transitions)
        return out

    def _tails_of(self, batch: Any) -> list[np.ndarray]:
        """The training tails of the batch's user rows (``batch.cache["users"]``)."""
        return [self.runtime.tail(int(r)) for r in batch.cache["users"]]

    def state_to_bytes(self, state: np.ndarray) -> bytes:
        return np.asarray(state, dtype="<f4").tobytes()

    def state_from_bytes(self, blob: bytes) -> np.ndarray:
        state = np.frombuffer(blob, dtype="<f4")
        if state.shape != (self.dim,):
            raise ValueError(f"cached sequence state: {state.size} values, model: {self.dim}")
        return state.astype(np.float32)


def last_item_split(
    user_items: Any,
    interactions: Interactions,
    users: IdMap,
    items: IdMap,
    max_users: int | None = None,
    seed: int = 0,
) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
    """Leave-one-out validation carved from training data, as the test protocol splits:
    the last item of users with at least 3 is held out (of at most ``max_users`` of them,
    drawn at random: every choice is made on that many users anyway, and the others'
    latest transition is the training data closest to what is served next). Returns the
    matrix without those (user, item) entries (what the other scorers fit), the held-out
    items per user (empty for users not held out), and each user's ordered items before
    them (what the sequence model trains on)."""
    import scipy.sparse as sp

    if not interactions.ordered:
        raise ValueError(
            "--sequence needs ordered interactions: a CSV/TSV with a timestamp column, or a "
            "'user item' line file (one interaction per line, oldest first)"
        )
    sequences = user_sequences(interactions, users, items)
    held = np.array([len(s) >= 3 for s in sequences], dtype=bool)
    if max_users is not None and held.sum() > max_users:
        keep = np.random.default_rng(seed).choice(np.flatnonzero(held), max_users, replace=False)
        held[:] = False
        held[keep] = True
    rows = np.flatnonzero(held)
    cols = np.array([sequences[r][-1] for r in rows], dtype=np.int64)
    drop = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=user_items.shape)
    fit_part = (user_items - user_items.multiply(drop)).tocsr()
    fit_part.eliminate_zeros()
    pairs = zip(sequences, held, strict=True)
    valid = [np.array([s[-1]]) if h else np.empty(0, np.int64) for s, h in pairs]
    inputs = [s[:-1] if h else s for s, h in zip(sequences, held, strict=True)]
    return fit_part, valid, inputs


def train_sequence(
    args: argparse.Namespace, inputs: list[np.ndarray], valid: list[np.ndarray], n_items: int
) -> tuple[tuple[Any, list[np.ndarray], Any], dict[str, Any], list[Any]]:
    """Fit the order-aware members for ``recsvc train --sequence`` on ``inputs`` (each
    user's ordered items before their validation item): the sequence model, its epochs
    chosen on ``valid`` under ``--sequence-minutes``, and the item transitions, their
    settings chosen on ``valid``. Returns ``((model, tails, transitions), params, scorers)``:
    what the bundle keeps (each user's training tail with the validation item appended:
    serving continues from the whole training sequence; the transitions refitted on those
    whole sequences), the manifest entry, and the mixture's scorers over the validation
    inputs."""
    import torch

    from generators.sequence import SeqConfig, encode_batch, train_sasrec
    from recsvc.ranking.sequence import SequenceScorer
    from recsvc.ranking.transitions import (
        TransitionScorer,
        choose_share,
        choose_transitions,
        fit_transitions,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    targets = np.array([v[0] if len(v) else -1 for v in valid], dtype=np.int64)
    overrides = {
        k: v
        for k, v in (
            ("max_epochs", args.sequence_epochs),
            ("dim", args.sequence_dim),
            ("max_len", args.sequence_max_len),
            ("lr", args.sequence_lr),
            ("batch_size", args.sequence_batch_size),
            ("dropout", args.sequence_dropout),
            ("seed", args.seed),
        )
        if v is not None
    }
    cfg = SeqConfig(**overrides)
    started = time.perf_counter()
    model, info = train_sasrec(
        inputs, n_items, cfg, targets,
        max_seconds=args.sequence_minutes * 60 if args.sequence_minutes else None,
        log=None if args.quiet else lambda line: log.info("sequence %s", line),
    )  # fmt: skip
    params: dict[str, Any] = {
        **info["config"],
        "precision": info["precision"],
        "epochs": info["epochs"],
        "valid_ndcg@10": info["best_valid_ndcg@10"],
        "train_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(info["history"][-1]["cpu_seconds"], 1) if info["history"] else 0,
        "epochs_per_s": round(info["epochs"] / max(info["seconds"], 1e-9), 5),
        "validation": "each user's last training item (leave-one-out)",
    }
    log.info("sequence model trained: %s", params)

    def states_of(batch: Any) -> np.ndarray:
        return encode_batch(model, [inputs[int(u)] for u in batch.cache["users"]])

    def recent_of(batch: Any) -> list[np.ndarray]:
        return [inputs[int(u)] for u in batch.cache["users"]]

    scorers: list[Any] = [SequenceScorer(model.output_weight().detach().numpy().copy(), states_of)]
    tails = [np.concatenate([s, v]) for s, v in zip(inputs, valid, strict=True)]
    transitions = None
    if getattr(args, "transitions", True):
        choice, fit_matrix = choose_transitions(
            inputs, valid, n_items, n_users=args.mixture_users, seed=args.seed
        )
        scorer = TransitionScorer(fit_matrix, choice["decay"], choice["n_last"], recent_of)
        out_weight = model.output_weight().detach().numpy()

        def logits_of(users: np.ndarray) -> np.ndarray:
            return encode_batch(model, [inputs[u] for u in users.tolist()]) @ out_weight.T

        choice.update(choose_share(
            logits_of, scorer, inputs, valid, n_users=args.mixture_users, seed=args.seed
        ))  # fmt: skip
        params["transitions"] = choice
        scorers.append(scorer)
        transitions = fit_transitions(tails, n_items, choice["window"])
    return (model, tails, transitions), params, scorers
