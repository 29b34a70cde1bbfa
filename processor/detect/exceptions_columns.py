"""``NewException`` over many locations at once: a window without an exception type new
to its location only counts; one with a new type goes through ``NewException.update``
itself, thawed from its row. The same state (tests/test_detector_columns.py)."""

from __future__ import annotations

import numpy as np

from processor.detect.columns import PresentColumns


class ExceptionColumns(PresentColumns):
    """Every location's ``NewException`` state: windows and warm-up end as columns, the
    known types (a dict per location, once it has one) beside them."""

    _ARRAYS = (("windows", (), np.int32), ("warm_ns", (), np.int64))

    def __init__(self, det):
        self.known: dict[int, dict] = {}
        super().__init__(det)

    def _put(self, i: int, state: tuple | None = None, tick: int = 0) -> int:
        self._room(i + 1)
        known, windows = (state or self.det.freeze())[:2]
        self.windows[i] = windows
        self.warm_ns[i] = state[2] if state is not None and len(state) > 2 else 0
        if known is None:
            self.known.pop(i, None)
        else:
            self.known[i] = known
        return tick

    def forget(self, i: int) -> None:
        super().forget(i)
        self.known.pop(i, None)

    def _row(self, i: int, tick: int = 0) -> tuple:
        return self.known.get(i), int(self.windows[i]), int(self.warm_ns[i])

    _EXTRAS = ("known",)

    def _extras(self, ids: list[int]) -> list[tuple]:
        known = self.known
        return [(known.get(i),) for i in ids]

    def _put_extras(self, i: int, extras: tuple) -> None:
        (known,) = extras
        if known is not None and type(known) is not dict:
            raise ValueError("exceptions: a record's known types are not a map")
        if known is not None:
            self.known[i] = known

    def _route(self, rows: np.ndarray, observations: list, count: np.ndarray) -> tuple[np.ndarray, list]:
        """To the detector itself: a window with a type the location does not know."""
        slow = np.zeros(len(rows), bool)
        for k, (i, obs) in enumerate(zip(rows.tolist(), observations)):
            if count[k] and obs.window.exceptions:
                known = self.known.get(i, ())
                slow[k] = any(t not in known for t in obs.window.exceptions)
        return slow, [None] * len(rows)

    def _fast(self, rows: np.ndarray, observations: list, count: np.ndarray, _=None) -> np.ndarray:
        self.windows[rows] += 1
        warmed = np.flatnonzero(self.windows[rows] == self.det.warmup_windows)
        self.warm_ns[rows[warmed]] = [observations[k].end_ns for k in warmed.tolist()]
        return np.zeros(len(rows), bool)
