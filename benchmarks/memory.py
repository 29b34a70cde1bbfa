"""Per-location memory in the steady state: every detector past warm-up, realistic sketches.

    python -m benchmarks.memory                    # 100,000 locations, a few minutes
    python -m benchmarks.memory --locations 4000   # quick
    python -m benchmarks.memory --locations 4000 --warmup 0 --windows 130 --spans 20 --sigma 0.5
                                                   # the configuration's warm-up, 130 windows

It drives the engine directly (windows, baselines, detectors; no receiver, no Redis) through
60 s windows of one service (the worst case: all its locations' window figures are alive
together while its window is evaluated), every location called in every window, and prints
the RSS per location at the end (Location objects included), with where it goes.

What it chooses so that 100,000 locations take minutes rather than an hour (the engine
costs a few hundred microseconds per location and window):

- Warm-up: ``--warmup`` windows (default 1) for every detector, the scaling detector's
  included, instead of the configured 30 and 60. Past warm-up a detector's state has the
  same parts whatever the warm-up was: version watches made, the scaling ring made at its
  full size, the baseline sketch shared or not. ``--windows`` (default 5) leaves 4 judged
  windows after it, in which suspect segments fill as they do later. ``--warmup 0`` keeps
  the configuration's (then use ``--windows 130`` or so).
- Tails: ``min_tail_expected`` 0.5 instead of 20, so that the p99 and p99.9 watches are live
  (with their segments) as at a location whose baseline holds 20,000 spans or more; with
  ``--warmup 0`` the configured value stays.
- Sketches: what a baseline costs is its number of buckets, which grows with the spans seen
  and the spread of the distribution. ``--spans`` per location and window (default 60)
  from a lognormal of sigma ``--sigma`` (default 1.0) whose median drifts slowly give about
  150 buckets over the 5 windows, as 2,600 spans of sigma 0.5 do; the bucket count is printed.

At 4,000 locations these choices give a little more per location than the configured
warm-up over 130 windows of 20 spans of sigma 0.5 (the third command above), not less.

The breakdown sizes the objects each part of the engine holds (deep sizes, shared objects
once, rounded to the allocators' block sizes; a sample of locations for the per-location
parts); the rest of the RSS is what the allocators hold beyond that: free blocks and pages
between live ones, mostly left from the window figures of a whole service being alive
together at each window close.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import marshal
import sys
import time
import types
from array import array

import numpy as np

from processor.pipeline.engine import Engine
from processor.config import Config
from processor.detect.registry import DetectorSettings
from processor.pipeline.location import Location
from processor.receiver.decode import Batch

SEC = 1_000_000_000
T0 = 1_700_000_040 * SEC  # a 60 s window boundary
CHUNK = 5000  # locations per batch


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def config(warmup: int) -> Config:
    values = {} if warmup <= 0 else {("", "warmup_windows"): warmup, ("scaling", "warmup_windows"): warmup,
                                     ("latency", "min_tail_expected"): 0.5}
    return Config.defaults(allowed_lateness=0.0, detectors=DetectorSettings(values))


def drive(engine: Engine, locs: list[Location], windows: int, spans: int, sigma: float,
          rng: np.random.Generator) -> None:
    for w in range(windows):
        drift = np.exp(0.1 * np.sin(w / 10))
        for lo in range(0, len(locs), CHUNK):
            sub = locs[lo:lo + CHUNK]
            n = len(sub) * spans
            end = T0 + w * 60 * SEC + np.sort(rng.integers(0, 55 * SEC, n))
            dur = (rng.lognormal(np.log(20e6), sigma, n) * drift).astype(np.int64)
            engine.ingest(Batch(
                locations=sub, versions=[("shop", "1.0", "")],
                loc=np.tile(np.arange(len(sub), dtype=np.int32), spans), ver=np.zeros(n, np.int32),
                start=end - dur, end=end, error=rng.random(n) < 0.001,
                trace_id=np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16) | 1))
    engine.flush_all()


# --- sizes ---------------------------------------------------------------------------------------

def block(n: int) -> int:
    """Bytes an allocation of ``n`` takes: pymalloc's 16 B classes up to 512 B, glibc's
    chunks (8 B header, 16 B alignment) above."""
    return (n + 15) & ~15 if n <= 512 else (n + 8 + 15) & ~15


_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
_MANAGED_DICT = 1 << 4  # Py_TPFLAGS_MANAGED_DICT: attribute values kept beside the object


def deep_size(roots, seen: set[int]) -> int:
    """Bytes of everything reachable from ``roots`` not already in ``seen`` (which it fills)."""
    total = 0
    stack = list(roots)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, _SKIP):
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            if o.dtype == object:
                stack.extend(o.ravel().tolist())
            if o.base is None:
                total += block(sys.getsizeof(o) - o.nbytes) + block(o.nbytes)
            else:
                total += block(sys.getsizeof(o))
                stack.append(o.base)
            continue
        if isinstance(o, array):
            total += block(sys.getsizeof(o) - o.itemsize * o.buffer_info()[1]) + block(o.itemsize * len(o))
            continue
        size = sys.getsizeof(o)
        refs = gc.get_referents(o)
        if type(o).__flags__ & _MANAGED_DICT:
            size += block(8 * len(refs) + 16)
        total += block(size)
        stack.extend(refs)
    return total


def shared_objects(engine: Engine) -> set[int]:
    """Objects that every location's state may point to without owning them (configuration,
    versions), marked as seen so that no location is charged for them."""
    seen: set[int] = set()
    deep_size([engine.cfg, engine.windows.tables.versions, engine.version_first_seen], seen)
    deep_size([d.__dict__ for d in engine.detectors.prototypes], seen)
    return seen


def breakdown(engine: Engine, n_locations: int, sample: int = 2000) -> list[tuple[str, float, bool]]:
    """(part, bytes per location, whether it adds to the total) for each part of the engine:
    per-location objects sized on a sample of locations, the containers holding them in full."""
    seen = shared_objects(engine)
    out = []
    pick = np.linspace(0, n_locations - 1, min(sample, n_locations)).astype(int).tolist()

    def sampled(name, objects):
        out.append((name, deep_size(objects, seen) / len(pick), True))

    tables = engine.windows.tables
    stage = engine.baselines
    sampled("code locations: Location objects and their strings", [tables.locations[i] for i in pick])
    sampled("baseline sketches", [stage.sketches[i] for i in pick])
    columns = (stage.figures, stage.sketches, stage.updated_ns, stage.versions, stage.locations)
    out.append(("baseline figures (columns of the baseline stage)",
                sum(block(sys.getsizeof(c)) for c in columns) / n_locations, True))
    store = engine.detectors
    frozen = [store.frozen[i] for i in pick]
    sampled("detectors, frozen between windows (one bytes object)", frozen)
    # each detector's share of those bytes: its state marshalled alone
    states = [marshal.loads(f) for f in frozen]
    for j, proto in enumerate(store.prototypes):
        if j not in store.columns:
            size = sum(len(marshal.dumps(s[j])) for s in states) / len(pick)
            out.append((f"    of which {type(proto).__name__}", size, False))
    for j, cols in store.columns.items():
        seen.add(id(cols.det))  # (the prototype: configuration, not state)
        out.append((f"detectors kept as columns: {type(store.prototypes[j]).__name__}",
                    deep_size([cols], seen) / n_locations, True))
    # The sample stands for every location: what the others hold is not charged again below.
    for loc in tables.locations:
        seen.update((id(loc), id(loc.key), id(loc.function)))
    containers = [store.frozen, engine.first_seen.known, *engine.service_locations.values()]
    held = sum(block(sys.getsizeof(c)) for c in containers)
    seen.update(map(id, containers))
    held += sum(block(sys.getsizeof(k)) for k in engine.first_seen.known if id(k) not in seen)
    out.append(("engine's per-location lists", held / n_locations, True))
    out.append(("window stage's tables (ids, series)", deep_size([tables], seen) / n_locations, True))
    return out


def allocators() -> dict[str, int]:
    """Resident bytes in the heap (glibc) and in anonymous mappings (pymalloc's arenas,
    large allocations), from /proc/self/smaps."""
    res = {"heap": 0, "anon": 0}
    kind = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split()
                kind = "heap" if parts[-1] == "[heap]" else "anon" if len(parts) == 5 else None
            elif head == "Rss:" and kind:
                res[kind] += int(line.split()[1]) * 1024
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--locations", type=int, default=100_000)
    p.add_argument("--warmup", type=int, default=1,
                   help="warm-up windows of every detector (0: the configuration's, 30 and 60)")
    p.add_argument("--windows", type=int, default=5, help="60 s windows")
    p.add_argument("--spans", type=int, default=60, help="spans per location and window")
    p.add_argument("--sigma", type=float, default=1.0, help="spread of log latency")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    cfg = config(args.warmup)
    engine = Engine(cfg, known_keys=set())
    # The detectors' confirming tests load scipy on first use: a one-time cost, not a location's.
    import scipy.stats  # noqa: F401
    libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    libc.malloc_trim(0)
    base, base_alloc = rss(), allocators()
    # made after the baseline measurement: a server's Location objects are its own too
    locs = [Location("prod", "shop", f"svc.module.Class.function_{i}") for i in range(args.locations)]
    drive(engine, locs, args.windows, args.spans, args.sigma, np.random.default_rng(0))
    gc.collect()
    libc.malloc_trim(0)
    n = len(locs)
    per = (rss() - base) / n
    alloc = {k: (v - base_alloc[k]) / n for k, v in allocators().items()}
    elapsed = time.monotonic() - t0
    judged = args.windows - (args.warmup if args.warmup > 0 else cfg.detectors.scaling.warmup_windows)
    print(f"steady-state RSS per location: {per:,.0f} B ({n:,} locations, {args.windows} windows "
          f"of {args.spans} spans each, {judged} past warm-up; {elapsed:.0f} s)")
    print(f"  resident: {alloc['heap']:,.0f} B in the heap, {alloc['anon']:,.0f} B in anonymous "
          f"mappings (pymalloc's arenas, large blocks)")
    parts = breakdown(engine, n)
    for name, size, _ in parts:
        print(f"  {size:8,.0f} B  {name}")
    held = sum(size for _, size, counts in parts if counts)
    print(f"  {per - held:8,.0f} B  allocators' free blocks and pages between live ones, interpreter")
    lid = engine.windows.tables.location_id(locs[n // 2])
    latency = next(d for d in engine.detectors_of(lid) if type(d).__name__ == "LatencyShift")
    baseline = engine.baselines.baseline(lid)
    print(f"  baseline sketch buckets: {len(baseline.sketch.index)} (stage), {len(latency.baseline.index)} "
          f"(latency detector; {'shared' if latency._baseline is baseline.packed_sketch else 'a copy of its own'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
