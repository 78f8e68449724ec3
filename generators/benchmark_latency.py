"""Batch-1 serving latency of the generator runtime on a Gowalla-sized model.

Random weights (latency does not depend on training): 40,981 items, hidden 600, latent 200.
Measures with ``timeit`` (best and median of several repeats, per call):

- ``update_state``: one feedback event applied to the encoder state;
- ``latent_from_state``: state -> mu;
- ``encode_full`` for a 27-item (Gowalla mean) and a 500-item history;
- ``scores``: mu -> logits over the whole catalogue (the decode);
- ``top_items`` k=20 and ``sample_items`` n=20 (diversity 0 and 1) including the decode.

Run from the repository root::

    python -m generators.benchmark_latency --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import timeit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1, help="BLAS / torch threads")
    ap.add_argument("--items", type=int, default=40981)
    ap.add_argument("--hidden", type=int, default=600)
    ap.add_argument("--latent", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    ap.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time.process_time (robust to other processes on a shared machine)",
    )
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from .sampling import sample_items, scores, top_items
    from .vae import GeneratorRuntime, MultVAE, encode_full, latent_from_state, update_state

    torch.manual_seed(0)
    model = MultVAE(args.items, hidden=args.hidden, latent=args.latent)
    rt = GeneratorRuntime.from_model(model)
    rng = np.random.default_rng(0)
    hist27 = rng.choice(args.items, 27, replace=False)
    hist500 = rng.choice(args.items, 500, replace=False)
    state, mu = encode_full(rt, hist27)
    items = rng.integers(0, args.items, 10_000)
    it = iter(range(10**12))

    def one_update() -> None:
        i = items[next(it) % items.shape[0]]
        update_state(rt, state, int(i), 0.0, 1.0, inplace=True)

    def update_and_latent() -> None:
        one_update()
        latent_from_state(rt, state)

    cases = {
        "update_state (1 event)": (one_update, 20000),
        "latent_from_state": (lambda: latent_from_state(rt, state), 5000),
        "update_state + latent_from_state": (update_and_latent, 5000),
        "encode_full (27 items)": (lambda: encode_full(rt, hist27), 2000),
        "encode_full (500 items)": (lambda: encode_full(rt, hist500), 200),
        "scores (decode mu -> 40,981 logits)": (lambda: scores(rt, mu), 50),
        "top_items k=20 (decode + exclude + top-k)": (
            lambda: top_items(rt, mu, 20, exclude=hist27),
            50,
        ),
        "sample_items n=20, diversity=0": (
            lambda: sample_items(rt, mu, 20, 1.0, seed=1, exclude=hist27),
            50,
        ),
        "sample_items n=20, diversity=1": (
            lambda: sample_items(rt, mu, 20, 1.0, seed=1, exclude=hist27, diversity=1.0),
            50,
        ),
    }
    summary = {}
    print(
        f"model: {args.items} items, hidden {args.hidden}, latent {args.latent}; "
        f"threads {args.threads}; timer {args.timer}; "
        f"python {sys.version.split()[0]}, numpy {np.__version__}"
    )
    for name, (fn, number) in cases.items():
        fn()  # warm up
        timer = time.process_time if args.timer == "cpu" else time.perf_counter
        runs = timeit.repeat(fn, number=number, repeat=args.repeat, timer=timer)
        times = [t / number for t in runs]
        best, med = min(times), statistics.median(times)
        summary[name] = {"best_us": best * 1e6, "median_us": med * 1e6}
        print(f"{name:45s} best {best * 1e6:10.1f} us   median {med * 1e6:10.1f} us")
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
