"""A location's trend, as ``backflow serve`` keeps it in ``{prefix}:trend:{key}``
(processor/sinks/versions.py): per version, one point per bucket (an hour by default) in
which the version served the location, for ``trend_period`` (7 days). ``top`` and the
rollout messages of ``notify`` show it as sparklines.

>>> pts = [Point(10, 100, 0.0, 4.0, 9.0), Point(11, 300, 0.01, 4.2, 9.5), Point(14, 50, 0.0, 12.0, 30.0)]
>>> sparkline([p.p50_ms for p in pts])
'▁▁█'
>>> sparkline(series({("1.0", ""): pts[:2], ("1.1", ""): pts[2:]}, "p50_ms", last=14, width=5))
'▁▁  █'
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from processor.sinks.connect import raw
from processor.sinks.versions import TREND_POINT

BARS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Point:
    bucket: int          # bucket number: its start is bucket * bucket length, epoch
    calls: int
    error_share: float
    p50_ms: float
    p99_ms: float


def points(blob: bytes) -> list[Point]:
    """A version's points from its field's value, oldest first; ValueError when the value
    is not whole points."""
    if len(blob) % TREND_POINT.size:
        raise ValueError(f"a trend value of {len(blob)} bytes is not whole {TREND_POINT.size}-byte points")
    return [Point(b, c, e / 65535, p50, p99) for b, c, e, p50, p99 in TREND_POINT.iter_unpack(blob)]


def read(client: redis.Redis, prefix: str, key: str) -> dict[tuple[str, str], list[Point]]:
    """A location's trend: (version, revision) -> its points; {} when it has none."""
    return read_many(client, prefix, [key])[key]


def read_many(client: redis.Redis, prefix: str, keys: list[str]) -> dict[str, dict]:
    """``read`` of several locations in one round trip."""
    pipe = raw(client).pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(f"{prefix}:trend:{key}")
    out = {}
    for key, fields in zip(keys, pipe.execute()):
        by_version: dict[tuple[str, str], list[Point]] = {}
        # (a version's older points, then its newest, in the field named like it with "+")
        for name, value in sorted(fields.items(), key=lambda nv: nv[0].endswith(b"+")):
            if name == b"bucket_s":  # (the bucket length they were written with)
                continue
            newest = name.endswith(b"+")
            version = tuple(json.loads(name[:-1] if newest else name))
            by_version.setdefault(version, []).extend(points(value))
        out[key] = by_version
    return out


def series(by_version: dict, figure: str, last: int | None = None, width: int = 48) -> list[float | None]:
    """One figure over the latest ``width`` buckets up to ``last`` (default: the newest),
    the versions together (weighted by calls where two served the same bucket); None for a
    bucket without calls."""
    pts = [p for ps in by_version.values() for p in ps]
    if not pts:
        return []
    last = max(p.bucket for p in pts) if last is None else last
    sums: dict[int, list[float]] = {}
    for p in pts:
        if last - width < p.bucket <= last:
            s = sums.setdefault(p.bucket, [0.0, 0.0])
            s[0] += getattr(p, figure) * p.calls
            s[1] += p.calls
    return [sums[b][0] / sums[b][1] if b in sums and sums[b][1] else None for b in range(last - width + 1, last + 1)]


def sparkline(values: list[float | None], scale: tuple[float, float] | None = None) -> str:
    """Bars from the lowest to the highest value (or of ``scale``, (low, high), so that
    several lines compare); a space where there is none."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    lo, hi = scale or (min(known), max(known))
    span = hi - lo
    top = len(BARS) - 1
    return "".join(" " if v is None else BARS[0 if span <= 0 else max(0, min(top, int((v - lo) / span * len(BARS))))]
                   for v in values)


def summary(by_version: dict, width: int = 24) -> str:
    """p50, p99 and error share over the latest ``width`` buckets as sparklines with their
    first and last values, for a line of text."""
    parts = []
    for figure, label, pct in (("p50_ms", "p50", False), ("p99_ms", "p99", False), ("error_share", "errors", True)):
        values = series(by_version, figure, width=width)
        known = [v for v in values if v is not None]
        if not known:
            continue
        ends = f"{known[0]:.1%}..{known[-1]:.1%}" if pct else f"{known[0]:.3g}..{known[-1]:.3g} ms"
        parts.append(f"{label} {sparkline(values).strip()} {ends}")
    return "  ".join(parts)
