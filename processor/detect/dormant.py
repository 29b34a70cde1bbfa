"""``dormant``: a location that was called steadily stopped being called."""

from __future__ import annotations

import math
from dataclasses import dataclass

from processor.detect.base import Detector, Observation, Version
from processor.detect.settings import Settings, parse_bool, positive_float, probability, setting
from processor.events import Event


@dataclass(frozen=True)
class DormantSettings(Settings):
    enabled: bool = setting(True, parse_bool, "report steadily called locations that fall silent")
    min_silence_s: float = setting(600.0, positive_float,
                                   "silence (event-time seconds) before a location is called dormant")
    min_presence: float = setting(0.9, probability, "share of windows with calls that makes a location steady")
    alpha: float = setting(1e-6, probability, "how unlikely the silence must be at the location's usual rate")


def _duration(seconds: float) -> str:
    """A silence as people say it.

    >>> _duration(42), _duration(600), _duration(5400), _duration(2 * 86400)
    ('42 s', '10 min', '1.5 h', '2 days')
    """
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} days"


class Dormant(Detector):
    """A steadily called location fell silent.

    Fed every closed window of the location's service, also those without the location.
    Presence (share of windows with calls) and calls per window are exponentially weighted
    means, updated exactly as River's ``stats.EWMean`` updates them (the first value taken as
    it is; a test checks they agree bit for bit), kept as two floats per location. A silence
    is reported once it has lasted ``min_silence_s`` and is too long to be chance
    (``P(no call) = exp(-rate * silence) < alpha``) for a location present in at least
    ``min_presence`` of its windows. The event names the version that replaced the one that
    last called the location.

    Examples
    --------
    >>> from processor.detect.base import Observation
    >>> from processor.pipeline.location import Location
    >>> from processor.pipeline.sketch import LogSketch
    >>> from processor.pipeline.window import LocationWindow, VersionFigures
    >>> det, loc, events = Dormant(warmup_windows=10, min_silence_s=300), Location("p", "s", "f"), []
    >>> v1, v2 = ("s", "1", ""), ("s", "2", "")
    >>> for i in range(40):
    ...     lw = None if i >= 20 else LocationWindow(0, loc, 300, 0, LogSketch(), [VersionFigures(v1, 300, 0, LogSketch())])
    ...     obs = Observation(loc, i * 60 * 10**9, (i + 1) * 60 * 10**9, lw, service_version=v1 if i < 20 else v2)
    ...     events += det.update(obs)
    >>> [(e.type, e.version[1], e.detail["last_version"], e.window_start_ns // (60 * 10**9)) for e in events]
    [('dormant', '2', '1', 24)]
    """

    name = "dormant"
    Settings = DormantSettings
    event_type = "dormant"
    description = "A function that was called regularly stopped being called."
    wants_absent = True

    def __init__(self, window_s: float = 60.0, warmup_windows: int = 30, min_silence_s: float = 600.0,
                 min_presence: float = 0.9, alpha: float = 1e-6, fading_factor: float = 0.02):
        self.window_s, self.warmup_windows, self.min_silence_s = window_s, warmup_windows, min_silence_s
        self.min_presence, self.alpha, self.fading_factor = min_presence, alpha, fading_factor
        self.presence = 0.0  # EWMean of 1 (called) / 0 (not called) per window
        self.calls = 0.0     # EWMean of calls per window, over windows with calls
        self.windows = 0
        self.last_seen_ns = 0
        self.last_version: Version = ("", "", "")
        self.presence_when_last_seen = 0.0
        self.silent = False

    @classmethod
    def _contract(cls) -> dict:
        return {"change": ("vanish", 1.0), "max_stationary": 0}

    def freeze(self, sketch: bytes = b"") -> tuple:
        return (self.presence, self.calls, self.windows, self.last_seen_ns, self.last_version,
                self.presence_when_last_seen, self.silent)

    def _thaw(self, state: tuple, sketch: bytes) -> None:
        (self.presence, self.calls, self.windows, self.last_seen_ns, self.last_version,
         self.presence_when_last_seen, self.silent) = state

    def _ewm(self, mean: float, x: float) -> float:
        """One update of River's ``stats.EWMean`` after its first value."""
        return self.fading_factor * x + (1 - self.fading_factor) * mean

    def update(self, obs: Observation) -> list[Event]:
        if obs.window is not None and obs.window.count > 0:
            if self.windows == 0:  # both means start at their first value
                self.presence, self.calls = 1.0, float(obs.window.count)
            else:
                self.presence = self._ewm(self.presence, 1.0)
                self.calls = self._ewm(self.calls, obs.window.count)
            self.windows += 1
            self.last_seen_ns = obs.end_ns
            self.last_version = obs.window.main_version.version
            self.presence_when_last_seen = self.presence
            if self.silent:
                self.silent = False
                return [obs.event("resolved", "info",
                                  f"{obs.location.function} is called again",
                                  {"resolves": self.event_type, "reason": "called again",
                                   "count": obs.window.count}, subject=self.event_type)]
            return []
        if self.windows == 0:
            return []
        self.presence = self._ewm(self.presence, 0.0)
        if self.silent or self.windows < self.warmup_windows:
            return []
        silence_s = (obs.end_ns - self.last_seen_ns) / 1e9
        rate = self.calls / self.window_s  # calls per second while it was called
        p_silence = math.exp(-rate * silence_s)
        if (silence_s < self.min_silence_s or p_silence >= self.alpha
                or self.presence_when_last_seen < self.min_presence):
            return []
        self.silent = True
        replaced = obs.service_version != self.last_version and obs.service_version != ("", "", "")
        version = obs.service_version if replaced else self.last_version
        return [obs.event(
            self.event_type, "info",
            f"{obs.location.function} has not been called for {_duration(silence_s)} "
            f"(it was called {rate:.3g}/s)" + (f"; {version[1]} replaced {self.last_version[1]}"
                                               if replaced else ""),
            {"silence_s": round(silence_s, 3), "rate_per_s": round(rate, 6),
             "p_silence": p_silence, "alpha": self.alpha, "presence": round(self.presence_when_last_seen, 4),
             "last_seen": self.last_seen_ns // 1_000_000, "last_version": self.last_version[1],
             "last_revision": self.last_version[2], "threshold_s": self.min_silence_s},
            version)]
