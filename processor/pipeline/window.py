"""Event-time tumbling windows per service, with watermarks, lateness and idle flush.

A span belongs to the window ``[start, start + W)`` holding its end timestamp. Each service
has a watermark: the latest end timestamp seen from it, less the allowed lateness. A service is
identified by (environment, service.name), as locations are. A window
closes when its service's watermark passes its end, when the service sent nothing for
``idle_timeout`` seconds of processing time, or at shutdown. A span whose window has
already closed is late: counted and dropped.

Lateness is decided span by span in arrival order (the watermark a span sees is the one
left by the spans before it, even within one batch), so the same spans in the same order
give the same windows whatever the batching and whatever the replay speed.

All per-span work here is numpy on whole batches; Python loops run per service, per
window or per code location, never per span.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from processor.pipeline.graph import CallGraph
from processor.pipeline.location import Location, location_key
from processor.receiver.decode import Batch
from processor.pipeline.sketch import MAX_BUCKET, LogSketch, bucket_index, bucket_value

_NB = MAX_BUCKET + 1
_COMPACT_AT = 1 << 18  # packed entries held before an accumulator compacts them


class _Growable:
    """An int32 (or ``dtype``) array that grows by doubling; ``view`` is the filled part."""

    def __init__(self, dtype=np.int32):
        self._a = np.zeros(64, dtype)
        self.n = 0

    def append(self, v) -> None:
        if self.n == len(self._a):
            self._a = np.concatenate([self._a, np.zeros(len(self._a), self._a.dtype)])
        self._a[self.n] = v
        self.n += 1

    @property
    def view(self) -> np.ndarray:
        return self._a[: self.n]


OVERFLOW_FUNCTION = "__overflow__"


_SHARED = ("", OVERFLOW_FUNCTION)  # the service of the shared overflow location


def is_overflow(loc: Location) -> bool:
    """The location that holds a service's spans beyond the location limit."""
    return loc.function == OVERFLOW_FUNCTION


def _first_time(seen: set, name) -> int:
    """1 the first time ``name`` is refused, else 0. ``seen`` is cleared at 10,000 names to
    bound its memory: a name refused again after that counts again."""
    if name in seen:
        return 0
    if len(seen) >= 10_000:
        seen.clear()
    seen.add(name)
    return 1


def _take_slot(items: list, free: list[int], value) -> int:
    """Put ``value`` at an index of ``items`` freed before, else at its end; returns it."""
    if free:
        i = free.pop()
        items[i] = value
        return i
    items.append(value)
    return len(items) - 1


def _count_down(counts: dict, key) -> None:
    """One less of ``key``; a key counted down to 0 leaves the dict (names churn)."""
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]


