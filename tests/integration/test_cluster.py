"""recsvc on a real Redis Cluster (3 primaries, 3 replicas): serving, the sharded
feedback log and its export, a primary killed under a feedback stream, and the
move from format v1."""

import asyncio
import json
import subprocess
import threading
import time

import grpc
import pytest
import redis
from cluster import LocalCluster
from helpers import log_entries, wait_for

from recsvc.cli import main as recsvc_main
from recsvc.store import (
    TRAINER_GROUP,
    EmbeddedRedis,
    StoredEvent,
    StoreUnavailable,
    UserStore,
    connect_sync,
    die_with_parent,
    feedback_stream,
    free_port,
    migrate_v1,
    redis_server_binary,
    shard_of,
    user_keys,
)  # fmt: skip
from recsvc.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration


def click(event_id, user, item):
    return pb.FeedbackEvent(event_id=event_id, user_id=user, item_id=item, type=pb.CLICK)


def test_serving_and_export_on_a_cluster(make_server, cluster_url, redis_cluster, tmp_path):
    server = make_server(redis_url=cluster_url, redis_cluster=True)
    events = [click(f"c{i}", f"shopper-{i % 40}", f"b{i % 7}") for i in range(200)]
    ack = server.stub.SendFeedback(pb.SendFeedbackRequest(events=events))
    assert (ack.accepted, ack.duplicates) == (200, 0)
    again = server.stub.SendFeedback(pb.SendFeedbackRequest(events=events[:10]))
    assert (again.accepted, again.duplicates) == (0, 10)
    state = server.stub.GetUserState(pb.GetUserStateRequest(user_id="shopper-3"))
    assert {e.item_id for e in state.history} == {f"b{i % 7}" for i in range(3, 200, 40)}
    reply = server.stub.Recommend(pb.RecommendRequest(user_id="shopper-3", k=5))
    assert not reply.degraded and reply.items
    # the log is spread over shards on all three primaries
    shards = {shard_of(f"shopper-{u}") for u in range(40)}
    assert len({redis_cluster.primary_of(feedback_stream(s)) for s in shards}) == 3

    client = connect_sync(cluster_url, cluster=True)
    # a previous export read two entries of one shard and crashed before acknowledging
    stream = feedback_stream(shard_of("shopper-0"))
    client.xgroup_create(stream, TRAINER_GROUP, id="0")
    client.xreadgroup(TRAINER_GROUP, "crashed-exporter", {stream: ">"}, count=2)
    out = tmp_path / "fb.csv"
    assert recsvc_main(["export-feedback", "--redis-url", cluster_url, "--redis-cluster",
                        "--out", str(out)]) == 0  # fmt: skip
    exported = out.read_text().splitlines()[1:]
    assert sorted(line.split(",")[5] for line in exported) == sorted(f"c{i}" for i in range(200))
    assert log_entries(client) == []  # every shard trimmed after the ack
    for s in shards:
        assert client.xpending(feedback_stream(s), TRAINER_GROUP)["pending"] == 0
    server.stub.SendFeedback(pb.SendFeedbackRequest(events=[click("late", "shopper-5", "a1")]))
    assert recsvc_main(["export-feedback", "--redis-url", cluster_url, "--redis-cluster",
                        "--out", str(out)]) == 0  # fmt: skip
    assert [line.split(",")[5] for line in out.read_text().splitlines()[1:]] == ["late"]
    client.close()


