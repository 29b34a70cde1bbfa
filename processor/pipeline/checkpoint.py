"""Checkpoints: what the engine learned, kept in Redis so that a restart goes on where it stopped.

One hash, ``{prefix}:state``, holds

- ``loc:{key}``: a code location's baseline and detector state, with the location itself
  and its place among its service's locations;
- ``svc:{environment}:{service}``: the service's event-time clock (which windows are closed)
  and when each of its versions was first seen.

Each field is written when what it holds changed (a window of it closed), at most once per
``checkpoint_interval``, and read back at start before the receiver listens. What is not in
a checkpoint is lost on ``kill -9``: the windows still open, and with an interval above 0
the windows closed since the last checkpoint.

A field is data only: a MessagePack map of strings, numbers, bytes and arrays, its format
number (``FORMAT``) under ``format``; docs/checkpoints.md gives the layout. Reading one runs no
code of the field's choosing, so whoever can write ``{prefix}:state`` can make Backflow
learn wrong figures, not run code in the process that holds the TLS key and the auth token.
Every field is checked (its shape, its types, its name against its content) before any of
it is used, and a field that fails is refused and its location learned again; the others
still load. Format 2 pickled its fields: those are never unpickled, only counted and
skipped (a one-time relearn after the upgrade).

>>> from processor.config import Config
>>> from processor.pipeline.engine import Engine
>>> import pickle
>>> restore(Engine(Config.defaults()), {"svc:prod:shop": pickle.dumps((2, None)),
...                                     "loc:0123456789abcdef": b"\\xc1 not msgpack"})
Restored(locations=0, malformed=1, other_format=1)
"""

from __future__ import annotations

import dataclasses
import logging
import marshal
from dataclasses import dataclass

import msgpack

from processor.pipeline.baseline import Baseline
from processor.pipeline.location import Location

log = logging.getLogger("backflow.checkpoint")

FORMAT = 3  # bumped when what a field holds changes; fields of other formats are skipped
# Format 2 (before) pickled each field; format 3 is MessagePack of plain data.

_LOCATION_FIELDS = tuple(f.name for f in dataclasses.fields(Location) if f.init)
_LOCATION_KEYS = frozenset({"format", "location", "order", "baseline", "detectors", "fingerprint"})
_SERVICE_KEYS = frozenset({"format", "service", "max_end", "closed_through", "version_first_seen"})
_SERVICE_OPTIONAL = frozenset({"ticks", "rollouts", "locations", "replicas"})  # (added since; absent in older fields)
_PLAIN = frozenset({type(None), bool, int, float, str, bytes})  # and tuples and dicts of them
_LOGGED = 10  # refused fields logged one by one at start; the rest only counted


@dataclass
class LocationState:
    location: Location
    order: int             # its id when saved: restored locations keep their relative order
    baseline: Baseline | None
    detectors: bytes | tuple  # its detectors frozen: marshal of each Detector.freeze, or those states
    fingerprint: str       # the detector settings they were built with (checkpoint_fingerprint)


@dataclass
class ServiceState:
    service: tuple[str, str]        # (environment, service.name)
    max_end: int                    # the clock of window._ServiceClock
    closed_through: int
    version_first_seen: dict        # (service, version, revision) -> end of its first window
    ticks: int = 0                  # windows it closed (Engine.service_ticks)
    rollouts: dict | None = None    # its rollouts (Rollouts.freeze), plain data
    # its code locations' keys: the fields to read when it is restored (None: a field
    # written before they were kept, restored from a scan of the whole hash)
    locations: tuple[str, ...] | None = None
    # the aggregate replicas that reported it (a detect replica's): waited for after a restart
    replicas: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restored:
    """What ``restore`` did: the code locations restored, and the fields it refused."""
    locations: int
    malformed: int      # not MessagePack, or not of the format's shape and types
    other_format: int   # another format's (format 2's pickles among them): not read

    @property
    def rejected(self) -> dict[str, int]:
        """The refused fields by reason, as the ``reason`` label of
        ``backflow_checkpoint_rejected_fields_total`` has them."""
        return {"malformed": self.malformed, "other_format": self.other_format}


class Malformed(ValueError):
    """A field that does not parse: it is refused, and what it held learned again."""