class Tables:
    """Interned ids for locations, services, versions and (location, version) series.

    At most ``max_locations`` code locations get an id of their own; the spans of any
    further one go to its service's overflow location (``__overflow__``), or, for a service
    not seen before the limit, to one shared overflow location, so that a cardinality
    explosion (a function name with an id in it) costs no more memory than the limit.

    Services and versions are capped the same way: a service beyond ``max_services`` has
    its spans in the shared overflow location; a version beyond its service's
    ``max_versions_per_service`` counts as that service's ``__overflow__`` version, and one
    beyond ``max_versions`` in all as the shared ``("", "__overflow__", "")``.
    ``refused_services`` and ``refused_versions`` count the distinct names folded.
    ``forget_versions``, ``forget_locations`` and ``forget_services`` free the ids (and
    series) of names no longer sent, for new ones to reuse: a long-running process keeps
    attributing new deploys, functions and services, and its memory follows what is live.

    >>> t = Tables(max_services=2, max_versions=4, max_versions_per_service=2)
    >>> [t.locations[t.location_id(Location("prod", s, "f"))].service for s in ("a", "b", "c")]
    ['a', 'b', '__overflow__']
    >>> [t.versions[t.version_id(("a", v, ""))][1] for v in ("1", "2", "3", "4")]
    ['1', '2', '__overflow__', '__overflow__']
    >>> t.refused_services, t.refused_versions
    (1, 2)
    """

    def __init__(self, max_locations: int = 1 << 62, max_services: int = 1 << 62,
                 max_versions: int = 1 << 62, max_versions_per_service: int = 1 << 62):
        self.max_locations = max_locations
        self.max_services = max_services
        self.max_versions = max_versions
        self.max_versions_per_service = max_versions_per_service
        self.refused_services = 0  # distinct service names folded into the shared overflow
        self.refused_versions = 0  # distinct version names folded into an overflow version
        self._refused_svc: set = set()  # names counted (see _first_time)
        self._refused_ver: set = set()
        self._svc_versions: dict[str, int] = {}  # service.name -> versions with an id
        self._svc_names: dict[str, int] = {}     # service.name -> services with an id (environments)
        self.real_locations = 0
        self.now = 0.0  # processing time stamped on a new location's id (set by WindowStage)
        self.overflow = _Growable()  # 1 at the ids of overflow locations
        self.locations: list[Location | None] = []  # None: a forgotten location's free id
        self._loc_ids: dict[str, int] = {}  # by Location.key
        self.loc_service = _Growable()
        self.loc_seen = _Growable(np.float64)  # processing time of each location's latest span
        self._free_locations: list[int] = []
        self.services: list[tuple[str, str] | None] = []  # (environment, service); None: free id
        self._svc_ids: dict[tuple[str, str], int] = {}
        self._free_services: list[int] = []
        self.versions: list[tuple[str, str, str] | None] = []  # None: a forgotten version's free id
        self._ver_ids: dict[tuple, int] = {}
        self.ver_seen = _Growable(np.float64)  # processing time of each version's latest span
        self._free_versions: list[int] = []
        self._free_series: list[int] = []
        self.series_loc = _Growable()  # series id -> location id
        self.series_ver = _Growable()  # series id -> version id
        self._known = np.zeros(0, np.int64)      # packed (location, version) pairs, sorted
        self._known_ids = np.zeros(0, np.int64)  # their series ids

    def location_id(self, loc: Location) -> int:
        i = self._loc_ids.get(loc.key)
        if i is None:
            if self.real_locations >= self.max_locations or is_overflow(loc):
                return self._overflow_id(loc)
            service = (loc.environment, loc.service)
            held = len(self._svc_ids) - (_SHARED in self._svc_ids)  # (the shared overflow is not one)
            if service not in self._svc_ids and held >= self.max_services:
                self.refused_services += _first_time(self._refused_svc, service)
                return self._overflow_id(loc)
            self.real_locations += 1
            i = self._add(loc, overflow=False)
        return i

    def _overflow_id(self, loc: Location) -> int:
        service = (loc.environment, loc.service)
        if service not in self._svc_ids:
            service = _SHARED
        i = self._loc_ids.get(location_key(*service, OVERFLOW_FUNCTION))
        if i is None:
            i = self._add(Location(*service, OVERFLOW_FUNCTION), overflow=True)
        return i

    def _add(self, loc: Location, overflow: bool) -> int:
        service = self.service_id((loc.environment, loc.service))
        i = self._loc_ids[loc.key] = _take_slot(self.locations, self._free_locations, loc)
        if i == self.loc_service.n:
            for column in (self.loc_service, self.overflow, self.loc_seen):
                column.append(0)
        self.loc_service.view[i], self.overflow.view[i], self.loc_seen.view[i] = service, overflow, self.now
        return i

    @property
    def held_locations(self) -> int:
        """Code locations with an id (overflow locations included)."""
        return len(self._loc_ids)

    def service_id(self, name: tuple[str, str]) -> int:
        i = self._svc_ids.get(name)
        if i is None:
            i = self._svc_ids[name] = _take_slot(self.services, self._free_services, name)
            self._svc_names[name[1]] = self._svc_names.get(name[1], 0) + 1
        return i

    def version_id(self, v: tuple[str, str, str]) -> int:
        i = self._ver_ids.get(v)
        if i is None:
            if v[1] != OVERFLOW_FUNCTION:
                if v[0] not in self._svc_names:  # a service beyond max_services: counted there
                    return self.version_id(("", OVERFLOW_FUNCTION, ""))
                n = self._svc_versions.get(v[0], 0)
                held = len(self.versions) - len(self._free_versions)  # (forgotten ones free their place)
                if n >= self.max_versions_per_service or held >= self.max_versions:
                    self.refused_versions += _first_time(self._refused_ver, v)
                    own = (v[0], OVERFLOW_FUNCTION, "")
                    shared = held >= self.max_versions and own not in self._ver_ids
                    return self.version_id(("", OVERFLOW_FUNCTION, "") if shared else own)
                self._svc_versions[v[0]] = n + 1
            i = self._ver_ids[v] = _take_slot(self.versions, self._free_versions, v)
            if i == self.ver_seen.n:
                self.ver_seen.append(0.0)
        return i

    def forget_versions(self, idle_before: float, busy: set[int]) -> list[tuple[str, str, str]]:
        """Forget the versions whose latest span arrived before ``idle_before`` (processing
        time), except those in ``busy`` (with spans in an open window): their ids and their
        series are reused by new ones. Returns the versions forgotten.

        >>> t = Tables()
        >>> _ = t.service_id(("prod", "shop"))
        >>> a, b = t.version_id(("shop", "1", "")), t.version_id(("shop", "2", ""))
        >>> t.ver_seen.view[:] = [10.0, 50.0]
        >>> _ = t.series_ids(np.array([0, 1]), np.array([a, b]))
        >>> t.forget_versions(idle_before=20.0, busy=set())
        [('shop', '1', '')]
        >>> t.version_id(("shop", "3", "")) == a, t.series_ids(np.array([5]), np.array([a])).tolist()
        (True, [0])
        """
        seen = self.ver_seen.view
        gone = [i for i in np.flatnonzero(seen < idle_before).tolist()
                if self.versions[i] is not None and self.versions[i][1] != OVERFLOW_FUNCTION and i not in busy]
        if not gone:
            return []
        out = []
        for i in gone:
            v = self.versions[i]
            del self._ver_ids[v]
            self.versions[i] = None
            seen[i] = np.inf  # (set again when the id is reused)
            _count_down(self._svc_versions, v[0])
            self._free_versions.append(i)
            out.append(v)
        self._drop_series(np.isin(self._known & 0xFFFFFFFF, np.array(gone, np.int64)))
        return out

    def forget_locations(self, idle_before: float, busy: set[int]) -> list[tuple[int, Location]]:
        """Forget the code locations whose latest span arrived before ``idle_before``
        (processing time), except those in ``busy`` (with spans in an open window): their
        ids and series are reused by new ones, and they free their place under
        ``max_locations``. Returns the (id, location) pairs forgotten.

        >>> t = Tables(max_locations=1)
        >>> t.now = 10.0
        >>> a = t.location_id(Location("prod", "shop", "old"))
        >>> t.locations[t.location_id(Location("prod", "shop", "new"))].function  # beyond the limit
        '__overflow__'
        >>> t.now = 50.0
        >>> [loc.function for _, loc in t.forget_locations(idle_before=20.0, busy=set())]
        ['old', '__overflow__']
        >>> t.location_id(Location("prod", "shop", "new")) in (0, 1), t.held_locations
        (True, 1)
        """
        seen = self.loc_seen.view
        gone = [i for i in np.flatnonzero(seen < idle_before).tolist()
                if self.locations[i] is not None and i not in busy]
        out = []
        for i in gone:
            loc = self.locations[i]
            del self._loc_ids[loc.key]
            self.locations[i] = None
            seen[i] = np.inf  # (set again when the id is reused)
            if not self.overflow.view[i]:
                self.real_locations -= 1
            self._free_locations.append(i)
            out.append((i, loc))
        if gone:
            self._drop_series(np.isin(self._known >> 32, np.array(gone, np.int64)))
        return out

    def forget_services(self, busy: set[int]) -> list[tuple[int, tuple[str, str]]]:
        """Forget the services left without a code location, except those in ``busy`` (with
        an open window, or spans lately); their ids are reused. Returns the (id, service)
        pairs forgotten."""
        alive = np.array([loc is not None for loc in self.locations], bool)
        held = np.bincount(self.loc_service.view[alive], minlength=len(self.services))
        out = []
        for i in np.flatnonzero(held == 0).tolist():
            name = self.services[i]
            if name is None or i in busy:
                continue
            del self._svc_ids[name]
            self.services[i] = None
            _count_down(self._svc_names, name[1])
            self._free_services.append(i)
            out.append((i, name))
        return out

    def _drop_series(self, drop: np.ndarray) -> None:
        """Free the series ids of the known pairs where ``drop`` is set."""
        self._free_series += self._known_ids[drop].tolist()
        self._known, self._known_ids = self._known[~drop], self._known_ids[~drop]

    def series_ids(self, loc: np.ndarray, ver: np.ndarray) -> np.ndarray:
        """Series id of each (location, version) pair; a Python step only for new pairs."""
        packed = (loc.astype(np.int64) << 32) | ver.astype(np.int64)
        uniq, inv = np.unique(packed, return_inverse=True)
        pos = np.searchsorted(self._known, uniq)
        pos_c = np.minimum(pos, len(self._known) - 1)
        hit = (self._known[pos_c] == uniq) if len(self._known) else np.zeros(len(uniq), bool)
        if not hit.all():
            new = uniq[~hit]  # sorted: new series get ids in that order (freed ones first)
            ids = []
            for p in new.tolist():
                if self._free_series:
                    i = self._free_series.pop()
                    self.series_loc.view[i], self.series_ver.view[i] = p >> 32, p & 0xFFFFFFFF
                else:
                    i = self.series_loc.n
                    self.series_loc.append(p >> 32)
                    self.series_ver.append(p & 0xFFFFFFFF)
                ids.append(i)
            # Rebuilt only when a batch brings new pairs, which stops once traffic is known.
            known = np.concatenate([self._known, new])
            order = np.argsort(known)
            self._known = known[order]
            self._known_ids = np.concatenate([self._known_ids, np.array(ids, np.int64)])[order]
            pos_c = np.searchsorted(self._known, uniq)
        return self._known_ids[pos_c][inv]


