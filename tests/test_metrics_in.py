"""OTLP metrics in (processor/receiver/metrics.py): the spanmetrics connector's duration
histogram and exception events fill the same windows as spans, cumulative series made
deltas; through a real ``backflow serve``, from the OpenTelemetry SDK's metrics exporter."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb

from processor.config import Config
from processor.pipeline.engine import Engine
from processor.pipeline.location import Location
from processor.receiver.decode import Batch
from processor.receiver.metrics import Deltas, ExpBuckets, decode_metrics, to_counts

SEC, MS = 1_000_000_000, 1_000_000
T0 = 1_700_000_000 * SEC
FN = "shop.cart.add"


def kv(**attrs) -> list[KeyValue]:
    out = []
    for k, v in attrs.items():
        x = KeyValue(key=k.replace("_", "."))
        x.value.string_value = str(v)
        out.append(x)
    return out


def exp_point(durations_ms, end_ns, start_ns=0, scale=4, **attrs) -> pb.ExponentialHistogramDataPoint:
    """A data point holding ``durations_ms``, as the SDK's exponential aggregation makes it."""
    dp = pb.ExponentialHistogramDataPoint(start_time_unix_nano=start_ns or end_ns - 10 * SEC,
                                          time_unix_nano=end_ns, scale=scale, count=len(durations_ms))
    idx = np.ceil(np.log2(np.asarray(durations_ms, float)) * 2 ** scale).astype(int) - 1  # (base^i, base^(i+1)]
    lo = int(idx.min())
    dp.positive.offset = lo
    dp.positive.bucket_counts.extend(np.bincount(idx - lo).tolist())
    dp.attributes.extend(kv(code_function_name=FN, **attrs))
    return dp


def request(points, cumulative=False, name="traces.span.metrics.duration", version="1.0") -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(service_name="shop", service_version=version,
                                     deployment_environment_name="prod"))
    m = rm.scope_metrics.add().metrics.add(name=name, unit="ms")
    m.exponential_histogram.aggregation_temporality = 2 if cumulative else 1
    m.exponential_histogram.data_points.extend(points)
    return req.SerializeToString()


def test_exponential_buckets_map_to_the_sketch_within_the_stated_error():
    rng = np.random.default_rng(1)
    durations = rng.lognormal(np.log(20), 0.5, 5000)
    batch = decode_metrics(request([exp_point(durations, T0 + 30 * SEC)]))
    (p,) = batch.points
    assert p.location == Location("prod", "shop", FN) and p.version == ("shop", "1.0", "") and not p.error
    counts = to_counts(batch, Deltas())
    assert counts.count.sum() == 5000 and (counts.end == T0 + 30 * SEC).all()
    from processor.pipeline.sketch import LogSketch, bucket_value

    sk = LogSketch(counts.bucket, counts.count.astype(float))
    exact = np.quantile(durations, [0.5, 0.99])
    got = sk.quantiles((0.5, 0.99)) / 1e6
    assert np.allclose(got, exact, rtol=2 ** (2 ** -4 / 2) - 1 + 0.01 + 0.01)  # the bucket's + the sketch's
    assert float(bucket_value(int(counts.bucket.min()))) > 0


def test_cumulative_series_become_deltas_and_a_reset_starts_over():
    d = Deltas()
    start = T0
    first = decode_metrics(request([exp_point([10] * 4, T0 + 10 * SEC, start)], cumulative=True))
    assert to_counts(first, d).count.sum() == 0  # (a first point: what came before)
    second = decode_metrics(request([exp_point([10] * 4 + [20] * 3, T0 + 20 * SEC, start)], cumulative=True))
    c = to_counts(second, d)
    assert c.count.sum() == 3 and len(set(c.bucket.tolist())) == 1  # the three of 20 ms
    reset = decode_metrics(request([exp_point([30] * 2, T0 + 30 * SEC, T0 + 25 * SEC)], cumulative=True))
    assert to_counts(reset, d).count.sum() == 2 and d.resets == 1
    # counts that go down with the same start: a reset too
    down = decode_metrics(request([exp_point([30], T0 + 40 * SEC, T0 + 25 * SEC)], cumulative=True))
    assert to_counts(down, d).count.sum() == 1 and d.resets == 2


