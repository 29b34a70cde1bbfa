"""``dormant``: a location that was called steadily stopped being called."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from processor.detect.base import Detector, Observation, Version
from processor.detect.columns import is_record, read_record, record_layout, record_scratch, take_records
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
        self._thaw(DormantColumns.FRESH, b"")

    @classmethod
    def _contract(cls) -> dict:
        return {"change": ("vanish", 1.0), "max_stationary": 0}

    # The state is one row of DormantColumns, and this detector's own count of windows.
    presence = property(lambda self: self._row.presence_at(0, self._tick))
    calls = property(lambda self: float(self._row.calls[0]))
    windows = property(lambda self: int(self._row.windows[0]))
    silent = property(lambda self: bool(self._row.silent[0]))

    def freeze(self, sketch: bytes = b"") -> tuple:
        return self._row.row(0, self._tick)

    def _thaw(self, state: tuple, sketch: bytes) -> None:
        if type(state) is not tuple:  # (None means a new row to DormantColumns.put)
            raise ValueError("dormant: the state is not a tuple")
        self._row = DormantColumns(self)
        self._tick = self._row.put(0, state)

    def columns(self) -> DormantColumns:
        """State for many locations at once, which the engine keeps instead of a frozen
        state per location."""
        return DormantColumns(self)

    def update(self, obs: Observation) -> list[Event]:
        here = obs.window is not None and obs.window.count > 0
        self._tick += 1
        return self._row.update(_ROW, np.array([obs.count if here else 0]),
                                [obs.window.main_version.version] if here else [], obs.end_ns,
                                obs.service_version, lambda k: obs, self._tick)

    def _silence(self, obs: Observation, silence_s: float, rate: float, p_silence: float,
                 last_version: Version, presence: float, last_seen_ns: int) -> Event:
        """The event of a silence too long to be chance."""
        replaced = obs.service_version != last_version and obs.service_version != ("", "", "")
        version = obs.service_version if replaced else last_version
        return obs.event(
            self.event_type, "info",
            f"{obs.location.function} has not been called for {_duration(silence_s)} "
            f"(it was called {rate:.3g}/s)" + (f"; {version[1]} replaced {last_version[1]}"
                                               if replaced else ""),
            {"silence_s": round(silence_s, 3), "rate_per_s": round(rate, 6),
             "p_silence": p_silence, "alpha": self.alpha, "presence": round(presence, 4),
             "last_seen": last_seen_ns // 1_000_000, "last_version": last_version[1],
             "last_revision": last_version[2], "threshold_s": self.min_silence_s},
            version)


_ROW = np.zeros(1, np.int64)  # the one row of a Dormant's own state


class DormantColumns:
    """The dormant state of many locations as columns indexed by location id, updated for
    every location of a service in one step: an absent location, which most locations are
    in most windows, costs numpy over an array, not a Python step of its own, and its state
    does not change (so it need not be checkpointed again). ``Dormant`` runs on a one-row
    instance, so there is one implementation of the rule.

    Windows are counted per service (``tick``, 1 for its first). A location's presence is
    kept as it was after the last window with calls (``at``); the absent windows since
    decay it when it is called again, one multiplication each, as River's ``EWMean`` would
    have taken a 0 each window (the same floats). A frozen row is ``(presence, calls,
    windows, last_seen, last_version, presence_when_last_seen, silent, at, tick)``.

    >>> cols = DormantColumns(Dormant(warmup_windows=1, min_silence_s=60))
    >>> _ = cols.put(7)
    >>> ids = np.array([7])
    >>> cols.update(ids, np.array([50]), [("s", "1", "")], 60 * 10**9, ("s", "1", ""), None, tick=1)
    []
    >>> cols.row(7, tick=3)
    (1.0, 50.0, 1, 60000000000, ('s', '1', ''), 1.0, False, 1, 3)
    >>> round(cols.presence_at(7, tick=3), 6)  # two windows without calls since: 0.98 ** 2
    0.9604
    """

    unchecked = frozenset()  # rows are plain data whatever was put (``row`` builds them)
    FRESH = (0.0, 0.0, 0, 0, ("", "", ""), 0.0, False, 0, 0)  # Dormant.freeze of a new detector
    _ARRAYS = (("presence", np.float64), ("calls", np.float64), ("windows", np.int64),
               ("last_seen", np.int64), ("pwls", np.float64), ("silent", np.bool_), ("at", np.int64))
    _NUMERIC = tuple(name for name, _ in _ARRAYS)
    _EXTRAS = ("last_version", "tick")  # a record's other values (``records``)

    def __init__(self, det: Dormant):
        self.det = det
        for name, dtype in self._ARRAYS:
            setattr(self, name, np.zeros(0, dtype))
        self.last_version: list[Version] = []
        self.changed: list[int] = []  # rows an update changed beyond the present ones (reported)

    def _room(self, n: int) -> None:
        if n > len(self.presence):
            size = max(n, 2 * len(self.presence), 16)
            for name, dtype in self._ARRAYS:
                old = getattr(self, name)
                new = np.zeros(size, dtype)
                new[:len(old)] = old
                setattr(self, name, new)
            self.last_version += [self.FRESH[4]] * (size - len(self.last_version))

    def put(self, i: int, state: tuple | None = None, tick: int = 0) -> int:
        """Set row ``i``: a new location's state, or a frozen one (``row``'s; the seven
        fields of the format before ``at`` and ``tick`` are taken as current at ``tick``).
        Returns the tick the state was frozen at."""
        self._room(i + 1)
        state = self.FRESH if state is None else state
        if len(state) == 7:
            state = (*state, tick, tick)
        if state[7] < 0 or state[2] < 0:
            raise ValueError("dormant: a state's window counts are negative")
        (self.presence[i], self.calls[i], self.windows[i], self.last_seen[i], self.last_version[i],
         self.pwls[i], self.silent[i], self.at[i], frozen_at) = state
        return int(frozen_at)

    def row(self, i: int, tick: int) -> tuple:
        """Row ``i`` as plain Python values, frozen at the service's ``tick``."""
        return (float(self.presence[i]), float(self.calls[i]), int(self.windows[i]), int(self.last_seen[i]),
                tuple(self.last_version[i]), float(self.pwls[i]), bool(self.silent[i]), int(self.at[i]),
                int(tick))

    def records(self, ids: list[int], ticks: list[int]) -> list[tuple]:
        """Rows ``ids`` as a checkpoint keeps them: records (``columns.RECORD``) of the
        arrays' bytes, the version seen last and the tick."""
        last = self.last_version
        return take_records(self, ids, [(tuple(last[i]), t) for i, t in zip(ids, ticks)]) if ids else []

    def from_record(self, record, tick: int = 0) -> tuple:
        """The row (``row``'s tuple) that a record of ``records`` holds."""
        if not is_record(record):
            return record
        scratch = record_scratch(self)
        version, at = read_record(scratch, record, 0)
        if type(version) is not tuple or len(version) != 3 or type(at) is not int:
            raise ValueError("dormant: a record's version or tick does not fit")
        scratch.last_version[0] = version
        return scratch.row(0, at)

    def layout(self) -> str:
        return record_layout(self)

    def presence_at(self, i: int, tick: int) -> float:
        """Row ``i``'s presence after the service's window ``tick``."""
        p, c = float(self.presence[i]), 1 - self.det.fading_factor
        for _ in range(max(0, tick - int(self.at[i])) if self.windows[i] else 0):
            p = c * p
            if not p:
                break
        return p

    def update(self, ids: np.ndarray, counts: np.ndarray, versions: list[Version], end_ns: int,
               service_version: Version, observe, tick: int) -> list[Event]:
        """One closed window of a service, its ``tick``-th: ``ids`` its locations (rows),
        ``counts`` their calls in it (0: absent), ``versions`` the main version of each
        present one, in order; ``observe(k)`` gives the Observation of ``ids[k]``, asked only
        for the few with an event. ``changed`` lists the absent rows whose state changed."""
        d, ff = self.det, self.det.fading_factor
        here = counts > 0
        k_here = np.flatnonzero(here)
        rows = ids[k_here]
        first = self.windows[rows] == 0
        # River's EWMean: the first value as it is, then ff * x + (1 - ff) * mean (same float
        # ops); each window without calls since was x = 0: (1 - ff) * mean.
        presence = self.presence[rows]
        gap = np.where(first, 0, tick - 1 - self.at[rows])
        for step in range(int(gap.max()) if len(gap) else 0):
            presence = np.where(gap > step, (1 - ff) * presence, presence)
            if step % 64 == 63 and not presence[gap > step + 1].any():
                break  # (what is still to decay is 0.0 already: a long silence ends here)
        c = counts[k_here].astype(np.float64)
        presence = np.where(first, 1.0, ff * 1.0 + (1 - ff) * presence)
        self.presence[rows] = presence
        self.calls[rows] = np.where(first, c, ff * c + (1 - ff) * self.calls[rows])
        self.windows[rows] += 1
        self.last_seen[rows] = end_ns
        self.pwls[rows] = presence
        self.at[rows] = tick
        for i, v in zip(rows.tolist(), versions):
            self.last_version[i] = v
        events: list[Event] = []
        back = self.silent[rows]
        for k, i in zip(k_here[back].tolist(), rows[back].tolist()):
            self.silent[i] = False
            obs = observe(k)
            events.append(obs.event("resolved", "info", f"{obs.location.function} is called again",
                                    {"resolves": d.event_type, "reason": "called again", "count": obs.count},
                                    subject=d.event_type))

        k_away = np.flatnonzero(~here)
        rows = ids[k_away]
        seen = self.windows[rows] > 0
        k_away, rows = k_away[seen], rows[seen]
        due = (~self.silent[rows] & (self.windows[rows] >= d.warmup_windows)
               & (self.pwls[rows] >= d.min_presence)
               & ((end_ns - self.last_seen[rows]) / 1e9 >= d.min_silence_s))
        self.changed = []
        for k, i in zip(k_away[due].tolist(), rows[due].tolist()):
            silence_s = (end_ns - int(self.last_seen[i])) / 1e9
            rate = float(self.calls[i]) / d.window_s  # calls per second while it was called
            p_silence = math.exp(-rate * silence_s)
            if p_silence >= d.alpha:
                continue
            self.silent[i] = True
            self.changed.append(i)
            events.append(d._silence(observe(k), silence_s, rate, p_silence, tuple(self.last_version[i]),
                                     float(self.pwls[i]), int(self.last_seen[i])))
        return events
