"""``recsvc train | serve | eval | export-feedback | report | migrate``: flags, settings,
construct, run.

Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

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


def cmd_train(args: argparse.Namespace) -> int:
    from recsvc.train import train

    overrides: dict[str, Any] = (
        {"event_weights": _parse_weights(args.event_weights)} if args.event_weights else {}
    )
    summary = train(args, Settings(**overrides))
    print(json.dumps(summary))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from recsvc.api.server import serve, serve_workers

    overrides = {
        name: value
        for name, value in (
            ("model", args.model),
            ("port", args.port),
            ("host", args.host),
            ("redis_url", args.redis_url),
            ("data_dir", args.data_dir),
            ("workers", args.workers),
            ("variants", args.variants),  # (#13)
            ("metrics_port", args.metrics_port),
            ("impression_sample_rate", args.impression_sample_rate),
            # issue #14: TLS, tokens, admission
            ("tls_cert", args.tls_cert),
            ("tls_key", args.tls_key),
            ("tls_client_ca", args.tls_client_ca),
            ("auth_tokens_file", args.auth_tokens),
            ("max_in_flight", args.max_in_flight),
            ("max_pending_calls", args.max_pending_calls),
            ("max_queue_ms", args.max_queue_ms),
            ("redis_cluster", args.redis_cluster),
            ("redis_wait_replicas", args.redis_wait_replicas),
        )
        if value is not None
    }
    settings = Settings(**overrides)
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.workers > 1:
        return serve_workers(settings)
    aio.run(serve(settings))
    return 0


def _tool_redis(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The deployment's Redis for a tool command (see ``store.tool_client``)."""
    from recsvc.store import tool_client

    overrides: dict[str, object] = {"redis_url": args.redis_url} if args.redis_url else {}
    if args.redis_cluster:
        overrides["redis_cluster"] = True
    settings = Settings(**overrides)  # type: ignore[arg-type]
    data_dir = args.data_dir or settings.data_dir
    return tool_client(settings.redis_url, settings.redis_cluster, data_dir)


def cmd_export_feedback(args: argparse.Namespace) -> int:
    from recsvc.store import export_feedback

    with _tool_redis(args) as client:
        rows, last = export_feedback(client, args.out, trim=not args.no_trim)
    log.info("exported %d feedback events to %s (last entry %s)", rows, args.out, last)
    print(json.dumps({"rows": rows, "last_entry_id": last, "out": str(args.out)}))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """(#13) Per-variant CTR and conversions from the impression and feedback logs."""
    import itertools

    from recsvc.online.attribution import attribute
    from recsvc.online.impressions import Impression
    from recsvc.online.report import plot, read_feedback_csv, summarise, table
    from recsvc.store.impressions import read_feedback_log, read_impressions

    overrides: dict[str, Any] = {"attribution_window_s": args.window_s} if args.window_s else {}
    window_s = Settings(**overrides).attribution_window_s  # the flag, else RECSVC_*, else 1 day
    since_ms = int((time.time() - args.since_hours * 3600) * 1000) if args.since_hours else 0
    with _tool_redis(args) as client:
        impressions = (Impression.from_json(f) for f in read_impressions(client, since_ms))
        events = itertools.chain(read_feedback_log(client, since_ms),
                                 read_feedback_csv(args.feedback or ()))  # fmt: skip
        result = attribute(
            impressions, events, window_s * 1000, int(args.bucket_s * 1000),
            frozenset(args.click_types.split(",")), frozenset(args.conversion_types.split(",")),
        )  # fmt: skip
    summary = summarise(result, args.control)
    print(json.dumps(summary, indent=1) if args.json else table(summary))
    if args.plot:
        plot(summary, args.plot)
    return 0


# -- #12: format v1 -> v2 --------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    from recsvc.store import migrate_v1

    with _tool_redis(args) as client:
        report = migrate_v1(client)
    log.info("migrated format v1 to v2", extra=report.as_dict())
    print(json.dumps(report.as_dict()))
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


