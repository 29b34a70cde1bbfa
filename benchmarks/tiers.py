"""What two tiers cost: the aggregate tier's spans per CPU-second, the detect tier's
partials (and the spans they stand for) per CPU-second, and a window's close with N
aggregate replicas.

    python -m benchmarks.tiers                 # 3 runs, about 4 minutes
    python -m benchmarks.tiers --quick         # 1 run

1. **Tiers against one process**, real processes (benchmarks/ingest.py's Stack and clients):
   the ingest benchmark's workload (``--locations`` code locations, ``--spans`` spans, 60 s
   windows, traces of 6 spans) sent to one ``backflow serve`` (role both), then the same to
   a ``--role aggregate`` process that forwards to a ``--role detect`` process. Prints per
   run: spans per CPU-second of the process of role both, of the aggregate process, and of
   the detect process (spans its partials stand for), the data points the aggregate sent,
   and the ratios measured in the same run.
2. **Close with N replicas**, in process: one service's window of ``--close-locations``
   locations, its partials from N aggregate replicas (each holding a share of the window's
   spans over every location, as trace-id routing gives), into a detect engine past its
   warm-up; the CPU of taking those partials and closing the window (decode, merge, close,
   baselines, detectors), against N = 1, median (min-max) over ``--runs``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import numpy as np

from benchmarks.ingest import Stack, Workload, proc_cpu_seconds, run_clients, stop_process, wait_processed
from processor.config import Config
from processor.pipeline.engine import Engine
from processor.pipeline.location import Location
from processor.pipeline.tiers import partials
from processor.pipeline.window import WindowStage
from processor.receiver.decode import Batch
from processor.receiver.metrics import decode_metrics

SEC = 1_000_000_000


def _workload(args) -> tuple[Workload, int]:
    lanes = 2 * 4
    w = Workload(lanes=lanes, locations=args.locations, spans_min=512, spans_max=1000, gap_ns=int(0.0001 * 1e6),
                 seed=args.seed, coverage="zipf", templates=6, trace_size=6)
    return w, max(1, math.ceil(args.spans / 756 / lanes))


def _feed(stack: Stack, args) -> tuple[int, float]:
    """Send the workload to ``stack``; the spans accepted and when the sending began."""
    w, per_lane = _workload(args)
    r = run_clients(w, 2, 4, per_lane, 60 * SEC, stack.target, 600.0, None)
    return r["spans"] - r["rejected"], r["first"]


def tiers_run(args, tmp: str) -> dict:
    with Stack(tmp, "both", ["--workers", "1"]) as both:
        cpu0 = proc_cpu_seconds(both.pid)
        spans, _ = _feed(both, args)
        wait_processed(both, spans, 0.05)
        both_cpu = proc_cpu_seconds(both.pid) - cpu0
    with Stack(tmp, "detect", ["--workers", "1", "--role", "detect", "--replica-wait", "600"]) as detect, \
            Stack(tmp, "aggregate", ["--workers", "1", "--role", "aggregate", "--forward", detect.target]) as agg:
        d0, a0 = proc_cpu_seconds(detect.pid), proc_cpu_seconds(agg.pid)
        spans2, _ = _feed(agg, args)
        wait_processed(agg, spans2, 0.05)
        agg_cpu = proc_cpu_seconds(agg.pid) - a0
        stop_process(agg.server, timeout=60)  # SIGTERM: its open windows go on as partials
        wait_processed(detect, spans2, 0.05)
        points = sum(v for k, v in detect.metrics().items() if k.startswith("backflow_receiver_accepted_points_total"))
        detect_cpu = proc_cpu_seconds(detect.pid) - d0
    return {"spans": spans, "both": spans / both_cpu, "aggregate": spans2 / agg_cpu, "detect": spans2 / detect_cpu,
            "points": points, "points_per_s": points / detect_cpu, "agg_ratio": (spans2 / agg_cpu) / (spans / both_cpu),
            "detect_ratio": (spans2 / detect_cpu) / (spans / both_cpu)}


def close_run(args, replicas: int, seed: int) -> float:
    """CPU seconds per window close at the detect engine, its partials from ``replicas``."""
    rng = np.random.default_rng(seed)
    cfg = Config.defaults(window=60.0, allowed_lateness=0.0, idle_timeout=1e9, replica_wait=1e9,
                          replica_timeout=1e9, call_graph_wait=0.0)
    detect = Engine(cfg, clock=lambda: 0.0)
    detect.replicas.settle = 0.0  # (its clock stands still: every replica reports from the first window)
    stages = []
    for _ in range(replicas):
        w = WindowStage(cfg.window_ns, 0, 1e9, cfg.exemplars, clock=lambda: 0.0)
        w.partial = True
        stages.append(w)
    locations = [Location("bench", "svc", f"svc.module.f{i}") for i in range(args.close_locations)]
    per_loc = args.close_spans
    n = len(locations) * per_loc
    t0 = 1_700_000_000 * SEC
    cpu = []
    for win in range(args.close_windows):
        end = t0 + win * cfg.window_ns + rng.integers(0, cfg.window_ns - SEC, n)
        dur = (rng.lognormal(np.log(5e6), 0.6, n)).astype(np.int64)
        loc = np.repeat(np.arange(len(locations), dtype=np.int32), per_loc)
        tid = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        replica = rng.integers(0, replicas, n)
        requests = []
        for i, w in enumerate(stages):
            rows = np.flatnonzero(replica == i)
            closed = w.ingest(Batch(locations, [("svc", "1.0", "")], loc[rows], np.zeros(len(rows), np.int32),
                                    end[rows] - dur[rows], end[rows], np.zeros(len(rows), bool), tid[rows]))
            marks = {("bench", "svc"): (c.closed_through, len(c.windows)) for c in w.services.values()}
            requests += [data for data, _ in partials(closed, marks, f"r{i}", cfg.window_ns)]
        c0 = time.process_time()
        closed = sum(len(detect.ingest_metrics(decode_metrics(data))) for data in requests)
        if win >= 2:  # (the first windows make the locations: not a steady close)
            assert closed == 1, f"window {win}: {closed} closed"  # (what is measured is a close)
            cpu.append(time.process_time() - c0)
    return statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one run of each")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--locations", type=int, default=2000, help="code locations of the tiers' workload")
    p.add_argument("--spans", type=int, default=600_000, help="spans of the tiers' workload")
    p.add_argument("--close-locations", type=int, default=5000, help="locations of the window closed")
    p.add_argument("--close-spans", type=int, default=20, help="spans per location and window closed")
    p.add_argument("--close-windows", type=int, default=6)
    p.add_argument("--replicas", default="1,3,10", help="aggregate replicas of the close (default 1,3,10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip-tiers", action="store_true")
    args = p.parse_args(argv)
    runs = 1 if args.quick else args.runs

    def mmm(xs, fmt="{:,.0f}"):
        return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"

    if not args.skip_tiers:
        with tempfile.TemporaryDirectory() as tmp:
            rs = [tiers_run(args, tmp) for _ in range(runs)]
        print(f"tiers: {rs[0]['spans']:,} spans over {args.locations:,} locations, 60 s windows; "
              f"{runs} runs, median (min-max)")
        print(f"  role both, spans per CPU-second:                 {mmm([r['both'] for r in rs])}")
        print(f"  aggregate process, spans per CPU-second:         {mmm([r['aggregate'] for r in rs])}")
        print(f"    against role both (same run):                  {mmm([r['agg_ratio'] for r in rs], '{:.2f}')}")
        print(f"  detect process, spans its partials stand for:    {mmm([r['detect'] for r in rs])}")
        print(f"    against role both (same run):                  {mmm([r['detect_ratio'] for r in rs], '{:.2f}')}")
        print(f"    data points (partials, watermarks) per CPU-s:  {mmm([r['points_per_s'] for r in rs])}")
        print(f"    spans per data point:                          "
              f"{mmm([r['spans'] / r['points'] for r in rs if r['points']], '{:.1f}')}")
    counts = [int(x) for x in args.replicas.split(",")]
    by_n = {k: [] for k in counts}
    for seed in range(runs):
        for k in counts:  # (interleaved: the machine's drift falls on every N alike)
            by_n[k].append(close_run(args, k, args.seed + seed))
    print(f"close: one window of {args.close_locations:,} locations x {args.close_spans} spans, its partials from N "
          f"aggregate replicas into the detect engine; CPU ms per close, median (min-max) of {runs} runs")
    base = by_n[counts[0]]
    for k in counts:
        ratio = [a / b for a, b in zip(by_n[k], base)]
        print(f"  N = {k:>2}: {mmm([x * 1e3 for x in by_n[k]], '{:.0f}')} ms, "
              f"{mmm(ratio, '{:.2f}')} x N = {counts[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
