"""A closed window through baselines and detectors: the engine, with no threads and no I/O.

The ``serve`` command (processor/commands/serve.py) drives one on a thread of its own, fed
by the receivers and writing to the sinks; benchmarks and tests drive one directly.
"""

from __future__ import annotations

import hashlib
import logging
import marshal
import time
from array import array
from dataclasses import dataclass, field

import numpy as np

from processor.config import Config
from processor.detect.base import Detector, Observation
from processor.detect.call_pattern import CallPattern
from processor.detect.causes import explain
from processor.detect.registry import RESOLVED_TYPES, build_detectors
from processor.detect.rollout import Rollouts
from processor.detect.first_seen import FirstSeen
from processor.events import Event
from processor.pipeline.baseline import Baseline, BaselineStage
from processor.pipeline import checkpoint
from processor.pipeline.graph import CallGraph
from processor.pipeline.tiers import SETTLE_S, Replicas
from processor.pipeline.window import ClosedWindow, Forgotten, WindowStage, is_overflow
from processor.receiver.decode import Batch
from processor.receiver.metrics import Deltas, MetricsBatch, to_counts

log = logging.getLogger("backflow.engine")

# Detectors added after checkpoints were first written, last in the registry: a state saved
# before them (under the settings of the others alone) is read with theirs fresh.
ADDED_LATER = ("call_pattern", "new_dependency")


def checkpoint_fingerprint(cfg: Config, whole: bool = False, layout: str = "", before_added: bool = False) -> str:
    """What a detector's frozen state depends on: the settings, marshal's format (the
    frozen bytes are marshal's) and the ``layout`` of the columns' records
    (``DetectorStore.layout``), as 32 hex of their digest (``whole``: as the text itself,
    which checkpoints kept before records: almost a kilobyte per location). State saved
    under others is not reused. ``before_added``: the settings as a version without the
    detectors of ``ADDED_LATER`` wrote them."""
    d = cfg.detectors
    sections = {k: v for k, v in d.sections.items() if not (before_added and k in ADDED_LATER)}
    text = f"({cfg.window!r}, DetectorSettings({d.common!r}, {sections!r}), {marshal.version!r})"
    if whole:
        return text
    return hashlib.blake2b((text + layout if layout else text).encode(), digest_size=16).hexdigest()


