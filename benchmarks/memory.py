"""Per-location memory in the steady state: every location past warm-up, realistic sketches.

    python -m benchmarks.memory                 # 4,000 locations x 130 windows, about a minute
    python -m benchmarks.memory --locations 20000 --windows 130

The ingest benchmark's memory phase measures RSS per location on a real server after a few
spans per location (warm-up state, small sketches). This one drives the engine directly
(windows, baselines, detectors; no receiver, no Redis) through enough 60 s windows that
every detector is past warm-up, with 20 spans per location and window drawn from a
lognormal whose median drifts slowly, so baselines hold the tens to hundreds of buckets a
real latency distribution fills. It prints RSS per location and where it goes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time

import numpy as np

from processor.app import Engine
from processor.config import Config
from processor.location import Location
from processor.receiver.decode import Batch

SEC = 1_000_000_000
T0 = 1_700_000_040 * SEC  # a 60 s window boundary


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--locations", type=int, default=4000)
    p.add_argument("--windows", type=int, default=130, help="60 s windows (warm-up is 60)")
    p.add_argument("--spans", type=int, default=20, help="spans per location and window")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    engine = Engine(Config.defaults(allowed_lateness=0.0), known_keys=set())
    locs = [Location("prod", "shop", f"svc.module.Class.function_{i}") for i in range(args.locations)]
    rng = np.random.default_rng(0)
    k = args.spans
    base = rss()
    for w in range(args.windows):
        for lo in range(0, len(locs), 5000):
            sub = locs[lo:lo + 5000]
            n = len(sub) * k
            end = T0 + w * 60 * SEC + np.sort(rng.integers(0, 55 * SEC, n))
            dur = (rng.lognormal(np.log(20e6), 0.5, n) * np.exp(0.1 * np.sin(w / 10))).astype(np.int64)
            engine.ingest(Batch(
                locations=sub, versions=[("shop", "1.0", "")],
                loc=np.tile(np.arange(len(sub), dtype=np.int32), k), ver=np.zeros(n, np.int32),
                start=end - dur, end=end, error=rng.random(n) < 0.001,
                trace_id=np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16) | 1))
    engine.flush_all()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    per = (rss() - base) / len(locs)
    lid = engine.windows.tables.location_id(locs[len(locs) // 2])
    latency = next(d for d in engine.detectors[lid] if type(d).__name__ == "LatencyShift")
    baseline = engine.baselines.baselines[lid]
    print(f"steady-state RSS per location: {per:,.0f} B ({len(locs):,} locations, {args.windows} windows "
          f"of {k} spans each, {time.monotonic() - t0:.0f} s)")
    print(f"  baseline sketch buckets: {len(baseline.sketch.index)} (stage), "
          f"{len(latency.baseline.index)} (latency detector); 12 B per bucket when packed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
