"""Checkpoints: what the engine learned, kept in Redis so that a restart goes on where it stopped.

One hash, ``{prefix}:state``, holds

- ``loc:{key}``: a code location's baseline and detector state, with the location itself
  and its place among its service's locations;
- ``svc:{environment}:{service}``: the service's event-time clock (which windows are closed)
  and when each of its versions was first seen.

Each field is written when what it holds changed (a window of it closed), at most once per
``checkpoint_interval``, and read back at start before the receiver listens. What is not in
a checkpoint is lost on ``kill -9``: the windows still open, and with an interval above 0
the windows closed since the last checkpoint. A field is pickled: Redis is trusted here as
it is for the events (anyone who can write to it can also forge events); a field that does
not load (another format, another version of Backflow) is skipped and learned again.

>>> from processor.config import Config
>>> from processor.pipeline.engine import Engine
>>> engine = Engine(Config.defaults())
>>> restore(Engine(Config.defaults()), dumps_dirty(engine))
0
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass

log = logging.getLogger("backflow.checkpoint")

FORMAT = 2  # bumped when what a field holds changes; older fields are then skipped


@dataclass
class LocationState:
    location: object       # processor.pipeline.location.Location
    order: int             # its id when saved: restored locations keep their relative order
    baseline: object       # processor.pipeline.baseline.Baseline or None
    detectors: bytes       # its detectors frozen (Engine.frozen: marshal of Detector.freeze)
    fingerprint: str       # the detector settings they were built with (app.checkpoint_fingerprint)


@dataclass
class ServiceState:
    service: tuple[str, str]        # (environment, service.name)
    max_end: int                    # the clock of window._ServiceClock
    closed_through: int
    version_first_seen: dict        # version -> end of the first window it was seen in


def location_field(key: str) -> str:
    return "loc:" + key


def service_field(service: tuple[str, str]) -> str:
    return "svc:" + service[0] + ":" + service[1]


def dumps_dirty(engine, limit: int | None = None) -> dict[str, bytes]:
    """The fields of what changed since the last call (at most ``limit`` locations, the
    oldest ids first, and every changed service); clears the marks of what it took.

    Runs on the thread that owns the engine, so the state pickled is one moment's. The limit
    keeps a checkpoint of many locations from holding all their blobs at once: the rest
    stay marked for the next call.
    """
    out: dict[str, bytes] = {}
    tables = engine.windows.tables
    dirty = sorted(engine.dirty_locations)
    if limit is not None and len(dirty) > limit:
        dirty = dirty[:limit]
        engine.dirty_locations.difference_update(dirty)
    else:
        engine.dirty_locations.clear()
    for loc_id in dirty:
        loc = tables.locations[loc_id]
        state = LocationState(loc, loc_id, engine.baselines.baseline(loc_id),
                              engine.frozen[loc_id], engine._fingerprint)
        out[location_field(loc.key)] = pickle.dumps((FORMAT, state), protocol=pickle.HIGHEST_PROTOCOL)
    for service in sorted(engine.dirty_services):
        clock = engine.windows.services[tables.service_id(service)]
        state = ServiceState(service, clock.max_end, clock.closed_through,
                             engine.version_first_seen.get(service, {}))
        out[service_field(service)] = pickle.dumps((FORMAT, state), protocol=pickle.HIGHEST_PROTOCOL)
    engine.dirty_services.clear()
    return out


def restore(engine, fields: dict) -> int:
    """Load checkpoint fields (as read from ``{prefix}:state``) into a fresh engine; the
    number of code locations restored. Fields that do not load are skipped, counted in a log."""
    services: list[ServiceState] = []
    locations: list[LocationState] = []
    skipped = 0
    for name, blob in fields.items():
        try:
            fmt, state = pickle.loads(blob)
        except Exception:  # noqa: BLE001 (any unpickling failure: another version's classes)
            fmt, state = None, None
        if fmt != FORMAT:
            skipped += 1
        elif isinstance(state, ServiceState):
            services.append(state)
        elif isinstance(state, LocationState):
            locations.append(state)
        else:
            skipped += 1
    if skipped:
        log.warning("%d checkpoint fields did not load (another format); they are learned again", skipped)
    for s in sorted(services, key=lambda s: s.service):
        engine.restore_service(s.service, s.max_end, s.closed_through, s.version_first_seen)
    restored = 0
    for state in sorted(locations, key=lambda s: s.order):
        restored += engine.restore_location(state.location, state.baseline, state.detectors,
                                            state.fingerprint)
    return restored
