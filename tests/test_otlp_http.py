"""OTLP/HTTP end to end: `backflow serve` as a subprocess with --otlp-http, spans sent with the
real OpenTelemetry SDK HTTP exporter (opentelemetry-exporter-otlp-proto-http) and as
hand-written protobuf and JSON bodies (JSON from the OTLP specification's example), and what
the receiver answers to everything else. Then the JSON conversion on its own: the same
request as protobuf, whatever the spelling the specification allows.
"""

from __future__ import annotations

import gzip
import http.client
import json
import signal
import socket
import time
import zlib

import pytest
import requests
from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from benchmarks.decode import otlp_json
from processor.devtools.redis_server import free_port
from processor.pipeline.location import location_key
from processor.receiver.decode import MalformedRequest
from processor.receiver.otlpjson import json_request
from tests.otlp import S, encoded
from tests.test_fastdecode import requests as random_requests
from tests.test_hostile import gzip_of_zeros, h2_send_allowed
from tests.test_overload import OVERLOAD_FLAGS, check_nothing_lost, overload
from tests.test_security import TOKEN, tls  # noqa: F401 (tls is a fixture)

pytestmark = pytest.mark.e2e

SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC  # 2023: in the past, as --max-clock-skew requires
PROTOBUF, JSON = "application/x-protobuf", "application/json"


def metric(name: str, **labels) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted({**labels, "transport": "http"}.items())) + "}"


ACCEPTED = metric("backflow_receiver_accepted_spans_total")
INVALID = metric("backflow_receiver_refused_spans_total", reason="invalid_span")


def refused_requests(reason: str) -> str:
    return metric("backflow_receiver_refused_requests_total", reason=reason)


def start(backflow, *extra, **kwargs):
    """``backflow serve`` with OTLP/HTTP on a free port: ``bf.http_port``, ``bf.traces_url``."""
    port = free_port()
    bf = backflow("--otlp-http", f"127.0.0.1:{port}", *extra, **kwargs)
    bf.http_port, bf.traces_url = port, f"http://127.0.0.1:{port}/v1/traces"
    return bf


def post(bf, body: bytes | None, content_type: str | None = PROTOBUF, path: str = "/v1/traces",
         method: str = "POST", headers: dict | None = None, conn: http.client.HTTPConnection | None = None):
    """One request; (status, headers, body). ``conn`` keeps a connection across calls."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", bf.http_port, timeout=30)
    hdrs = dict(headers or {})
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    try:
        conn.request(method, path, body=body, headers=hdrs,
                     encode_chunked="chunked" in hdrs.get("Transfer-Encoding", ""))
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        if own:
            conn.close()


def status_of(headers: dict, body: bytes) -> status_pb2.Status:
    """The google.rpc.Status of an error answer, in the encoding the answer says."""
    if headers["content-type"] == JSON:
        return json_format.Parse(body, status_pb2.Status())
    assert headers["content-type"] == PROTOBUF
    return status_pb2.Status.FromString(body)


def sdk_spans(service: str, version: str, n: int, offset: int = 0):
    """n finished SDK spans of one service: ten functions (one without code attributes, so
    keyed by its span name), an error and an exception now and then, spread over 60 s of
    event time."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({
        "service.name": service, "service.version": version, "deployment.environment.name": "prod"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("shop.tracer")
    for i in range(n):
        end = T0 + (i * 60 * SEC) // n + offset
        attrs = {} if i % 10 == 9 else {"code.function.name": f"{service}.f{i % 10}",
                                        "code.file.path": f"{service}.py", "code.line.number": i % 10}
        span = tracer.start_span(f"op{i % 10}", start_time=end - (1 + i % 17) * 1_000_000, attributes=attrs)
        if i % 13 == 0:
            span.add_event("exception", {"exception.type": f"E{i % 3}"}, timestamp=end)
        if i % 7 == 0:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end)
    provider.shutdown()
    return memory.get_finished_spans()


