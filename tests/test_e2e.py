"""End to end: a real redis-server, `backflow serve` as a subprocess, spans sent with the
real OpenTelemetry SDK exporter over gRPC, with explicit timestamps."""

import json
import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import Compression, OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

from processor.pipeline.location import location_key
from tests.otlp import S, request

SEC = 1_000_000_000
W = 10 * SEC
T0 = 1_700_000_000 * SEC  # a window boundary for W = 10 s, in the past: spans from the future are refused
RESOURCE = {"service.name": "shop", "service.version": "1.4.3",
            "deployment.environment.name": "prod", "vcs.ref.head.revision": "abc123"}
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def send(target, spans, resource=RESOURCE, compression=None):
    """Export spans through the SDK: (start_ns, end_ns, attributes, error, exception, name)."""
    provider = TracerProvider(resource=Resource.create(resource))
    exporter = OTLPSpanExporter(endpoint=target, insecure=True, compression=compression)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=512,
                                                   max_queue_size=max(2048, len(spans))))
    tracer = provider.get_tracer("shop.tracer")
    for sp in spans:
        start, end, attrs = sp[0], sp[1], sp[2]
        error = sp[3] if len(sp) > 3 else False
        exc = sp[4] if len(sp) > 4 else None
        name = sp[5] if len(sp) > 5 else "op"
        span = tracer.start_span(name, start_time=start, attributes=attrs)
        if exc is not None:
            span.record_exception(exc, timestamp=end)
        if error:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end)
    assert provider.force_flush(30_000)
    provider.shutdown()


def stream(redis_client, prefix="backflow"):
    return [fields for _, fields in redis_client.xrange(f"{prefix}:events")]


def lognormal_ns(seed, n, median_ms):
    rng = np.random.default_rng(seed)
    return np.round(rng.lognormal(np.log(median_ms * 1e6), 0.6, n)).astype(np.int64) + 1


