"""What the detectors kept as columns over the present locations share: rows that grow in
place, the regression held per row, and the split of a window between the locations
taken in numpy and those fed to the detector itself, thawed from their rows."""

from __future__ import annotations

import marshal

import numpy as np

from processor.detect.stats import _log, mean_log_rows
from processor.events import Event

# A row in a checkpoint as its columns hold it: (RECORD, the bytes of its numeric arrays
# in ``layout`` order, its other values); ``from_record`` gives back ``row``'s tuple.
RECORD = "columns"


def is_record(state) -> bool:
    """Whether a saved state is a record of columns (else a detector's plain state)."""
    return type(state) is tuple and state[:1] == (RECORD,)


def record_dtype(cols) -> np.dtype:
    """A row's numeric arrays of ``cols`` (``_NUMERIC``) as one packed structured dtype, in
    the order a record holds them (kept on ``cols``: a row's shape is set by the settings)."""
    dtype = cols.__dict__.get("_record")
    if dtype is None:
        dtype = cols._record = np.dtype([(name, getattr(cols, name).dtype, getattr(cols, name).shape[1:])
                                         for name in cols._NUMERIC])
    return dtype


def record_layout(cols) -> str:
    """What a record of ``cols`` holds (its arrays' names, dtypes and shapes, then its other
    values' names, ``_EXTRAS``), for the checkpoint's fingerprint."""
    return repr((record_dtype(cols).descr, cols._EXTRAS))


def record_scratch(cols):
    """A one-row instance of ``cols``'s class, kept on it, that records are read into."""
    scratch = cols.__dict__.get("_record_scratch")
    if scratch is None:
        scratch = cols._record_scratch = type(cols)(cols.det)
        scratch._room(1)
    return scratch


def take_records(cols, ids: list[int], extras: list[tuple]) -> list[tuple]:
    """Records of rows ``ids`` of ``cols``: each numeric array read once for all of them,
    ``extras`` the rows' other values."""
    r = np.asarray(ids, np.int64)
    n = len(ids)
    fixed = np.concatenate([getattr(cols, name)[r].reshape(n, -1).view(np.uint8) for name in cols._NUMERIC], axis=1)
    w, buf = fixed.shape[1], fixed.tobytes()
    return [(RECORD, buf[k * w:(k + 1) * w], e) for k, e in enumerate(extras)]


def read_record(cols, record, i: int):
    """Set row ``i`` of ``cols``'s numeric arrays from a record's bytes; its other values
    (ValueError if it is not a record of this layout)."""
    if type(record) is not tuple or len(record) != 3 or record[0] != RECORD or type(record[1]) is not bytes \
            or type(record[2]) is not tuple:
        raise ValueError("not a record of columns")
    dtype = record_dtype(cols)
    if len(record[1]) != dtype.itemsize:
        raise ValueError("a record of columns of another layout")
    values = np.frombuffer(record[1], dtype)[0]
    for name in cols._NUMERIC:
        getattr(cols, name)[i] = values[name]
    return record[2]


