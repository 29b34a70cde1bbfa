"""Security end to end: `backflow serve` as a subprocess with TLS and a bearer token, spans
sent with the real OpenTelemetry SDK exporter; Redis with AUTH (password, ACL user) and with
TLS; and neither the token nor the Redis password in the logs, /metrics or /healthz."""

import logging
import signal
import sys
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from processor.devtools.redis_server import RedisServer, free_port
from processor.pipeline.location import location_key
from tests.conftest import BackflowProcess
from tests.tlsfiles import CA

pytestmark = pytest.mark.e2e  # starts redis-server and backflow serve (docs/testing.md)

SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC  # 2023: in the past, as --max-clock-skew requires
TOKEN = "tok-3f9a1c7e5b2d"
REDIS_PASSWORD = "redis-pw-8e41d07c"
ACCEPTED = 'backflow_receiver_accepted_spans_total{transport="grpc"}'
UNAUTHENTICATED = 'backflow_receiver_refused_requests_total{reason="unauthenticated",transport="grpc"}'


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca, stranger = CA(d, "ca"), CA(d, "stranger")
    return {"ca": ca.cert, "server": ca.issue("server"), "client": ca.issue("client", server=False),
            "stranger_ca": stranger.cert, "stranger_client": stranger.issue("stranger-client", server=False)}


@pytest.fixture
def servers():
    """Backflow processes started by a test (on Redis servers of its own); stopped at the end."""
    started = []

    def start(redis_url, *extra, env=None, healthy=True):
        bf = BackflowProcess(redis_url, *extra, env=env)
        started.append(bf)
        return bf.start(healthy=healthy)

    yield start
    for bf in started:
        bf.stop()


def spans(function: str, n: int = 5):
    """n finished SDK spans of one function (service shop, env prod), ending in window 0."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(
        {"service.name": "shop", "deployment.environment.name": "prod"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("shop.tracer")
    for i in range(n):
        tracer.start_span("op", start_time=T0 + i * SEC, attributes={"code.function.name": function}) \
            .end(end_time=T0 + i * SEC + 5_000_000)
    provider.shutdown()
    return memory.get_finished_spans()


def export(target, batch, ca=None, headers=None, client=None, insecure=False, timeout=10):
    """One Export through the SDK's OTLPSpanExporter; its result, SUCCESS or FAILURE."""
    if insecure:
        exporter = OTLPSpanExporter(endpoint=target, insecure=True, headers=headers, timeout=timeout)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=client.key.read_bytes() if client else None,
            certificate_chain=client.cert.read_bytes() if client else None)
        exporter = OTLPSpanExporter(endpoint=target, insecure=False, credentials=creds,
                                    headers=headers, timeout=timeout)
    try:
        return exporter.export(batch)
    finally:
        exporter.shutdown()


def health_status(target, ca) -> int:
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes())) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def http_text(bf, path) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{bf.metrics_port}{path}", timeout=5) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()


def key(function: str) -> str:
    return location_key("prod", "shop", function)


