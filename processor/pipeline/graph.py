"""The call graph: each span joined to its parent's code location through ``parent_span_id``.

Spans of one trace arrive in any order, in different requests and from different receiver
processes; children usually come first (they end first). The join buffer holds every span
(its ids, location, version, times and kind: about 60 bytes) until its trace is complete:
no span of the trace ended less than ``wait_ns`` of event time ago by its service's clock.
Then the whole trace is joined at once, numpy over every complete trace of the flush:

- an edge per child span: (parent's location -> child's location), counted in the
  parent's window, with the child's duration;
- per span, the time its children covered (overlapping children merged, clipped to the
  span), so a location's self time is its time less that;
- per span, its entry point: the nearest ancestor that is a root, a SERVER or a CONSUMER
  span; each span's time is counted under its entry point's location, which is what a
  regression's impact on entry points is read from.

A span whose parent id names no span of its trace when the trace is joined is an orphan
(its parent was never sent here, or came too late): counted, its own figures kept, no edge.
Figures for a window that has already closed are late: counted and dropped. With ``wait_ns``
at most the allowed lateness, a trace that ended inside a window is joined before it closes.
When more than ``max_spans`` wait, the oldest are joined as they are (counted as forced).

All per-span work is numpy on whole flushes; Python runs per flush, per window and per
(location, child) pair.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# SpanKind values that make a span an entry point (a root is one whatever its kind)
SERVER, CONSUMER = 2, 5
_MIX = np.uint64(0x9E3779B97F4A7C15)  # spreads span ids before they are xor-ed with the trace
_MARK_BITS = 22  # the table that tells which traces still have spans waiting (collisions only delay)
# the dtypes of the columns add() takes: trace, span, parent, loc, ver, svc, start, end, kind
_DTYPES = (np.uint64, np.uint64, np.uint64, np.int32, np.int32, np.int32, np.int64, np.int64, np.uint8)


@dataclass(slots=True)
class Child:
    """A callee of a location in one window: its calls and their summed duration, per the
    caller's version (the caller's version, as the call pattern is the caller's code)."""
    calls: int = 0
    ns: int = 0
    by_version: dict = field(default_factory=dict)  # caller version id -> calls
    ns_by_version: dict = field(default_factory=dict)  # caller version id -> ns


@dataclass(slots=True)
class LocationGraph:
    """What the call graph knows of one location in one closed window (ids: the window
    stage's location and version ids)."""
    calls: int = 0         # its spans joined (in complete traces)
    ns: int = 0            # their summed durations
    child_ns: int = 0      # of that, the time their children covered (self time: ns - child_ns)
    versions: dict = field(default_factory=dict)   # version id -> calls
    children: dict = field(default_factory=dict)   # child location id -> Child
    entries: dict = field(default_factory=dict)    # entry location id -> [calls, ns] of this location under it
    version_ns: dict = field(default_factory=dict)  # version id -> [ns, child ns] of its calls
    entries_by_version: dict = field(default_factory=dict)  # version id -> {entry: [calls, ns]}

    @property
    def self_ns(self) -> int:
        return self.ns - self.child_ns

    def resolved(self, locations, versions, calls_of) -> "LocationGraph":
        """The same figures with ids made names: ``locations[id]`` and ``versions[id]`` (the
        window stage's tables); an entry's value gets the entry's own calls, ``calls_of(id)``
        (0: not known), as its third figure."""
        return LocationGraph(
            self.calls, self.ns, self.child_ns, {versions[v]: c for v, c in self.versions.items()},
            {locations[c]: Child(f.calls, f.ns, {versions[v]: n for v, n in f.by_version.items()},
                                 {versions[v]: t for v, t in f.ns_by_version.items()})
             for c, f in self.children.items()},
            {locations[e]: [c, t, calls_of(e)] for e, (c, t) in self.entries.items()},
            {versions[v]: x for v, x in self.version_ns.items()},
            {versions[v]: {locations[e]: [c, t, calls_of(e, v)] for e, (c, t) in by.items()}
             for v, by in self.entries_by_version.items()})

    def of_version(self, version) -> "LocationGraph":
        """The figures of one version's calls (a resolved graph's; those of every version
        when it has none of that version's own)."""
        calls = self.versions.get(version, 0)
        if not calls or version not in self.version_ns or len(self.versions) == 1:
            return self
        ns, child_ns = self.version_ns[version]
        return LocationGraph(
            calls, ns, child_ns, {version: calls},
            {c: Child(f.by_version.get(version, 0), f.ns_by_version.get(version, 0),
                      {version: f.by_version.get(version, 0)}, {version: f.ns_by_version.get(version, 0)})
             for c, f in self.children.items() if f.by_version.get(version)},
            self.entries_by_version.get(version, {}))

    def entries_per_call(self) -> dict[str, tuple[float, float]]:
        """Per entry point (its key) whose calls are known: this location's calls and time
        (ns) per entry call (a resolved graph's)."""
        return {e.key: (c / n, t / n) for e, (c, t, n) in self.entries.items() if n}