def test_a_coarser_scale_in_a_later_cumulative_point_is_subtracted_at_that_scale():
    fine = ExpBuckets(scale=4, offset=60, counts=np.array([1, 2, 3, 4]))
    coarse = fine.at_scale(3)
    assert coarse.offset == 30 and coarse.counts.tolist() == [3, 7]
    later = ExpBuckets(scale=3, offset=30, counts=np.array([5, 7, 1]))
    assert later.minus(fine).counts.tolist() == [2, 0, 1]
    assert ExpBuckets(3, 30, np.array([1, 1])).minus(fine) is None  # (went down: a reset)


def test_errors_exceptions_and_what_is_not_read():
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(service_name="shop"))
    sm = rm.scope_metrics.add()
    h = sm.metrics.add(name="duration", unit="s")
    h.histogram.aggregation_temporality = 1
    dp = h.histogram.data_points.add(time_unix_nano=T0, count=3, explicit_bounds=[0.01, 0.1], bucket_counts=[1, 1, 1])
    dp.attributes.extend(kv(span_name="GET /cart", status_code="STATUS_CODE_ERROR"))
    ev = sm.metrics.add(name="traces.span.metrics.events")
    ev.sum.aggregation_temporality = 1
    edp = ev.sum.data_points.add(time_unix_nano=T0, as_int=2)
    edp.attributes.extend(kv(span_name="GET /cart", exception_type="KeyError"))
    sm.metrics.add(name="traces.span.metrics.calls").sum.data_points.add(time_unix_nano=T0, as_int=3)
    sm.metrics.add(name="duration", unit="h").histogram.data_points.add(time_unix_nano=T0)
    batch = decode_metrics(req.SerializeToString())
    assert batch.reasons == {"duration unit not ms, s, us or ns": 1}
    c = to_counts(batch, Deltas())
    assert c.locations == [Location("", "shop", "span:GET /cart")] and c.error.all() and c.count.sum() == 3
    # explicit bounds: the middles 5 ms and 55 ms, and 1.5 times the last bound: 150 ms
    from processor.pipeline.sketch import bucket_value

    assert np.allclose([float(bucket_value(b)) / 1e6 for b in sorted(c.bucket.tolist())], [5, 55, 150], rtol=0.011)
    assert c.exceptions == [(0, 0, T0, "KeyError", 2)]
    with pytest.raises(Exception, match="not an OTLP ExportMetricsServiceRequest"):
        decode_metrics(b"\xff\xff not protobuf")


def _spans(durations_ms, end_ns, version="1.0", error=False) -> Batch:
    n = len(durations_ms)
    end = np.full(n, end_ns, np.int64)
    tid = np.zeros((n, 16), np.uint8)
    tid[:, 0] = 1
    return Batch([Location("prod", "shop", FN)], [("shop", version, "")], np.zeros(n, np.int32),
                 np.zeros(n, np.int32), end - (np.asarray(durations_ms) * MS).astype(np.int64), end,
                 np.full(n, error), tid)


def test_windows_from_metrics_equal_those_from_the_same_spans_and_detectors_run_on_them():
    """Every detector runs unchanged: a version 2x slower at the median is a
    latency_regression from its histogram as from its spans."""
    rng = np.random.default_rng(7)
    cfg = Config.defaults(window=10.0, allowed_lateness=0.0, call_graph_wait=0.0)
    from processor.detect.registry import DetectorSettings

    cfg = Config.defaults(window=10.0, allowed_lateness=0.0, call_graph_wait=0.0,
                          detectors=DetectorSettings({("", "warmup_windows"): 5}))
    spans_engine, metrics_engine = Engine(cfg, known_keys=set()), Engine(cfg, known_keys=set())
    out = {"spans": [], "metrics": []}
    for w in range(30):
        version = "1.1" if w >= 20 else "1.0"
        d = rng.lognormal(np.log(20 * (2 if w >= 20 else 1)), 0.3, 300)
        end = T0 + w * 10 * SEC + 5 * SEC
        out["spans"] += spans_engine.ingest(_spans(d, end, version))
        out["metrics"] += metrics_engine.ingest_metrics(decode_metrics(request([exp_point(d, end)], version=version)))
    out["spans"] += spans_engine.flush_all()
    out["metrics"] += metrics_engine.flush_all()
    figures = {k: [(r.window.end_ns, lw.count, round(lw.sketch.quantile(0.5) / 1e6, 1))
                   for r in v for lw in r.window.locations] for k, v in out.items()}
    assert [f[:2] for f in figures["spans"]] == [f[:2] for f in figures["metrics"]]
    for (_, _, a), (_, _, b) in zip(figures["spans"], figures["metrics"]):
        assert b == pytest.approx(a, rel=0.04)
    events = {k: [(e.type, e.version[1]) for r in v for e in r.events if e.type != "first_seen"]
              for k, v in out.items()}
    assert ("latency_regression", "1.1") in events["spans"] and events["metrics"] == events["spans"]