@pytest.mark.parametrize("workers", [1, 2])
def test_tls_and_token_with_the_sdk_exporter(backflow, redis_client, tls, workers):
    bf = backflow("--workers", str(workers), "--window", "10",
                  "--tls-cert", str(tls["server"].cert), "--tls-key", str(tls["server"].key),
                  env={"BACKFLOW_AUTH_TOKEN": TOKEN})
    target, ca = bf.grpc_target, tls["ca"]

    ok = spans("shop.ok")
    assert export(target, ok, ca, {"authorization": f"Bearer {TOKEN}"}) == SpanExportResult.SUCCESS
    # the scheme is case-insensitive (RFC 7235)
    assert export(target, spans("shop.lower"), ca, {"authorization": f"bearer {TOKEN}"}) == SpanExportResult.SUCCESS
    bf.wait_for(lambda: bf.metrics().get(ACCEPTED) == 10, what="authorized spans accepted")

    assert export(target, spans("shop.no_token"), ca) == SpanExportResult.FAILURE
    assert export(target, spans("shop.wrong_token"), ca, {"authorization": f"Bearer {TOKEN}x"}) \
        == SpanExportResult.FAILURE
    assert export(target, spans("shop.basic"), ca, {"authorization": f"Basic {TOKEN}"}) == SpanExportResult.FAILURE
    # (with --workers 2 the refusals are counted in the receiver processes and relayed)
    m = bf.wait_for(lambda: (m := bf.metrics()).get(UNAUTHENTICATED) == 3 and m, what="refusals counted")
    assert m[ACCEPTED] == 10

    # Plaintext against the TLS port, and TLS trusting another CA: no connection at all.
    assert export(target, spans("shop.plain"), headers={"authorization": f"Bearer {TOKEN}"},
                  insecure=True, timeout=3) == SpanExportResult.FAILURE
    assert export(target, spans("shop.stranger"), tls["stranger_ca"], {"authorization": f"Bearer {TOKEN}"},
                  timeout=3) == SpanExportResult.FAILURE
    # The health service answers without a token (probes send none).
    assert health_status(target, ca) == health_pb2.HealthCheckResponse.SERVING

    m = bf.metrics()
    assert (m[ACCEPTED], m[UNAUTHENTICATED]) == (10, 3)
    assert bf.stop(signal.SIGTERM) == 0  # closes the open window and writes it out
    assert redis_client.smembers("backflow:keys") == {key("shop.ok"), key("shop.lower")}
    assert redis_client.hget(f"backflow:baseline:{key('shop.ok')}", "count") == str(len(ok))
    assert "TLS, bearer token required" in bf.log


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(backflow, redis_client, tls):
    bf = backflow("--tls-cert", str(tls["server"].cert), "--tls-key", str(tls["server"].key),
                  "--tls-client-ca", str(tls["ca"]))
    target, ca = bf.grpc_target, tls["ca"]
    assert export(target, spans("shop.m"), ca, client=tls["client"]) == SpanExportResult.SUCCESS
    assert export(target, spans("shop.m"), ca, timeout=3) == SpanExportResult.FAILURE
    assert export(target, spans("shop.m"), ca, client=tls["stranger_client"], timeout=3) == SpanExportResult.FAILURE
    assert bf.metrics()[ACCEPTED] == 5


def test_log_lines_mask_secrets_in_messages_and_tracebacks():
    from processor.logs import RedactingFormatter
    formatter = RedactingFormatter("%(levelname)s %(message)s", ["s3cret-pw", "ab"])
    try:
        raise RuntimeError("AUTH s3cret-pw refused")
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "no %s", ("redis://:s3cret-pw@h",),
                                   sys.exc_info())
    text = formatter.format(record)
    assert "s3cret-pw" not in text
    assert text.startswith("ERROR no redis://:***@h\n") and "RuntimeError: AUTH *** refused" in text
    # a secret of under 4 characters is left alone rather than garble every line
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "about", (), None)
    assert formatter.format(record) == "INFO about"


@pytest.fixture(scope="module")
def auth_redis():
    """redis-server with a password for the default user and an ACL user 'backflow'."""
    with RedisServer(extra_args=("--requirepass", REDIS_PASSWORD)) as srv:
        admin = redis.Redis(port=srv.port, password=REDIS_PASSWORD, decode_responses=True)
        admin.acl_setuser("backflow", enabled=True, passwords=[f"+{REDIS_PASSWORD}-acl"],
                          keys=["backflow:*"], commands=["+@all"])
        yield srv, admin
        admin.close()


def test_redis_password_and_acl_user(servers, auth_redis, tls):
    srv, admin = auth_redis
    admin.flushall()
    admin.acl_log_reset()
    with pytest.raises(redis.AuthenticationError):  # the server does require it
        redis.Redis(port=srv.port).ping()
    for n, url in enumerate([f"redis://:{REDIS_PASSWORD}@127.0.0.1:{srv.port}/0",
                             f"redis://backflow:{REDIS_PASSWORD}-acl@127.0.0.1:{srv.port}/0"]):
        bf = servers(url, "--window", "10")
        assert export(bf.grpc_target, spans(f"shop.auth{n}"), insecure=True) == SpanExportResult.SUCCESS
        assert bf.stop() == 0
        assert admin.hget(f"backflow:baseline:{key(f'shop.auth{n}')}", "count") == "5", bf.log
    assert admin.acl_log() == []  # no refused AUTH along the way