def redis_output(redis_client, prefix: str) -> tuple:
    """Everything a run wrote: the keys, each baseline, the events (without stream ids)."""
    keys = redis_client.smembers(f"{prefix}:keys")
    baselines = {k: redis_client.hgetall(f"{prefix}:baseline:{k}") for k in keys}
    events = [fields for _, fields in redis_client.xrange(f"{prefix}:events")]
    return keys, baselines, events


# --- the SDK's HTTP exporter -------------------------------------------------------------------

def test_the_sdk_http_exporter_gives_what_the_grpc_exporter_gives(backflow, redis_client):
    over_http = start(backflow, "--window", "10", prefix="viahttp")
    over_grpc = backflow("--window", "10", prefix="viagrpc")
    batches = [sdk_spans("shop", "1.0", 600), sdk_spans("cart", "2.1", 400, offset=7)]
    # gzip as the SDK writes it; the uncompressed body is the hand-written cases' below
    http_exporter = HttpSpanExporter(endpoint=over_http.traces_url, compression=Compression.Gzip)
    grpc_exporter = GrpcSpanExporter(endpoint=over_grpc.grpc_target, insecure=True)
    for spans in batches:
        for i in range(0, len(spans), 128):
            assert http_exporter.export(spans[i:i + 128]) == SpanExportResult.SUCCESS
            assert grpc_exporter.export(spans[i:i + 128]) == SpanExportResult.SUCCESS
    http_exporter.shutdown()
    grpc_exporter.shutdown()
    assert over_http.metrics()[ACCEPTED] == 1000
    assert over_http.stop() == 0 and over_grpc.stop() == 0  # SIGTERM: every window closes and is written

    keys, baselines, events = redis_output(redis_client, "viahttp")
    assert (keys, baselines, events) == redis_output(redis_client, "viagrpc")
    assert len(keys) == 20 and location_key("prod", "shop", "span:op9") in keys
    assert sum(int(b["count"]) for b in baselines.values()) == 1000
    assert sorted(e["type"] for e in events) == ["first_seen"] * 20


def http_exporter(target: str):
    return RecordingHttpExporter(endpoint=target, timeout=90)


class RecordingHttpExporter(HttpSpanExporter):
    """The SDK's HTTP exporter, recording for every export() (one per batch, the SDK's own
    retries inside) its result, its number of spans and each attempt's status, Retry-After
    and timing, through a response hook on the requests session it is given."""

    def __init__(self, **kwargs):
        self.attempts: list[tuple[int, str | None, float, float]] = []  # (status, Retry-After, start, end)
        self.exports: list[dict] = []
        session = requests.Session()
        session.hooks["response"].append(self._record)
        super().__init__(session=session, **kwargs)

    def _record(self, response, *args, **kwargs):
        end = time.monotonic()
        self.attempts.append((response.status_code, response.headers.get("Retry-After"),
                              end - response.elapsed.total_seconds(), end))

    def export(self, spans):
        first = len(self.attempts)
        result = super().export(spans)
        tries = self.attempts[first:]
        self.exports.append({
            "result": result.name, "spans": len(spans),
            "codes": [status for status, _, _, _ in tries],
            "retry_info": [float(after) for _, after, _, _ in tries[:-1]],
            "waits": [b[2] - a[3] for a, b in zip(tries, tries[1:])],
        })
        return result


