"""Backpressure end to end: a real ``backflow serve`` with a one-batch queue, overloaded by
several OpenTelemetry SDK exporters (TracerProvider + BatchSpanProcessor + OTLPSpanExporter
over gRPC) sending in parallel. The server refuses with UNAVAILABLE while its queue is full;
the SDK retries, and in the end every span the SDK created is counted exactly once.

How the installed SDK retries (opentelemetry/exporter/otlp/proto/grpc/exporter.py, 1.45):
at most 6 attempts per batch, all within ``timeout`` seconds from the first one. Between
attempts it waits the RetryInfo delay if it finds one in the trailing metadata key
``google.rpc.retryinfo-bin``, else 2**n s with +-20 % jitter (1, 2, 4, 8, 16 s). Backflow
sends its RetryInfo the standard gRPC way, inside ``grpc-status-details-bin`` (a
google.rpc.Status), which this SDK does not read: so it backs off exponentially, and its
whole retry budget is about 1+2+4+8+16 = 31 s (37 s with jitter). ``timeout=90`` keeps the
deadline out of the way: a batch is only given up after six refusals in a row.

How the server is made easy to overload, with real settings only: ``--queue-batches 1``,
and ``--window 1`` with spans 10 ms apart in event time, so that windows close (baselines,
detectors, Redis writes) all through the run, as in benchmarks/ingest.py. No span can be
late all the same: each sender is its own service, and its spans reach the server in
event-time order (the BatchSpanProcessor exports oldest first and one batch at a time,
retries included), while windows are kept per service.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import traceback
from collections import Counter

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

pytestmark = pytest.mark.e2e

SEC = 1_000_000_000
MS = 1_000_000
T0 = 1_700_000_000 * SEC  # a window boundary, in the past: spans from the future are refused
GAP = 10 * MS             # event time between two spans of a sender: 100 spans per 1 s window

SENDERS = 6               # sender processes, one TracerProvider + exporter (and service) each
SPANS_PER_SENDER = 4_000
BATCH = 512               # max_export_batch_size: the spans of one OTLP request
FUNCTIONS = [f"shop.load.f{i}" for i in range(20)]



class _Attempts(grpc.UnaryUnaryClientInterceptor):
    """Sees every Export attempt of one exporter: its status code, when it ended, and the
    RetryInfo delay of an UNAVAILABLE answer (read from grpc-status-details-bin)."""

    def __init__(self):
        self.log: list[tuple[str, float, float, float | None]] = []  # (code, start, end, retry delay)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        started = time.monotonic()
        outcome = continuation(client_call_details, request)
        code, delay = outcome.code(), None
        if code == grpc.StatusCode.UNAVAILABLE:
            details = dict(outcome.trailing_metadata() or ()).get("grpc-status-details-bin")
            if details:
                status = status_pb2.Status.FromString(details)
                for any_ in status.details:
                    info = error_details_pb2.RetryInfo()
                    if status.code == code_pb2.UNAVAILABLE and any_.Unpack(info):
                        delay = info.retry_delay.ToTimedelta().total_seconds()
        self.log.append((code.name, started, time.monotonic(), delay))
        return outcome


class RecordingExporter(OTLPSpanExporter):
    """The SDK exporter, recording for every export() (one per batch, the SDK's own retries
    inside) its result, its number of spans and its gRPC attempts."""

    def __init__(self, **kwargs):
        self.attempts = _Attempts()
        self.exports: list[dict] = []
        super().__init__(**kwargs)

    def _initialize_channel_and_stub(self):
        # Called at construction and again by the SDK after an UNAVAILABLE (to reconnect).
        super()._initialize_channel_and_stub()
        self._channel = grpc.intercept_channel(self._channel, self.attempts)
        self._client = self._stub(self._channel)

    def export(self, spans):
        first = len(self.attempts.log)
        result = super().export(spans)
        tries = self.attempts.log[first:]
        self.exports.append({
            "result": result.name, "spans": len(spans),
            "codes": [code for code, _, _, _ in tries],
            "retry_info": [delay for _, _, _, delay in tries[:-1]],
            # how long the SDK waited before each retry (end of one attempt to the next)
            "waits": [b[1] - a[2] for a, b in zip(tries, tries[1:])],
        })
        return result


class _Hold(SpanProcessor):
    """Keeps the ended spans, so that they can all be handed to the exporting processor at
    once: creating spans is slow in Python, and a burst is what overloads the server."""

    def __init__(self):
        self.spans = []

    def on_end(self, span):
        self.spans.append(span)


def grpc_exporter(target: str) -> RecordingExporter:
    return RecordingExporter(endpoint=target, insecure=True, timeout=90)


def _send(make_exporter, target: str, sender: int, start, out) -> None:
    """One sender process, exporting through ``make_exporter(target)`` (which records its
    exports in ``.exports``). Processes, not threads: threads of one process share its GIL,
    and together they are not faster than the server."""
    try:
        exporter = make_exporter(target)
        # A queue big enough that the SDK never drops a span on its side.
        bsp = BatchSpanProcessor(exporter, max_queue_size=SPANS_PER_SENDER, max_export_batch_size=BATCH,
                                 schedule_delay_millis=50)
        hold = _Hold()
        provider = TracerProvider(resource=Resource.create({
            "service.name": f"shop{sender}", "deployment.environment.name": "prod",
            "service.version": "1.0"}))
        provider.add_span_processor(hold)
        tracer = provider.get_tracer("shop.tracer")
        for j in range(SPANS_PER_SENDER):
            end = T0 + SEC + j * GAP + sender
            fn = FUNCTIONS[(j + sender) % len(FUNCTIONS)]
            span = tracer.start_span("op", start_time=end - MS - (j % 97) * 10_000, attributes={
                "code.function.name": fn, "code.file.path": "shop/load.py", "code.line.number": 10 + j % 7})
            span.end(end_time=end)
        provider.shutdown()
        start.wait(60)  # all senders at once
        t0 = time.monotonic()
        try:
            for span in hold.spans:
                bsp.on_end(span)
            # Blocks until every queued span was exported, the SDK's retries included; only
            # then shut down (the exporter's shutdown aborts retries in progress).
            flushed = bsp.force_flush(120_000)
        finally:
            bsp.shutdown()
        out.put((sender, {"created": len(hold.spans), "flushed": flushed, "exports": exporter.exports,
                          "export_s": time.monotonic() - t0}))
    except BaseException:
        out.put((sender, {"error": traceback.format_exc()}))
        raise


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def overload(bf, make_exporter, target: str, senders: int = SENDERS) -> tuple[dict, dict, float]:
    """``senders`` sender processes export through ``make_exporter(target)`` all at once, while
    the server's queue gauge and resident memory are sampled. Returns each sender's result
    (see ``_send``), the samples and the seconds until every sender was done."""
    t_start = time.monotonic()
    samples: dict[str, list] = {"queue": [], "rss_kib": []}
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.is_set():
            try:
                samples["queue"].append(bf.metrics().get("backflow_queue_batches", 0.0))
                samples["rss_kib"].append(_rss_kib(bf.proc.pid))
            except OSError:
                pass
            stop_sampling.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    ctx = multiprocessing.get_context("spawn")  # no fork of a process with gRPC threads
    barrier, results = ctx.Barrier(senders), ctx.Queue()
    processes = [ctx.Process(target=_send, args=(make_exporter, target, i, barrier, results), daemon=True)
                 for i in range(senders)]
    for p in processes:
        p.start()
    out: dict = {}
    try:
        deadline = time.monotonic() + 150
        while len(out) < senders and time.monotonic() < deadline:
            try:
                sender, result = results.get(timeout=1)
            except queue.Empty:
                continue
            assert "error" not in result, f"sender {sender} failed:\n{result['error']}"
            out[sender] = result
    finally:
        for p in processes:
            p.join(10)
            if p.is_alive():
                p.kill()
        stop_sampling.set()
        sampler.join(5)
    assert sorted(out) == list(range(senders)), "a sender did not finish"
    return out, samples, time.monotonic() - t_start


# How the server is made easy to overload (see the module docstring).
OVERLOAD_FLAGS = ("--queue-batches", "1", "--window", "1", "--allowed-lateness", "2", "--idle-timeout", "600")


def test_overloaded_server_refuses_with_unavailable_and_the_sdk_loses_nothing(backflow, redis_client):
    bf = backflow(*OVERLOAD_FLAGS)
    out, samples, send_s = overload(bf, grpc_exporter, bf.grpc_target)
    check_nothing_lost(bf, out, samples, send_s, "grpc", refused_code="UNAVAILABLE", ok_code="OK")


def check_nothing_lost(bf, out: dict, samples: dict, send_s: float, transport: str, refused_code, ok_code) -> list:
    """What ``overload`` must end with, whatever the transport: every batch exported after
    refusals (``refused_code``, each with a retry delay of 1 s) and retries, each refused
    attempt counted, whole, as overloaded, and every span created accepted once and
    aggregated. Returns the exports."""
    accepted = f'backflow_receiver_accepted_spans_total{{transport="{transport}"}}'
    overloaded = f'backflow_receiver_refused_spans_total{{reason="overloaded",transport="{transport}"}}'
    invalid = f'backflow_receiver_refused_spans_total{{reason="invalid_span",transport="{transport}"}}'

    # The SDK side: every span created was handed to the exporter, and every batch was
    # finally exported with SUCCESS, after refusals (with a retry delay of 1 s) and retries.
    created = sum(o["created"] for o in out.values())
    assert created == len(out) * SPANS_PER_SENDER
    assert all(o["flushed"] for o in out.values())
    exports = [e for o in out.values() for e in o["exports"]]
    assert [e["result"] for e in exports if e["result"] != SpanExportResult.SUCCESS.name] == []
    assert sum(e["spans"] for e in exports) == created
    for e in exports:
        assert e["codes"] == [refused_code] * (len(e["codes"]) - 1) + [ok_code], e["codes"]
        assert e["retry_info"] == [1.0] * (len(e["codes"]) - 1)
    unavailable = sum(len(e["codes"]) - 1 for e in exports)
    assert unavailable > 0, "the server was never overloaded"

    # The server side, once its pipeline has caught up: ...
    m = bf.wait_for(lambda: (m := bf.metrics())["backflow_processed_spans_total"]
                    + m["backflow_late_spans_total"] == m.get(accepted) and m,
                    timeout=30, what="the pipeline to process every accepted span")
    # ... each refused attempt was counted, whole, as overloaded ...
    refused = m.get(overloaded, 0.0)
    assert refused == sum(e["spans"] * (len(e["codes"]) - 1) for e in exports) > 0
    assert m.get(invalid, 0.0) == 0
    # ... and every span the SDK created was accepted once and aggregated: none lost, none
    # counted twice, none late.
    assert m[accepted] == created
    assert m["backflow_processed_spans_total"] == created
    assert m["backflow_late_spans_total"] == 0
    # Memory stays bounded: the queue never held more than its one batch.
    assert samples["queue"] and max(samples["queue"]) <= 1

    per_batch = Counter(len(e["codes"]) for e in exports)
    waits: dict[int, list[float]] = {}
    for e in exports:
        for i, w in enumerate(e["waits"]):
            waits.setdefault(i + 1, []).append(w)
    print(f"\n{transport}: spans={created} batches={len(exports)} refused_attempts={unavailable} "
          f"refused_overloaded_spans={refused:.0f} attempts_per_batch={sorted(per_batch.items())} "
          "sdk_wait_before_retry_s={"
          + ", ".join(f"{n}: {min(w):.2f}-{max(w):.2f}" for n, w in sorted(waits.items())) + "} "
          f"export_s={max(o['export_s'] for o in out.values()):.1f} until_senders_done_s={send_s:.1f} "
          f"queue_max={max(samples['queue']):.0f} server_rss_max_mib={max(samples['rss_kib'] or [0]) / 1024:.0f}")
    return exports
