"""The one interface every detector implements, and what it is fed.

A detector belongs to one code location. After each closed window of the location's
service it gets one ``Observation`` (the window's aggregates, never single spans) and
returns the events it raises. Its state is plain Python and numpy, bounded in size,
picklable for checkpoints, and depends only on the observations fed, in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from river import base

from processor.detect.stats import two_proportion_z
from processor.events import Event
from processor.location import Location
from processor.window import LocationWindow

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


class Detector(base.Base):
    """Base of every detector: ``update(observation) -> list[Event]``.

    ``wants_absent`` detectors are also fed windows in which the location had no spans.
    """

    event_type: str = ""
    wants_absent: bool = False

    def update(self, obs: Observation) -> list[Event]:
        raise NotImplementedError


class VersionWatches:
    """Evidence kept per version, so a canary is judged on its own spans rather than
    diluted in the old version's; the ``limit`` most recently seen versions are kept."""

    def __init__(self, make, limit: int = 4):
        self.make = make
        self.limit = limit
        self.by_version: dict[Version, object] = {}
        self.last_seen: dict[Version, int] = {}
        self.tick = 0

    def get(self, version: Version):
        self.last_seen[version] = self.tick
        w = self.by_version.get(version)
        if w is None:
            w = self.by_version[version] = self.make()
            if len(self.by_version) > self.limit:
                oldest = min(self.by_version, key=lambda v: (self.last_seen[v], v))
                del self.by_version[oldest], self.last_seen[oldest]
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
