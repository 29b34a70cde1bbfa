"""``new_exception``: an ``exception.type`` never seen before at this location."""

from __future__ import annotations

from dataclasses import dataclass

from processor.detect.base import Detector, Observation
from processor.detect.settings import Settings, parse_bool, positive_int, probability, setting
from processor.events import Event


@dataclass(frozen=True)
class ExceptionsSettings(Settings):
    enabled: bool = setting(True, parse_bool, "report exception types new at a location")
    max_types: int = setting(64, positive_int, "exception types remembered per location")
    established_windows: int = setting(60, positive_int,
                                       "windows a version has run before a new type it raises rarely is only info")
    rare_share: float = setting(0.01, probability,
                                "share of the window's calls under which such a type is rare")


class NewException(Detector):
    """A new exception type at a location, after the location's warm-up.

    Types seen during warm-up are learnt silently. The set of known types is bounded by
    ``max_types``; beyond it the oldest-learnt are forgotten (a type that comes back after
    being forgotten is reported again, which a location with that many types has earned).

    A type that arrives with a version is a ``warning``. One raised in under ``rare_share``
    of the window's calls by a version that was already running when the location's warm-up
    ended, or has run for ``established_windows`` windows, is ``info``: a rare error that
    was there all along and merely missed the warm-up (the shorter the warm-up, the more
    such types it misses).

    Examples
    --------
    >>> from collections import Counter
    >>> from processor.detect.base import Observation
    >>> from processor.pipeline.location import Location
    >>> from processor.pipeline.sketch import LogSketch
    >>> from processor.pipeline.window import LocationWindow, VersionFigures
    >>> det, loc = NewException(warmup_windows=2), Location("prod", "shop", "f")
    >>> def window(i, types, version="1"):
    ...     vf = VersionFigures(("shop", version, ""), 10, len(types), LogSketch(), Counter(types))
    ...     lw = LocationWindow(0, loc, 10, len(types), LogSketch(), [vf], Counter(types))
    ...     return det.update(Observation(loc, i, i + 1, lw))
    >>> window(0, ["KeyError"]) + window(1, []) + window(2, ["KeyError"])
    []
    >>> [(e.detail["exception_type"], e.version[1], e.severity) for e in window(3, ["TimeoutError"], "2")]
    [('TimeoutError', '2', 'warning')]

    A type the warm-up missed, raised rarely by the version it watched, is info:

    >>> det = NewException(warmup_windows=2)
    >>> first = {("shop", "1", ""): 0}
    >>> def rare(i, types):
    ...     vf = VersionFigures(("shop", "1", ""), 500, len(types), LogSketch(), Counter(types))
    ...     lw = LocationWindow(0, loc, 500, len(types), LogSketch(), [vf], Counter(types))
    ...     return det.update(Observation(loc, i, i + 1, lw, version_first_seen=first))
    >>> rare(0, []) + rare(1, []) + rare(2, [])
    []
    >>> [(e.detail["exception_type"], e.severity) for e in rare(3, ["KeyError"])]
    [('KeyError', 'info')]
    """

    name = "exceptions"
    Settings = ExceptionsSettings
    event_type = "new_exception"
    description = "An exception type never raised here before appeared in production."
    regression = True  # shown as open in top until the location's regressions are resolved or age out

    def __init__(self, warmup_windows: int = 30, max_types: int = 64, established_windows: int = 60,
                 rare_share: float = 0.01):
        self.warmup_windows, self.max_types = warmup_windows, max_types
        self.established_windows, self.rare_share = established_windows, rare_share
        # type -> order learnt (dicts keep insertion order); made with the first exception
        self.known: dict[str, int] | None = None
        self.windows = 0
        self.warm_ns = 0  # when the warm-up ended: versions running then are the ones it watched

    @classmethod
    def _contract(cls) -> dict:
        return {"change": ("exception", 1.0), "max_stationary": 0}

    def columns(self):
        """State for many locations at once (``ExceptionColumns``), which the engine keeps
        instead of a frozen state per location."""
        from processor.detect.exceptions_columns import ExceptionColumns

        return ExceptionColumns(self)

    def freeze(self, sketch: bytes = b"") -> tuple:
        return self.known, self.windows, self.warm_ns

    def _thaw(self, state: tuple, sketch: bytes) -> None:
        self.known, self.windows = state[:2]
        self.warm_ns = state[2] if len(state) > 2 else 0

    def update(self, obs: Observation) -> list[Event]:
        lw = obs.window
        if lw is None or lw.count == 0:
            return []
        self.windows += 1
        if self.windows == self.warmup_windows:
            self.warm_ns = obs.end_ns
        events = []
        for etype in sorted(lw.exceptions):
            known = self.known
            if known is None:
                known = self.known = {}
            if etype in known:
                continue
            known[etype] = self.windows
            if len(known) > self.max_types:
                del known[next(iter(known))]
            if self.windows <= self.warmup_windows:
                continue
            by_version = {v.version: v.exceptions.get(etype, 0) for v in lw.versions}
            version = max(by_version, key=lambda v: (by_version[v], obs.version_first_seen.get(v, 0), v))
            n = lw.exceptions[etype]
            first = obs.version_first_seen.get(version)
            version_windows = (obs.end_ns - first) // (obs.end_ns - obs.start_ns) if first is not None else 0
            watched = first is not None and 0 < self.warm_ns and first <= self.warm_ns
            rare = (watched or version_windows >= self.established_windows) and n < self.rare_share * lw.count
            events.append(obs.event(
                self.event_type, "info" if rare else "warning",
                f"{obs.location.function} raised {etype} for the first time"
                + (f" in {version[1]}" if version[1] else "") + f" ({n} of {lw.count} calls)"
                + (f"; rare, in a version running for {version_windows} windows" if rare else ""),
                {"exception_type": etype, "count": n, "spans": lw.count, "rare": rare,
                 "version_windows": int(version_windows),
                 "known_types": sorted(k for k in self.known if k != etype),
                 "versions": {v[1] or "(none)": c for v, c in sorted(by_version.items())},
                 "exemplars": lw.exemplars},
                version, subject=etype))
        return events
