"""The server restarts the embedded Redis it owns when that process dies, from
its AOF: health returns to SERVING and no acknowledged event is lost."""

import os
import signal
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import alive, redis_pid, wait_for
from test_durability import Streamer, logged_event_ids, make_event, total_event_count

from recsvc.store import EmbeddedRedis
from recsvc.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING


def health(server):
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="recsvc.v1.Recommender")).status


def send_until_all_acked(stub, events, acked, timeout_s=30.0):
    """What a client does: resend what was not acked (same ids) until all is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rest = [e for e in events if e.event_id not in acked]
        if not rest:
            return True
        streamer = Streamer(stub, rest)
        streamer.run()
        acked.update(streamer.acked)
        if streamer.error is not None:
            assert streamer.error.code() == grpc.StatusCode.UNAVAILABLE, streamer.error
            time.sleep(0.1)
    return False


def test_sigkill_of_the_embedded_redis_under_a_stream(make_server, tmp_path):
    data_dir = tmp_path / "data"
    server = make_server(redis_url=None, data_dir=data_dir, redis_timeout_s=1.0)
    assert health(server) == SERVING
    events = [make_event(i) for i in range(20_000)]
    streamer = Streamer(server.stub, events, pause_every=200)
    streamer.start()
    assert wait_for(lambda: len(streamer.acked) >= 1000, timeout_s=30)
    pid = redis_pid(data_dir)
    os.kill(pid, signal.SIGKILL)  # the real process, as the OOM killer would
    killed_at = time.monotonic()
    streamer.join(15)
    assert not alive(pid)
    assert len(streamer.acked) < len(events), "the stream finished before the kill"
    assert streamer.error is not None and streamer.error.code() == grpc.StatusCode.UNAVAILABLE

    # nothing restarts it by hand: the server does, says so in its health, takes writes
    embedded = server.server.embedded_redis
    probe = pb.SendFeedbackRequest(events=[make_event(10**6)])

    def recovered():
        if embedded.restarts != 1 or health(server) != SERVING:
            return False
        try:
            return server.stub.SendFeedback(probe).accepted + 1 > 0
        except grpc.RpcError:
            return False

    assert wait_for(recovered, timeout_s=5, interval_s=0.05)
    assert time.monotonic() - killed_at < 5
    assert embedded.process.pid != pid

    url = server.server.embedded_redis.url
    acked = set(streamer.acked)
    logged = logged_event_ids(url)
    assert acked <= set(logged) and len(logged) == len(set(logged))  # from the AOF

    # the client resends what was not acked: every event applied exactly once
    assert send_until_all_acked(server.stub, events, acked)
    everything = [e.event_id for e in events] + [probe.events[0].event_id]
    assert sorted(logged_event_ids(url)) == sorted(everything)
    assert total_event_count(url) == len(everything)
    assert server.stub.Recommend(pb.RecommendRequest(user_id="user-1", k=3)).degraded is False


def test_supervisor_backs_off_and_gives_up_after_its_limit(tmp_path):
    embedded = EmbeddedRedis(tmp_path / "r").start().supervise(max_restarts=2, window_s=60)
    try:
        started = time.monotonic()
        for restarts in (1, 2):
            os.kill(embedded.process.pid, signal.SIGKILL)
            assert wait_for(lambda n=restarts: embedded.restarts == n, timeout_s=5)
            with redis.Redis.from_url(embedded.url) as client:
                assert client.ping()
        assert time.monotonic() - started >= 0.1  # the second restart waited its back-off
        os.kill(embedded.process.pid, signal.SIGKILL)  # the third death is past the limit
        time.sleep(1.0)
        assert embedded.restarts == 2 and embedded.process.poll() is not None
        with pytest.raises(redis.ConnectionError), redis.Redis.from_url(embedded.url) as c:
            c.ping()
    finally:
        embedded.stop()


def test_stop_is_not_mistaken_for_a_crash(tmp_path):
    embedded = EmbeddedRedis(tmp_path / "r").start().supervise()
    pid = embedded.process.pid
    embedded.stop()
    time.sleep(0.3)
    assert embedded.restarts == 0 and embedded.process.pid == pid and not alive(pid)
