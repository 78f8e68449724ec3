"""Acknowledged feedback is never lost nor counted twice: kill -9, Redis outages,
backpressure, duplicates and out-of-order events, against real processes."""

import threading
import time

import grpc
import pytest
import redis
from helpers import log_entries, start_serving, wait_for

from recsvc.store import EmbeddedRedis, connect_sync, user_keys
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

N_USERS = 50


def make_event(i):
    return pb.FeedbackEvent(
        event_id=f"ev-{i}", user_id=f"user-{i % N_USERS}", item_id=f"a{i % 7}", type=pb.CLICK
    )


class Streamer(threading.Thread):
    """Streams events as fast as gRPC takes them; records every id an ack names."""

    def __init__(self, stub, events, pause_every=0):
        super().__init__(daemon=True)
        self.stub, self.events, self.pause_every = stub, events, pause_every
        self.acked: list[str] = []
        self.duplicates: list[str] = []
        self.sent = 0
        self.error: grpc.RpcError | None = None

    def _produce(self):
        for event in self.events:
            self.sent += 1
            if self.pause_every and self.sent % self.pause_every == 0:
                time.sleep(0.001)
            yield event

    def run(self):
        try:
            for ack in self.stub.StreamFeedback(self._produce()):
                self.acked.extend(ack.event_ids)
                self.duplicates.extend(ack.duplicate_event_ids)
        except grpc.RpcError as exc:
            self.error = exc


def logged_event_ids(url, cluster=False):
    with connect_sync(url, cluster) as client:
        return [f[b"event_id"].decode() for _, f in log_entries(client)]


def total_event_count(url):
    with redis.Redis.from_url(url) as client:
        return sum(
            int(client.hget(user_keys(f"user-{u}")[3], "events") or 0) for u in range(N_USERS)
        )


def history_weight_sum(url):
    with redis.Redis.from_url(url) as client:
        return sum(
            float(w) for u in range(N_USERS) for w in client.hvals(user_keys(f"user-{u}")[0])
        )