class OtherFormat(ValueError):
    """A field of another format (an older or newer Backflow's): skipped, not read."""


def location_field(key: str) -> str:
    return "loc:" + key


def service_field(service: tuple[str, str]) -> str:
    return "svc:" + service[0] + ":" + service[1]


# --- writing ------------------------------------------------------------------------------

_CHUNK = 512  # locations whose detector states are read from the columns at once


def dumps_dirty(engine, limit: int | None = None) -> dict[str, bytes | int]:
    """The fields of what changed since the last call (at most ``limit`` locations, the
    lowest ids first, and every changed service), and for the fields of what the engine
    forgot since, the event time of its newest window (the sink deletes such a field unless
    another process wrote a later one); clears the marks of what it took.

    Runs on the thread that owns the engine, so the state written is one moment's. The limit
    keeps a checkpoint of many locations from holding all their blobs at once: the rest
    stay marked for the next call. A location whose state is not plain data (a detector
    that froze a list or a set: it would not come back the same) is left out and logged.
    """
    # (a forgotten location that came back since is written below, over its deletion)
    out: dict[str, bytes | int] = dict(sorted(engine.forgotten_fields.items()))
    engine.forgotten_fields.clear()
    tables = engine.windows.tables
    dirty = sorted(engine.dirty_locations)
    if limit is not None and len(dirty) > limit:
        dirty = dirty[:limit]
        engine.dirty_locations.difference_update(dirty)
    else:
        engine.dirty_locations.clear()
    failed: list[tuple[str, Exception]] = []
    left_out: list[int] = []
    store, baseline, fingerprint = engine.detectors, engine.baselines.baseline, engine._fingerprint
    for a in range(0, len(dirty), _CHUNK):
        ids = dirty[a:a + _CHUNK]
        try:
            saved = store.saved(ids)
        except Exception:  # noqa: BLE001 (then each location on its own, its failure its own)
            saved = [None] * len(ids)
        for loc_id, states in zip(ids, saved):
            loc = tables.locations[loc_id]
            try:
                out[location_field(loc.key)] = encode_location(LocationState(
                    loc, loc_id, baseline(loc_id), store.states(loc_id) if states is None else states,
                    fingerprint), store.to_check(loc_id))
            except (ValueError, TypeError, OverflowError) as e:
                failed.append((loc.key, e))
                left_out.append(loc_id)  # (checked again at its next checkpoint)
    engine.detectors.checked(set(dirty).difference(left_out))
    for service in sorted(engine.dirty_services):
        clock = engine.windows.services[tables.service_id(service)]
        ids = engine.service_locations.get(service, ())
        out[service_field(service)] = encode_service(ServiceState(
            service, clock.max_end, clock.closed_through, engine.version_first_seen.get(service, {}),
            engine.service_ticks.get(service, 0),
            engine.rollouts.freeze(service) if engine.rollouts is not None else None,
            tuple(tables.locations[i].key for i in ids), tuple(sorted(engine.replicas.marks.get(service, ())))))
    engine.dirty_services.clear()
    if failed:
        log.error("%d code locations were not checkpointed (their state is not plain data; "
                  "they are learned again after a restart); the first, %s: %s",
                  len(failed), failed[0][0], failed[0][1])
    return out


def encode_location(state: LocationState, check: list[int] | None = None) -> bytes:
    """A ``loc:{key}`` field. The detectors' frozen bytes are this process's own (marshal
    of plain data): they are loaded here and written as that plain data. ``check``: the
    detectors whose states may not be plain data (``DetectorStore.to_check``); all if None."""
    detectors = state.detectors if type(state.detectors) is tuple else marshal.loads(state.detectors)
    if type(detectors) is not tuple:
        raise ValueError("detectors: not a tuple of states")
    _check_detectors(detectors if check is None else tuple(detectors[j] for j in check))
    loc = state.location
    return msgpack.packb({
        "format": FORMAT,
        "location": {name: getattr(loc, name) for name in _LOCATION_FIELDS},
        "order": state.order,
        "baseline": None if state.baseline is None else state.baseline.to_plain(),
        "detectors": detectors,
        "fingerprint": state.fingerprint,
    }, use_bin_type=True)