class CallGraph:
    """The join buffer and the figures of the windows still open (see the module docstring).

    >>> g = CallGraph(window_ns=10, wait_ns=2)
    >>> u = np.uint64
    >>> g.add(trace=np.array([7, 7], u), span=np.array([1, 2], u), parent=np.array([0, 1], u),
    ...       loc=np.array([0, 1]), ver=np.array([0, 0]), svc=np.array([0, 0]),
    ...       start=np.array([1, 2]), end=np.array([6, 5]), kind=np.array([2, 3], np.uint8))
    >>> g.flush({0: 7}, {0: 0}), g.waiting  # the trace's last span ended 1 ago: it waits
    (0, 2)
    >>> g.flush({0: 8}, {0: 0}), g.waiting
    (2, 0)
    >>> fig = g.take(0, 0)
    >>> fig[0].children[1].calls, fig[0].self_ns, fig[1].entries
    (1, 2, {0: [1, 3]})
    """

    def __init__(self, window_ns: int, wait_ns: int, max_spans: int = 1_000_000):
        self.window_ns = window_ns
        self.wait_ns = wait_ns
        self.max_spans = max_spans
        self._chunks: list[tuple[np.ndarray, ...]] = []
        self.waiting = 0
        self._mark = np.zeros(1 << _MARK_BITS, np.uint8)
        self._clock = np.full(1 << _MARK_BITS, np.iinfo(np.int64).min, np.int64)
        self._open: dict[tuple[int, int], _Partial] = {}   # (service id, window start) -> figures
        self.stats = Counter(joined=0, edges=0, orphans=0, late=0, forced=0)

    # -- in --------------------------------------------------------------------------------

    def add(self, trace, span, parent, loc, ver, svc, start, end, kind) -> None:
        """Spans to join: ``trace`` a 64-bit digest of each trace id, the rest per span."""
        if len(trace):
            self._chunks.append(tuple(np.asarray(c, d) for c, d in zip(
                (trace, span, parent, loc, ver, svc, start, end, kind), _DTYPES)))
            self.waiting += len(trace)

    def flush(self, clocks: dict[int, int], closed: dict[int, int], force: bool | set[int] = False) -> int:
        """Join the traces that are complete by their services' ``clocks`` (latest end seen,
        ns), all of them with ``force`` True, and the spans of the services in ``force`` (a
        set of ids) as if complete; ``closed``: each service's end of its last closed window
        (figures for those windows are late). Returns the spans joined."""
        if not self._chunks:
            return 0
        cols = [np.concatenate(c) for c in zip(*self._chunks)] if len(self._chunks) > 1 else list(self._chunks[0])
        self._chunks = []
        trace, svc, end = cols[0], cols[5], cols[7]
        n = len(trace)
        if force is True:
            ready = np.ones(n, bool)
        else:
            # A trace is complete when none of its spans ended within the wait of the latest
            # clock among its services (a quiet callee service does not hold its callers'
            # traces back): the table of traces (by a digest: collisions only delay) takes
            # each trace's latest clock, then marks the traces with a recent span.
            bucket = ((trace * _MIX) >> np.uint64(64 - _MARK_BITS)).astype(np.int64)
            clock = _lookup(clocks, svc, n)
            old = end + self.wait_ns <= clock
            if not old.all():  # (a span recent by its own service's clock: the trace's latest)
                np.maximum.at(self._clock, bucket, clock)
                old = end + self.wait_ns <= self._clock[bucket]
                self._clock[bucket] = np.iinfo(np.int64).min
            if force:
                old |= np.isin(svc, np.fromiter(force, np.int64, len(force)))
            young = bucket[~old]
            self._mark[young] = 1
            ready = old & (self._mark[bucket] == 0)
            self._mark[young] = 0
            if n - int(ready.sum()) > self.max_spans:  # the oldest beyond the bound go as they are
                waiting = np.flatnonzero(~ready)
                cut = waiting[np.argsort(end[waiting], kind="stable")[:len(waiting) - self.max_spans]]
                ready[cut] = True
                self.stats["forced"] += len(cut)
        if not ready.all():
            keep = ~ready
            self._chunks.append(tuple(c[keep] for c in cols))
            cols = [c[ready] for c in cols]
        self.waiting = n - len(cols[0])
        if len(cols[0]):
            self._join(*cols, closed)
        return len(cols[0])

    # -- the join --------------------------------------------------------------------------

    def _join(self, trace, span, parent, loc, ver, svc, start, end, kind, closed: dict[int, int]) -> None:
        n = len(trace)
        self.stats["joined"] += n
        idx = np.arange(n)
        # Parent of each span: its (trace, parent id) among the (trace, span id) of the flush
        h = trace ^ (span * _MIX)
        order = np.argsort(h)
        hs = h[order]
        hp = trace ^ (parent * _MIX)
        pos = np.minimum(np.searchsorted(hs, hp), n - 1)
        found = (hs[pos] == hp) & (parent != 0)
        up = np.where(found, order[pos], -1)
        up[up == idx] = -1  # (a span naming itself)
        self.stats["orphans"] += int(((parent != 0) & (up < 0)).sum())

        # Windows: each span's (service, window start); late ones (already closed) dropped
        ws = end - end % self.window_ns
        done = _lookup(closed, svc, n)
        live = ws + self.window_ns > done

        child = np.flatnonzero(up >= 0)
        p = up[child]
        dur = end - start
        child_ns = _covered(child, p, start, end, n)

        # Entry points: nearest ancestor-or-self that is a root, SERVER or CONSUMER span
        is_entry = (parent == 0) | (kind == SERVER) | (kind == CONSUMER)
        entry = np.where(is_entry, idx, up)
        for _ in range(64):  # pointer doubling: depth 2**64 is beyond any trace
            nxt = np.where(entry >= 0, entry[np.maximum(entry, 0)], -1)
            if np.array_equal(nxt, entry):
                break
            entry = nxt
        entry[entry >= 0] = np.where(is_entry[entry[entry >= 0]], entry[entry >= 0], -1)
        # each span's entry point strictly above it (an entry point's own is the next one up)
        entry = np.where(up >= 0, entry[np.maximum(up, 0)], -1)

        self.stats["late"] += int((~live).sum())
        # Each span's window among the flush's (service, window) pairs (most flushes have
        # one); then per pair, its spans, the edges whose parent is in it and the spans
        # under an entry point in it, handed over as they are (summed when it closes)
        under = np.flatnonzero(entry >= 0)
        if live.all() and (svc == svc[0]).all() and (ws == ws[0]).all():
            groups = [(int(svc[0]), int(ws[0]), idx, np.arange(len(child)), under)]
        else:
            slot = ws // self.window_ns
            wkey = svc.astype(np.int64) * (int(slot.max() - slot.min()) + 1) + (slot - slot.min())
            wkey[~live] = -1
            keys, gid = _dense(wkey)
            by = _split(gid, idx), _split(gid[p], np.arange(len(child))), _split(gid[under], under)
            none = np.zeros(0, np.int64)
            groups = [(int(svc[by[0][g][0]]), int(ws[by[0][g][0]]), by[0][g], by[1].get(g, none), by[2].get(g, none))
                      for g, key in enumerate(keys.tolist()) if key >= 0]
        for s, w, rows, mine, below in groups:
            part = self._open.get((s, w))
            if part is None:
                part = self._open[(s, w)] = _Partial()
            c, pp = child[mine], p[mine]
            part.add(loc[rows], ver[rows], dur[rows], child_ns[rows], loc[pp], ver[pp], loc[c], dur[c],
                     loc[below], loc[entry[below]], dur[below], ver[below])
            self.stats["edges"] += len(c)

    # -- out -------------------------------------------------------------------------------

    def take(self, svc: int, window_start: int) -> dict[int, LocationGraph]:
        """The figures of a service's window, which is closing: location id -> LocationGraph."""
        part = self._open.pop((svc, window_start), None)
        return part.figures() if part is not None else {}

    def forget_service(self, svc: int) -> None:
        for key in [k for k in self._open if k[0] == svc]:
            del self._open[key]