def load_measure(observations: list, count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Observation.others_load`` of each (NaN where None), whether there is one, and each
    window's length (ns, as a float)."""
    m = len(observations)
    span = np.fromiter((o.end_ns - o.start_ns for o in observations), np.float64, m)
    calls = np.fromiter((o.service_calls for o in observations), np.float64, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        others = calls - count / (span / 1e9)
    has_x = others > 1e-9
    x = np.full(m, np.nan)
    x[has_x] = _log(others[has_x])
    return x, has_x, span


def mean_logs(observations: list) -> np.ndarray:
    """``Observation.mean_log_ms`` of each, computed at once for those not known yet (and
    kept on them for the other detectors)."""
    todo = [o for o in observations if o._mean_log is None]
    if todo:
        for o, v in zip(todo, mean_log_rows([o.window.sketch for o in todo]).tolist()):
            o._mean_log = v
    return np.fromiter((o._mean_log for o in observations), np.float64, len(observations))


class PresentColumns:
    """Base of the latency, scaling, error and exception columns. A subclass lists its arrays in
    ``_ARRAYS`` as (name, shape of a row, dtype; a str in a shape names an attribute that
    gives that length), and implements ``_put``, ``_row``, ``_fast`` and perhaps ``_route``."""

    present_only = True  # fed the present locations of a service window (``update_present``)
    _ARRAYS: tuple = ()
    _APART: tuple = ()  # numeric arrays a record holds among its other values (mostly empty rows)
    _EXTRAS: tuple = ()  # a record's other values, in order (``_extras``)
    # Present locations from which a window is taken in numpy: below, numpy's fixed cost per
    # call outweighs the Python it saves (benchmarks/window_close.py --locations).
    min_numpy = 12
    chunk = 2048  # present locations per numpy pass at most (bounds its arrays)

    def __init__(self, det):
        self.det = det
        self.open: dict[int, tuple] = {}  # the open regression, frozen
        # Rows held as their frozen state, marshalled (a location seen in small windows
        # only: thawed and frozen as cheaply as before columns), not in the columns
        self.packed: dict[int, bytes] = {}
        # Rows set from a detector's own freeze (or a checkpoint) since the last checkpoint:
        # the only ones that may hold what is not plain data (rows the numpy steps write are)
        self.unchecked: set[int] = set()
        self.windows_in_numpy = self.windows_one_at_a_time = 0  # location-windows taken each way
        self._alloc(0)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._NUMERIC = tuple(name for name, _, dtype in cls._ARRAYS if dtype is not object and name not in cls._APART)

    def _alloc(self, size: int) -> None:
        for name, shape, dtype in self._ARRAYS:
            shape = (size, *(getattr(self, s) if isinstance(s, str) else s for s in shape))
            old = getattr(self, name, None)
            if old is None:
                new = np.zeros(shape, dtype)
            elif dtype is object:
                new = np.empty(shape, dtype)
                new[:len(old)] = old
            else:  # grown where it lies (realloc): no copy left behind as a hole in the heap
                new = old
                new.resize(shape, refcheck=False)
            if dtype is object:
                new[len(old) if old is not None else 0:] = b""
            setattr(self, name, new)

    def _room(self, n: int) -> None:
        size = len(getattr(self, self._ARRAYS[0][0]))
        if n > size:
            self._alloc(max(n, size + size // 8, 16))  # (realloc: growing often costs little)

    def _hold_open(self, i: int, frozen: tuple | None) -> None:
        if frozen is None:
            self.open.pop(i, None)
        else:
            self.open[i] = frozen

    def forget(self, i: int) -> None:
        """Let go of row ``i``'s objects (its location was forgotten; ``put`` sets it anew)."""
        self.open.pop(i, None)
        self.packed.pop(i, None)
        self.unchecked.discard(i)

    def put(self, i: int, state: tuple | None = None, tick: int = 0) -> int:
        """Set row ``i`` to a frozen state (the detector's ``freeze``), or a new location's;
        returns ``tick``."""
        self.packed.pop(i, None)
        if state is not None:  # (a new location's is the detector's own fresh state)
            self.unchecked.add(i)
        return self._put(i, state, tick)

    def row(self, i: int, tick: int = 0) -> tuple:
        """Row ``i`` as the detector's ``freeze`` gives it."""
        packed = self.packed.get(i)
        return self._row(i, tick) if packed is None else marshal.loads(packed)

    def records(self, ids: list[int], ticks: list[int]) -> list[tuple]:
        """Rows ``ids`` as a checkpoint keeps them: records (``RECORD``), each numeric array
        read once for all of them and written as its bytes; rows held packed or set from a
        detector's freeze since the last checkpoint (``unchecked``) as ``row`` gives them."""
        if not ids:
            return []
        out = take_records(self, ids, self._extras(ids))
        packed, unchecked = self.packed, self.unchecked
        if packed or unchecked:
            for k, i in enumerate(ids):
                if i in packed or i in unchecked:
                    out[k] = self.row(i, ticks[k])
        return out

    def from_record(self, record, tick: int = 0) -> tuple:
        """The row (``row``'s tuple) that a record of ``records`` holds."""
        if not is_record(record):
            return record
        scratch = record_scratch(self)
        scratch.forget(0)
        scratch._put_extras(0, read_record(scratch, record, 0))
        return scratch._row(0, tick)

    def layout(self) -> str:
        return record_layout(self)

    def _extras(self, ids: list[int]) -> list[tuple]:
        """A record's values besides the numeric arrays, of each row."""
        raise NotImplementedError

    def _put_extras(self, i: int, extras: tuple) -> None:
        raise NotImplementedError

    def _put(self, i: int, state: tuple | None, tick: int) -> int:
        raise NotImplementedError

    def _row(self, i: int, tick: int) -> tuple:
        raise NotImplementedError

    def update_present(self, ids: np.ndarray, observations: list) -> list[Event]:
        """One closed window of a service: ``ids`` the present locations (rows), with their
        ``observations``. Returns the events."""
        m = len(ids)
        if m < self.min_numpy:
            one = list(range(m))
            self.windows_one_at_a_time += len(one)
            return self._one_at_a_time(ids, observations, one, packed=True)
        packed = self.packed
        if packed:  # into the columns, for numpy
            for i in ids.tolist():
                if i in packed:
                    self._put(i, marshal.loads(packed.pop(i)), 0)
        rows = np.asarray(ids, np.int64)
        count = np.fromiter((o.window.count if o.window is not None else 0 for o in observations), np.int64, m)
        slow, extra = self._route(rows, observations, count)
        slow |= count == 0  # (a window without calls: as the detector takes it, whatever that is)
        live = np.flatnonzero(~slow)
        # In chunks of like width: one wide sketch does not widen a whole service's arrays.
        widths = self._widths([observations[k] for k in live.tolist()])
        if widths is not None:
            live = live[np.argsort(widths, kind="stable")]
        for a in range(0, len(live), self.chunk):
            part = live[a:a + self.chunk]
            slow[part[self._fast(rows[part], [observations[k] for k in part.tolist()], count[part],
                                 [extra[k] for k in part.tolist()])]] = True
        one = np.flatnonzero(slow).tolist()
        self.windows_one_at_a_time += len(one)
        self.windows_in_numpy += len(live) - int(slow[live].sum())
        return self._one_at_a_time(rows, observations, one)

    def _one_at_a_time(self, ids, observations: list, which: list[int], packed: bool = False) -> list[Event]:
        """Feed the windows ``which`` (positions in ``ids``) to the detector itself, thawed
        from their rows and frozen back into them (``packed``: held marshalled)."""
        events: list[Event] = []
        for k in which:
            i, obs = int(ids[k]), observations[k]
            step = obs.baseline_step
            before, after = (step[0], step[2]) if step is not None else (b"", b"")
            det = self.det.thawed(self.row(i), before)
            events += det.update(obs)
            if packed:
                self.packed[i] = marshal.dumps(det.freeze(after))
                self.unchecked.add(i)
            else:
                self.put(i, det.freeze(after))
        return events

    def _widths(self, observations: list) -> np.ndarray | None:
        """How wide each location's arrays in ``_fast`` are (None: all alike)."""
        return None

    def _route(self, rows: np.ndarray, observations: list, count: np.ndarray) -> tuple[np.ndarray, list]:
        """The present locations to feed to the detector itself (a mask), and what ``_fast``
        is to be told of each (None by default)."""
        return np.fromiter((i in self.open for i in rows.tolist()), np.bool_, len(rows)), [None] * len(rows)


class VersionedColumns(PresentColumns):
    """Columns of a detector that keeps evidence per version (``VersionWatches``, frozen as
    ``(tick, ((version, last_seen, *evidence), ...))``): the evidence of the version seen
    last is columns of the subclass (``put_evidence``, ``row_evidence``), the other versions'
    are kept frozen beside them. A window of one version, the one followed, is taken in
    numpy; any other goes to the detector itself (``_route``)."""

    _WATCHES = (("wtick", (), np.int32), ("wlast", (), np.int32), ("wpos", (), np.int8))

    def __init__(self, det):
        self.others: dict[int, tuple] = {}  # watches of the other versions, frozen, in order
        self.main_version: list = []        # the version whose watches are columns (None: none)
        super().__init__(det)

    def _alloc(self, size: int) -> None:
        super()._alloc(size)
        self.main_version += [None] * (size - len(self.main_version))

    def forget(self, i: int) -> None:
        super().forget(i)
        self.others.pop(i, None)
        if i < len(self.main_version):
            self.main_version[i] = None

    def _put_watches(self, i: int, watches: tuple | None) -> None:
        """Row ``i``'s watches from their frozen form; the columns follow the version seen
        last (the latest of equals)."""
        self.others.pop(i, None)
        self.main_version[i] = None
        self.wtick[i] = -1
        if watches is None:
            return
        self.wtick[i], groups = watches
        if not groups:
            return
        k = max(range(len(groups)), key=lambda g: (groups[g][1], g))
        version, last_seen, *evidence = groups[k]
        self.main_version[i], self.wlast[i], self.wpos[i] = tuple(version), last_seen, k
        self.put_evidence(i, evidence)
        if len(groups) > 1:
            self.others[i] = tuple(groups[:k]) + tuple(groups[k + 1:])

    def _row_watches(self, i: int) -> tuple | None:
        if self.wtick[i] < 0:
            return None
        groups = list(self.others.get(i, ()))
        v = self.main_version[i]
        if v is not None:
            groups.insert(int(self.wpos[i]), (v, int(self.wlast[i]), *self.row_evidence(i)))
        return int(self.wtick[i]), tuple(groups)

    def _put_versions(self, i: int, main_version, others) -> None:
        """Row ``i``'s version followed and the other versions' watches, from a record."""
        if main_version is not None and (type(main_version) is not tuple or len(main_version) != 3):
            raise ValueError("a record's version is not (service, version, revision)")
        self.main_version[i] = main_version
        if others:
            self.others[i] = tuple(others)
        else:
            self.others.pop(i, None)

    def put_evidence(self, i: int, evidence: list) -> None:
        raise NotImplementedError

    def row_evidence(self, i: int) -> tuple:
        raise NotImplementedError

    def _route(self, rows: np.ndarray, observations: list, count: np.ndarray) -> tuple[np.ndarray, list]:
        """To the detector itself: an open regression, a window of several versions, or of
        a version whose watches are not the columns'; and each window's version."""
        slow = np.zeros(len(rows), bool)
        version: list = [None] * len(rows)
        for k, (i, obs) in enumerate(zip(rows.tolist(), observations)):
            if not count[k]:
                continue
            lw = obs.window
            versions = [v for v in lw.versions if v.count]
            if versions:
                version[k] = versions[0].version
            if (i in self.open or len(versions) != 1 or versions[0].count != lw.count
                    or (self.wtick[i] >= 0 and versions[0].version != self.main_version[i])):
                slow[k] = True
        return slow, version

    @staticmethod
    def _count_evidence(st: np.ndarray, wins: np.ndarray, tested: np.ndarray, active: np.ndarray,
                        stat: np.ndarray, hits: np.ndarray, trials: np.ndarray) -> None:
        """A window of the followed version into its watches' evidence, in place: ``st``
        (..., 5: CUSUM statistic, hits, trials, the other versions' hits and trials) and
        ``wins`` (windows). A tested watch takes its new ``stat``; one back at zero is reset,
        an ``active`` one counts the window (the other versions' figures gain nothing in a
        window of one version)."""
        st[..., 0] = np.where(tested, stat, st[..., 0])
        reset = tested & ~active
        st[reset] = 0.0
        st[..., 1] = np.where(active, st[..., 1] + hits, st[..., 1])
        st[..., 2] = np.where(active, st[..., 2] + trials, st[..., 2])
        wins[reset] = 0
        wins[active] += 1

    def _tick_watches(self, r: np.ndarray, versions: list) -> np.ndarray:
        """A judged window for rows ``r`` (``versions[k]`` the version of ``r[k]``): watches
        made where there were none (returned, a mask), the window counted, the version
        seen now."""
        fresh = self.wtick[r] < 0
        for i, k in zip(r[fresh].tolist(), np.flatnonzero(fresh).tolist()):
            self.main_version[i] = versions[k]
        f = r[fresh]
        self.wtick[f] = 0
        self.wpos[f] = 0
        self.wtick[r] += 1
        self.wlast[r] = self.wtick[r]
        return fresh
