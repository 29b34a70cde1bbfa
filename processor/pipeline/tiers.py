"""Two tiers: aggregate replicas close windows into partials, a detect replica merges them.

``backflow serve --role aggregate`` takes spans (routed by trace id, or not at all) into its
windows as usual, but does not detect: each window it closes goes on, per code location,
version and outcome, as an OTLP delta histogram (``backflow.duration``, unit ``ns``) whose
explicit bounds are the sketch's own bucket bounds, so that the detect replica rebuilds the
very buckets (no error beyond the sketch's); exceptions go as ``backflow.events`` sums, the
slowest spans as the histograms' exemplars. Each request also carries the replica's
watermark per service (the ``backflow.watermark`` gauge: every window of the service ending
by it has been sent, and ``backflow.open_windows`` more are held), and the replica's
identity (``backflow.replica.id``) and window length (``backflow.window_ns``) on its
resources. ``partials`` makes these requests.

The detect replica (``--role detect``, or the default role) takes them with its OTLP
metrics receiver: the partials of a window from every replica merge in its window, and
``Replicas`` decides when it closes. A service's window closes when every replica known to
it has reported past it (a replica holding no open window of the service has sent all it
has); a known replica that has not reported the service is waited for ``replica_wait``
seconds at most after the first one passed the window (it may never get the service).
Replicas announce themselves in every request; one silent for ``replica_timeout`` seconds
is dropped, counted, and no longer waited for.

>>> r = Replicas(timeout=30.0, wait=10.0, settle=0.0)
>>> svc = ("prod", "shop")
>>> r.report([Watermark("a", svc, 1000, 1, 60), Watermark("b", svc, 1060, 1, 60)], now=0.0)
{('prod', 'shop')}
>>> r.watermark(svc, now=1.0)   # a holds open windows from 1000 on
1000
>>> _ = r.report([Watermark("a", svc, 1060, 0, 60)], now=2.0)
>>> r.watermark(svc, now=2.0)
1060
>>> _ = r.report([Watermark("b", svc, 1200, 1, 60)], now=3.0)  # a holds none: b's is the one
>>> r.watermark(svc, now=3.0)
1200
>>> r.announce(["c"], now=4.0)  # c has not reported it: waited for, 10 s at most
>>> r.watermark(svc, now=5.0), r.watermark(svc, now=13.0)
(-4611686018427387904, 1200)
>>> sorted(r.expire(now=40.0)), r.dropped, r.known, r.watermark(svc, now=40.0)
([('prod', 'shop')], 3, 0, None)
"""

from __future__ import annotations

from collections import deque

import numpy as np
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_DELTA

from processor.pipeline.sketch import GAMMA
from processor.pipeline.window import ClosedWindow
from processor.receiver.metrics import REPLICA, SEQUENCE, SESSION, WATERMARK, WINDOW, Watermark

DURATION, EVENTS = "backflow.duration", "backflow.events"
POINTS_PER_REQUEST = 2_000  # data points a request holds at most
BYTES_PER_REQUEST = 3 << 20  # and bytes: under the receiver's 4 MiB (max_request_bytes) limit
SETTLE_S = 5.0  # a detect replica's wait for the aggregate replicas' announcements (a full report's interval)


def _kv(key: str, value) -> KeyValue:
    kv = KeyValue(key=key)
    if isinstance(value, int):
        kv.value.int_value = value
    else:
        kv.value.string_value = value
    return kv


