"""A closed window through baselines and detectors: the engine, with no threads and no I/O.

The ``serve`` command (processor/commands/serve.py) drives one on a thread of its own, fed
by the receivers and writing to the sinks; benchmarks and tests drive one directly.
"""

from __future__ import annotations

import marshal
import time
from array import array
from dataclasses import dataclass

from processor.config import Config
from processor.detect import Detector, Observation, build_detectors
from processor.detect.first_seen import FirstSeen
from processor.events import Event
from processor.pipeline.baseline import Baseline, BaselineStage
from processor.pipeline.window import ClosedWindow, WindowStage, is_overflow
from processor.receiver.decode import Batch

def checkpoint_fingerprint(cfg: Config) -> str:
    """What a detector's frozen state depends on: the settings, and marshal's format (the
    frozen bytes are marshal's). State saved under others is not reused."""
    return repr((cfg.window, cfg.detectors, marshal.version))



class Engine:
    """Windows -> baselines -> detectors, with no threads and no I/O: batches in, results out.

    Deterministic: the same batches in the same order give the same results. The pipeline
    thread drives one; benchmarks and tests can drive one directly.
    """

    def __init__(self, cfg: Config, known_keys: set[str] | None = None, clock=time.monotonic):
        self.cfg = cfg
        self.windows = WindowStage(cfg.window_ns, cfg.lateness_ns, cfg.idle_timeout, cfg.exemplars,
                                   clock=clock, max_locations=cfg.max_locations)
        self.baselines = BaselineStage(cfg.window, cfg.baseline_half_life)
        self.first_seen = FirstSeen(known_keys)
        # Each location's detectors, frozen between windows (Detector.freeze): one bytes object
        # per location id (None for ids without detectors: overflow locations), thawed for
        # the windows of its service. Live detectors would be a few hundred small objects each.
        self.frozen: list[bytes | None] = []
        self._prototypes = build_detectors(cfg)  # thawed() templates: the configuration's detectors
        self._fresh = marshal.dumps(tuple(d.freeze() for d in self._prototypes))  # a new location's
        self.service_locations: dict[tuple, array] = {}       # (env, service) -> its location ids
        self.version_first_seen: dict[tuple, dict] = {}       # (env, service) -> version -> first window end
        # What changed since the last checkpoint (see processor/pipeline/checkpoint.py)
        self.dirty_locations: set[int] = set()
        self.dirty_services: set[tuple] = set()
        self._fingerprint = checkpoint_fingerprint(cfg)

    def restore_service(self, service: tuple[str, str], max_end: int, closed_through: int,
                        version_first_seen: dict) -> None:
        """A service's clock and versions from a checkpoint: its closed windows stay closed."""
        self.windows.restore_clock(service, max_end, closed_through)
        self.version_first_seen[service] = dict(version_first_seen)
        self.service_locations.setdefault(service, array("q"))

    def restore_location(self, location, baseline: Baseline | None, frozen: bytes,
                         fingerprint: str) -> int:
        """A location's baseline and frozen detectors from a checkpoint; 1 if restored, 0 if
        the location limit left it no room. Detectors saved under other detector settings are
        built anew (they learn again); the baseline is kept."""
        loc_id = self.windows.tables.location_id(location)
        if is_overflow(self.windows.tables.locations[loc_id]):
            return 0
        if baseline is not None:
            self.baselines.restore(loc_id, baseline)
        if loc_id >= len(self.frozen):
            self.frozen.extend([None] * (loc_id + 1 - len(self.frozen)))
        if self.frozen[loc_id] is None:
            service = (location.environment, location.service)
            self.service_locations.setdefault(service, array("q")).append(loc_id)
        self.frozen[loc_id] = frozen if fingerprint == self._fingerprint else self._fresh
        self.first_seen.known.add(location.key)
        return 1

    def detectors_of(self, loc_id: int) -> list[Detector]:
        """A location's detectors as they stand (thawed copies: changing them changes nothing)."""
        data = self.frozen[loc_id] if loc_id < len(self.frozen) else None
        if data is None:
            return []
        sketch = self.baselines.sketches[loc_id]
        return [p.thawed(s, sketch) for p, s in zip(self._prototypes, marshal.loads(data))]

    def ingest(self, batch: Batch) -> list[WindowResult]:
        return self._evaluate(self.windows.ingest(batch))

    def flush_idle(self, now: float | None = None) -> list[WindowResult]:
        return self._evaluate(self.windows.flush_idle(now))

    def flush_all(self) -> list[WindowResult]:
        return self._evaluate(self.windows.flush_all())

    def _evaluate(self, closed: list[ClosedWindow]) -> list[WindowResult]:
        return [self._window(cw) for cw in closed]

    def _window(self, cw: ClosedWindow) -> WindowResult:
        """One closed window of a service: first_seen for its new locations, then every
        location of the service, in the order they were first seen: the present ones' baselines
        and detectors, the absent ones' detectors that want silence."""
        # The overflow location counts in its service's totals but has no baseline, no
        # detectors and no first_seen: it is many functions mixed, not one.
        tracked = [lw for lw in cw.locations if not is_overflow(lw.location)]
        window_ns = cw.end_ns - cw.start_ns
        by_version: dict = {}
        inflight = cw.busy_ns / window_ns
        calls = 0
        for lw in cw.locations:
            calls += lw.count
            for v in lw.versions:
                by_version[v.version] = by_version.get(v.version, 0) + v.count
        service = (cw.environment, cw.service)
        first_seen = self.version_first_seen.setdefault(service, {})
        for v in sorted(by_version):
            first_seen.setdefault(v, cw.end_ns)
        service_version = max(by_version, key=lambda v: (by_version[v], v)) if by_version else ("", "", "")
        known = self.service_locations.get(service)
        if known is None:
            known = self.service_locations[service] = array("q")
        frozen = self.frozen
        events: list[Event] = []
        present = {}  # location id -> its place in tracked
        for i, lw in enumerate(tracked):
            loc_id = lw.loc_id
            present[loc_id] = i
            if loc_id >= len(frozen):
                frozen.extend([None] * (loc_id + 1 - len(frozen)))
            if frozen[loc_id] is None:  # new to this process
                events += self.first_seen.update(cw, lw)
                frozen[loc_id] = self._fresh
                known.append(loc_id)
        baselines: list = [None] * len(tracked)
        locations = self.windows.tables.locations
        stage = self.baselines
        prototypes = self._prototypes
        calls_per_s = calls / (window_ns / 1e9)
        for loc_id in known:
            i = present.get(loc_id)
            lw = step = None
            if i is not None:
                lw = tracked[i]
                # The baseline first: the latency detector, while it keeps the same sketch,
                # takes the stage's result instead of computing it again (baseline_step).
                baselines[i], before, decay = stage.absorb(cw, lw)
                step = (before, decay, stage.sketches[loc_id])
            obs = Observation(locations[loc_id], cw.start_ns, cw.end_ns, lw, inflight,
                              service_version, first_seen, calls_per_s, step)
            # The baseline sketch the detectors froze with, and the one they freeze with now.
            after = stage.sketches[loc_id]
            before = after if step is None else step[0]
            states = list(marshal.loads(frozen[loc_id]))
            for j, proto in enumerate(prototypes):
                if lw is not None or proto.wants_absent:
                    det = proto.thawed(states[j], before)
                    events += det.update(obs)
                    states[j] = det.freeze(after)
            frozen[loc_id] = marshal.dumps(tuple(states))
        # Every location of the service had its detectors fed (absent ones too: silence is
        # what the dormant detector learns from), and the present ones a baseline.
        self.dirty_services.add(service)
        self.dirty_locations.update(known)
        return WindowResult(cw, events, baselines)


@dataclass
class WindowResult:
    """What one closed window produced: its events and the baselines it changed."""
    window: ClosedWindow
    events: list[Event]
    baselines: list[Baseline]


