"""Per-location baseline: every closed window merged in, older windows decaying.

A window's weight halves every ``half_life`` seconds of event time, so the baseline follows
accepted change slowly and forgets a location's distant past. The figures published to
``{prefix}:baseline:{key}`` come from here.
"""

from __future__ import annotations

import numpy as np

from processor.location import Location
from processor.sketch import LogSketch
from processor.window import ClosedWindow, LocationWindow

QUANTILES = (0.5, 0.9, 0.99, 0.999)


class Baseline:
    """One location's decayed figures. The sketch is kept packed (``LogSketch.pack``): one
    bytes object per location instead of two arrays; ``sketch`` unpacks it, without a copy."""

    __slots__ = ("_sketch", "count", "errors", "location", "seconds", "updated_ns", "version", "windows")

    def __init__(self, location: Location, sketch: LogSketch, count: float = 0.0, errors: float = 0.0,
                 seconds: float = 0.0, windows: int = 0, updated_ns: int = 0,
                 version: tuple[str, str, str] = ("", "", "")):
        self.location = location
        self.sketch = sketch
        self.count = count
        self.errors = errors
        self.seconds = seconds      # decayed window time the counts were seen over
        self.windows = windows
        self.updated_ns = updated_ns  # end of the latest window merged in (event time)
        self.version = version

    @property
    def sketch(self) -> LogSketch:
        return LogSketch.unpack(self._sketch)

    @sketch.setter
    def sketch(self, sketch: LogSketch) -> None:
        self._sketch = sketch.pack()

    def __repr__(self) -> str:
        return (f"Baseline({self.location!r}, {self.sketch!r}, count={self.count!r}, "
                f"windows={self.windows!r}, updated_ns={self.updated_ns!r})")

    def absorb(self, lw: LocationWindow, window_end_ns: int, window_s: float, half_life_s: float):
        sketch = self.sketch
        if self.windows:
            decay = 0.5 ** (max(0, window_end_ns - self.updated_ns) / 1e9 / half_life_s)
            sketch = sketch.scaled(decay)
            self.count *= decay
            self.errors *= decay
            self.seconds *= decay
        self.sketch = sketch.merge(lw.sketch)
        self.count += lw.count
        self.errors += lw.errors
        self.seconds += window_s
        self.windows += 1
        self.updated_ns = max(self.updated_ns, window_end_ns)
        self.version = lw.main_version.version

    def fields(self) -> dict[str, str]:
        """The ``{prefix}:baseline:{key}`` hash."""
        loc = self.location
        q = self.sketch.quantiles(QUANTILES) / 1e6
        return {
            "key": loc.key,
            "service.name": loc.service,
            "deployment.environment.name": loc.environment,
            "code.function.name": loc.function,
            "code.file.path": loc.file,
            "code.line.number": loc.line,
            "otel.scope.name": loc.scope,
            "service.version": self.version[1],
            "vcs.ref.head.revision": self.version[2],
            "count": str(int(round(self.count))),
            "rate_per_s": _num(self.count / self.seconds if self.seconds else 0.0),
            "p50_ms": _num(q[0]),
            "p90_ms": _num(q[1]),
            "p99_ms": _num(q[2]),
            "p999_ms": _num(q[3]),
            "error_rate": _num(self.errors / self.count if self.count else 0.0),
            "windows": str(self.windows),
            "updated": str(self.updated_ns // 1_000_000),
        }


def _num(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.6g}"


class BaselineStage:
    def __init__(self, window_s: float, half_life_s: float):
        self.window_s = window_s
        self.half_life_s = half_life_s
        self.baselines: dict[int, Baseline] = {}

    def update(self, cw: ClosedWindow, locations: list[LocationWindow] | None = None) -> list[Baseline]:
        """Merge a closed window (or the given locations of it); return the baselines changed."""
        out = []
        for lw in cw.locations if locations is None else locations:
            b = self.baselines.get(lw.loc_id)
            if b is None:
                b = self.baselines[lw.loc_id] = Baseline(lw.location, LogSketch())
            b.absorb(lw, cw.end_ns, self.window_s, self.half_life_s)
            out.append(b)
        return out
