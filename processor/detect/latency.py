"""``latency_regression``: the latency distribution shifted up, at the median or in the tail."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from processor.detect.base import Observation, RegressionDetector, VersionWatches, attribution
from processor.detect.noise import QuantileNoise
from processor.detect.lifecycle import ACCEPTED, RECOVERED, Regression
from processor.detect.settings import Settings, parse_bool, positive_float, probability, setting
from processor.detect.stats import (
    BinomialCUSUM, CallMix, LoadFit, binomial_greater, exceedances, mass_above,
    rank_test_greater, shifted, wilson_lower,
)
from processor.events import Event
from processor.parsing import non_negative_float
from processor.pipeline.sketch import LogSketch, bucket_index

QUANTILES = {"p50": 0.5, "p99": 0.99, "p999": 0.999}
# The CUSUMs per version: the median twice, for a small rise (many spans needed) and for a
# large one (few spans suffice: sparse locations, gross shifts), then the tails.
WATCHES = {"p50": 0.5, "p50_gross": 0.5, "p99": 0.99, "p999": 0.999}
SEEN_SD = 2.5        # the load the baseline has seen: its mean -+ this many standard deviations (log)
LOAD_T = 4.0         # t of the load slope from which windows are compared at their load


@dataclass(frozen=True)
class LatencySettings(Settings):
    enabled: bool = setting(True, parse_bool, "watch latency at p50, p99 and p99.9")
    threshold: float = setting(12.0, positive_float,
                               "CUSUM decision interval (nats) on exceedances of the baseline's quantile")
    median_delta: float = setting(0.1, probability,
                                  "share above the baseline median that the median CUSUM tests for (0.5 + this)")
    gross_delta: float = setting(0.4, probability,
                                 "share above the baseline median that the second, fast median CUSUM tests "
                                 "for (0.5 + this): large shifts found on few spans")
    tail_ratio: float = setting(2.5, positive_float,
                                "factor on the share above the baseline's p99 / p99.9 that the tail CUSUMs test for")
    min_tail_expected: float = setting(20.0, positive_float,
                                       "baseline spans expected above a tail quantile before that tail is watched")
    min_relative: float = setting(0.15, non_negative_float, "smallest relative rise of the quantile that is reported")
    min_absolute_ms: float = setting(0.5, non_negative_float,
                                     "smallest absolute rise of the quantile (ms) that is reported")
    alpha: float = setting(1e-3, probability,
                           "significance of the confirming rank test (p50) or binomial test (tails)")
    noise_z: float = setting(3.0, non_negative_float,
                             "standard deviations of the location's own window-to-window spread of the "
                             "quantile that a rise must exceed (0: no such gate)")
    escalate_ratio: float = setting(2.0, non_negative_float,
                                    "rise over the level reported that is reported again while a "
                                    "regression is open (0: never)")
    load_margin: float = setting(0.2, non_negative_float,
                                 "how far past the load its baseline has seen (log of calls per second) a "
                                 "window is still judged; further, where latency may follow load, its "
                                 "evidence is held until the baseline has seen that load")


@dataclass(slots=True, kw_only=True)
class LatencyRegression(Regression):
    quantile: str         # the quantile named in the event (p50, p99, p999)
    q: float
    baseline_ms: float    # the baseline's value of that quantile when it opened
    bucket: int           # the sketch bucket of that value: exceedances are counted above it
    p0: float             # the baseline's share above it
    p_open: float         # the share above it that opened the regression
    sketch: bytes = b""   # the windows since it opened, packed: the baseline if it is accepted


class _Watch:
    """Evidence for one quantile of one version: a CUSUM on exceedances of the baseline's
    quantile, and the suspect segment (the windows since the CUSUM last stood at zero),
    with what the other versions did in those windows. The segment's sketch is kept packed,
    as the baseline is: no arrays per watch, and no view pinning a whole window's arrays."""

    __slots__ = ("_segment", "cusum", "hits", "others_hits", "others_trials", "trials", "windows")

    def __init__(self, threshold: float):
        self.cusum = BinomialCUSUM(threshold)
        self.reset()

    @property
    def segment(self) -> LogSketch:
        return LogSketch.unpack(self._segment)

    @segment.setter
    def segment(self, sketch: LogSketch) -> None:
        self._segment = sketch.pack()

    def reset(self) -> None:
        self.cusum.reset()
        self._segment = b""
        self.hits = self.trials = 0.0
        self.others_hits = self.others_trials = 0.0
        self.windows = 0


