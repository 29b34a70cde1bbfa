"""OTLP metrics in: what the collector's ``spanmetrics`` connector makes of spans.

A fleet of collectors can aggregate spans into metrics before they reach Backflow
(deploy/collector/spanmetrics.yaml). Backflow reads, from an ``ExportMetricsServiceRequest``:

- the **duration histogram** (a metric named ``duration``, or ending in ``.duration``:
  ``traces.span.metrics.duration``), exponential or with explicit buckets, in ``ms`` or
  ``s``: its data points become the counts of spans per log bucket of Backflow's sketch,
  each OTLP bucket's count put at its middle (the error that brings is stated below);
- the **events counter** (``events`` or ``*.events``) where it has the dimension
  ``exception.type``: exception counts, as spans' exception events give them.

A data point's dimensions name its code location as a span's attributes do
(``code.function.name``, ``code.file.path``, ``code.line.number``; else ``span.name``, as
``span:<name>``), its version (``service.version``, ``vcs.ref.head.revision``, on the data
point or its resource) and whether its spans failed (``status.code`` ``STATUS_CODE_ERROR``
or ``Error``). Its figures belong to the window that holds its ``time_unix_nano``.

Delta temporality is read as it is; cumulative points are turned into deltas per series
(resource, metric and dimensions) by ``Deltas`` in the pipeline (one place, whichever
receiver process decoded them): the difference with the series' previous point, or the
whole point after a reset (a new ``start_time_unix_nano``, or counts that went down). A
series' first point only starts it (what it holds came before: since a sender's start). The
calls counter is not read: the histogram's count is the same figure. What is lost against
spans: the call graph (no parent links), exemplars beyond those a point carries (its
``exemplars``, read: trace id and value), and the durations' resolution
within an OTLP bucket (exponential at scale s, a value put at its bucket's geometric middle
is off by at most 2^(2^-s / 2) - 1: 2.2% at scale 4, 0.5% at scale 6, beside the sketch's
own 1%; explicit buckets: up to half a bucket's width, and the last bucket's values are put
at 1.5 times its bound).

>>> import numpy as np
>>> e = ExpBuckets(scale=3, offset=10, counts=np.array([2, 0, 5]), zero=1)
>>> [round(float(v), 2) for v in e.values()]    # the middles of (2^(10/8), 2^(11/8)], ...: ms
[0.0, 2.48, 2.71, 2.95]
>>> e.weights().tolist()
[1, 2, 0, 5]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import math

import numpy as np
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from processor.pipeline.location import Location, file_of, function_of, line_of, resource_of
from processor.pipeline.sketch import MAX_BUCKET, bucket_index
from processor.receiver.decode import MAX_END_NS, MalformedRequest

CUMULATIVE = 2  # opentelemetry.proto.metrics.v1.AggregationTemporality
UNITS_NS = {"ms": 1e6, "s": 1e9, "us": 1e3, "ns": 1.0}
ERROR_STATUS = {"STATUS_CODE_ERROR", "Error", "ERROR", "2"}


@dataclass
class ExpBuckets:
    """An exponential histogram's positive buckets: bucket i holds (base^i, base^(i+1)],
    base = 2^(2^-scale); ``zero`` values at 0."""
    scale: int
    offset: int
    counts: np.ndarray
    zero: int = 0

    def values(self) -> np.ndarray:
        """Each bucket's middle (geometric), the zero bucket's first."""
        i = np.arange(self.offset, self.offset + len(self.counts), dtype=np.float64)
        # (exponents past a float's range are capped: such values are clipped where used)
        return np.concatenate(([0.0], np.exp2(np.minimum((i + 0.5) * 2.0 ** -self.scale, 1000.0))))

    def weights(self) -> np.ndarray:
        return np.concatenate(([self.zero], self.counts)).astype(np.int64)

    def at_scale(self, scale: int) -> "ExpBuckets":
        """The same counts in the coarser ``scale`` (adjacent buckets merged)."""
        by = self.scale - scale
        if by <= 0:
            return self
        idx = np.arange(self.offset, self.offset + len(self.counts)) >> by
        lo = int(idx[0]) if len(idx) else self.offset >> by
        merged = np.bincount(idx - lo, weights=self.counts, minlength=int(idx[-1] - lo + 1) if len(idx) else 0)
        return ExpBuckets(scale, lo, merged.astype(np.int64), self.zero)

    def minus(self, prev) -> "ExpBuckets | None":
        """These counts less ``prev``'s (at the coarser scale of the two); None if any went
        down (a reset)."""
        if not isinstance(prev, ExpBuckets):
            return None
        scale = min(self.scale, prev.scale)
        a, b = self.at_scale(scale), prev.at_scale(scale)
        if not len(b.counts):
            b = ExpBuckets(scale, a.offset, np.zeros(0, np.int64), b.zero)
        lo = min(a.offset, b.offset)
        hi = max(a.offset + len(a.counts), b.offset + len(b.counts))
        if hi - lo > len(a.counts) + len(b.counts) + 1024:  # (buckets far apart: not one series' growth)
            return None
        out = np.zeros(hi - lo, np.int64)
        out[a.offset - lo:a.offset - lo + len(a.counts)] += a.counts
        out[b.offset - lo:b.offset - lo + len(b.counts)] -= b.counts
        zero = a.zero - b.zero
        if (out < 0).any() or zero < 0:
            return None
        return ExpBuckets(scale, lo, out, zero)


@dataclass
class ExplicitBuckets:
    """An explicit-bounds histogram: bucket j holds (bounds[j-1], bounds[j]], the last one
    beyond the last bound."""
    bounds: np.ndarray
    counts: np.ndarray

    def values(self) -> np.ndarray:
        """Each bucket's middle; the first's half its bound, the last's 1.5 times its bound."""
        b = self.bounds
        if not len(b):
            return np.zeros(len(self.counts))
        inner = (b[:-1] + b[1:]) / 2
        return np.concatenate(([b[0] / 2], inner, [b[-1] * 1.5]))[:len(self.counts)]

    def weights(self) -> np.ndarray:
        return self.counts.astype(np.int64)

    def minus(self, prev) -> "ExplicitBuckets | None":
        if (not isinstance(prev, ExplicitBuckets) or not np.array_equal(self.bounds, prev.bounds)
                or len(self.counts) != len(prev.counts)):
            return None
        out = self.counts - prev.counts
        return None if (out < 0).any() else ExplicitBuckets(self.bounds, out)


