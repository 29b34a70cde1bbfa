"""Hostile and broken input against one real ``backflow serve`` (a subprocess, with the
session's redis-server): random and mutated OTLP bytes, attribute values of megabytes,
invalid UTF-8, NaN and infinite numbers, zero, reversed, negative and far-future
timestamps, a gzip bomb, a flood of tiny requests and an explosion of distinct function
names. Each case checks its outcome (status, partial success, counters), then that the
server still serves: a normal span is accepted and counted, the pipeline catches up with
everything accepted, /healthz answers 200. The server runs with the default limits
(4 MiB requests, --max-clock-skew 3600, --max-attribute-length 4096), a small
--max-locations and a small queue, so that backpressure happens too.

docs/hostile-input.md has the table of what Backflow does with each input.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import threading
import time
import zlib
from collections import Counter

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from benchmarks.ingest import explosion_requests, proc_status_kb, retry_delay
from processor.pipeline.location import location_key
from processor.receiver.decode import REASON_LABELS, MalformedRequest, decode_request, end_limit
from tests.conftest import BackflowProcess
from tests.otlp import S, encoded, mutated, request

pytestmark = pytest.mark.e2e

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SEC = 1_000_000_000
MAX_LOCATIONS = 2_000
SKEW_NS = 3600 * SEC        # the defaults of --max-clock-skew and --max-attribute-length,
MAX_ATTRIBUTE_LENGTH = 4096  # which the server runs with
# BACKFLOW_HOSTILE_NAMES=1000000 for the full million; the default keeps CI quick
NAMES = int(os.environ.get("BACKFLOW_HOSTILE_NAMES", "100000"))
EXAMPLES = int(os.environ.get("BACKFLOW_FUZZ_EXAMPLES", "80"))

ACCEPTED = 'backflow_receiver_accepted_spans_total{transport="grpc"}'
MALFORMED = 'backflow_receiver_refused_requests_total{reason="malformed",transport="grpc"}'
PROCESSED, LATE = "backflow_processed_spans_total", "backflow_late_spans_total"
KEYS, OVERFLOW = "backflow_active_keys", "backflow_overflow_spans_total"


def refused(reason: str) -> str:
    return f'backflow_receiver_refused_spans_total{{reason="{reason}",transport="grpc"}}'


@pytest.fixture(scope="module")
def server(redis_server):
    bf = BackflowProcess(redis_server.url, "--max-locations", str(MAX_LOCATIONS), "--queue-batches", "4",
                         prefix="hostile").start()
    yield bf
    # after everything, it still shuts down cleanly (open windows closed and written)
    assert bf.stop() == 0, bf.log


@pytest.fixture(scope="module")
def channel(server):
    # No client-side size limit: requests over the server's limit must reach the server.
    with grpc.insecure_channel(server.grpc_target, options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def rclient(redis_server):
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield r
    r.close()


class Delta:
    """The server's counters since this was made: what one case added."""

    def __init__(self, bf: BackflowProcess):
        self.bf, self.before = bf, bf.metrics()

    def __call__(self, name: str) -> float:
        return self.bf.metrics().get(name, 0.0) - self.before.get(name, 0.0)


def export(ch: grpc.Channel, data: bytes, **kwargs) -> tuple[grpc.StatusCode, ExportTraceServiceResponse | None]:
    """One Export call with raw bytes (no serializer): (status, response); UNAVAILABLE is
    retried, after checking it carries the RetryInfo delay (1 s, not waited for here)."""
    while True:
        try:
            raw = ch.unary_unary(EXPORT)(data, timeout=60, **kwargs)
            return grpc.StatusCode.OK, ExportTraceServiceResponse.FromString(raw)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                return e.code(), None
            assert retry_delay(e, None) == 1.0
            time.sleep(0.01)


_canaries = itertools.count()