def test_throttled_with_503_and_retry_after_the_sdk_loses_nothing(backflow, redis_client):
    """tests/test_overload.py's run over OTLP/HTTP: SDK HTTP exporters in processes of their
    own against a one-batch queue. The SDK (1.45) retries 429, 502, 503 and 504, waiting the
    Retry-After seconds where the answer has one (else 1, 2, 4, 8, 16 s with jitter), but
    makes at most six attempts per batch. With Backflow's 1 s, retries come back together
    and at the same pace however long the overload lasts: six senders (as over gRPC, whose
    exporter backs off exponentially) had batches refused five times in a row, one refusal
    from being dropped. Four keep the server overloaded with a margin to that limit."""
    bf = start(backflow, *OVERLOAD_FLAGS)
    out, samples, send_s = overload(bf, http_exporter, bf.traces_url, senders=4)
    exports = check_nothing_lost(bf, out, samples, send_s, "http", refused_code=503, ok_code=200)
    # Retry-After is honoured: the SDK's own backoff would wait 1.6 s or more before a second
    # retry, Retry-After says 1 s.
    later = [w for e in exports for w in e["waits"][1:]]
    assert not later or max(later) < 1.5, later


# --- hand-written bodies -----------------------------------------------------------------------

# opentelemetry-proto examples/trace.json, as it is there (numbers for the 64-bit times,
# upper-case hex ids).
SPEC_EXAMPLE = b"""{
  "resourceSpans": [
    {
      "resource": {
        "attributes": [
          {
            "key": "service.name",
            "value": {
              "stringValue": "my.service"
            }
          }
        ]
      },
      "scopeSpans": [
        {
          "scope": {
            "name": "my.library",
            "version": "1.0.0",
            "attributes": [
              {
                "key": "my.scope.attribute",
                "value": {
                  "stringValue": "some scope attribute"
                }
              }
            ]
          },
          "spans": [
            {
              "traceId": "5B8EFFF798038103D269B633813FC60C",
              "spanId": "EEE19B7EC3C1B174",
              "parentSpanId": "EEE19B7EC3C1B173",
              "name": "I'm a server span",
              "startTimeUnixNano": 1544712660000000000,
              "endTimeUnixNano": 1544712661000000000,
              "kind": 2,
              "attributes": [
                {
                  "key": "my.span.attr",
                  "value": {
                    "stringValue": "some value"
                  }
                }
              ]
            }
          ]
        }
      ]
    }
  ]
}"""


def spec_example_as_protobuf() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "my.service"
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = "my.library", "1.0.0"
    ss.scope.attributes.add(key="my.scope.attribute").value.string_value = "some scope attribute"
    sp = ss.spans.add(trace_id=bytes.fromhex("5B8EFFF798038103D269B633813FC60C"),
                      span_id=bytes.fromhex("EEE19B7EC3C1B174"), parent_span_id=bytes.fromhex("EEE19B7EC3C1B173"),
                      name="I'm a server span", start_time_unix_nano=1544712660000000000,
                      end_time_unix_nano=1544712661000000000, kind=2)
    sp.attributes.add(key="my.span.attr").value.string_value = "some value"
    return req


def test_the_specification_example_is_accepted_and_keyed_by_its_span_name(backflow, redis_client):
    bf = start(backflow)
    status, headers, body = post(bf, SPEC_EXAMPLE, JSON)
    assert (status, headers["content-type"], json.loads(body)) == (200, JSON, {})  # full success: nothing set
    assert bf.metrics()[ACCEPTED] == 1
    assert bf.stop() == 0
    key = location_key("", "my.service", "span:I'm a server span")
    assert redis_client.smembers("backflow:keys") == {key}
    baseline = redis_client.hgetall(f"backflow:baseline:{key}")
    assert (baseline["service.name"], baseline["code.function.name"], baseline["count"]) == \
        ("my.service", "span:I'm a server span", "1")
    assert baseline["p50_ms"].startswith(("99", "100", "1000"))  # 1 s, within the sketch's 1 %
    [event] = [fields for _, fields in redis_client.xrange("backflow:events")]
    assert (event["type"], event["otel.scope.name"]) == ("first_seen", "my.library")


