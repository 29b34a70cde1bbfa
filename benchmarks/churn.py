"""Memory under name churn: services come, send a few windows' spans, and go for good.

    python -m benchmarks.churn                       # 600,000 services over 120 rounds
    python -m benchmarks.churn --rounds 20 --quick   # a short run

Each round brings ``--services`` new services (one code location, one version each) and
leaves the previous round's idle; the engine's clock moves ``--gap`` seconds per round,
more than the idle timeouts. The same rounds run twice, each in a process of its own:

- ``forget``: the idle timeouts (``--idle``, standing for the default 7 days) forget what
  is idle, as ``serve`` does every second;
- ``keep``: nothing is forgotten (the timeouts infinite), as before this benchmark's change.

Both keep the default caps (``max_services`` 10,000, ``max_locations`` 100,000). It prints,
per mode, the RSS above the start every ``--every`` rounds, the services and locations held
at the end, the services given a place of their own (each a ``first_seen``) and the names
folded into ``__overflow__`` for want of room. It drives the engine directly (no receiver,
no Redis), taking a checkpoint's fields after every round as ``serve`` does.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time

import numpy as np

from processor.config import Config
from processor.pipeline import checkpoint
from processor.pipeline.engine import Engine
from processor.pipeline.location import Location
from processor.receiver.decode import Batch

SEC = 1_000_000_000
T0 = 1_700_000_040 * SEC  # a 60 s window boundary
SPANS = 3  # per service and round


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def trimmed_rss() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss()


def round_batch(r: int, services: int, rng: np.random.Generator) -> Batch:
    names = [f"svc-{r}-{s}" for s in range(services)]
    n = services * SPANS
    end = T0 + r * 120 * SEC + np.sort(rng.integers(0, 50 * SEC, n))
    idx = np.repeat(np.arange(services, dtype=np.int32), SPANS)
    dur = rng.lognormal(np.log(5e6), 0.5, n).astype(np.int64)
    return Batch(locations=[Location("prod", name, "handler") for name in names],
                 versions=[(name, "1.0", "") for name in names], loc=idx, ver=idx,
                 start=end - dur, end=end, error=np.zeros(n, bool),
                 trace_id=np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16) | 1)


def run(mode: str, rounds: int, services: int, gap: float, idle: float, every: int) -> dict:
    timeout = idle if mode == "forget" else float("inf")
    clock = [0.0]
    engine = Engine(Config.defaults(allowed_lateness=0.0, idle_timeout=10.0, location_idle_timeout=timeout,
                                    version_idle_timeout=timeout), known_keys=set(), clock=lambda: clock[0])
    rng = np.random.default_rng(0)
    import scipy.stats  # noqa: F401  (loaded by the detectors on first use: not a service's)
    base = trimmed_rss()
    t0 = time.monotonic()
    first_seen, curve = 0, []
    for r in range(rounds):
        clock[0] = r * gap
        engine.forget_idle(clock[0])
        engine.ingest(round_batch(r, services, rng))
        for result in engine.flush_idle(clock[0] + 11):
            first_seen += sum(e.type == "first_seen" for e in result.events)
        checkpoint.dumps_dirty(engine)  # as serve does (what it marks is let go once taken)
        if (r + 1) % every == 0 or r + 1 == rounds:
            curve.append([(r + 1) * services, trimmed_rss() - base])
    t = engine.windows.tables
    return {"mode": mode, "curve": curve, "services_held": len(t._svc_ids), "locations_held": t.held_locations,
            "own_place": first_seen, "refused_services": t.refused_services,
            "refused_versions": t.refused_versions, "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=120)
    p.add_argument("--services", type=int, default=5000, help="new services per round")
    p.add_argument("--gap", type=float, default=200.0, help="clock seconds between rounds")
    p.add_argument("--idle", type=float, default=100.0, help="idle timeouts of the forget mode (s)")
    p.add_argument("--every", type=int, default=20, help="rounds between RSS measurements")
    p.add_argument("--quick", action="store_true", help="1,000 services per round")
    p.add_argument("--mode", choices=("forget", "keep"), help=argparse.SUPPRESS)  # one process's part
    args = p.parse_args(argv)
    services = 1000 if args.quick else args.services
    if args.mode:
        print(json.dumps(run(args.mode, args.rounds, services, args.gap, args.idle, args.every)))
        return 0
    results = []
    for mode in ("forget", "keep"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.churn", "--mode", mode, "--rounds", str(args.rounds),
                              "--services", str(services), "--gap", str(args.gap), "--idle", str(args.idle),
                              "--every", str(args.every)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    total = args.rounds * services
    print(f"{total:,} services over {args.rounds} rounds ({services:,} new per round, one location each)")
    for res in results:
        print(f"\n{res['mode']}: {res['seconds']} s")
        print("  services seen  RSS above start")
        for seen, grown in res["curve"]:
            print(f"  {seen:>13,}  {grown / 2**20:8.1f} MiB")
        print(f"  held at the end: {res['services_held']:,} services, {res['locations_held']:,} locations")
        print(f"  services with a place of their own (first_seen): {res['own_place']:,} of {total:,}; "
              f"folded into __overflow__: {res['refused_services']:,} services, {res['refused_versions']:,} versions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