@dataclass
class Point:
    """One data point of the duration histogram or of the exception events, as sent."""
    series: tuple            # what a cumulative series is known by
    location: Location
    version: tuple
    error: bool
    start_ns: int
    end_ns: int
    cumulative: bool
    buckets: ExpBuckets | ExplicitBuckets | None = None  # a histogram's
    unit_ns: float = 1e6
    exception: str = ""      # an events point's exception.type
    count: int = 0           # an events point's
    exemplars: list = field(default_factory=list)  # a histogram's: (end, duration in its unit, trace id)
    window_ns: int = 0       # an aggregate replica's window length (0: not from a replica)


@dataclass
class Watermark:
    """An aggregate replica's report on one service (processor/pipeline/tiers.py): it has
    sent every window of the service ending by ``watermark``, and holds ``open`` more."""
    replica: str
    service: tuple[str, str]  # (environment, service.name)
    watermark: int
    open: int
    window_ns: int


@dataclass
class MetricsBatch:
    """A decoded ExportMetricsServiceRequest: the points Backflow reads, and the data points
    it refused (with why)."""
    points: list[Point] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    watermarks: list[Watermark] = field(default_factory=list)
    replicas: dict = field(default_factory=dict)  # aggregate replicas heard from -> their window length (ns)
    sequence: tuple | None = None  # an aggregate replica's request: (replica, session, number)
    received_at: float | None = None
    max_end_ns: int = 0      # (the limits it was decoded with)
    max_length: int = 0

    def __len__(self) -> int:
        return len(self.points) + len(self.watermarks)

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())


@dataclass
class Counts:
    """What the window stage takes (``WindowStage.ingest_counts``): rows of spans counted
    per location, version, end time, error and log bucket, and exception counts."""
    locations: list[Location]
    versions: list[tuple]
    loc: np.ndarray
    ver: np.ndarray
    end: np.ndarray
    error: np.ndarray
    bucket: np.ndarray
    count: np.ndarray
    exceptions: list[tuple] = field(default_factory=list)  # (location index, version index, end, type, count)
    received_at: float | None = None
    # exemplars as arrays: location index, version index, end, duration (ns), trace id (n x 16 bytes)
    exemplars: tuple | None = None
    refused: int = 0  # points of an aggregate replica whose window length is not this process's


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        which = v.WhichOneof("value")
        out[kv.key] = getattr(v, which) if which in ("string_value", "int_value", "double_value", "bool_value") else ""
    return out