class _QuantileWatches:
    __slots__ = ("by_quantile", "last_seen")

    def __init__(self, threshold: float):
        self.by_quantile = {name: _Watch(threshold) for name in WATCHES}

    def reset(self) -> None:
        for w in self.by_quantile.values():
            w.reset()


class LatencyShift(RegressionDetector):
    """Latency shifted up at p50, p99 or p99.9, against a slowly decaying baseline.

    Each window, for each watched quantile q, the spans above the baseline's q-bucket are
    counted; a binomial CUSUM accumulates the evidence that their share rose from the
    baseline's ``p0`` to ``p0 + median_delta`` (median) or ``tail_ratio * p0`` (tail). When it
    crosses ``threshold`` the suspect segment is confirmed with a rank test (median) or an
    exact binomial test (tail) at ``alpha``, and must clear both effect-size gates
    (``min_relative`` and ``min_absolute_ms`` on the quantile itself). One event opens a
    regression; the baseline stays frozen until a reverse CUSUM finds the exceedance share
    back at the baseline's (a ``resolved`` event), or until ``accept_windows`` windows make
    the new level the baseline.

    Where the baseline shows latency rising with the service's load (the calls per second of
    the rest of the service, a significant slope), each window is compared after removing
    the load effect the baseline predicts at its load (``LoadFit``: a line or a parabola, to
    follow convex, queue-like curves), so a busy hour is not a regression. A window whose
    load is more than ``load_margin`` past what the baseline has seen is not judged: its
    evidence is held (not added, not cleared) and it does not enter the baseline, while the
    load fit learns that load. A rollout that calls other functions less often lowers the
    load measure at the same load; the location's own calls tell (``CallMix``).

    Parameters
    ----------
    window_s, half_life_s, warmup_windows, threshold, median_delta, gross_delta, tail_ratio,
    min_tail_expected, min_relative, min_absolute_ms, alpha, accept_windows, noise_z, escalate_ratio,
    load_margin
        See docs/detection.md.

    Examples
    --------
    >>> import numpy as np
    >>> from processor.detect.base import Observation
    >>> from processor.pipeline.location import Location
    >>> from processor.pipeline.window import LocationWindow, VersionFigures
    >>> rng = np.random.default_rng(1)
    >>> det, loc, events = LatencyShift(warmup_windows=10), Location("prod", "shop", "f"), []
    >>> for i in range(40):
    ...     factor, version = (1.5, ("shop", "2", "")) if i >= 25 else (1.0, ("shop", "1", ""))
    ...     sk = LogSketch.from_values(rng.lognormal(np.log(20e6 * factor), 0.5, 400))
    ...     lw = LocationWindow(0, loc, 400, 0, sk, [VersionFigures(version, 400, 0, sk)])
    ...     events += det.update(Observation(loc, i * 60 * 10**9, (i + 1) * 60 * 10**9, lw))
    >>> [(e.type, e.detail["quantile"], e.version[1]) for e in events]
    [('latency_regression', 'p50', '2')]

    References
    ----------
    Page (1954), CUSUM; Mann and Whitney (1947); Sentry's trend detection (EMA, CUSUM
    breakpoint, Welch t-test); Netflix Kayenta (Mann-Whitney U with an effect-size band).
    """

    name = "latency"
    Settings = LatencySettings
    event_type = "latency_regression"
    description = "Latency at this code location rose in production (p50, p99 or p99.9)."

    def __init__(self, window_s: float = 60.0, half_life_s: float = 21600.0, warmup_windows: int = 30,
                 threshold: float = 12.0, median_delta: float = 0.1, gross_delta: float = 0.4,
                 tail_ratio: float = 2.5,
                 min_tail_expected: float = 20.0, min_relative: float = 0.15,
                 min_absolute_ms: float = 0.5, alpha: float = 1e-3,
                 accept_windows: int = 120, noise_z: float = 3.0, escalate_ratio: float = 2.0, load_margin: float = 0.2):
        self.window_s, self.half_life_s, self.warmup_windows = window_s, half_life_s, warmup_windows
        self.threshold, self.median_delta, self.gross_delta, self.tail_ratio = (
            threshold, median_delta, gross_delta, tail_ratio)
        self.min_tail_expected, self.min_relative, self.min_absolute_ms = min_tail_expected, min_relative, min_absolute_ms
        self.alpha, self.accept_windows, self.escalate_ratio = alpha, accept_windows, escalate_ratio
        self.noise_z = noise_z
        self.noise = QuantileNoise(tuple(QUANTILES.values()))  # the location's own spread
        self.load_margin = load_margin
        self.decay = 0.5 ** (window_s / half_life_s)
        self._make_watches = partial(_QuantileWatches, threshold)
        self._baseline = b""  # the baseline sketch, packed (see ``baseline``)
        self.baseline_windows = 0
        self.load = LoadFit(self.decay)  # mean log latency on log load
        self.mix = CallMix(self.decay)
        self.load_ref: float | None = None  # the fit's level windows are brought to, once it is used
        self.watches: VersionWatches | None = None  # made with the first window judged
        self.open: LatencyRegression | None = None  # the regression being reported, while it lasts

    @classmethod
    def _contract(cls) -> dict:
        return {"change": ("median", 2.0), "max_stationary": 0}

    def columns(self):
        """State for many locations at once (``LatencyColumns``), which the engine keeps
        instead of a frozen state per location."""
        from processor.detect.latency_columns import LatencyColumns

        return LatencyColumns(self)

    @property
    def baseline(self) -> LogSketch:
        """The baseline sketch. Kept packed between windows (``LogSketch.pack``): one bytes
        object per location rather than two numpy arrays; this unpacks it without a copy."""
        return LogSketch.unpack(self._baseline)

    @baseline.setter
    def baseline(self, sketch: LogSketch) -> None:
        self._baseline = sketch.pack()

    def freeze(self, sketch: bytes = b"") -> tuple:
        # The baseline sketch is the location's published one (sketch) as long as nothing made
        # them differ (a load-adjusted window, an open regression, a gap, an accepted level):
        # None then, and the one object is shared again when thawed.
        watches = None
        if self.watches is not None:
            watches = (self.watches.tick, tuple(
                (version, qw.last_seen, tuple(
                    (w.cusum.statistic, w._segment, w.hits, w.trials, w.others_hits, w.others_trials, w.windows)
                    for w in qw.by_quantile.values()))
                for version, qw in self.watches.by_version.items()))
        return (None if self._baseline == sketch else self._baseline, self.baseline_windows,
                (self.load.freeze(), self.mix.freeze(), self.load_ref, self.noise.freeze()), watches,
                self.open.freeze() if self.open else None)

    def _thaw(self, state: tuple, sketch: bytes) -> None:
        baseline, self.baseline_windows, (load, mix, self.load_ref, noise), watches, o = state
        self.noise = QuantileNoise(tuple(QUANTILES.values()))
        self.noise.thaw(noise)
        self._baseline = sketch if baseline is None else baseline
        self.load = LoadFit.thawed(self.decay, load)
        self.mix = CallMix.thawed(self.decay, mix)
        self.watches = None
        if watches is not None:
            self.watches = vw = VersionWatches(self._make_watches)
            vw.tick = watches[0]
            for version, last_seen, quantiles in watches[1]:
                qw = vw.by_version[version] = self._make_watches()
                qw.last_seen = last_seen
                for w, (statistic, segment, hits, trials, others_hits, others_trials, windows) in zip(
                        qw.by_quantile.values(), quantiles):
                    w.cusum.statistic = statistic
                    w._segment = segment
                    w.hits, w.trials, w.others_hits, w.others_trials = hits, trials, others_hits, others_trials
                    w.windows = windows
        self.open = LatencyRegression.thawed(o)

    # -- helpers ----------------------------------------------------------------------------
    def _load_x(self, obs: Observation) -> tuple[float | None, bool]:
        """(this window's load: log of the rest of the service's calls per second, or what
        the location's own calls imply when a changed mix of calls lowered that; whether
        the mix may have changed unseen, ``CallMix``)."""
        x = obs.others_load()
        if x is None:
            return None, False
        others = math.exp(x) * (obs.end_ns - obs.start_ns) / 1e9
        load, uncertain = self.mix.load(x, obs.count, others)
        self.mix.update(obs.count, others)
        return load, uncertain

    def _load_adjustment(self, x: float | None, uncertain: bool = False) -> tuple[float, bool]:
        """(log-factor by which this window is expected to be slower than the baseline's
        level, whether its load is too uncertain or too far past what the baseline has seen
        to judge it)."""
        fit = self.load
        if x is None or fit.n < self.warmup_windows:
            return 0.0, False
        effective = min(fit.n, 1.0 / (1.0 - self.decay))
        lo, hi = fit.seen(SEEN_SD)
        slope = fit.slope
        if slope <= 0 or fit.slope_t(effective) < LOAD_T:
            # No load effect shown: none is assumed, unless the load went so far past what the
            # baseline saw that one its data cannot rule out would be a reportable rise.
            plausible = (max(slope, 0.0) + 2.0 * fit.slope_se(effective)) * (x - hi)
            return 0.0, x - hi > self.load_margin and plausible > 0.5 * math.log1p(self.min_relative)
        if self.load_ref is None:
            self.load_ref = fit.predict(fit.mean_x)
        # Below the load seen, latency is taken to be no lower than at the lowest load seen.
        expected = fit.predict(min(max(x, lo), hi + self.load_margin))
        if not math.isfinite(expected):  # the queue form puts saturation here
            return 0.0, True
        return expected - self.load_ref, uncertain or x - hi > self.load_margin

    def _unpacked(self, obs: Observation) -> LogSketch:
        """The baseline sketch, unpacked once per window: the engine's, when it is the same."""
        step = obs.baseline_step
        if step is not None and step[0] is self._baseline:
            return step[3]
        return self.baseline

    def _absorb(self, sketch: LogSketch, obs: Observation, baseline: LogSketch) -> None:
        # Decayed by the event time since the location's last window, as the engine decays
        # its published baseline (the step's decay), so that the two stay one sketch through
        # windows without calls; a detector fed without the engine decays by one window.
        step = obs.baseline_step
        if step is not None and step[0] is self._baseline and sketch is obs.window.sketch:
            self._baseline = step[2]  # what the line below would compute, computed once
        else:
            decay = step[1] if step is not None and step[1] is not None else self.decay
            self.baseline = baseline.scaled(decay).merge(sketch)
        self.baseline_windows += 1

    # -- the interface ----------------------------------------------------------------------
    def update(self, obs: Observation) -> list[Event]:
        lw = obs.window
        if lw is None or lw.count == 0:
            return []
        x, uncertain = self._load_x(obs)
        adjustment, beyond = self._load_adjustment(x, uncertain)
        current = shifted(lw.sketch, -adjustment)
        baseline = self._unpacked(obs)
        if self.open is None and not beyond:
            self.noise.update(current, baseline)
        if self.baseline_windows < self.warmup_windows:
            self._absorb(current, obs, baseline)
            if x is not None:
                self.load.update(x, obs.mean_log_ms())
            return []
        if beyond and self.open is None:
            # Load the baseline has not seen: held, neither evidence nor baseline, until the
            # load fit has seen it.
            self.load.update(x, obs.mean_log_ms())
            return []
        if self.open is not None:
            # Follow the version that regressed while it runs (a canary beside the old
            # version must not look recovered), the whole location once it is gone.
            vf = next((v for v in lw.versions if v.version == self.open.version and v.count), None)
            return self._follow_open(obs, shifted(vf.sketch, -adjustment) if vf else current)

        events: list[Event] = []
        tests = {}
        # q -> (bucket, baseline share above it, spans above it), shared by the median's two
        # CUSUMs; a tail once enough baseline spans are expected above it
        base_total, buckets, above = exceedances(baseline, list(QUANTILES.values()))
        at_q: dict[float, tuple] = {}
        for q, b, a in zip(QUANTILES.values(), buckets, above):
            if q <= 0.5 or base_total * (1 - q) >= self.min_tail_expected:
                at_q[q] = (b, a / base_total, mass_above(current, b))
        for name, q in WATCHES.items():
            if q not in at_q:
                continue  # too few baseline spans to know this tail yet
            b, p0, all_hits = at_q[q]
            if p0 > 0:
                if q > 0.5:
                    p1 = min(self.tail_ratio * p0, 0.5)
                else:
                    p1 = min(p0 + (self.gross_delta if name == "p50_gross" else self.median_delta), 0.999)
                tests[name] = (q, b, p0, p1, all_hits)
        if self.watches is None:
            self.watches = VersionWatches(self._make_watches)
        self.watches.next_window()
        # Each version is tested on its own spans against the location's baseline: a canary
        # serving 5% of the calls is not averaged away by the old version's 95%.
        for vf in sorted(lw.versions, key=lambda v: v.version):
            if vf.count == 0:
                continue
            vs = shifted(vf.sketch, -adjustment)
            watches = self.watches.get(vf.version).by_quantile
            hits_above: dict[int, float] = {}
            for name, (q, b, p0, p1, all_hits) in tests.items():
                w = watches[name]
                hits = all_hits if vs is current else hits_above.get(b)  # (one version: the window's own)
                if hits is None:
                    hits = hits_above[b] = mass_above(vs, b)
                w.cusum.update(hits, vf.count, p0, p1)
                if w.cusum.statistic <= 0:
                    w.reset()
                    continue
                w.segment = w.segment.merge(vs)
                w.hits += hits
                w.trials += vf.count
                w.others_hits += all_hits - hits
                w.others_trials += current.count - vf.count
                w.windows += 1
                if w.cusum.drift_detected:
                    event = self._confirm(obs, name.removesuffix("_gross"), q, b, p0, w, vf.version, adjustment)
                    if event is not None:
                        events.append(event)
                        break  # one regression at a time; the watches start afresh after it
                    w.reset()  # a real but small change: the baseline takes it in
            if events:
                break
        # Every window goes into the baseline unless it opened a regression: leaving out the
        # windows that merely looked suspicious would bias the baseline low. A change is
        # detected long before its windows weigh in a baseline with a half-life of hours.
        if not events:
            self._absorb(current, obs, baseline)
            if x is not None:
                self.load.update(x, obs.mean_log_ms())
        return events

    def _confirm(self, obs: Observation, name: str, q: float, b: int, p0: float, w: _Watch, version,
                 adjustment: float):
        baseline = self.baseline
        base_q = baseline.quantile(q) / 1e6
        segment = w.segment
        seg_q = segment.quantile(q) / 1e6
        if seg_q < base_q * (1 + self.min_relative) or seg_q - base_q < self.min_absolute_ms:
            return None
        if math.log(seg_q / base_q) < self.noise_z * self.noise.sd(list(QUANTILES).index(name)):
            return None  # within what this location's quantile does from window to window
        if q == 0.5:
            p_value, effect = rank_test_greater(segment, baseline)
            test = "mann_whitney_u"
        else:
            p_value, effect = binomial_greater(w.hits, w.trials, p0), w.hits / w.trials
            test = "binomial_exceedance"
        if p_value >= self.alpha:
            return None
        evidence = attribution(version, w.hits, w.trials, w.others_hits, w.others_trials,
                               obs.version_first_seen)
        # Name the lowest quantile that moved past both gates: a tail shift often reaches
        # p99.9's CUSUM first, but it is a p99 shift when p99 moved too.
        figures = {}
        for other, oq in QUANTILES.items():
            if oq > 0.5 and baseline.count * (1 - oq) < self.min_tail_expected:
                continue
            bq, sq = baseline.quantile(oq) / 1e6, segment.quantile(oq) / 1e6
            figures[other] = {"baseline_ms": round(bq, 6), "current_ms": round(sq, 6),
                              "ratio": round(sq / bq, 4)}
        for other, f in figures.items():
            bq, sq = f["baseline_ms"], f["current_ms"]
            if QUANTILES[other] < q and sq >= bq * (1 + self.min_relative) and sq - bq >= self.min_absolute_ms:
                name, q, base_q, seg_q = other, QUANTILES[other], bq, sq
                break
        ratio = seg_q / base_q
        lw = obs.window
        severity = "critical" if ratio >= 2 else "warning"
        where = f" in {version[1]}" if version[1] else ""
        detail = {
            "quantile": name, "baseline_ms": round(base_q, 6), "current_ms": round(seg_q, 6),
            "ratio": round(ratio, 4), "statistic": "binomial_cusum",
            "cusum": round(w.cusum.statistic, 3), "threshold": self.threshold,
            "exceedance_baseline": round(p0, 6), "exceedance_current": round(w.hits / w.trials, 6),
            "test": test, "p_value": p_value, "alpha": self.alpha, "effect": round(effect, 6),
            "spans": int(w.trials), "windows": w.windows,
            "baseline_spans": int(round(baseline.count)),
            "load_adjusted": adjustment != 0.0, "quantiles": figures,
            "exemplars": lw.exemplars, **evidence,
        }
        summary = (f"{name} of {obs.location.function} rose {ratio:.2f}x "
                   f"({base_q:.3g} ms to {seg_q:.3g} ms){where}")
        # The share that opened it, as the reverse CUSUM takes it: the low end of what the
        # segment shows, so that a few spans all above the bucket (a share of 1) do not make
        # one span below it proof of recovery.
        p_open = max(p0, wilson_lower(w.hits, w.trials, z=1.645))
        regression = LatencyRegression(version=version, quantile=name, q=q, baseline_ms=base_q, bucket=b,
                                       p0=p0, p_open=p_open)
        self.watches.reset_all()
        self.noise.discard()  # the windows that built this evidence are not the location's spread
        return self._opened(obs.event(self.event_type, severity, summary, detail, version), regression, seg_q)

    def _follow_open(self, obs: Observation, current: LogSketch) -> list[Event]:
        o = self.open
        now_q = current.quantile(o.q) / 1e6
        segment = LogSketch.unpack(o.sketch)
        since = segment.quantile(o.q) / 1e6 if segment.count else 0.0
        reference = max(o.reported, since)
        if (o.escalates(now_q, self.escalate_ratio, self.min_absolute_ms, since)
                and math.log(now_q / reference) >= self.noise_z * self.noise.sd(list(QUANTILES).index(o.quantile))):
            # Still at the level reported (or reached since), a share 1 - q of the spans lies above it.
            hits = mass_above(current, int(bucket_index(max(o.reported, since) * 1e6)))
            p_value = binomial_greater(hits, current.count, 1 - o.q)
            if p_value < self.alpha:
                reported, ratio = o.reported, now_q / o.baseline_ms
                o.sketch, o.windows = current.pack(), 0  # the new level is what may be accepted
                where = f" in {o.version[1]}" if o.version[1] else ""
                return self._escalated(
                    obs, now_q, "critical" if ratio >= 2 else "warning",
                    f"{o.quantile} of {obs.location.function} rose further, to {ratio:.2f}x its baseline "
                    f"({o.baseline_ms:.3g} ms to {now_q:.3g} ms; {reported:.3g} ms when reported){where}",
                    {"quantile": o.quantile, "baseline_ms": round(o.baseline_ms, 6), "current_ms": round(now_q, 6),
                     "ratio": round(ratio, 4), "ratio_to_reported": round(now_q / reported, 4),
                     "test": "binomial_exceedance", "p_value": p_value, "alpha": self.alpha,
                     "spans": int(current.count), "exemplars": obs.window.exemplars})
        o.sketch = segment.merge(current).pack()
        # Recovered once "back at the baseline's exceedance share" beats "still at the share
        # that opened it" by the threshold that opened it.
        hits = mass_above(current, o.bucket)
        back = o.back_at_baseline(current.count - hits, current.count, 1 - o.p_open, 1 - o.p0, self.threshold)
        reason = o.follow(back, self.accept_windows)
        if reason == RECOVERED:
            return self._resolved(obs, reason, f"{o.quantile} of {obs.location.function} is back to its baseline "
                                               f"({now_q:.3g} ms vs {o.baseline_ms:.3g} ms)",
                                  {"quantile": o.quantile, "baseline_ms": round(o.baseline_ms, 6),
                                   "current_ms": round(now_q, 6)})
        if reason == ACCEPTED:  # the new level held for long enough: it becomes the baseline
            self._baseline = o.sketch
            self.baseline_windows = self.warmup_windows
            return self._resolved(obs, reason, f"{o.quantile} of {obs.location.function} stayed at {now_q:.3g} ms; "
                                               f"accepted as the new baseline",
                                  {"quantile": o.quantile, "current_ms": round(now_q, 6)})
        return []
