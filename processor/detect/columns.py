"""What the detectors kept as columns over the present locations share: rows that grow in
place, the regression held per row, and the split of a window between the locations
taken in numpy and those fed to the detector itself, thawed from their rows."""

from __future__ import annotations

import numpy as np

from processor.events import Event


class PresentColumns:
    """Base of ``LatencyColumns`` and ``ScalingColumns``. A subclass lists its arrays in
    ``_ARRAYS`` as (name, shape of a row, dtype; a str in a shape names an attribute that
    gives that length), and implements ``put``, ``row``, ``_fast`` and perhaps ``_route``."""

    present_only = True  # fed the present locations of a service window (``update_present``)
    _ARRAYS: tuple = ()

    def __init__(self, det):
        self.det = det
        self.open: dict[int, tuple] = {}  # the open regression, frozen
        self.windows_in_numpy = self.windows_one_at_a_time = 0  # location-windows taken each way
        self._alloc(0)

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
            self._alloc(max(n, size + size // 4, 16))

    def _hold_open(self, i: int, frozen: tuple | None) -> None:
        if frozen is None:
            self.open.pop(i, None)
        else:
            self.open[i] = frozen

    def forget(self, i: int) -> None:
        """Let go of row ``i``'s objects (its location was forgotten; ``put`` sets it anew)."""
        self.open.pop(i, None)

    def update_present(self, ids: np.ndarray, observations: list) -> list[Event]:
        """One closed window of a service: ``ids`` the present locations (rows), with their
        ``observations``. Returns the events."""
        m = len(ids)
        if not m:
            return []
        rows = np.asarray(ids, np.int64)
        count = np.fromiter((o.window.count if o.window is not None else 0 for o in observations), np.int64, m)
        slow, extra = self._route(rows, observations, count)
        live = np.flatnonzero((count > 0) & ~slow)
        if len(live):
            slow[live[self._fast(rows[live], [observations[k] for k in live.tolist()], count[live],
                                 [extra[k] for k in live.tolist()])]] = True
        one = np.flatnonzero(slow)
        self.windows_one_at_a_time += len(one)
        self.windows_in_numpy += len(live) - int(slow[live].sum())
        events: list[Event] = []
        for k in one.tolist():
            i, obs = int(rows[k]), observations[k]
            step = obs.baseline_step
            before, after = (step[0], step[2]) if step is not None else (b"", b"")
            det = self.det.thawed(self.row(i), before)
            events += det.update(obs)
            self.put(i, det.freeze(after))
        return events

    def _route(self, rows: np.ndarray, observations: list, count: np.ndarray) -> tuple[np.ndarray, list]:
        """The present locations to feed to the detector itself (a mask), and what ``_fast``
        is to be told of each (None by default)."""
        return np.fromiter((i in self.open for i in rows.tolist()), np.bool_, len(rows)) & (count > 0), \
            [None] * len(rows)
