"""``LatencyShift`` over many locations at once: its state as columns, a window in numpy.

Most location-windows take the same few steps: the load measure and call mix updated, the
window judged against the baseline by a few CUSUMs that stay below their threshold, the
window absorbed, the load fit updated. ``LatencyColumns`` keeps every location's detector
state as columns indexed by location id and takes those steps for all the present
locations of a service window at once, also where the window is brought to the
baseline's load or the detector keeps a baseline of its own. A location in any other case
(an open regression, a CUSUM past its threshold, a load beyond what the baseline has seen,
several versions in the window or a version its watches do not follow yet) goes through
``LatencyShift.update`` itself, thawed from its row and frozen back into it.

The columns give the same state, float for float, as ``LatencyShift.update`` would: the
same operations in the same order, and ``math``'s exp and log (numpy's differ from them in
the last bit at times). tests/test_latency_columns.py holds them to it.
"""

from __future__ import annotations

import math

import numpy as np

from processor.detect.columns import VersionedColumns, load_measure, mean_logs
from processor.detect.latency import LOAD_T, QUANTILES, SEEN_SD, WATCHES, LatencyShift
from processor.detect.stats import LoadFit, _log, binomial_llr, fit_rows, predict_rows
from processor.pipeline.baseline import _merge_rows
from processor.pipeline.sketch import LOG_GAMMA, LogSketch, bucket_value, quantile_positions, unpack_rows

_QS = np.array(list(QUANTILES.values()))
_WATCH_Q = [list(QUANTILES.values()).index(q) for q in WATCHES.values()]  # watch -> its quantile
_STATS = 5  # per watch: CUSUM statistic, hits, trials, others' hits, others' trials


