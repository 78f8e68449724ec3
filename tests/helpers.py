"""Helpers shared by the test modules (importable: pytest puts tests/ on sys.path)."""

import os
import signal
import subprocess
import sys
import time


def wait_for(predicate, timeout_s=5.0, interval_s=0.02):
    """Poll ``predicate`` until it is true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def recsvc(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recsvc.cli", *args], **kwargs)


def start_serving(model, data_dir, log_path, *extra):
    log = open(log_path, "w")
    proc = recsvc("serve", "--model", str(model), "--port", "0", "--host", "127.0.0.1",
                  "--data-dir", str(data_dir), *extra, stderr=log)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log_path.read_text()
        for marker in ("serving on port ", "workers on port "):
            if marker in text:
                return proc, int(text.split(marker)[1].split('"')[0].split()[0])
        assert proc.poll() is None, text
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(log_path.read_text())


def stop_serving(proc, log_path, timeout_s=60):
    """SIGTERM, then the exit code; on a hang, kill it and fail with its log."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        text = log_path.read_text()
        raise AssertionError(f"did not stop within {timeout_s} s:\n{text}") from None


def redis_pid(data_dir):
    return int((data_dir / "redis.pid").read_text())


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def log_entries(client):
    """Every feedback log entry (all shards), oldest first: [(entry id, fields)]."""
    from recsvc.store import feedback_streams

    with client.pipeline(transaction=False) as pipe:
        for stream in feedback_streams():
            pipe.xrange(stream)
        shards = pipe.execute()
    entries = [entry for shard in shards for entry in shard]
    return sorted(entries, key=lambda e: tuple(map(int, e[0].split(b"-"))))


def log_length(client):
    return len(log_entries(client))
