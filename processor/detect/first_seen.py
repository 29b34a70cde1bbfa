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
    locations; no set of every key seen is kept here). A key known from Redis is forgotten
    once its location has come back, so the set loaded at start only shrinks."""

    def __init__(self, known_keys: set[str] | None = None):
        self.known = set(known_keys or ())
        # Keys of locations this process forgot (idle), as sorted integers: 8 bytes each
        # instead of a string's hundred, kept so that a return is not announced again.
        self._forgotten = np.zeros(0, np.uint64)

    def forget(self, keys: list[str]) -> None:
        """The locations of ``keys`` (``location_key``s) were forgotten: they are not new if
        they come back.

        >>> from processor.pipeline.location import location_key
        >>> f, key = FirstSeen(), location_key("prod", "shop", "f")
        >>> f.forget([key]); f.forget([key])
        >>> f.seen_before(key), f.seen_before(location_key("prod", "shop", "g")), len(f._forgotten)
        (True, False, 1)
        """
        if keys:
            new = np.array([int(k, 16) for k in keys], np.uint64)
            self._forgotten = np.union1d(self._forgotten, new)

    def seen_before(self, key: str) -> bool:
        """Whether the location was known from Redis or forgotten by this process."""
        if key in self.known:
            return True
        f = self._forgotten
        if not len(f):
            return False
        k = np.uint64(int(key, 16))
        i = int(np.searchsorted(f, k))
        return bool(i < len(f) and f[i] == k)

    def update(self, cw: ClosedWindow, lw: LocationWindow) -> list[Event]:
        key = lw.location.key
        if self.seen_before(key):
            self.known.discard(key)
            return []
        v = lw.main_version
        q50, q99 = lw.sketch.quantiles([0.5, 0.99]) / 1e6
        where = f" ({lw.location.file}:{lw.location.line})" if lw.location.file else ""
        in_version = f" in {v.version[1]}" if v.version[1] else ""
        return [Event(
            type="first_seen", location=lw.location, version=v.version,
            window_start_ns=cw.start_ns, window_end_ns=cw.end_ns, severity="info",
            summary=(f"{lw.location.function}{where} first seen{in_version}: "
                     f"{lw.count} calls, p50 {q50:.3g} ms, p99 {q99:.3g} ms"),
            detail={"count": lw.count, "errors": lw.errors, "p50_ms": round(q50, 6),
                    "p99_ms": round(q99, 6), "exemplars": lw.exemplars},
        )]
