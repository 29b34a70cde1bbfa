"""``ScalingShift`` over many locations at once: its state as columns, a window in numpy.

As ``LatencyColumns`` (processor/detect/latency_columns.py) does for latency: the common
steps of a window (the load point, the residual against the baseline fit, the ring of
recent points and its residual slope, the streak, the fit's update) for every present
location of a service window at once; a location with an open regression, or whose streak
reaches ``persist_windows`` (an event), goes through ``ScalingShift.update`` itself,
thawed from its row. The same state, float for float (tests/test_detector_columns.py).
"""

from __future__ import annotations


import numpy as np

from processor.detect.columns import PresentColumns, load_measure, mean_logs
from processor.detect.scaling import INVERSE_T, SEEN_SD
from processor.detect.stats import LoadFit, _exp, fit_rows, predict_rows


def _recent_slopes(recent: np.ndarray, least: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ScalingShift._recent_slope`` of each ring (rows of ``recent``): the rings with the
    same number of points taken together, so that each sum runs over a row of that length,
    as numpy sums the points of one ring (pairwise, in ring order)."""
    m, size = recent.shape[:2]
    slope, t, x_range = np.zeros(m), np.zeros(m), np.zeros(m)
    valid = ~np.isnan(recent[:, :, 1])
    points = valid.sum(axis=1)
    for n in np.unique(points[points >= least]).tolist():
        rows = np.flatnonzero(points == n)
        pts = recent[rows][valid[rows]].reshape(len(rows), n, 3)  # (ring order kept)
        x, r = pts[:, :, 0].copy(), pts[:, :, 1].copy()
        xc = x - (x.sum(axis=1) / n)[:, None]
        sxx = (xc * xc).sum(axis=1)
        ok = sxx > 1e-12
        rc = r - (r.sum(axis=1) / n)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            b = (xc * rc).sum(axis=1) / sxx
            resid = rc - b[:, None] * xc
            se = np.sqrt(np.maximum((resid * resid).sum(axis=1) / (n - 2), 1e-12) / sxx)
        slope[rows] = np.where(ok, b, 0.0)
        t[rows] = np.where(ok, b / se, 0.0)
        x_range[rows] = np.where(ok, x.max(axis=1) - x.min(axis=1), 0.0)
    return slope, t, x_range


class ScalingColumns(PresentColumns):
    """Every location's ``ScalingShift`` state as columns (see the module's docstring). A
    row frozen (``row``) is ``ScalingShift.freeze``'s tuple; ``put`` takes one back."""

    _ARRAYS = (("fit", (21,), np.float64), ("fit_n", (), np.int32), ("mix", (4,), np.float64),
               ("recent", ("recent_windows", 3), np.float64), ("has_recent", (), np.bool_),
               ("pos", (), np.int32), ("streak", (), np.int32))

    @property
    def recent_windows(self) -> int:
        return self.det.recent_windows

    def _put(self, i: int, state: tuple | None = None, tick: int = 0) -> int:
        """Set row ``i`` to a frozen state (``ScalingShift.freeze``'s), or a new location's."""
        self._room(i + 1)
        (fit, mix), recent, pos, streak, o = self.det.freeze() if state is None else state
        self.fit[i] = np.frombuffer(fit[0], np.float64)
        self.fit_n[i] = fit[1]
        self.mix[i] = mix
        self.has_recent[i] = recent is not None
        self.recent[i] = np.nan if recent is None else np.frombuffer(recent, np.float64).reshape(-1, 3)
        self.pos[i], self.streak[i] = pos, streak
        self._hold_open(i, o)
        return tick

    def _row(self, i: int, tick: int = 0) -> tuple:
        """Row ``i`` as ``ScalingShift.freeze`` gives it."""
        recent = self.recent[i].tobytes() if self.has_recent[i] else None
        return (((self.fit[i].tobytes(), int(self.fit_n[i])), tuple(self.mix[i].tolist())), recent,
                int(self.pos[i]), int(self.streak[i]), self.open.get(i))

    _APART = ("recent",)  # (the ring: none before the warm-up's end)
    _EXTRAS = ("open", "recent")

    def _extras(self, ids: list[int]) -> list[tuple]:
        opened = self.open
        has = self.has_recent[np.asarray(ids, np.int64)].tolist()
        return [(opened.get(i), self.recent[i].tobytes() if h else None) for i, h in zip(ids, has)]

    def _put_extras(self, i: int, extras: tuple) -> None:
        o, recent = extras
        if recent is not None and (type(recent) is not bytes or len(recent) != self.recent[i].nbytes):
            raise ValueError("scaling: a record's ring does not fit")
        if (recent is not None) != bool(self.has_recent[i]):
            raise ValueError("scaling: a record's ring and its flag disagree")
        self.recent[i] = np.nan if recent is None else np.frombuffer(recent, np.float64).reshape(-1, 3)
        self._hold_open(i, o)

    def _fast(self, rows: np.ndarray, observations: list, count: np.ndarray, _=None) -> np.ndarray:
        """ScalingShift.update of locations whose window raises nothing, in numpy; returns
        the mask of those whose streak reached ``persist_windows``, left as they were."""
        d = self.det
        m = len(rows)
        x, has_x, span = load_measure(observations, count)
        x, uncertain, mix_new = d.mix.load_update_rows(self.mix[rows], x, has_x, count, span)
        p = np.flatnonzero(has_x)  # (no load measure: nothing changes, not even the mix)
        out = np.zeros(m, bool)
        if not len(p):
            return out
        r = rows[p]
        x, uncertain = x[p], uncertain[p]
        y = mean_logs([observations[k] for k in p.tolist()])
        fit, fit_n = self.fit[r], self.fit_n[r]
        warm = fit_n < d.warmup_windows
        f = fit_rows(fit, fit_n, d.decay, SEEN_SD)
        # The residual against the baseline fit, where its load was seen
        seen = ~uncertain & (f.lo - d.load_margin <= x) & (x <= f.hi + d.load_margin)
        residual = np.full(len(p), np.nan)
        if seen.any():
            expected = predict_rows(fit[seen], x[seen])
            residual[seen] = np.where(np.isfinite(expected), y[seen] - expected, np.nan)
        # The ring of recent points and its residual slope
        recent = self.recent[r]
        recent[~self.has_recent[r]] = np.nan
        pos = self.pos[r]
        recent[np.arange(len(p)), pos % d.recent_windows] = np.column_stack([x, residual, y])
        slope, t, x_range = _recent_slopes(recent, max(5, d.recent_windows // 2))
        inverse = f.t <= -INVERSE_T
        rising = (slope > 0) & (t >= d.z_threshold) & (x_range >= d.min_load_range) & ~inverse
        extra = np.zeros(len(p))
        extra[rising] = _exp(slope[rising] * x_range[rising]) - 1
        streak = np.where(rising & (extra >= d.min_relative), self.streak[r] + 1, 0)
        out[p] = ~warm & (streak >= d.persist_windows)
        keep = ~out[p]
        k, kr = p[keep], r[keep]
        self.mix[rows[k]] = mix_new[k]
        judged = keep & ~warm
        self.recent[r[judged]] = recent[judged]
        self.has_recent[r[judged]] = True
        self.pos[r[judged]] += 1
        self.streak[r[judged]] = streak[judged]
        sums, n = fit[keep], fit_n[keep]
        LoadFit.update_rows(sums, n, x[keep], y[keep], np.ones(len(kr)), d.decay)
        self.fit[kr], self.fit_n[kr] = sums, n
        return out