def test_no_secret_in_logs_metrics_or_healthz(servers, auth_redis, tls, tmp_path):
    """A debug-level run with two receiver processes, a token, refused calls and an ACL user's
    password; then one with a wrong Redis password (the cannot-connect path)."""
    srv, admin = auth_redis
    admin.flushall()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    url = f"redis://backflow:{REDIS_PASSWORD}-acl@127.0.0.1:{srv.port}/0"
    tls_flags = ("--tls-cert", str(tls["server"].cert), "--tls-key", str(tls["server"].key))
    bf = servers(url, "--workers", "2", "--log-level", "debug", "--window", "10",
                 "--auth-token-file", str(token_file), *tls_flags)
    assert export(bf.grpc_target, spans("shop.s"), tls["ca"], {"authorization": f"Bearer {TOKEN}"}) \
        == SpanExportResult.SUCCESS
    assert export(bf.grpc_target, spans("shop.s"), tls["ca"], {"authorization": "Bearer nope"}) \
        == SpanExportResult.FAILURE
    bf.wait_for(lambda: bf.metrics().get(UNAUTHENTICATED) == 1, what="refusal counted")
    outputs = {"/metrics": http_text(bf, "/metrics"), "/healthz": http_text(bf, "/healthz")}
    assert bf.stop() == 0
    outputs["log"] = bf.log
    assert admin.hget(f"backflow:baseline:{key('shop.s')}", "count") == "5"
    assert "receiver_refused_requests" in outputs["/metrics"] and outputs["/healthz"] == "ok\n"
    assert "backflow.workers" in bf.log and "bearer token required" in bf.log  # receiver processes log

    wrong = f"redis://backflow:{REDIS_PASSWORD}-wrong@127.0.0.1:{srv.port}/0"
    bad = servers(wrong, "--auth-token-file", str(token_file), "--workers", "2", *tls_flags, healthy=False)
    assert bad.http_status("/healthz") == 503
    outputs["/metrics (wrong password)"] = http_text(bad, "/metrics")
    assert bad.stop() == 0
    outputs["log (wrong password)"] = bad.log
    assert "Redis at redis://backflow:***@127.0.0.1" in bad.log
    assert "invalid username-password pair" in bad.log

    for where, text in outputs.items():
        for secret in (TOKEN, REDIS_PASSWORD):
            assert secret not in text, f"{secret} in {where}"


@pytest.fixture(scope="module")
def tls_redis(tls, tmp_path_factory):
    """redis-server speaking TLS (and AUTH) on tls_port; its plain port is for the test only."""
    d = tmp_path_factory.mktemp("redis-tls")
    pair = CA(d, "redis-ca")
    server = pair.issue("redis")
    tls_port = free_port()
    args = ("--tls-port", str(tls_port), "--tls-cert-file", str(server.cert),
            "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(pair.cert),
            "--tls-auth-clients", "no", "--requirepass", REDIS_PASSWORD)
    with RedisServer(extra_args=args) as srv:
        yield srv, tls_port, pair.cert, redis.Redis(port=srv.port, password=REDIS_PASSWORD,
                                                   decode_responses=True)


def test_rediss_with_a_ca_file(servers, tls_redis, tls):
    srv, tls_port, redis_ca, plain = tls_redis
    base = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{tls_port}/0"
    bf = servers(f"{base}?ssl_ca_certs={redis_ca}", "--window", "10")
    assert export(bf.grpc_target, spans("shop.tls"), insecure=True) == SpanExportResult.SUCCESS
    assert bf.stop() == 0
    assert plain.hget(f"backflow:baseline:{key('shop.tls')}", "count") == "5"
    # The server's certificate is verified: with a CA that did not sign it Redis is never
    # reached, and /healthz says so.
    bad = servers(f"{base}?ssl_ca_certs={tls['ca']}", healthy=False)
    assert bad.http_status("/healthz") == 503
    assert bad.stop() == 0
    assert "CERTIFICATE_VERIFY_FAILED" in bad.log and REDIS_PASSWORD not in bad.log