def settle(bf: BackflowProcess) -> dict:
    """Waits until the pipeline has taken every span accepted so far; the metrics then."""
    return bf.wait_for(lambda: (m := bf.metrics())[PROCESSED] + m[LATE] == m[ACCEPTED] and m,
                       timeout=60, what="the pipeline to take every accepted span")


def assert_still_serving(bf: BackflowProcess, ch: grpc.Channel) -> None:
    assert bf.proc.poll() is None, "the server exited"
    delta = Delta(bf)
    # a span of its own service, now: never late, whatever the cases before sent
    span = S(time.time_ns(), function=f"canary.f{next(_canaries) % 3}", service="canary")
    code, resp = export(ch, encoded([span]))
    assert code == grpc.StatusCode.OK and resp.partial_success.rejected_spans == 0
    assert delta(ACCEPTED) == 1
    settle(bf)
    assert delta(LATE) == 0
    assert bf.http_status("/healthz") == 200


def now_ns() -> int:
    return time.time_ns()


# --- 1. random and mutated bytes ---------------------------------------------------------

class Predicted:
    """Sends raw requests, each with the outcome predicted by decoding it here with the
    server's decoder and limits: INVALID_ARGUMENT when it does not parse, else OK with the
    refused spans in partial success. ``check`` compares the server's counters with the sums."""

    def __init__(self, bf: BackflowProcess, ch: grpc.Channel):
        self.bf, self.ch, self.delta = bf, ch, Delta(bf)
        self.malformed = self.accepted = self.sent = 0
        self.refused: Counter = Counter()

    def send(self, data: bytes) -> None:
        try:
            expected = decode_request(data, end_limit(SKEW_NS), MAX_ATTRIBUTE_LENGTH)
        except MalformedRequest:
            expected = None
        code, resp = export(self.ch, data)
        self.sent += 1
        if expected is None:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, data)
            self.malformed += 1
            return
        assert code == grpc.StatusCode.OK, (code, data)
        assert resp.partial_success.rejected_spans == expected.rejected, data
        assert resp.partial_success.error_message == expected.error_message()
        self.accepted += len(expected)
        for why, n in expected.reasons.items():
            self.refused[REASON_LABELS[why]] += n

    def check(self) -> None:
        assert self.delta(MALFORMED) == self.malformed
        assert self.delta(ACCEPTED) == self.accepted
        for label in set(REASON_LABELS.values()):
            assert self.delta(refused(label)) == self.refused[label], label
        print(f"\n{self.sent} requests: {self.malformed} malformed, {self.accepted} spans accepted, "
              f"refused {dict(self.refused)}")


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def test_random_bytes_get_invalid_argument_or_their_partial_success(server, channel):
    p = Predicted(server, channel)

    @FUZZ
    @given(st.binary(max_size=400))
    def send(data):
        p.send(data)

    send()
    p.send(b"\xff" * 1000)
    p.check()
    assert p.malformed > 0
    assert_still_serving(server, channel)


@st.composite
def valid_requests(draw) -> bytes:
    """A request of spans ending in the last minute (accepted unless a mutation changes that)."""
    now = now_ns()
    spans = draw(st.lists(st.builds(
        lambda fn, svc, ago, err: S(now - ago, function=fn, service=svc, error=err,
                                    exceptions=("TimeoutError",) if err else (),
                                    attrs={"code.file.path": "app/h.py", "code.line.number": 12}),
        st.sampled_from(["app.h.get", "app.h.put", None]), st.sampled_from(["fuzz-a", "fuzz-b"]),
        st.integers(0, 60 * SEC), st.booleans()), min_size=1, max_size=5))
    return encoded(spans)


def test_mutated_requests_get_invalid_argument_or_their_partial_success(server, channel):
    p = Predicted(server, channel)

    @FUZZ
    @given(mutated(valid_requests()))
    def send(data):
        p.send(data)

    send()
    # Both outcomes once for sure: the mutations may happen to break every request (one run
    # in many sent 80 malformed), and the check below must see both paths taken.
    p.send(encoded([S(now_ns() - SEC, function="app.h.get", service="fuzz-a")]))
    p.send(b"\xff" * 1000)
    p.check()
    assert p.malformed > 0 and p.accepted > 0
    assert_still_serving(server, channel)