def _grid(sketches: list[LogSketch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sketches as zero-padded rows: (bucket indices, counts, sizes)."""
    sizes = np.fromiter((len(sk.index) for sk in sketches), np.int64, len(sketches))
    width = max(int(sizes.max()), 1) if len(sizes) else 1
    index = np.zeros((len(sketches), width), np.int64)
    counts = np.zeros((len(sketches), width))
    if sizes.sum():
        rows = np.repeat(np.arange(len(sketches)), sizes)
        cols = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        index[rows, cols] = np.concatenate([sk.index for sk in sketches])
        counts[rows, cols] = np.concatenate([sk.counts for sk in sketches])
    return index, counts, sizes


class LatencyColumns(VersionedColumns):
    """Every location's ``LatencyShift`` state as columns (see the module's docstring).

    A row frozen (``row``) is ``LatencyShift.freeze``'s tuple; ``put`` takes one back. The
    watches of the version a location's windows come from are columns; those of other
    versions (kept until evicted) are held as frozen tuples beside them.
    """

    def __init__(self, det: LatencyShift):
        self.own: dict[int, bytes] = {}      # a baseline of its own (else the location's published one)
        super().__init__(det)

    # (name, shape per row, dtype): counters as int32, the figures as float64
    _ARRAYS = (("bw", (), np.int32), ("fit", (21,), np.float64), ("fit_n", (), np.int32),
               ("mix", (4,), np.float64), ("ref", (), np.float64),
               ("nwin", (), np.int32), ("nmean", (3,), np.float64), ("nvar", (3,), np.float64),
               ("pend", ("noise_delay", 3), np.float64), ("plen", (), np.int8),
               *VersionedColumns._WATCHES,
               ("wstat", (len(WATCHES), _STATS), np.float64), ("wwin", (len(WATCHES),), np.int32),
               ("wseg", (len(WATCHES),), object))

    @property
    def noise_delay(self) -> int:
        return self.det.noise.delay

    # -- rows ---------------------------------------------------------------------------------
    def _put(self, i: int, state: tuple | None = None, tick: int = 0) -> int:
        """Set row ``i`` to a frozen state (``LatencyShift.freeze``'s), or a new location's."""
        self._room(i + 1)
        d = self.det
        if state is None:
            state = d.freeze()
        baseline, bw, (load, mix, ref, noise), watches, o = state
        if baseline is None:
            self.own.pop(i, None)
        else:
            self.own[i] = baseline
        self.bw[i] = bw
        self.fit[i] = np.frombuffer(load[0], np.float64)
        self.fit_n[i] = load[1]
        self.mix[i] = mix
        self.ref[i] = math.nan if ref is None else ref
        n = len(QUANTILES)
        self.nwin[i], self.nmean[i], self.nvar[i] = noise[0], noise[1:1 + n], noise[1 + n:1 + 2 * n]
        pending = noise[1 + 2 * n] if len(noise) > 1 + 2 * n else ()
        if len(pending) > d.noise.delay:
            raise ValueError("latency: more windows pending than the noise delay")
        self.pend[i] = math.nan
        for k, p in enumerate(pending):
            self.pend[i, k] = [math.nan if v is None else v for v in p]
        self.plen[i] = len(pending)
        self._put_watches(i, watches)
        self._hold_open(i, o)
        return tick

    def put_evidence(self, i: int, evidence: list) -> None:
        for w, (statistic, segment, hits, trials, oh, ot, windows) in enumerate(evidence[0]):
            self.wstat[i, w] = statistic, hits, trials, oh, ot
            self.wwin[i, w], self.wseg[i, w] = windows, segment

    def row_evidence(self, i: int) -> tuple:
        stats, wins = self.wstat[i].tolist(), self.wwin[i].tolist()
        return (tuple((s[0], self.wseg[i, w], s[1], s[2], s[3], s[4], wins[w]) for w, s in enumerate(stats)),)

    def forget(self, i: int) -> None:
        super().forget(i)
        self.own.pop(i, None)
        if i < len(self.wseg):
            self.wseg[i] = b""

    def _row(self, i: int, tick: int = 0) -> tuple:
        """Row ``i`` as ``LatencyShift.freeze`` gives it."""
        pending = tuple(tuple(None if math.isnan(v) else v for v in p) for p in self.pend[i, :self.plen[i]].tolist())
        noise = (int(self.nwin[i]), *self.nmean[i].tolist(), *self.nvar[i].tolist(), pending)
        ref = float(self.ref[i])
        load = ((self.fit[i].tobytes(), int(self.fit_n[i])), tuple(self.mix[i].tolist()),
                None if math.isnan(ref) else ref, noise)
        return (self.own.get(i), int(self.bw[i]), load, self._row_watches(i), self.open.get(i))

    _APART = ("pend",)  # (the noise's pending windows: none, mostly)
    _EXTRAS = ("own", "open", "others", "main_version", "wseg", "pend")

    def _extras(self, ids: list[int]) -> list[tuple]:
        own, opened, others, main = self.own, self.open, self.others, self.main_version
        r = np.asarray(ids, np.int64)
        segments, plen = self.wseg[r].tolist(), self.plen[r].tolist()
        return [(own.get(i), opened.get(i), others.get(i), main[i], tuple(g),
                 self.pend[i, :n].tobytes() if n else b"") for i, g, n in zip(ids, segments, plen)]

    def _put_extras(self, i: int, extras: tuple) -> None:
        own, o, others, main_version, segments, pending = extras
        if (own is not None and type(own) is not bytes) or len(segments) != len(WATCHES) or any(
                type(g) is not bytes for g in segments) or type(pending) is not bytes:
            raise ValueError("latency: a record's baseline, segments or pending windows are not bytes")
        n = int(self.plen[i])
        if len(pending) != n * 24 or n > self.det.noise.delay:
            raise ValueError("latency: a record's pending windows do not fit")
        self.pend[i] = math.nan
        self.pend[i, :n] = np.frombuffer(pending, np.float64).reshape(n, 3)
        if own is not None:
            self.own[i] = own
        self._hold_open(i, o)
        self._put_versions(i, main_version, others)
        self.wseg[i] = list(segments)

    # -- one service window -------------------------------------------------------------------
    def _widths(self, observations: list) -> np.ndarray:
        """Buckets of the published baseline (an own one is about as wide) and the window."""
        return np.fromiter((max(len(o.baseline_step[3].index), len(o.window.sketch.index)) for o in observations),
                           np.int64, len(observations))

    def _route(self, rows: np.ndarray, observations: list, count: np.ndarray) -> tuple[np.ndarray, list]:
        slow, version = super()._route(rows, observations, count)
        slow |= np.fromiter((o.baseline_step is None for o in observations), np.bool_, len(rows))
        return slow, version

    def _fast(self, rows: np.ndarray, observations: list, count: np.ndarray, versions: list) -> np.ndarray:
        """LatencyShift.update for locations that take the common steps, in numpy; returns
        the mask of those that turned out not to (a CUSUM past its threshold, a window
        beyond the load seen), left as they were."""
        d = self.det
        m = len(rows)
        out = np.zeros(m, bool)
        at = np.arange(m)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            # The load: the rest of the service's calls (Observation.others_load), then the
            # own calls' view of it (CallMix).
            x, has_x, span = load_measure(observations, count)
            x, uncertain, mix_new = d.mix.load_update_rows(self.mix[rows], x, has_x, count, span)
            # The window brought to the baseline's load (LatencyShift._load_adjustment)
            fit, fit_n = self.fit[rows], self.fit_n[rows]
            offset, beyond, ref = self._load_adjustment(x, has_x, uncertain, fit, fit_n, self.ref[rows])
            bw = self.bw[rows]
            warm = bw < d.warmup_windows
            held = beyond & ~warm  # neither evidence nor baseline: only the load fit learns
            # The detector's baseline before this window (the published one, or its own),
            # and the window as judged (its buckets moved by the load adjustment)
            own = [self.own.get(i) for i in rows.tolist()]
            bases = [o.baseline_step[3] if b is None else LogSketch.unpack(b) for o, b in zip(observations, own)]
            b_index, b_counts, b_sizes = _grid(bases)
            w_index, w_counts, w_sizes = _grid([o.window.sketch for o in observations])
            w_index += offset[:, None]
            b_cum = np.cumsum(b_counts, axis=1)
            w_cum = np.cumsum(w_counts, axis=1)
            b_total, w_total = b_cum[:, -1], w_cum[:, -1]
            b_pos = quantile_positions(b_cum, b_sizes, _QS)
            # QuantileNoise.update (the regression is not open), unless beyond the load seen
            noise_rows = ~beyond & (w_total >= d.noise.min_spans) & self._count_at_least(
                bases, b_total, d.noise.min_spans)
            w_pos = quantile_positions(w_cum, w_sizes, _QS)
            noise = self._noise(rows, noise_rows, bucket_value(w_index[at, w_pos].astype(np.float64)),
                                bucket_value(b_index[at, b_pos].astype(np.float64)))
            # The CUSUMs of the judged windows
            judged = ~warm & ~beyond
            b_bucket = b_index[at, b_pos]
            p0 = (b_total[:, None] - b_cum[at, b_pos]) / b_total[:, None]
            hits = (w_counts[:, None, :] * (w_index[:, None, :] > b_bucket[:, :, None])).sum(axis=2)
            watched = (_QS[None, :] <= 0.5) | (b_total[:, None] * (1 - _QS[None, :]) >= d.min_tail_expected)
            watch = self._watches(rows, judged, count, watched, p0, hits)
            if watch is not None:
                out |= watch[1].any(axis=1) & judged
        keep = ~out
        if not keep.any():
            return out
        k = np.flatnonzero(keep)
        r = rows[k]
        # The windows as judged, where the adjustment moved them
        currents = [o.window.sketch for o in observations]
        for a in np.flatnonzero(offset).tolist():
            sk = currents[a]
            currents[a] = LogSketch(sk.index + np.int32(offset[a]), sk.counts)
        # The baselines: absorbed (held ones stay as they were), published or their own
        self._absorb(rows, k[~held[k]], observations, own, bases, currents, offset)
        for a in k[held[k]].tolist():
            i, step = int(rows[a]), observations[a].baseline_step
            baseline = step[0] if own[a] is None else own[a]
            self._set_own(i, baseline, step[2])
        self.bw[rows[k[~held[k]]]] += 1
        # The mix, the load reference, the noise, the watches and the load fit
        self.mix[r] = mix_new[k]
        self.ref[r] = ref[k]
        nwin, nmean, nvar, pend, plen = noise
        self.nwin[r], self.nmean[r], self.nvar[r], self.pend[r], self.plen[r] = (
            nwin[k], nmean[k], nvar[k], pend[k], plen[k])
        if watch is not None:
            self._commit_watches(rows, keep & judged, count, watch, hits, currents, versions)
        f = k[has_x[k]]
        if len(f):
            y = mean_logs([observations[a] for a in f.tolist()])
            sums, n = fit[f], fit_n[f]
            LoadFit.update_rows(sums, n, x[f], y, np.ones(len(f)), d.decay)
            self.fit[rows[f]], self.fit_n[rows[f]] = sums, n
        return out

    def _set_own(self, i: int, baseline: bytes, published: bytes) -> None:
        """Row ``i``'s baseline is ``baseline``: its own, unless it is the published one."""
        if baseline == published:
            self.own.pop(i, None)
        else:
            self.own[i] = baseline

    def _absorb(self, rows, k, observations, own, bases, currents, offset) -> None:
        """LatencyShift._absorb of rows ``k``: the published baseline taken as it is where the
        detector's is that one and the window unmoved, else merged (``_merge_rows``)."""
        d = self.det
        merge = [a for a in k.tolist() if own[a] is not None or offset[a]]
        if not merge:
            return
        decays = [observations[a].baseline_step[1] for a in merge]
        merged, _ = _merge_rows([bases[a] for a in merge], [d.decay if x is None else x for x in decays],
                                [currents[a] for a in merge], quantiles=False)
        for a, packed in zip(merge, merged):
            self._set_own(int(rows[a]), packed, observations[a].baseline_step[2])

    def _count_at_least(self, sketches: list[LogSketch], totals: np.ndarray, least: float) -> np.ndarray:
        """``sketch.count >= least`` for each: from the running totals, and from the sketch's
        own sum where the two could round to different sides."""
        ok = totals >= least
        near = np.flatnonzero(np.abs(totals - least) <= 1e-9 * least)
        for k in near.tolist():
            ok[k] = sketches[k].count >= least
        return ok

    def _load_adjustment(self, x, has_x, uncertain, s, n, ref):
        """LatencyShift._load_adjustment of each row: (the window's bucket offset, beyond the
        load seen, the load reference after)."""
        d = self.det
        m = len(x)
        f = fit_rows(s, n, d.decay, SEEN_SD)
        lo, hi, slope, se, t, mean = f.lo, f.hi, f.slope, f.se, f.t, f.mean_x
        judged = has_x & (n >= d.warmup_windows)
        flat = (slope <= 0) | (t < LOAD_T)
        # No load effect shown: none assumed, unless the load went so far past what was seen
        # that one the data cannot rule out would be a reportable rise.
        plausible = (np.where(slope > 0.0, slope, 0.0) + 2.0 * se) * (x - hi)
        beyond = judged & flat & (x - hi > d.load_margin) & (plausible > 0.5 * math.log1p(d.min_relative))
        offset = np.zeros(m, np.int64)
        ref = ref.copy()
        k = np.flatnonzero(judged & ~flat)
        if len(k):
            sk = s[k]
            unset = np.isnan(ref[k])
            ref[k[unset]] = predict_rows(sk[unset], mean[k][unset])
            xk = x[k]
            clamped = np.where(lo[k] > xk, lo[k], xk)
            top = hi[k] + d.load_margin
            clamped = np.where(top < clamped, top, clamped)
            expected = predict_rows(sk, clamped)
            finite = np.isfinite(expected)
            log_factor = -(expected - ref[k])
            offset[k] = np.where(finite, np.rint(log_factor / LOG_GAMMA), 0).astype(np.int64)
            beyond[k] = ~finite | uncertain[k] | (xk - hi[k] > d.load_margin)
        return offset, beyond, ref

    def _noise(self, rows, update, now_q, then_q):
        """QuantileNoise.update of the rows where ``update``: the new (windows, mean, var,
        pending, pending length) of every row."""
        q = self.det.noise
        nwin, nmean, nvar = self.nwin[rows], self.nmean[rows], self.nvar[rows]
        pend, plen = self.pend[rows], self.plen[rows]
        u = np.flatnonzero(update)
        if not len(u):
            return nwin, nmean, nvar, pend, plen
        ratio = now_q[u] / then_q[u]
        ok = (now_q[u] > 0) & (then_q[u] > 0)
        logs = np.full(ratio.shape, np.nan)
        logs[ok] = _log(ratio[ok])
        full = plen[u] >= q.delay
        # Append; when more than ``delay`` wait, the oldest counts.
        oldest = pend[u, 0].copy()
        shifted = np.concatenate([pend[u, 1:], logs[:, None, :]], axis=1)
        appended = pend[u].copy()
        appended[np.arange(len(u)), np.minimum(plen[u], q.delay - 1)] = logs
        pend[u] = np.where(full[:, None, None], shifted, appended)
        plen[u] = np.where(full, plen[u], plen[u] + 1)
        c = u[full]
        if len(c):
            nwin[c] += 1
            weight = 1.0 / np.minimum(nwin[c], q.memory)
            xs = oldest[full]
            there = ~np.isnan(xs)
            dlt = xs - nmean[c]
            new_mean = nmean[c] + weight[:, None] * dlt
            new_var = (1 - weight[:, None]) * (nvar[c] + weight[:, None] * dlt * dlt)
            nmean[c] = np.where(there, new_mean, nmean[c])
            nvar[c] = np.where(there, new_var, nvar[c])
        return nwin, nmean, nvar, pend, plen

    def _watches(self, rows, judged, count, watched, p0, hits):
        """The CUSUMs of the judged rows' version: (statistics after, drift, active, tested)
        per row and watch, or None when there is nothing to judge."""
        d = self.det
        if not judged.any():
            return None
        qi = np.array(_WATCH_Q)
        p0w, hitsw = p0[:, qi], hits[:, qi]
        tested = judged[:, None] & watched[:, qi] & (p0w > 0)
        names = list(WATCHES)
        tail = np.array([WATCHES[nm] > 0.5 for nm in names])
        delta = np.array([d.gross_delta if nm == "p50_gross" else d.median_delta for nm in names])
        p1 = np.where(tail[None, :], np.minimum(d.tail_ratio * p0w, 0.5), np.minimum(p0w + delta[None, :], 0.999))
        trials = np.broadcast_to(count.astype(np.float64)[:, None], p0w.shape)
        llr = np.zeros(p0w.shape)
        llr[tested] = binomial_llr(hitsw[tested], trials[tested], p0w[tested], p1[tested])
        fresh = self.wtick[rows] < 0
        before = np.where(fresh[:, None], 0.0, self.wstat[rows, :, 0])
        total = before + llr
        stat = np.where(total > 0.0, total, 0.0)
        stat = np.where(tested, stat, before)
        active = tested & (stat > 0)
        drift = active & (stat > d.threshold)
        return stat, drift, active, tested

    def _commit_watches(self, rows, judged, count, watch, hits, windows, versions):
        """Write the judged rows' watches (``_watches``'s figures): a tested watch at zero is
        reset, a positive one adds the window to its segment and counts."""
        stat, _, active, tested = watch
        k = np.flatnonzero(judged)
        if not len(k):
            return
        r = rows[k]
        fresh = self._tick_watches(r, [versions[o] for o in k.tolist()])
        f = r[fresh]  # (their first judged window: fresh watches)
        self.wstat[f] = 0.0
        self.wwin[f] = 0
        self.wseg[f] = b""
        reset, grow = tested[k] & ~active[k], active[k]
        st, wins = self.wstat[r], self.wwin[r]
        self._count_evidence(st, wins, tested[k], grow, stat[k], hits[k][:, np.array(_WATCH_Q)],
                             count[k].astype(np.float64)[:, None])
        self.wstat[r], self.wwin[r] = st, wins
        segs = self.wseg[r]
        segs[reset] = b""
        a, w = np.nonzero(grow)
        if len(a):  # each growing segment merged with its window (packed, as _Watch keeps it)
            merged, _ = _merge_rows(unpack_rows(segs[a, w].tolist()), [None] * len(a),
                                    [windows[k[x]] for x in a.tolist()], quantiles=False)
            segs[a, w] = merged
        self.wseg[r] = segs