def encode_service(state: ServiceState) -> bytes:
    """A ``svc:{environment}:{service}`` field; the first-seen versions as rows
    ``[service, version, revision, end_ns]``."""
    fields = {
        "format": FORMAT,
        "service": list(state.service),
        "max_end": state.max_end,
        "closed_through": state.closed_through,
        "version_first_seen": [[*version, end] for version, end in state.version_first_seen.items()],
        "ticks": state.ticks,
        "rollouts": state.rollouts,
    }
    if state.locations is not None:  # (8 bytes a key: 80 KB for a service of 10,000 locations)
        fields["locations"] = b"".join(bytes.fromhex(k) for k in state.locations)
    if state.replicas:
        fields["replicas"] = list(state.replicas)
    return msgpack.packb(fields, use_bin_type=True)


# --- reading ------------------------------------------------------------------------------

def restore(engine, fields: dict, only: tuple[str, str] | None = None) -> Restored:
    """Load checkpoint fields (as read from ``{prefix}:state``) into a fresh engine
    (``only``: those of that service, (environment, name); others' are left out).

    A field that does not parse is refused (logged, the first few one by one) and a field of
    another format skipped (logged once, with the count); their locations are learned
    again, and the other fields still load."""
    services: list[ServiceState] = []
    locations: list[LocationState] = []
    malformed = other = 0
    for name, blob in fields.items():
        try:
            state = decode(name, blob)
        except OtherFormat:
            other += 1
            continue
        except Malformed as e:
            malformed += 1
            if malformed <= _LOGGED:
                log.warning("checkpoint field %.80r refused, learned again: %s", name, e)
            continue
        if only is not None and (state.service if isinstance(state, ServiceState) else (
                state.location.environment, state.location.service)) != only:
            continue  # (a field named by another service's: not this restore's to load)
        (services if isinstance(state, ServiceState) else locations).append(state)
    if malformed:
        log.warning("%d checkpoint fields refused (they do not parse as format %d); their code "
                    "locations are learned again", malformed, FORMAT)
    if other:
        log.warning("%d checkpoint fields of another format were skipped (format 2's pickles are "
                    "never unpickled); their code locations are learned again: a one-time "
                    "relearn after an upgrade", other)
    for s in sorted(services, key=lambda s: s.service):
        engine.restore_service(s.service, s.max_end, s.closed_through, s.version_first_seen, s.ticks, s.rollouts,
                               s.replicas)
    restored = 0
    for state in sorted(locations, key=lambda s: s.order):
        restored += engine.restore_location(state.location, state.baseline, state.detectors,
                                            state.fingerprint)
    return Restored(restored, malformed, other)


