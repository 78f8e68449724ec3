"""Several `recsvc serve` instances on one Redis (or one Redis Cluster): #12.

    python benchmarks/replicas.py --model DIR [--samples 300] [--rounds 2] [--cluster]
        [--freshness-only]

In one run, on this machine:
1. freshness within one instance, and across two (feedback acknowledged by
   instance A, then Recommend on instance B until it reflects it), alternated
   ``--rounds`` times, ``--samples`` fresh users each: p50 / p99, and how many
   samples the first Recommend after the ack already reflected;
2. a model reload rolled across both instances (ReloadModel on A, then on B)
   under closed-loop Recommend load spread over both: failed calls;
3. the per-process state cache's worth: closed loop (32 in flight, Recommend
   k=20) on an instance with the cache and on one without
   (RECSVC_STATE_CACHE_ITEMS=0, as on a cluster), alternated: rps and CPU.
``--cluster`` runs all of it on a local 3+3 Redis Cluster (tests/cluster.py,
AOF with appendfsync always on every node, as on the embedded Redis).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving_load import cpu_seconds, loadtest, start  # noqa: E402

from recsvc.store import EmbeddedRedis  # noqa: E402
from recsvc.v1 import recommender_pb2 as pb  # noqa: E402
from recsvc.v1 import recommender_pb2_grpc as pb_grpc  # noqa: E402


def serve(model: Path, port: int, url: str, cluster: bool, work: Path, **env: str):
    environ = {**os.environ, "RECSVC_MODEL_WATCH_S": "0", **env}
    cmd = [sys.executable, "-m", "recsvc", "serve", "--model", str(model), "--port", str(port),
           "--host", "127.0.0.1", "--redis-url", url, *(["--redis-cluster"] if cluster else [])]
    return start(cmd, work / f"serve-{port}.log", "serving on port", environ)


def freshness(target: str, model: Path, samples: int) -> dict:
    report = loadtest("freshness", "--target", target, "--samples", str(samples),
                      "--users-from", str(model))  # fmt: skip
    return report["freshness"]


def rolling_reload(a: str, b: str, model: Path) -> dict:
    """Closed loop over both instances while each reloads its model in turn."""
    result: dict = {}

    def load() -> None:
        result["report"] = loadtest("run", "--target", f"{a},{b}", "--concurrency", "16",
                                    "--duration", "10", "--mix", "recommend=1",
                                    "--users-from", str(model), "--channels", "4")  # fmt: skip

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(3)
    versions = []
    for target in (a, b):
        with grpc.insecure_channel(target) as channel:
            info = pb_grpc.RecommenderStub(channel).ReloadModel(
                pb.ReloadModelRequest(), timeout=120
            )
            versions.append(info.model_version)
        time.sleep(1)
    thread.join()
    report = result["report"]
    return {"requests": report["requests"], "errors": report["errors"],
            "errors_by_code": report["errors_by_code"], "reloaded": versions}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--cluster", action="store_true")
    parser.add_argument("--freshness-only", action="store_true", help="only part 1")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recsvc-replicas-"))
    if args.cluster:
        from cluster import LocalCluster

        # durable as the embedded Redis is: AOF fsynced before every reply
        backend = LocalCluster(work / "cluster", appendfsync="always").start()
        url = backend.url
    else:
        backend = EmbeddedRedis(work / "redis", tcp=True).start()
        url = backend.url
    procs = []
    try:
        procs.append(serve(args.model, 50981, url, args.cluster, work))
        procs.append(serve(args.model, 50982, url, args.cluster, work))
        a, b = "127.0.0.1:50981", "127.0.0.1:50982"
        print(f"backend: {'3+3 Redis Cluster' if args.cluster else 'one Redis'}; "
              f"uptime: {os.getloadavg()}")  # fmt: skip
        within, across = [], []
        for _ in range(args.rounds):
            within.append(freshness(a, args.model, args.samples))
            across.append(freshness(f"{a},{b}", args.model, args.samples))
        for name, runs in (("within one instance", within), ("across two instances", across)):
            for f in runs:
                ms = f["freshness_ms"]
                print(f"freshness {name}: p50 {ms['p50']:.2f} ms, p99 {ms['p99']:.2f} ms, "
                      f"reflected on the first Recommend {f['reflected_on_first_poll']}"
                      f"/{f['samples']}, not reflected {f['not_reflected']}, "
                      f"failed {f['failed']}")  # fmt: skip
        if args.freshness_only:
            return
        print("rolling reload under load:", rolling_reload(a, b, args.model))

        procs.append(serve(args.model, 50983, url, args.cluster, work,
                           RECSVC_STATE_CACHE_ITEMS="0"))  # fmt: skip
        calls = ["--concurrency", "32", "--duration", str(args.duration), "--warmup", "1",
                 "--mix", "recommend=1", "--users-from", str(args.model), "--k", "20"]  # fmt: skip
        rps: dict[str, list[float]] = {"cache": [], "no cache": []}
        cpu: dict[str, list[float]] = {"cache": [], "no cache": []}
        for _ in range(args.rounds + 1):
            for name, proc, target in (("cache", procs[0], a), ("no cache", procs[2],
                                                                "127.0.0.1:50983")):
                before = cpu_seconds(proc.pid).get("server", 0.0)
                redis_before = _redis_cpu(backend)
                report = loadtest("run", "--target", target, *calls)
                n = report["requests"] + report["warmup_requests"]
                server_us = (cpu_seconds(proc.pid)["server"] - before) / n * 1e6
                redis_us = (_redis_cpu(backend) - redis_before) / n * 1e6
                rps[name].append(report["ok_throughput_rps"])
                cpu[name].append(server_us + redis_us)
                print(f"  {name}: {report['ok_throughput_rps']:.0f} rps, p50 "
                      f"{report['latency_ms']['p50']:.2f} ms, server {server_us:.0f} us + "
                      f"Redis {redis_us:.0f} us CPU per call")  # fmt: skip
        for name in rps:
            print(f"closed loop, 32 in flight, {name}: median {statistics.median(rps[name]):.0f}"
                  f" rps, {statistics.median(cpu[name]):.0f} us CPU per call (server + Redis)")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        backend.stop()


def _redis_cpu(backend) -> float:  # type: ignore[no-untyped-def]
    """CPU seconds of the Redis process(es) so far."""
    pids = ([p.pid for p in backend.processes.values() if p.poll() is None]
            if hasattr(backend, "processes") else [backend.process.pid])  # fmt: skip
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


if __name__ == "__main__":
    main()
