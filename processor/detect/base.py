"""The one interface every detector implements, and what it is fed.

A detector belongs to one code location. After each closed window of the location's
service it gets one ``Observation`` (the window's aggregates, never single spans) and
returns the events it raises. Its state is plain Python and numpy, bounded in size,
picklable for checkpoints, and depends only on the observations fed, in order. It can be
frozen to plain values (``freeze``) and thawed back (``thawed``): the engine keeps every
location's detectors frozen between windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from river import base

from processor.detect.stats import BinomialCUSUM, two_proportion_z
from processor.events import Event
from processor.pipeline.location import Location
from processor.pipeline.window import LocationWindow

Version = tuple[str, str, str]  # (service, service.version, vcs.ref.head.revision)


@dataclass
class Observation:
    """One closed window of one code location, with its service's context."""
    location: Location
    start_ns: int
    end_ns: int
    window: LocationWindow | None      # None: the location had no spans in this window
    service_inflight: float = 0.0      # mean spans in flight in the service (Little's law)
    service_version: Version = ("", "", "")  # the version serving most of the service's spans
    version_first_seen: dict[Version, int] = field(default_factory=dict)  # version -> first window end (ns)
    service_calls: float = 0.0         # spans per second of the whole service in this window
    # The location's published baseline this window, as (sketch before, decay applied or None
    # for its first window, sketch after), sketches packed: a detector whose own baseline
    # sketch is that very "before" object and that merges this window's sketch in after the
    # same decay gets the same bytes, so it may take "after" instead of computing it.
    baseline_step: tuple[bytes, float | None, bytes] | None = None

    @property
    def count(self) -> int:
        return self.window.count if self.window else 0

    def others_load(self) -> float | None:
        """log of the calls per second in the rest of the service: the load this location
        sees. Calls, not spans in flight: in flight is calls times latency, so a rollout that
        slows down or removes other functions would move it with no change in load, and the
        location's own latency would feed its own load measure."""
        others = self.service_calls - self.count / ((self.end_ns - self.start_ns) / 1e9)
        return math.log(others) if others > 1e-9 else None

    def event(self, type_: str, severity: str, summary: str, detail: dict,
              version: Version | None = None) -> Event:
        v = version or (self.window.main_version.version if self.window else self.service_version)
        detail = dict(detail)
        if v in self.version_first_seen:
            detail.setdefault("version_first_seen", self.version_first_seen[v] // 1_000_000)
        return Event(type_, self.location, v, self.start_ns, self.end_ns, severity, summary, detail)


_SHARED: dict[tuple, tuple] = {}  # (class, parameter reprs) -> the tuple its detectors share


def _shared_key(cls, values: tuple) -> tuple:
    # By repr: 12 and 12.0, or 0.0 and -0.0, are equal keys but print differently in events.
    return (cls, tuple(map(repr, values)))


class Detector(base.Base):
    """Base of every detector: ``update(observation) -> list[Event]``.

    ``wants_absent`` detectors are also fed windows in which the location had no spans.

    A gateway holds a detector per code location, so what every detector of one configuration
    has in common is stored once: the constructor parameters named in ``_params`` and the
    constants derived from them named in ``_constants`` live in one tuple per configuration
    (``_p``), read through properties of the same names. River's ``_get_params``, ``clone`` and
    ``repr`` find them by those names as usual; only the state is per instance.
    """

    event_type: str = ""
    wants_absent: bool = False
    _params: tuple[str, ...] = ()     # the constructor's parameters, in order
    _constants: tuple[str, ...] = ()  # what ``_derive`` computes from them, in order

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        names = cls.__dict__.get("_params", ()) + cls.__dict__.get("_constants", ())
        for i, name in enumerate(names):
            setattr(cls, name, property(lambda self, i=i: self._p[i]))

    def _share(self, *values) -> None:
        """Point this detector at the tuple shared by every one built with ``values``."""
        key = _shared_key(type(self), values)
        p = _SHARED.get(key)
        if p is None:
            p = _SHARED[key] = values + self._derive(*values)
        self._p = p

    def _derive(self, *values) -> tuple:
        return ()

    def __setstate__(self, state: dict) -> None:
        # A restored detector shares its configuration's tuple again.
        p = state.get("_p")
        if p is not None:
            state["_p"] = _SHARED.setdefault(_shared_key(type(self), p[:len(self._params)]), p)
        for k, v in state.items():
            setattr(self, k, v)

    def update(self, obs: Observation) -> list[Event]:
        raise NotImplementedError

    # -- frozen state ------------------------------------------------------------------------
    # Between windows the engine keeps each location's detectors frozen: their state as
    # plain values (numbers, strings, bytes, None, and tuples and dicts of those), which
    # ``marshal`` turns into one bytes object per location. A few hundred small Python
    # objects per location would cost more than the numbers they hold.

    def freeze(self, sketch: bytes = b"") -> tuple:
        """The state, parameters left out, as plain values; ``sketch`` is the location's
        baseline sketch (``LogSketch.pack``), which a detector holding the same need not copy."""
        raise NotImplementedError

    def thawed(self, state: tuple, sketch: bytes = b"") -> "Detector":
        """A detector of this one's configuration in the state ``freeze`` gave (given the
        same ``sketch``); this one is left as it is."""
        d = type(self).__new__(type(self))
        d._p = self._p
        d._thaw(state, sketch)
        return d

    def _thaw(self, state: tuple, sketch: bytes) -> None:
        raise NotImplementedError


class VersionWatches:
    """Evidence kept per version, so a canary is judged on its own spans rather than
    diluted in the old version's; the ``limit`` most recently seen versions are kept.

    ``make()`` returns a watch with a writable ``last_seen`` attribute: the window count at
    which its version was last seen (one dict per location, not two)."""

    __slots__ = ("by_version", "limit", "make", "tick")

    def __init__(self, make, limit: int = 4):
        self.make = make
        self.limit = limit
        self.by_version: dict[Version, object] = {}
        self.tick = 0

    def get(self, version: Version):
        by_version = self.by_version
        w = by_version.get(version)
        if w is None:
            w = by_version[version] = self.make()
            w.last_seen = self.tick
            if len(by_version) > self.limit:
                oldest = min(by_version, key=lambda v: (by_version[v].last_seen, v))
                del by_version[oldest]
        else:
            w.last_seen = self.tick
        return w

    def next_window(self) -> None:
        self.tick += 1

    def reset_all(self) -> None:
        for w in self.by_version.values():
            w.reset()


def frozen_open(o: dict | None) -> dict | None:
    """An open regression's record (latency, errors) as plain values: its reverse CUSUM
    ``back`` as its statistic."""
    return None if o is None else {**o, "back": o["back"].statistic}


def thawed_open(o: dict | None, threshold: float) -> dict | None:
    """The record ``frozen_open`` gave, with its reverse CUSUM back."""
    if o is not None:
        back = BinomialCUSUM(threshold)
        back.statistic = o["back"]
        o["back"] = back
    return o


def attribution(version: Version, hits: float, spans: float, others_hits: float, others_spans: float,
                first_seen: dict[Version, int]) -> dict:
    """Per-version figures over the evidence windows, and, where other versions ran in the
    same windows, how this one compares with them (two-proportion z)."""
    detail: dict = {"versions": {version[1] or "(none)": {
        "hits": round(hits, 3), "spans": round(spans, 3), "share": round(hits / spans, 6) if spans else None}}}
    if others_spans > 0:
        detail["versions"]["(others)"] = {"hits": round(others_hits, 3), "spans": round(others_spans, 3),
                                          "share": round(others_hits / others_spans, 6)}
        detail["side_by_side"] = {"version": version[1],
                                  "z_vs_others": round(two_proportion_z(hits, spans, others_hits, others_spans), 3)}
    return detail