class DetectorStore:
    """Every location's detectors, frozen between windows (``Detector.freeze``, marshalled):
    one bytes object per location id, None for ids without detectors (overflow locations).
    Live detectors would be a few hundred small objects per location; frozen, they are one.

    A location's detectors are thawed from the configuration's prototypes for each window
    of its service, given its baseline sketch: a detector whose own baseline is that same
    sketch leaves it out of its frozen state (see ``LatencyShift.freeze``). A detector with
    ``columns()`` is kept as columns over every location instead, updated once per service
    window: over all its locations (``update_service``: ``Dormant``), or over the present
    ones (``update_present``: the others, whose columns say ``present_only``). Its place
    in a location's frozen tuple holds None, and ``state`` puts its row back for checkpoints.
    """

    def __init__(self, prototypes: list[Detector]):
        self.prototypes = prototypes
        self.columns = {j: c for j, c in ((j, p.columns()) for j, p in enumerate(prototypes)) if c is not None}
        fresh = tuple(d.freeze() for d in prototypes)
        self.fresh = marshal.dumps(fresh)  # a new location's state, whole
        self._fresh_held = marshal.dumps(self._held(fresh))
        self.frozen: list[bytes | None] = []  # (columnar detectors' places: None)
        self.tick_of = lambda loc_id: 0  # the windows its service closed (Engine sets it)
        self.per_location = [j for j in range(len(prototypes)) if j not in self.columns]  # kept frozen
        self._scratch: dict[int, object] = {}  # columns that ``check`` puts a state into
        self.before: dict[int, bytes] = {}  # this window's per-location states before it (``update``)
        self.fed: set[int] = set()  # locations whose per-location detectors ran since ``checked``
        self.absent_per_location = any(prototypes[j].wants_absent for j in self.per_location)

    def _held(self, states: tuple) -> tuple:
        return tuple(None if j in self.columns else s for j, s in enumerate(states))

    def __contains__(self, loc_id: int) -> bool:
        return loc_id < len(self.frozen) and self.frozen[loc_id] is not None

    def __len__(self) -> int:
        return sum(f is not None for f in self.frozen)

    def state(self, loc_id: int) -> bytes | None:
        """The location's frozen detectors, whole (``Detector.freeze`` of each, marshalled)."""
        held = self.frozen[loc_id] if loc_id < len(self.frozen) else None
        if held is None or not self.columns:
            return held
        return marshal.dumps(self.states(loc_id))

    def states(self, loc_id: int) -> tuple:
        """The location's detector states, whole, as plain values (what a checkpoint keeps)."""
        states = list(marshal.loads(self.frozen[loc_id]))
        tick = self.tick_of(loc_id)
        for j, c in self.columns.items():
            states[j] = c.row(loc_id, tick)
        return tuple(states)

    def saved(self, loc_ids: list[int]) -> list[tuple]:
        """The detector states of each of ``loc_ids`` as a checkpoint keeps them: ``states``,
        but a columnar detector's row as a record of its columns (``PresentColumns.records``),
        every column read once for all of them."""
        loads, frozen = marshal.loads, self.frozen
        states = [list(loads(frozen[i])) for i in loc_ids]
        if self.columns:
            ticks = [self.tick_of(i) for i in loc_ids]
            for j, c in self.columns.items():
                for s, row in zip(states, c.records(loc_ids, ticks)):
                    s[j] = row
        return [tuple(s) for s in states]

    def plain(self, states: tuple, tick: int = 0) -> tuple:
        """Saved states (``saved``'s) as plain ones (``states``'): records as their rows."""
        return tuple(self.columns[j].from_record(s, tick) if j in self.columns else s for j, s in enumerate(states))

    def layout(self) -> str:
        """What the records of the columnar detectors hold (``saved``), for the fingerprint."""
        return ";".join(f"{j}:{c.layout()}" for j, c in self.columns.items())

    def to_check(self, loc_id: int) -> list[int]:
        """The detectors whose state of the location may not be plain data, for a checkpoint
        to check: those kept frozen per location that were fed since ``checked``, and columns
        whose row was set from a detector's freeze since then."""
        return (self.per_location if loc_id in self.fed else []) + [
            j for j, c in self.columns.items() if loc_id in c.unchecked]

    def checked(self, loc_ids) -> None:
        """The locations' states were checked (or left out) by a checkpoint."""
        if self.fed:
            self.fed.difference_update(loc_ids)
        for c in self.columns.values():
            if c.unchecked:
                c.unchecked.difference_update(loc_ids)

    def put(self, loc_id: int, frozen: bytes | None = None, tick: int = 0) -> None:
        """Give a location detectors: fresh ones, or ``frozen`` ones (``state``'s, checked);
        ``tick``: the windows its service closed so far."""
        if loc_id >= len(self.frozen):
            self.frozen.extend([None] * (loc_id + 1 - len(self.frozen)))
        states = None if frozen is None else self.plain(marshal.loads(frozen), tick)
        for j, c in self.columns.items():
            c.put(loc_id, None if states is None else states[j], tick)
        self.frozen[loc_id] = self._fresh_held if states is None else marshal.dumps(self._held(states))

    def forget(self, loc_id: int) -> None:
        """Drop a location's detectors (the location was forgotten: its id may be reused)."""
        if loc_id < len(self.frozen):
            self.frozen[loc_id] = None
            for c in self.columns.values():
                if hasattr(c, "forget"):
                    c.forget(loc_id)

    def detectors_of(self, loc_id: int, sketch: bytes) -> list[Detector]:
        """A location's detectors as they stand (thawed copies: changing them changes nothing)."""
        data = self.state(loc_id)
        if data is None:
            return []
        return [p.thawed(s, sketch) for p, s in zip(self.prototypes, marshal.loads(data))]

    def check(self, frozen: bytes, sketch: bytes, tick: int = 0) -> bytes:
        """Raise if ``frozen`` (a whole state, records of columns allowed) does not thaw into
        this configuration's detectors, or does not fit their columns at the service's window
        ``tick`` (a checkpoint's state of another shape); else the state, records as rows."""
        states = marshal.loads(frozen)
        if not isinstance(states, tuple) or len(states) != len(self.prototypes):
            raise ValueError(f"{len(self.prototypes)} detector states expected")
        states = self.plain(states, tick)
        for j, (p, state) in enumerate(zip(self.prototypes, states)):
            p.thawed(state, sketch).freeze(sketch)
            if j in self.columns:  # (and it fits the columns: a scratch row of their own)
                scratch = self._scratch.get(j)
                if scratch is None:
                    scratch = self._scratch[j] = p.columns()
                scratch.put(0, state, tick)
        return marshal.dumps(states)

    def update(self, loc_id: int, obs: Observation, before: bytes, after: bytes) -> list[Event]:
        """Feed one window to a location's detectors kept frozen per location (the absent-
        location window only to those that want it, a window without call-graph figures not
        to those that need them); ``before`` and ``after`` are its baseline sketch before and
        after the window was absorbed. The states before are kept in ``before`` until
        ``window_done``."""
        present, graph = obs.window is not None, obs.graph is not None
        wanted = [j for j in self.per_location
                  if (present or self.prototypes[j].wants_absent) and (graph or not self.prototypes[j].needs_graph)]
        if not wanted:
            return []
        events: list[Event] = []
        held = self.frozen[loc_id]
        self.before[loc_id] = held
        self.fed.add(loc_id)
        states = list(marshal.loads(held))
        for j in wanted:
            det = self.prototypes[j].thawed(states[j], before)
            events += det.update(obs)
            states[j] = det.freeze(after)
        self.frozen[loc_id] = marshal.dumps(tuple(states))
        return events

    def detector_before(self, loc_id: int, cls: type) -> Detector | None:
        """The location's detector of class ``cls`` (kept frozen per location) as it was before
        this window, if this window fed it; else None."""
        held = self.before.get(loc_id)
        for j in self.per_location:
            if held is not None and type(self.prototypes[j]) is cls:
                return self.prototypes[j].thawed(marshal.loads(held)[j])
        return None

    def update_service(self, ids: np.ndarray, counts: np.ndarray, versions: list, end_ns: int,
                       service_version: tuple, observe, tick: int) -> tuple[list[Event], list[int]]:
        """Feed the ``tick``-th window of a service to the columnar detectors: ``ids`` its
        locations, ``counts`` their calls (0: absent), ``versions`` the present ones' main
        versions. Returns the events, and the absent locations whose state changed."""
        events: list[Event] = []
        changed: list[int] = []
        for c in self.columns.values():
            if not getattr(c, "present_only", False):
                events += c.update(ids, counts, versions, end_ns, service_version, observe, tick)
                changed += c.changed
        return events, changed

    def update_present(self, ids: np.ndarray, observations: list[Observation]) -> list[Event]:
        """Feed a service window's present locations (``ids``, with their ``observations``)
        to the columnar detectors that want only those (``PresentColumns``)."""
        events: list[Event] = []
        for c in self.columns.values():
            if getattr(c, "present_only", False):
                events += c.update_present(ids, observations)
        return events