# Shared by every window without exceptions (most of them): window figures are read-only
# once closed, and an empty Counter per location and version is memory at every close.
NO_EXCEPTIONS: Counter = Counter()


# Window figures have slots: a window of a service with many locations makes one of these
# per location and version, all alive together while the window is evaluated.
@dataclass(slots=True)
class VersionFigures:
    version: tuple[str, str, str]  # (service, service.version, vcs.ref.head.revision)
    count: int
    errors: int
    sketch: LogSketch
    exceptions: Counter = field(default_factory=lambda: NO_EXCEPTIONS)
    # the failed spans' counts in each of the sketch's buckets (kept for partials only:
    # an aggregate replica sends the failed and the other spans as histograms of their own)
    error_counts: np.ndarray | None = None


@dataclass(slots=True)
class LocationWindow:
    """What one closed window holds for one code location."""
    loc_id: int
    location: Location
    count: int
    errors: int
    sketch: LogSketch
    versions: list[VersionFigures]
    exceptions: Counter = field(default_factory=lambda: NO_EXCEPTIONS)
    trace_ids: bytes = b""  # the exemplars' trace ids, 16 bytes each, slowest span first
    exemplar_ns: np.ndarray | None = None  # their durations (kept for partials only)

    @property
    def exemplars(self) -> list[str]:
        """The exemplars' trace ids in hex, slowest span first (made when asked for: only
        events show them)."""
        ids = self.trace_ids
        return [ids[i:i + 16].hex() for i in range(0, len(ids), 16)]

    @property
    def main_version(self) -> VersionFigures:
        """The version that served most of this window's spans."""
        return max(self.versions, key=lambda v: (v.count, v.version))


@dataclass(slots=True)
class ClosedWindow:
    service: str
    start_ns: int
    end_ns: int
    locations: list[LocationWindow]
    environment: str = ""
    busy_ns: float = 0.0  # summed span durations (bucket values) over the whole service
    # The call graph's figures of this window, by location id (processor/pipeline/graph.py)
    graph: dict = field(default_factory=dict)

    def calls_by_version(self) -> dict[tuple, int]:
        """The service's calls in the window per version, every location's together."""
        out: dict[tuple, int] = {}
        for lw in self.locations:
            for v in lw.versions:
                out[v.version] = out.get(v.version, 0) + v.count
        return out