def explicit_bounds(index: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Explicit-bounds buckets holding a sketch's buckets exactly: each present bucket ``i``
    of the sketch, ``(GAMMA^(i-1), GAMMA^i]``, is one bucket; a run of absent ones between two
    present ones is one empty bucket. Returns the bounds (ns) and the bucket counts.

    >>> b, c = explicit_bounds(np.array([10, 11, 14]), np.array([2, 1, 5]))
    >>> c.tolist(), len(b) + 1 == len(c)
    ([0, 2, 1, 0, 5, 0], True)
    """
    index = np.asarray(index, np.int64)
    gap = np.concatenate(([True], index[1:] - 1 != index[:-1]))  # a bucket whose lower bound is new
    edges = np.empty(len(index) + int(gap.sum()), np.int64)
    pos = np.arange(len(index)) + np.cumsum(gap)  # where each bucket's upper bound goes
    edges[pos] = index
    edges[pos[gap] - 1] = index[gap] - 1
    out = np.zeros(len(edges) + 1, np.int64)
    out[pos] = counts
    return GAMMA ** edges.astype(np.float64), out


def _attributes(point, lw, version: tuple, error: bool | None = None) -> None:
    loc = lw.location
    attrs = [_kv("code.function.name", loc.function)]
    if loc.file:
        attrs.append(_kv("code.file.path", loc.file))
    if loc.line:
        attrs.append(_kv("code.line.number", loc.line))
    if loc.scope:
        attrs.append(_kv("otel.scope.name", loc.scope))
    attrs.append(_kv("service.version", version[1]))
    if version[2]:
        attrs.append(_kv("vcs.ref.head.revision", version[2]))
    if error:
        attrs.append(_kv("status.code", "STATUS_CODE_ERROR"))
    point.attributes.extend(attrs)


def _resource(req: ExportMetricsServiceRequest, service: tuple[str, str] | None, replica: str, window_ns: int):
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend([_kv(REPLICA, replica), _kv(WINDOW, window_ns)])
    if service is None:
        return None
    env, name = service
    rm.resource.attributes.extend([_kv("service.name", name)] + ([_kv("deployment.environment.name", env)]
                                                                  if env else []))
    sm = rm.scope_metrics.add()
    sm.scope.name = "backflow"
    return sm


def partials(closed: list[ClosedWindow], marks: dict[tuple[str, str], tuple[int, int]], replica: str,
             window_ns: int, per_request: int = POINTS_PER_REQUEST,
             max_bytes: int = BYTES_PER_REQUEST) -> list[tuple[bytes, int]]:
    """The windows ``closed`` (of a stage with ``partial`` set) as serialized OTLP requests
    of at most about ``per_request`` data points and ``max_bytes`` each (with their counts
    of data points),
    then the watermarks ``marks``
    ((environment, service) -> (watermark, open windows)) in the last request, so that a
    receiver that takes them in order has every window before the watermark that passes it."""
    out: list[tuple[bytes, int]] = []
    req, n, size = ExportMetricsServiceRequest(), 0, 0

    def cut():
        nonlocal req, n, size
        out.append((req.SerializeToString(), n))
        req, n, size = ExportMetricsServiceRequest(), 0, 0

    for cw in closed:
        service = (cw.environment, cw.service)
        sm = hist = events = None
        end = cw.start_ns + window_ns - 1  # (the window's last nanosecond: the receiver's window is the one holding it)
        for lw in cw.locations:
            full = n >= per_request or size >= max_bytes
            if sm is None or full:
                if full:
                    cut()
                sm = _resource(req, service, replica, window_ns)
                hist = sm.metrics.add(name=DURATION, unit="ns")
                hist.histogram.aggregation_temporality = AGGREGATION_TEMPORALITY_DELTA
                events = None
            ids, durations = lw.trace_ids, lw.exemplar_ns
            for v in lw.versions:
                counts = v.sketch.counts.astype(np.int64)
                errors = v.error_counts.astype(np.int64) if v.error_counts is not None else np.zeros_like(counts)
                for error, c in ((False, counts - errors), (True, errors)):
                    present = c > 0
                    if not present.any():
                        continue
                    bounds, bucket_counts = explicit_bounds(v.sketch.index[present], c[present])
                    dp = hist.histogram.data_points.add(start_time_unix_nano=cw.start_ns, time_unix_nano=end,
                                                        count=int(c.sum()))
                    dp.explicit_bounds.extend(bounds.tolist())
                    dp.bucket_counts.extend(bucket_counts.tolist())
                    _attributes(dp, lw, v.version, error)
                    if ids and durations is not None:  # (the location's slowest: on its first point)
                        for k, d in enumerate(durations.tolist()):
                            dp.exemplars.add(time_unix_nano=end, as_int=int(d), trace_id=ids[16 * k:16 * k + 16])
                        ids = b""
                    n += 1
                    size += dp.ByteSize() + 8
                for etype, k in v.exceptions.items():
                    if events is None:
                        events = sm.metrics.add(name=EVENTS)
                        events.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_DELTA
                        events.sum.is_monotonic = True
                    dp = events.sum.data_points.add(start_time_unix_nano=cw.start_ns, time_unix_nano=end, as_int=k)
                    _attributes(dp, lw, v.version)
                    dp.attributes.append(_kv("exception.type", etype))
                    n += 1
                    size += dp.ByteSize() + 8
    for service, (wm, held) in sorted(marks.items()):
        if n >= per_request or size >= max_bytes:
            cut()
        g = _resource(req, service, replica, window_ns).metrics.add(name=WATERMARK, unit="ns").gauge
        g.data_points.add(as_int=wm).attributes.append(_kv("backflow.open_windows", held))
        n += 1
        size += 64
    if not n and not out:  # (nothing to say: the replica announces itself)
        _resource(req, None, replica, window_ns)
    if n or not out:
        cut()
    return out


def sequenced(data: bytes, replica: str, session: int, sequence: int) -> bytes:
    """A serialized request with a resource naming its place in the replica's sending
    (``session``: one run of the replica, ``sequence``: the request's number in it): a
    request sent again after an answer was lost is then taken once (``Replicas.first``).
    Appended as bytes: a serialized message followed by another is their merge."""
    extra = ExportMetricsServiceRequest()
    extra.resource_metrics.add().resource.attributes.extend(
        [_kv(REPLICA, replica), _kv(SESSION, session), _kv(SEQUENCE, sequence)])
    return data + extra.SerializeToString()


_KEPT = 1024  # request numbers remembered per aggregate replica's session


class Replicas:
    """What the detect replica knows of the aggregate replicas: the replicas that announced
    themselves and when each last reported, and per service each one's watermark and whether
    it holds open windows.

    A known replica that has not reported a service may yet send some of it: it is waited
    for like one holding open windows. Once one replica has reported past a window, the
    others are waited for at most ``wait`` seconds (processing time). ``report``, ``expire``
    and ``due`` return the services whose ``watermark`` may have moved: the caller closes
    their windows up to it.
    """

    def __init__(self, timeout: float, wait: float, settle: float = 5.0):
        self.timeout = timeout
        self.wait = wait
        self.seen: dict[str, float] = {}  # replica -> processing time of its latest report
        self.marks: dict[tuple, dict[str, list[int]]] = {}  # service -> replica -> [watermark, open]
        self._tops: dict[tuple, deque] = {}  # service -> (highest watermark, when first reported), rising
        self.dropped = 0  # replicas dropped for silence
        self.settle = settle
        self._first: float | None = None  # when the first report came
        self._settling = True
        self._taken: dict[tuple, tuple[set, deque]] = {}  # (replica, session) -> request numbers taken
        self._restored: dict[tuple, float] = {}  # (service, replica) from a checkpoint -> waited for until
        self._gone: set[str] = set()  # replicas dropped in this run

    @property
    def known(self) -> int:
        return len(self.seen)

    def first(self, sequence: tuple | None) -> bool:
        """Whether a request (``sequenced``'s (replica, session, number)) is new: False for
        one taken before (sent again after its answer was lost, or from a spool sent again).
        The last ``_KEPT`` numbers of a session are remembered; one below them was taken:
        a session's requests go one at a time, each until taken, so only a few can come
        out of order (answered by one receiver process, relayed after the next's)."""
        if sequence is None:
            return True
        replica, session, number = sequence
        taken = self._taken.get((replica, session))
        if taken is None:
            if len(self._taken) >= 4096:  # (sessions of replicas long gone)
                self._taken.pop(next(iter(self._taken)))
            taken = self._taken[(replica, session)] = (set(), deque())
        numbers, order = taken
        if number in numbers or (len(order) >= _KEPT and number < min(numbers)):
            return False
        numbers.add(number)
        order.append(number)
        if len(order) > _KEPT:
            numbers.discard(order.popleft())
        return True

    def announce(self, replicas, now: float) -> None:
        """Replicas heard from (with or without a service's watermark)."""
        for r in replicas:
            self.seen[r] = max(now, self.seen.get(r, now))  # (a batch held for a restore may come later)
            if self._first is None:
                self._first = now
        if self._gone:
            self._gone.difference_update(replicas)  # (back: a checkpoint may name it again)

    def report(self, marks: list[Watermark], now: float) -> set[tuple]:
        self.announce({m.replica for m in marks}, now)
        touched = set()
        for m in marks:
            self._restored.pop((m.service, m.replica), None)
            by_replica = self.marks.setdefault(m.service, {})
            held = by_replica.get(m.replica)
            if held is None:
                by_replica[m.replica] = [m.watermark, m.open]
            else:  # (a replica's watermark only moves on: one restarted starts from nothing)
                held[0], held[1] = max(held[0], m.watermark), m.open
            touched.add(m.service)
        for service in touched:
            top = max(w for w, _ in self.marks[service].values())
            tops = self._tops.setdefault(service, deque())
            if not tops or top > tops[-1][0]:
                tops.append((top, now))
        return touched

    def restore(self, service: tuple, replicas, watermark: int, now: float) -> bool:
        """Replicas a checkpoint says reported ``service`` (but none dropped in this run):
        holding its windows after ``watermark`` until each reports it again, for at most
        ``timeout`` seconds from ``now`` (alive, one may no longer have the service). Whether
        any is waited for."""
        replicas = [r for r in replicas if r not in self._gone]
        if not replicas:
            return False
        if self._first is None:
            self._first = now
        by_replica = self.marks.setdefault(service, {})
        for r in replicas:
            self.seen.setdefault(r, now)  # (known from now, if not already: never made younger)
            if r not in by_replica:
                by_replica[r] = [watermark, True]
                self._restored[(service, r)] = now + self.timeout
        return True

    def expire(self, now: float) -> set[tuple]:
        """Drop the replicas silent for ``timeout`` seconds, and the restored marks no
        report answered in that time; the services they held."""
        unanswered = [k for k, until in self._restored.items() if now >= until]
        touched = {service for service, _ in unanswered}
        for service, r in unanswered:
            self._restored.pop((service, r), None)  # (one forget() below may have taken it)
            by_replica = self.marks.get(service, {})
            by_replica.pop(r, None)
            if not by_replica:
                self.forget(service)
        gone = {r for r, t in self.seen.items() if now - t >= self.timeout}
        if not gone:
            return touched
        self.dropped += len(gone)
        self._gone |= gone
        for r in gone:
            del self.seen[r]
        for key in [k for k in self._restored if k[1] in gone]:
            del self._restored[key]
        touched |= set(self.marks)  # (each may have waited for one of them, reported or not)
        for service in list(self.marks):
            by_replica = self.marks[service]
            for r in gone & by_replica.keys():
                del by_replica[r]
            if not by_replica:  # (no replica reports it: its windows close by its own figures again)
                self.forget(service)
        return touched

    def due(self, now: float) -> set[tuple]:
        """The services whose watermark may have moved with time alone: every one in the
        first ``settle`` seconds' end, else those reported ``wait`` seconds ago or more."""
        if self._first is not None and self._settling and now - self._first >= self.settle:
            self._settling = False
            return set(self.marks)
        return {service for service, tops in self._tops.items() if tops and tops[0][1] <= now - self.wait}

    def watermark(self, service: tuple, now: float) -> int | None:
        """Through where the service's windows may close: the lowest watermark of the known
        replicas holding open windows of it (the highest watermark when none does); while a
        known replica has not reported the service, at most what the highest was ``wait``
        seconds ago (it may yet send some). Nothing closes in the first ``settle`` seconds
        after the first report (the replicas announce themselves in that time: one must not
        decide alone). None when no replica reports it.
        """
        by_replica = self.marks.get(service)
        if not by_replica:
            return None
        if self._first is None or now - self._first < self.settle:
            return -(1 << 62)
        top = max(w for w, _ in by_replica.values())
        holding = [w for w, held in by_replica.values() if held]
        low = min(holding) if holding else top
        tops = self._tops.get(service)
        while tops and len(tops) > 1 and tops[1][1] <= now - self.wait:
            tops.popleft()
        if any(r not in by_replica for r in self.seen):
            low = min(low, tops[0][0] if tops and tops[0][1] <= now - self.wait else -(1 << 62))
        if tops and len(tops) == 1 and tops[0][1] <= now - self.wait:
            tops.clear()  # (applied: ``due`` stops naming it until a higher one comes)
        return low

    def forget(self, service: tuple) -> None:
        self.marks.pop(service, None)
        self._tops.pop(service, None)
        for key in [k for k in self._restored if k[0] == service]:
            del self._restored[key]
