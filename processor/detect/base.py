"""The one interface every detector implements, and what it is fed.

A detector belongs to one code location. After each closed window of the location's
service it gets one ``Observation`` (the window's aggregates, never single spans) and
returns the events it raises. Its state is plain Python and numpy, bounded in size, and
depends only on the observations fed, in order. It can be frozen to plain values
(``freeze``) and thawed back (``thawed``): the engine keeps every location's detectors
frozen between windows.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field

from river import base

from processor.detect.lifecycle import Regression, Version
from processor.detect.settings import CommonSettings, Settings
from processor.detect.stats import mean_log_ms, two_proportion_z
from processor.events import Event
from processor.pipeline.graph import LocationGraph
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import LocationWindow


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
    # for its first window, sketch after), sketches packed, then the sketch before unpacked: a
    # detector whose own baseline sketch is that very "before" object and that merges this
    # window's sketch in after the same decay gets the same bytes, so it may take "after"
    # instead of computing it (and the unpacked one instead of unpacking its own).
    baseline_step: tuple[bytes, float | None, bytes, LogSketch] | None = None
    # What the call graph joined of the location in this window (processor/pipeline/graph.py,
    # ids resolved to locations and versions); None when it called nothing and was called by
    # nothing joined, or the call graph is off
    graph: LocationGraph | None = None

    _mean_log: float | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def count(self) -> int:
        return self.window.count if self.window else 0

    def mean_log_ms(self) -> float:
        """``mean_log_ms`` of the window's sketch, computed once for all the detectors."""
        if self._mean_log is None:
            self._mean_log = mean_log_ms(self.window.sketch)
        return self._mean_log

    def others_load(self) -> float | None:
        """log of the calls per second in the rest of the service: the load this location
        sees. Calls, not spans in flight: in flight is calls times latency, so a rollout that
        slows down or removes other functions would move it with no change in load, and the
        location's own latency would feed its own load measure."""
        others = self.service_calls - self.count / ((self.end_ns - self.start_ns) / 1e9)
        return math.log(others) if others > 1e-9 else None

    def event(self, type_: str, severity: str, summary: str, detail: dict,
              version: Version | None = None, subject: str = "") -> Event:
        v = version or (self.window.main_version.version if self.window else self.service_version)
        detail = dict(detail)
        if v in self.version_first_seen:
            detail.setdefault("version_first_seen", self.version_first_seen[v] // 1_000_000)
        return Event(type_, self.location, v, self.start_ns, self.end_ns, severity, summary, detail, subject)


class Detector(base.Base):
    """Base of every detector: ``update(observation) -> list[Event]``.

    A detector module declares, on its class, what the registry (processor/detect/registry.py)
    derives everything else from: ``name`` (its section of the ``detectors:`` settings),
    ``Settings`` (a typed dataclass of those settings, see processor/detect/settings.py),
    ``event_type`` and ``description`` (one sentence for people: SARIF rules, docs), and
    ``regression`` (whether its events open a regression that ``top`` shows until resolved).
    ``wants_absent`` detectors are also fed windows in which the location had no spans;
    ``needs_graph`` ones only windows with call-graph figures (``Observation.graph``).

    Parameters are plain attributes named as the constructor's, as in River. The engine keeps
    one live detector per configuration (the prototype) and every location's state frozen;
    ``thawed`` gives a detector of the prototype's configuration in a frozen state.
    """

    name: str = ""
    Settings: type[Settings] = Settings
    event_type: str = ""
    description: str = ""
    regression: bool = False
    wants_absent: bool = False
    needs_graph: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, common: CommonSettings, window_s: float,
                      half_life_s: float) -> "Detector":
        """The detector the settings describe: each constructor parameter taken from the
        detector's own settings, else the common ones, else the window length and half-life."""
        values = {"window_s": window_s, "half_life_s": half_life_s,
                  **dataclasses.asdict(common), **dataclasses.asdict(settings)}
        params = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in values.items() if k in params})

    @classmethod
    def _contract(cls) -> dict:
        """What the shared contract suite (tests/test_detector_contract.py) feeds this detector,
        as River's ``_unit_test_params``: ``change`` (a kind of tests/windows.py's generator and
        its effect) on which it must fire, and ``max_stationary`` events allowed on stationary
        streams."""
        raise NotImplementedError

    def update(self, obs: Observation) -> list[Event]:
        raise NotImplementedError

    # -- frozen state ------------------------------------------------------------------------
    # Between windows the engine keeps each location's detectors frozen: their state as
    # plain values (numbers, strings, bytes, None, and tuples and dicts of those), which
    # ``marshal`` turns into one bytes object per location. A few hundred small Python
    # objects per location would cost more than the numbers they hold. (A detector with
    # ``columns()`` is kept as columns instead; its place in the tuple is filled from them.)

    def freeze(self, sketch: bytes = b"") -> tuple:
        """The state, parameters left out, as plain values; ``sketch`` is the location's
        baseline sketch (``LogSketch.pack``), which a detector holding the same need not copy."""
        raise NotImplementedError

    def columns(self):
        """State for many locations at once, which the engine updates once per service
        window: over all its locations (as ``DormantColumns``), or over the present ones (a
        ``PresentColumns``, processor/detect/columns.py, whose ``present_only`` is true). None
        (the default): the engine keeps this detector frozen per location and feeds it
        location by location."""
        return None

    def thawed(self, state: tuple, sketch: bytes = b"") -> "Detector":
        """A detector of this one's configuration in the state ``freeze`` gave (given the
        same ``sketch``); this one is left as it is."""
        d = object.__new__(type(self))
        d.__dict__.update(self.__dict__)  # the parameters; _thaw replaces every state attribute
        d._thaw(state, sketch)
        return d

    def _thaw(self, state: tuple, sketch: bytes) -> None:
        raise NotImplementedError


class RegressionDetector(Detector):
    """A detector whose events open a regression (processor/detect/lifecycle.py): ``open``
    holds it while it lasts, and ``_resolved`` ends it."""

    regression = True
    open: Regression | None = None

    def _opened(self, event: Event, regression: Regression, level: float) -> Event:
        """Keep ``regression`` open, opened by ``event`` at ``level``."""
        regression.event_id, regression.reported = event.id, level
        self.open = regression
        return event

    def _escalated(self, obs: Observation, level: float, severity: str, summary: str,
                   detail: dict) -> list[Event]:
        """Report the open regression again: it rose to ``level``, ``escalate_ratio`` or more
        times what was reported."""
        o = self.open
        o.escalations += 1
        detail = {"escalates": o.event_id, "escalation": o.escalations, "reported": o.reported, **detail}
        o.reported = level
        return [obs.event(self.event_type, severity, summary, detail, o.version)]

    def _resolved(self, obs: Observation, reason: str, summary: str, detail: dict) -> list[Event]:
        o, self.open = self.open, None
        return [obs.event("resolved", "info", summary,
                          {"resolves": self.event_type, "reason": reason, "windows": o.windows, **detail},
                          subject=self.event_type)]


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
