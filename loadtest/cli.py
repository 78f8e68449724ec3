"""Command line: python -m loadtest {run,stream,freshness,merge,empty-server,simulate} ..."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from recsvc import aio

from .common import UsageError, check_target, configure_channels, install_stop_signals

DEFAULT_MIX = "recommend=0.8,similar=0.1,feedback=0.1"


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s}")
    return v


def _add_common(p: argparse.ArgumentParser, ids: bool = True) -> None:
    p.add_argument(
        "--target",
        required=True,
        metavar="HOST:PORT",
        help="the server, or several comma-separated (calls spread over them; freshness "
        "sends feedback to one and reads from the next) (loopback only, unless --allow-remote)",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a target that is not 127.0.0.1/::1/localhost",
    )
    # issue #14: servers run with --tls-cert / --auth-tokens
    p.add_argument("--tls-ca", metavar="PEM", help="TLS: trust this CA (the server's chain)")
    p.add_argument("--tls-cert", metavar="PEM", help="mutual TLS: client certificate")
    p.add_argument("--tls-key", metavar="PEM", help="mutual TLS: client key")
    p.add_argument("--tls-server-name", metavar="NAME", help="TLS: name the certificate carries")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer token to send (the file holds the token alone; else RECSVC_TOKEN)",
    )
    if ids:
        g = p.add_argument_group("ids (default: synthetic Zipf ids u0.. / i0..)")
        g.add_argument(
            "--users-from",
            metavar="MODEL_DIR|FILE",
            help="model bundle dir (users.txt, items.txt, popularity.npy) or an "
            "interaction file (CSV/TSV with user_id,item_id header, or "
            "'user item item ...' lines; .gz ok)",
        )
        g.add_argument("--zipf-users", type=int, default=100_000, metavar="N")
        g.add_argument("--zipf-items", type=int, default=20_000, metavar="M")
        g.add_argument(
            "--zipf-s",
            type=float,
            default=1.1,
            metavar="S",
            help="Zipf exponent (synthetic ids, and users of a model dir)",
        )
    p.add_argument("--seed", type=int, default=None, help="random seed (ids, mix)")
    p.add_argument("--report", metavar="OUT.json", help="write the JSON report here")
    p.add_argument(
        "--plot",
        metavar="OUT.png",
        help="write a PNG: latency over time, throughput, latency histogram",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no live progress line")
    p.add_argument(
        "--fail-on-error",
        action="store_true",
        help="exit 1 if any call failed (and, for stream, any event went unacked; "
        "for freshness, any sample was not reflected)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load tests for the recsvc Recommender gRPC service.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run",
        help="unary RPC load, closed or open loop",
        description="Load with Recommend/SimilarItems/SendFeedback/GetUserState.",
    )
    _add_common(p)
    p.add_argument(
        "--duration",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="measured seconds (after --warmup)",
    )
    loop = p.add_mutually_exclusive_group(required=True)
    loop.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="closed loop: N workers issuing back-to-back calls",
    )
    loop.add_argument(
        "--rate",
        type=_positive_float,
        metavar="R",
        help="open loop: R requests/s at fixed intended send times; latency "
        "counts from the intended time",
    )
    p.add_argument(
        "--mix",
        default=DEFAULT_MIX,
        help=f"call types and weights: recommend, similar, feedback, user_state, generate "
        f"(default {DEFAULT_MIX})",
    )
    p.add_argument("--k", type=int, default=20, help="k for Recommend/SimilarItems")
    p.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds of load before measuring (not in the report)",
    )
    p.add_argument(
        "--timeout", type=_positive_float, default=5.0, metavar="S", help="per-call deadline"
    )
    p.add_argument(
        "--channels",
        type=int,
        default=2,
        help="gRPC channels (one TCP connection each), used round-robin",
    )
    p.add_argument(
        "--max-outstanding",
        type=int,
        default=2000,
        metavar="N",
        help="open loop: cap on calls in flight",
    )
    p.add_argument(
        "--on-cap",
        choices=("wait", "drop"),
        default="wait",
        help="open loop, cap hit: wait for a slot (sent late, latency still from "
        "the intended time) or drop the request (counted)",
    )
    p.add_argument(
        "--late-ms",
        type=float,
        default=10.0,
        help="open loop: a send this much after its intended time counts as late",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=None,
        metavar="N",
        help="stop after N calls (in addition to --duration)",
    )
    p.add_argument(
        "--feedback-batch", type=int, default=1, metavar="N", help="events per SendFeedback call"
    )
    p.add_argument(
        "--no-backoff",
        action="store_true",
        help="closed loop: resend at once after RESOURCE_EXHAUSTED (default: a worker "
        "waits the server's retry-after-ms hint, at most 1 s, as a well-behaved client)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "stream",
        help="concurrent StreamFeedback streams",
        description="Many StreamFeedback streams at a total event rate; "
        "ack latency, acked/duplicate/rejected/unacked events.",
    )
    _add_common(p)
    p.add_argument("--streams", type=int, default=8, metavar="N")
    p.add_argument(
        "--rate",
        type=_positive_float,
        required=True,
        metavar="EVENTS_PER_S",
        help="total events/s over all streams",
    )
    p.add_argument("--duration", type=_positive_float, default=10.0, metavar="S")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="after the last event, how long to wait for outstanding acks",
    )
    p.add_argument(
        "--resend-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="resend this fraction of already-acked events (expect duplicates)",
    )
    p.add_argument(
        "--malformed-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="send this fraction of malformed events (expect rejections)",
    )
    p.add_argument("--late-ms", type=float, default=10.0)
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="N",
        help="events per message: above 1, StreamFeedbackBatches with N events a message "
        "(an event waits for its batch to fill: that wait counts in its ack latency)",
    )
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser(
        "freshness",
        help="time from feedback to recommendations reflecting it",
        description="For fresh users: SendFeedback (PURCHASE), then poll "
        "Recommend until the list reflects it.",
    )
    _add_common(p)
    p.add_argument("--samples", type=int, default=100, metavar="N")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="samples in parallel")
    p.add_argument("--k", type=int, default=20)
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="per sample: give up (not reflected) after this long",
    )
    p.add_argument(
        "--poll-interval-ms", type=float, default=0.0, help="pause between polls (0: back to back)"
    )
    p.add_argument(
        "--max-time",
        type=_positive_float,
        default=120.0,
        metavar="S",
        help="start no new sample after this long",
    )
    p.add_argument(
        "--criterion",
        choices=("auto", "personalized", "changed"),
        default="auto",
        help="what counts as reflected (auto: personalized flips or list changes)",
    )
    p.set_defaults(func=cmd_freshness)

    p = sub.add_parser(
        "merge",
        help="merge the JSON reports of several run processes",
        description="Combine reports of concurrent `run` client processes: counts add up, "
        "percentiles come from the merged histograms.",
    )
    p.add_argument("reports", nargs="+", metavar="REPORT.json")
    p.add_argument("--report", metavar="OUT.json", help="write the merged JSON report here")
    p.add_argument("--plot", metavar="OUT.png", help="write the PNG for the merged report")
    p.add_argument("--fail-on-error", action="store_true")
    p.set_defaults(func=cmd_merge)

    # (#13) simulated users who respond
    p = sub.add_parser(
        "simulate",
        help="simulated users who click held-out items: online CTR per variant over rounds",
        description="Users whose true preferences (a held-out test split) the server never "
        "sees ask for lists, click shown held-out items with position bias, send the clicks "
        "back with the recommendation_id, and come back; CTR per variant and round.",
    )
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--allow-remote", action="store_true")
    p.add_argument("--test", required=True, type=Path, help="held-out split ('user item ...')")
    p.add_argument("--users", type=int, default=2000, help="simulated users (a random sample)")
    p.add_argument("--rounds", type=int, default=10, help="visits per user")
    p.add_argument("--k", type=int, default=20)
    p.add_argument(
        "--position-bias", type=float, default=1.0,
        help="a shown held-out item at position p is clicked with probability 1/(1+p)^BIAS",
    )  # fmt: skip
    p.add_argument(
        "--variants", default="",
        help="comma-separated variants to override per user (user i: variant i mod n); "
        "default: the server's assignment",
    )  # fmt: skip
    p.add_argument("--concurrency", type=int, default=16, help="users in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", metavar="OUT.json", help="write the JSON report here")
    p.add_argument("--plot", metavar="OUT.png", help="write CTR per variant per round (PNG)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "empty-server",
        help="a do-nothing Recommender server (the gRPC ceiling)",
        description="Responses of realistic size, no work.",
    )
    p.add_argument("--port", type=int, default=50999)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--errors",
        default=None,
        metavar="CODE=F,...",
        help="fail that fraction of unary calls with that status, e.g. "
        "INVALID_ARGUMENT=0.05,RESOURCE_EXHAUSTED=0.05",
    )
    p.add_argument("--delay-ms", type=float, default=0.0, help="sleep this long in every call")
    p.add_argument(
        "--reflect-feedback",
        action="store_true",
        help="users with feedback get personalized lists (for the freshness mode)",
    )
    p.add_argument("--reflect-lag-ms", type=float, default=0.0)
    p.add_argument(
        "--stream-drop-fraction",
        type=float,
        default=0.0,
        help="never ack this fraction of streamed events",
    )
    p.set_defaults(func=cmd_empty_server)
    return ap


# -- commands -------------------------------------------------------------------------


def _ids(args):
    from .ids import load_ids

    return load_ids(args.users_from, args.zipf_users, args.zipf_items, args.zipf_s, _rng(args.seed))


def _rng(seed):
    import numpy as np

    return np.random.default_rng(seed)


def _execute(coro_factory, args) -> dict:
    async def main():
        stop = asyncio.Event()
        install_stop_signals(stop)
        return await coro_factory(stop)

    return aio.run(main())


def _finish(report: dict, args, failed: bool) -> int:
    from .report import print_summary, write_json, write_plot

    print_summary(report)
    if args.report:
        write_json(report, args.report)
        print(f"report: {args.report}", file=sys.stderr)
    if args.plot:
        write_plot(report, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 1 if (args.fail_on_error and failed) else 0


def cmd_run(args) -> int:
    from .run import RunConfig, parse_mix, run_load

    cfg = RunConfig(
        target=check_target(args.target, args.allow_remote),
        duration=args.duration,
        concurrency=args.concurrency,
        rate=args.rate,
        mix=parse_mix(args.mix),
        k=args.k,
        warmup=args.warmup,
        timeout=args.timeout,
        channels=args.channels,
        max_outstanding=args.max_outstanding,
        on_cap=args.on_cap,
        late_ms=args.late_ms,
        max_requests=args.max_requests,
        feedback_batch=args.feedback_batch,
        backoff=not args.no_backoff,
        seed=args.seed,
        progress=not args.quiet,
    )
    cfg.validate()
    ids = _ids(args)
    report = _execute(lambda stop: run_load(cfg, ids, stop), args)
    ol = report.get("open_loop") or {}
    failed = report["errors"] > 0 or ol.get("dropped", 0) > 0 or ol.get("unsent_at_end", 0) > 0
    return _finish(report, args, failed)


def cmd_stream(args) -> int:
    from .stream import StreamConfig, run_streams

    cfg = StreamConfig(
        target=check_target(args.target, args.allow_remote),
        streams=args.streams,
        rate=args.rate,
        duration=args.duration,
        channels=args.channels,
        drain_timeout=args.drain_timeout,
        resend_fraction=args.resend_fraction,
        malformed_fraction=args.malformed_fraction,
        late_ms=args.late_ms,
        batch=args.batch,
        seed=args.seed,
        progress=not args.quiet,
    )
    cfg.validate()
    ids = _ids(args)
    report = _execute(lambda stop: run_streams(cfg, ids, stop), args)
    failed = report["errors"] > 0 or report["events"]["unacked"] > 0
    return _finish(report, args, failed)


def cmd_freshness(args) -> int:
    from .freshness import FreshnessConfig, run_freshness

    cfg = FreshnessConfig(
        target=check_target(args.target, args.allow_remote),
        samples=args.samples,
        concurrency=args.concurrency,
        k=args.k,
        timeout=args.timeout,
        poll_interval_ms=args.poll_interval_ms,
        max_time=args.max_time,
        criterion=args.criterion,
        seed=args.seed,
        progress=not args.quiet,
    )
    cfg.validate()
    ids = _ids(args)
    report = _execute(lambda stop: run_freshness(cfg, ids, stop), args)
    f = report["freshness"]
    failed = report["errors"] > 0 or f["not_reflected"] > 0
    return _finish(report, args, failed)


def cmd_merge(args) -> int:
    from .merge import load_reports, merge_reports

    report = merge_reports(load_reports(args.reports))
    return _finish(report, args, report["errors"] > 0)


def cmd_empty_server(args) -> int:
    from .empty_server import main as empty_main

    return empty_main(args)


def cmd_simulate(args) -> int:
    from .report import write_json
    from .simulate import SimulateConfig, format_simulation, plot_simulation, simulate

    cfg = SimulateConfig(
        target=check_target(args.target, args.allow_remote),
        test=args.test,
        users=args.users,
        rounds=args.rounds,
        k=args.k,
        bias=args.position_bias,
        variants=[v for v in args.variants.split(",") if v],
        concurrency=args.concurrency,
        seed=args.seed,
    )
    report = _execute(lambda stop: simulate(cfg, stop), args)
    print(format_simulation(report))
    if args.report:
        write_json(report, args.report)
    if args.plot:
        plot_simulation(report, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "tls_ca"):
            token = os.environ.get("RECSVC_TOKEN")
            if args.token_file:
                token = Path(args.token_file).read_text().strip()
            configure_channels(
                args.tls_ca, args.tls_cert, args.tls_key, token, args.tls_server_name
            )
        return args.func(args)
    except UsageError as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. a bad --errors spec for empty-server
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    finally:
        configure_channels()  # plaintext, no token: for whoever opens channels next in-process