def test_baselines_first_seen_and_metrics(backflow, redis_client):
    bf = backflow("--window", "10", "--allowed-lateness", "0")
    functions = {
        "new": ({"code.function.name": "shop.cart.apply_discount", "code.file.path": "shop/cart.py",
                 "code.line.number": 42}, 20.0),
        "old": ({"code.namespace": "shop.pay", "code.function": "charge",
                 "code.filepath": "shop/pay.py", "code.lineno": 7}, 80.0),
        "name": ({"http.route": "/health"}, 2.0),
    }
    spans, durations = [], {}
    for i, (label, (attrs, median)) in enumerate(functions.items()):
        d = lognormal_ns(i, 400, median)
        durations[label] = d
        for j, dur in enumerate(d):
            end = T0 + int(j * (W - SEC) / len(d)) + SEC // 2
            spans.append((end - int(dur), end, attrs, j % 20 == 0, None, "GET /health"))
    spans.sort(key=lambda s: s[1])
    spans.append((T0 + W, T0 + W + 1000, functions["new"][0]))  # next window: closes the first
    send(bf.grpc_target, spans)

    keys = {"new": location_key("prod", "shop", "shop.cart.apply_discount"),
            "old": location_key("prod", "shop", "shop.pay.charge"),
            "name": location_key("prod", "shop", "span:GET /health")}
    bf.wait_for(lambda: len(stream(redis_client)) == 3, what="three first_seen events")
    # The sink writes a window's events before its baselines: wait for those too.
    bf.wait_for(lambda: all(redis_client.exists(f"backflow:baseline:{k}") for k in keys.values()),
                what="three baselines")
    for label, key in keys.items():
        h = redis_client.hgetall(f"backflow:baseline:{key}")
        d = durations[label]
        assert int(h["count"]) == len(d)
        assert float(h["error_rate"]) == pytest.approx(np.mean(np.arange(len(d)) % 20 == 0), abs=1e-6)
        for field, q in [("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("p999_ms", 0.999)]:
            exact_ms = np.quantile(d, q, method="lower") / 1e6
            assert float(h[field]) == pytest.approx(exact_ms, rel=0.0101), field
        assert float(h["rate_per_s"]) == pytest.approx(len(d) / 10, rel=1e-6)
        assert (h["windows"], h["updated"]) == ("1", str((T0 + W) // 1_000_000))
        assert (h["service.name"], h["deployment.environment.name"]) == ("shop", "prod")
        assert (h["service.version"], h["vcs.ref.head.revision"]) == ("1.4.3", "abc123")
    assert redis_client.smembers("backflow:keys") == set(keys.values())

    events = {e["key"]: e for e in stream(redis_client)}
    assert set(events) == set(keys.values())
    new = events[keys["new"]]
    assert new["type"] == "first_seen" and new["severity"] == "info"
    assert (new["code.function.name"], new["code.file.path"], new["code.line.number"]) == \
        ("shop.cart.apply_discount", "shop/cart.py", "42")
    assert (new["window.start"], new["window.end"]) == (str(T0 // 10**6), str((T0 + W) // 10**6))
    assert (new["service.version"], new["vcs.ref.head.revision"]) == ("1.4.3", "abc123")
    assert len(json.loads(new["detail"])["exemplars"]) == 3
    old = events[keys["old"]]
    assert (old["code.file.path"], old["code.line.number"]) == ("shop/pay.py", "7")
    assert events[keys["name"]]["otel.scope.name"] == "shop.tracer"

    m = bf.wait_for(lambda: (m := bf.metrics()).get('backflow_events_total{type="first_seen"}') == 3 and m,
                    what="events metric")
    assert m['backflow_receiver_accepted_spans_total{transport="grpc"}'] == len(spans)
    assert m["backflow_processed_spans_total"] == len(spans)
    assert m["backflow_late_spans_total"] == 0
    assert m["backflow_active_keys"] == 3
    p99 = m['backflow_location_latency_milliseconds{code_function_name="shop.pay.charge",'
            'deployment_environment_name="prod",quantile="0.99",service_name="shop"}']
    assert p99 == pytest.approx(np.quantile(durations["old"], 0.99, method="lower") / 1e6, rel=0.0101)

    # ?name[]= restricts a scrape to the series asked for; the per-location gauges are skipped
    text = bf.http_body("/metrics?name[]=backflow_processed_spans_total&name[]=backflow_active_keys")
    samples = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples == {"backflow_processed_spans_total": len(spans), "backflow_active_keys": 3}
    assert "backflow_location_latency_milliseconds" in bf.http_body("/metrics?name[]=backflow_location_"
                                                                    "latency_milliseconds")


def test_sigterm_flushes_open_windows_and_restart_does_not_repeat_first_seen(backflow, redis_client):
    attrs = {"code.function.name": "shop.f"}
    bf = backflow("--window", "10")
    send(bf.grpc_target, [(T0 + SEC, T0 + 2 * SEC, attrs)])
    assert bf.stop(signal.SIGTERM) == 0  # the open window is closed and written on the way out
    key = location_key("prod", "shop", "shop.f")
    assert redis_client.hget(f"backflow:baseline:{key}", "count") == "1"
    assert [e["key"] for e in stream(redis_client)] == [key]

    bf2 = backflow("--window", "10")
    send(bf2.grpc_target, [(T0 + W + SEC, T0 + W + 2 * SEC, attrs),
                           (T0 + W + SEC, T0 + W + 3 * SEC, {"code.function.name": "shop.g"})])
    assert bf2.stop(signal.SIGTERM) == 0
    keys = [e["key"] for e in stream(redis_client)]
    assert keys == [key, location_key("prod", "shop", "shop.g")]  # shop.f not announced twice
    assert redis_client.hget(f"backflow:baseline:{key}", "updated") == str((T0 + 2 * W) // 10**6)


def test_late_span_is_counted_and_dropped(backflow, redis_client):
    bf = backflow("--window", "10", "--allowed-lateness", "0")
    attrs = {"code.function.name": "shop.f"}
    send(bf.grpc_target, [(T0, T0 + SEC, attrs), (T0 + 3 * W, T0 + 3 * W + 1, attrs)])
    send(bf.grpc_target, [(T0, T0 + 2 * SEC, attrs)])  # its window closed already
    bf.wait_for(lambda: bf.metrics()["backflow_late_spans_total"] == 1, what="late span counted")
    key = location_key("prod", "shop", "shop.f")
    # (the baseline is written by the sink's thread, perhaps after the late span was counted)
    assert bf.wait_for(lambda: redis_client.hget(f"backflow:baseline:{key}", "count"), what="baseline") == "1"


def test_gzip_requests_are_accepted(backflow, redis_client):
    bf = backflow("--window", "10")
    send(bf.grpc_target, [(T0 + i, T0 + SEC + i, {"code.function.name": "shop.z"}) for i in range(50)],
         compression=Compression.Gzip)
    bf.wait_for(lambda: bf.metrics().get('backflow_receiver_accepted_spans_total{transport="grpc"}') == 50,
                what="gzip spans accepted")


def test_unusable_spans_get_partial_success_and_the_rest_is_kept(backflow, redis_client):
    bf = backflow("--window", "10")
    req = request([S(T0 + SEC), S(T0 + 2 * SEC), S(T0 + 3 * SEC)])
    broken = req.resource_spans[0].scope_spans[0].spans
    broken[0].start_time_unix_nano = broken[0].end_time_unix_nano + 5  # ends before it starts
    broken[2].trace_id = b"short"
    with grpc.insecure_channel(bf.grpc_target) as ch:
        raw = ch.unary_unary(EXPORT)(req.SerializeToString(), timeout=10)
    resp = ExportTraceServiceResponse.FromString(raw)
    assert resp.partial_success.rejected_spans == 2
    assert "end before start" in resp.partial_success.error_message
    assert "trace_id" in resp.partial_success.error_message
    m = bf.wait_for(lambda: (m := bf.metrics()).get(
        'backflow_receiver_accepted_spans_total{transport="grpc"}') == 1 and m, what="accepted")
    assert m['backflow_receiver_refused_spans_total{reason="invalid_span",transport="grpc"}'] == 2


def test_request_over_the_size_limit_is_resource_exhausted(backflow, redis_client):
    bf = backflow("--max-request-bytes", "20000")
    small = request([S(T0 + SEC)]).SerializeToString()
    big = request([S(T0 + SEC + i, attrs={"pad": "x" * 200}) for i in range(200)]).SerializeToString()
    assert len(big) > 20000
    with grpc.insecure_channel(bf.grpc_target) as ch:
        export = ch.unary_unary(EXPORT)
        export(small, timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            export(big, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # gzip does not get around the limit: it applies to the decompressed message
        with pytest.raises(grpc.RpcError) as e:
            export(big, timeout=10, compression=grpc.Compression.Gzip)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        export(small, timeout=10)  # and the server goes on serving


def test_not_otlp_is_invalid_argument(backflow, redis_client):
    bf = backflow()
    with grpc.insecure_channel(bf.grpc_target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(EXPORT)(b"\xff\xff\xff garbage", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bf.metrics()['backflow_receiver_refused_requests_total{reason="malformed",transport="grpc"}'] == 1


def test_health_service_and_healthz_report_serving(backflow, redis_client):
    bf = backflow()
    with grpc.insecure_channel(bf.grpc_target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "opentelemetry.proto.collector.trace.v1.TraceService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert bf.http_status("/healthz") == 200
    assert bf.http_status("/nope") == 404


def test_regressions_of_a_new_version_are_reported_over_grpc(backflow, redis_client, tmp_path):
    """A new version whose function is twice as slow, fails more and raises a new exception."""
    cfg = tmp_path / "backflow.yaml"
    cfg.write_text("detectors:\n  warmup_windows: 10\n")
    bf = backflow("--window", "1", "--allowed-lateness", "0", "--config", str(cfg))
    rng = np.random.default_rng(7)
    attrs = {"code.function.name": "shop.cart.apply_discount", "code.file.path": "shop/cart.py"}

    def spans(first, last, slow, error_share, exception):
        out = []
        for w in range(first, last):
            for j in range(200):
                end = T0 + w * SEC + j * (SEC // 200)
                dur = int(rng.lognormal(np.log(20e6 * slow), 0.5))
                err = rng.random() < error_share
                out.append((end - dur, end, attrs, err, exception() if err else None))
        return out

    send(bf.grpc_target, spans(0, 30, 1.0, 0.002, lambda: TimeoutError("slow db")))
    v2 = {**RESOURCE, "service.version": "2.0.0", "vcs.ref.head.revision": "def456"}
    send(bf.grpc_target, spans(30, 45, 2.0, 0.05, lambda: ZeroDivisionError("oops")), resource=v2)
    assert bf.stop(signal.SIGTERM) == 0
    events = {e["type"]: e for e in stream(redis_client)}
    assert {"first_seen", "latency_regression", "error_regression", "new_exception"} <= set(events)
    for type_ in ("latency_regression", "error_regression", "new_exception"):
        e = events[type_]
        assert (e["service.version"], e["vcs.ref.head.revision"]) == ("2.0.0", "def456"), type_
        assert int(e["window.start"]) >= (T0 + 30 * SEC) // 10**6
        assert e["code.function.name"] == "shop.cart.apply_discount"
    latency = json.loads(events["latency_regression"]["detail"])
    assert latency["quantile"] == "p50" and 1.7 < latency["ratio"] < 2.3
    assert json.loads(events["new_exception"]["detail"])["exception_type"] == "ZeroDivisionError"