def strategy_scores(model, strategy: str, generator_weight):  # type: ignore[no-untyped-def]
    """A batch scoring function for eval, ranking as the served strategy does
    (``generator_weight``: the blend's generator share, or a dict of mixture weights)."""
    from recsvc.ranking import UserBatch

    train = model.bundle.user_items
    if strategy == "cf":
        return lambda users: model.score_users(train[users])
    if strategy == "blend" and model.pipeline is not None:
        pipeline = model.pipeline
        if isinstance(generator_weight, dict):
            pipeline = pipeline.with_weights(generator_weight)
        elif generator_weight is not None:
            pipeline = pipeline.with_generator_weight(generator_weight)

        def batch_of(users: np.ndarray) -> UserBatch:
            batch = UserBatch(train[users])
            batch.cache["users"] = users  # the sequence member reads its users' tails (#11)
            return batch

        return lambda users: pipeline.dense_scores(batch_of(users))
    assert generator_weight is not None
    return blend_scorer(model.generator, model.bundle.similarity, train, generator_weight)


def cmd_eval(args: argparse.Namespace) -> int:
    from recsvc.data import read_interactions
    from recsvc.engine import load_model
    from recsvc.evaluate import ranking_metrics

    started = time.perf_counter()
    model = load_model(args.model)
    if args.leave_one_out:  # issue #11
        from recsvc.evaluate import leave_one_out

        strategy = args.strategy or ("sequence" if model.sequence is not None else "cf")
        found = leave_one_out(model, args.test, strategy, args.k)
        print(json.dumps({
            "model_version": model.model_version, "protocol": "leave-one-out",
            "strategy": strategy, "k": args.k,
            **{key: round(v, 4) if isinstance(v, float) else v for key, v in found.items()},
            "seconds": round(time.perf_counter() - started, 1),
        }))  # fmt: skip
        return 0
    test = read_interactions(args.test)
    users = model.users.indices(test.user_ids)
    items = model.items.indices(test.item_ids)
    known = (users >= 0) & (items >= 0)
    test_items: list[list[int]] = [[] for _ in range(len(model.users))]
    for user, item in zip(users[known].tolist(), items[known].tolist(), strict=True):
        test_items[user].append(item)
    train = model.bundle.user_items
    has_blend = model.generator is not None or model.pipeline is not None
    strategy = args.strategy or ("blend" if has_blend else "cf")
    if (strategy == "generator" and model.generator is None) or (
        strategy == "blend" and not has_blend
    ):
        raise ValueError(f"strategy {strategy} needs a bundle trained with --generator")
    weight: float | dict[str, float] | None
    if strategy == "generator":
        weight = 1.0
    elif args.weights and model.pipeline is not None:
        weight = _parse_weights(args.weights)  # for reporting: each scorer alone, say
    elif args.blend_weight is not None or model.pipeline is None:
        weight = (args.blend_weight if args.blend_weight is not None
                  else float(model.params.get("blend_weight", 0.5)))  # fmt: skip
    else:
        weight = None  # the tuned mixture
    metrics = ranking_metrics(
        strategy_scores(model, strategy, weight),
        train,
        [np.unique(np.array(t, dtype=np.int64)) for t in test_items],
        k=args.k,
    )
    result = {
        "model_version": model.model_version,
        "strategy": strategy,
        **({"blend_weight": weight} if strategy == "blend" and isinstance(weight, float) else {}),
        **(
            {"mixture": weight or model.pipeline.weights}
            if strategy == "blend" and not isinstance(weight, float)
            else {}
        ),  # fmt: skip
        "k": args.k,
        f"recall@{args.k}": round(metrics["recall"], 4),
        f"ndcg@{args.k}": round(metrics["ndcg"], 4),
        "users": metrics["n_users"],
        "test_pairs_unknown_to_model": int((~known).sum()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return 0


def _add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    """Where an offline command finds the Redis that a server used."""
    parser.add_argument("--redis-url", help="Redis URL; unset: the embedded Redis of --data-dir")
    parser.add_argument("--data-dir", type=Path, help="embedded Redis data directory")
    parser.add_argument(
        "--redis-cluster", action="store_true", help="--redis-url is a Redis Cluster node"
    )


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
        help="knn: normalised item-item kNN, its normalisation chosen on the "
        "validation split (default); cosine: plain cosine (implicit)",
    )
    train.add_argument("--neighbours", type=int, default=100, help="similar items kept per item")
    train.add_argument(
        "--knn-search-seconds",
        type=float,
        default=90.0,
        help="time budget for choosing the kNN's normalisation on the validation split, "
        "starting from the values found on Gowalla (0: keep those)",
    )
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
        default=10.0,
        help="stop generator training after this long (0: no limit)",
    )
    train.add_argument("--generator-hidden", type=int, help="default: generators.train.DEFAULTS")
    train.add_argument("--generator-latent", type=int, help="default: generators.train.DEFAULTS")
    train.add_argument(
        "--generator-batch-size", type=int, help="default: generators.train.DEFAULTS"
    )
    train.add_argument("--generator-lr", type=float, help="default: generators.train.DEFAULTS")
    train.add_argument(
        "--generator-precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the output layer's matmuls in training; auto: bfloat16 where this CPU runs it "
        "at least 1.3x faster (measured at start)",
    )
    train.add_argument(
        "--valid-fraction",
        "--generator-valid-fraction",
        dest="valid_fraction",
        type=float,
        default=0.1,
        help="share of each user's items held out to choose the mixture and stop the generator",
    )
    train.add_argument(
        "--lowrank-rank",
        type=int,
        default=512,
        help="largest rank of the low-rank item term tried on validation (0: no such term)",
    )
    train.add_argument(
        "--mixture-users", type=int, default=6000, help="validation users the mixture is tuned on"
    )
    # issue #11: the sequence model
    train.add_argument(
        "--sequence",
        action="store_true",
        help="also train the sequence model (SASRec, full softmax); needs ordered data",
    )
    train.add_argument(
        "--sequence-minutes",
        type=float,
        default=10.0,
        help="time budget of sequence training, trained to its end, the best epoch on "
        "validation kept (0: no budget; then epochs stop early on validation)",
    )
    train.add_argument("--sequence-epochs", type=int, help="most epochs (default 200)")
    train.add_argument("--sequence-dim", type=int, help="default: generators.sequence.SeqConfig")
    train.add_argument("--sequence-lr", type=float, help="default: generators.sequence.SeqConfig")
    train.add_argument(
        "--sequence-batch-size", type=int, help="default: generators.sequence.SeqConfig"
    )
    train.add_argument(
        "--sequence-dropout", type=float, help="default: generators.sequence.SeqConfig"
    )
    train.add_argument(
        "--sequence-max-len", type=int, help="items of the window the model reads (default 200)"
    )
    train.add_argument(
        "--no-transitions",
        dest="transitions",
        action="store_false",
        help="with --sequence: no item-transition member in the mixture (by default its "
        "settings and weight are chosen on validation)",
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
    # (#13) online metrics
    serve.add_argument(
        "--variants", type=Path, help="A/B variants file, JSON or TOML [RECSVC_VARIANTS]"
    )
    serve.add_argument(
        "--metrics-port", type=int,
        help="serve Prometheus /metrics on this port (0: off) [RECSVC_METRICS_PORT=0]",
    )  # fmt: skip
    serve.add_argument(
        "--impression-sample-rate", type=float,
        help="share of responses logged as impressions [RECSVC_IMPRESSION_SAMPLE_RATE=1]",
    )  # fmt: skip
    # issue #14: TLS, tokens, admission
    serve.add_argument(
        "--tls-cert", type=Path, help="PEM certificate chain; serve TLS only [RECSVC_TLS_CERT]"
    )
    serve.add_argument("--tls-key", type=Path, help="PEM private key [RECSVC_TLS_KEY]")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA: require client certificates it signed (mutual TLS) [RECSVC_TLS_CLIENT_CA]",
    )
    serve.add_argument(
        "--auth-tokens",
        type=Path,
        help="token file, 'ROLE TOKEN [NAME]' per line, roles admin/client "
        "[RECSVC_AUTH_TOKENS_FILE]; unset: open (warned beyond loopback)",
    )
    serve.add_argument(
        "--max-in-flight",
        type=int,
        help="unary calls in progress per process before new ones get RESOURCE_EXHAUSTED "
        "(0: no limit) [RECSVC_MAX_IN_FLIGHT=256]",
    )
    serve.add_argument(
        "--max-queue-ms",
        type=float,
        help="refuse unary calls with RESOURCE_EXHAUSTED while the server has been busy "
        "without a pause for this long (0: never) [RECSVC_MAX_QUEUE_MS=0]",
    )
    serve.add_argument(
        "--max-pending-calls",
        type=int,
        help="calls gRPC's core may hold before the server takes them; beyond it core "
        "refuses new ones as CANCELLED (0: core's default) [RECSVC_MAX_PENDING_CALLS=0]",
    )
    serve.add_argument(
        "--redis-cluster", action="store_true", default=None,
        help="--redis-url is a Redis Cluster node [RECSVC_REDIS_CLUSTER=0]",
    )  # fmt: skip
    serve.add_argument(
        "--redis-wait-replicas", type=int,
        help="ack feedback once this many replicas have it [RECSVC_REDIS_WAIT_REPLICAS=0]",
    )  # fmt: skip
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
        choices=["cf", "generator", "blend", "sequence"],
        help="default: blend with a generator, else cf (--leave-one-out: sequence, else cf)",
    )
    evaluate.add_argument(
        "--leave-one-out",
        action="store_true",
        help="#11: --test is a whole ordered log; per user rank all items after everything "
        "but the last item, which is the target (HR@k, NDCG@k over all users)",
    )
    evaluate.add_argument(
        "--blend-weight",
        type=float,
        help="generator weight in blend (default: the bundle's tuned one)",
    )
    evaluate.add_argument(
        "--weights",
        help="mixture weights to evaluate instead of the tuned ones, e.g. 'lowrank=1' "
        "(for reports: each scorer alone; choices are made on validation at training)",
    )
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser(
        "export-feedback", help="write the feedback log not yet exported to a CSV for training"
    )
    export.add_argument("--out", required=True, type=Path, help="CSV file to write")
    _add_redis_arguments(export)
    export.add_argument(
        "--no-trim",
        action="store_true",
        help="keep exported entries in the stream (default: trim them)",
    )
    export.set_defaults(func=cmd_export_feedback)

    # (#13) online metrics
    report = sub.add_parser(
        "report", help="per-variant impressions, CTR and conversions from the online logs"
    )
    _add_redis_arguments(report)
    report.add_argument(
        "--feedback", type=Path, action="append",
        help="also read exported feedback (CSV of export-feedback); repeat for several",
    )  # fmt: skip
    report.add_argument(
        "--window-s", type=int, help="attribution window [RECSVC_ATTRIBUTION_WINDOW_S=86400]"
    )
    report.add_argument("--since-hours", type=float, help="only impressions of the last hours")
    report.add_argument("--bucket-s", type=float, default=3600, help="time bucket (default 1 h)")
    report.add_argument("--control", help="variant the others are tested against "
                        "(default: control, else default, else the first by name)")  # fmt: skip
    report.add_argument("--click-types", default="click", help="event types that count as a click")
    report.add_argument(
        "--conversion-types", default="purchase", help="event types that count as a conversion"
    )
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.add_argument("--plot", type=Path, help="write CTR over time per variant to this PNG")
    report.set_defaults(func=cmd_report)

    # #12: format v1 -> v2
    migrate = sub.add_parser(
        "migrate", help="move format v1 user state and feedback log to format v2"
    )
    _add_redis_arguments(migrate)
    migrate.set_defaults(func=cmd_migrate)
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