@dataclass
class ServiceContext:
    """What the detectors of a service's locations are told about the whole service's window."""
    inflight: float          # mean spans in flight (Little's law)
    calls_per_s: float       # spans per second, every location of the service
    version: tuple           # the version serving most of its spans
    version_first_seen: dict  # version -> end of the first window it was seen in (ns)
    calls_by_version: dict = field(default_factory=dict)  # version -> its calls in the window


class Engine:
    """Windows -> baselines -> detectors, with no threads and no I/O: batches in, results out.

    Deterministic: the same batches in the same order give the same results. The pipeline
    thread drives one; benchmarks and tests can drive one directly.
    """

    def __init__(self, cfg: Config, known_keys: set[str] | None = None, clock=time.monotonic):
        self.cfg = cfg
        self.windows = WindowStage(cfg.window_ns, cfg.lateness_ns, cfg.idle_timeout, cfg.exemplars,
                                   clock=clock, max_locations=cfg.max_locations,
                                   max_services=cfg.max_services, max_versions=cfg.max_versions,
                                   max_versions_per_service=cfg.max_versions_per_service,
                                   version_idle_timeout=cfg.version_idle_timeout,
                                   location_idle_timeout=cfg.location_idle_timeout)
        self.baselines = BaselineStage(cfg.window, cfg.baseline_half_life)
        self.detectors = DetectorStore(build_detectors(cfg))
        self.first_seen = FirstSeen(known_keys)
        self.service_locations: dict[tuple, array] = {}       # (env, service) -> its location ids
        self.version_first_seen: dict[tuple, dict] = {}       # (env, service) -> version -> first window end
        self.detecting: set[tuple] = set()  # (env, service) with a location past its warm-up
        # What changed since the last checkpoint (see processor/pipeline/checkpoint.py)
        self.dirty_locations: set[int] = set()
        self.dirty_services: set[tuple] = set()
        # checkpoint fields of what was forgotten since -> event time of its newest window (ns)
        self.forgotten_fields: dict[str, int] = {}
        self._fingerprint = checkpoint_fingerprint(cfg, layout=self.detectors.layout())
        # (read: also those of fields written before records, which hold plain states only)
        self._fingerprints = {self._fingerprint, checkpoint_fingerprint(cfg), checkpoint_fingerprint(cfg, whole=True)}
        # (and those written before the detectors added later: their fresh states appended)
        self._before_added = {checkpoint_fingerprint(cfg, layout=self.detectors.layout(), before_added=True),
                              checkpoint_fingerprint(cfg, before_added=True),
                              checkpoint_fingerprint(cfg, whole=True, before_added=True)}
        self._added = [j for j, p in enumerate(self.detectors.prototypes) if p.name in ADDED_LATER]
        if cfg.call_graph_wait > 0:
            self.windows.graph = CallGraph(cfg.window_ns, cfg.graph_wait_ns, cfg.call_graph_max_spans)
        self.deltas = Deltas()  # cumulative OTLP metrics' previous points, per series
        # the aggregate replicas whose partials this process merges (processor/pipeline/tiers.py)
        self.replicas = Replicas(cfg.replica_timeout, cfg.replica_wait, SETTLE_S)
        # each new version's rollout and verdict (processor/detect/rollout.py)
        self.rollouts = Rollouts(cfg.rollouts, RESOLVED_TYPES) if cfg.rollouts.enabled else None
        self._started = self.windows.clock()
        self._restored_at: dict[tuple, float] = {}  # (env, service) -> when its checkpoint was restored
        # Windows each service closed: the columnar detectors count time in them.
        self.service_ticks: dict[tuple, int] = {}
        tables = self.windows.tables
        self.detectors.tick_of = lambda loc_id: self.service_ticks.get(
            tables.services[tables.loc_service.view[loc_id]], 0)

    @property
    def frozen(self) -> list[bytes | None]:
        """Each location id's frozen detectors, whole (``DetectorStore.state``): a copy."""
        return [self.detectors.state(i) for i in range(len(self.detectors.frozen))]

    def restore_service(self, service: tuple[str, str], max_end: int, closed_through: int,
                        version_first_seen: dict, ticks: int = 0, rollouts: dict | None = None,
                        replicas: tuple[str, ...] = ()) -> None:
        """A service's clock, versions, window count and rollouts from a checkpoint: its
        closed windows stay closed. The aggregate replicas that reported it are waited for
        again (they may hold its partials in their spools), until each reports or is
        dropped after ``replica_timeout``."""
        self.windows.restore_clock(service, max_end, closed_through)
        self._restored_at[service] = self.windows.clock()
        if replicas and self.replicas.restore(service, replicas, closed_through, self._restored_at[service]):
            self.windows.advance(service, None)  # (closed by the replicas' reports)
        self.service_ticks[service] = ticks
        if self.rollouts is not None and rollouts is not None:
            try:
                self.rollouts.thaw(service, rollouts)
            except (ValueError, TypeError, KeyError) as e:
                log.warning("checkpoint of service %s: its rollouts do not fit this version (%s); "
                            "they are followed from its next version on", service[1], e)
        self.version_first_seen[service] = dict(version_first_seen)
        self.service_locations.setdefault(service, array("q"))

    def restore_location(self, location, baseline: Baseline | None, frozen: bytes,
                         fingerprint: str) -> int:
        """A location's baseline and frozen detectors from a checkpoint; 1 if restored, 0 if
        the location limit left it no room. Detectors saved under other detector settings are
        built anew (they learn again); the baseline is kept."""
        loc_id = self.windows.restore_location(location)
        if is_overflow(self.windows.tables.locations[loc_id]):
            return 0
        if baseline is not None:
            self.baselines.restore(loc_id, baseline)
        if loc_id not in self.detectors:
            service = (location.environment, location.service)
            self.service_locations.setdefault(service, array("q")).append(loc_id)
        state = frozen if fingerprint in self._fingerprints else None
        n_before = len(self.detectors.prototypes) - len(self._added)
        if state is None and fingerprint in self._before_added and self._added == list(
                range(n_before, len(self.detectors.prototypes))):
            try:  # the detectors added since learn from now on; the others go on
                old = marshal.loads(frozen)
                if type(old) is tuple and len(old) == n_before:
                    state = marshal.dumps(old + tuple(self.detectors.prototypes[j].freeze() for j in self._added))
            except (ValueError, EOFError, TypeError):
                state = None
        if state is not None:
            try:  # plain data of the wrong shape would fail at the location's next window instead
                state = self.detectors.check(state, self.baselines.sketches[loc_id],
                                             self.service_ticks.get((location.environment, location.service), 0))
            except Exception as e:  # noqa: BLE001 (any shape error: the detectors learn again)
                log.warning("checkpoint of %s: detector state does not fit this version (%s: %s); "
                            "its detectors learn again", location.key, type(e).__name__, e)
                state = None
        self.detectors.put(loc_id, state, self.service_ticks.get((location.environment, location.service), 0))
        self.first_seen.remember([location.key])
        return 1

    def detectors_of(self, loc_id: int) -> list[Detector]:
        """A location's detectors as they stand (thawed copies: changing them changes nothing)."""
        return self.detectors.detectors_of(loc_id, self.baselines.sketches[loc_id])

    def ingest(self, batch: Batch) -> list[WindowResult]:
        return self._evaluate(self.windows.ingest(batch))

    def ingest_metrics(self, batch: MetricsBatch) -> list[WindowResult]:
        """OTLP metrics (processor/receiver/metrics.py): cumulative points made deltas here,
        one place whichever receiver decoded them, then into the windows as spans are."""
        window_ns = self.windows.window_ns
        if not self.new_request(batch):
            return []
        counts = to_counts(batch, self.deltas, window_ns)
        marks = [m for m in batch.watermarks if m.window_ns == window_ns]
        stats = self.windows.stats
        stats["tier_refused"] += counts.refused + len(batch.watermarks) - len(marks)
        if batch.replicas:  # (closed by the replicas from their first figures on)
            for service in {(p.location.environment, p.location.service) for p in batch.points
                            if p.window_ns == window_ns} | {m.service for m in marks}:
                self.windows.advance(service, None)
        closed = self.windows.ingest_counts(counts)
        if batch.replicas:
            now = batch.received_at if batch.received_at is not None else self.windows.clock()
            self.replicas.announce([r for r, w in batch.replicas.items() if w == window_ns], now)
            closed = self._advance(self.replicas.report(marks, now), closed, now)
        return self._evaluate(closed)

    def new_request(self, batch: MetricsBatch) -> bool:
        """Whether ``batch`` is not an aggregate replica's request taken before (sent again
        after its answer was lost; counted); asked once a request: its number is cleared."""
        new = self.replicas.first(batch.sequence)
        batch.sequence = None
        if not new:
            self.windows.stats["tier_duplicates"] += 1
        return new

    def _advance(self, services: set, closed: list[ClosedWindow], now: float) -> list[ClosedWindow]:
        """``closed``, and the windows of ``services`` that their replicas' watermark passed."""
        more = []
        for service in sorted(services):
            watermark = self.replicas.watermark(service, now)
            if watermark is None:  # (no replica reports it: its own figures close its windows again)
                more += self.windows.release(service)
            else:
                more += self.windows.advance(service, watermark)
        return sorted(closed + more, key=lambda c: (c.end_ns, c.service)) if more else closed

    def flush_idle(self, now: float | None = None) -> list[WindowResult]:
        now = self.windows.clock() if now is None else now
        closed = self._advance(self.replicas.expire(now) | self.replicas.due(now), [], now) \
            if self.replicas.seen else []
        return self._evaluate(closed + self.windows.flush_idle(now))

    def forget_idle(self, now: float | None = None) -> Forgotten:
        """Forget what sent nothing for its idle timeout (``WindowStage.forget_idle``): a
        location's baseline, detectors and checkpoint field go with it, a service's clock
        and first-seen versions too. A forgotten location that comes back is learned anew,
        without a second ``first_seen``."""
        f = self.windows.forget_idle(now)
        gone_versions = set(f.versions)
        by_service: dict[tuple, set[int]] = {}
        keys = []
        for loc_id, loc in f.locations:
            if not is_overflow(loc):
                b = self.baselines.baseline(loc_id)
                self.forgotten_fields[checkpoint.location_field(loc.key)] = b.updated_ns if b else 0
                keys.append(loc.key)
            self.baselines.forget(loc_id)
            self.detectors.forget(loc_id)
            self.dirty_locations.discard(loc_id)
            by_service.setdefault((loc.environment, loc.service), set()).add(loc_id)
        self.first_seen.remember(keys)
        for service, ids in by_service.items():
            known = self.service_locations.get(service)
            if known is not None:
                self.service_locations[service] = array("q", (i for i in known if i not in ids))
                self.dirty_services.add(service)  # (its field names its locations)
        for service in f.services:
            self.version_first_seen.pop(service, None)
            self.service_ticks.pop(service, None)
            self.service_locations.pop(service, None)
            self.detecting.discard(service)
            self.dirty_services.discard(service)
            if self.rollouts is not None:
                self.rollouts.forget(service)
            self.replicas.forget(service)
            self._restored_at.pop(service, None)
            self.forgotten_fields[checkpoint.service_field(service)] = f.service_ends.get(service, 0)
        if f.versions or f.locations:
            self._forget_versions(gone_versions, self.windows.clock() if now is None else now)
        return f

    def _forget_versions(self, gone: set, now: float) -> None:
        """Versions forgotten leave their services' first-seen tables, and so do versions
        restored from a checkpoint that have sent no span to this process in its first
        ``version_idle_timeout`` seconds and were first seen that long before their
        service's newest span."""
        tables, clocks = self.windows.tables, self.windows.services
        timeout = self.cfg.version_idle_timeout
        for service, first_seen in self.version_first_seen.items():
            clock = clocks.get(tables._svc_ids.get(service))
            newest = clock.max_end if clock is not None else 0
            # (counted from the service's restore: a service restores at its first span)
            restored_idle = now - self._restored_at.get(service, self._started) >= timeout
            old = [v for v, end in first_seen.items() if v in gone or (
                restored_idle and v not in tables._ver_ids and end < newest - timeout * 1e9)]
            for v in old:
                del first_seen[v]
            if old:
                self.dirty_services.add(service)

    def flush_all(self) -> list[WindowResult]:
        return self._evaluate(self.windows.flush_all())

    def _evaluate(self, closed: list[ClosedWindow]) -> list[WindowResult]:
        return [self._window(cw) for cw in closed]

    def _window(self, cw: ClosedWindow) -> WindowResult:
        """One closed window of a service: the service's bookkeeping, first_seen for its new
        locations, the present locations' baselines and detectors (by location id), then the
        columnar detectors over every location of the service, absent ones included."""
        service = (cw.environment, cw.service)
        context = self._service_context(cw, service)
        # The overflow location counts in its service's totals but has no baseline, no
        # detectors and no first_seen: it is many functions mixed, not one.
        tracked = [lw for lw in cw.locations if not is_overflow(lw.location)]
        events = self._first_seen(cw, service, tracked)
        here = np.fromiter((lw.loc_id for lw in tracked), np.int64, len(tracked))
        graphs = self._graphs(cw) if cw.graph else {}
        locations = self.windows.tables.locations
        baselines, changed = self._detect(cw, service, tracked, here, context, events, graphs)
        if graphs and self.detectors.before:
            events = [self._explained(e, cw, graphs) for e in events]
        self.detectors.before.clear()
        self.dirty_services.add(service)
        # What changed: the present locations, and absent ones a detector changed (their
        # state is otherwise as it was: a sparse service does not rewrite every location).
        if self.detectors.absent_per_location:
            self.dirty_locations.update(self.service_locations[service])
        else:
            # (ids made here, together: the windows' own int objects, kept in the set, would
            # pin the allocator's pools of that window's short-lived objects)
            self.dirty_locations.update(here.tolist())
            self.dirty_locations.update(changed)
        started = service not in self.detecting and any(
            b is not None and b.windows >= self.cfg.detectors.warmup_windows for b in baselines)
        if started:
            self.detecting.add(service)
        edges = [(locations[loc_id], g) for loc_id, g in graphs.items() if g.children]
        verdicts = []
        if self.rollouts is not None:
            entries = {e.key for g in graphs.values() for e in g.entries}
            # (first: a rollout's first message comes before the window's events of its
            # version, so that notify can put them in its thread)
            events = self.rollouts.window(cw, self.version_first_seen.get(service, {}), events, entries,
                                          context.calls_by_version) + events
            verdicts = self.rollouts.take_published()
        return WindowResult(cw, events, baselines, started, edges, verdicts)

    def _service_context(self, cw: ClosedWindow, service: tuple) -> ServiceContext:
        by_version = cw.calls_by_version()
        calls = sum(lw.count for lw in cw.locations)
        first_seen = self.version_first_seen.setdefault(service, {})
        for v in sorted(by_version):
            first_seen.setdefault(v, cw.end_ns)
        main = max(by_version, key=lambda v: (by_version[v], v)) if by_version else ("", "", "")
        window_ns = cw.end_ns - cw.start_ns
        return ServiceContext(cw.busy_ns / window_ns, calls / (window_ns / 1e9), main, first_seen, by_version)

    def _first_seen(self, cw: ClosedWindow, service: tuple, tracked: list) -> list[Event]:
        """first_seen of the locations new to this process; they get detectors."""
        known = self.service_locations.get(service)
        if known is None:
            known = self.service_locations[service] = array("q")
        new = [lw for lw in tracked if lw.loc_id not in self.detectors]
        if not new:
            return []
        seen = self.first_seen.seen_before_many([lw.location.key for lw in new]).tolist()
        events: list[Event] = [self.first_seen.event(cw, lw) for lw, s in zip(new, seen) if not s]
        for lw in new:
            self.detectors.put(lw.loc_id)
            known.append(lw.loc_id)
        return events

    def _graphs(self, cw: ClosedWindow) -> dict:
        """The window's call-graph figures of the locations that call or are called under an
        entry point, ids made locations and versions (``Observation.graph``)."""
        tables, figures = self.windows.tables, cw.graph
        locations, versions = tables.locations, tables.versions

        def calls_of(loc_id: int, version: int | None = None) -> int:
            """An entry point's calls (of ``version``: those of the same version id)."""
            f = figures.get(loc_id)
            if f is None:
                return 0
            return f.calls if version is None or len(f.versions) == 1 else f.versions.get(version, f.calls)

        out = {}
        for loc_id, f in figures.items():
            if (f.children or f.entries) and not is_overflow(locations[loc_id]):
                g = f.resolved(locations, versions, calls_of)
                # (the overflow location is many functions: no callee, no entry point)
                if any(is_overflow(c) for c in g.children):
                    g.children = {c: x for c, x in g.children.items() if not is_overflow(c)}
                if any(is_overflow(e) for e in g.entries):
                    g.entries = {e: x for e, x in g.entries.items() if not is_overflow(e)}
                    g.entries_by_version = {v: {e: x for e, x in by.items() if not is_overflow(e)}
                                            for v, by in g.entries_by_version.items()}
                out[loc_id] = g
        return out

    def _explained(self, event: Event, cw: ClosedWindow, graphs: dict) -> Event:
        """A latency regression's event with its causes and its impact on entry points."""
        if event.type != "latency_regression":
            return event
        loc_id = self.windows.tables._loc_ids.get(event.location.key)
        graph = graphs.get(loc_id)
        pattern = self.detectors.detector_before(loc_id, CallPattern) if graph is not None else None
        if pattern is None or not pattern.windows:
            return event
        ids = self.windows.tables._loc_ids

        def entry_mean_ns(entry) -> float | None:
            f = cw.graph.get(ids.get(entry.key))
            return f.ns / f.calls if f is not None and f.calls else None

        return explain(event, graph.of_version(event.version), pattern, entry_mean_ns)

    def _detect(self, cw: ClosedWindow, service: tuple, tracked: list, here: np.ndarray,
                context: ServiceContext, events: list[Event], graphs: dict) -> tuple[list[Baseline], list[int]]:
        """Baselines of the present locations (``tracked``, their ids ``here``), their
        detectors, then the columnar detectors over every location of the service at once
        (absent ones too: silence is what the dormant detector learns from); events appended
        to ``events``. Returns the baselines, and the absent locations whose state changed."""
        locations = self.windows.tables.locations
        stage, store = self.baselines, self.detectors
        known = self.service_locations[service]

        def observation(loc_id: int, lw, step=None) -> Observation:
            return Observation(locations[loc_id], cw.start_ns, cw.end_ns, lw, context.inflight,
                               context.version, context.version_first_seen, context.calls_per_s, step,
                               graphs.get(loc_id) if lw is not None else None)

        # The baselines first, all at once: the latency detector, while it keeps the same
        # sketch, takes the stage's result instead of computing it again (baseline_step).
        baselines, befores, decays, unpacked = stage.absorb_many(cw, tracked)
        observations = []
        for lw, before, decay, sketch in zip(tracked, befores, decays, unpacked):
            loc_id = lw.loc_id
            after = stage.sketches[loc_id]
            obs = observation(loc_id, lw, (before, decay, after, sketch))
            observations.append(obs)
            events += store.update(loc_id, obs, before, after)
        events += store.update_present(here, observations)
        if store.absent_per_location:
            present = {lw.loc_id for lw in tracked}
            for loc_id in known:
                if loc_id not in present:
                    sketch = stage.sketches[loc_id]
                    events += store.update(loc_id, observation(loc_id, None), sketch, sketch)
        changed: list[int] = []
        if store.columns:
            away = np.setdiff1d(np.frombuffer(known, np.int64), here, assume_unique=True)
            ids = np.concatenate([here, away])
            counts = np.zeros(len(ids), np.int64)
            counts[:len(here)] = [lw.count for lw in tracked]
            tick = self.service_ticks[service] = self.service_ticks.get(service, 0) + 1
            found, changed = store.update_service(
                ids, counts, [lw.main_version.version for lw in tracked if lw.count], cw.end_ns, context.version,
                lambda k: observation(int(ids[k]), tracked[k] if k < len(tracked) else None), tick)
            events += found
        return baselines, changed


@dataclass
class WindowResult:
    """What one closed window produced: its events and the baselines it changed."""
    window: ClosedWindow
    events: list[Event]
    baselines: list[Baseline]
    # The service's first location has just passed its warm-up (in this process).
    detection_started: bool = False
    # The locations that called others in this window, with their call-graph figures
    # (``LocationGraph``, resolved): published as {prefix}:edges:{key} and :callers:{key}
    edges: list = field(default_factory=list)
    # The service's rollouts whose verdict state changed (``Rollouts.state_of``): published
    # in {prefix}:verdicts:{environment}:{service} and backflow_version_verdict
    verdicts: list = field(default_factory=list)