class _Partial:
    """One open window's figures: the flushes' rows, summed per key when the window closes
    (and whenever more than ``_COMPACT_AT`` rows are held)."""

    __slots__ = ("parts", "held")

    def __init__(self):
        # spans: (location, version) -> calls, ns, child ns; edges: (caller, callee, caller's
        # version) -> calls, ns; entries: (location, entry point, version) -> calls, ns
        self.parts: tuple[list, list, list] = ([], [], [])
        self.held = 0

    def add(self, loc, ver, dur, child_ns, ploc, pver, cloc, cdur, uloc, eloc, udur, uver) -> None:
        one = np.ones(len(loc), np.int64)
        self.parts[0].append(((loc, ver), (one, dur, child_ns)))
        if len(ploc):
            self.parts[1].append(((ploc, cloc, pver), (np.ones(len(ploc), np.int64), cdur)))
        if len(uloc):
            self.parts[2].append(((uloc, eloc, uver), (np.ones(len(uloc), np.int64), udur)))
        self.held += len(loc) + len(ploc) + len(uloc)
        if self.held > _COMPACT_AT:
            self.parts = tuple([_summed(p)] if p else [] for p in self.parts)
            self.held = sum(len(p[0][1][0]) for p in self.parts if p)

    def figures(self) -> dict[int, LocationGraph]:
        out: dict[int, LocationGraph] = {}
        spans, edges, entries = (_summed(p) if p else None for p in self.parts)
        if spans is not None:
            (loc, ver), (calls, ns, child_ns) = spans
            for lo, v, c, t, ct in zip(loc.tolist(), ver.tolist(), calls.tolist(), ns.tolist(), child_ns.tolist()):
                g = out.get(lo)
                if g is None:
                    g = out[lo] = LocationGraph()
                g.calls += c
                g.ns += t
                g.child_ns += ct
                g.versions[v] = c
                g.version_ns[v] = [t, ct]
        if edges is not None:
            (ploc, cloc, pver), (calls, ns) = edges
            for p, c, v, k, t in zip(ploc.tolist(), cloc.tolist(), pver.tolist(), calls.tolist(), ns.tolist()):
                children = out.setdefault(p, LocationGraph()).children
                f = children.get(c)
                if f is None:
                    f = children[c] = Child()
                f.calls += k
                f.ns += t
                f.by_version[v] = k
                f.ns_by_version[v] = t
        if entries is not None:
            (uloc, eloc, uver), (calls, ns) = entries
            for u, e, v, c, t in zip(uloc.tolist(), eloc.tolist(), uver.tolist(), calls.tolist(), ns.tolist()):
                g = out.setdefault(u, LocationGraph())
                both = g.entries.get(e)
                g.entries[e] = [c, t] if both is None else [both[0] + c, both[1] + t]
                g.entries_by_version.setdefault(v, {})[e] = [c, t]
        return out


