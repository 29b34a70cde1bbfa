"""What writing a baseline to Redis costs the sink's thread, batched and one call each.

    python -m benchmarks.sink                 # 500 baselines per batch, 30 batches, 3 runs

A real redis-server on a free port; ``--baselines`` baselines rendered as the engine hands
them over (quantiles computed beforehand), written ``--batches`` times by the Redis sink
in its two forms, alternating within a run: one script call for the whole batch (what
``_write`` sends), and one call of the one-baseline script each (what the spool keeps,
and what the sink sent before 24d3d31). Prints the client's CPU (process time) per
baseline written, its fields and JSON rendered included, median (min-max) over ``--runs`` runs of
the median batch, and the ratio of the two within each run.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baselines", type=int, default=500, help="baselines per batch (the sink's batch size)")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
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
