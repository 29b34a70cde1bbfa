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


_ZERO_SUMS = array("d", bytes(6 * 8))


class DecayedLinearFit(base.Base):
    """Weighted least squares of y on x whose past weights decay by ``decay`` per update.

    Parameters
    ----------
    decay
        Factor applied to the accumulated sums before each update (1.0 keeps everything).

    Examples
    --------
    >>> fit = DecayedLinearFit(decay=1.0)
    >>> for x in range(10):
    ...     _ = fit.update(x, 2.0 + 0.5 * x, weight=1.0)
    >>> round(fit.slope, 6), round(fit.intercept, 6)
    (0.5, 2.0)
    """

    def __init__(self, decay: float = 1.0):
        self.decay = decay
        # w, wx, wy, wxx, wxy, wyy: a plain float64 array (one per location, so not numpy's
        # larger array object); each sum is decayed, then added to, in float64 as numpy would.
        self.sums = array("d", _ZERO_SUMS)
        self.n = 0

    def freeze(self) -> tuple[bytes, int]:
        """The state as plain values (see ``Detector.freeze``)."""
        return self.sums.tobytes(), self.n

    @classmethod
    def thawed(cls, decay: float, state: tuple[bytes, int]) -> "DecayedLinearFit":
        fit = cls.__new__(cls)
        fit.decay = decay
        fit.sums = array("d")
        fit.sums.frombytes(state[0])
        fit.n = state[1]
        return fit

    def update(self, x: float, y: float, weight: float = 1.0) -> "DecayedLinearFit":
        sums, decay = self.sums, self.decay
        for i, v in enumerate((1.0, x, y, x * x, x * y, y * y)):
            sums[i] = sums[i] * decay + weight * v
        self.n += 1
        return self

    @property
    def _moments(self):
        w, wx, wy, wxx, wxy, wyy = self.sums.tolist()
        if w <= 0:
            return 0.0, 0.0, 0.0, 0.0, 0.0
        mx, my = wx / w, wy / w
        return w, mx, my, wxx / w - mx * mx, wxy / w - mx * my

    @property
    def slope(self) -> float:
        _, _, _, vx, cxy = self._moments
        return cxy / vx if vx > 1e-12 else 0.0

    @property
    def intercept(self) -> float:
        _, mx, my, _, _ = self._moments
        return my - self.slope * mx

    @property
    def mean_x(self) -> float:
        return self._moments[1]

    def slope_t(self, effective_n: float) -> float:
        """t statistic of the slope, with ``effective_n`` independent points."""
        w, mx, my, vx, cxy = self._moments
        if w <= 0 or vx <= 1e-12 or effective_n <= 2:
            return 0.0
        vy = self.sums[5] / w - my * my
        resid = max(vy - cxy * cxy / vx, 1e-12)
        se = math.sqrt(resid / (vx * (effective_n - 2)))
        return self.slope / se


def mass_above(sketch: LogSketch, bucket: int) -> float:
    """Count of a sketch strictly above a bucket index."""
    return float(sketch.counts[sketch.index > bucket].sum())


def quantile_bucket(sketch: LogSketch, q: float) -> int:
    """Bucket index holding quantile ``q`` (see ``LogSketch.quantiles``)."""
    cum = np.cumsum(sketch.counts)
    rank = math.floor(q * (cum[-1] - 1))
    pos = min(int(np.searchsorted(cum, rank, side="right")), len(cum) - 1)
    return int(sketch.index[pos])


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