def _metric_kind(name: str) -> str:
    base = name.rsplit(".", 1)[-1]
    return base if base in ("duration", "events") else ""


def decode_metrics(data: bytes, max_end_ns: int = MAX_END_NS, max_attribute_length: int = 0) -> MetricsBatch:
    """The points of a serialized ExportMetricsServiceRequest that Backflow reads;
    MalformedRequest when it does not parse. Points whose time is past ``max_end_ns`` (the
    clock skew allowed, as for spans) or that keep a value longer than
    ``max_attribute_length`` characters (0: no limit) are refused."""
    req = ExportMetricsServiceRequest()
    try:
        req.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 (protobuf's DecodeError and friends)
        raise MalformedRequest(f"not an OTLP ExportMetricsServiceRequest: {e}") from None
    return from_request(req, min(max_end_ns, MAX_END_NS), max_attribute_length)


def from_request(req: ExportMetricsServiceRequest, max_end_ns: int = MAX_END_NS,
                 max_attribute_length: int = 0) -> MetricsBatch:
    out = MetricsBatch(max_end_ns=max_end_ns, max_length=max_attribute_length)
    for rm in req.resource_metrics:
        rattrs = _attrs(rm.resource.attributes)
        rkey = tuple(sorted(rattrs.items()))
        if REPLICA in rattrs and type(rattrs.get(WINDOW)) is int:
            out.replicas[str(rattrs[REPLICA])] = rattrs[WINDOW]
        if REPLICA in rattrs and type(rattrs.get(SESSION)) is int and type(rattrs.get(SEQUENCE)) is int:
            out.sequence = (str(rattrs[REPLICA]), rattrs[SESSION], rattrs[SEQUENCE])
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                which = m.WhichOneof("data")
                if m.name == WATERMARK and which == "gauge":
                    _watermarks(rattrs, m.gauge.data_points, out)
                    continue
                kind = _metric_kind(m.name)
                if not kind:
                    continue
                if kind == "duration" and which in ("histogram", "exponential_histogram"):
                    h = getattr(m, which)
                    unit = UNITS_NS.get(m.unit or "ms")
                    if unit is None:
                        out.reasons["duration unit not ms, s, us or ns"] += len(h.data_points)
                        continue
                    for dp in h.data_points:
                        p = _point(rattrs, (rkey, which, m.unit), m.name, dp, h.aggregation_temporality == CUMULATIVE,
                                   out)
                        if p is None:
                            continue
                        why = _buckets(p, dp, which == "histogram")
                        if why:
                            out.reasons[why] += 1
                            continue
                        p.unit_ns = unit
                        if dp.exemplars:
                            p.exemplars = [(x.time_unix_nano, x.as_int if x.WhichOneof("value") == "as_int"
                                            else x.as_double, x.trace_id) for x in dp.exemplars
                                           if len(x.trace_id) == 16]
                        out.points.append(p)
                elif kind == "events" and which == "sum":
                    for dp in m.sum.data_points:
                        a = _attrs(dp.attributes)
                        if not a.get("exception.type"):
                            continue
                        p = _point(rattrs, (rkey, "sum"), m.name, dp, m.sum.aggregation_temporality == CUMULATIVE,
                                   out)
                        if p is None:
                            continue
                        value = dp.as_int if dp.WhichOneof("value") == "as_int" else dp.as_double
                        if not (math.isfinite(value) and 0 <= value <= MAX_COUNT):
                            out.reasons["events count not a finite count"] += 1
                            continue
                        p.exception = str(a["exception.type"])
                        if out.max_length and len(p.exception) > out.max_length:
                            out.reasons["attribute_too_long"] += 1
                            continue
                        p.count = int(value)
                        out.points.append(p)
    return out


MAX_COUNT = 1 << 53  # counts beyond it are not counts of spans (and would overflow sums)
WATERMARK = "backflow.watermark"  # an aggregate replica's gauge (processor/pipeline/tiers.py)
REPLICA, WINDOW = "backflow.replica.id", "backflow.window_ns"  # its resource's attributes
SESSION, SEQUENCE = "backflow.session", "backflow.sequence"  # a request's place in its sending


def _watermarks(rattrs: dict, points, out: MetricsBatch) -> None:
    """An aggregate replica's watermark gauges: one per service it holds."""
    replica, window_ns = str(rattrs.get(REPLICA, "")), rattrs.get(WINDOW)
    if not replica or type(window_ns) is not int or window_ns <= 0:
        out.reasons["watermark without backflow.replica.id and backflow.window_ns"] += len(points)
        return
    res = resource_of(rattrs)
    for dp in points:
        open_ = _attrs(dp.attributes).get("backflow.open_windows", 0)
        if dp.WhichOneof("value") != "as_int" or type(open_) is not int:
            out.reasons["watermark not an integer"] += 1
            continue
        out.watermarks.append(Watermark(replica, (res.environment, res.service), dp.as_int, open_, window_ns))


def _buckets(p: Point, dp, explicit: bool) -> str:
    """The data point's buckets into ``p``; what is wrong with them, if anything."""
    raw = np.asarray(dp.bucket_counts if explicit else dp.positive.bucket_counts, np.uint64)
    if (raw > MAX_COUNT).any() or dp.count > MAX_COUNT or (not explicit and dp.zero_count > MAX_COUNT):
        return "histogram count out of range"
    counts = raw.astype(np.int64)
    if explicit:
        bounds = np.asarray(dp.explicit_bounds, np.float64)
        if not np.isfinite(bounds).all() or (np.diff(bounds) <= 0).any() or len(counts) not in (0, len(bounds) + 1):
            return "explicit bounds not finite and increasing, or not one bucket more than bounds"
        p.buckets = ExplicitBuckets(bounds, counts)
    else:
        if not -10 <= dp.scale <= 20:  # (the OTLP data model's range)
            return "exponential scale out of range"
        p.buckets = ExpBuckets(dp.scale, dp.positive.offset, counts, int(dp.zero_count))
    return ""


def _point(rattrs: dict, rkey: tuple, name: str, dp, cumulative: bool, out: MetricsBatch) -> Point | None:
    a = _attrs(dp.attributes)
    if not dp.time_unix_nano:
        out.reasons["data point without time_unix_nano"] += 1
        return None
    if dp.time_unix_nano > out.max_end_ns:  # (as a span's end: one sender's clock must not move a service's on)
        out.reasons["clock_skew"] += 1
        return None
    dims = tuple(sorted(a.items()))
    ident = _IDENTITIES.get((rkey, dims, out.max_length))
    if ident is None:  # (a series recurs at every flush: its location and version are made once)
        res = resource_of({**rattrs, **{k: v for k, v in a.items() if k in ("service.version", "vcs.ref.head.revision")}})
        fn = function_of(a, res.attrs, str(a.get("span.name", "")))
        loc = Location(res.environment, res.service, fn, file_of(a, res.attrs), line_of(a, res.attrs),
                       str(a.get("otel.scope.name", "")))
        too_long = any(len(v) > out.max_length for v in (*loc.identity, loc.file, loc.line, res.version,
                                                         res.revision)) if out.max_length else False
        if len(_IDENTITIES) >= _IDENTITIES_MAX:
            _IDENTITIES.clear()
        ident = _IDENTITIES[(rkey, dims, out.max_length)] = (loc, (res.service, res.version, res.revision), too_long,
                                             str(a.get("status.code", "")) in ERROR_STATUS)
    loc, version, too_long, error = ident
    if too_long:
        out.reasons["attribute_too_long"] += 1
        return None
    window_ns = rattrs.get(WINDOW)
    return Point((rkey, name, dims), loc, version, error, dp.start_time_unix_nano, dp.time_unix_nano, cumulative,
                 window_ns=window_ns if type(window_ns) is int else 0)


# (resource, dimensions, length limit) -> (location, version, a value too long, error): see _point
_IDENTITIES: dict[tuple, tuple] = {}
_IDENTITIES_MAX = 1 << 16


class Deltas:
    """Cumulative points made deltas, per series (the previous point of each is kept; past
    ``max_series`` series, the one seen longest ago is forgotten)."""

    def __init__(self, max_series: int = 1_000_000):
        self.last: dict[tuple, tuple[int, object]] = {}  # series -> (start, buckets or count)
        self.max_series = max_series
        self.resets = 0

    def delta(self, p: Point) -> Point | None:
        """``p`` as a delta; None for a cumulative series' first point (what it holds came
        before, over a time not known to be a window's)."""
        if not p.cumulative:
            return p
        prev = self.last.pop(p.series, None)  # (re-inserted: the table's order is by last seen)
        now = p.buckets if p.buckets is not None else p.count
        if len(self.last) >= self.max_series:
            self.last.pop(next(iter(self.last)))  # the series seen longest ago
        self.last[p.series] = (p.start_ns, now)
        if prev is None:
            # a series' first point: what it holds came before, over a time not known to be
            # one window's (a sender up for a day): the next points' differences count
            return None
        start, before = prev
        if start != p.start_ns:  # a restart of the sender: the whole point is new
            self.resets += 1
            return p
        if p.buckets is not None:
            d = p.buckets.minus(before)
            if d is None:
                self.resets += 1
                return p
            return Point(p.series, p.location, p.version, p.error, p.start_ns, p.end_ns, False, d, p.unit_ns,
                         exemplars=p.exemplars)
        if p.count < before:
            self.resets += 1
            return p
        return Point(p.series, p.location, p.version, p.error, p.start_ns, p.end_ns, False,
                     exception=p.exception, count=p.count - before)


def to_counts(batch: MetricsBatch, deltas: Deltas, window_ns: int = 0) -> Counts:
    """The batch's points, made deltas, as rows of the window stage (one numpy pass over
    every bucket of the batch). An aggregate replica's points whose window is not
    ``window_ns`` long are left out, counted in ``Counts.refused``."""
    refused = 0
    ex_rows: list[tuple] = []
    locations: list[Location] = []
    loc_index: dict[Location, int] = {}
    versions: list[tuple] = []
    ver_index: dict[tuple, int] = {}
    meta: list[tuple[int, int, int, bool]] = []  # per histogram point: location, version, end, error
    values, weights = [], []
    exceptions = []
    for raw in batch.points:
        if raw.window_ns and window_ns and raw.window_ns != window_ns:
            refused += 1
            continue
        p = deltas.delta(raw)
        if p is None:
            continue
        li = loc_index.get(p.location)
        if li is None:
            li = loc_index[p.location] = len(locations)
            locations.append(p.location)
        vi = ver_index.get(p.version)
        if vi is None:
            vi = ver_index[p.version] = len(versions)
            versions.append(p.version)
        if p.buckets is None:
            if p.count > 0:
                exceptions.append((li, vi, p.end_ns, p.exception, p.count))
            continue
        meta.append((li, vi, p.end_ns, p.error))
        values.append(p.buckets.values() * p.unit_ns)
        weights.append(p.buckets.weights())
        for _, value, tid in p.exemplars:
            if math.isfinite(value) and value >= 0:
                ex_rows.append((li, vi, p.end_ns, int(min(value * p.unit_ns, 3e18)), tid))
    exemplars = None
    if ex_rows:
        li, vi, e, d, tids = zip(*ex_rows)
        exemplars = (np.array(li, np.int64), np.array(vi, np.int64), np.array(e, np.int64), np.array(d, np.int64),
                     np.frombuffer(b"".join(tids), np.uint8).reshape(-1, 16))
    if not meta:
        z = np.zeros(0, np.int64)
        return Counts(locations, versions, z.astype(np.int32), z.astype(np.int32), z, z.astype(bool),
                      z.astype(np.int32), z, exceptions, batch.received_at, exemplars, refused)
    w = np.concatenate(weights)
    point = np.repeat(np.arange(len(meta)), [len(x) for x in weights])
    keep = w > 0
    # (values beyond a century are clipped: the sketch's buckets end there)
    idx = bucket_index(np.clip(np.concatenate(values)[keep], 0, 3e18)).astype(np.int64)
    uniq, inv = np.unique(point[keep] * _NB + idx, return_inverse=True)
    counts = np.bincount(inv, weights=w[keep]).astype(np.int64)
    m = np.array([(li, vi, end, err) for li, vi, end, err in meta], np.int64)[uniq // _NB]
    return Counts(locations, versions, m[:, 0].astype(np.int32), m[:, 1].astype(np.int32), m[:, 2],
                  m[:, 3].astype(bool), (uniq % _NB).astype(np.int32), counts, exceptions, batch.received_at,
                  exemplars, refused)


_NB = MAX_BUCKET + 1
