"""``error_regression``: the share of spans with status ERROR rose."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from processor.detect.base import Observation, RegressionDetector, VersionWatches, attribution
from processor.detect.lifecycle import ACCEPTED, Regression
from processor.detect.settings import Settings, parse_bool, positive_float, probability, setting
from processor.detect.stats import BinomialCUSUM, binomial_greater, wilson_lower
from processor.events import Event
from processor.parsing import non_negative_float


@dataclass(frozen=True)
class ErrorsSettings(Settings):
    enabled: bool = setting(True, parse_bool, "watch the share of spans with status ERROR")
    threshold: float = setting(12.0, positive_float, "CUSUM decision interval (nats) on error counts")
    ratio: float = setting(3.0, positive_float, "rise of the error share the CUSUM tests for")
    prior_share: float = setting(0.001, probability, "error share assumed before a location has shown its own")
    prior_spans: float = setting(2000.0, positive_float, "weight of that assumption, in spans")
    min_ratio: float = setting(1.5, positive_float, "smallest relative rise of the error share that is reported")
    min_absolute: float = setting(0.001, non_negative_float,
                                  "smallest absolute rise of the error share that is reported")
    alpha: float = setting(1e-3, probability, "significance of the confirming binomial test")
    escalate_ratio: float = setting(2.0, non_negative_float,
                                    "rise over the share reported that is reported again while a "
                                    "regression is open (0: never)")


@dataclass(slots=True, kw_only=True)
class ErrorRegression(Regression):
    baseline: float       # the baseline share when it opened
    current: float        # the share that opened it
    errors: float = 0.0   # errors and spans since it opened: the baseline if it is accepted
    spans: float = 0.0


class _Watch:
    """One version's evidence: its CUSUM, its errors and spans since the CUSUM left zero,
    and the other versions' in the same windows."""

    __slots__ = ("cusum", "errors", "last_seen", "others_errors", "others_spans", "spans", "windows")

    def __init__(self, threshold: float):
        self.cusum = BinomialCUSUM(threshold)
        self.reset()

    def reset(self) -> None:
        self.cusum.reset()
        self.errors = self.spans = self.others_errors = self.others_spans = 0.0
        self.windows = 0


