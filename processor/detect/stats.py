"""Statistics the detectors share, written as small River-style estimators.

River has drift detectors for streams of single values (ADWIN, PageHinkley, KSWIN), but
not a CUSUM over binomial counts, which is what per-window aggregates give us: "x of n
spans were above the baseline's p99". These classes follow River's conventions (a
``river.base.Base`` subclass, ``update`` returning ``self``, ``drift_detected``) so they read
like River's own and can be cloned and inspected the same way.
"""

from __future__ import annotations

import math
from array import array

import numpy as np
from river import base

from processor.pipeline.sketch import LOG_GAMMA, LogSketch


class BinomialCUSUM(base.Base):
    """One-sided CUSUM for a rise of a success probability from ``p0`` to ``p1``.

    Each update adds the log-likelihood ratio of ``successes`` out of ``trials``; the
    statistic is floored at zero and signals once it exceeds ``threshold``. The expected
    delay is about ``threshold / KL(p1 || p0)`` trials (Page, 1954).

    Parameters
    ----------
    threshold
        Decision interval ``h`` in nats.

    Examples
    --------
    >>> cusum = BinomialCUSUM(threshold=10.0)
    >>> for _ in range(5):
    ...     _ = cusum.update(successes=50, trials=100, p0=0.5, p1=0.6)
    >>> cusum.drift_detected
    False
    >>> for _ in range(5):
    ...     _ = cusum.update(successes=70, trials=100, p0=0.5, p1=0.6)
    >>> cusum.drift_detected
    True

    References
    ----------
    Page, E. S. (1954). Continuous inspection schemes. Biometrika 41(1/2), 100-115.
    """

    def __init__(self, threshold: float = 12.0):
        self.threshold = threshold
        self.statistic = 0.0

    def update(self, successes: float, trials: float, p0: float, p1: float) -> "BinomialCUSUM":
        p0 = min(max(p0, 1e-9), 1 - 1e-9)
        p1 = min(max(p1, 1e-9), 1 - 1e-9)
        llr = successes * math.log(p1 / p0) + (trials - successes) * math.log((1 - p1) / (1 - p0))
        self.statistic = max(0.0, self.statistic + llr)
        return self

    @property
    def drift_detected(self) -> bool:
        return self.statistic > self.threshold

    def reset(self) -> None:
        self.statistic = 0.0


_ZERO_LOAD = array("d", bytes(21 * 8))


def _line(w: float, sx: float, sxx: float, sy: float, sxy: float) -> tuple[float, float, float]:
    """(mean x, mean y, slope) of a weighted least-squares line from its sums."""
    mx, my = sx / w, sy / w
    vx = sxx / w - mx * mx
    return mx, my, ((sxy / w - mx * my) / vx if vx > 1e-12 else 0.0)


def _exp(values: np.ndarray) -> np.ndarray:
    """``math.exp`` of each value: numpy's own exp differs from it in the last bit at times."""
    return np.fromiter(map(math.exp, values.tolist()), np.float64, len(values))


def _log(values: np.ndarray) -> np.ndarray:
    """``math.log`` of each value (as ``_exp``)."""
    return np.fromiter(map(math.log, values.tolist()), np.float64, len(values))


