"""``new_dependency``: a location calls a location it never called before."""

from __future__ import annotations

from dataclasses import dataclass

from processor.detect.base import Detector, Observation
from processor.detect.settings import Settings, parse_bool, positive_int, setting
from processor.events import Event


@dataclass(frozen=True)
class NewDependencySettings(Settings):
    enabled: bool = setting(True, parse_bool, "report callees new to a location (a new query, a new remote call)")
    max_children: int = setting(256, positive_int, "callees remembered per location")


class NewDependency(Detector):
    """A callee new to this location, from the call graph, after the location's warm-up.

    Callees seen during the first ``warmup_windows`` windows in which the call graph saw
    this location (calling or called) are learnt silently. Then a callee never seen before is
    reported once, attributed to the version that made most of its calls: a ``warning``
    when that version started after the warm-up (a deploy brought it), else ``info`` (a
    rare path the warm-up missed). At most ``max_children`` callees are remembered; a
    location that has called that many is not watched for more (forgetting some would
    report them again, window after window).

    Parameters
    ----------
    warmup_windows
        Windows with callees learnt silently.
    max_children
        Callees remembered.

    Examples
    --------
    >>> from processor.pipeline.graph import Child, LocationGraph
    >>> from processor.pipeline.location import Location
    >>> loc = Location("prod", "shop", "orders.list")
    >>> db, cache = Location("prod", "shop", "db.find"), Location("prod", "shop", "cache.get")
    >>> det, first = NewDependency(warmup_windows=2), {("shop", "1", ""): 0, ("shop", "2", ""): 5}
    >>> def window(i, children, version="1"):
    ...     v = ("shop", version, "")
    ...     g = LocationGraph(calls=10, versions={v: 10}, children={c: Child(10, 10, {v: 10}) for c in children})
    ...     return det.update(Observation(loc, i, i + 1, None, version_first_seen=first, graph=g))
    >>> window(0, [db]) + window(1, [db]) + window(2, [db])
    []
    >>> [(e.detail["callee"], e.version[1], e.severity) for e in window(6, [db, cache], "2")]
    [('cache.get', '2', 'warning')]
    >>> window(7, [db, cache], "2")
    []

    A function that called nothing and starts to:

    >>> det = NewDependency(warmup_windows=2)
    >>> window(0, []) + window(1, []) + window(2, [])
    []
    >>> [e.detail["callee"] for e in window(6, [db], "2")]
    ['db.find']

    Beyond ``max_children`` callees, nothing more is learnt or reported:

    >>> det = NewDependency(warmup_windows=1, max_children=1)
    >>> window(0, [db]) + window(1, [db, cache]) + window(2, [db, cache])
    []
    """

    name = "new_dependency"
    Settings = NewDependencySettings
    event_type = "new_dependency"
    description = "A location called a location it never called before (a new query, a new remote call)."
    regression = True  # shown as open in top until the location's regressions are resolved or age out
    needs_graph = True

    def __init__(self, warmup_windows: int = 30, max_children: int = 256):
        self.warmup_windows, self.max_children = warmup_windows, max_children
        self.known: dict[str, int] = {}
        self.windows = 0
        self.warm_ns = 0

    @classmethod
    def _contract(cls) -> dict:
        return {"change": ("dependency", 1.0), "max_stationary": 0}

    def freeze(self, sketch: bytes = b"") -> tuple | None:
        return (self.known, self.windows, self.warm_ns) if self.windows else None

    def _thaw(self, state, sketch: bytes) -> None:
        if state is None:
            self.known, self.windows, self.warm_ns = {}, 0, 0
        else:
            known, self.windows, self.warm_ns = state
            self.known = dict(known)

    def update(self, obs: Observation) -> list[Event]:
        g = obs.graph
        if g is None or not g.calls:
            return []
        self.windows += 1  # (windows without callees count: a leaf that starts calling is reported)
        if self.windows == self.warmup_windows:
            self.warm_ns = obs.end_ns
        events = []
        known = self.known
        for child, f in sorted(g.children.items(), key=lambda cf: cf[0].key):
            if child.key in known:
                continue
            if len(known) >= self.max_children:
                break  # (full: a location with that many callees is not watched for more)
            known[child.key] = self.windows
            if self.windows <= self.warmup_windows:
                continue
            version = max(f.by_version, key=lambda v: (f.by_version[v], obs.version_first_seen.get(v, 0), v))
            first = obs.version_first_seen.get(version)
            deployed = first is not None and first > self.warm_ns
            events.append(obs.event(
                self.event_type, "warning" if deployed else "info",
                f"{obs.location.function} called {child.function} for the first time"
                + (f" in {version[1]}" if version[1] else "") + f" ({f.calls} calls in {g.calls} calls)",
                {"callee": child.function, "callee_key": child.key, "callee_service": child.service,
                 "callee_file": child.file, "callee_line": child.line, "calls": f.calls,
                 "caller_calls": g.calls, "calls_per_call": round(f.calls / g.calls, 3),
                 "versions": {v[1] or "(none)": c for v, c in sorted(f.by_version.items())}},
                version, subject=child.key))
        return events