class ErrorRateShift(RegressionDetector):
    """The error share rose, judged on binomial evidence accumulated over windows.

    The baseline share ``p0`` is a decayed count of errors over spans, shrunk towards
    ``prior_share`` by ``prior_spans`` pseudo-spans so that a location with few spans
    does not start from zero. A binomial CUSUM tests ``p0`` against ``ratio * p0``; when
    it crosses ``threshold`` the segment must pass an exact binomial test at ``alpha``,
    rise at least ``min_ratio`` times and by ``min_absolute`` in share.

    Examples
    --------
    >>> from processor.detect.base import Observation
    >>> from processor.pipeline.location import Location
    >>> from processor.pipeline.sketch import LogSketch
    >>> from processor.pipeline.window import LocationWindow, VersionFigures
    >>> det, loc, events = ErrorRateShift(warmup_windows=10), Location("prod", "shop", "f"), []
    >>> for i in range(60):
    ...     errors, version = (10, ("shop", "2", "")) if i >= 30 else (i % 3 == 0, ("shop", "1", ""))
    ...     lw = LocationWindow(0, loc, 1000, int(errors), LogSketch(),
    ...                         [VersionFigures(version, 1000, int(errors), LogSketch())])
    ...     events += det.update(Observation(loc, i * 60 * 10**9, (i + 1) * 60 * 10**9, lw))
    >>> [(e.type, e.version[1], e.window_start_ns // (60 * 10**9)) for e in events]
    [('error_regression', '2', 31)]
    """

    name = "errors"
    Settings = ErrorsSettings
    event_type = "error_regression"
    description = "The share of calls ending in an error rose in production."

    def __init__(self, window_s: float = 60.0, half_life_s: float = 21600.0, warmup_windows: int = 30,
                 threshold: float = 12.0, ratio: float = 3.0, prior_share: float = 0.001,
                 prior_spans: float = 2000.0, min_ratio: float = 1.5, min_absolute: float = 0.001,
                 alpha: float = 1e-3, accept_windows: int = 120, escalate_ratio: float = 2.0):
        self.window_s, self.half_life_s, self.warmup_windows = window_s, half_life_s, warmup_windows
        self.threshold, self.ratio, self.prior_share, self.prior_spans = threshold, ratio, prior_share, prior_spans
        self.min_ratio, self.min_absolute, self.alpha, self.accept_windows = min_ratio, min_absolute, alpha, accept_windows
        self.escalate_ratio = escalate_ratio
        self.decay = 0.5 ** (window_s / half_life_s)
        self._make_watch = partial(_Watch, threshold)
        self.errors = 0.0
        self.spans = 0.0
        self.windows = 0
        self.watches: VersionWatches | None = None  # made with the first window judged
        self.open: ErrorRegression | None = None

    @classmethod
    def _contract(cls) -> dict:
        return {"change": ("errors", 20.0), "max_stationary": 0}

    def columns(self):
        """State for many locations at once (``ErrorColumns``), which the engine keeps
        instead of a frozen state per location."""
        from processor.detect.errors_columns import ErrorColumns

        return ErrorColumns(self)

    def freeze(self, sketch: bytes = b"") -> tuple:
        watches = None
        if self.watches is not None:
            watches = (self.watches.tick, tuple(
                (version, w.last_seen, w.cusum.statistic, w.errors, w.spans, w.others_errors, w.others_spans,
                 w.windows) for version, w in self.watches.by_version.items()))
        return self.errors, self.spans, self.windows, watches, self.open.freeze() if self.open else None

    def _thaw(self, state: tuple, sketch: bytes) -> None:
        self.errors, self.spans, self.windows, watches, o = state
        self.watches = None
        if watches is not None:
            self.watches = vw = VersionWatches(self._make_watch)
            vw.tick = watches[0]
            for version, last_seen, statistic, errors, spans, others_errors, others_spans, windows in watches[1]:
                w = vw.by_version[version] = self._make_watch()
                w.last_seen = last_seen
                w.cusum.statistic = statistic
                w.errors, w.spans, w.others_errors, w.others_spans, w.windows = (
                    errors, spans, others_errors, others_spans, windows)
        self.open = ErrorRegression.thawed(o)

    @property
    def p0(self) -> float:
        # The prior only lifts a share: it keeps a location that showed few or no errors
        # from a baseline near zero, where a single error would be a rise. Pulling a share
        # the location has shown down towards it would make every location that steadily
        # fails more often than the prior look like a regression once warm-up ends; so the
        # baseline is at least the low end of what its own spans show (Wilson's lower
        # bound at one standard error), which for few spans stays low (1 error in 10
        # spans: 3.9%, not 10%). One standard error, not 1.645: on generated stationary
        # shares the lower bound of 1.645 raised a false event in 100 locations, this none.
        shrunk = (self.errors + self.prior_share * self.prior_spans) / (self.spans + self.prior_spans)
        return max(shrunk, wilson_lower(self.errors, self.spans, z=1.0)) if self.spans else shrunk

    def _absorb(self, errors: float, spans: float) -> None:
        self.errors = self.errors * self.decay + errors
        self.spans = self.spans * self.decay + spans
        self.windows += 1

    def update(self, obs: Observation) -> list[Event]:
        lw = obs.window
        if lw is None or lw.count == 0:
            return []
        if self.windows < self.warmup_windows:
            self._absorb(lw.errors, lw.count)
            return []
        if self.open is not None:
            return self._follow_open(obs)
        p0 = self.p0
        # Suspicious windows go into the baseline too (leaving them out biases it low); only
        # an open regression freezes it.
        self._absorb(lw.errors, lw.count)
        if self.watches is None:
            self.watches = VersionWatches(self._make_watch)
        self.watches.next_window()
        # Each version is judged on its own spans: a canary is not averaged away.
        for vf in sorted(lw.versions, key=lambda v: v.version):
            if vf.count == 0:
                continue
            w = self.watches.get(vf.version)
            w.cusum.update(vf.errors, vf.count, p0, min(self.ratio * p0, 0.9))
            if w.cusum.statistic <= 0:
                w.reset()
                continue
            w.errors += vf.errors
            w.spans += vf.count
            w.others_errors += lw.errors - vf.errors
            w.others_spans += lw.count - vf.count
            w.windows += 1
            if w.cusum.drift_detected:
                event = self._confirm(obs, p0, w, vf.version)
                if event is not None:
                    return [event]
                w.reset()  # real but small: the baseline takes it in
        return []

    def _confirm(self, obs: Observation, p0: float, w: _Watch, v) -> Event | None:
        share = w.errors / w.spans
        p_value = binomial_greater(w.errors, w.spans, p0)
        if share < p0 * self.min_ratio or share - p0 < self.min_absolute or p_value >= self.alpha:
            return None
        detail = {
            "baseline_share": round(p0, 6), "current_share": round(share, 6),
            "ratio": round(share / p0, 4), "statistic": "binomial_cusum",
            "cusum": round(w.cusum.statistic, 3), "threshold": self.threshold,
            "test": "binomial", "p_value": p_value, "alpha": self.alpha,
            "errors": int(w.errors), "spans": int(w.spans), "windows": w.windows,
            "exemplars": obs.window.exemplars,
            **attribution(v, w.errors, w.spans, w.others_errors, w.others_spans, obs.version_first_seen),
        }
        # the low end of the share, for the reverse CUSUM (see LatencyShift)
        regression = ErrorRegression(version=v, baseline=p0, current=max(p0, wilson_lower(w.errors, w.spans, z=1.645)))
        self.watches.reset_all()
        severity = "critical" if share >= 0.05 or share / p0 >= 10 else "warning"
        where = f" in {v[1]}" if v[1] else ""
        return self._opened(obs.event(self.event_type, severity,
                                      f"error share of {obs.location.function} rose {share / p0:.1f}x "
                                      f"({p0:.2%} to {share:.2%}){where}", detail, v),
                            regression, share)

    def _follow_open(self, obs: Observation) -> list[Event]:
        """Recovered once the evidence for "back at the baseline share" beats "still at the
        regressed share" by the same CUSUM threshold that opened it."""
        o, lw = self.open, obs.window
        # the version that regressed while it runs, the whole location once it is gone
        vf = next((v for v in lw.versions if v.version == o.version and v.count), None)
        errors, count = (vf.errors, vf.count) if vf else (lw.errors, lw.count)
        share = errors / count
        since = o.errors / o.spans if o.spans else 0.0
        if o.escalates(share, self.escalate_ratio, self.min_absolute, since):
            p_value = binomial_greater(errors, count, max(o.reported, since))
            if p_value < self.alpha:
                reported = o.reported
                o.errors, o.spans, o.windows = float(errors), float(count), 0  # what may be accepted
                where = f" in {o.version[1]}" if o.version[1] else ""
                return self._escalated(
                    obs, share, "critical",
                    f"error share of {obs.location.function} rose further, to {share / o.baseline:.1f}x its "
                    f"baseline ({o.baseline:.2%} to {share:.2%}; {reported:.2%} when reported){where}",
                    {"baseline_share": round(o.baseline, 6), "current_share": round(share, 6),
                     "ratio": round(share / o.baseline, 4), "ratio_to_reported": round(share / reported, 4),
                     "test": "binomial", "p_value": p_value, "alpha": self.alpha, "errors": int(errors),
                     "spans": int(count), "exemplars": lw.exemplars})
        o.errors += errors
        o.spans += count
        back = o.back_at_baseline(count - errors, count, 1 - o.current, 1 - o.baseline, self.threshold)
        reason = o.follow(back, self.accept_windows)
        if reason is None:
            return []
        if reason == ACCEPTED:
            self.errors, self.spans = o.errors, o.spans
        now = errors / count
        share = o.errors / o.spans if o.spans else 0.0
        return self._resolved(obs, reason, f"error share of {obs.location.function} "
                              + (f"is back to its baseline ({now:.2%} vs {o.baseline:.2%})" if reason != ACCEPTED
                                 else f"stayed at {share:.2%}; accepted as the new baseline"),
                              {"baseline_share": round(o.baseline, 6), "open_share": round(share, 6),
                               "current_share": round(now, 6)})