@pytest.mark.e2e
@pytest.mark.parametrize("transport, workers", [("grpc", "1"), ("http", "1"), ("grpc", "2")])
def test_the_sdk_metrics_exporter_through_serve_fills_windows_and_baselines(backflow, redis_client, transport,
                                                                          workers):
    """The OpenTelemetry SDK's metrics exporter, delta temporality and exponential
    histograms (what deploy/collector/spanmetrics.yaml has the collector send), named and
    dimensioned as spanmetrics' duration histogram."""
    from opentelemetry.sdk.metrics import Histogram, MeterProvider
    from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
    from opentelemetry.sdk.resources import Resource

    from processor.pipeline.location import location_key

    from tests.conftest import free_port

    http_port = free_port()
    bf = backflow("--window", "10", "--allowed-lateness", "0", "--idle-timeout", "1",
                  "--otlp-http", f"127.0.0.1:{http_port}", "--workers", workers)
    if transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=bf.grpc_target, insecure=True,
                                      preferred_temporality={Histogram: AggregationTemporality.DELTA})
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=f"http://127.0.0.1:{http_port}/v1/metrics",
                                      preferred_temporality={Histogram: AggregationTemporality.DELTA})
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=Resource.create({"service.name": "shop", "service.version": "1.0",
                                                       "deployment.environment.name": "prod"}),
                             metric_readers=[reader],
                             views=[View(instrument_name="traces.span.metrics.duration",
                                         aggregation=ExponentialBucketHistogramAggregation())])
    hist = provider.get_meter("spanmetrics").create_histogram("traces.span.metrics.duration", unit="ms")
    rng = np.random.default_rng(3)
    for d in rng.lognormal(np.log(12), 0.4, 400):
        hist.record(float(d), {"code.function.name": FN, "code.file.path": "shop/cart.py",
                               "code.line.number": "7", "status.code": "STATUS_CODE_UNSET"})
    for d in rng.lognormal(np.log(12), 0.4, 40):
        hist.record(float(d), {"code.function.name": FN, "code.file.path": "shop/cart.py",
                               "code.line.number": "7", "status.code": "STATUS_CODE_ERROR"})
    assert reader.force_flush(30_000)
    provider.shutdown()
    key = location_key("prod", "shop", FN)
    # (the SDK stamps its points with the wall clock: the window closes as the service idles)
    base = bf.wait_for(lambda: redis_client.hgetall(f"backflow:baseline:{key}"), what="a baseline", timeout=30)
    assert base["code.file.path"] == "shop/cart.py" and base["service.version"] == "1.0"
    assert float(base["p50_ms"]) == pytest.approx(12, rel=0.15)
    m = bf.metrics()
    assert m[f'backflow_receiver_accepted_points_total{{transport="{transport}"}}'] == 2
    assert bf.stop(signal.SIGTERM) == 0
    summary = json.loads(redis_client.hget(f"backflow:versions:{key}", '["1.0", ""]'))
    assert (summary["calls"], summary["errors"]) == (440, 40)


