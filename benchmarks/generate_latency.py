"""Generate latency in process: Engine.generate against the embedded Redis.

    python benchmarks/generate_latency.py --model DIR [--users 100] [--repeats 3]

One thread, one call at a time; each user is called once to warm up (their
per-user state is then cached), then ``--repeats`` times. Prints p50 and p90.
Run it from two checkouts alternately (``cd CHECKOUT && PYTHONPATH=$PWD ...``)
to compare code side by side on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from recsvc.config import Settings
from recsvc.engine import Engine, load_model
from recsvc.store import EmbeddedRedis, UserStore


async def measure(model: Path, users: int, repeats: int, n: int) -> list[float]:
    with EmbeddedRedis(tempfile.mkdtemp(prefix="recsvc-genlat-")) as redis_server:
        store = UserStore.from_url(redis_server.url)
        engine = Engine(load_model(model), store, Settings())
        ids = engine.model.users.ids[:users]
        for user in ids:
            await engine.generate(user, n, seed=1)
        times = []
        for _ in range(repeats):
            for user in ids:
                start = time.perf_counter()
                await engine.generate(user, n, seed=1)
                times.append((time.perf_counter() - start) * 1000)
        await store.close()
        return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    threadpool_limits(1)
    times = asyncio.run(measure(args.model, args.users, args.repeats, args.n))
    p50, p90 = np.percentile(times, [50, 90])
    print(f"in-process Engine.generate n={args.n}: p50 {p50:.3f} ms  p90 {p90:.3f} ms "
          f"(n={len(times)})")  # fmt: skip


if __name__ == "__main__":
    main()