def test_bodies_compressed_chunked_and_on_one_kept_alive_connection(backflow, redis_client):
    bf = start(backflow)
    proto = encoded([S(T0 + i * SEC, service="gz") for i in range(3)])
    as_json = otlp_json(encoded([S(T0 + i * SEC, service="gz") for i in range(3)]))
    deflated = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
    cases = [
        (proto, PROTOBUF, {}),
        (as_json, JSON, {}),
        (gzip.compress(proto), PROTOBUF, {"Content-Encoding": "gzip"}),
        (gzip.compress(as_json), JSON, {"Content-Encoding": "GZIP"}),
        (gzip.compress(proto[:10]) + gzip.compress(proto[10:]), PROTOBUF, {"Content-Encoding": "gzip"}),  # two members
        (deflated.compress(proto) + deflated.flush(), PROTOBUF, {"Content-Encoding": "deflate"}),
        (iter([proto[:7], proto[7:]]), PROTOBUF, {"Transfer-Encoding": "chunked"}),
        (as_json, "application/json; charset=utf-8", {}),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", bf.http_port, timeout=30)
    conn.connect()
    local = conn.sock.getsockname()
    for body, ctype, headers in cases:
        status, answer_headers, answer = post(bf, body, ctype, headers=headers, conn=conn)
        assert status == 200, (headers, answer)
        expect = ExportTraceServiceResponse().SerializeToString() if ctype == PROTOBUF else b"{}"
        assert answer == expect and "connection" not in answer_headers
    # bad data whose body was read leaves the connection usable too
    assert post(bf, b"\xff\xff", PROTOBUF, conn=conn)[0] == 400
    assert post(bf, proto, PROTOBUF, conn=conn)[0] == 200
    assert conn.sock.getsockname() == local, "the connection was not kept alive"
    conn.close()
    assert bf.metrics()[ACCEPTED] == 3 * (len(cases) + 1)


def test_partial_success_in_the_request_encoding(backflow, redis_client):
    bf = start(backflow)
    spans = [S(T0 + SEC, service="ps"), S(T0 + 2 * SEC, duration=-5, service="ps"), S(T0 + 3 * SEC, service="ps")]
    req = ExportTraceServiceRequest.FromString(encoded(spans))
    req.resource_spans[0].scope_spans[0].spans[2].trace_id = bytes(16)
    message = "2 spans rejected: 1 end before start, 1 trace_id not 16 bytes or zero"

    status, headers, body = post(bf, otlp_json(req.SerializeToString()), JSON)
    assert (status, headers["content-type"]) == (200, JSON)
    # the JSON mapping writes the int64 as a string
    assert json.loads(body) == {"partialSuccess": {"rejectedSpans": "2", "errorMessage": message}}

    status, headers, body = post(bf, req.SerializeToString(), PROTOBUF)
    assert (status, headers["content-type"]) == (200, PROTOBUF)
    response = ExportTraceServiceResponse.FromString(body)
    assert (response.partial_success.rejected_spans, response.partial_success.error_message) == (2, message)

    m = bf.metrics()
    assert (m[ACCEPTED], m[INVALID]) == (2, 4)


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def deep_json(depth: int) -> bytes:
    """A request whose one resource attribute nests ``depth`` key-value lists."""
    value: dict = {"stringValue": "x"}
    for _ in range(depth):
        value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    return json.dumps({"resourceSpans": [{"resource": {"attributes": [{"key": "a", "value": value}]}}]}).encode()


def test_what_is_not_an_otlp_request_gets_its_status_code(backflow, redis_client):
    """Each refusal with its status, its google.rpc.Status body (in the request's encoding)
    and its counter; then the server still takes a normal request and is healthy."""
    bf = start(backflow)  # default limits: 4 MiB requests
    limit = 4 * 1024 * 1024
    good = encoded([S(T0 + SEC, service="after")])

    def refused(expect: int, body, ctype=PROTOBUF, **kw) -> status_pb2.Status:
        status, headers, answer = post(bf, body, ctype, **kw)
        assert status == expect, (status, answer)
        assert headers["content-type"] == (PROTOBUF if ctype == PROTOBUF else JSON)
        return status_of(headers, answer)

    # 400, bad data: a google.rpc.Status with a BadRequest, counted as malformed
    for body, ctype, headers, says in [
        (b"\xff\xff\xff", PROTOBUF, {}, "not an OTLP ExportTraceServiceRequest"),
        (b'{"resourceSpans": [', JSON, {}, "not JSON"),
        (b"[]", JSON, {}, "expected an object"),
        (b'{"resourceSpans": {}}', JSON, {}, "resourceSpans: expected an array"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]}', JSON, {},
         "resourceSpans[0].scopeSpans[0].spans[0].traceId"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"endTimeUnixNano": "soon"}]}]}]}', JSON, {},
         "endTimeUnixNano"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\\ud800"}]}]}]}', JSON, {}, "name"),
        (b"\x1f\x8b not gzip", PROTOBUF, {"Content-Encoding": "gzip"}, "corrupt gzip body"),
        (gzip.compress(good)[:-12], PROTOBUF, {"Content-Encoding": "gzip"}, "gzip body cut short"),
        (b"[" * 100_000 + b"]" * 100_000, JSON, {}, "not JSON"),  # deeper than Python's recursion
        (deep_json(150), JSON, {}, "not an OTLP ExportTraceServiceRequest"),  # deeper than protobuf's 100
    ]:
        st = refused(400, body, ctype, headers=headers)
        assert st.code == code_pb2.INVALID_ARGUMENT and says in st.message, st.message
        assert st.details[0].Is(error_details_pb2.BadRequest.DESCRIPTOR)
    assert bf.metrics()[refused_requests("malformed")] == 11

    # 413: over the limit by Content-Length (refused before the body is sent), chunked, and
    # a gzip bomb (1 GiB of zeros in 1 MiB), inflated only up to the limit
    conn = http.client.HTTPConnection("127.0.0.1", bf.http_port, timeout=30)
    conn.putrequest("POST", "/v1/traces")
    conn.putheader("Content-Type", PROTOBUF)
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert (r.status, r.getheader("Connection")) == (413, "close")
    conn.close()
    raw = socket.create_connection(("127.0.0.1", bf.http_port), timeout=10)
    raw.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (limit + 1) + bytes(limit + 1))  # a chunk over it
    assert raw.recv(100).startswith(b"HTTP/1.1 413 ")
    raw.close()
    rss_before = _vm_hwm_kib(bf.proc.pid)
    t0 = time.monotonic()
    st = refused(413, gzip_of_zeros(1024), headers={"Content-Encoding": "gzip"})
    assert time.monotonic() - t0 < 5 and "larger than 4194304 bytes" in st.message
    assert _vm_hwm_kib(bf.proc.pid) - rss_before < 64 * 1024, "the bomb was inflated"
    assert bf.metrics()[refused_requests("too_large")] == 3

    # 404, 405, 411, 415: not counted (not OTLP requests at all)
    assert refused(404, good, path="/v1/logs").code == code_pb2.NOT_FOUND
    assert refused(404, good, JSON, path="/").code == code_pb2.NOT_FOUND
    status, headers, _ = post(bf, None, None, method="GET")
    assert (status, headers["allow"]) == (405, "POST")
    assert post(bf, good, method="PUT")[0] == 405
    raw = socket.create_connection(("127.0.0.1", bf.http_port), timeout=10)
    raw.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\r\n")
    assert raw.recv(100).startswith(b"HTTP/1.1 411 ")
    raw.close()
    assert "Content-Type must be" in refused(415, good, "text/plain").message
    assert "Content-Encoding must be" in refused(415, good, headers={"Content-Encoding": "br"}).message
    assert refused(415, good, None).code == code_pb2.INVALID_ARGUMENT  # no Content-Type at all

    # the server still serves
    assert post(bf, good, PROTOBUF)[0] == 200
    assert bf.metrics()[ACCEPTED] == 1 and bf.http_status("/healthz") == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_tls_and_token_as_on_the_grpc_port(backflow, redis_client, tls, workers, monkeypatch):  # noqa: F811
    # requests lets these override the CA file the exporter gives its session
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    bf = start(backflow, "--workers", str(workers), "--window", "10",
               "--tls-cert", str(tls["server"].cert), "--tls-key", str(tls["server"].key),
               env={"BACKFLOW_AUTH_TOKEN": TOKEN})
    url = f"https://127.0.0.1:{bf.http_port}/v1/traces"

    def export(headers=None, url=url, timeout=10):
        exporter = HttpSpanExporter(endpoint=url, certificate_file=str(tls["ca"]), headers=headers,
                                    timeout=timeout)
        try:
            return exporter.export(sdk_spans("shop", "1.0", 10))
        finally:
            exporter.shutdown()

    assert export({"authorization": f"Bearer {TOKEN}"}) == SpanExportResult.SUCCESS
    assert export() == SpanExportResult.FAILURE
    assert export({"authorization": f"Bearer {TOKEN}x"}) == SpanExportResult.FAILURE
    assert export({"authorization": f"Bearer {TOKEN}"}, url=bf.traces_url, timeout=3) == SpanExportResult.FAILURE
    # (with --workers 2 the counts are made in the receiver processes and relayed)
    m = bf.wait_for(lambda: (m := bf.metrics()).get(refused_requests("unauthenticated")) == 2 and m,
                    what="refusals counted")
    assert m[ACCEPTED] == 10
    # what the exporter was told: 401, and a challenge
    answer = requests.post(url, data=b"", headers={"Content-Type": PROTOBUF}, verify=str(tls["ca"]), timeout=10)
    assert (answer.status_code, answer.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert bf.stop(signal.SIGTERM) == 0
    assert "OTLP/HTTP listening" in bf.log and "TLS, bearer token required" in bf.log


# --- OTLP/JSON on its own ------------------------------------------------------------------------

def test_the_specification_example_is_the_same_request_as_protobuf():
    assert ExportTraceServiceRequest.FromString(json_request(SPEC_EXAMPLE)) == spec_example_as_protobuf()


def test_every_spelling_the_json_mapping_allows_gives_the_same_request():
    """Lower-case hex, 64-bit integers as strings, the proto field names, an enum by name,
    unknown fields (with any value) at every level, null for absent: all one request."""
    variant = json.loads(SPEC_EXAMPLE)
    rs = variant["resourceSpans"][0]
    variant["resource_spans"] = [rs]
    del variant["resourceSpans"]
    rs["scope_spans"] = rs.pop("scopeSpans")
    span = rs["scope_spans"][0]["spans"][0]
    span["trace_id"] = span.pop("traceId").lower()
    span["parent_span_id"] = span.pop("parentSpanId")
    span["startTimeUnixNano"] = str(span["startTimeUnixNano"])
    span["kind"] = "SPAN_KIND_SERVER"
    span["status"] = None
    for obj in (variant, rs, rs["resource"], rs["scope_spans"][0], span, span["attributes"][0]["value"]):
        obj["someFutureField"] = {"nested": [1, "x", None]}
    assert ExportTraceServiceRequest.FromString(json_request(json.dumps(variant).encode())) == \
        spec_example_as_protobuf()


def test_ids_of_the_wrong_length_are_left_to_the_decoder_to_refuse():
    # valid hex of the wrong length is a span the decoder refuses (partial success), as in protobuf
    body = b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"00ff","spanId":""}]}]}]}'
    span = ExportTraceServiceRequest.FromString(json_request(body)).resource_spans[0].scope_spans[0].spans[0]
    assert (span.trace_id, span.span_id) == (b"\x00\xff", b"")
    with pytest.raises(MalformedRequest, match="traceId"):
        json_request(b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"0f0"}]}]}]}')


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_requests())
def test_any_request_written_as_otlp_json_converts_back_to_itself(req):
    # (compared as text: a NaN double is not equal to itself)
    from google.protobuf import text_format

    back = ExportTraceServiceRequest.FromString(json_request(otlp_json(req.SerializeToString())))
    assert text_format.MessageToString(back) == text_format.MessageToString(req)


