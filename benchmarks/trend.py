"""What the trends cost Redis: memory per location, and the merge's time per location-window.

    python -m benchmarks.trend                 # 2,000 locations, 8 days of hourly windows, 3 runs

A real redis-server on a free port. ``--locations`` locations, each served by
``--versions`` versions in ``--windows-per-hour`` 60 s windows of each hour, written through
the Redis sink one window at a time for ``--hours`` hours of event time, as ``serve``
writes them, with the default trend (7 days of hourly points, ``trend_period`` 604800,
``trend_points`` 168) and, in the same run, with the trend off (``trend_period`` 0) into
another prefix, alternating window by window. Prints, median (min-max) over ``--runs``:

- Redis's memory per location for the trend (``MEMORY USAGE`` of its ``{prefix}:trend:{key}``,
  averaged over 100 locations), each day and at the end: it stops growing once the period
  is full;
- Redis's CPU (``INFO cpu``, user + system) per location-window written, with the trend
  and without it, and their ratio (the merge script does the trend's work).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import redis

from processor.devtools.redis_server import RedisServer
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures
from processor.sinks.redis_streams import RedisSink

SEC = 1_000_000_000
HOUR = 3600 * SEC


def _windows(locations: int, versions: int, rng):
    """One closed window per hour (the first of the hour): every location, every version."""
    locs = [Location("prod", "shop", f"shop.module.f{i}", "shop/module.py", str(i)) for i in range(locations)]
    sketches = [LogSketch.from_values(rng.lognormal(15, 0.5, 50)) for _ in range(16)]

    def window(hour: int, minute: int = 0) -> ClosedWindow:
        lws = []
        for j, loc in enumerate(locs):
            vs = [VersionFigures(("shop", f"1.{v}", ""), 50, j % 3, sketches[(hour + j + v) % 16])
                  for v in range(versions)]
            lws.append(LocationWindow(j, loc, 50 * versions, (j % 3) * versions, vs[0].sketch, vs))
        start = hour * HOUR + minute * 60 * SEC
        return ClosedWindow("shop", start, start + 60 * SEC, lws, "prod")
    return locs, window


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run(args, seed: int) -> dict:
    srv = RedisServer().start()
    try:
        client = redis.Redis(port=srv.port)
        sinks = {"on": RedisSink(client, "on", 1000, 10**7, batch_size=500, trend_period=7 * 86400, trend_points=168),
                 "off": RedisSink(client, "off", 1000, 10**7, batch_size=500)}
        locs, window = _windows(args.locations, args.versions, np.random.default_rng(seed))
        cpu = {"on": 0.0, "off": 0.0}
        trend_mem = []
        for hour in range(int(args.hours)):
            for minute in range(args.windows_per_hour):
                w = window(hour, minute)
                for name in (("on", "off") if (hour + minute) % 2 else ("off", "on")):
                    sink = sinks[name]
                    sink.submit([], [], w)
                    c0 = _redis_cpu(client)
                    while sink.versions:  # (written on this thread: the sink's own batches, in order)
                        sink._write(sink._take())
                    cpu[name] += _redis_cpu(client) - c0
            if hour % 24 == 23:
                trend_mem.append(sum(client.memory_usage(f"on:trend:{loc.key}") or 0 for loc in locs[:100]) / 100)
        windows = args.hours * args.windows_per_hour * args.locations
        return {"trend_per_location": trend_mem[-1], "trend_by_day": trend_mem,
                "cpu_on_us": cpu["on"] / windows * 1e6, "cpu_off_us": cpu["off"] / windows * 1e6}
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--locations", type=int, default=2000)
    p.add_argument("--versions", type=int, default=1, help="versions serving every location (default 1)")
    p.add_argument("--hours", type=int, default=8 * 24, help="hours of event time (default 8 days)")
    p.add_argument("--windows-per-hour", type=int, default=1,
                   help="60 s windows written per hour (default 1: every window opens a bucket, the costliest "
                        "case; 60: the windows of a service that is always called)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    runs = [run(args, seed) for seed in range(args.runs)]

    def f(key: str, fmt: str = "{:,.0f}") -> str:
        values = [r[key] for r in runs]
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"
    ratios = [r["cpu_on_us"] / r["cpu_off_us"] for r in runs]
    print(f"trend benchmark: {args.locations:,} locations x {args.versions} version(s), {args.hours} hours of "
          f"{args.windows_per_hour} window(s), {args.runs} runs; median (min-max)")
    print(f"  MEMORY USAGE of a location's trend at the end:       {f('trend_per_location')} B")
    print("  ... by day (MEMORY USAGE, run 1):                     "
          + ", ".join(f"{m:,.0f}" for m in runs[0]["trend_by_day"]))
    print(f"  Redis CPU per location-window, trend on / off:        {f('cpu_on_us', '{:.1f}')} / "
          f"{f('cpu_off_us', '{:.1f}')} us, ratio {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