_COMPACT_AT = 1 << 18


def _summed(parts: list) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Rows (key columns, value columns) of several flushes, summed per distinct key:
    one (key columns, sums) part, keys sorted."""
    keys = [np.concatenate([np.asarray(p[0][j], np.int64) for p in parts]) for j in range(len(parts[0][0]))]
    values = [np.concatenate([np.asarray(p[1][j], np.int64) for p in parts]) for j in range(len(parts[0][1]))]
    widths = [max(int(k.max()).bit_length(), 1) if len(k) else 1 for k in keys]
    if min((int(k.min()) if len(k) else 0) for k in keys) < 0 or sum(widths) > 62:
        order = np.lexsort(keys[::-1])  # (ids too wide to pack in one integer)
        sk = [k[order] for k in keys]
        first = np.concatenate(([True], np.any([k[1:] != k[:-1] for k in sk], axis=0))) if len(order) else \
            np.zeros(0, bool)
        starts = np.flatnonzero(first)
        return tuple(k[starts] for k in sk), tuple(np.add.reduceat(v[order], starts) if len(starts) else v[:0]
                                                   for v in values)
    packed = np.zeros(len(keys[0]), np.int64)
    for k, w in zip(keys, widths):
        packed = (packed << w) | k
    order = np.argsort(packed, kind="stable")
    packed = packed[order]
    starts = np.flatnonzero(np.concatenate(([True], packed[1:] != packed[:-1]))) if len(packed) else order
    sums = tuple(np.add.reduceat(v[order], starts) if len(starts) else v[:0] for v in values)  # (exact)
    cols, rest = [], packed[starts]
    for w in reversed(widths):
        cols.append(rest & ((1 << w) - 1))
        rest = rest >> w
    return tuple(cols[::-1]), sums


def _lookup(table: dict[int, int], svc: np.ndarray, n: int) -> np.ndarray:
    """``table[svc]`` per span (services missing: the smallest int64)."""
    top = max(int(svc.max()) if n else 0, max(table, default=0)) + 1
    values = np.full(top, np.iinfo(np.int64).min, np.int64)
    if table:
        values[np.fromiter(table.keys(), np.int64, len(table))] = np.fromiter(table.values(), np.int64, len(table))
    return values[svc]


def _dense(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(key, return_inverse=True)`` for keys >= -1, by counting when they are
    small (a flush's few windows), which is linear where a sort is not."""
    top = int(key.max()) + 2
    if top > 4 * len(key) + 1024:
        return np.unique(key, return_inverse=True)
    present = np.flatnonzero(np.bincount(key + 1, minlength=top))
    rank = np.zeros(top, np.int64)
    rank[present] = np.arange(len(present))
    return present - 1, rank[key + 1]