@pytest.mark.parametrize("use_tls", [False, True])
def test_silent_connections_are_capped_and_closed_on_both_ports(tls, use_tls):  # noqa: F811
    # Connections that never speak (nor finish a TLS handshake) cost a socket, not a thread:
    # at most max_connections of them, closed after the idle timeout; beyond the cap they are
    # closed at once and counted. A real request gets through once they are gone.
    import ssl
    import threading

    threads_before = threading.active_count()
    receiver, batches, metrics, port = _in_process_receiver(tls if use_tls else None, idle_timeout=1.0,
                                                            max_connections=50)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    try:
        time.sleep(0.5)
        assert threading.active_count() <= threads_before + 1  # the event loop's, no thread per connection
        refused = metrics.refused_requests.labels(transport="http", reason="too_many_connections")._value.get()
        assert refused == 10 and receiver.connections == 50
        for s in silent:  # every one is closed by the server: at once beyond the cap, else at the timeout
            s.settimeout(5)
            assert s.recv(1) == b""
        body = encoded([S(time.time_ns())])
        conn = (http.client.HTTPSConnection("localhost", port, timeout=5,
                                            context=ssl.create_default_context(cafile=str(tls["ca"])))
                if use_tls else http.client.HTTPConnection("127.0.0.1", port, timeout=5))
        conn.request("POST", "/v1/traces", body, {"Content-Type": PROTOBUF})
        assert conn.getresponse().status == 200 and len(batches) == 1
        conn.close()
        assert receiver.connections <= 1
    finally:
        for s in silent:
            s.close()
        receiver.stop(1.0)


