"""``first_seen``: a code location seen for the first time ever.

Known keys are loaded from ``{prefix}:keys`` at start, so a restart does not announce old
locations again; the Redis sink adds a key and writes its event in one script, so two
processes sharing Redis cannot both announce it.
"""

from __future__ import annotations

import numpy as np

from processor.events import Event
from processor.pipeline.window import ClosedWindow, LocationWindow


class FirstSeen:
    """Asked once per location: at its first window in this process (the engine knows its
    locations), and again if it comes back after this process forgot it. The keys known
    (from ``{prefix}:keys`` at start, and those of locations this process forgot) are kept
    as sorted 64-bit integers: 8 bytes a key rather than a string's hundred, so that a
    process restarted after months of name churn does not hold every name ever seen.

    >>> from processor.pipeline.location import location_key
    >>> f = FirstSeen({location_key("prod", "shop", "f"), "not-a-key"})
    >>> f.remember([location_key("prod", "shop", "g")])
    >>> [f.seen_before(location_key("prod", "shop", n)) for n in "fgh"], f.seen_before("not-a-key")
    ([True, True, False], True)
    """

    def __init__(self, known_keys: set[str] | None = None):
        ints = [(k, _key_int(k)) for k in known_keys or ()]
        self.known = {k for k, i in ints if i is None}  # other keys (not location_key's), if any
        self._keys = np.unique(np.array([i for _, i in ints if i is not None], np.uint64))
        self._pending: list[str] = []  # remembered, merged into _keys when next asked

    def remember(self, keys: list[str]) -> None:
        """``keys`` (``location_key``s) are known: their locations are not new if they come
        (back) later."""
        self._pending += keys

    def seen_before(self, key: str) -> bool:
        """Whether the location was known from Redis or forgotten by this process."""
        return bool(self.seen_before_many([key])[0])

    def seen_before_many(self, keys: list[str]) -> np.ndarray:
        """``seen_before`` of each key, in one numpy step (a window can bring thousands of
        new locations; one step also leaves no small objects between the long-lived ones)."""
        if self._pending:
            new = np.array([int(k, 16) for k in self._pending], np.uint64)
            self._keys, self._pending = np.union1d(self._keys, new), []
        out = np.zeros(len(keys), bool)
        ints = [_key_int(k) for k in keys]
        rows = []
        for i, (k, n) in enumerate(zip(keys, ints)):
            if n is None:
                out[i] = k in self.known
            else:
                rows.append(i)
        if len(self._keys) and rows:
            found = np.array([ints[i] for i in rows], np.uint64)
            pos = np.minimum(np.searchsorted(self._keys, found), len(self._keys) - 1)
            out[rows] = self._keys[pos] == found
        return out

    def event(self, cw: ClosedWindow, lw: LocationWindow) -> Event:
        """The ``first_seen`` event of a location new in this window."""
        v = lw.main_version
        q50, q99 = lw.sketch.quantiles([0.5, 0.99]) / 1e6
        where = f" ({lw.location.file}:{lw.location.line})" if lw.location.file else ""
        in_version = f" in {v.version[1]}" if v.version[1] else ""
        return Event(
            type="first_seen", location=lw.location, version=v.version,
            window_start_ns=cw.start_ns, window_end_ns=cw.end_ns, severity="info",
            summary=(f"{lw.location.function}{where} first seen{in_version}: "
                     f"{lw.count} calls, p50 {q50:.3g} ms, p99 {q99:.3g} ms"),
            detail={"count": lw.count, "errors": lw.errors, "p50_ms": round(q50, 6),
                    "p99_ms": round(q99, 6), "exemplars": lw.exemplars},
        )

    def update(self, cw: ClosedWindow, lw: LocationWindow) -> list[Event]:
        return [] if self.seen_before(lw.location.key) else [self.event(cw, lw)]


def _key_int(key: str) -> int | None:
    """``key`` as an integer if it is a ``location_key`` (16 hex digits), else None."""
    if len(key) != 16 or not key.isalnum():  # (int() takes "_" and spaces too)
        return None
    try:
        return int(key, 16)
    except ValueError:
        return None