@pytest.mark.parametrize("tls_on", [False, True])
def test_a_token_on_a_plaintext_port_beyond_this_host_is_warned_about_at_start(redis_server, tls, tls_on):
    port = free_port()
    flags = ["--otlp-grpc", f"0.0.0.0:{port}"]
    if tls_on:
        flags += ["--tls-cert", str(tls["server"].cert), "--tls-key", str(tls["server"].key)]
    bf = BackflowProcess(redis_server.url, *flags, env={"BACKFLOW_AUTH_TOKEN": TOKEN}).start()
    bf.stop()
    warned = "a bearer token is required, but OTLP/gRPC on 0.0.0.0" in bf.log
    assert warned != tls_on, bf.log
    assert TOKEN not in bf.log


def test_an_aggregate_replica_forwards_over_mutual_tls_with_a_token(backflow, redis_client, tls, tmp_path):
    """The detect replica asks TLS, a client certificate from its CA and a token; an
    aggregate replica with forward_tls_* and the token delivers. One whose token file holds
    another token is refused (counted there) and keeps its partials, /healthz saying why;
    once the file holds the detect replica's token, they go."""
    detect = backflow("--role", "detect", "--window", "10", "--replica-wait", "0",
                      "--tls-cert", str(tls["server"].cert), "--tls-key", str(tls["server"].key),
                      "--tls-client-ca", str(tls["ca"]), env={"BACKFLOW_AUTH_TOKEN": TOKEN})
    client = ("--forward", detect.grpc_target, "--forward-tls-ca", str(tls["ca"]),
              "--forward-tls-cert", str(tls["client"].cert), "--forward-tls-key", str(tls["client"].key))
    good = backflow("--role", "aggregate", "--window", "10", *client, "--replica-id", "good",
                    prefix="unused", env={"BACKFLOW_FORWARD_AUTH_TOKEN": TOKEN})
    assert export(good.grpc_target, spans("shop.sealed"), insecure=True) == SpanExportResult.SUCCESS
    shown = http_text(good, "/healthz") + http_text(good, "/metrics")
    assert good.stop(signal.SIGTERM) == 0, good.log  # (its open window goes out, and is taken)
    detect.wait_for(lambda: detect.metrics().get("backflow_processed_spans_total") == 5, timeout=30,
                    what="the forwarded partials processed")

    old = "tok-old-5e0c2a9d41"
    token_file = tmp_path / "forward-token"
    token_file.write_text(old + "\n")
    rotated = backflow("--role", "aggregate", "--window", "10", *client, "--replica-id", "rotated",
                       "--forward-auth-token-file", str(token_file), prefix="unused")
    assert export(rotated.grpc_target, spans("shop.rotated"), insecure=True) == SpanExportResult.SUCCESS
    refused = 'backflow_receiver_refused_requests_total{reason="unauthenticated",transport="grpc"}'
    detect.wait_for(lambda: detect.metrics().get(refused, 0) >= 1, timeout=30, what="the old token refused")
    health = rotated.wait_for(lambda: "UNAUTHENTICATED" in (h := http_text(rotated, "/healthz")) and h,
                              what="/healthz naming the refusal")
    assert health.startswith("degraded: the detect replica at ") and rotated.http_status("/healthz") == 200
    assert rotated.metrics()["backflow_forward_pending_requests"] >= 1
    assert detect.metrics()["backflow_processed_spans_total"] == 5  # (nothing of the refused replica's)
    shown += health + http_text(rotated, "/metrics")
    token_file.write_text(TOKEN + "\n")  # (rotated at the detect replica first, then here: no restart)
    rotated.wait_for(lambda: (m := rotated.metrics())["backflow_forward_up"] and
                     not m["backflow_forward_pending_requests"], timeout=30, what="the waiting requests taken")
    assert rotated.stop(signal.SIGTERM) == 0, rotated.log  # (its open window goes out now)
    detect.wait_for(lambda: detect.metrics().get("backflow_processed_spans_total") == 10, timeout=30,
                    what="the partials sent with the new token")
    assert detect.stop(signal.SIGTERM) == 0
    assert redis_client.smembers("backflow:keys") == {key("shop.sealed"), key("shop.rotated")}
    for secret in (TOKEN, old):
        assert secret not in good.log + rotated.log + detect.log + shown
