"""``scaling_regression``: latency grows with load more than the baseline's relation did."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from processor.detect.base import Observation, RegressionDetector
from processor.detect.lifecycle import ACCEPTED, RECOVERED, Regression
from processor.detect.settings import Settings, parse_bool, positive_float, positive_int, setting
from processor.detect.stats import CallMix, LoadFit
from processor.events import Event
from processor.parsing import non_negative_float


@dataclass(frozen=True)
class ScalingSettings(Settings):
    enabled: bool = setting(True, parse_bool, "watch how latency grows with load")
    warmup_windows: int = setting(60, positive_int,
                                  "windows of (load, latency) points before the baseline line is trusted")
    recent_windows: int = setting(30, positive_int, "recent windows whose residual slope is tested")
    z_threshold: float = setting(5.0, positive_float, "t of the residual slope that counts as a rise")
    persist_windows: int = setting(3, positive_int, "windows in a row the rise must hold")
    min_relative: float = setting(0.15, non_negative_float,
                                  "smallest extra latency across the recent load range that is reported")
    min_load_range: float = setting(0.2, non_negative_float,
                                    "smallest spread of log load in the recent windows to judge a slope")
    resolve_windows: int = setting(10, positive_int,
                                   "windows in a row with a flat residual slope that close a scaling regression")
    load_margin: float = setting(0.2, non_negative_float,
                                 "how far past the load its baseline has seen (log of calls per second) a "
                                 "window still counts in the recent residual slope")


SEEN_SD = 2.5  # the load the baseline has seen: its mean -+ this many standard deviations (log)
INVERSE_T = 4.0  # t of a falling baseline slope from which the load says nothing about scaling


@dataclass(slots=True, kw_only=True)
class ScalingRegression(Regression):
    calm: int = 0  # windows in a row with a flat residual slope


class ScalingShift(RegressionDetector):
    """The slope of latency against concurrency rose.

    Each window gives one point: x = log of the calls per second in the rest of the
    service (its load; see ``Observation.others_load``; or the load the location's own calls
    imply when a rollout called the rest less often, ``CallMix``), y = mean log latency of
    this location. The baseline is a decayed weighted least-squares fit through these points
    (``LoadFit``: a line in log-log, in load, or in 1 / latency, a queue, whichever has
    predicted best). The residuals of the last ``recent_windows`` windows are regressed on
    x; when their slope is positive with ``t >= z_threshold`` for ``persist_windows`` windows
    in a row, and the extra latency it implies across the recent load range is at least
    ``min_relative``, a regression opens. Latency that rises with load as the baseline
    predicts leaves residuals flat and raises nothing. Only windows whose load the baseline
    has seen (within ``load_margin`` of it) count: a rise must show across load the baseline
    covered, not in how a curve goes on past it. Where the baseline shows latency falling as
    load rises (log-log slope with t <= -4: slow windows complete fewer calls, so latency
    drives the load measure rather than the reverse), nothing is reported.

    Examples
    --------
    >>> import numpy as np
    >>> from processor.detect.base import Observation
    >>> from processor.pipeline.location import Location
    >>> from processor.pipeline.sketch import LogSketch
    >>> from processor.pipeline.window import LocationWindow, VersionFigures
    >>> rng = np.random.default_rng(3)
    >>> det, loc, events = ScalingShift(warmup_windows=60), Location("prod", "shop", "f"), []
    >>> for i in range(240):
    ...     load = float(rng.lognormal(0, 0.3))
    ...     beta = 0.3 if i < 150 else 2.0          # version 2 scales worse
    ...     version = ("shop", "1" if i < 150 else "2", "")
    ...     ms = 20 * (1 + beta * max(load - 0.7, 0))
    ...     sk = LogSketch.from_values(rng.lognormal(np.log(ms * 1e6), 0.4, 500))
    ...     lw = LocationWindow(0, loc, 500, 0, sk, [VersionFigures(version, 500, 0, sk)])
    ...     obs = Observation(loc, i * 60 * 10**9, (i + 1) * 60 * 10**9, lw, service_calls=500 * load)
    ...     events += det.update(obs)
    >>> [(e.type, e.version[1]) for e in events]
    [('scaling_regression', '2')]
    """

    name = "scaling"
    Settings = ScalingSettings
    event_type = "scaling_regression"
    description = "Latency here grows with load more than it used to."

    def __init__(self, window_s: float = 60.0, half_life_s: float = 21600.0, warmup_windows: int = 60,
                 recent_windows: int = 30, z_threshold: float = 5.0, persist_windows: int = 3,
                 min_relative: float = 0.15, min_load_range: float = 0.2, resolve_windows: int = 10,
                 accept_windows: int = 120, load_margin: float = 0.2):
        self.window_s, self.half_life_s, self.warmup_windows = window_s, half_life_s, warmup_windows
        self.recent_windows, self.z_threshold, self.persist_windows = recent_windows, z_threshold, persist_windows
        self.min_relative, self.min_load_range = min_relative, min_load_range
        self.resolve_windows, self.accept_windows, self.load_margin = resolve_windows, accept_windows, load_margin
        self.decay = 0.5 ** (window_s / half_life_s)
        self.fit = LoadFit(self.decay)
        self.mix = CallMix(self.decay)
        self._uncertain = False  # this window's load measure is in doubt (set by _point)
        self.recent: np.ndarray | None = None  # (x, residual, y) ring, made after warm-up
        self.pos = 0
        self.streak = 0
        self.open: ScalingRegression | None = None

    @classmethod
    def _contract(cls) -> dict:
        return {"change": ("scaling", 2.0), "max_stationary": 0}

    def columns(self):
        """State for many locations at once (``ScalingColumns``), which the engine keeps
        instead of a frozen state per location."""
        from processor.detect.scaling_columns import ScalingColumns

        return ScalingColumns(self)

    def freeze(self, sketch: bytes = b"") -> tuple:
        recent = None if self.recent is None else self.recent.tobytes()
        return ((self.fit.freeze(), self.mix.freeze()), recent, self.pos, self.streak,
                self.open.freeze() if self.open else None)

    def _thaw(self, state: tuple, sketch: bytes) -> None:
        (fit, mix), recent, self.pos, self.streak, o = state
        self.open = ScalingRegression.thawed(o)
        self.fit = LoadFit.thawed(self.decay, fit)
        self.mix = CallMix.thawed(self.decay, mix)
        self.recent = None if recent is None else np.frombuffer(recent, np.float64).reshape(-1, 3).copy()

    def _point(self, obs: Observation) -> tuple[float, float] | None:
        x = obs.others_load()
        if x is None:
            return None
        others = math.exp(x) * (obs.end_ns - obs.start_ns) / 1e9
        load, self._uncertain = self.mix.load(x, obs.count, others)
        self.mix.update(obs.count, others)
        return load, obs.mean_log_ms()

    def _residual(self, x: float, y: float) -> float:
        """y less what the baseline expects at x; NaN where it has not seen that load, or
        the load measure is in doubt (``CallMix``)."""
        lo, hi = self.fit.seen(SEEN_SD)
        if self._uncertain or not lo - self.load_margin <= x <= hi + self.load_margin:
            return math.nan
        expected = self.fit.predict(x)
        return y - expected if math.isfinite(expected) else math.nan

    def _recent_slope(self) -> tuple[float, float, float]:
        """(slope, t, x range) of the residuals on x over the recent ring."""
        pts = self.recent[~np.isnan(self.recent[:, 1])]
        if len(pts) < max(5, self.recent_windows // 2):
            return 0.0, 0.0, 0.0
        x, r = pts[:, 0], pts[:, 1]
        xc = x - x.mean()
        sxx = float((xc * xc).sum())
        if sxx <= 1e-12:
            return 0.0, 0.0, 0.0
        slope = float((xc * (r - r.mean())).sum()) / sxx
        resid = r - r.mean() - slope * xc
        se = math.sqrt(max(float((resid * resid).sum()) / (len(pts) - 2), 1e-12) / sxx)
        return slope, slope / se, float(x.max() - x.min())

    def update(self, obs: Observation) -> list[Event]:
        lw = obs.window
        if lw is None or lw.count == 0:
            return []
        point = self._point(obs)
        if point is None:
            return []
        x, y = point
        if self.fit.n < self.warmup_windows:
            self.fit.update(x, y)
            return []
        residual = self._residual(x, y)
        if self.recent is None:  # a fresh ring: all rows empty (NaN)
            self.recent = np.full((self.recent_windows, 3), np.nan)
        self.recent[self.pos % self.recent_windows] = (x, residual, y)
        self.pos += 1
        slope, t, x_range = self._recent_slope()
        if self.open is not None:
            return self._follow_open(obs, slope, t, x, y)
        # Latency that falls as load rises (slow windows complete fewer calls: latency drives
        # the load measure, not the other way) says nothing about how it scales with load.
        effective = min(self.fit.n, 1.0 / (1.0 - self.decay))
        inverse = self.fit.slope_t(effective) <= -INVERSE_T
        rising = slope > 0 and t >= self.z_threshold and x_range >= self.min_load_range and not inverse
        extra = math.exp(slope * x_range) - 1 if rising else 0.0
        self.streak = self.streak + 1 if rising and extra >= self.min_relative else 0
        self.fit.update(x, y)  # the baseline line follows slowly; only an open regression freezes it
        if self.streak < self.persist_windows:
            return []
        self.streak = 0
        first_seen = obs.version_first_seen
        version = max((v.version for v in lw.versions if v.count >= 0.05 * lw.count),
                      key=lambda v: (first_seen.get(v, 0), v))
        self.open = ScalingRegression(version=version)
        detail = {
            "baseline_slope": round(self.fit.slope, 4), "current_slope": round(self.fit.slope + slope, 4),
            "slope_increase": round(slope, 4), "statistic": "t_residual_slope", "t": round(t, 3),
            "threshold": self.z_threshold, "extra_latency_at_high_load": round(extra, 4),
            "load_range_log": round(x_range, 4), "windows": int(min(self.pos, self.recent_windows)),
            "spans": lw.count, "load_calls_per_s": round(math.exp(x), 3),
            "service_inflight": round(obs.service_inflight, 3),
            "exemplars": lw.exemplars,
            "versions": {v.version[1] or "(none)": v.count for v in lw.versions},
        }
        return [obs.event(self.event_type, "warning",
                          f"{obs.location.function} slows down with load {1 + extra:.2f}x more "
                          f"across the recent load range than its baseline did"
                          + (f" in {version[1]}" if version[1] else ""), detail, version)]

    def _follow_open(self, obs, slope, t, x, y) -> list[Event]:
        o = self.open
        o.calm = o.calm + 1 if t < 1.0 else 0
        reason = o.follow(o.calm >= self.resolve_windows, self.accept_windows)
        if reason is None:
            return []
        if reason == ACCEPTED:
            self.fit = LoadFit(self.decay)
            for px, _, py in self.recent[~np.isnan(self.recent[:, 0])]:
                self.fit.update(float(px), float(py))  # restart from the recent points
        self.recent = None  # emptied: made afresh with the next point
        return self._resolved(obs, reason, f"{obs.location.function} scales with load as before" if reason == RECOVERED
                              else f"{obs.location.function}'s new load relation accepted as its baseline", {})
