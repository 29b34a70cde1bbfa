"""What writing a baseline to Redis costs the sink's thread, batched and one call each;
and what the writer thread costs per closed location-window, by kind of write.

    python -m benchmarks.sink                 # 500 baselines per batch, 30 batches, 3 runs
    python -m benchmarks.sink --windows       # the writer per location-window, by kind

A real redis-server on a free port; ``--baselines`` baselines rendered as the engine hands
them over (quantiles computed beforehand), written ``--batches`` times by the Redis sink
in its two forms, alternating within a run: one script call for the whole batch (what
``_write`` sends), and one call of the one-baseline script each (what the spool keeps,
and what the sink sent before 24d3d31). Prints the client's CPU (process time) per
baseline written, its fields and JSON rendered included, median (min-max) over ``--runs`` runs of
the median batch, and the ratio of the two within each run.

With ``--windows``: an engine fed ``window_close``'s windows (one service of 2,000
locations, 5 spans each, every location in every window), its results handed to the
sink and a checkpoint taken after each window, as ``serve`` does; the sink's batches
written to a real redis-server on this thread. Prints the client's CPU per closed
location-window past the first 30 windows, by kind (baselines, version summaries,
checkpoint fields, events), taking a batch and writing it apart, median (min-max) over
``--runs``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import redis

from processor.devtools.redis_server import RedisServer
from processor.pipeline.baseline import QUANTILES, Baseline
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.sinks.redis_streams import RedisSink


def _baselines(n: int, rng: np.random.Generator) -> list[Baseline]:
    out = []
    for i in range(n):
        b = Baseline(Location("prod", "shop", f"shop.module.function_{i}", "shop/module.py", str(i)),
                     LogSketch.from_values(rng.lognormal(15, 1, 500)).scaled(0.9), count=5.0, seconds=10.0,
                     windows=3, updated_ns=10**18, version=("shop", "1.0", "abc"))
        b._quantiles = (b.sketch.quantiles(QUANTILES) / 1e6).tolist()
        out.append(b)
    return out


def run(n: int, batches: int, seed: int) -> tuple[float, float]:
    """(batched, one call each): client CPU per baseline written (us), median batch."""
    srv = RedisServer().start()
    try:
        client = redis.Redis(port=srv.port, decode_responses=True)
        sink = RedisSink(client, "bench", 1000, 10**7, batch_size=n)
        baselines = _baselines(n, np.random.default_rng(seed))
        batched, single = [], []
        for _ in range(batches):
            sink.submit([], [(b.location.key, b) for b in baselines])
            t = time.process_time()
            sink._write(sink._take())
            batched.append(time.process_time() - t)
            sink.submit([], [(b.location.key, b) for b in baselines])
            t = time.process_time()
            batch = sink._take()
            pipe = sink.w.pipeline(transaction=False)
            pipe.hsetnx(sink.instances_key, sink.instance, int(time.time()))
            for c in sink._commands(batch, spooled=True)[0]:
                pipe.execute_command(*c)
            pipe.execute()
            single.append(time.process_time() - t)
        if client.scard("bench:keys") != n:
            raise RuntimeError("not every baseline was written")
        return statistics.median(batched) / n * 1e6, statistics.median(single) / n * 1e6
    finally:
        srv.stop()


def windows(seed: int, locations: int = 2000, count: int = 60, skip: int = 30) -> dict[str, float]:
    """The writer's CPU per closed location-window (us), by "kind take" and "kind write"."""
    from benchmarks.window_close import window
    from processor.config import Config
    from processor.pipeline import checkpoint
    from processor.pipeline.engine import Engine

    engine = Engine(Config.defaults(allowed_lateness=0.0, window=10.0), known_keys=set())
    locs = [Location("prod", "shop", f"shop.module.function_{i}", "shop/module.py", str(i))
            for i in range(locations)]
    rng = np.random.default_rng(seed)
    batches = [window(locs, w, 1.0, rng) for w in range(count)]
    srv = RedisServer().start()
    try:
        sink = RedisSink(redis.Redis(port=srv.port), "bench", 100_000, 10**9)
        spent: dict[str, float] = {}
        pairs = 0
        for w, batch in enumerate(batches):
            results = engine.ingest(batch)
            for r in results:
                sink.submit(r.events, [(b.location.key, b) for b in r.baselines], r.window)
            sink.submit_state(checkpoint.dumps_dirty(engine))
            while not sink._idle():
                t0 = time.process_time()
                writes = sink._take()
                t1 = time.process_time()
                sink._write(writes)
                t2 = time.process_time()
                if w >= skip:
                    kind = writes[0].kind if writes else "markers"
                    spent[f"{kind} take"] = spent.get(f"{kind} take", 0.0) + t1 - t0
                    spent[f"{kind} write"] = spent.get(f"{kind} write", 0.0) + t2 - t1
            if w >= skip:
                pairs += sum(len(r.window.locations) for r in results)
        return {k: v / pairs * 1e6 for k, v in spent.items()}
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baselines", type=int, default=500, help="baselines per batch (the sink's batch size)")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--windows", action="store_true",
                   help="the writer's CPU per closed location-window, by kind of write")
    args = p.parse_args(argv)
    if args.windows:
        runs = [windows(seed) for seed in range(args.runs)]
        print(f"Redis writer, 2,000 locations x 60 windows (30 measured), {args.runs} runs; "
              "client CPU per closed location-window:")
        kinds = sorted({k for r in runs for k in r})
        for k in kinds + ["total"]:
            xs = [sum(r.values()) if k == "total" else r.get(k, 0.0) for r in runs]
            print(f"  {k:24s} {statistics.median(xs):5.1f} ({min(xs):.1f}-{max(xs):.1f}) us")
        return 0
    figures = [run(args.baselines, args.batches, seed) for seed in range(args.runs)]

    def mmm(xs, fmt=".1f"):
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    print(f"{args.baselines} baselines per batch, {args.batches} batches, {args.runs} runs; "
          f"client CPU per baseline written:")
    print(f"  one script call per batch:     {mmm([b for b, _ in figures])} us")
    print(f"  one script call per baseline:  {mmm([s for _, s in figures])} us")
    print(f"  ratio (per baseline / batch):  {mmm([s / b for b, s in figures], '.2f')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