def test_kill_9_during_a_stream_loses_no_acked_event_and_counts_none_twice(tmp_path, model_dir):
    data_dir = tmp_path / "data"
    events = [make_event(i) for i in range(20_000)]
    proc, port = start_serving(model_dir, data_dir, tmp_path / "a.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    streamer = Streamer(pb_grpc.RecommenderStub(channel), events, pause_every=200)
    streamer.start()
    assert wait_for(lambda: len(streamer.acked) >= 2000, timeout_s=30), streamer.error
    proc.kill()  # SIGKILL mid-stream
    proc.wait()
    streamer.join(10)
    channel.close()
    assert streamer.error is not None and streamer.error.code() == grpc.StatusCode.UNAVAILABLE
    acked = set(streamer.acked)
    assert len(acked) < len(events), "the stream finished before the kill; nothing was tested"

    proc, port = start_serving(model_dir, data_dir, tmp_path / "b.log")
    try:
        url = f"unix://{data_dir / 'redis.sock'}"
        logged = logged_event_ids(url)
        assert acked <= set(logged), "an acknowledged event was lost"
        assert len(logged) == len(set(logged)), "an event was logged twice"
        assert total_event_count(url) == len(logged)  # state and log agree exactly

        # the client resends everything it has no ack for (and, to be sure, all the rest)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            resend = Streamer(pb_grpc.RecommenderStub(channel), events)
            resend.run()
        assert resend.error is None
        assert set(resend.acked) == {e.event_id for e in events}
        assert set(resend.duplicates) == set(logged)
        logged = logged_event_ids(url)
        assert sorted(logged) == sorted(e.event_id for e in events)
        assert total_event_count(url) == len(events)
        assert history_weight_sum(url) == pytest.approx(2.0 * len(events))  # CLICK weighs 2
    finally:
        proc.terminate()
        proc.wait(30)


def test_redis_killed_and_restarted_during_a_stream(make_server, tmp_path):
    own_redis = EmbeddedRedis(tmp_path / "r").start()
    try:
        # 1 s: an fsync can stall for a few hundred ms while the disk flushes other writes
        # (in CI, the packages just installed); a kill is seen at once (the socket closes)
        server = make_server(redis_url=own_redis.url, redis_timeout_s=1.0)
        events = [make_event(i) for i in range(20_000)]
        streamer = Streamer(server.stub, events, pause_every=200)
        streamer.start()
        assert wait_for(lambda: len(streamer.acked) >= 1000, timeout_s=30)
        own_redis.kill()  # SIGKILL: only what reached the AOF survives
        streamer.join(15)
        assert streamer.error is not None
        assert streamer.error.code() == grpc.StatusCode.UNAVAILABLE
        acked = set(streamer.acked)

        # while Redis is down: UNAVAILABLE for new streams too, never an ack
        with pytest.raises(grpc.RpcError) as info:
            list(server.stub.StreamFeedback(iter(events[:5])))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        own_redis.start()
        logged = logged_event_ids(own_redis.url)
        assert acked <= set(logged) and len(logged) == len(set(logged))

        # the service recovers by itself: the client's retry goes through
        def retry_succeeds():
            resend = Streamer(server.stub, events)
            resend.run()
            return resend.error is None

        assert wait_for(retry_succeeds, timeout_s=10, interval_s=0.2)
        assert sorted(logged_event_ids(own_redis.url)) == sorted(e.event_id for e in events)
        assert total_event_count(own_redis.url) == len(events)
    finally:
        own_redis.stop()


def test_backpressure_slows_a_fast_client_and_drops_nothing(make_server, redis_url):
    # a slow Redis (not a dead one: the timeout outlasts the pause) means backpressure
    # (the timeout outlasts the 20 s wait below: on a busy machine the wait takes longer)
    server = make_server(stream_buffer=50, stream_batch=25, redis_timeout_s=25)
    events = [make_event(i) for i in range(60_000)]
    for event in events:  # ~20 MB in all: more than gRPC's flow-control window can hold
        event.recommendation_id = "r" * 250
    with redis.Redis.from_url(redis_url) as admin:
        admin.execute_command("CLIENT", "PAUSE", "30000", "WRITE")  # Redis stops taking writes
        streamer = Streamer(server.stub, events)
        streamer.start()
        # the server stops reading: flow control holds the client where the buffers
        # (the server's queue of stream_buffer events plus the HTTP/2 window) are full;
        # wait until it has sent nothing for a second (filling them takes ~1 s, more
        # on a busy machine)
        readings = [-2, -1]
        deadline = time.monotonic() + 20
        while readings[-1] != readings[-2] and time.monotonic() < deadline:
            time.sleep(1.0)
            readings.append(streamer.sent)
        acked_while_paused = len(streamer.acked)
        admin.execute_command("CLIENT", "UNPAUSE")
    assert acked_while_paused == 0
    assert readings[-1] == readings[-2] < len(events), readings
    streamer.join(300)  # 60,000 events: seconds alone, minutes on a loaded machine
    assert not streamer.is_alive() and streamer.error is None
    assert sorted(streamer.acked) == sorted(e.event_id for e in events)
    assert len(logged_event_ids(redis_url)) == len(events)


def test_duplicates_and_out_of_order_events(make_server, any_redis):
    server = make_server(redis_url=any_redis[0], redis_cluster=any_redis[1])
    base = (int(time.time()) - 3600) * 1000  # timestamps must lie near now

    def at(event_id, ms, item="a1"):
        event = pb.FeedbackEvent(event_id=event_id, user_id="ooo", item_id=item, type=pb.CLICK)
        event.timestamp.FromMilliseconds(base + ms)
        return event

    events = [at("late", 3_000), at("early", 1_000), at("late", 3_000), at("mid", 2_000, "a2")]
    acks = list(server.stub.StreamFeedback(iter(events)))
    assert [e for a in acks for e in a.duplicate_event_ids] == ["late"]
    state = server.stub.GetUserState(pb.GetUserStateRequest(user_id="ooo"))
    assert [(h.item_id, h.weight, h.last_event.ToMilliseconds()) for h in state.history] == [
        ("a1", 4.0, base + 3_000),  # the latest time wins whatever the arrival order
        ("a2", 2.0, base + 2_000),
    ]
    assert state.event_count == 3
    assert logged_event_ids(*any_redis) == ["late", "early", "mid"]
