"""Log-bucket latency sketch with a relative-accuracy guarantee (DDSketch).

A value ``x`` (nanoseconds, >= 1) falls in bucket ``i = ceil(log(x) / log(gamma))`` with
``gamma = (1 + alpha) / (1 - alpha)``; the bucket is represented by
``2 * gamma**i / (gamma + 1)``, which is within ``alpha`` of every value in it. Sketches
merge exactly by adding counts, so windows, versions and processes combine without loss.

The quantile ``q`` is the value of rank ``floor(q * (n - 1))`` in sorted order (numpy's
``method="lower"``), returned within ``alpha`` relative error.

>>> import numpy as np
>>> s = LogSketch.from_values(np.array([1_000_000, 2_000_000, 3_000_000]))
>>> abs(s.quantile(0.5) / 2_000_000 - 1) <= ALPHA
True
>>> s.merge(s).count
6.0
"""

from __future__ import annotations

import struct

import numpy as np

ALPHA = 0.01
GAMMA = (1 + ALPHA) / (1 - ALPHA)
LOG_GAMMA = float(np.log(GAMMA))
# Largest bucket index: values up to 2**63 ns fit below it; used to pack (series, bucket).
MAX_BUCKET = int(np.ceil(np.log(2.0**63) / LOG_GAMMA)) + 1


def bucket_index(values_ns: np.ndarray) -> np.ndarray:
    """Bucket index of each value in nanoseconds; values below 1 ns count as 1 ns."""
    v = np.maximum(np.asarray(values_ns, dtype=np.float64), 1.0)
    return np.ceil(np.log(v) / LOG_GAMMA).astype(np.int32)


def bucket_value(index: np.ndarray | int) -> np.ndarray | float:
    """Representative value (ns) of a bucket: within ALPHA of everything in it."""
    return 2.0 * np.power(GAMMA, index) / (GAMMA + 1.0)


# The arrays of every empty sketch: one pair, read-only (sketches are values, never changed
# in place), so the many empty sketches (a fresh baseline, a watch's segment) cost no arrays.
_NO_INDEX = np.zeros(0, np.int32)
_NO_COUNTS = np.zeros(0, np.float64)
_NO_INDEX.flags.writeable = _NO_COUNTS.flags.writeable = False

