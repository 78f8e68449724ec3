"""The training pipeline behind ``recsvc train``: read the logs, fit the kNN, the
generator and the low-rank term on a validation split carved from the data,
choose the mixture there, refit what is served on all the data, write the bundle."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsvc.config import Settings
from recsvc.ranking.generator import GeneratorScorer
from recsvc.ranking.knn import KnnScorer
from recsvc.ranking.lowrank import fit_item_factors
from recsvc.ranking.mixture import tune_mixture
from recsvc.ranking.pipeline import N_POPULAR
from recsvc.ranking.popularity import PopularityScorer

log = logging.getLogger("recsvc")


def lowrank_ranks(rank_max: int) -> list[int]:
    """The ranks tried on validation: ``rank_max`` and its halves down to 32."""
    ranks: list[int] = []
    rank = rank_max
    while rank >= 32 or not ranks:
        ranks.append(rank)
        rank //= 2
    return sorted(ranks)


def fit_mixture(
    user_items: sp.csr_matrix,
    fit_part: sp.csr_matrix,
    valid: Sequence[np.ndarray],
    fit_knn: Callable[[sp.csr_matrix], sp.csr_matrix],
    generator: Any = None,
    rank_max: int = 512,
    n_users: int = 6000,
    seed: int = 0,
    sequence: Sequence[Any] = (),
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The manifest's ``mixture`` entry and the item factors to serve (or None).

    ``fit_knn`` fits the kNN matrix (on the part it is given); the
    generator, when given, must have been trained on ``fit_part`` only."""
    started = time.perf_counter()
    popularity = PopularityScorer(np.asarray((fit_part > 0).sum(axis=0)).ravel())
    knn = KnnScorer(fit_knn(fit_part))
    ranks = lowrank_ranks(rank_max) if rank_max > 0 else []
    factors = fit_item_factors(fit_part, max(ranks), seed) if ranks else None
    if factors is not None:
        ranks = [r for r in ranks if r <= factors.shape[1]] or [factors.shape[1]]
    choice = tune_mixture(
        knn, popularity, fit_part, valid, factors, ranks,
        GeneratorScorer(generator) if generator is not None else None,
        n_users=n_users, seed=seed, sequence=sequence,
    )  # fmt: skip
    served_factors = None
    if choice.rank is not None:
        served_factors = fit_item_factors(user_items, choice.rank, seed)
    mixture = {
        "weights": choice.weights,
        "rank": choice.rank,
        "n_candidates": choice.n_candidates,
        "n_popular": N_POPULAR,
        "validation": choice.metrics,
        "validation_grid": choice.grid,
        "validation_alone": choice.alone,
        "seconds": round(time.perf_counter() - started, 1),
    }
    log.info("mixture: %s", mixture)
    return mixture, served_factors


def fit_similarity(  # type: ignore[no-untyped-def]
    args: argparse.Namespace, user_items, show: bool = False, knn_params: dict | None = None
):
    """The item-item matrix ``--similarity`` names, and its parameters for the manifest.

    ``knn_params``: the normalised kNN's parameters (default: ``TUNED_KNN``, the
    starting point of the search on validation)."""
    from recsvc.similarity import TUNED_KNN, fit_cosine, fit_normalised_knn

    if args.similarity == "cosine":
        return fit_cosine(user_items, args.neighbours, args.threads, show_progress=show), {}
    params = dict(knn_params or TUNED_KNN)
    return fit_normalised_knn(user_items, args.neighbours, **params), params


def choose_knn(args: argparse.Namespace, fit_part, valid) -> tuple[dict | None, dict | None]:  # type: ignore[no-untyped-def]
    """The kNN parameters searched on the validation split (``--knn-search-seconds``),
    and a summary of the search for the manifest; ``(None, None)`` when not searched."""
    if args.similarity != "knn" or getattr(args, "knn_search_seconds", 0) <= 0:
        return None, None
    from recsvc.ranking.knn_search import search_knn

    choice = search_knn(
        fit_part, valid, args.neighbours, budget_s=args.knn_search_seconds,
        n_users=args.mixture_users, seed=args.seed,
    )  # fmt: skip
    if not choice.complete and len(choice.tried) <= 1:
        return None, None  # no validation users, or no time for a single alternative
    summary = {
        "validation": choice.metrics,
        "validation_start": choice.start_metrics,
        "tried": choice.tried,
        "complete": choice.complete,
        "seconds": choice.seconds,
    }
    return choice.params, summary


