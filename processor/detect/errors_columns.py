"""``ErrorRateShift`` over many locations at once: its state as columns, a window in numpy.

As ``LatencyColumns`` does for latency: a window of one version (the one the watches
follow) with no regression open and no CUSUM past its threshold is taken for every
present location of a service window at once (the baseline share, the CUSUM, the decayed
counts); any other goes through ``ErrorRateShift.update`` itself, thawed from its row. The
same state, float for float (tests/test_detector_columns.py).
"""

from __future__ import annotations

import numpy as np

from processor.detect.columns import VersionedColumns
from processor.detect.stats import binomial_llr, wilson_rows


class ErrorColumns(VersionedColumns):
    """Every location's ``ErrorRateShift`` state as columns (see the module's docstring).
    A row frozen (``row``) is ``ErrorRateShift.freeze``'s tuple; ``put`` takes one back."""

    _ARRAYS = (("errors", (), np.float64), ("spans", (), np.float64), ("windows", (), np.int32),
               *VersionedColumns._WATCHES,
               ("wstat", (5,), np.float64),  # CUSUM statistic, errors, spans, others' errors, others' spans
               ("wwin", (), np.int32))

    def _put(self, i: int, state: tuple | None = None, tick: int = 0) -> int:
        self._room(i + 1)
        errors, spans, windows, watches, o = self.det.freeze() if state is None else state
        self.errors[i], self.spans[i], self.windows[i] = errors, spans, windows
        self._put_watches(i, watches)
        self._hold_open(i, o)
        return tick

    def put_evidence(self, i: int, evidence: list) -> None:
        statistic, errors, spans, others_errors, others_spans, windows = evidence
        self.wstat[i] = statistic, errors, spans, others_errors, others_spans
        self.wwin[i] = windows

    def row_evidence(self, i: int) -> tuple:
        return (*self.wstat[i].tolist(), int(self.wwin[i]))

    def _row(self, i: int, tick: int = 0) -> tuple:
        return (float(self.errors[i]), float(self.spans[i]), int(self.windows[i]), self._row_watches(i),
                self.open.get(i))

    _EXTRAS = ("open", "others", "main_version")

    def _extras(self, ids: list[int]) -> list[tuple]:
        opened, others, main = self.open, self.others, self.main_version
        return [(opened.get(i), others.get(i), main[i]) for i in ids]

    def _put_extras(self, i: int, extras: tuple) -> None:
        o, others, main_version = extras
        self._hold_open(i, o)
        self._put_versions(i, main_version, others)

    def _route(self, rows: np.ndarray, observations: list, count: np.ndarray) -> tuple[np.ndarray, list]:
        slow, version = super()._route(rows, observations, count)
        for k in np.flatnonzero(~slow & (count > 0)).tolist():  # (the one version's errors are the window's)
            lw = observations[k].window
            slow[k] = next(v for v in lw.versions if v.count).errors != lw.errors
        return slow, version

    def _fast(self, rows: np.ndarray, observations: list, count: np.ndarray, versions: list) -> np.ndarray:
        d = self.det
        m = len(rows)
        errors = np.fromiter((o.window.errors for o in observations), np.int64, m).astype(np.float64)
        spans = count.astype(np.float64)
        e, s = self.errors[rows], self.spans[rows]
        judged = self.windows[rows] >= d.warmup_windows
        # ErrorRateShift.p0, before the window is absorbed
        with np.errstate(divide="ignore", invalid="ignore"):
            shrunk = (e + d.prior_share * d.prior_spans) / (s + d.prior_spans)
        low = wilson_rows(e, s, 1.0)
        p0 = np.where((s != 0) & (low > shrunk), low, shrunk)
        fresh = self.wtick[rows] < 0
        stat = np.zeros(m)
        j = np.flatnonzero(judged)
        if len(j):
            llr = binomial_llr(errors[j], spans[j], p0[j], np.minimum(d.ratio * p0[j], 0.9))
            total = np.where(fresh[j], 0.0, self.wstat[rows[j], 0]) + llr
            stat[j] = np.where(total > 0.0, total, 0.0)
        out = judged & (stat > d.threshold)
        keep = np.flatnonzero(~out)
        r = rows[keep]
        self.errors[r] = e[keep] * d.decay + errors[keep]
        self.spans[r] = s[keep] * d.decay + spans[keep]
        self.windows[r] += 1
        k = keep[judged[keep]]
        if len(k):
            r = rows[k]
            made = self._tick_watches(r, [versions[a] for a in k.tolist()])
            w = self.wstat[r]
            w[made] = 0.0
            wins = np.where(made, 0, self.wwin[r])
            self._count_evidence(w, wins, np.ones(len(k), bool), stat[k] > 0, stat[k], errors[k], spans[k])
            self.wstat[r], self.wwin[r] = w, wins
        return out