# ``LogSketch.pack``: the trailer (lowest bucket, buckets spanned, flags) and the count types.
_TRAILER = struct.Struct("<iIB")
_F8, _U1, _U2, _U4 = 0, 1, 2, 3
_DTYPES = (np.dtype(np.float64), np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
_KIND_MASK, _DENSE = 0x0F, 0x10


class LogSketch:
    """Sparse, mergeable log-bucket histogram: sorted bucket indices with their counts.

    Counts are floats so that a baseline can decay them; fresh windows hold integers.
    """

    __slots__ = ("index", "counts")

    def __init__(self, index: np.ndarray | None = None, counts: np.ndarray | None = None):
        self.index = _NO_INDEX if index is None else index
        self.counts = _NO_COUNTS if counts is None else counts

    @classmethod
    def from_values(cls, values_ns: np.ndarray) -> "LogSketch":
        idx, counts = np.unique(bucket_index(values_ns), return_counts=True)
        return cls(idx.astype(np.int32), counts.astype(np.float64))

    @property
    def count(self) -> float:
        return float(self.counts.sum())

    def merge(self, other: "LogSketch") -> "LogSketch":
        """A new sketch holding both; exact (counts add)."""
        if not len(other.index):
            return LogSketch(self.index, self.counts)
        if not len(self.index):
            return LogSketch(other.index, other.counts)
        # Fast path: other's buckets are all among ours (a baseline absorbing a window).
        pos = np.searchsorted(self.index, other.index)
        if pos[-1] < len(self.index) and np.array_equal(self.index[pos], other.index):
            counts = self.counts.astype(np.float64)  # a copy: sketches are values, never shared
            counts[pos] += other.counts
            return LogSketch(self.index, counts)
        # Otherwise over the buckets' range, each count added once, ours first (as 0.0 + ours
        # + theirs: what summing them in that order gives, bit for bit).
        lo = min(int(self.index[0]), int(other.index[0]))
        span = max(int(self.index[-1]), int(other.index[-1])) - lo + 1
        ours, theirs = self.index - lo, other.index - lo
        counts = np.zeros(span)
        counts[ours] = self.counts
        counts[theirs] += other.counts
        present = np.zeros(span, np.bool_)
        present[ours] = True
        present[theirs] = True
        where = present.nonzero()[0]
        return LogSketch((where + lo).astype(np.int32), counts[where])

    def scaled(self, factor: float, min_count: float = 1e-3) -> "LogSketch":
        """Counts multiplied by ``factor`` (decay); buckets that fall below ``min_count`` go."""
        counts = self.counts * factor
        keep = counts >= min_count
        return LogSketch(self.index[keep], counts[keep])

    def pack(self) -> bytes:
        """The sketch as one bytes object: what a long-lived sketch (a baseline, a suspect
        segment) is kept as between windows, at a fraction of the overhead of two numpy
        arrays. ``unpack`` gives back the same values, bit for bit.

        Layout: the counts, then which buckets of ``[lo, hi]`` are present, then a trailer.
        Counts that are all whole numbers below 2**32 (a window's, or a sum of windows') are
        stored in the narrowest unsigned type that holds them, others (a decayed baseline's)
        as float64, first so that they stay aligned and are read without a copy. Presence is
        a bitmap over ``[lo, hi]`` (one bit per bucket; left out when every bucket of the range
        is present), so a bucket costs its count plus a bit rather than a count and an int32.
        """
        index, counts = self.index, self.counts
        n = len(index)
        if not n:
            return b""
        if counts.dtype != np.float64:
            counts = counts.astype(np.float64)
        lo = int(index[0])
        span = int(index[-1]) - lo + 1
        kind = _F8
        # Whole counts (a cheap look at two first: a decayed baseline's almost never are)
        if float(counts[0]).is_integer() and float(counts[-1]).is_integer():
            top = float(counts.max())
            if top < 2.0**32 and (counts == np.floor(counts)).all():
                kind = _U1 if top < 2.0**8 else _U2 if top < 2.0**16 else _U4
                counts = counts.astype(_DTYPES[kind])
        if span == n:
            return counts.tobytes() + _TRAILER.pack(lo, span, kind | _DENSE)
        present = np.zeros(span, np.bool_)
        present[index - lo] = True
        return counts.tobytes() + np.packbits(present).tobytes() + _TRAILER.pack(lo, span, kind)

    @classmethod
    def unpack(cls, data: bytes) -> "LogSketch":
        """The sketch ``pack`` made. Float64 counts are a read-only view of ``data`` (no copy),
        narrower ones are converted back; the index is rebuilt as int32 (arrays of its own)."""
        if not data:
            return cls()
        lo, span, flags = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
        kind = flags & _KIND_MASK
        dtype = _DTYPES[kind]
        if flags & _DENSE:
            n = span
            index = np.arange(lo, lo + span, dtype=np.int32)
        else:
            nbits = (span + 7) >> 3
            n = (len(data) - _TRAILER.size - nbits) // dtype.itemsize
            index = np.unpackbits(np.frombuffer(data, np.uint8, nbits, n * dtype.itemsize), count=span).nonzero()[0]
            index += lo
            index = index.astype(np.int32)
        counts = np.frombuffer(data, dtype, n)
        return cls(index, counts if kind == _F8 else counts.astype(np.float64))

    def quantiles(self, qs) -> np.ndarray:
        """Values (ns) at quantiles ``qs``; NaN for an empty sketch."""
        qs = np.atleast_1d(np.asarray(qs, dtype=np.float64))
        cum = np.cumsum(self.counts)
        total = cum[-1] if len(cum) else 0.0  # (a running sum: the same in rows_quantiles' grid)
        if total <= 0:
            return np.full(len(qs), np.nan)
        # The bucket holding rank floor(q * (n - 1)): first one whose cumulative count exceeds it.
        ranks = np.floor(qs * (total - 1))
        pos = np.searchsorted(cum, ranks, side="right")
        pos = np.minimum(pos, len(cum) - 1)
        return bucket_value(self.index[pos].astype(np.float64))

    def quantile(self, q: float) -> float:
        return float(self.quantiles([q])[0])

    def __repr__(self) -> str:
        return f"LogSketch(count={self.count:g}, buckets={len(self.index)})"


_TRAILER_ROWS = np.dtype([("lo", "<i4"), ("span", "<u4"), ("flags", "u1")])  # _TRAILER, as rows
_EMPTY_SKETCH = LogSketch()
_ITEMSIZES = np.array([d.itemsize for d in _DTYPES])
_PAD = [b"\0" * k for k in range(8)]
_ROWS_FROM, _ROWS_CHUNK = 16, 64  # sketches from which unpack_rows takes them at once, and how many


def pack_rows(index: np.ndarray, counts: np.ndarray, bounds: list[int]) -> list[bytes]:
    """``LogSketch.pack`` of many sketches held end to end (sketch k's buckets are
    ``index[bounds[k]:bounds[k + 1]]``, sorted, its counts the same slice of ``counts``):
    the same bytes. Every sketch's layout is written into one buffer at once, then cut.

    >>> a = LogSketch.from_values(np.array([1e6, 2e6, 3e6, 3e6]))
    >>> b = LogSketch.from_values(np.array([5e6] * 9 + [9e7])).scaled(0.5)
    >>> pack_rows(np.concatenate([a.index, b.index]), np.concatenate([a.counts, b.counts]),
    ...           [0, 3, 3, 5]) == [a.pack(), b"", b.pack()]
    True
    """
    edges = np.asarray(bounds, np.int64)
    index = np.asarray(index[edges[0]:edges[-1]], np.int64)
    counts = np.asarray(counts[edges[0]:edges[-1]], np.float64)
    sizes = np.diff(edges)
    full = np.flatnonzero(sizes)
    out = [b""] * len(sizes)
    if not len(full):
        return out
    n = sizes[full]
    first = (edges[:-1] - edges[0])[full]
    lo = index[first]
    span = index[first + n - 1] - lo + 1
    dense = span == n
    # Each sketch's count type: the narrowest unsigned one when all its counts are whole
    # numbers below 2**32, else float64 (as pack decides it).
    whole = np.logical_and.reduceat(counts == np.floor(counts), first)
    top = np.maximum.reduceat(counts, first)
    kind = np.full(len(full), _F8, np.int64)
    ints = whole & (top < 2.0**32)
    kind[ints] = np.where(top[ints] < 2.0**8, _U1, np.where(top[ints] < 2.0**16, _U2, _U4))
    # The three parts, each for all sketches end to end, then joined sketch by sketch
    row = np.repeat(np.arange(len(full)), n)
    parts_of = np.zeros(len(full), np.int64)  # each sketch's offset in its count type's bytes
    data = {}
    for k in np.unique(kind).tolist():
        rows = np.flatnonzero(kind == k)
        data[k] = counts[kind[row] == k].astype(_DTYPES[k]).tobytes()
        size = n[rows] * _DTYPES[k].itemsize
        parts_of[rows] = np.cumsum(size) - size
    bitmap = np.where(dense, 0, (span + 7) >> 3)
    bit_of = np.cumsum(bitmap) - bitmap  # each sketch's offset in the bitmaps' bytes
    bitmaps = b""
    if not dense.all():  # presence bitmaps, each from a byte boundary, packed at once
        bits = np.zeros(int(bitmap.sum()) * 8, np.bool_)
        mine = ~dense[row]
        bits[bit_of[row[mine]] * 8 + (index[mine] - lo[row[mine]])] = True
        bitmaps = np.packbits(bits).tobytes()
    trailers = np.empty(len(full), _TRAILER_ROWS)
    trailers["lo"], trailers["span"] = lo, span
    trailers["flags"] = kind | np.where(dense, _DENSE, 0)
    tail = trailers.tobytes()
    t = _TRAILER.size
    for r, (k, kd, a, size, b, nb) in enumerate(zip(full.tolist(), kind.tolist(), parts_of.tolist(),
                                                    (n * np.array([d.itemsize for d in _DTYPES])[kind]).tolist(),
                                                    bit_of.tolist(), bitmap.tolist())):
        out[k] = data[kd][a:a + size] + bitmaps[b:b + nb] + tail[r * t:(r + 1) * t]
    return out


def unpack_rows(datas: list[bytes]) -> list[LogSketch]:
    """``LogSketch.unpack`` of many packed sketches at once: the same values, bit for bit.
    Their bytes are joined, each from an 8-byte boundary, so every sketch's counts (which
    lead its bytes) are read through one view of their type; trailers and presence bits are
    read for all sketches at once. Each sketch is a view of the shared arrays (a sketch is
    a value, never changed in place). Below ``_ROWS_FROM`` sketches, one at a time is cheaper;
    more than ``_ROWS_CHUNK`` are taken that many at a time.

    >>> a = LogSketch.from_values(np.array([1e6, 2e6, 3e6, 3e6]))
    >>> b = LogSketch.from_values(np.array([5e6] * 9 + [9e7])).scaled(0.5)
    >>> [(s.index.tolist(), s.counts.tolist()) for s in unpack_rows([a.pack(), b"", b.pack()] * 9)] == [
    ...     (s.index.tolist(), s.counts.tolist()) for s in (a, LogSketch(), b)] * 9
    True
    """
    if len(datas) < _ROWS_FROM:
        return [LogSketch.unpack(d) for d in datas]
    out = []
    for a in range(0, len(datas), _ROWS_CHUNK):  # (arrays that stay in the cache: wider passes were slower)
        part = datas[a:a + _ROWS_CHUNK]
        sketches = _unpack_chunk(part)
        # bytes pack did not make: as unpack takes them, one by one (never a neighbour's bytes)
        out += [LogSketch.unpack(d) for d in part] if sketches is None else sketches
    return out


def _unpack_chunk(datas: list[bytes]) -> list[LogSketch] | None:
    """``unpack_rows`` of up to ``_ROWS_CHUNK`` sketches; None if one is not what pack makes."""
    out = [_EMPTY_SKETCH] * len(datas)
    lens = np.fromiter(map(len, datas), np.int64, len(datas))
    full = np.flatnonzero(lens)
    if not len(full):
        return out
    t = _TRAILER.size
    if (lens[full] < t).any():
        return None
    padded = (lens + 7) & ~7
    raw = np.frombuffer(b"".join([d + _PAD[-len(d) & 7] for d in datas]), np.uint8)
    starts = (np.cumsum(padded) - padded)[full]  # each sketch's first byte in ``raw`` (8-aligned)
    trailers = raw[(starts + lens[full] - t)[:, None] + np.arange(t)].copy().view(_TRAILER_ROWS).ravel()
    lo = trailers["lo"].astype(np.int64)
    span = trailers["span"].astype(np.int64)
    kind = (trailers["flags"] & _KIND_MASK).astype(np.int64)
    dense = (trailers["flags"] & _DENSE) != 0
    if (kind >= len(_DTYPES)).any():
        return None
    itemsize = _ITEMSIZES[kind]
    nbits = np.where(dense, 0, (span + 7) >> 3)
    n = np.where(dense, span, (lens[full] - t - nbits) // itemsize)
    if (n < 0).any() or (n * itemsize + nbits + t != lens[full]).any():  # (each part's length, as pack lays it)
        return None
    edges = np.concatenate(([0], np.cumsum(n)))
    row = np.repeat(np.arange(len(full)), n)
    at = np.arange(int(edges[-1])) - edges[:-1][row]  # each bucket's place in its sketch
    kinds = np.unique(kind).tolist()
    if len(kinds) == 1:  # (the common case: a window's sketches alike, or baselines all decayed)
        size = _DTYPES[kinds[0]].itemsize
        counts = raw.view(_DTYPES[kinds[0]])[np.repeat(starts // size, n) + at].astype(np.float64)
    else:
        counts = np.empty(len(at))
        for k in kinds:  # counts, through a view of their type
            mine = kind[row] == k
            size = _DTYPES[k].itemsize
            counts[mine] = raw.view(_DTYPES[k])[starts[row[mine]] // size + at[mine]]
    if dense.all():
        index = (lo[row] + at).astype(np.int32)
    else:  # presence bits: the set ones of each bitmap, in order (padding bits are never set)
        sparse = np.flatnonzero(~dense)
        nb = nbits[sparse]
        first = starts[sparse] + n[sparse] * itemsize[sparse]  # each bitmap's first byte
        bit_edges = np.cumsum(nb) - nb
        brow = np.repeat(np.arange(len(sparse)), nb)
        bits = np.unpackbits(raw[first[brow] + np.arange(int(nb.sum())) - bit_edges[brow]])
        pos = np.flatnonzero(bits)
        owner = brow[pos >> 3]  # each set bit's sketch, among the sparse ones
        place = pos - bit_edges[owner] * 8
        if not np.array_equal(np.bincount(owner, minlength=len(sparse)), n[sparse]) or (
                place >= span[sparse][owner]).any():
            return None
        found = place + lo[sparse][owner]
        if len(sparse) == len(full):
            index = found.astype(np.int32)
        else:
            index = (lo[row] + at).astype(np.int32)
            index[np.repeat(~dense, n)] = found
    bounds = edges.tolist()
    for r, k in enumerate(full.tolist()):
        out[k] = LogSketch(index[bounds[r]:bounds[r + 1]], counts[bounds[r]:bounds[r + 1]])
    return out


def window_quantiles(sketches: list[LogSketch], qs) -> np.ndarray:
    """``LogSketch.quantiles`` of many sketches (``rows_quantiles`` of them end to end): row
    i holds sketch i's values (ns) at ``qs``, the same values as one call per sketch (NaN
    for an empty one).

    >>> a = LogSketch.from_values(np.array([1e6, 2e6, 3e6]))
    >>> b = LogSketch.from_values(np.array([5e6] * 9 + [9e7]))
    >>> bool((window_quantiles([a, b], (0.5, 0.99)) == np.vstack([a.quantiles((0.5, 0.99)),
    ...                                                          b.quantiles((0.5, 0.99))])).all())
    True
    """
    bounds = np.concatenate(([0], np.cumsum([len(sk.index) for sk in sketches]))).tolist()
    return rows_quantiles(np.concatenate([sk.index for sk in sketches] + [_NO_INDEX]),
                          np.concatenate([sk.counts for sk in sketches] + [_NO_COUNTS]), bounds, qs)


def quantile_positions(cum: np.ndarray, sizes: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Per row of running sums (zero-padded rows of ``sizes`` buckets) and quantile, the
    position of the bucket ``LogSketch.quantiles`` takes. Past a row's end its sum stays at
    its total, above every rank: the count of sums at or below a rank is where
    ``searchsorted(side="right")`` puts it."""
    ranks = np.floor(qs[None, :] * (cum[:, -1][:, None] - 1))
    pos = (cum[:, None, :] <= ranks[:, :, None]).sum(axis=2)
    return np.minimum(pos, np.maximum(sizes, 1)[:, None] - 1)


def rows_quantiles(index: np.ndarray, counts: np.ndarray, bounds: list[int], qs, chunk: int = 512) -> np.ndarray:
    """``LogSketch.quantiles`` of many sketches held end to end (sketch k's buckets are
    ``index[bounds[k]:bounds[k + 1]]``, its counts the same slice of ``counts``), any counts
    (decayed ones too): row k holds sketch k's values (ns) at ``qs``, NaN for an empty one.
    The same values, bit for bit, as one call per sketch: the cumulative sums run along
    zero-padded rows, ``chunk`` sketches of like width at a time (a running sum in order, as
    ``np.cumsum`` of each alone), and each total is the last of them.

    >>> a = LogSketch.from_values(np.array([1e6, 2e6, 3e6])).scaled(0.7)
    >>> b = LogSketch.from_values(np.array([5e6] * 9 + [9e7]))
    >>> out = rows_quantiles(np.concatenate([a.index, b.index]), np.concatenate([a.counts, b.counts]),
    ...                      [0, 3, 5], (0.5, 0.99))
    >>> bool((out == np.vstack([a.quantiles((0.5, 0.99)), b.quantiles((0.5, 0.99))])).all())
    True
    """
    qs = np.asarray(qs, dtype=np.float64)
    edges = np.asarray(bounds, np.int64)
    n = len(edges) - 1
    out = np.full((n, len(qs)), np.nan)
    # Sketches of like width together: one wide sketch does not widen a whole chunk's grid.
    order = np.argsort(np.diff(edges), kind="stable")
    for lo in range(0, n, chunk):
        sel = order[lo:lo + chunk]
        starts, sizes = edges[sel], edges[sel + 1] - edges[sel]
        m, width = len(sel), int(sizes.max())
        if not width:
            continue
        rows = np.repeat(np.arange(m), sizes)
        cols = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        grid = np.zeros((m, width))
        grid[rows, cols] = counts[np.repeat(starts, sizes) + cols]
        cum = np.cumsum(grid, axis=1)
        totals = cum[:, -1]
        pos = quantile_positions(cum, sizes, qs)
        at = np.minimum(starts[:, None] + pos, max(len(index) - 1, 0))  # (an empty row: any)
        full = totals > 0
        out[sel[full]] = bucket_value(index[at].astype(np.float64))[full]
    return out
