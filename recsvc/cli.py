"""``recsvc train | serve | eval | export-feedback``: flags, settings, construct, run. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from recsvc import aio
from recsvc.config import Settings

log = logging.getLogger("recsvc")


def _parse_weights(text: str) -> dict[str, float]:
    """``view=1,purchase=8`` (or a JSON object) -> dict."""
    text = text.strip()
    if text.startswith("{"):
        return {k: float(v) for k, v in json.loads(text).items()}
    pairs = (part.split("=", 1) for part in text.split(",") if part.strip())
    return {k.strip().lower(): float(v) for k, v in pairs}


def fit_similarity(args: argparse.Namespace, user_items, show: bool = False):  # type: ignore[no-untyped-def]
    """The item-item matrix ``--similarity`` names, and its parameters for the manifest."""
    from recsvc.similarity import TUNED_KNN, fit_cosine, fit_normalised_knn

    if args.similarity == "cosine":
        return fit_cosine(user_items, args.neighbours, args.threads, show_progress=show), {}
    return fit_normalised_knn(user_items, args.neighbours, **TUNED_KNN), dict(TUNED_KNN)


def cmd_train(args: argparse.Namespace) -> int:
    from recsvc.bundle import CFBundle, save_bundle
    from recsvc.data import build_item_attributes, build_matrix, read_catalogue, read_many

    overrides = {"event_weights": _parse_weights(args.event_weights)} if args.event_weights else {}
    settings = Settings(**overrides)
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
    fit_started = time.perf_counter()
    similarity, similarity_params = fit_similarity(args, user_items, show)
    fit_s = time.perf_counter() - fit_started
    popularity = np.asarray((user_items > 0).sum(axis=0), dtype=np.float32).ravel()
    attributes = item_attributes = None
    if args.catalogue:
        attributes_of = read_catalogue(args.catalogue)
        item_attributes, attributes = build_item_attributes(items, attributes_of)
        log.info("catalogue: %d content attributes over %d items", len(attributes),
                 int((item_attributes.getnnz(axis=1) > 0).sum()))  # fmt: skip
    generator, generator_params, blend_weight = None, None, None
    if args.generator:
        generator, generator_params, blend_weight = _train_generator(
            args, user_items, item_attributes, show
        )
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
            "event_weights": settings.event_weights,
            "rating_midpoint": settings.rating_midpoint,
            "sources": [str(p) for p in args.interactions],
            "data_until_ms": interactions.latest_ms,
            "fit_seconds": round(fit_s, 3),
            "catalogue": str(args.catalogue) if args.catalogue else None,
            "generator": generator_params,
            **({"blend_weight": blend_weight} if blend_weight is not None else {}),
        },
        attributes=attributes,
        item_attributes=item_attributes,
        generator=generator,
    )
    out = save_bundle(bundle, args.out, overwrite=args.force)
    log.info(
        "wrote model %s to %s in %.1fs (fit %.1fs)",
        bundle.model_version, out, time.perf_counter() - started, fit_s,
    )  # fmt: skip
    print(json.dumps({"model_version": bundle.model_version, "out": str(out), **bundle.counts}))
    return 0


def _train_generator(args, user_items, item_attributes, show):  # type: ignore[no-untyped-def]
    """Mult-VAE on the same matrix, early-stopped on NDCG@20 of a validation split
    carved from the training data (the test data is never seen)."""
    import torch

    from generators.train import DEFAULTS, train_vae
    from recsvc.evaluate import holdout_split

    if args.threads:
        torch.set_num_threads(args.threads)
    fit_part, valid = holdout_split(user_items, args.generator_valid_fraction, seed=args.seed)
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
        "valid_fraction": args.generator_valid_fraction,
        "seed": args.seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        **{k: v for k, v in history.items() if isinstance(v, int | float | str)},
    }
    log.info("generator trained: %s", json.dumps(params))
    blend_weight, grid = _tune_blend(model, fit_part, valid, item_attributes, args)
    params["blend_validation"] = grid
    log.info("blend weight %.2f chosen on validation: %s", blend_weight, json.dumps(grid))
    return model, params, blend_weight


def _tune_blend(vae, fit_part, valid, item_attributes, args):  # type: ignore[no-untyped-def]
    """The generator weight of the blend that maximises validation NDCG@20, with CF
    fitted on the same training part (validation items stay unseen by both)."""
    from generators.vae import GeneratorRuntime
    from recsvc.evaluate import ranking_metrics
    from recsvc.generate import GeneratorModel

    generator = GeneratorModel(GeneratorRuntime.from_model(vae), None, None)
    similarity, _ = fit_similarity(args, fit_part)
    users = np.flatnonzero([len(v) > 0 for v in valid])
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(users, size=min(len(users), 4000), replace=False))
    sampled = set(sample.tolist())
    valid_sample = [valid[u] if u in sampled else np.empty(0, np.int64)
                    for u in range(fit_part.shape[0])]  # fmt: skip
    grid = {}
    for weight in np.round(np.linspace(0, 1, 11), 2).tolist():
        scores = blend_scorer(generator, similarity, fit_part, weight)
        grid[weight] = round(ranking_metrics(scores, fit_part, valid_sample, k=20)["ndcg"], 5)
    return max(grid, key=grid.get), grid


def cmd_serve(args: argparse.Namespace) -> int:
    from recsvc.server import serve, serve_workers

    overrides = {
        name: value
        for name, value in (
            ("model", args.model),
            ("port", args.port),
            ("host", args.host),
            ("redis_url", args.redis_url),
            ("data_dir", args.data_dir),
            ("workers", args.workers),
        )
        if value is not None
    }
    settings = Settings(**overrides)
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.workers > 1:
        return serve_workers(settings)
    aio.run(serve(settings))
    return 0


def cmd_export_feedback(args: argparse.Namespace) -> int:
    import redis

    from recsvc.store import EmbeddedRedis, export_feedback

    settings = Settings(**({"redis_url": args.redis_url} if args.redis_url else {}))
    embedded = None
    url = settings.redis_url
    if not url:  # the server's embedded Redis: use it if running, else start it on its data
        embedded = EmbeddedRedis(args.data_dir or settings.data_dir)
        try:
            with redis.Redis.from_url(embedded.url, socket_timeout=1) as probe:
                probe.ping()
            url, embedded = embedded.url, None
        except (redis.RedisError, OSError):
            url = embedded.start().url
    try:
        with redis.Redis.from_url(url) as client:
            rows, last = export_feedback(client, args.out, trim=not args.no_trim)
    finally:
        if embedded is not None:
            embedded.stop()
    log.info("exported %d feedback events to %s (last entry %s)", rows, args.out, last)
    print(json.dumps({"rows": rows, "last_entry_id": last, "out": str(args.out)}))
    return 0


def blend_scorer(generator, similarity, history_matrix, generator_weight: float):  # type: ignore[no-untyped-def]
    """A batch scoring function (user indices -> users x items, float32) ranking as
    the served generator/blend strategies do; used by eval and by blend tuning."""
    from recsvc.engine import blend_scores

    def scores(users: np.ndarray) -> np.ndarray:
        history = history_matrix[users]
        logits = generator.batch_item_scores(history)
        cf = (history @ similarity).toarray() if generator_weight < 1 else None
        return blend_scores(logits, cf, generator_weight)[0].astype(np.float32)

    return scores


def strategy_scores(model, strategy: str, generator_weight: float):  # type: ignore[no-untyped-def]
    """A batch scoring function for eval, ranking as the served strategy does."""
    train = model.bundle.user_items
    if strategy == "cf":
        return lambda users: model.score_users(train[users])
    return blend_scorer(model.generator, model.bundle.similarity, train, generator_weight)


def cmd_eval(args: argparse.Namespace) -> int:
    from recsvc.data import read_interactions
    from recsvc.engine import load_model
    from recsvc.evaluate import ranking_metrics

    started = time.perf_counter()
    model = load_model(args.model)
    test = read_interactions(args.test)
    users = model.users.indices(test.user_ids)
    items = model.items.indices(test.item_ids)
    known = (users >= 0) & (items >= 0)
    test_items: list[list[int]] = [[] for _ in range(len(model.users))]
    for user, item in zip(users[known].tolist(), items[known].tolist(), strict=True):
        test_items[user].append(item)
    train = model.bundle.user_items
    strategy = args.strategy or ("blend" if model.generator is not None else "cf")
    if strategy != "cf" and model.generator is None:
        raise ValueError(f"strategy {strategy} needs a bundle trained with --generator")
    weight = 1.0 if strategy == "generator" else (
        args.blend_weight if args.blend_weight is not None
        else float(model.params.get("blend_weight", 0.5))
    )  # fmt: skip
    metrics = ranking_metrics(
        strategy_scores(model, strategy, weight),
        train,
        [np.unique(np.array(t, dtype=np.int64)) for t in test_items],
        k=args.k,
    )
    result = {
        "model_version": model.model_version,
        "strategy": strategy,
        **({"blend_weight": weight} if strategy == "blend" else {}),
        "k": args.k,
        f"recall@{args.k}": round(metrics["recall"], 4),
        f"ndcg@{args.k}": round(metrics["ndcg"], 4),
        "users": metrics["n_users"],
        "test_pairs_unknown_to_model": int((~known).sum()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fit a model bundle from an interaction log")
    train.add_argument(
        "--interactions",
        required=True,
        type=Path,
        action="append",
        help="CSV/TSV with a user_id,item_id header, or 'user item item ...' "
        "lines; repeat to add feedback exports",
    )
    train.add_argument("--out", required=True, type=Path, help="model bundle directory to write")
    train.add_argument(
        "--similarity",
        choices=["knn", "cosine"],
        default="knn",
        help="knn: normalised item-item kNN tuned on Gowalla validation "
        "(default); cosine: plain cosine (implicit)",
    )
    train.add_argument("--neighbours", type=int, default=100, help="similar items kept per item")
    train.add_argument("--event-weights", help="e.g. 'view=1,click=2,purchase=8' (or JSON)")
    train.add_argument("--threads", type=int, default=0, help="fit threads (0: all cores)")
    train.add_argument(
        "--catalogue", type=Path, help="item content (JSONL or CSV: item_id, category, tags, title)"
    )
    train.add_argument(
        "--generator", action="store_true", help="also train the generative model (Mult-VAE)"
    )
    train.add_argument("--generator-epochs", type=int, help="default: generators.train.DEFAULTS")
    train.add_argument(
        "--generator-minutes",
        type=float,
        default=11.0,
        help="stop generator training after this long (0: no limit)",
    )
    train.add_argument("--generator-hidden", type=int, help="default: generators.train.DEFAULTS")
    train.add_argument("--generator-latent", type=int, help="default: generators.train.DEFAULTS")
    train.add_argument(
        "--generator-batch-size", type=int, help="default: generators.train.DEFAULTS"
    )
    train.add_argument("--generator-lr", type=float, help="default: generators.train.DEFAULTS")
    train.add_argument(
        "--generator-valid-fraction",
        type=float,
        default=0.1,
        help="share of each user's items held out for early stopping",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--force", action="store_true", help="replace an existing bundle")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    serve = sub.add_parser("serve", help="serve a model bundle over gRPC")
    serve.add_argument("--model", type=Path, help="model bundle directory [RECSVC_MODEL]")
    serve.add_argument("--port", type=int, help="port, 0 for any free one [RECSVC_PORT=50051]")
    serve.add_argument("--host", help="listen address [RECSVC_HOST=[::]]")
    serve.add_argument("--redis-url", help="Redis URL; unset: embedded Redis [RECSVC_REDIS_URL]")
    serve.add_argument(
        "--data-dir", type=Path, help="embedded Redis data directory [RECSVC_DATA_DIR=recsvc-data]"
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="serving processes sharing the port (SO_REUSEPORT) [RECSVC_WORKERS=1]",
    )
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser(
        "eval", help="full-ranking Recall@k / NDCG@k of a bundle on a test log"
    )
    evaluate.add_argument("--model", required=True, type=Path, help="model bundle directory")
    evaluate.add_argument(
        "--test", required=True, type=Path, help="test interactions (same formats as train)"
    )
    evaluate.add_argument("--k", type=int, default=20)
    evaluate.add_argument(
        "--strategy",
        choices=["cf", "generator", "blend"],
        help="default: blend with a generator, else cf",
    )
    evaluate.add_argument(
        "--blend-weight",
        type=float,
        help="generator weight in blend (default: the bundle's tuned one)",
    )
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser(
        "export-feedback", help="write the feedback log not yet exported to a CSV for training"
    )
    export.add_argument("--out", required=True, type=Path, help="CSV file to write")
    export.add_argument("--redis-url", help="Redis URL; unset: the embedded Redis of --data-dir")
    export.add_argument("--data-dir", type=Path, help="embedded Redis data directory")
    export.add_argument(
        "--no-trim",
        action="store_true",
        help="keep exported entries in the stream (default: trim them)",
    )
    export.set_defaults(func=cmd_export_feedback)
    return parser


def main(argv: list[str] | None = None) -> int:
    from recsvc.logs import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