# --- 3. attribute values of megabytes ------------------------------------------------------

def test_attribute_values_of_megabytes(server, channel):
    now, mib = now_ns(), 1 << 20
    settle(server)
    delta = Delta(server)
    # An attribute Backflow does not read: the span is kept, only the request is large.
    code, resp = export(channel, encoded([S(now, function="mb.ok", service="mb",
                                            attrs={"http.request.body": "b" * 3 * mib})]))
    assert code == grpc.StatusCode.OK and resp.partial_success.rejected_spans == 0
    # Values Backflow would keep (Redis fields, Prometheus labels): the span is refused,
    # the other spans of the request are kept.
    long_spans = {
        "function": S(now, service="mb", function="f" * mib),
        "file": S(now, service="mb", function="mb.file", attrs={"code.file.path": "p" * 2 * mib}),
        "span name": S(now, service="mb", function=None, name="n" * mib),
        "exception type": S(now, service="mb", function="mb.exc", exceptions=("E" * mib,)),
        "multi-byte function": S(now, service="mb", function="ü" * (MAX_ATTRIBUTE_LENGTH + 1)),
    }
    for what, span in long_spans.items():
        spans = [S(now, service="mb", function="mb.before"), span, S(now, service="mb", function="mb.after")]
        code, resp = export(channel, encoded(spans))
        assert code == grpc.StatusCode.OK, what
        assert resp.partial_success.rejected_spans == 1, what
        assert resp.partial_success.error_message == "1 spans rejected: 1 attribute value too long"
    # A service name of a megabyte: every span of its resource is refused.
    code, resp = export(channel, encoded([S(now, service="s" * mib), S(now + 1, service="s" * mib)]))
    assert code == grpc.StatusCode.OK and resp.partial_success.rejected_spans == 2
    # At the limit exactly (in characters, not bytes): kept.
    code, resp = export(channel, encoded([S(now, service="mb", function="ü" * MAX_ATTRIBUTE_LENGTH)]))
    assert code == grpc.StatusCode.OK and resp.partial_success.rejected_spans == 0
    assert delta(refused("attribute_too_long")) == len(long_spans) + 2
    assert delta(ACCEPTED) == 1 + 2 * len(long_spans) + 1

    # Over the 4 MiB request limit: gRPC answers RESOURCE_EXHAUSTED before Backflow's handler
    # runs, so Backflow cannot count it; nothing else is counted either.
    before = server.metrics()
    code, _ = export(channel, encoded([S(now, service="mb", attrs={"pad": "x" * 5 * mib})]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = server.metrics()
    assert {k: v for k, v in after.items() if k.startswith("backflow_receiver_")} == \
        {k: v for k, v in before.items() if k.startswith("backflow_receiver_")}

    # Only the short locations were made: mb.ok, mb.before, mb.after and the one at the limit.
    server.wait_for(lambda: delta(KEYS) == 4, what="four new locations")
    assert settle(server)[PROCESSED] - delta.before[PROCESSED] == delta(ACCEPTED)
    assert_still_serving(server, channel)


# --- 4. invalid UTF-8, NaN and infinities, timestamps -----------------------------------------

MARK = "\x01" + "M" * 14 + "\x01"


@pytest.mark.parametrize("where", ["function", "service", "span name", "other attribute key"])
def test_invalid_utf8_is_invalid_argument(server, channel, where):
    span = {"function": S(now_ns(), function=MARK), "service": S(now_ns(), service=MARK),
            "span name": S(now_ns(), function=None, name=MARK),
            "other attribute key": S(now_ns(), attrs={MARK: 1})}[where]
    data = encoded([S(now_ns()), span])
    assert data.count(MARK.encode()) == 1
    delta = Delta(server)
    code, _ = export(channel, data.replace(MARK.encode(), b"\xc3\x28 \xed\xa0\x80 \xff".ljust(len(MARK), b" ")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # protobuf refuses the whole request
    assert (delta(MALFORMED), delta(ACCEPTED)) == (1, 0)
    assert_still_serving(server, channel)


def test_nan_and_infinite_numbers_are_kept_as_python_writes_them(server, channel, rclient):
    now = now_ns()
    ago = now - 10 * 60 * SEC  # a window that the next span of the service closes
    spans = [S(ago, service="numbers", function="num.line", attrs={"code.line.number": float("nan")}),
             S(ago, service="numbers", function=None, attrs={"code.function": float("inf"),
                                                             "code.lineno": float("-inf")}),
             S(ago, service="numbers", function=None, attrs={"code.namespace": float("nan"),
                                                             "code.function": "f"})]
    code, resp = export(channel, encoded(spans))
    assert code == grpc.StatusCode.OK and resp.partial_success.rejected_spans == 0
    code, _ = export(channel, encoded([S(now, service="numbers", function="num.line")]))
    assert code == grpc.StatusCode.OK

    def first_seen():
        events = [f for _, f in rclient.xrange("hostile:events") if f["service.name"] == "numbers"]
        return {f["code.function.name"]: f for f in events} if len(events) == 3 else None

    events = server.wait_for(first_seen, what="the first_seen events of the numbers service")
    assert set(events) == {"num.line", "inf", "nan.f"}
    assert events["num.line"]["code.line.number"] == "nan"
    assert events["inf"]["code.line.number"] == "-inf"
    assert events["inf"]["key"] == location_key("prod", "numbers", "inf")
    assert_still_serving(server, channel)


def test_zero_reversed_negative_and_future_timestamps(server, channel):
    now = now_ns()
    year_2100 = 4_102_444_800 * SEC
    cases = [  # (start, end, reason or None when the span is kept)
        (now + 1, now, "invalid_span"),                    # ends before it starts
        (0, now, "invalid_span"),                          # no start time
        (now, 0, "invalid_span"),                          # no end time
        (1, 2 ** 64 - 1, "clock_skew"),                    # "-1" as the unsigned it is on the wire
        (year_2100, year_2100 + SEC, "clock_skew"),        # a clock far ahead
        (now + 2 * 3600 * SEC, now + 2 * 3600 * SEC + 1, "clock_skew"),  # beyond the hour allowed
        (now - SEC, now, None),
    ]
    req = request([S(end, end - start, service="clock") for start, end, _ in cases])
    for sp, (start, end, _) in zip(req.resource_spans[0].scope_spans[0].spans, cases):
        sp.start_time_unix_nano, sp.end_time_unix_nano = start, end  # as they are, even if odd
    delta = Delta(server)
    code, resp = export(channel, req.SerializeToString())
    assert code == grpc.StatusCode.OK
    assert resp.partial_success.rejected_spans == 6
    assert "3 end time too far in the future" in resp.partial_success.error_message
    assert (delta(refused("invalid_span")), delta(refused("clock_skew")), delta(ACCEPTED)) == (3, 3, 1)

    # The refused year-2100 span did not move the service's watermark: its next span is on time.
    code, _ = export(channel, encoded([S(now_ns(), service="clock")]))
    assert code == grpc.StatusCode.OK
    settle(server)
    assert delta(LATE) == 0
    # Within the allowed skew a span is kept, and moves its service's watermark with it.
    code, resp = export(channel, encoded([S(now_ns() + 1800 * SEC, service="clock-ahead"),
                                          S(now_ns(), service="clock-ahead")]))
    assert code == grpc.StatusCode.OK and resp.partial_success.rejected_spans == 0
    # The far past is kept (replays are legitimate): a service's first span opens its window
    # there; behind a service's watermark it is late, counted and dropped as any late span.
    code, resp = export(channel, encoded([S(1000, 999, service="clock-1970"), S(1000, 999, service="clock")]))
    assert code == grpc.StatusCode.OK and resp.partial_success.rejected_spans == 0
    settle(server)
    assert delta(LATE) == 2  # clock-ahead's span of now, and clock's of 1970
    assert_still_serving(server, channel)


# --- 6. a gzip bomb -------------------------------------------------------------------------

def gzip_of_zeros(mib: int) -> bytes:
    """A valid gzip stream of ``mib`` MiB of zeros, built without compressing them all: one
    deflated MiB ending in a full flush (so that it can be repeated), repeated."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(chunk, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + block * mib + b"\x03\x00" + struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)


def h2_send_allowed(conn: h2.connection.H2Connection, sid: int, body: bytes, sent: int) -> int:
    """Queue as much of ``body`` after ``sent`` bytes as the peer's flow-control window
    allows, the last frame ending the stream; the bytes sent so far."""
    while sent < len(body):
        n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(body) - sent)
        if n <= 0:
            break
        conn.send_data(sid, body[sent:sent + n], end_stream=sent + n == len(body))
        sent += n
    return sent


def h2_export(target: str, message: bytes, compressed: bool) -> dict[str, str]:
    """One Export call written frame by frame over HTTP/2 (h2), so that the message can be a
    gzip stream made here: gRPC's own client compresses what it is given. Returns the
    response's headers and trailers (grpc-status, grpc-message)."""
    host, port = target.rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    headers = [(":method", "POST"), (":scheme", "http"), (":path", EXPORT), (":authority", target),
               ("content-type", "application/grpc"), ("te", "trailers")]
    if compressed:
        headers.append(("grpc-encoding", "gzip"))
    body = struct.pack(">BI", int(compressed), len(message)) + message
    out: dict[str, str] = {}
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers)
        sent, ended = 0, False
        while not ended:
            sent = h2_send_allowed(conn, sid, body, sent)
            sock.sendall(conn.data_to_send())
            data = sock.recv(1 << 16)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    out.update((k.decode(), v.decode()) for k, v in ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
    return out


def test_a_gzip_bomb_is_refused_without_inflating(server, channel):
    delta = Delta(server)
    # The raw HTTP/2 client's request is what gRPC expects: a small gzip request is accepted.
    small = zlib.compressobj(6, zlib.DEFLATED, 31)
    small = small.compress(encoded([S(now_ns(), service="gz")])) + small.flush()
    assert h2_export(server.grpc_target, small, compressed=True)["grpc-status"] == "0"
    assert delta(ACCEPTED) == 1

    bomb = gzip_of_zeros(1024)  # 1 GiB of zeros in about 1 MiB
    assert len(bomb) < 1.1 * (1 << 20)
    pid = server.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    hwm0 = proc_status_kb(pid, "VmHWM")
    t0 = time.monotonic()
    answer = h2_export(server.grpc_target, bomb, compressed=True)
    seconds = time.monotonic() - t0
    hwm1 = proc_status_kb(pid, "VmHWM")
    # gRPC decompresses up to the 4 MiB limit and stops: RESOURCE_EXHAUSTED, before Backflow's
    # handler (not counted by Backflow), and the server's peak memory hardly moves.
    assert answer["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), answer
    assert "larger than max" in answer.get("grpc-message", "")
    assert hwm1 - hwm0 < 64 * 1024, f"peak RSS grew by {(hwm1 - hwm0) / 1024:.0f} MiB"
    # A gzip stream cut short is gRPC's INTERNAL error, also before Backflow's handler.
    assert h2_export(server.grpc_target, small[:-9], compressed=True)["grpc-status"] == \
        str(grpc.StatusCode.INTERNAL.value[0])
    assert delta(ACCEPTED) == 1 and delta(MALFORMED) == 0
    print(f"\ngzip bomb: {len(bomb):,} B -> 1 GiB, answered in {seconds:.2f} s, "
          f"peak RSS {hwm0 / 1024:.0f} -> {hwm1 / 1024:.0f} MiB")
    assert_still_serving(server, channel)


# --- 7. a flood of tiny requests -------------------------------------------------------------

def test_a_flood_of_tiny_requests_is_answered_and_counted(server, channel):
    threads, per_thread = 8, 250
    settle(server)
    delta = Delta(server)
    tallies = [Counter() for _ in range(threads)]
    errors: list = []

    def flood(t: int) -> None:
        # A channel of its own (its own connection) and a service of its own, whose spans
        # go out in event-time order: none can be late.
        opts = [("grpc.use_local_subchannel_pool", 1)]
        try:
            with grpc.insecure_channel(server.grpc_target, options=opts) as ch:
                call = ch.unary_unary(EXPORT)
                for j in range(per_thread):
                    data = encoded([S(now_ns(), service=f"flood{t}", function=f"flood.f{j % 5}")])
                    while True:
                        try:
                            resp = ExportTraceServiceResponse.FromString(call(data, timeout=60))
                            assert resp.partial_success.rejected_spans == 0
                            tallies[t]["ok"] += 1
                            break
                        except grpc.RpcError as e:
                            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                            assert retry_delay(e, None) == 1.0  # the RetryInfo OTLP exporters honour
                            tallies[t]["unavailable"] += 1
                            time.sleep(0.01)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    t0 = time.monotonic()
    workers = [threading.Thread(target=flood, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.monotonic() - t0
    assert not errors, errors
    total = sum(tallies, Counter())
    assert total["ok"] == threads * per_thread
    settle(server)
    # every request answered, every span accepted once and aggregated, refusals counted
    assert delta(ACCEPTED) == delta(PROCESSED) == threads * per_thread
    assert delta(LATE) == 0
    assert delta(refused("overloaded")) == total["unavailable"]
    print(f"\nflood: {threads * per_thread} one-span requests from {threads} connections in "
          f"{seconds:.1f} s, {total['unavailable']} UNAVAILABLE (retried)")
    assert_still_serving(server, channel)


# --- 5. distinct function names beyond --max-locations (last: it fills the locations) --------

def test_distinct_function_names_stay_within_max_locations(server, channel):
    m0 = settle(server)
    assert m0.get(OVERFLOW, 0) == 0 and m0[KEYS] < MAX_LOCATIONS
    room = MAX_LOCATIONS - int(m0[KEYS])
    delta = Delta(server)
    pid = server.proc.pid
    rss0, t0 = proc_status_kb(pid, "VmRSS"), time.monotonic()
    requests = 0
    for data in explosion_requests(NAMES):  # 1,000 spans each, every one a new function name
        code, resp = export(channel, data)
        assert code == grpc.StatusCode.OK and resp.partial_success.rejected_spans == 0
        requests += 1
    sent = requests * 1000
    m1 = settle(server)
    seconds = time.monotonic() - t0
    rss1, hwm = proc_status_kb(pid, "VmRSS"), proc_status_kb(pid, "VmHWM")
    # the limit, plus the service's one __overflow__ location; the rest counted as overflow
    assert m1[KEYS] == MAX_LOCATIONS + 1
    assert delta(ACCEPTED) == sent == math.ceil(NAMES / 1000) * 1000
    assert delta(OVERFLOW) == sent - room
    assert delta(LATE) == 0
    assert rss1 - rss0 < 150 * 1024, f"RSS grew by {(rss1 - rss0) / 1024:.0f} MiB"
    print(f"\n{sent:,} distinct function names in {seconds:.1f} s ({sent / seconds:,.0f} spans/s): "
          f"{int(m1[KEYS]):,} locations held, {delta(OVERFLOW):,.0f} spans as overflow, "
          f"RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB (peak {hwm / 1024:.0f} MiB)")
    assert_still_serving(server, channel)