def _in_process_receiver(tls_files=None, limit=1 << 20, **kw):
    """An HttpReceiver on a free port, taking into a list: (receiver, batches, metrics, port)."""
    from prometheus_client import CollectorRegistry

    from processor.receiver.http import HttpReceiver, tls_context
    from processor.receiver.intake import Intake
    from processor.sinks.prometheus import Metrics

    metrics = Metrics(CollectorRegistry())
    batches = []
    port = free_port()
    context = tls_context(str(tls_files["server"].cert), str(tls_files["server"].key)) if tls_files else None
    receiver = HttpReceiver(f"127.0.0.1:{port}", limit, Intake("http", batches.append, metrics), tls=context, **kw)
    receiver.start()
    return receiver, batches, metrics, port


def test_slow_clients_are_cut_off_and_do_not_hold_up_others():
    """A client trickling its headers is closed at the idle timeout although every read makes
    progress; one trickling its body gets 408 at the request timeout (counted from its
    headers, not from its last byte); meanwhile normal requests are answered at once."""
    import select

    receiver, batches, metrics, port = _in_process_receiver(idle_timeout=1.0, request_timeout=1.5)
    try:
        head = socket.create_connection(("127.0.0.1", port))
        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        head_closed = None
        while time.monotonic() - t0 < 3 and head_closed is None:  # a byte every 0.2 s
            try:
                if select.select([head], [], [], 0)[0] and head.recv(100) == b"":
                    raise ConnectionResetError
                head.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                head_closed = time.monotonic() - t0
            if time.monotonic() - t0 < 1.2:
                body.sendall(b"\0")
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("POST", "/v1/traces", encoded([S(time.time_ns())]), {"Content-Type": PROTOBUF})
                assert conn.getresponse().status == 200  # others are served while these trickle
                conn.close()
            time.sleep(0.2)
        assert head_closed is not None and 0.8 < head_closed < 2.0, head_closed
        body.settimeout(3)
        answer = body.recv(4096)
        took = time.monotonic() - t0
        while more := body.recv(4096):  # (the server closes the connection after it)
            answer += more
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
        assert b"request body not received within 1.5 s" in answer
        assert took < 2.2, "the body's deadline ran from its last byte, not from its headers"
        assert metrics.refused_requests.labels(transport="http", reason="timeout")._value.get() == 1
        assert len(batches) >= 3
    finally:
        receiver.stop(1.0)


