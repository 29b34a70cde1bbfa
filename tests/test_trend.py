"""Trends (``{prefix}:trend:{key}``, processor/sinks/versions.py): one point per version and
bucket, merged in Redis by the version summaries' script, read back by
processor/report/trend.py."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures
from processor.report import trend
from processor.sinks.redis_streams import RedisSink
from processor.sinks.versions import TREND_POINT, TREND_VERSIONS

SEC = 1_000_000_000
HOUR = 3600 * SEC
LOC = Location("prod", "shop", "shop.cart.add", "shop/cart.py", "3")


def _window(start_ns: int, figures: dict) -> ClosedWindow:
    """A 60 s window of LOC: version -> (calls, errors, ms of every call)."""
    vs, sk = [], LogSketch()
    for version, (calls, errors, ms) in figures.items():
        s = LogSketch.from_values(np.full(calls, int(ms * 1e6)))
        vs.append(VersionFigures(("shop", version, ""), calls, errors, s))
        sk = sk.merge(s)
    lw = LocationWindow(0, LOC, sum(v.count for v in vs), sum(v.errors for v in vs), sk, vs)
    return ClosedWindow("shop", start_ns, start_ns + 60 * SEC, [lw], "prod")


def _write(client, windows, **trend_settings) -> None:
    sink = RedisSink(client, "t", 1000, 100, **({"trend_period": 4 * 3600, "trend_points": 4} | trend_settings))
    sink.start()
    try:
        for w in windows:
            sink.submit([], [], w)
            assert sink.flush(10)
    finally:
        sink.stop(2)


@pytest.fixture
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    c.flushall()
    return c


def test_windows_of_one_bucket_merge_into_one_point_weighted_by_calls(client):
    _write(client, [_window(0, {"1.0": (10, 1, 4.0)}), _window(60 * SEC, {"1.0": (30, 0, 8.0)})])
    (points,) = trend.read(client, "t", LOC.key).values()
    assert len(points) == 1
    p = points[0]
    assert (p.bucket, p.calls) == (0, 40) and p.error_share == pytest.approx(1 / 40, abs=1e-4)
    assert p.p50_ms == pytest.approx((10 * 4 + 30 * 8) / 40, rel=0.02)
    assert 0 < client.ttl(f"t:trend:{LOC.key}") <= 4 * 3600


def test_later_buckets_append_older_ones_slot_in_and_what_is_past_the_period_goes(client):
    _write(client, [_window(h * HOUR, {"1.0": (5, 0, 4.0)}) for h in (0, 1, 5)]
           + [_window(3 * HOUR, {"1.0": (7, 0, 4.0)}), _window(1 * HOUR, {"1.0": (9, 0, 4.0)})])
    (points,) = trend.read(client, "t", LOC.key).values()
    # 4 buckets kept before the newest (5): 0 and 1 went when 5 came; 3 slots in before 5,
    # and a window of bucket 1, past the period by then, is not kept
    assert [(p.bucket, p.calls) for p in points] == [(3, 7), (5, 5)]


def test_each_version_has_its_series_and_the_one_seen_longest_ago_goes_beyond_the_cap(client):
    versions = [f"1.{i}" for i in range(TREND_VERSIONS + 1)]  # 1.i served bucket i
    _write(client, [_window(i * HOUR, {v: (3, 0, 2.0 + i)}) for i, v in enumerate(versions)]
           + [_window(4 * HOUR + 60 * SEC, {"1.1": (1, 0, 2.0), "1.2": (2, 0, 9.0)})])
    by_version = trend.read(client, "t", LOC.key)
    assert sorted(v for v, _ in by_version) == versions[1:]  # 1.0, last seen in bucket 0, went
    assert [(p.bucket, p.calls) for p in by_version[("1.2", "")]] == [(2, 3), (4, 2)]
    # the versions together, weighted by calls: bucket 4 is 1.1's, 1.2's and 1.4's
    assert trend.series(by_version, "p50_ms", width=2)[1] == pytest.approx((1 * 2 + 2 * 9 + 3 * 6) / 6, rel=0.02)


def test_no_trend_is_written_when_the_period_is_0(client):
    _write(client, [_window(0, {"1.0": (5, 0, 4.0)})], trend_period=0)
    assert not client.exists(f"t:trend:{LOC.key}") and client.exists(f"t:versions:{LOC.key}")


def test_a_value_that_is_not_whole_points_is_refused_by_the_reader():
    assert trend.points(TREND_POINT.pack(1, 2, 0, 1.0, 2.0) * 2)[1].calls == 2
    with pytest.raises(ValueError, match="not whole 18-byte points"):
        trend.points(b"\x00" * 20)


def test_a_trend_of_7_days_of_hourly_points_is_bounded_in_memory(client):
    """What docs/operations.md states: a location served by one version every hour of the
    period holds 168 points, about 3 KB in Redis (MEMORY USAGE), whatever the windows."""
    _write(client, [_window(h * HOUR, {"1.0": (5, 0, 4.0)}) for h in range(200)], trend_period=7 * 86400,
           trend_points=168)
    (points,) = trend.read(client, "t", LOC.key).values()
    assert len(points) == 168 and points[0].bucket == 200 - 168
    assert client.memory_usage(f"t:trend:{LOC.key}") < 4096


def test_a_change_of_bucket_length_starts_the_trend_over(client):
    _write(client, [_window(h * HOUR, {"1.0": (5, 0, 4.0)}) for h in range(3)])  # hourly buckets
    assert client.hget(f"t:trend:{LOC.key}", "bucket_s") == b"3600"
    _write(client, [_window(3 * HOUR, {"1.0": (7, 0, 4.0)})], trend_points=2)  # 2-hour buckets
    (points,) = trend.read(client, "t", LOC.key).values()
    assert [(p.bucket, p.calls) for p in points] == [(1, 7)]
    assert client.hget(f"t:trend:{LOC.key}", "bucket_s") == b"7200"