def _line_rows(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_line`` of each row of sums (w, sx, sxx, sy, sxy)."""
    w, sx, sxx, sy, sxy = s.T
    mx, my = sx / w, sy / w
    vx = sxx / w - mx * mx
    return mx, my, np.where(vx > 1e-12, (sxy / w - mx * my) / np.where(vx > 1e-12, vx, 1.0), 0.0)


def _forms_rows(s: np.ndarray, u: np.ndarray, big_l: np.ndarray):
    """``LoadFit._forms_at`` of many fits (rows of sums), given u = x - x0 and L = exp(u)."""
    m = len(s)
    with np.errstate(all="ignore"):
        w, su, suu, sy, suy = s[:, :5].T
        mu, my = su / w, sy / w
        vu = np.maximum(suu / w - mu * mu, 0.0)
        cuy = suy / w - mu * my
        flat = vu <= 1e-12
        power = np.where(flat, my, my + cuy / np.where(flat, 1.0, vu) * (u - mu))
        ml, mean_y, b = _line_rows(s[:, 6:11])
        level = mean_y + b * (big_l - ml)
        linear = np.full(m, np.nan)
        ok = np.flatnonzero(level > 0)
        linear[ok] = s[ok, 17] + _log(level[ok])
        ml, mean_z, b = _line_rows(s[:, 11:16])
        level = mean_z + b * (big_l - ml)
        queue = np.full(m, np.inf)
        ok = np.flatnonzero(level > 1e-9)
        queue[ok] = s[ok, 17] - _log(level[ok])
    linear[flat], queue[flat] = my[flat], my[flat]
    none = ~(w > 0)  # no weight: no forms (as _loglog's None)
    power[none] = linear[none] = queue[none] = 0.0
    return power, linear, queue


class FitRows:
    """``LoadFit``'s figures for many fits (rows of sums) at once: ``lo``, ``hi`` of
    ``seen(spread)``, ``mean_x``, ``slope``, ``se`` (``slope_se(effective)``) and ``t``
    (``slope_t(effective)``), with ``effective = min(n, 1 / (1 - decay))`` as the detectors
    take it; the same floats as each fit's own."""

    __slots__ = ("hi", "lo", "mean_x", "se", "slope", "t")

    def __init__(self, s: np.ndarray, n: np.ndarray, decay: float, spread: float):
        m = len(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            w, su, suu, sy, suy, syy = s[:, :6].T
            defined = w > 0
            mu, my = su / w, sy / w
            vu = np.maximum(suu / w - mu * mu, 0.0)
            cuy = suy / w - mu * my
            vy = syy / w - my * my
            sd = np.sqrt(vu)
            self.mean_x = s[:, 16] + np.where(defined, mu, 0.0)
            self.lo = np.where(defined, self.mean_x - spread * sd, np.inf)
            self.hi = np.where(defined, self.mean_x + spread * sd, -np.inf)
            wide = defined & (vu > 1e-12)
            self.slope = np.where(wide, cuy / np.where(wide, vu, 1.0), 0.0)
            effective = np.minimum(n, 1.0 / (1.0 - decay))
            has_se = wide & (effective > 2)
            self.se = np.full(m, np.inf)
            self.se[has_se] = np.sqrt(np.maximum(vy - cuy * cuy / vu, 1e-12)[has_se]
                                      / (vu[has_se] * (effective[has_se] - 2)))
            self.t = np.where(np.isfinite(self.se), self.slope / self.se, 0.0)


def fit_rows(s: np.ndarray, n: np.ndarray, decay: float, spread: float) -> FitRows:
    return FitRows(s, n, decay, spread)


def predict_rows(s: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``LoadFit.predict`` of each fit (row of sums) at its x."""
    u = x - s[:, 16]
    forms = np.column_stack(_forms_rows(s, u, _exp(u)))
    best = forms[np.arange(len(s)), np.argmin(s[:, 18:21], axis=1)]
    return np.where(np.isnan(best), forms[:, 0], best)


class LoadFit(base.Base):
    """Mean log latency (y) on log load (x): decayed weighted least squares in three forms,
    the one that predicts best, and the range of load they rest on.

    Latency that follows load does so in more than one way: as a power of it (a line in
    log-log, the form of the significance test, ``slope`` and ``slope_t``), in proportion to
    it (latency = a + b load), or as a queue (convex: latency = a / (1 - rho load), so
    1 / latency is a line in load). A line in log-log through the load seen so far
    underestimates a queue at higher load; the queue form overestimates a linear function
    there. The last two are fitted with weights that make their errors relative ones, as in
    log-log (a slow point weighs no more than a fast one). ``predict`` uses the form whose
    predictions of each new point, before it was added, erred least (decayed mean absolute
    error, each capped at 0.5): the one that extrapolated best. ``seen`` is the load range
    the fits rest on: the decayed mean of x, plus and minus ``spread`` standard deviations.

    Parameters
    ----------
    decay
        Factor applied to the accumulated sums before each update (1.0 keeps everything).

    Examples
    --------
    >>> import math
    >>> def queue(x):
    ...     return -math.log(1 - 0.3 * math.exp(x))
    >>> fit = LoadFit(decay=1.0)
    >>> for i in range(30):
    ...     _ = fit.update(-1 + 0.05 * i, queue(-1 + 0.05 * i))
    >>> fit.form
    'queue'
    >>> [(round(queue(x), 3), round(fit.predict(x), 3)) for x in (0.2, 0.7, 1.1)]  # seen, then beyond
    [(0.456, 0.456), (0.927, 0.927), (2.315, 2.315)]
    >>> [round(v, 3) for v in fit.seen(2.0)]
    [-1.141, 0.591]
    """

    FORMS = ("power", "linear", "queue")

    def __init__(self, decay: float = 1.0):
        self.decay = decay
        # Around (x0, y0), the first point: u = x - x0, L = exp(u), Y = exp(y - y0).
        # log-log: w, u, uu, y, uy, yy; latency = a + b L, weights 1 / Y^2: a, aL, aLL, aY, aLY;
        # 1 / latency = a - b L, weights Y^2: a, aL, aLL, a/Y, aL/Y; x0, y0; then each form's
        # decayed absolute error of prediction. One float64 array per location.
        self.sums = array("d", _ZERO_LOAD)
        self.n = 0
        self._moments = self._at = None  # caches, until the next update

    def freeze(self) -> tuple[bytes, int]:
        """The state as plain values (see ``Detector.freeze``)."""
        return self.sums.tobytes(), self.n

    @classmethod
    def thawed(cls, decay: float, state: tuple[bytes, int]) -> "LoadFit":
        fit = cls.__new__(cls)
        fit.decay = decay
        fit.sums = array("d")
        fit.sums.frombytes(state[0])
        fit.n = state[1]
        fit._moments = fit._at = None
        return fit

    def update(self, x: float, y: float, weight: float = 1.0) -> "LoadFit":
        sums, decay = self.sums, self.decay
        if self.n == 0:
            sums[16], sums[17] = x, y
        u = x - sums[16]
        big_l, big_y = math.exp(u), math.exp(y - sums[17])
        a = b = big_y  # the level that sets the weights: as predicted, once there are predictions
        if self.n >= 3:
            forms = self._forms(x)
            for i, p in enumerate(forms):
                e = 0.5 if math.isnan(p) else min(abs(y - p), 0.5)  # robust: a miss counts, not its size
                sums[18 + i] = sums[18 + i] * decay + weight * e
            if abs(forms[1] - y) < 2.0:
                a = math.exp(forms[1] - sums[17])
            if abs(forms[2] - y) < 2.0:
                b = math.exp(forms[2] - sums[17])
        # Weights that make each form's errors relative (as y's), by the predicted level: a
        # slower point than expected weighs no more than one as expected.
        a, b = weight / (a * a), weight * b * b
        for i, v in enumerate((weight, weight * u, weight * u * u, weight * y, weight * u * y, weight * y * y,
                               a, a * big_l, a * big_l * big_l, a * big_y, a * big_l * big_y,
                               b, b * big_l, b * big_l * big_l, b / big_y, b * big_l / big_y)):
            sums[i] = sums[i] * decay + v
        self.n += 1
        self._moments = self._at = None
        return self

    @staticmethod
    def update_rows(sums: np.ndarray, n: np.ndarray, x: np.ndarray, y: np.ndarray, weight: np.ndarray,
                    decay: float) -> None:
        """``update`` of many fits at once, in place: row i of ``sums`` (float64, 21 columns)
        and ``n`` (points so far; incremented) are fit i's, ``x``, ``y``, ``weight`` its point.
        The same floats as ``update`` one by one: the same operations in the same order, and
        ``math``'s exp and log, which numpy's do not always equal in the last bit."""
        first = n == 0
        sums[first, 16], sums[first, 17] = x[first], y[first]
        u = x - sums[:, 16]
        big_l, big_y = _exp(u), _exp(y - sums[:, 17])
        a, b = big_y.copy(), big_y.copy()
        k = np.flatnonzero(n >= 3)
        if len(k):
            yk, wk = y[k], weight[k]
            forms = _forms_rows(sums[k], u[k], big_l[k])
            for i, f in enumerate(forms):
                e = np.where(np.isnan(f), 0.5, np.minimum(np.abs(yk - f), 0.5))
                sums[k, 18 + i] = sums[k, 18 + i] * decay + wk * e
            for level, i in ((a, 1), (b, 2)):
                near = np.flatnonzero(np.abs(forms[i] - yk) < 2.0)
                level[k[near]] = _exp(forms[i][near] - sums[k[near], 17])
        a, b = weight / (a * a), weight * b * b
        values = (weight, weight * u, weight * u * u, weight * y, weight * u * y, weight * y * y,
                  a, a * big_l, a * big_l * big_l, a * big_y, a * big_l * big_y,
                  b, b * big_l, b * big_l * big_l, b / big_y, b * big_l / big_y)
        for i, v in enumerate(values):
            sums[:, i] = sums[:, i] * decay + v
        n += 1

    def _loglog(self):
        """(w, mean u, mean y, var u, cov(u, y), var y), or None."""
        if self._moments is None:
            w, su, suu, sy, suy, syy = self.sums[:6].tolist()
            if w <= 0:
                return None
            mu, my = su / w, sy / w
            self._moments = w, mu, my, max(suu / w - mu * mu, 0.0), suy / w - mu * my, syy / w - my * my
        return self._moments

    @property
    def slope(self) -> float:
        """Slope of the log-log line."""
        c = self._loglog()
        return c[4] / c[3] if c and c[3] > 1e-12 else 0.0

    @property
    def mean_x(self) -> float:
        c = self._loglog()
        return self.sums[16] + (c[1] if c else 0.0)

    def slope_se(self, effective_n: float) -> float:
        """Standard error of the log-log line's slope (infinite without spread in x)."""
        c = self._loglog()
        if c is None or c[3] <= 1e-12 or effective_n <= 2:
            return math.inf
        _, _, _, vu, cuy, vy = c
        return math.sqrt(max(vy - cuy * cuy / vu, 1e-12) / (vu * (effective_n - 2)))

    def slope_t(self, effective_n: float) -> float:
        """t statistic of the log-log line's slope, with ``effective_n`` independent points."""
        se = self.slope_se(effective_n)
        return self.slope / se if math.isfinite(se) else 0.0

    def seen(self, spread: float) -> tuple[float, float]:
        """The load range the fits rest on: mean x -+ ``spread`` standard deviations."""
        c = self._loglog()
        if c is None:
            return math.inf, -math.inf
        mean, sd = self.sums[16] + c[1], math.sqrt(c[3])
        return mean - spread * sd, mean + spread * sd

    @property
    def form(self) -> str:
        """The form that has predicted best: "power", "linear" or "queue"."""
        errors = self.sums[18:21].tolist()
        return self.FORMS[errors.index(min(errors))]

    def _forms(self, x: float) -> tuple[float, float, float]:
        """Each form's expected y at x (NaN where it has none; infinite where the queue form
        puts saturation)."""
        if self._at is not None and self._at[0] == x:
            return self._at[1]
        forms = self._forms_at(x)
        self._at = (x, forms)
        return forms

    def _forms_at(self, x: float) -> tuple[float, float, float]:
        c = self._loglog()
        if c is None:
            return 0.0, 0.0, 0.0
        s = self.sums
        _, mu, my, vu, cuy, _ = c
        u = x - s[16]
        if vu <= 1e-12:
            return my, my, my
        power = my + cuy / vu * (u - mu)
        big_l = math.exp(u)
        ml, mean_y, b = _line(*s[6:11])     # latency = a + b load
        level = mean_y + b * (big_l - ml)
        linear = s[17] + math.log(level) if level > 0 else math.nan
        ml, mean_z, b = _line(*s[11:16])    # 1 / latency = a - b load
        level = mean_z + b * (big_l - ml)
        queue = s[17] - math.log(level) if level > 1e-9 else math.inf
        return power, linear, queue

    def predict(self, x: float) -> float:
        """Expected y at x by the form that has predicted best (infinite where the queue form,
        chosen, puts saturation)."""
        forms = self._forms(x)
        p = forms[self.FORMS.index(self.form)]
        return forms[0] if math.isnan(p) else p


class CallMix(base.Base):
    """A location's own calls as a second measure of its service's load.

    The load measure is the rest of the service's calls; a rollout that calls other
    functions less often (a cache, a removed N+1 query, a function gone) lowers it with no
    change in load. While only load moves, the location's own calls keep their ratio to the
    rest's: this keeps d = log(others / own) as a slow decayed mean (the usual mix; it stands
    still while the rest falls short of it) and a fast one (the last few windows). When the
    rest's calls fall short of the usual mix by more than ``floor`` (log), in the fast mean
    or already in this window beyond ``z`` times its Poisson noise, ``load`` gives the load
    the own calls imply instead: a changed mix is not taken for lighter load. A window that
    falls short by more than ``floor`` but within its noise is uncertain. (The other way,
    the rest called more often, is taken as load: latency is then expected higher, not
    lower, than it is.)

    >>> mix = CallMix(decay=0.999)
    >>> for _ in range(60):
    ...     _ = mix.update(own=600, others=6000)
    >>> mix.load(4.6, own=600, others=6000)
    (4.6, False)
    >>> others = 6000 * math.exp(-0.3)  # a rollout calls the rest 26% less often, at the same load
    >>> [round(mix.load(4.3, own=600, others=others)[0], 3) for _ in range(3) if mix.update(600, others)]
    [4.6, 4.6, 4.6]
    """

    def __init__(self, decay: float = 1.0, fast: float = 0.5 ** 0.5, floor: float = 0.1,
                 z: float = 3.0, min_calls: float = 20.0):
        self.decay, self.fast, self.floor, self.z, self.min_calls = decay, fast, floor, z, min_calls
        self.sums = (0.0, 0.0, 0.0, 0.0)  # slow w, slow w d, fast w, fast w d

    def freeze(self) -> tuple[float, float, float, float]:
        return self.sums

    @classmethod
    def thawed(cls, decay: float, state: tuple[float, float, float, float]) -> "CallMix":
        mix = cls(decay)
        mix.sums = tuple(state)
        return mix

    def _short(self) -> float:
        """How far the rest's calls fall short of the usual mix in the fast mean (log)."""
        w, wd, fw, fwd = self.sums
        return wd / w - fwd / fw if w >= 5.0 and fw >= 2.0 else 0.0

    def load(self, x: float, own: float, others: float) -> tuple[float, bool]:
        """(the load measure ``x``, log of the rest's calls per second, or the one the own
        calls imply when the rest's fell short of it; whether this window may have fallen
        short without showing it beyond its noise). ``own``, ``others``: this window's
        counts, before ``update``."""
        short = self._short()
        if short <= self.floor:
            short = 0.0
        w, wd = self.sums[:2]
        uncertain = False
        if w >= 5.0 and own >= self.min_calls and others >= 1.0:
            now = wd / w - math.log(others / own)
            if now > self.floor:
                if now > self.z * math.sqrt(1.0 / own + 1.0 / others):
                    short = max(short, now)
                else:
                    uncertain = short == 0.0
        return x + short, uncertain

    def load_update_rows(self, sums: np.ndarray, x: np.ndarray, has_x: np.ndarray, own: np.ndarray,
                         span: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``load`` then ``update`` for many locations at once (rows of ``sums``, this one's
        parameters): ``x`` their load measures (where ``has_x``), ``own`` their calls, ``span``
        their windows' lengths (ns). Returns the loads, whether uncertain, and the new sums:
        the same floats as one location at a time."""
        m = len(x)
        w, wd, fw, fwd = sums.T
        ownf = own.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            others = np.full(m, np.nan)
            others[has_x] = _exp(x[has_x]) * span[has_x] / 1e9
            ratio = others / ownf
            noise = self.z * np.sqrt(1.0 / ownf + 1.0 / others)
            short = np.where((w >= 5.0) & (fw >= 2.0), wd / w - fwd / fw, 0.0)  # _short
            # load: the own calls' view where the rest's calls fell short of the usual mix
            held = np.where(short <= self.floor, 0.0, short)
            sure = has_x & (w >= 5.0) & (own >= self.min_calls) & (others >= 1.0)
            now = np.full(m, np.nan)
            now[sure] = wd[sure] / w[sure] - _log(ratio[sure])
            over = sure & (now > self.floor)
            beyond_noise = over & (now > noise)
            load = x + np.where(beyond_noise & (now > held), now, held)  # max(held, now)
            uncertain = over & ~beyond_noise & (held == 0.0)
            # update
            counted = has_x & (own >= self.min_calls) & (others >= 1.0)
            d = np.full(m, np.nan)
            d[counted] = _log(ratio[counted])
            usual = (w < 5.0) | ((wd / w - d <= np.maximum(self.floor, noise)) & (short <= self.floor / 2))
        grow = counted & usual
        new = sums.copy()
        new[grow, 0] = w[grow] * self.decay + 1.0
        new[grow, 1] = wd[grow] * self.decay + d[grow]
        new[counted, 2] = fw[counted] * self.fast + 1.0
        new[counted, 3] = fwd[counted] * self.fast + d[counted]
        return np.where(has_x, load, np.nan), uncertain, new

    def update(self, own: float, others: float) -> "CallMix":
        """Add a window's counts: the location's own calls and the rest of the service's."""
        if own >= self.min_calls and others >= 1.0:
            d = math.log(others / own)
            w, wd, fw, fwd = self.sums
            noise = self.z * math.sqrt(1.0 / own + 1.0 / others)
            if w < 5.0 or wd / w - d <= max(self.floor, noise) and self._short() <= self.floor / 2:
                w, wd = w * self.decay + 1.0, wd * self.decay + d  # the usual mix, while it holds
            self.sums = (w, wd, fw * self.fast + 1.0, fwd * self.fast + d)
        return self


def mass_above(sketch: LogSketch, bucket: int) -> float:
    """Count of a sketch strictly above a bucket index."""
    return float(sketch.counts[sketch.index > bucket].sum())


def exceedances(sketch: LogSketch, qs: list[float]) -> tuple[float, list[int], list[float]]:
    """(the sketch's total, the bucket holding each quantile of ``qs`` as ``LogSketch.quantiles``
    finds it, the count above each such bucket), all from one running sum, so that many
    sketches' figures can be had at once as the same floats (``LatencyColumns``).

    >>> exceedances(LogSketch(np.array([3, 5, 9], np.int32), np.array([2.0, 5.0, 3.0])), [0.5, 0.9])
    (10.0, [5, 9], [3.0, 0.0])
    """
    cum = np.cumsum(sketch.counts)
    if not len(cum):
        return 0.0, [], []
    total = float(cum[-1])
    pos = np.minimum(np.searchsorted(cum, [math.floor(q * (total - 1)) for q in qs], side="right"), len(cum) - 1)
    return total, sketch.index[pos].tolist(), (total - cum[pos]).tolist()


def shifted(sketch: LogSketch, log_factor: float) -> LogSketch:
    """The sketch of every value multiplied by ``exp(log_factor)`` (an index offset)."""
    offset = int(round(log_factor / LOG_GAMMA))
    if offset == 0:
        return sketch
    return LogSketch(sketch.index + np.int32(offset), sketch.counts)


def mean_log_ms(sketch: LogSketch) -> float:
    """Mean of log(latency in ms) over a sketch."""
    total = sketch.counts.sum()
    if total <= 0:
        return float("nan")
    return float((sketch.counts * (sketch.index * LOG_GAMMA - math.log(1e6))).sum() / total)


def mean_log_rows(sketches: list[LogSketch]) -> np.ndarray:
    """``mean_log_ms`` of each sketch, the same floats: sketches of as many buckets are
    summed together, a row each, which numpy sums as it sums one sketch alone (pairwise,
    over that length).

    >>> sks = [LogSketch.from_values(np.array(v)) for v in ([1e6, 3e6], [2e6] * 5, [5e5, 1e7, 2e8])]
    >>> mean_log_rows(sks).tolist() == [mean_log_ms(sk) for sk in sks]
    True
    """
    out = np.full(len(sketches), np.nan)
    sizes = np.fromiter((len(sk.index) for sk in sketches), np.int64, len(sketches))
    shift = math.log(1e6)
    for n in np.unique(sizes[sizes > 0]).tolist():
        rows = np.flatnonzero(sizes == n).tolist()
        index = np.array([sketches[k].index for k in rows])
        counts = np.array([sketches[k].counts for k in rows])
        total = counts.sum(axis=1)
        mean = (counts * (index * LOG_GAMMA - shift)).sum(axis=1) / total
        out[rows] = np.where(total > 0, mean, np.nan)
    return out


def rank_test_greater(current: LogSketch, baseline: LogSketch) -> tuple[float, float]:
    """Mann-Whitney U from two histograms: one-sided p that ``current`` is stochastically
    greater than ``baseline``, with the tie correction (a bucket is a tie group).
    Returns (p_value, common-language effect size P(current > baseline) + ties/2)."""
    n1, n2 = current.counts.sum(), baseline.counts.sum()
    if n1 <= 0 or n2 <= 0:
        return 1.0, 0.5
    idx = np.union1d(current.index, baseline.index)
    c1 = np.zeros(len(idx))
    c2 = np.zeros(len(idx))
    c1[np.searchsorted(idx, current.index)] = current.counts
    c2[np.searchsorted(idx, baseline.index)] = baseline.counts
    below2 = np.cumsum(c2) - c2
    u1 = float((c1 * (below2 + c2 / 2)).sum())  # pairs where current > baseline, ties half
    t = c1 + c2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - float((t ** 3 - t).sum()) / (n * (n - 1)))
    if var <= 0:
        return 1.0, u1 / (n1 * n2)
    z = (u1 - n1 * n2 / 2 - 0.5) / math.sqrt(var)
    from scipy import stats as sps  # loaded on first use: 70 MB that receiver processes never need

    return float(sps.norm.sf(z)), u1 / (n1 * n2)


def binomial_greater(successes: float, trials: float, p0: float) -> float:
    """One-sided p-value of seeing at least ``successes`` of ``trials`` at rate ``p0``."""
    if trials <= 0:
        return 1.0
    k = int(round(successes))
    from scipy import stats as sps

    return float(sps.binom.sf(k - 1, int(round(trials)), min(max(p0, 1e-12), 1.0)))


def wilson_rows(successes: np.ndarray, trials: np.ndarray, z: float) -> np.ndarray:
    """``wilson_lower`` of each (where trials > 0; 0.0 elsewhere)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = successes / trials
        p = np.where(0.0 > p, 0.0, p)
        p = np.where(1.0 < p, 1.0, p)
        z2 = z * z
        centre = p + z2 / (2 * trials)
        spread = z * np.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
        low = (centre - spread) / (1 + z2 / trials)
    return np.where((trials > 0) & (low > 0.0), low, 0.0)


def binomial_llr(successes: np.ndarray, trials: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """``BinomialCUSUM.update``'s log-likelihood ratio of each (``math``'s log)."""
    a = np.minimum(np.maximum(p0, 1e-9), 1 - 1e-9)
    b = np.minimum(np.maximum(p1, 1e-9), 1 - 1e-9)
    return successes * _log(b / a) + (trials - successes) * _log((1 - b) / (1 - a))


def two_proportion_z(x1: float, n1: float, x2: float, n2: float) -> float:
    """z of the first share exceeding the second (pooled); 0 when undefined."""
    if n1 <= 0 or n2 <= 0:
        return 0.0
    p = (x1 + x2) / (n1 + n2)
    var = p * (1 - p) * (1 / n1 + 1 / n2)
    return (x1 / n1 - x2 / n2) / math.sqrt(var) if var > 0 else 0.0


def wilson_lower(successes: float, trials: float, z: float = 1.645) -> float:
    """Lower end of Wilson's score interval for a share (one-sided 95% by default).

    >>> round(wilson_lower(1, 10), 4), round(wilson_lower(50, 1000), 4), wilson_lower(0, 10)
    (0.0226, 0.0398, 0.0)
    """
    if trials <= 0:
        return 0.0
    p = min(max(successes / trials, 0.0), 1.0)
    z2 = z * z
    centre = p + z2 / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, (centre - spread) / (1 + z2 / trials))
