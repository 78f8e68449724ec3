"""TLS, bearer tokens and admission control, against a real server over real channels."""

import json
import logging
import threading
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_certs import make_certs

from loadtest.cli import main as loadtest_main
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-0123456789abcdef"
CLIENT_TOKEN = "client-0123456789abcdef"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(
        f"# role token name\nadmin {ADMIN_TOKEN} ops\nclient {CLIENT_TOKEN} web-frontend\n"
    )
    path.chmod(0o600)
    return path


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_tokens_and_roles(make_server, token_file, caplog):
    caplog.set_level(logging.DEBUG)
    stub = make_server(auth_tokens_file=token_file).stub
    reload = pb.ReloadModelRequest()
    code, message = code_of(lambda: stub.ReloadModel(reload))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in message
    code, message = code_of(lambda: stub.ReloadModel(reload, metadata=bearer("x" * 20)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown or revoked token" in message
    code, message = code_of(
        lambda: stub.ReloadModel(reload, metadata=(("authorization", CLIENT_TOKEN),))
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not 'Bearer <token>'" in message
    code, message = code_of(lambda: stub.ReloadModel(reload, metadata=bearer(CLIENT_TOKEN)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs a token with role admin" in message and "web-frontend" in message
    code, _ = code_of(
        lambda: stub.GetUserState(
            pb.GetUserStateRequest(user_id="u1"), metadata=bearer(CLIENT_TOKEN)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert stub.ReloadModel(reload, metadata=bearer(ADMIN_TOKEN)).model_version
    assert stub.GetUserState(pb.GetUserStateRequest(user_id="u1"), metadata=bearer(ADMIN_TOKEN))
    # the client role may do the rest, streams included; without a token nothing passes
    assert stub.Recommend(pb.RecommendRequest(user_id="u1", k=2), metadata=bearer(CLIENT_TOKEN))
    event = pb.FeedbackEvent(event_id="e1", user_id="u1", item_id="a1", type=pb.CLICK)
    acks = list(stub.StreamFeedback(iter([event]), metadata=bearer(CLIENT_TOKEN)))
    assert [e for a in acks for e in a.event_ids] == ["e1"]
    code, _ = code_of(lambda: list(stub.StreamFeedback(iter([event]))))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(lambda: stub.Recommend(pb.RecommendRequest(user_id="u1", k=2)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert ADMIN_TOKEN not in caplog.text and CLIENT_TOKEN not in caplog.text


def test_health_needs_no_token(make_server, token_file):
    server = make_server(auth_tokens_file=token_file)
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="recsvc.v1.Recommender"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_open_beyond_loopback_warns(make_server, caplog):
    make_server(host="0.0.0.0")
    assert "no tokens configured" in caplog.text
    caplog.clear()
    make_server(host="127.0.0.1")
    assert "no tokens configured" not in caplog.text


@pytest.mark.parametrize(
    "line, error",
    [("root tok-0123456789abcdef", "unknown role"), ("admin short", "at least 16"),
     ("admin", "ROLE TOKEN [NAME]")],
)  # fmt: skip
def test_bad_token_file_is_refused_at_start(make_server, tmp_path, line, error):
    path = tmp_path / "tokens"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        make_server(auth_tokens_file=path)


def test_tls_and_mutual_tls(make_server, certs):
    server = make_server(tls_cert=certs["server.pem"], tls_key=certs["server.key"])
    target = f"localhost:{server.port}"
    request = pb.RecommendRequest(user_id="u1", k=2)
    with grpc.insecure_channel(target) as plain:
        code, _ = code_of(lambda: pb_grpc.RecommenderStub(plain).Recommend(request, timeout=3))
        assert code == grpc.StatusCode.UNAVAILABLE
    ca = certs["ca.pem"].read_bytes()
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as tls:
        assert pb_grpc.RecommenderStub(tls).Recommend(request, timeout=10).items

    mutual = make_server(
        tls_cert=certs["server.pem"], tls_key=certs["server.key"], tls_client_ca=certs["ca.pem"]
    )
    target = f"localhost:{mutual.port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as no_cert:
        code, _ = code_of(lambda: pb_grpc.RecommenderStub(no_cert).Recommend(request, timeout=3))
        assert code == grpc.StatusCode.UNAVAILABLE
    credentials = grpc.ssl_channel_credentials(
        ca, certs["client.key"].read_bytes(), certs["client.pem"].read_bytes()
    )
    with grpc.secure_channel(target, credentials) as tls:
        assert pb_grpc.RecommenderStub(tls).Recommend(request, timeout=10).items


def test_tls_settings_go_together(make_server, certs):
    with pytest.raises(ValueError, match="go together"):
        make_server(tls_cert=certs["server.pem"])


def test_calls_past_the_bound_are_refused_with_a_retry_hint(make_server, redis_url):
    server = make_server(max_in_flight=2, redis_timeout_s=10)
    stub = server.stub
    results: list[object] = []

    def feedback(i):
        event = pb.FeedbackEvent(event_id=f"e{i}", user_id=f"u{i}", item_id="a1", type=pb.CLICK)
        return pb.SendFeedbackRequest(events=[event])

    def call(i):
        try:
            results.append(stub.SendFeedback(feedback(i), timeout=20))
        except grpc.RpcError as exc:
            results.append(exc)

    with redis.Redis.from_url(redis_url) as admin:
        admin.execute_command("CLIENT", "PAUSE", "20000", "WRITE")  # Redis holds writes
        try:
            threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.5)  # both are in the server now, waiting on Redis
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Recommend(pb.RecommendRequest(user_id="u3", k=2), timeout=5)
            refused_in_s = time.monotonic() - started
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
    for t in threads:
        t.join(20)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server at capacity (2 calls in progress" in info.value.details()
    assert refused_in_s < 2  # at once, not after waiting for a slot
    trailers = dict(info.value.trailing_metadata())
    assert int(trailers["retry-after-ms"]) >= 1 and "grpc-retry-pushback-ms" in trailers
    assert [type(r) for r in results] == [pb.SendFeedbackResponse] * 2
    # the slots are free again
    assert stub.Recommend(pb.RecommendRequest(user_id="u3", k=2)).items


def test_a_saturated_server_refuses_with_a_retry_hint_and_recovers(make_server):
    """CPU overload: the backlog waits in gRPC's core, where no count of calls in
    progress sees it; the loop's busy streak does. A burst far beyond what the
    loop clears in 1 ms gets some calls refused at once, every other call served,
    and a call after the burst is served again."""
    server = make_server(max_in_flight=0, max_queue_ms=1)
    channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(4)]
    try:
        stubs = [pb_grpc.RecommenderStub(c) for c in channels]
        futures = [
            stubs[i % 4].Recommend.future(
                pb.RecommendRequest(user_id=f"u{i % 40}", k=5), timeout=30
            )
            for i in range(600)
        ]
        served, refused = 0, []
        for future in futures:
            try:
                assert len(future.result().items) == 5
                served += 1
            except grpc.RpcError as exc:
                refused.append(exc)
        assert served > 0 and refused, (served, len(refused))
        for exc in refused:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "CPU saturated: busy without a pause" in exc.details()
            assert int(dict(exc.trailing_metadata())["retry-after-ms"]) >= 1
        time.sleep(0.05)
        assert stubs[0].Recommend(pb.RecommendRequest(user_id="u1", k=5)).items
        # operator calls are never refused
        assert stubs[0].GetModelInfo(pb.GetModelInfoRequest()).n_items
    finally:
        for channel in channels:
            channel.close()


def test_load_client_over_tls_with_a_token(make_server, certs, token_file, tmp_path):
    server = make_server(
        tls_cert=certs["server.pem"], tls_key=certs["server.key"], auth_tokens_file=token_file
    )
    token = tmp_path / "client.token"
    token.write_text(CLIENT_TOKEN + "\n")
    report = tmp_path / "r.json"
    common = ["--target", f"localhost:{server.port}", "--tls-ca", str(certs["ca.pem"])]
    args = ["run", *common, "--duration", "1", "--concurrency", "2", "--mix",
            "recommend=0.8,feedback=0.2", "--zipf-users", "40", "--zipf-items", "16",
            "--quiet", "--report", str(report)]  # fmt: skip
    assert loadtest_main([*args, "--token-file", str(token)]) == 0
    result = json.loads(report.read_text())
    assert result["errors_by_code"] == {} and result["ok"] > 0
    # without the token every call is refused, and the client counts it
    assert loadtest_main(args) == 0
    result = json.loads(report.read_text())
    assert set(result["errors_by_code"]) == {"UNAUTHENTICATED"} and result["ok"] == 0


def test_the_backlog_in_grpc_core_is_bounded(make_server):
    """grpc.aio takes calls one at a time on its event loop: a busy loop leaves
    them queued in gRPC's core, which max_pending_calls bounds."""
    server = make_server(max_pending_calls=4)
    stub = server.stub
    request = pb.GetModelInfoRequest()
    assert stub.GetModelInfo(request).model_version
    server.loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop is busy for a second
    time.sleep(0.1)
    futures = [stub.GetModelInfo.future(request, timeout=10) for _ in range(30)]
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}
    assert codes.count(grpc.StatusCode.OK) <= 8  # the bound, give or take calls taken early


def test_the_load_client_backs_off_as_the_server_asks(make_server, tmp_path):
    """A closed-loop worker refused with RESOURCE_EXHAUSTED waits the server's
    retry-after-ms before its next call (the report says how long in all);
    with --no-backoff it resends at once."""
    server = make_server(max_in_flight=0, max_queue_ms=1)
    report = tmp_path / "r.json"
    args = ["run", "--target", f"127.0.0.1:{server.port}", "--duration", "2",
            "--concurrency", "64", "--channels", "4", "--mix", "recommend=1",
            "--zipf-users", "40", "--zipf-items", "16", "--quiet",
            "--report", str(report)]  # fmt: skip
    assert loadtest_main(args) == 0
    result = json.loads(report.read_text())
    refused = result["errors_by_code"].get("RESOURCE_EXHAUSTED", 0)
    assert refused > 0 and set(result["errors_by_code"]) == {"RESOURCE_EXHAUSTED"}
    assert result["ok"] > 0
    assert result["closed_loop"]["backoff"] and result["closed_loop"]["backed_off_s"] > 0
    assert loadtest_main([*args, "--no-backoff"]) == 0
    result = json.loads(report.read_text())
    assert not result["closed_loop"]["backoff"] and result["closed_loop"]["backed_off_s"] == 0
