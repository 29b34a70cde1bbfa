"""How much a location's quantiles move from window to window when nothing changed.

On real services a window's p50 often moves by 20-50% against the baseline for no reason
a developer would want to hear of (caches, batch jobs, a neighbour's garbage collection),
and with hundreds of spans a window any such move is statistically significant. A rise is
news when it stands out of that spread: the latency detector asks for ``z`` standard
deviations of it as well as its relative and absolute gates.
"""

from __future__ import annotations

import math
from collections import deque

from river import base

from processor.pipeline.sketch import LogSketch


class QuantileNoise(base.Base):
    """Spread of log(window quantile / baseline quantile), per quantile, over windows with at
    least ``min_spans`` spans (fewer make the window's quantile itself noisy, which the
    detector's tests already account for): a running mean and variance over the first
    ``memory`` windows, exponentially weighted with weight 1 / ``memory`` after.

    Until a location has windows of its own, its spread is taken to be ``prior_sd``: the
    estimate is shrunk towards it as if it had been seen in ``prior_windows`` windows, so
    that the first few windows (and a tail quantile's wild ones) do not set the gate.

    A window counts ``delay`` windows after it was seen, unless ``discard`` dropped it in
    between: the detector discards the windows that opened a regression, so that a shift is
    not taken for the location's own spread while its evidence builds up.

    Parameters
    ----------
    quantiles
        The quantiles followed.
    min_spans
        Spans a window needs to count.
    memory
        Windows the spread is estimated over.
    delay
        Windows a window waits before it counts.
    prior_sd
        The spread assumed before the location shows its own (log ratio).
    prior_windows
        How many windows that assumption weighs.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(2)
    >>> baseline = LogSketch.from_values(rng.lognormal(np.log(20e6), 0.5, 20_000))
    >>> steady, jumpy = QuantileNoise((0.5,)), QuantileNoise((0.5,))
    >>> for i in range(60):
    ...     _ = steady.update(LogSketch.from_values(rng.lognormal(np.log(20e6), 0.5, 400)), baseline)
    ...     level = 20e6 * (1.4 if i % 3 == 0 else 0.9)  # a location that jumps between levels
    ...     _ = jumpy.update(LogSketch.from_values(rng.lognormal(np.log(level), 0.5, 400)), baseline)
    >>> round(steady.sd(0), 3) < 0.05 < 0.15 < round(jumpy.sd(0), 3)
    True
    >>> QuantileNoise((0.5,)).sd(0)  # no window yet: the prior
    0.1

    A shift counts only once ``delay`` windows have passed, and not at all once discarded:

    >>> shifted, kept = QuantileNoise((0.5,)), QuantileNoise((0.5,))
    >>> def window(level):
    ...     return LogSketch.from_values(rng.lognormal(np.log(level), 0.5, 400))
    >>> for i in range(30):
    ...     level = 60e6 if 20 <= i < 23 else 20e6
    ...     _ = shifted.update(window(level), baseline)
    ...     _ = kept.update(window(level), baseline)
    ...     if i == 22:
    ...         _ = shifted.discard()
    >>> round(shifted.sd(0), 3) < 0.1 < 0.2 < round(kept.sd(0), 3)
    True

    References
    ----------
    Welford (1962), running variance; Finch (2009), incremental exponentially weighted
    mean and variance.
    """

    def __init__(self, quantiles: tuple[float, ...] = (0.5, 0.99, 0.999), min_spans: int = 20,
                 memory: int = 60, delay: int = 8, prior_sd: float = 0.1, prior_windows: int = 10):
        self.quantiles = quantiles
        self.min_spans = min_spans
        self.memory = memory
        self.delay = delay
        self.prior_sd, self.prior_windows = prior_sd, prior_windows
        self.pending: deque[tuple[float | None, ...]] = deque()
        self.windows = 0
        self.mean = [0.0] * len(quantiles)
        self.var = [0.0] * len(quantiles)

    def update(self, current: LogSketch, baseline: LogSketch) -> "QuantileNoise":
        if current.count < self.min_spans or baseline.count < self.min_spans:
            return self
        now = current.quantiles(list(self.quantiles))
        then = baseline.quantiles(list(self.quantiles))
        self.pending.append(tuple(math.log(a / b) if a > 0 and b > 0 else None for a, b in zip(now, then)))
        if len(self.pending) > self.delay:
            self._count(self.pending.popleft())
        return self

    def discard(self) -> "QuantileNoise":
        """Drop the windows not counted yet."""
        self.pending.clear()
        return self

    def _count(self, ratios: tuple[float | None, ...]) -> None:
        self.windows += 1
        w = 1.0 / min(self.windows, self.memory)
        for i, x in enumerate(ratios):
            if x is None:
                continue
            d = x - self.mean[i]
            self.mean[i] += w * d
            self.var[i] = (1 - w) * (self.var[i] + w * d * d)

    def sd(self, i: int) -> float:
        """Standard deviation of the log ratio of quantile ``i``, shrunk towards ``prior_sd``
        as if that had been seen in ``prior_windows`` windows."""
        n, k = min(self.windows, self.memory), self.prior_windows
        if n + k == 0:
            return 0.0
        return math.sqrt((n * self.var[i] + k * self.prior_sd ** 2) / (n + k))

    def freeze(self) -> tuple:
        return (self.windows, *self.mean, *self.var, tuple(self.pending))

    def thaw(self, state: tuple) -> None:
        n = len(self.quantiles)
        self.windows = state[0]
        self.mean, self.var = list(state[1:1 + n]), list(state[1 + n:1 + 2 * n])
        self.pending = deque(tuple(p) for p in state[1 + 2 * n]) if len(state) > 1 + 2 * n else deque()