def test_migrate_moves_v1_state_and_unexported_log(any_redis, make_server, capsys):
    redis_url, cluster = any_redis
    r = connect_sync(redis_url, cluster)
    r.hset("recsvc:v1:user:bob:hist", mapping={"a1": "3", "a2": "-1"})
    r.zadd("recsvc:v1:user:bob:recent", {"a1": 1_700_000_000_000, "a2": 1_700_000_000_001})
    r.zadd("recsvc:v1:user:bob:events", {"old-1": 1, "old-2": 2, "old-3": 3})
    r.hset("recsvc:v1:user:bob:meta", mapping={"updated_ms": "5", "events": "3"})
    r.expire("recsvc:v1:user:bob:hist", 3600)
    fields = {"user_id": "bob", "item_id": "a1", "type": "click", "value": "0.0",
              "weight": "1.0", "ts_ms": "1", "recommendation_id": ""}  # fmt: skip
    for n in range(3):
        r.xadd("recsvc:v1:feedback", {"event_id": f"old-{n + 1}", **fields})
    r.xgroup_create("recsvc:v1:feedback", TRAINER_GROUP, id="0")
    r.xadd("recsvc:v1:impressions", {"d": "[]"}, id="1700000000000-0")
    # old-1 exported and acknowledged, old-2 read by an export that crashed
    ((_, ((first, _),)),) = r.xreadgroup(TRAINER_GROUP, "x", {"recsvc:v1:feedback": ">"}, 1)
    r.xack("recsvc:v1:feedback", TRAINER_GROUP, first)
    r.xreadgroup(TRAINER_GROUP, "x", {"recsvc:v1:feedback": ">"}, 1)

    flags = ["--redis-url", redis_url, *(["--redis-cluster"] if cluster else [])]
    assert recsvc_main(["migrate", *flags]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "keys_moved": 4, "keys_kept": 0, "entries_copied": 2, "entries_skipped": 1,
        "impressions_moved": True}
    assert r.xrange("recsvc:v2:impressions") == [(b"1700000000000-0", {b"d": b"[]"})]
    assert r.keys("recsvc:v1:*") == []
    assert migrate_v1(r).as_dict() == {  # again: nothing left to move
        "keys_moved": 0, "keys_kept": 0, "entries_copied": 0, "entries_skipped": 0,
        "impressions_moved": False}
    assert r.hgetall(user_keys("bob")[0]) == {b"a1": b"3", b"a2": b"-1"}
    assert 3500 < r.ttl(user_keys("bob")[0]) <= 3600
    assert [f[b"event_id"] for _, f in log_entries(r)] == [b"old-2", b"old-3"]
    assert recsvc_main(["migrate", *flags]) == 0  # again: nothing to do
    assert len(log_entries(r)) == 2

    # the migrated state serves, and dedup still knows old ids
    server = make_server(redis_url=redis_url, redis_cluster=cluster)
    ack = server.stub.SendFeedback(
        pb.SendFeedbackRequest(events=[click("old-2", "bob", "a1"), click("new-1", "bob", "a1")])
    )
    assert (ack.accepted, ack.duplicates) == (1, 1)
    state = server.stub.GetUserState(pb.GetUserStateRequest(user_id="bob"))
    assert {e.item_id: e.weight for e in state.history}["a1"] == 5.0  # 3 + a click (2)


