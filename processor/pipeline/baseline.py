"""Per-location baseline: every closed window merged in, older windows decaying.

A window's weight halves every ``half_life`` seconds of event time, so the baseline follows
accepted change slowly and forgets a location's distant past. The figures published to
``{prefix}:baseline:{key}`` come from here.
"""

from __future__ import annotations

import math
from array import array

import numpy as np

from processor.pipeline.location import Location
from processor.pipeline.sketch import (
    _NO_COUNTS, _NO_INDEX, _TRAILER, MAX_BUCKET, LogSketch, pack_rows, rows_quantiles, unpack_rows,
)
from processor.pipeline.window import ClosedWindow, LocationWindow

QUANTILES = (0.5, 0.9, 0.99, 0.999)


class Baseline:
    """One location's decayed figures. The sketch is kept packed (``LogSketch.pack``): one
    bytes object per location instead of two arrays; ``sketch`` unpacks it, without a copy."""

    __slots__ = ("_quantiles", "_sketch", "count", "errors", "location", "seconds", "updated_ns", "version",
                 "whole", "windows")

    def __init__(self, location: Location, sketch: LogSketch, count: float = 0.0, errors: float = 0.0,
                 seconds: float = 0.0, windows: int = 0, updated_ns: int = 0,
                 version: tuple[str, str, str] = ("", "", "")):
        self.location = location
        self.sketch = sketch
        self._quantiles = None  # the sketch's values at QUANTILES in ms (a list), when computed with others
        self.count = count
        self.errors = errors
        self.seconds = seconds      # decayed window time the counts were seen over
        self.windows = windows
        self.updated_ns = updated_ns  # end of the latest window merged in (event time)
        self.version = version
        # Whether its hash must be written whole: False when only its figures changed since
        # the last one handed out (its location's identity and version are in Redis already)
        self.whole = True

    @property
    def sketch(self) -> LogSketch:
        return LogSketch.unpack(self._sketch)

    @property
    def packed_sketch(self) -> bytes:
        """The sketch as kept (``LogSketch.pack``), for a detector that holds the same one."""
        return self._sketch

    @sketch.setter
    def sketch(self, sketch: LogSketch) -> None:
        self._sketch = sketch.pack()

    def __repr__(self) -> str:
        return (f"Baseline({self.location!r}, {self.sketch!r}, count={self.count!r}, "
                f"windows={self.windows!r}, updated_ns={self.updated_ns!r})")

    def absorb(self, lw: LocationWindow, window_end_ns: int, window_s: float, half_life_s: float) -> float | None:
        """Merge a window in, after decaying what was there; returns the decay factor applied
        to the sketch (None for the first window: nothing to decay)."""
        sketch = self.sketch
        decay = None
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
        return decay

    def to_plain(self) -> dict:
        """The baseline as plain data (str, int, float, bytes, tuple), without its location
        (a checkpoint keeps that beside it): what ``from_plain`` takes back.

        >>> b = Baseline(Location("prod", "shop", "f"), LogSketch.from_values(np.array([2e6, 3e6])),
        ...              count=2.0, seconds=60.0, windows=1, updated_ns=60 * 10**9,
        ...              version=("shop", "1.0", "abc"))
        >>> back = Baseline.from_plain(b.location, b.to_plain())
        >>> back.fields() == b.fields() and back.packed_sketch == b.packed_sketch
        True
        """
        return {"sketch": self._sketch, "count": float(self.count), "errors": float(self.errors),
                "seconds": float(self.seconds), "windows": int(self.windows),
                "updated_ns": int(self.updated_ns), "version": tuple(self.version)}

    @classmethod
    def from_plain(cls, location: Location, plain) -> Baseline:
        """The baseline ``to_plain`` gave, checked: ``plain`` may come from outside the
        process (a checkpoint in Redis), so every field must have its type and range and the
        packed sketch must be one ``LogSketch.pack`` makes; ValueError otherwise.

        >>> Baseline.from_plain(Location("prod", "shop", "f"), {"sketch": b"\\xff" * 9})
        Traceback (most recent call last):
        ...
        ValueError: baseline: expected the fields count, errors, seconds, sketch, updated_ns, version, windows
        """
        if type(plain) is not dict or plain.keys() != _PLAIN_FIELDS:
            raise ValueError("baseline: expected the fields " + ", ".join(sorted(_PLAIN_FIELDS)))
        b = cls(location, _EMPTY)
        b._sketch = _checked_sketch(plain["sketch"])
        b.count, b.errors, b.seconds = (_figure(plain[k], k) for k in ("count", "errors", "seconds"))
        b.windows = _whole(plain["windows"], "windows")
        b.updated_ns = _whole(plain["updated_ns"], "updated_ns")
        version = plain["version"]
        if type(version) is not tuple or len(version) != 3 or any(type(v) is not str for v in version):
            raise ValueError("baseline: version is not (service, version, revision)")
        b.version = version
        return b

    def fields(self) -> dict[str, str]:
        """The ``{prefix}:baseline:{key}`` hash."""
        row = self.row()
        return dict(zip(row[::2], row[1::2]))

    def row(self, whole: bool = True) -> list[str]:
        """The hash as [field, value, ...]; without ``whole``, its figures only."""
        q = (self.sketch.quantiles(QUANTILES) / 1e6).tolist() if self._quantiles is None else self._quantiles
        count = self.count
        nums = (count / self.seconds if self.seconds else 0.0, *q, self.errors / count if count else 0.0)
        text = _SIX % nums  # (one format for the six: this runs for every location-window)
        r, p50, p90, p99, p999, e = text.split() if "n" not in text else map(_num, nums)  # (nan, inf)
        figures = ["count", str(int(round(count))), "rate_per_s", r, "p50_ms", p50, "p90_ms", p90,
                   "p99_ms", p99, "p999_ms", p999, "error_rate", e, "windows", str(self.windows),
                   "updated", str(self.updated_ns // 1_000_000)]
        if not whole:
            return figures
        loc = self.location
        return ["key", loc.key, "service.name", loc.service, "deployment.environment.name", loc.environment,
                "code.function.name", loc.function, "code.file.path", loc.file, "code.line.number", loc.line,
                "otel.scope.name", loc.scope, "service.version", self.version[1],
                "vcs.ref.head.revision", self.version[2], *figures]


def _num(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else ""


_SIX = " ".join(["%.6g"] * 6)


class BaselineStage:
    """Every location's baseline, kept as columns indexed by location id rather than as an
    object per location: its sketch (packed), its count, errors, seconds and windows (four
    doubles of one array), the end of its latest window and its version (objects shared with
    the window they came from). ``absorb_many`` hands out a ``Baseline`` per location
    changed, a snapshot made for publishing: the sink renders it when it writes, and the
    stage never changes it afterwards."""

    def __init__(self, window_s: float, half_life_s: float):
        self.window_s = window_s
        self.half_life_s = half_life_s
        self.sketches: list[bytes | None] = []  # location id -> packed sketch; None: no baseline
        self.figures = array("d")               # count, errors, seconds, windows per location id
        self.updated_ns: list[int] = []
        self.versions: list[tuple[str, str, str]] = []
        self.locations: list[Location | None] = []
        self.count = 0                          # locations with a baseline

    def __len__(self) -> int:
        return self.count

    def baseline(self, loc_id: int) -> Baseline | None:
        """The location's baseline as it stands, or None."""
        if loc_id >= len(self.sketches) or self.sketches[loc_id] is None:
            return None
        b = Baseline(self.locations[loc_id], _EMPTY)
        b._sketch = self.sketches[loc_id]
        b.count, b.errors, b.seconds, windows = self.figures[4 * loc_id: 4 * loc_id + 4]
        b.windows = int(windows)
        b.updated_ns, b.version = self.updated_ns[loc_id], self.versions[loc_id]
        return b

    def absorb(self, cw: ClosedWindow, lw: LocationWindow) -> tuple[Baseline, bytes, float | None]:
        """Merge one location's window in, with ``Baseline.absorb``: the rule ``absorb_many``
        applies to a whole window at once (and is tested against). Returns the baseline (a
        snapshot to publish), the packed sketch it had before and the decay applied to it
        (None: its first window)."""
        i = lw.loc_id
        b = self.baseline(i)
        if b is None:
            b = Baseline(lw.location, _EMPTY)
        before = b._sketch
        decay = b.absorb(lw, cw.end_ns, self.window_s, self.half_life_s)
        self.restore(i, b)
        return b, before, decay

    def absorb_many(self, cw: ClosedWindow, lws: list[LocationWindow]
                    ) -> tuple[list[Baseline], list[bytes], list[float | None], list[LogSketch]]:
        """``absorb`` for many locations of one closed window at once: their sketches decayed
        and merged in one numpy pass over all of them, with the same values, bit for bit, as
        location by location (each bucket is 0.0 + its decayed count + the window's, in that
        order, as ``LogSketch.merge`` adds them). The locations' ids are distinct, as in a
        closed window. Returns the baselines, the packed sketches before, the decays applied
        (``absorb``'s, per location) and the sketches before, unpacked.

        >>> from processor.pipeline.window import VersionFigures
        >>> loc = Location("prod", "shop", "f")
        >>> one, many = BaselineStage(60.0, 3600.0), BaselineStage(60.0, 3600.0)
        >>> for w in range(3):
        ...     sk = LogSketch.from_values(np.array([1e6, 2e6 * (w + 1), 3e6]))
        ...     lw = LocationWindow(0, loc, 3, 1, sk, [VersionFigures(("shop", "1", ""), 3, 1, sk)])
        ...     cw = ClosedWindow("shop", w * 60 * 10**9, (w + 1) * 60 * 10**9, [lw], "prod")
        ...     _ = one.absorb(cw, lw), many.absorb_many(cw, [lw])
        >>> one.sketches == many.sketches and one.figures == many.figures
        True
        """
        n = len(lws)
        if not n:
            return [], [], [], []
        ids = [lw.loc_id for lw in lws]
        self._grow(max(ids))
        end, window_s, half_life_s = cw.end_ns, self.window_s, self.half_life_s
        sketches, updated_ns = self.sketches, self.updated_ns
        rows = np.array(ids, np.int64)
        old = np.frombuffer(self.figures, np.float64).reshape(-1, 4)[rows]  # count, errors, seconds, windows
        befores = [sketches[i] or b"" for i in ids]
        # A decay per distinct age (a window's locations mostly share theirs), as absorb's
        decays: list[float | None] = [None] * n
        by_age: dict[int, float] = {}
        for k, (i, windows) in enumerate(zip(ids, old[:, 3].tolist())):
            if windows:
                age = max(0, end - updated_ns[i])
                d = by_age.get(age)
                if d is None:
                    d = by_age[age] = 0.5 ** (age / 1e9 / half_life_s)
                decays[k] = d
        unpacked = unpack_rows(befores)
        # (merged before anything is set: a failure leaves the stage as it was)
        merged, quantiles = _merge_rows(unpacked, decays, [lw.sketch for lw in lws])
        decay = np.array([1.0 if d is None else d for d in decays])
        had = np.array([d is not None for d in decays])
        new = np.array([(lw.count, lw.errors) for lw in lws], np.float64).reshape(n, 2)
        after = np.empty((n, 4))
        after[:, 0] = np.where(had, old[:, 0] * decay, old[:, 0]) + new[:, 0]
        after[:, 1] = np.where(had, old[:, 1] * decay, old[:, 1]) + new[:, 1]
        after[:, 2] = np.where(had, old[:, 2] * decay, old[:, 2]) + window_s
        after[:, 3] = old[:, 3] + 1
        np.frombuffer(self.figures, np.float64).reshape(-1, 4)[rows] = after
        locations, versions = self.locations, self.versions
        quantiles_ms = (quantiles / 1e6).tolist()
        out: list[Baseline] = []
        for k, (i, lw, figures) in enumerate(zip(ids, lws, after.tolist())):
            b = Baseline(lw.location, _EMPTY)
            version = lw.main_version.version
            if sketches[i] is None:  # a new baseline (its id may be a forgotten location's)
                self.count += 1
                updated_ns[i] = end
            else:
                updated_ns[i] = max(updated_ns[i], end)
                b.whole = versions[i] != version
            sketches[i] = merged[k]
            locations[i] = lw.location
            versions[i] = version
            b._sketch, b._quantiles = merged[k], quantiles_ms[k]
            b.count, b.errors, b.seconds, windows = figures
            b.windows, b.updated_ns, b.version = int(windows), updated_ns[i], versions[i]
            out.append(b)
        return out, befores, decays, unpacked

    def _grow(self, loc_id: int) -> None:
        if loc_id >= len(self.sketches):
            grow = loc_id + 1 - len(self.sketches)
            for column in (self.sketches, self.updated_ns, self.versions, self.locations):
                column.extend([None] * grow)
            self.figures.frombytes(bytes(32 * grow))

    def forget(self, loc_id: int) -> None:
        """Drop a location's baseline (the location was forgotten: its id may be reused)."""
        if loc_id < len(self.sketches) and self.sketches[loc_id] is not None:
            self.count -= 1
            self.sketches[loc_id] = self.locations[loc_id] = self.versions[loc_id] = None
            self.updated_ns[loc_id] = None
            self.figures[4 * loc_id: 4 * loc_id + 4] = array("d", bytes(32))

    def restore(self, loc_id: int, b: Baseline) -> None:
        """Set a location's baseline (from ``absorb``, or from a checkpoint)."""
        i = loc_id
        self._grow(i)
        if self.sketches[i] is None:
            self.count += 1
        self.locations[i] = b.location
        self.sketches[i] = b._sketch
        self.figures[4 * i: 4 * i + 4] = array("d", (b.count, b.errors, b.seconds, b.windows))
        self.updated_ns[i], self.versions[i] = b.updated_ns, b.version


_EMPTY = LogSketch()
_ROW = MAX_BUCKET + 1  # the least stride of _merge_rows' (row, bucket) keys


def _merge_rows(bases: list[LogSketch], decays: list[float | None], windows: list[LogSketch],
                quantiles: bool = True) -> tuple[list[bytes], np.ndarray | None]:
    """Per row, ``bases[k].scaled(decays[k]).merge(windows[k]).pack()`` (no scaling where the
    decay is None), for all rows in one pass: every bucket's sum is 0.0 + the decayed count
    + the window's count, added in that order, as ``LogSketch.merge`` adds them); and, with
    ``quantiles``, each merged sketch's values at QUANTILES (what ``Baseline.fields``
    publishes)."""
    n = len(bases)
    sizes_b = np.fromiter((len(s.index) for s in bases), np.int64, n)
    sizes_w = np.fromiter((len(s.index) for s in windows), np.int64, n)
    rows = np.arange(n, dtype=np.int64)
    idx_b = np.concatenate([s.index for s in bases] + [_NO_INDEX]).astype(np.int64)
    cnt_b = np.concatenate([s.counts for s in bases] + [_NO_COUNTS])
    if any(d is not None for d in decays):
        factor = np.repeat(np.array([1.0 if d is None else d for d in decays]), sizes_b)
        scaled = np.repeat(np.array([d is not None for d in decays]), sizes_b)
        cnt_b = np.where(scaled, cnt_b * factor, cnt_b)
        keep = ~scaled | (cnt_b >= 1e-3)  # LogSketch.scaled's min_count
        idx_b, cnt_b = idx_b[keep], cnt_b[keep]
        row_b = np.repeat(rows, sizes_b)[keep]
    else:
        row_b = np.repeat(rows, sizes_b)
    # Both key arrays are sorted (rows in order, buckets sorted in each): merged, not sorted.
    # Buckets are counted from the lowest (a sketch moved to another load may hold
    # negative ones), each row spanning at least _ROW keys.
    idx_w = np.concatenate([s.index for s in windows] + [_NO_INDEX]).astype(np.int64)
    lo = min(int(idx_b.min()) if len(idx_b) else 0, int(idx_w.min()) if len(idx_w) else 0, 0)
    hi = max(int(idx_b.max()) if len(idx_b) else 0, int(idx_w.max()) if len(idx_w) else 0)
    stride = max(_ROW, hi - lo + 1)
    keys_b = row_b * stride + (idx_b - lo)
    keys_w = np.repeat(rows, sizes_w) * stride + (idx_w - lo)
    pos = np.searchsorted(keys_b, keys_w)
    hit = np.zeros(len(keys_w), np.bool_)
    inside = pos < len(keys_b)
    hit[inside] = keys_b[pos[inside]] == keys_w[inside]
    unique = np.insert(keys_b, pos[~hit], keys_w[~hit])
    counts = np.insert(cnt_b, pos[~hit], 0.0)
    counts[np.searchsorted(unique, keys_w)] += np.concatenate([s.counts for s in windows] + [_NO_COUNTS])
    bounds = np.searchsorted(unique, rows * stride).tolist() + [len(unique)]
    buckets = (unique % stride + lo).astype(np.int32)
    return pack_rows(buckets, counts, bounds), rows_quantiles(buckets, counts, bounds, QUANTILES) if quantiles else None


# Baseline.from_plain: what a plain baseline holds, and the checks of its values.
_PLAIN_FIELDS = frozenset({"sketch", "count", "errors", "seconds", "windows", "updated_ns", "version"})
_INT64 = 2**63


def _figure(x, name: str) -> float:
    if type(x) not in (float, int) or not 0.0 <= x < float("inf"):  # (NaN fails the range too)
        raise ValueError(f"baseline: {name} is not a finite number >= 0")
    return float(x)


def _whole(x, name: str) -> int:
    if type(x) is not int or not 0 <= x < _INT64:
        raise ValueError(f"baseline: {name} is not an integer in [0, 2**63)")
    return x


def _checked_sketch(data) -> bytes:
    """``data`` if it is a sketch ``LogSketch.pack`` makes, else ValueError. Its buckets
    must lie in the sketch's range before anything is unpacked (a forged span would
    otherwise allocate gigabytes), and packing it again must give the same bytes, which
    pins the layout, the count type and the presence bitmap; counts are finite and >= 0."""
    if type(data) is not bytes:
        raise ValueError("baseline: sketch is not bytes")
    if not data:
        return data
    if len(data) < _TRAILER.size:
        raise ValueError("baseline: sketch is too short")
    lo, span, _ = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if not (0 <= lo and 1 <= span and lo + span - 1 <= MAX_BUCKET and len(data) <= 9 * span + _TRAILER.size):
        raise ValueError("baseline: sketch buckets out of range")
    try:
        sketch = LogSketch.unpack(data)
        same = sketch.pack() == data
    except Exception as e:  # noqa: BLE001 (numpy's and struct's errors alike: not a sketch)
        raise ValueError(f"baseline: sketch does not unpack ({e})") from None
    if not same:
        raise ValueError("baseline: sketch is not one LogSketch.pack makes")
    if not (np.isfinite(sketch.counts).all() and (sketch.counts >= 0).all()):
        raise ValueError("baseline: sketch counts are not finite and >= 0")
    return data