def train(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """``recsvc train``: read the logs, fit every scorer, choose the mixture on a
    validation split carved from them, write the bundle; returns a summary."""
    from recsvc.bundle import CFBundle, save_bundle
    from recsvc.data import build_item_attributes, build_matrix, read_catalogue, read_many

    show = not args.quiet
    started = time.perf_counter()
    interactions = read_many(
        args.interactions, settings.event_weights, settings.rating_midpoint, show_progress=show
    )
    user_items, users, items = build_matrix(interactions)
    log.info(
        "read %d interactions: %d users x %d items, %d positive pairs",
        len(interactions), len(users), len(items), user_items.nnz,
    )  # fmt: skip
    popularity = np.asarray((user_items > 0).sum(axis=0), dtype=np.float32).ravel()
    attributes = item_attributes = None
    if args.catalogue:
        attributes_of = read_catalogue(args.catalogue)
        item_attributes, attributes = build_item_attributes(items, attributes_of)
        log.info("catalogue: %d content attributes over %d items", len(attributes),
                 int((item_attributes.getnnz(axis=1) > 0).sum()))  # fmt: skip
    from recsvc.evaluate import holdout_split

    # one validation split, carved from the training data, for every choice made here
    fit_part, valid = holdout_split(user_items, args.valid_fraction, seed=args.seed)
    sequence = sequence_params = None
    sequence_scorers: list[Any] = []
    if getattr(args, "sequence", False):  # #11: ordered data; validation = last items
        from recsvc.sequence import last_item_split, train_sequence

        fit_part, valid, inputs = last_item_split(
            user_items, interactions, users, items, args.mixture_users, args.seed
        )
        sequence, sequence_params, sequence_scorers = train_sequence(
            args, inputs, valid, len(items)
        )
    knn_params, knn_search = choose_knn(args, fit_part, valid)
    fit_started = time.perf_counter()
    similarity, similarity_params = fit_similarity(args, user_items, show, knn_params)
    fit_s = time.perf_counter() - fit_started
    generator, generator_params = None, None
    if args.generator:
        generator, generator_params = _train_generator(
            args, fit_part, valid, item_attributes, show
        )
    generate_params = None
    if args.generator and item_attributes is not None:  # issue #15: the content profile
        from recsvc.generate.profile import fit_for_catalogue

        generate_params = fit_for_catalogue(
            interactions, users, items, item_attributes, attributes.ids, seed=args.seed
        )
        log.info("generate: session prior fitted on the log's time order: %s", generate_params)
    mixture, item_factors = fit_mixture(
        user_items, fit_part, valid, lambda part: fit_similarity(args, part, False, knn_params)[0],
        generator=_runtime_generator(generator), rank_max=args.lowrank_rank,
        n_users=args.mixture_users, seed=args.seed, sequence=sequence_scorers,
    )  # fmt: skip
    bundle = CFBundle(
        users=users,
        items=items,
        user_items=user_items,
        similarity=similarity,
        popularity=popularity,
        params={
            "similarity": args.similarity,
            "neighbours": args.neighbours,
            **similarity_params,
            "knn_search": knn_search,
            "event_weights": settings.event_weights,
            "rating_midpoint": settings.rating_midpoint,
            "sources": [str(p) for p in args.interactions],
            "data_until_ms": interactions.latest_ms,
            "fit_seconds": round(fit_s, 3),
            "catalogue": str(args.catalogue) if args.catalogue else None,
            "generator": generator_params,
            "generate": generate_params,
            "sequence": sequence_params,
            "mixture": mixture,
        },
        attributes=attributes,
        item_attributes=item_attributes,
        generator=generator,
        item_factors=item_factors,
        sequence=sequence,
    )
    out = save_bundle(bundle, args.out, overwrite=args.force)
    log.info(
        "wrote model %s to %s in %.1fs (fit %.1fs)",
        bundle.model_version, out, time.perf_counter() - started, fit_s,
    )  # fmt: skip
    return {"model_version": bundle.model_version, "out": str(out), **bundle.counts}


def _train_generator(args, fit_part, valid, item_attributes, show):  # type: ignore[no-untyped-def]
    """Mult-VAE on the training part of the split, early-stopped on NDCG@20 of its
    validation part (the test data is never seen)."""
    import torch

    from generators.train import DEFAULTS, train_vae
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    # flags left unset take the defaults tuned in generators.train
    overrides = {
        name: value
        for name, value in (
            ("n_epochs", args.generator_epochs),
            ("hidden", args.generator_hidden),
            ("latent", args.generator_latent),
            ("batch_size", args.generator_batch_size),
            ("lr", args.generator_lr),
            ("precision", args.generator_precision),
        )
        if value is not None
    }
    model, history = train_vae(
        fit_part,
        valid,
        seed=args.seed,
        progress=show,
        attributes_csr=item_attributes,
        max_seconds=args.generator_minutes * 60 if args.generator_minutes else None,
        **overrides,
    )
    params = {
        **{k: v for k, v in DEFAULTS.items() if k != "seed"},
        **overrides,
        "valid_fraction": args.valid_fraction,
        "seed": args.seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        **{k: v for k, v in history.items() if isinstance(v, int | float | str)},
    }
    log.info("generator trained: %s", json.dumps(params))
    return model, params


def _runtime_generator(vae):  # type: ignore[no-untyped-def]
    """The trained Mult-VAE as the serving code runs it (None stays None)."""
    if vae is None:
        return None
    from generators.vae import GeneratorRuntime
    from recsvc.generate import GeneratorModel

    return GeneratorModel(GeneratorRuntime.from_model(vae), None, None)
