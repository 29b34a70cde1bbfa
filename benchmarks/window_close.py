"""What a closed window costs the engine and its checkpoint, per location present in it.

    python -m benchmarks.window_close                      # 2,000 locations, 5% in each window
    python -m benchmarks.window_close --presence 1.0       # every location in every window

One service of ``--locations`` code locations, 10 s windows, 5 spans per present location;
all of them in the first window, then each present in a window with probability
``--presence`` (sparse locations: a few calls a minute). The engine is driven directly (no
receiver, no Redis) and a checkpoint's fields are taken after every window, as ``serve``
does with ``--checkpoint-interval 0``. It prints, past the first ``--skip`` windows, the
CPU (process time) per present location-window of the engine (windows, baselines,
detectors) and of the checkpoint (encoding what changed), median (min-max) over ``--runs``,
and the mean size of a location's checkpoint field.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from processor.config import Config
from processor.pipeline import checkpoint
from processor.pipeline.engine import Engine
from processor.pipeline.location import Location
from processor.receiver.decode import Batch

SEC = 1_000_000_000
T0 = 1_700_000_040 * SEC  # a 60 s window boundary
SPANS = 5


def window(locs: list[Location], w: int, presence: float, rng: np.random.Generator) -> Batch:
    sel = np.flatnonzero(rng.random(len(locs)) < presence) if w else np.arange(len(locs))
    n = len(sel) * SPANS
    end = T0 + w * 10 * SEC + np.sort(rng.integers(0, 9 * SEC, n))
    dur = rng.lognormal(np.log(5e6), 0.5, n).astype(np.int64)
    return Batch(locations=[locs[i] for i in sel], versions=[("shop", "1.0", "")],
                 loc=np.tile(np.arange(len(sel), dtype=np.int32), SPANS), ver=np.zeros(n, np.int32),
                 start=end - dur, end=end, error=np.zeros(n, bool),
                 trace_id=np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16) | 1)


def run(locations: int, presence: float, windows: int, skip: int, seed: int) -> tuple[float, float, float]:
    engine = Engine(Config.defaults(allowed_lateness=0.0, window=10.0), known_keys=set())
    locs = [Location("prod", "shop", f"shop.module.function_{i}") for i in range(locations)]
    rng = np.random.default_rng(seed)
    batches = [window(locs, w, presence, rng) for w in range(windows)]
    t_engine = t_checkpoint = 0.0
    pairs = fields = field_bytes = 0
    for w, batch in enumerate(batches):
        t0 = time.process_time()
        results = engine.ingest(batch)
        t1 = time.process_time()
        written = checkpoint.dumps_dirty(engine)
        t2 = time.process_time()
        if w > skip:
            t_engine += t1 - t0
            t_checkpoint += t2 - t1
            pairs += sum(len(r.window.locations) for r in results)
            sizes = [len(v) for k, v in written.items() if k.startswith("loc:")]
            fields, field_bytes = fields + len(sizes), field_bytes + sum(sizes)
    return t_engine / pairs * 1e6, t_checkpoint / pairs * 1e6, field_bytes / fields


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--locations", type=int, default=2000)
    p.add_argument("--presence", type=float, default=0.05, help="chance a location is in a window")
    p.add_argument("--windows", type=int, default=80)
    p.add_argument("--skip", type=int, default=40, help="windows not measured (warm-up)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    figures = [run(args.locations, args.presence, args.windows, args.skip, seed) for seed in range(args.runs)]

    def mmm(xs):
        return f"{statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f}) us"

    print(f"{args.locations:,} locations, {args.presence:.0%} present per window, windows {args.skip + 1}"
          f"-{args.windows - 1} of {args.windows}, {args.runs} runs; CPU per present location-window:")
    print(f"  engine:     {mmm([e for e, _, _ in figures])}")
    print(f"  checkpoint: {mmm([c for _, c, _ in figures])}   "
          f"({statistics.median([b for _, _, b in figures]):,.0f} bytes per location field)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