@pytest.mark.e2e
def test_otlp_json_metrics_over_http_are_taken_and_a_bad_body_is_named(backflow, redis_client):
    import urllib.error
    import urllib.request

    from google.protobuf import json_format

    from tests.conftest import free_port

    port = free_port()
    bf = backflow("--otlp-http", f"127.0.0.1:{port}")
    req = ExportMetricsServiceRequest()
    req.ParseFromString(request([exp_point([10.0] * 5, T0 + 5 * SEC)]))

    def post(body: bytes):
        r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/metrics", data=body, method="POST",
                                   headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(r, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    status, _ = post(json_format.MessageToJson(req).encode())
    assert status == 200
    assert bf.metrics()['backflow_receiver_accepted_points_total{transport="http"}'] == 1
    status, body = post(b'{"resourceMetrics": "no"}')
    assert status == 400 and b"not OTLP/JSON metrics" in body


def test_hostile_histograms_are_refused_by_point_and_the_rest_taken():
    good = exp_point([10.0] * 3, T0)
    wild_scale = exp_point([10.0], T0)
    wild_scale.scale = 40
    huge = exp_point([10.0], T0)
    huge.positive.bucket_counts[0] = 2 ** 64 - 1
    far = exp_point([10.0], T0)
    far.positive.offset = 2 ** 31 - 10  # values far beyond a century: clipped, not overflowing
    batch = decode_metrics(request([good, wild_scale, huge, far]))
    assert batch.reasons == {"exponential scale out of range": 1, "histogram count out of range": 1}
    c = to_counts(batch, Deltas())
    assert c.count.sum() == 4 and np.isfinite(c.bucket).all()
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    h = rm.scope_metrics.add().metrics.add(name="duration", unit="ms").histogram
    h.data_points.add(time_unix_nano=T0, explicit_bounds=[5, 1], bucket_counts=[1, 1, 1])
    h.data_points.add(time_unix_nano=T0, explicit_bounds=[1, 5], bucket_counts=[1, 1])
    assert decode_metrics(req.SerializeToString()).rejected == 2


def test_what_could_stop_the_pipeline_is_refused_or_read_as_a_reset():
    """A time past the clock skew (or past 2^62 ns) is refused as a span's end is; a window of
    exception counts only closes; a cumulative series whose buckets jump far apart, or whose
    kind of histogram changes, is a reset, not a huge allocation or a crash."""
    from processor.receiver.decode import end_limit

    future = exp_point([10.0], T0)
    future.time_unix_nano = 2 ** 64 - 1
    batch = decode_metrics(request([future, exp_point([10.0], T0)]), end_limit(3600 * SEC))
    assert batch.reasons == {"clock_skew": 1} and len(batch) == 1
    # exception counts alone in a window, then the window closes
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(service_name="shop"))
    ev = rm.scope_metrics.add().metrics.add(name="traces.span.metrics.events")
    ev.sum.aggregation_temporality = 1
    ev.sum.data_points.add(time_unix_nano=T0 + 5 * SEC, as_int=2).attributes.extend(
        kv(code_function_name=FN, exception_type="KeyError"))
    ev.sum.data_points.add(time_unix_nano=T0 + 6 * SEC, as_double=float("nan")).attributes.extend(
        kv(code_function_name=FN, exception_type="KeyError"))
    eng = Engine(Config.defaults(window=10.0), known_keys=set())
    eng.ingest_metrics(decode_metrics(request([exp_point([10.0], T0 + 2 * SEC)])))
    events = decode_metrics(req.SerializeToString())
    assert events.reasons == {"events count not a finite count": 1}
    eng.ingest_metrics(events)
    eng.ingest_metrics(decode_metrics(request([exp_point([10.0], T0 + 45 * SEC)])))
    assert [r.window.end_ns for r in eng.flush_all()] == [T0 + 50 * SEC]
    # far-apart offsets, and another kind of histogram under the same name: resets
    d = Deltas()
    a = exp_point([10.0] * 2, T0 + 10 * SEC, T0)
    b = exp_point([10.0] * 3, T0 + 20 * SEC, T0)
    b.positive.offset = 2 ** 31 - 100
    for p in (a, b):
        to_counts(decode_metrics(request([p], cumulative=True)), d)
    assert d.resets == 1
    wide = ExpBuckets(4, -2 ** 31, np.array([1])).minus(ExpBuckets(4, 2 ** 31 - 10, np.array([1])))
    assert wide is None


def test_exemplars_of_a_point_become_the_windows_slowest_traces():
    ends = T0 + 30 * SEC
    dp = exp_point([5.0, 7.0, 120.0], ends)
    for ms, tid in ((120.0, b"\x01" * 16), (7.0, b"\x02" * 16), (1.0, b"short")):  # (an id not 16 bytes: left out)
        dp.exemplars.add(time_unix_nano=ends, as_double=ms, trace_id=tid)
    c = to_counts(decode_metrics(request([dp])), Deltas())
    _, _, _, dur, tid = c.exemplars
    assert dur.tolist() == [120 * MS, 7 * MS] and tid.tobytes() == b"\x01" * 16 + b"\x02" * 16
    engine = Engine(Config.defaults(window=60.0, allowed_lateness=0.0, exemplars=1), clock=lambda: 0.0)
    engine.ingest_metrics(decode_metrics(request([dp])))
    (result,) = engine.flush_all()
    (lw,) = result.window.locations
    assert lw.exemplars == ["01" * 16]