class ResendingStream(threading.Thread):
    """Streams events; when the call fails, opens a new one and resends every
    event not acknowledged yet (the same ids), until all are acknowledged."""

    def __init__(self, stub, events, deadline_s):
        super().__init__(daemon=True)
        self.stub, self.events, self.deadline_s = stub, events, deadline_s
        self.acked: set[str] = set()
        self.acked_at: dict[str, float] = {}
        self.failures: list[tuple[float, grpc.StatusCode]] = []

    def run(self):
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            todo = [e for e in self.events if e.event_id not in self.acked]
            if not todo:
                return
            try:
                for ack in self.stub.StreamFeedback(iter(todo), timeout=20):
                    now = time.monotonic()
                    for event_id in (*ack.event_ids, *ack.duplicate_event_ids):
                        self.acked.add(event_id)
                        self.acked_at.setdefault(event_id, now)
            except grpc.RpcError as exc:
                self.failures.append((time.monotonic(), exc.code()))
                time.sleep(0.05)


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of this test's own (requested before make_server: stopped after
    the servers are)."""
    cluster = LocalCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


def test_primary_killed_under_a_stream_loses_no_acked_event(own_cluster, make_server):
    """SIGKILL of a primary mid-stream, acks after WAIT 1: once its replica is
    promoted every acknowledged event is there, and none was applied twice."""
    own = own_cluster
    server = make_server(redis_url=own.url, redis_cluster=True, redis_wait_replicas=1,
                         redis_timeout_s=0.5, stream_batch=50)  # fmt: skip
    n_users = 30
    events = [click(f"f{i}", f"fo-{i % n_users}", f"a{i % 7}") for i in range(6000)]
    streamer = ResendingStream(server.stub, events, deadline_s=60)
    victim = own.primary_of(user_keys("fo-0")[0])
    streamer.start()
    while len(streamer.acked) < 1000 and streamer.is_alive():
        time.sleep(0.005)
    acked_before_kill = set(streamer.acked)
    own.kill(victim)
    killed_at = time.monotonic()
    # its replica takes over; with WAIT 1 the slot acks again once it has a
    # replica: the killed node, back, rejoins as one
    assert wait_for(lambda: own.primary_of(user_keys("fo-0")[0]) != victim, 20)
    own.restart(victim)
    streamer.join(70)
    assert not streamer.is_alive() and len(streamer.acked) == len(events)
    assert acked_before_kill and len(acked_before_kill) < len(events)
    # the failure was noticed, reported as UNAVAILABLE, and over with the failover
    assert streamer.failures, "the kill never reached the stream"
    assert {code for _, code in streamer.failures} == {grpc.StatusCode.UNAVAILABLE}
    assert max(t for t, _ in streamer.failures) - killed_at < 15

    with connect_sync(own.url, cluster=True) as client:
        per_user = {}
        for e in events:
            per_user[e.user_id] = per_user.get(e.user_id, 0) + 1
        for user, n in per_user.items():  # every event applied, none twice
            assert int(client.hget(user_keys(user)[3], "events")) == n, user
            weights = client.hgetall(user_keys(user)[0])
            assert sum(float(w) for w in weights.values()) == 2.0 * n
        logged = [f[b"event_id"].decode() for _, f in log_entries(client)]
    assert sorted(logged) == sorted(e.event_id for e in events)  # each exactly once
    reply = server.stub.Recommend(pb.RecommendRequest(user_id="fo-0", k=3))
    assert not reply.degraded


def test_wait_acks_only_what_a_replica_has(tmp_path):
    """One primary and one replica (no cluster): with wait_replicas=1 a write is
    acknowledged while the replica follows, refused (UNAVAILABLE) once it is
    gone; the refused batch is applied on the primary, and its resend is a
    duplicate acknowledged once a replica is back."""
    primary = EmbeddedRedis(tmp_path / "primary", tcp=True).start()
    port = free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--replicaof", "127.0.0.1", str(primary.port), "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]  # fmt: skip
    replica = subprocess.Popen(args, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def in_sync():
        try:
            with redis.Redis(port=port, socket_timeout=0.5) as r:
                return r.info("replication").get("master_link_status") == "up"
        except (redis.RedisError, OSError):
            return False

    async def scenario(store):
        await store.apply_events([stored("w1")])
        replica.kill()
        replica.wait()
        with pytest.raises(StoreUnavailable, match="NOREPLICAS"):
            await store.apply_events([stored("w2")])
        return await store.get_state("waiter")

    try:
        assert wait_for(in_sync, 10)
        state = asyncio.run(with_store(primary.url, scenario))
        assert state.event_count == 2  # w2 was applied, not acknowledged
        replica2 = subprocess.Popen(args, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
        try:
            assert wait_for(in_sync, 10)
            resend = lambda s: s.apply_events([stored("w2")])  # noqa: E731
            (again,) = asyncio.run(with_store(primary.url, resend))
            assert not again.applied  # the resend: a duplicate, acknowledged now
        finally:
            replica2.kill()
            replica2.wait()
    finally:
        if replica.poll() is None:
            replica.kill()
            replica.wait()
        primary.stop()


def stored(event_id):
    return StoredEvent(event_id, "waiter", "a1", "click", 0.0, 2.0, 1_700_000_000_000)


async def with_store(url, scenario):
    store = UserStore.from_url(url, timeout_s=2, wait_replicas=1, wait_timeout_ms=300)
    try:
        return await scenario(store)
    finally:
        await store.close()