def _split(group: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    """``rows`` by their ``group``: group -> its rows (in order)."""
    if not len(group):
        return {}
    # (few groups: as 16-bit integers numpy sorts them by radix, in linear time)
    order = np.argsort(group.astype(np.int16) if group.max() < (1 << 15) else group, kind="stable")
    g = group[order]
    cut = np.flatnonzero(g[1:] != g[:-1]) + 1
    return {int(g[a]): rows[order[a:b]] for a, b in zip(np.concatenate(([0], cut)).tolist(),
                                                        np.concatenate((cut, [len(g)])).tolist())}


def _covered(child: np.ndarray, p: np.ndarray, start: np.ndarray, end: np.ndarray, n: int) -> np.ndarray:
    """Per span, the time its children cover within it, overlaps merged (ns)."""
    out = np.zeros(n, np.int64)
    if not len(child):
        return out
    ps, pe = start[p], end[p]
    cs = np.clip(start[child], ps, pe) - ps
    ce = np.clip(end[child], ps, pe) - ps
    # by parent, then start: one sort of the parent's index plus the start's fraction of it
    order = np.argsort(p + cs / ((pe - ps) + 1.0))
    p, cs, ce = p[order], cs[order], ce[order]
    # Each parent's children laid end to end on one line (a parent's span after the previous
    # one's): a running maximum of ends then merges overlaps within a parent only.
    first = np.concatenate(([True], p[1:] != p[:-1]))
    span = (pe - ps)[order] + 1
    room = np.where(first, span, 0)
    if float(room.astype(np.float64).sum()) > 2.0**62:  # (spans of centuries: exactness is moot)
        room = room.astype(np.float64)
    offset = np.cumsum(room) - room[np.flatnonzero(first)][np.cumsum(first) - 1]
    s, e = cs + offset, ce + offset
    reach = np.maximum.accumulate(e)
    before = np.concatenate(([s[0]], reach[:-1]))
    covered = np.maximum(0, e - np.maximum(s, before))
    np.add.at(out, p, covered.astype(np.int64))
    return out