def _h2_post(sock, body: bytes, authority: str) -> tuple[int, dict, bytes]:
    """One POST /v1/traces over HTTP/2 on ``sock`` (prior knowledge, or TLS with h2 by ALPN)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/v1/traces"),
                            (":authority", authority), ("content-type", PROTOBUF)])
    conn.send_data(sid, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    headers, data = {}, b""
    while True:
        chunk = sock.recv(1 << 16)
        assert chunk, "the server closed the HTTP/2 connection"
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                return int(headers[":status"]), headers, data
        sock.sendall(conn.data_to_send())


@pytest.mark.parametrize("use_tls", [False, True])
def test_http2_in_cleartext_and_over_tls(tls, use_tls):  # noqa: F811
    import ssl

    receiver, batches, _, port = _in_process_receiver(tls if use_tls else None)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if use_tls:
            context = ssl.create_default_context(cafile=str(tls["ca"]))
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock, server_hostname="localhost")
            assert sock.selected_alpn_protocol() == "h2"
        with sock:
            status, headers, data = _h2_post(sock, encoded([S(time.time_ns(), service="h2")]), f"127.0.0.1:{port}")
        assert (status, headers["content-type"]) == (200, PROTOBUF)
        assert data == ExportTraceServiceResponse().SerializeToString()
        assert [(b.versions[0][0], len(b.loc)) for b in batches] == [("h2", 1)]
    finally:
        receiver.stop(1.0)


def test_a_closed_connection_frees_its_place_under_the_cap_at_once():
    receiver, batches, metrics, port = _in_process_receiver(idle_timeout=30.0, max_connections=2)
    try:
        for _ in range(5):  # clients that connect, send one request, and close: 10 of them
            for _ in range(2):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/v1/traces", encoded([S(time.time_ns())]), {"Content-Type": PROTOBUF})
                assert conn.getresponse().status == 200
                conn.close()
            time.sleep(0.2)
        assert metrics.refused_requests.labels(transport="http", reason="too_many_connections")._value.get() == 0
        assert len(batches) == 10 and receiver.connections == 0
    finally:
        receiver.stop(1.0)


def test_an_http2_refusal_before_the_body_keeps_the_connection_for_other_streams():
    # A body over the limit by its content-length, streamed as flow control allows: the
    # refusal must not come while its data still arrives, or Hypercorn drops the connection
    # and the next stream on it with it.
    import h2.config
    import h2.connection
    import h2.events

    receiver, batches, _, port = _in_process_receiver(limit=400)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        statuses: dict[int, int] = {}

        def post(body: bytes, length: int | None = None) -> int:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/v1/traces"),
                                    (":authority", "x"), ("content-type", PROTOBUF),
                                    ("content-length", str(length or len(body)))])
            sent = 0
            while sid not in statuses:
                sent = h2_send_allowed(conn, sid, body, sent)
                sock.sendall(conn.data_to_send())
                data = sock.recv(1 << 16)
                assert data, "the server closed the HTTP/2 connection"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        statuses[ev.stream_id] = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            return statuses[sid]

        assert post(b"\0" * 300_000) == 413
        body = encoded([S(time.time_ns())])
        assert len(body) < 400 and post(body) == 200
        sock.close()
        assert len(batches) == 1
    finally:
        receiver.stop(1.0)