def decode(name: str, blob: bytes) -> LocationState | ServiceState:
    """One field, checked; Malformed or OtherFormat when it cannot be used.

    >>> state = ServiceState(("prod", "shop"), 120, 60, {("shop", "1.0", "abc"): 60})
    >>> decode("svc:prod:shop", encode_service(state)) == state
    True
    >>> decode("svc:prod:other", encode_service(ServiceState(("prod", "shop"), 120, 60, {})))
    Traceback (most recent call last):
    ...
    processor.pipeline.checkpoint.Malformed: the field's name does not match its content
    """
    if type(blob) is not bytes or type(name) is not str:
        raise Malformed("the field's name is not a string or its value not bytes")
    if blob[:1] == b"\x80" and blob[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # A pickle (format 2): recognised by its header alone, never unpickled. (No field of
        # this format starts so: 0x80 is MessagePack's empty map.)
        raise OtherFormat("format 2 (pickled)")
    try:
        data = msgpack.unpackb(blob, use_list=False, raw=False, strict_map_key=False,
                               ext_hook=_no_ext)
    except Exception as e:  # noqa: BLE001 (every way bytes fail to be MessagePack)
        raise Malformed(f"not MessagePack ({type(e).__name__})") from None
    if type(data) is not dict:
        raise Malformed("not a map")
    fmt = data.get("format")
    if type(fmt) is not int:
        raise Malformed("no format number")
    if fmt != FORMAT:
        raise OtherFormat(f"format {fmt}")
    try:
        if name.startswith("loc:"):
            state = _location_state(data)
            same = location_field(state.location.key) == name
        elif name.startswith("svc:"):
            state = _service_state(data)
            same = service_field(state.service) == name
        else:
            raise Malformed("not a loc: or svc: field")
    except (ValueError, TypeError) as e:
        raise Malformed(str(e)) from None
    if not same:
        raise Malformed("the field's name does not match its content")
    return state


def _no_ext(code: int, data: bytes):
    raise ValueError(f"MessagePack extension type {code}")


def _location_state(d: dict) -> LocationState:
    if d.keys() != _LOCATION_KEYS:
        raise Malformed("a location field has the keys " + ", ".join(sorted(_LOCATION_KEYS)))
    plain = d["location"]
    if type(plain) is not dict or plain.keys() != set(_LOCATION_FIELDS) or any(
            type(v) is not str for v in plain.values()):
        raise Malformed("location: expected the strings " + ", ".join(_LOCATION_FIELDS))
    location = Location(**plain)
    baseline = None if d["baseline"] is None else Baseline.from_plain(location, d["baseline"])
    detectors = d["detectors"]
    _check_detectors(detectors)
    if type(d["order"]) is not int or type(d["fingerprint"]) is not str:
        raise Malformed("order is not an integer or fingerprint not a string")
    # The engine gets marshal bytes as it makes them, of plain data checked above.
    return LocationState(location, d["order"], baseline, marshal.dumps(detectors), d["fingerprint"])


def _service_state(d: dict) -> ServiceState:
    # (fields written before ticks, rollouts, locations and replicas lack them)
    if not _SERVICE_KEYS <= d.keys() <= _SERVICE_KEYS | _SERVICE_OPTIONAL:
        raise Malformed("a service field has the keys " + ", ".join(sorted(_SERVICE_KEYS)) + " (and "
                        + ", ".join(sorted(_SERVICE_OPTIONAL)) + ")")
    ticks = d.get("ticks", 0)
    if type(ticks) is not int or ticks < 0:
        raise Malformed("ticks is not an integer >= 0")
    service = d["service"]
    if type(service) is not tuple or len(service) != 2 or any(type(s) is not str for s in service):
        raise Malformed("service is not (environment, service.name)")
    if type(d["max_end"]) is not int or type(d["closed_through"]) is not int:
        raise Malformed("max_end or closed_through is not an integer")
    rows = d["version_first_seen"]
    if type(rows) is not tuple or not all(
            type(r) is tuple and len(r) == 4 and all(type(v) is str for v in r[:3]) and type(r[3]) is int
            for r in rows):
        raise Malformed("version_first_seen is not rows [service, version, revision, end_ns]")
    rollouts = d.get("rollouts")
    if rollouts is not None and type(rollouts) is not dict:
        raise Malformed("rollouts is not a mapping")
    keys = d.get("locations")
    if keys is not None and (type(keys) is not bytes or len(keys) % 8):
        raise Malformed("locations is not 8-byte location keys")
    locations = None if keys is None else tuple(keys[i:i + 8].hex() for i in range(0, len(keys), 8))
    replicas = d.get("replicas", ())
    if type(replicas) is not tuple or not all(type(r) is str for r in replicas):
        raise Malformed("replicas is not a list of names")
    return ServiceState(service, d["max_end"], d["closed_through"], {r[:3]: r[3] for r in rows}, ticks, rollouts,
                        locations, replicas)


def _check_detectors(value) -> None:
    """ValueError unless ``value`` is a tuple (one state per detector) made of None, bool,
    int, float, str, bytes, tuples and dicts only: what MessagePack gives back as it was
    (arrays as tuples), and what marshal then writes as the engine does."""
    if type(value) is not tuple:
        raise ValueError("detectors: not a tuple of states")
    stack = [value]  # containers still to look into (most items are scalars: no push for them)
    while stack:
        v = stack.pop()
        for items in ((v.keys(), v.values()) if type(v) is dict else (v,)):
            for x in items:
                t = type(x)
                if t in _PLAIN:
                    continue
                if t is tuple or t is dict:
                    stack.append(x)
                else:
                    raise ValueError(f"detectors: a {t.__name__} is not plain data")