def _top_k(series: np.ndarray, dur: np.ndarray, tid: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k slowest spans per series (ties broken by trace id), deterministic."""
    order = np.lexsort((tid[:, 1], tid[:, 0], -dur, series))
    return order[_rank_in_series(series[order]) < k]


def _top_k_candidates(series: np.ndarray, dur: np.ndarray, k: int) -> np.ndarray:
    """Rows that may be among the k slowest of their series: the k slowest, plus every span
    as slow as the k-th (a tie, which ``_top_k`` settles by trace id later). Sorting on two
    keys instead of four: this runs on every batch, ``_top_k`` on the few candidates."""
    order = np.lexsort((-dur, series))
    s, d = series[order], dur[order]
    rank = _rank_in_series(s)
    group = np.cumsum(rank == 0) - 1
    kth = np.full(group[-1] + 1 if len(group) else 0, -1, np.int64)
    at_k = rank == k - 1
    kth[group[at_k]] = d[at_k]
    return order[(rank < k) | (d == kth[group])]


def _rank_in_series(s: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values (s sorted)."""
    first = np.concatenate(([True], s[1:] != s[:-1]))
    starts = np.flatnonzero(first)
    return np.arange(len(s)) - starts[np.cumsum(first) - 1]


class _Accumulator:
    """One service's spans in one window, kept as packed (series, bucket, error) counts."""

    def __init__(self, exemplars: int):
        self.k = exemplars
        self.codes: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.held = 0
        self.ex_series: list[np.ndarray] = []
        self.ex_dur: list[np.ndarray] = []
        self.ex_tid: list[np.ndarray] = []
        self.ex_held = 0
        self.exceptions: Counter = Counter()

    def add(self, series, bucket, error, counts=None) -> None:
        """Spans (``counts``: or rows of that many spans each)."""
        codes = (series * _NB + bucket) * 2 + error
        self.codes.append(codes)
        self.counts.append(np.ones(len(codes), np.int64) if counts is None else counts)
        self.held += len(codes)
        if self.held > _COMPACT_AT:
            self._compact()

    def add_exemplars(self, series, dur, tid) -> None:
        """Candidates: the batch's k slowest spans per series (the caller selects them)."""
        self.ex_series.append(series)
        self.ex_dur.append(dur)
        self.ex_tid.append(tid)
        self.ex_held += len(series)
        if self.ex_held > _COMPACT_AT // 4:
            self._compact_exemplars()

    def _compact(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.codes:  # (a window of exception counts only, from OTLP metrics)
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        codes = np.concatenate(self.codes)
        uniq, inv = np.unique(codes, return_inverse=True)
        counts = np.bincount(inv, weights=np.concatenate(self.counts), minlength=len(uniq))
        counts = counts.astype(np.int64)
        self.codes, self.counts, self.held = [uniq], [counts], len(uniq)
        return uniq, counts

    def _compact_exemplars(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.ex_series:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.uint64)
        s, d, t = (np.concatenate(x) for x in (self.ex_series, self.ex_dur, self.ex_tid))
        rows = _top_k(s, d, t, self.k)
        s, d, t = s[rows], d[rows], t[rows]
        self.ex_series, self.ex_dur, self.ex_tid, self.ex_held = [s], [d], [t], len(s)
        return s, d, t

    def close(self, tables: Tables, partial: bool = False) -> tuple[list[LocationWindow], float]:
        """The window's figures per location, and the service's summed span durations (ns);
        ``partial``: with each version's failed spans per bucket and the exemplars' durations
        (what an aggregate replica sends on, processor/pipeline/tiers.py)."""
        codes, counts = self._compact()
        err = (codes & 1).astype(bool)
        rest = codes >> 1
        bucket = (rest % _NB).astype(np.int32)
        series = rest // _NB
        loc_of = tables.series_loc.view[series].astype(np.int64)
        ver_of = tables.series_ver.view

        per_version: dict[int, list[VersionFigures]] = {}
        version_exceptions: dict[int, Counter] = {}
        for (s, etype), n in self.exceptions.items():
            version_exceptions.setdefault(s, Counter())[etype] += n
        # Entries are sorted by (series, bucket, error). One vectorised pass folds the error
        # flag away (a bucket's error and non-error counts are adjacent), then split per series.
        first = np.concatenate(([True], rest[1:] != rest[:-1]))
        group = np.cumsum(first) - 1
        merged_counts = np.bincount(group, weights=counts)
        merged_errors = np.bincount(group, weights=counts * err)
        u_bucket, u_series = bucket[first], series[first]
        busy_ns = float(merged_counts @ bucket_value(u_bucket)) if len(u_bucket) else 0.0
        bounds = np.flatnonzero(np.diff(u_series)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [len(u_series)]))
        # Each series' calls and errors (whole numbers: any order of summing gives them)
        series_counts = np.add.reduceat(merged_counts, starts).astype(np.int64).tolist() if len(u_series) else []
        series_errors = np.add.reduceat(merged_errors, starts).astype(np.int64).tolist() if len(u_series) else []
        series_ids = u_series[starts].tolist() if len(u_series) else []
        series_locs = loc_of[first][starts].tolist() if len(u_series) else []
        versions_of = ver_of[series_ids].tolist() if series_ids else []
        for lo, hi, s, loc, ver, n, e in zip(starts.tolist(), ends.tolist(), series_ids, series_locs, versions_of,
                                             series_counts, series_errors):
            per_version.setdefault(loc, []).append(VersionFigures(
                version=tables.versions[ver], count=n, errors=e, sketch=LogSketch(u_bucket[lo:hi], merged_counts[lo:hi]),
                exceptions=version_exceptions.get(s, NO_EXCEPTIONS),
                error_counts=merged_errors[lo:hi] if partial else None))

        # Exemplars: each location's k slowest spans over its series, ties to the smaller
        # trace id; their ids as one run of 16-byte ids, location after location.
        ex_locs: list[int] = []
        ex_bounds: list[int] = [0]
        ex_ids = b""
        ex_ns = np.zeros(0, np.int64)
        if self.k:
            es, ed, et = self._compact_exemplars()
            if len(es):
                eloc = tables.series_loc.view[es].astype(np.int64)
                order = np.lexsort((et[:, 1], et[:, 0], -ed, eloc))
                keep = order[_rank_in_series(eloc[order]) < self.k]
                eloc = eloc[keep]
                ex_ids = et[keep].astype(">u8").tobytes()
                ex_ns = ed[keep]
                first = np.flatnonzero(np.concatenate(([True], eloc[1:] != eloc[:-1])))
                ex_locs = eloc[first].tolist()
                ex_bounds = (first * 16).tolist() + [len(ex_ids)]

        exceptions: dict[int, Counter] = {}
        for s, counter in version_exceptions.items():
            exceptions.setdefault(int(tables.series_loc.view[s]), Counter()).update(counter)

        out = []
        j = 0  # ex_locs is sorted, as the locations below are
        for loc, versions in sorted(per_version.items()):
            sketch = versions[0].sketch
            for v in versions[1:]:
                sketch = sketch.merge(v.sketch)
            while j < len(ex_locs) and ex_locs[j] < loc:
                j += 1
            mine = j < len(ex_locs) and ex_locs[j] == loc
            ids = ex_ids[ex_bounds[j]:ex_bounds[j + 1]] if mine else b""
            out.append(LocationWindow(
                loc_id=loc, location=tables.locations[loc],
                count=sum(v.count for v in versions), errors=sum(v.errors for v in versions),
                sketch=sketch, versions=versions, exceptions=exceptions.get(loc, NO_EXCEPTIONS),
                trace_ids=ids, exemplar_ns=(ex_ns[ex_bounds[j] // 16:ex_bounds[j + 1] // 16] if mine else ex_ns[:0])
                if partial else None))
        return out, busy_ns


@dataclass
class Forgotten:
    """What ``WindowStage.forget_idle`` forgot: versions, (id, location) pairs, services."""
    versions: list[tuple[str, str, str]] = field(default_factory=list)
    locations: list[tuple[int, Location]] = field(default_factory=list)
    services: list[tuple[str, str]] = field(default_factory=list)
    service_ends: dict[tuple[str, str], int] = field(default_factory=dict)  # their clocks' max_end


@dataclass
class _ServiceClock:
    max_end: int = -(1 << 62)         # latest end timestamp seen (ns)
    closed_through: int = -(1 << 62)  # every window ending at or before this is closed
    last_arrival: float = 0.0         # processing time (monotonic) of the latest span
    windows: dict[int, _Accumulator] = field(default_factory=dict)
    # closed by the aggregate replicas' watermarks (``WindowStage.advance``), not by its own
    # data: partials of a slow replica arrive after a faster one's of later windows
    external: bool = False


class WindowStage:
    """Turns batches into closed windows. Single-threaded: one stage owns its state.

    >>> import numpy as np
    >>> from processor.pipeline.location import Location
    >>> stage, ms = WindowStage(window_ns=60_000_000_000, lateness_ns=0), 1_000_000
    >>> def batch(*end_s):
    ...     end = np.array(end_s, np.int64) * 1_000_000_000
    ...     n = len(end)
    ...     return Batch([Location("prod", "shop", "f")], [("shop", "1", "")], np.zeros(n, np.int32),
    ...                  np.zeros(n, np.int32), end - 20 * ms, end, np.zeros(n, bool),
    ...                  np.ones((n, 16), np.uint8))
    >>> [(w.start_ns // 10**9, w.end_ns // 10**9, w.locations[0].count) for w in stage.ingest(batch(10, 20, 70))]
    [(0, 60, 2)]
    >>> stage.ingest(batch(30)), stage.stats["late"]  # its window is closed: late, counted
    ([], 1)
    """

    def __init__(self, window_ns: int, lateness_ns: int, idle_timeout: float = 60.0,
                 exemplars: int = 3, clock=time.monotonic, max_locations: int = 1 << 62,
                 max_services: int = 1 << 62, max_versions: int = 1 << 62,
                 max_versions_per_service: int = 1 << 62, version_idle_timeout: float = float("inf"),
                 location_idle_timeout: float = float("inf")):
        self.version_idle_timeout = version_idle_timeout
        self.location_idle_timeout = location_idle_timeout
        self._next_forget = -float("inf")
        if window_ns <= 0:
            raise ValueError("window_ns must be > 0")
        self.window_ns = window_ns
        self.lateness_ns = lateness_ns
        self.idle_timeout = idle_timeout
        self.exemplars = exemplars
        self.clock = clock
        self.tables = Tables(max_locations, max_services, max_versions, max_versions_per_service)
        self.services: dict[int, _ServiceClock] = {}
        self.stats = Counter(spans=0, late=0, windows=0, overflow=0, forgotten_versions=0,
                             forgotten_locations=0, forgotten_services=0)
        self.graph: CallGraph | None = None  # the call graph's join, when it is on (Engine sets it)
        self.partial = False  # closed windows keep what an aggregate replica sends on (``_Accumulator.close``)
        self._graph_flushed = -(1 << 62)  # the latest clock at the graph's last flush

    def ingest(self, batch: Batch) -> list[ClosedWindow]:
        """Add a batch; return the windows it closed (oldest first)."""
        n = len(batch)
        if n == 0:
            return []
        t = self.tables
        # Idle time counts from when the spans arrived, not from when this stage got to
        # them: a backlog in the queue must not make a busy service look idle.
        now = t.now = batch.received_at if batch.received_at is not None else self.clock()
        get = t._loc_ids.get
        ids = [get(loc.key) for loc in batch.locations]
        if None in ids:
            ids = [t.location_id(loc) for loc in batch.locations]
        gloc, gver, svc = self._ids(ids, batch.loc, batch.versions, batch.ver, now)
        end = batch.end
        win_start = end - end % self.window_ns
        keep, touched = self._admit(svc, end, win_start, now)

        rows = np.flatnonzero(keep)
        if len(rows):
            series = t.series_ids(gloc[rows], gver[rows])
            bucket = bucket_index(batch.end[rows] - batch.start[rows]).astype(np.int64)
            err = batch.error[rows].astype(np.int64)
            dur = batch.end[rows] - batch.start[rows]
            tid = batch.trace_id[rows].view(">u8").reshape(-1, 2).astype(np.uint64)
            group, accs = self._accumulate(svc[rows], win_start[rows], series, bucket, err)
            if self.exemplars:
                # One selection for the whole batch: the k slowest spans per (window, series).
                top = _top_k_candidates((group << 32) | series, dur, self.exemplars)
                top = top[np.argsort(group[top], kind="stable")]
                cut = np.flatnonzero(np.diff(group[top])) + 1
                for part in np.split(top, cut):
                    accs[int(group[part[0]])].add_exemplars(series[part], dur[part], tid[part])
            if self.graph is not None and batch.span_id is not None:
                t64 = batch.trace_id[rows].view(np.uint64).reshape(-1, 2)
                self.graph.add(t64[:, 0] ^ t64[:, 1], batch.span_id[rows], batch.parent_id[rows], gloc[rows],
                               gver[rows], svc[rows], batch.start[rows], end[rows], batch.kind[rows])
            if batch.exceptions:
                pos_of_row = np.full(n, -1, np.int64)
                pos_of_row[rows] = np.arange(len(rows))
                for r, etype in batch.exceptions:
                    p = pos_of_row[r]
                    if p >= 0:
                        accs[int(group[p])].exceptions[(int(series[p]), etype)] += 1

        if self.graph is not None and self.graph.waiting:
            self._flush_graph(touched)
        return self._close_behind(touched)

    def _ids(self, ids: list, loc, versions: list, ver, now: float, weight=None) -> tuple[np.ndarray, ...]:
        """Per row, its location id, version id and service id (``ids``: the locations'
        ids, ``loc``/``ver``: each row's index into them and into ``versions``; ``weight``:
        the spans a row stands for)."""
        t = self.tables
        lids = np.array(ids, np.int64)
        t.loc_seen.view[lids] = now
        gloc = lids[loc]
        if t.real_locations >= t.max_locations:
            over = t.overflow.view[gloc]
            self.stats["overflow"] += int(over.sum() if weight is None else weight[over.astype(bool)].sum())
        vids = np.array([t.version_id(v) for v in versions], np.int64)
        t.ver_seen.view[vids] = now
        return gloc, vids[ver], t.loc_service.view[gloc]

    def _admit(self, svc: np.ndarray, end: np.ndarray, win_start: np.ndarray, now: float,
               weight: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
        """Which rows' windows are still open by their service's clock (which they move on),
        and the services touched; late rows counted (``weight``: spans a row stands for)."""
        keep = np.ones(len(end), bool)
        win_end = win_start + self.window_ns
        touched = []
        for s in np.unique(svc).tolist():
            clock = self.services.get(s)
            if clock is None:
                clock = self.services[s] = _ServiceClock()
            rows = np.flatnonzero(svc == s)
            e = end[rows]
            if clock.external:
                keep[rows] = win_end[rows] > clock.closed_through
            else:
                prior_max = np.maximum.accumulate(np.concatenate(([clock.max_end], e[:-1])))
                closed = np.maximum(prior_max - self.lateness_ns, clock.closed_through)
                keep[rows] = win_end[rows] > closed
            clock.max_end = max(clock.max_end, int(e.max()))
            clock.last_arrival = now
            touched.append(s)
        total = int(weight.sum()) if weight is not None else len(end)
        kept = int(weight[keep].sum()) if weight is not None else int(keep.sum())
        self.stats["late"] += total - kept
        self.stats["spans"] += kept
        return keep, touched

    def _accumulator(self, s: int, ws: int) -> "_Accumulator":
        """Service ``s``'s window starting at ``ws``, opened if it is not yet."""
        acc = self.services[s].windows.get(ws)
        if acc is None:
            acc = self.services[s].windows[ws] = _Accumulator(self.exemplars)
        return acc

    def _groups(self, rsvc, rws):
        """Rows (at least one) by (service, window start): each group's accumulator, opened
        if it is not yet, and the group's rows."""
        order = np.lexsort((rws, rsvc))
        bounds = np.flatnonzero((np.diff(rsvc[order]) != 0) | (np.diff(rws[order]) != 0)) + 1
        for sel in np.split(order, bounds):
            yield self._accumulator(int(rsvc[sel[0]]), int(rws[sel[0]])), sel

    def _accumulate(self, rsvc, rws, series, bucket, err, counts=None) -> tuple[np.ndarray, list]:
        """Rows into the accumulators of their (service, window start): per row the number
        of its accumulator, and the accumulators (``counts``: spans a row stands for)."""
        group = np.empty(len(rsvc), np.int64)
        accs = []
        for acc, sel in self._groups(rsvc, rws):
            group[sel] = len(accs)
            accs.append(acc)
            acc.add(series[sel], bucket[sel], err[sel], None if counts is None else counts[sel])
        return group, accs

    def _closed(self, clock: "_ServiceClock") -> int:
        """Through where a service's windows are closed, or close now, after the figures
        taken so far: its replicas' watermark, or its own less the lateness."""
        return clock.closed_through if clock.external else max(clock.closed_through,
                                                              clock.max_end - self.lateness_ns)

    def _close_behind(self, touched: list[int]) -> list[ClosedWindow]:
        """The windows of the ``touched`` services that their watermark has passed."""
        closed: list[ClosedWindow] = []
        for s in touched:
            clock = self.services[s]
            if clock.external:
                continue
            watermark = clock.max_end - self.lateness_ns
            closed += self._close(s, lambda ws: ws + self.window_ns <= watermark)
            clock.closed_through = max(clock.closed_through, watermark)
        return sorted(closed, key=lambda c: (c.end_ns, c.service))

    def ingest_counts(self, c) -> list[ClosedWindow]:
        """Pre-aggregated figures (``processor.receiver.metrics.Counts``: rows of location,
        version, end time, error, log bucket and count, and exception counts) into their
        windows, as spans would be; the windows that closed."""
        n = len(c.count)
        if n == 0 and not c.exceptions:
            return []
        t = self.tables
        now = t.now = c.received_at if c.received_at is not None else self.clock()
        ids = [t.location_id(loc) for loc in c.locations]
        gloc, gver, svc = self._ids(ids, c.loc, c.versions, c.ver, now, c.count)
        end = c.end
        win_start = end - end % self.window_ns
        keep, touched = self._admit(svc, end, win_start, now, c.count)
        rows = np.flatnonzero(keep)
        if len(rows):
            self._accumulate(svc[rows], win_start[rows], t.series_ids(gloc[rows], gver[rows]),
                             c.bucket[rows].astype(np.int64), c.error[rows].astype(np.int64),
                             c.count[rows].astype(np.int64))
        if c.exceptions:  # (location index, version index, end, type, count): into open windows
            ex = np.array([(i, v, e) for i, v, e, _, _ in c.exceptions], np.int64).reshape(-1, 3)
            lids = np.array(ids, np.int64)[ex[:, 0]]
            vids = np.array([t.version_id(c.versions[v]) for v in ex[:, 1].tolist()], np.int64)
            ex_series = t.series_ids(lids, vids).tolist()
            for (_, _, _, etype, k), s_id, lid, e in zip(c.exceptions, ex_series, lids.tolist(), ex[:, 2].tolist()):
                s = int(t.loc_service.view[lid])
                clock = self.services.get(s)
                ws = e - e % self.window_ns
                if clock is None or ws + self.window_ns <= self._closed(clock):
                    continue  # (its window closed, or closes now: dropped, as its spans' figures would be)
                self._accumulator(s, ws).exceptions[(s_id, etype)] += k
        if c.exemplars is not None and len(c.exemplars[0]) and self.exemplars:
            self._counted_exemplars(c, ids)
        if self.graph is not None and self.graph.waiting:  # (spans' traces in the windows that close)
            self._flush_graph(touched)
        return self._close_behind(touched)

    def _counted_exemplars(self, c, ids: list) -> None:
        """The exemplars of pre-aggregated figures (location index, version index, end,
        duration, trace id) into their open windows, as candidates like spans' slowest."""
        t = self.tables
        li, vi, e, dur, tid = c.exemplars
        lids = np.array(ids, np.int64)[li]
        vids = np.array([t.version_id(v) for v in c.versions], np.int64)[vi]
        svc = t.loc_service.view[lids].astype(np.int64)
        ws = e - e % self.window_ns
        keep = np.ones(len(e), bool)
        for s in np.unique(svc).tolist():
            clock = self.services.get(s)
            rows = svc == s
            keep &= ~rows | ((ws + self.window_ns > self._closed(clock)) if clock is not None else False)
        rows = np.flatnonzero(keep)
        if not len(rows):
            return
        series = t.series_ids(lids[rows], vids[rows])
        tid64 = np.ascontiguousarray(tid[rows]).view(">u8").reshape(-1, 2).astype(np.uint64)
        for acc, part in self._groups(svc[rows], ws[rows]):
            acc.add_exemplars(series[part], dur[rows][part], tid64[part])

    def _flush_graph(self, touched: list[int], force: bool | set[int] = False) -> None:
        """Join the call graph's complete traces: before a window of theirs closes, and
        otherwise once a quarter of the graph's wait has passed since the last join."""
        g = self.graph
        ahead = max(self.services[s].max_end for s in touched) if touched else 0
        due = force or g.waiting > g.max_spans or ahead - self._graph_flushed >= g.wait_ns // 4 or any(
            ws + self.window_ns <= self.services[s].max_end - self.lateness_ns
            for s in touched for ws in self.services[s].windows)
        if due:
            g.flush({s: c.max_end for s, c in self.services.items()},
                    {s: c.closed_through for s, c in self.services.items()}, force)
            self._graph_flushed = max(self._graph_flushed, ahead)

    def flush_idle(self, now: float | None = None) -> list[ClosedWindow]:
        """Close the windows of services that sent nothing for ``idle_timeout`` seconds
        before ``now`` (processing time; the clock when not given)."""
        now = self.clock() if now is None else now
        out = []
        idle = [s for s, clock in self.services.items()
                if clock.windows and now - clock.last_arrival >= self.idle_timeout]
        if idle and self.graph is not None and self.graph.waiting:
            self._flush_graph(idle, force=set(idle))
        for s, clock in self.services.items():
            if clock.windows and now - clock.last_arrival >= self.idle_timeout:
                out += self._close(s, lambda ws: True)
        return sorted(out, key=lambda c: (c.end_ns, c.service))

    def forget_idle(self, now: float | None = None) -> Forgotten:
        """Forget the versions that sent nothing for ``version_idle_timeout`` seconds, the
        code locations that sent nothing for ``location_idle_timeout`` seconds, neither with
        a span in an open window, then the services left without a location and idle as
        long (checked at most once a minute); returns what was forgotten."""
        now = self.clock() if now is None else now
        t = self.tables
        v_before, l_before = now - self.version_idle_timeout, now - self.location_idle_timeout
        if now < self._next_forget:
            return Forgotten()
        idle_services = [s for s, c in self.services.items() if c.last_arrival < l_before and not c.windows]
        if not ((t.ver_seen.view < v_before).any() or (t.loc_seen.view < l_before).any() or idle_services):
            return Forgotten()
        self._next_forget = now + min(60.0, min(self.version_idle_timeout, self.location_idle_timeout) / 10)
        held = [np.zeros(0, np.int64)]
        for clock in self.services.values():
            for acc in clock.windows.values():
                held += [(c >> 1) // _NB for c in acc.codes] + list(acc.ex_series)
                held.append(np.array([series for series, _ in acc.exceptions], np.int64))
        series = np.unique(np.concatenate(held))
        out = Forgotten(t.forget_versions(v_before, set(t.series_ver.view[series].tolist())),
                        t.forget_locations(l_before, set(t.series_loc.view[series].tolist())))
        if out.locations or idle_services:
            for s, name in t.forget_services(busy=set(self.services) - set(idle_services)):
                clock = self.services.pop(s, None)  # (the id is free for another service)
                if self.graph is not None:
                    self.graph.forget_service(s)
                out.services.append(name)
                out.service_ends[name] = clock.max_end if clock is not None else 0
        self.stats["forgotten_versions"] += len(out.versions)
        self.stats["forgotten_locations"] += len(out.locations)
        self.stats["forgotten_services"] += len(out.services)
        return out

    def flush_all(self) -> list[ClosedWindow]:
        """Close every open window (shutdown). The service clocks do not move: after a
        restart, spans of a window closed early here are not late but make a second part of
        it, which the baseline merges exactly (the same window end: no decay between them)."""
        out = []
        if self.graph is not None and self.graph.waiting:
            self._flush_graph(list(self.services), force=True)
        for s in self.services:
            out += self._close(s, lambda ws: True, final=False)
        return sorted(out, key=lambda c: (c.end_ns, c.service))

    def restore_clock(self, service: tuple[str, str], max_end: int, closed_through: int) -> None:
        """A service's clock from a checkpoint: windows ending by ``closed_through`` stay
        closed (their spans are late), as before the restart."""
        clock = self.services.setdefault(self.tables.service_id(service), _ServiceClock())
        clock.max_end = max(clock.max_end, max_end)
        clock.closed_through = max(clock.closed_through, closed_through)
        clock.last_arrival = self.clock()

    def restore_location(self, loc: Location) -> int:
        """A location's id, for a checkpoint's location: idle from now on, not from before
        the restart."""
        self.tables.now = self.clock()
        return self.tables.location_id(loc)

    def advance(self, service: tuple[str, str], watermark: int | None) -> list[ClosedWindow]:
        """Close the windows of ``service`` (environment, name) ending by ``watermark``, which
        the aggregate replicas' reports set (processor/pipeline/tiers.py): from now on its
        windows close by these, not by the ends of its figures (None: only that)."""
        t = self.tables
        s = t._svc_ids.get(service)
        if s is None:
            if len(t._svc_ids) - (_SHARED in t._svc_ids) >= t.max_services:
                return []  # (its figures fold into the shared overflow location, as spans' would)
            s = t.service_id(service)
        clock = self.services.get(s)
        if clock is None:
            clock = self.services[s] = _ServiceClock(last_arrival=self.clock())
        clock.external = True
        if watermark is None:
            return []
        out = self._close(s, lambda ws: ws + self.window_ns <= watermark)
        clock.closed_through = max(clock.closed_through, watermark)
        return out

    def release(self, service: tuple[str, str]) -> list[ClosedWindow]:
        """``service``'s windows close by its own figures again (no replica reports it): those
        its figures' watermark passed, now."""
        s = self.tables._svc_ids.get(service)
        clock = self.services.get(s) if s is not None else None
        if clock is None or not clock.external:
            return []
        clock.external = False
        return self._close_behind([s])

    def open_windows(self) -> int:
        return sum(len(c.windows) for c in self.services.values())

    def _close(self, s: int, due, final: bool = True) -> list[ClosedWindow]:
        clock = self.services[s]
        out = []
        for ws in sorted(w for w in clock.windows if due(w)):
            acc = clock.windows.pop(ws)
            we = ws + self.window_ns
            if final:
                clock.closed_through = max(clock.closed_through, we)
            env, service = self.tables.services[s]
            locations, busy_ns = acc.close(self.tables, self.partial)
            graph = self.graph.take(s, ws) if self.graph is not None else {}
            out.append(ClosedWindow(service, ws, we, locations, env, busy_ns, graph))
            self.stats["windows"] += 1
        return out
