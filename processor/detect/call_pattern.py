"""``call_pattern_regression``: a location calls a callee more times per call than it used to.

One query per call that became 25 (an N+1), a remote call made in a loop: the calls of each
child location per call of this one, from the call graph (processor/pipeline/graph.py),
against a decayed baseline of the same figure per child. It also keeps, per child, the
child's time per call of this location and, per entry point above it, this location's time
per entry call: the baselines that a latency regression's causes and impact are read
against (processor/detect/causes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from processor.detect.base import Observation, RegressionDetector
from processor.detect.lifecycle import ACCEPTED, Regression
from processor.detect.settings import Settings, parse_bool, positive_float, positive_int, setting
from processor.events import Event


@dataclass(frozen=True)
class CallPatternSettings(Settings):
    enabled: bool = setting(True, parse_bool, "report callees called more times per call than before (N+1)")
    ratio: float = setting(2.0, positive_float,
                           "calls of a callee per call must reach this many times its baseline's")
    min_increase: float = setting(1.0, positive_float, "and rise by at least this many calls per call")
    min_calls: int = setting(20, positive_int, "calls of the caller in the window (of the version judged) "
                                               "below which no change is judged")
    max_children: int = setting(64, positive_int, "callees (and entry points) remembered per location")

    def validate(self) -> None:
        if self.ratio <= 1.0:
            raise ValueError("ratio must be > 1")


@dataclass(slots=True, kw_only=True)
class OpenPattern(Regression):
    child: str = ""           # the callee's location key
    baseline: float = 0.0     # its calls per call before


class CallPattern(RegressionDetector):
    """Calls of each callee per call of this location, against their baseline.

    A location's children and their calls per call are learnt for ``warmup_windows``
    windows in which the call graph saw it call something; then a child whose calls per
    call, in the version that makes them, reach ``ratio`` times the baseline and rise by
    ``min_increase`` or more, over at least ``min_calls`` calls of this location in that
    version, opens a regression attributed to that version. While it is open the child's
    baseline stays as it was; it resolves when the figure is back under the geometric middle
    of baseline and threshold (``recovered``), or becomes the baseline after
    ``accept_windows`` windows (``accepted``).

    Parameters
    ----------
    warmup_windows
        Windows with children before anything is judged.
    ratio, min_increase, min_calls
        How far and over how many calls a change must be.
    half_life_s, window_s
        The baselines' half-life, and the window length (the decay per window).
    accept_windows
        Windows after which a lasting change becomes the baseline.
    max_children
        Callees and entry points remembered per location (the least called are dropped).

    Examples
    --------
    >>> from processor.pipeline.graph import Child, LocationGraph
    >>> from processor.pipeline.location import Location
    >>> loc, db = Location("prod", "shop", "orders.list"), Location("prod", "shop", "db.find")
    >>> det, v1, v2 = CallPattern(warmup_windows=3), ("shop", "1", ""), ("shop", "2", "")
    >>> def window(i, per_call, version):
    ...     g = LocationGraph(calls=100, ns=100 * 10**6, versions={version: 100},
    ...                       children={db: Child(100 * per_call, 10**6, {version: 100 * per_call})})
    ...     return det.update(Observation(loc, i, i + 1, None, graph=g))
    >>> sum((window(i, 1, v1) for i in range(5)), [])
    []
    >>> [(e.type, e.version[1], e.detail["calls_per_call"]) for e in window(5, 25, v2)]
    [('call_pattern_regression', '2', 25.0)]
    >>> [e.detail["reason"] for e in window(6, 1, v1)]
    ['recovered']

    References
    ----------
    Digma, "N+1 query" insight; Sentry, "N+1 DB Queries" performance issue.
    """

    name = "call_pattern"
    Settings = CallPatternSettings
    event_type = "call_pattern_regression"
    description = "A location calls a callee more times per call than its baseline (an N+1, a chatty remote call)."
    needs_graph = True

    def __init__(self, warmup_windows: int = 30, ratio: float = 2.0, min_increase: float = 1.0,
                 min_calls: int = 20, half_life_s: float = 86400.0, window_s: float = 60.0,
                 accept_windows: int = 120, max_children: int = 64):
        self.warmup_windows, self.ratio, self.min_increase, self.min_calls = warmup_windows, ratio, min_increase, min_calls
        self.half_life_s, self.window_s, self.accept_windows = half_life_s, window_s, accept_windows
        self.max_children = max_children
        self.decay = 0.5 ** (window_s / half_life_s)
        self._thaw(None, b"")

    @classmethod
    def _contract(cls) -> dict:
        return {"change": ("fanout", 25.0), "max_stationary": 0}

    # -- state -------------------------------------------------------------------------------
    # windows, self (per call, weight), children {key: (calls per call, time per call, weight)},
    # entries {entry key: (this location's calls and ns per entry call, weight)}, the open regression

    def freeze(self, sketch: bytes = b"") -> tuple | None:
        if not self.windows:
            return None
        return (self.windows, self.self_ns, self.children, self.entries,
                self.open.freeze() if self.open else None)

    def _thaw(self, state, sketch: bytes) -> None:
        if state is None:
            self.windows, self.self_ns, self.children, self.entries, self.open = 0, (0.0, 0.0), {}, {}, None
            return
        self.windows, self.self_ns, self.children, self.entries, o = state
        self.children, self.entries = dict(self.children), dict(self.entries)
        self.open = OpenPattern.thawed(o)

    # -- the window --------------------------------------------------------------------------

    def update(self, obs: Observation) -> list[Event]:
        g = obs.graph
        if g is None or not g.calls:
            return []
        events: list[Event] = []
        o = self.open
        if o is not None:
            events += self._follow(obs, o)
        elif self.windows >= self.warmup_windows:
            events += self._judge(obs)
        self._learn(obs)
        return events

    def per_call(self, obs: Observation, version=None) -> dict[str, float]:
        """Calls of each child per call of this location in the window (of ``version``)."""
        g = obs.graph
        calls = g.calls if version is None else g.versions.get(version, 0)
        if not calls:
            return {}
        return {c.key: (f.calls if version is None else f.by_version.get(version, 0)) / calls
                for c, f in g.children.items()}

    def _judge(self, obs: Observation) -> list[Event]:
        g, found = obs.graph, None
        for version, calls in sorted(g.versions.items()):
            if calls < self.min_calls:
                continue
            for key, now in self.per_call(obs, version).items():
                b = self.children.get(key)
                if b is None:
                    continue  # (a new callee: new_dependency's)
                base = b[0]
                if now >= self.ratio * base and now - base >= self.min_increase:
                    level = now / base if base > 0 else float("inf")
                    if found is None or level > found[0]:
                        found = (level, version, key, now, base, calls)
        if found is None:
            return []
        level, version, key, now, base, calls = found
        child = next(c for c in g.children if c.key == key)
        severity = "critical" if now >= 4 * self.ratio * max(base, 1e-9) and now - base >= 10 else "warning"
        detail = {"callee": child.function, "callee_key": key, "calls_per_call": round(now, 3),
                  "baseline_calls_per_call": round(base, 3), "ratio": round(level, 3) if base > 0 else None,
                  "calls": calls, "callee_file": child.file, "callee_line": child.line}
        summary = (f"{obs.location.function} calls {child.function} {now:.3g} times per call"
                   + (f" in {version[1]}" if version[1] else "") + f", {base:.3g} before")
        event = obs.event(self.event_type, severity, summary, detail, version)
        return [self._opened(event, OpenPattern(version=version, child=key, baseline=base), level)]

    def _follow(self, obs: Observation, o: OpenPattern) -> list[Event]:
        now = self.per_call(obs).get(o.child, 0.0)
        middle = o.baseline * self.ratio ** 0.5 if o.baseline > 0 else self.min_increase / 2
        outcome = o.follow(now < middle, self.accept_windows)
        if outcome is None:
            return []
        if outcome == ACCEPTED:  # the new level is the baseline
            b = self.children.get(o.child)
            if b is not None:
                self.children[o.child] = (now, b[1], b[2])
        return self._resolved(obs, outcome, f"{obs.location.function}: calls per call of a callee {outcome}",
                              {"callee_key": o.child, "calls_per_call": round(now, 3),
                               "baseline_calls_per_call": round(o.baseline, 3)})

    def _learn(self, obs: Observation) -> None:
        """The window into the baselines (a child under an open regression keeps its own)."""
        g, d = obs.graph, self.decay
        self.windows += 1
        frozen = self.open.child if self.open is not None else None
        s, w = self.self_ns
        self.self_ns = ((s * w * d + g.self_ns / g.calls) / (w * d + 1), w * d + 1)
        children = self.children
        seen = {}
        for c, f in g.children.items():
            seen[c.key] = (f.calls / g.calls, f.ns / g.calls)
        for key in set(children) | set(seen):
            if key == frozen:
                continue
            cpc, tpc = seen.get(key, (0.0, 0.0))
            b = children.get(key)
            if b is None:
                children[key] = (cpc, tpc, 1.0)
            else:
                w = b[2] * d
                children[key] = ((b[0] * w + cpc) / (w + 1), (b[1] * w + tpc) / (w + 1), w + 1)
        entries = self.entries
        for e, (calls, ns) in g.entries_per_call().items():
            b = entries.get(e)
            if b is None:
                entries[e] = (calls, ns, 1.0)
            else:
                w = b[2] * d
                entries[e] = ((b[0] * w + calls) / (w + 1), (b[1] * w + ns) / (w + 1), w + 1)
        for table in (children, entries):
            if len(table) > self.max_children:  # the least called go
                for key in sorted(table, key=lambda k: (table[k][1], k))[:len(table) - self.max_children]:
                    if key != frozen:
                        del table[key]
