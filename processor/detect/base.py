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


class VersionTally:
    """Per-version (hits, trials) over a suspect segment, for attribution; at most
    ``limit`` versions are kept (the ones with most trials), so state stays bounded."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self.counts: dict[Version, list[float]] = {}

    def add(self, version: Version, hits: float, trials: float) -> None:
        c = self.counts.setdefault(version, [0.0, 0.0])
        c[0] += hits
        c[1] += trials
        if len(self.counts) > self.limit:
            drop = min(self.counts, key=lambda v: (self.counts[v][1], v))
            del self.counts[drop]

    def clear(self) -> None:
        self.counts.clear()

    def blame(self, p0: float, first_seen: dict[Version, int]) -> tuple[Version | None, dict]:
        """The version whose share of hits stands out most against ``p0``; when several
        versions ran side by side, also how the newest compares with the others."""
        from processor.detect.stats import two_proportion_z

        if not self.counts:
            return None, {}
        def z(v):
            h, n = self.counts[v]
            return (h - n * p0) / max((n * p0 * (1 - p0)) ** 0.5, 1e-12)
        ranked = sorted(self.counts, key=lambda v: (-z(v), v))
        figures = {v[1] or "(none)": {"hits": round(h, 3), "spans": round(n, 3),
                                       "share": round(h / n, 6) if n else None}
                   for v, (h, n) in sorted(self.counts.items())}
        detail: dict = {"versions": figures}
        if len(self.counts) > 1:
            newest = max(self.counts, key=lambda v: (first_seen.get(v, 0), v))
            others = [self.counts[v] for v in self.counts if v != newest]
            oh, on = sum(o[0] for o in others), sum(o[1] for o in others)
            nh, nn = self.counts[newest]
            detail["side_by_side"] = {"newest": newest[1], "z_newest_vs_others": round(
                two_proportion_z(nh, nn, oh, on), 3)}
        return ranked[0], detail
