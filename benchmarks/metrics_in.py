"""What OTLP metrics in costs: data points per server CPU-second, and the spans they stand for.

    python -m benchmarks.metrics_in                  # 2,000 locations, 40 flushes, 3 runs

A real redis-server and ``backflow serve`` (benchmarks/ingest.py's Stack); one client
sends what a collector fleet's spanmetrics connector would
(deploy/collector/spanmetrics.yaml): every ``--flush`` seconds of event time, one delta
exponential-histogram data point per location (``--locations`` of them in 32 services,
``--spans`` spans each, lognormal durations, scale 5 as the connector keeps for such a
spread), ``--points`` data points per request, over gRPC, as fast as the server takes them.
Windows are the default 60 s, so they close as event time moves on. Prints, median
(min-max) over ``--runs``: data points per server CPU-second, the spans they stand for per
server CPU-second, and end-to-end points per second until all are in windows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import grpc
import numpy as np
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from benchmarks.ingest import Stack, proc_cpu_seconds, wait_processed

EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC
SERVICES = 32


def _kv(key: str, value: str) -> KeyValue:
    x = KeyValue(key=key)
    x.value.string_value = value
    return x


def requests(args, rng) -> tuple[list[bytes], int, int]:
    """The requests (in order), the data points and the spans they hold."""
    scale = 5
    out, points, spans = [], 0, 0
    per_service = max(1, args.locations // SERVICES)
    for f in range(args.flushes):
        end = T0 + (f + 1) * int(args.flush * SEC)
        batch: list = []
        for loc in range(args.locations):
            d = rng.lognormal(np.log(5 + loc % 50), 0.5, args.spans)
            idx = np.ceil(np.log2(d) * 2 ** scale).astype(int) - 1
            lo = int(idx.min())
            batch.append((loc // per_service % SERVICES, loc, lo, np.bincount(idx - lo).tolist()))
            spans += args.spans
            points += 1
        for i in range(0, len(batch), args.points):
            req = ExportMetricsServiceRequest()
            by_service: dict[int, list] = {}
            for row in batch[i:i + args.points]:
                by_service.setdefault(row[0], []).append(row)
            for s, rows in by_service.items():
                rm = req.resource_metrics.add()
                rm.resource.attributes.extend([_kv("service.name", f"svc{s}"), _kv("service.version", "1.0"),
                                               _kv("deployment.environment.name", "bench")])
                m = rm.scope_metrics.add().metrics.add(name="traces.span.metrics.duration", unit="ms")
                h = m.exponential_histogram
                h.aggregation_temporality = 1
                for _, loc, lo, counts in rows:
                    dp = h.data_points.add(start_time_unix_nano=end - int(args.flush * SEC), time_unix_nano=end,
                                           scale=scale, count=args.spans)
                    dp.positive.offset = lo
                    dp.positive.bucket_counts.extend(counts)
                    dp.attributes.extend([_kv("code.function.name", f"svc{s}.module.f{loc}"),
                                          _kv("status.code", "STATUS_CODE_UNSET")])
            out.append(req.SerializeToString())
    return out, points, spans


def run(args, seed: int) -> dict:
    reqs, points, spans = requests(args, np.random.default_rng(seed))
    with tempfile.TemporaryDirectory() as tmp, Stack(tmp, "metrics-in", ["--workers", "1"]) as stack:
        cpu0 = proc_cpu_seconds(stack.pid)
        t0 = time.monotonic()
        with grpc.insecure_channel(stack.target) as ch:
            export = ch.unary_unary(EXPORT)
            for body in reqs:
                while True:
                    try:
                        export(body, timeout=30)
                        break
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.UNAVAILABLE:
                            raise
                        time.sleep(0.05)
        done = wait_processed(stack, spans, 0.05)
        cpu = proc_cpu_seconds(stack.pid) - cpu0
        return {"points_per_cpu_s": points / cpu, "spans_per_cpu_s": spans / cpu,
                "points_per_s": points / (done["t"] - t0), "points": points, "spans": spans}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--locations", type=int, default=2000)
    p.add_argument("--flushes", type=int, default=40, help="flushes of the fleet (default 40: 10 minutes)")
    p.add_argument("--flush", type=float, default=15.0, help="event-time seconds between flushes (default 15)")
    p.add_argument("--spans", type=int, default=200, help="spans per data point (default 200)")
    p.add_argument("--points", type=int, default=1000, help="data points per request (default 1000)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    runs = [run(args, seed) for seed in range(args.runs)]

    def f(key: str) -> str:
        v = [r[key] for r in runs]
        return f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})"
    print(f"metrics-in benchmark: {args.locations:,} locations x {args.flushes} flushes of {args.flush:g} s, "
          f"{args.spans} spans a point, {args.points} points a request, {args.runs} runs; median (min-max)")
    print(f"  data points per server CPU-second:      {f('points_per_cpu_s')}")
    print(f"  spans they stand for per CPU-second:    {f('spans_per_cpu_s')}")
    print(f"  data points per second, end to end:     {f('points_per_s')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
