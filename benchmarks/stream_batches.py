"""The feedback firehose: StreamFeedback (one event a message) against
StreamFeedbackBatches (a batch a message), on recsvc and on the empty server.

    python benchmarks/stream_batches.py --model MODEL_DIR [--rate 40000] [--streams 8]
        [--batch 100] [--duration 8] [--rounds 3]

One run, this machine: the bundled empty server (same messages, nothing stored: the
ceiling of Python gRPC here) and `recsvc serve --model MODEL_DIR` (embedded Redis,
`appendfsync always`, so every ack is durable), alternating per round over the four
(server, RPC) pairs. Prints acked events/s of each run, their medians, and the ack
latency; the load client shares the cores with the server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import loadtest, start  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rate", type=int, default=40_000, help="offered events/s in all")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100, help="events per batched message")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recsvc-stream-"))
    env = {**os.environ, "RECSVC_MODEL_WATCH_S": "0"}
    empty = start([sys.executable, "-m", "loadtest", "empty-server", "--port", "50987"],
                  work / "empty.log", "50987")  # fmt: skip
    server = start([sys.executable, "-m", "recsvc.cli", "serve", "--model", str(args.model),
                    "--port", "50986", "--host", "127.0.0.1", "--data-dir", str(work / "data")],
                   work / "serve.log", "serving on port", env)  # fmt: skip
    runs = {(s, b): [] for s in ("empty", "recsvc") for b in (1, args.batch)}
    try:
        for _ in range(args.rounds):
            for (name, batch), results in runs.items():
                port = "50987" if name == "empty" else "50986"
                results.append(loadtest(
                    "stream", "--target", f"127.0.0.1:{port}", "--streams", str(args.streams),
                    "--rate", str(args.rate), "--duration", str(args.duration),
                    "--batch", str(batch), "--users-from", str(args.model),
                ))  # fmt: skip
    finally:
        for proc in (empty, server):
            proc.terminate()
            proc.wait(60)
    print(f"{args.streams} streams, offered {args.rate} events/s, {args.rounds} alternating "
          f"rounds of {args.duration:.0f} s")  # fmt: skip
    medians = {}
    for (name, batch), results in runs.items():
        acked = [r["events"]["acked_per_s"] for r in results]
        unacked = [r["events"]["unacked"] for r in results]
        p99 = [r["latency_ms"]["p99"] for r in results]
        rpc = "StreamFeedback" if batch == 1 else f"StreamFeedbackBatches (batch {batch})"
        medians[name, batch] = statistics.median(acked)
        print(f"  {name:6s} {rpc:36s} acked/s {[round(a) for a in acked]} "
              f"median {medians[name, batch]:.0f}; unacked {unacked}; "
              f"ack p99 ms median {statistics.median(p99):.1f}")  # fmt: skip
    for name in ("empty", "recsvc"):
        print(
            f"  {name}: batches / single events = "
            f"{medians[name, args.batch] / max(medians[name, 1], 1e-9):.2f}"
        )
    for batch in (1, args.batch):
        print(
            f"  batch {batch}: recsvc / empty = "
            f"{medians['recsvc', batch] / max(medians['empty', batch], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
