"""Rollouts: what a new version did as a whole, told at milestones, with a verdict.

Per-location detectors say that a function got slower; a developer and a progressive
delivery tool ask what the version did, and whether to go on. ``Rollouts`` follows each
new version of a service from its first calls, side by side with the version it replaces
(``previous``: the one that served most of the service's calls before it), over the same
windows: the windows in which both ran, so load and time of day weigh on both alike.

A rollout starts in the window where a version of a service is first seen (in this process
or its checkpoint; not in the service's very first window, which has no before), or where a
version rolled back earlier comes again. It sends a ``rollout`` event (one per milestone):

- ``first_calls``: the version's first window;
- ``share_1``, ``share_10``, ``share_50``, ``share_100``: its share of the service's calls
  in a window reached 1%, 10%, 50%, 100% (``milestones``; the highest reached in a window);
- ``previous_gone``: the previous version had no call for ``gone_windows`` windows while
  the new one had: the rollout is complete, and the new version is the service's current;
- ``rolled_back``: the new version had no call for ``gone_windows`` windows while the
  previous one had: the rollout ends there (``superseded`` if the previous one is gone too);
- ``failed``: the verdict turned to ``fail`` in a window that reached no other milestone,
  so that a failure is not held back until the next one.

Each event carries the verdict as it stands, its reasons, and the evidence: the regressions
open and attributed to the version (latency, errors, scaling, call patterns), new exception
types, new functions, functions the previous version called that the new one does not, the
service's error share, and the busiest locations and entry points with their calls, p50,
p99 and error share in each version over the same windows. The verdict:

- ``fail`` when a regression of a ``fail_on`` type is open and attributed to the version,
  when the version's error share over the same windows is ``error_ratio`` times the
  previous one's and ``error_increase`` above it with a z-score of ``error_z`` or more, or
  when a watched location's p50 (over at least ``min_location_calls`` calls of each
  version) or p99 (over ten times as many) is ``p50_ratio`` or ``p99_ratio`` times the
  previous version's;
- else ``inconclusive`` while the version has fewer than ``min_calls`` calls or ran in
  fewer than ``min_windows`` windows, saying what is missing;
- else ``pass``.

The verdict is recomputed every window of the service: ``published`` holds, per rollout
that changed, the state that the Redis sink writes to ``{prefix}:verdicts:{environment}:
{service}`` and Prometheus exposes as ``backflow_version_verdict``.

>>> import numpy as np
>>> from processor.pipeline.location import Location
>>> from processor.pipeline.sketch import LogSketch
>>> from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures
>>> old, new = ("shop", "1.0", ""), ("shop", "1.1", "")
>>> loc = Location("prod", "shop", "shop.cart.add")
>>> def window(i, calls):
...     sk = {v: LogSketch.from_values(np.full(n, 5_000_000)) for v, n in calls.items()}
...     vs = [VersionFigures(v, n, 0, sk[v]) for v, n in calls.items() if n]
...     lw = LocationWindow(0, loc, sum(calls.values()), 0, sk[old].merge(sk[new]), vs)
...     first = {old: 60, new: 120}
...     return ClosedWindow("shop", i * 60, (i + 1) * 60, [lw], "prod"), first
>>> r = Rollouts(RolloutSettings(min_calls=100, min_windows=2))
>>> r.window(*window(0, {old: 1000, new: 0}), [], set())
[]
>>> [(e.detail["milestone"], e.detail["verdict"]) for e in r.window(*window(1, {old: 950, new: 50}), [], set())]
[('first_calls', 'inconclusive')]
>>> [(e.detail["milestone"], e.detail["verdict"]) for e in r.window(*window(2, {old: 400, new: 600}), [], set())]
[('share_50', 'pass')]

References
----------
Kayenta (Spinnaker's automated canary analysis); Argo Rollouts, "Analysis & Progressive
Delivery"; Flagger, "Canary analysis with Prometheus metrics".
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import numpy as np

from processor.detect.settings import Settings, parse_bool, positive_float, positive_int, probability, setting
from processor.events import Event
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch, window_quantiles
from processor.pipeline.window import ClosedWindow, is_overflow

PASS, INCONCLUSIVE, FAIL = "pass", "inconclusive", "fail"
VERDICT_VALUES = {PASS: 0, INCONCLUSIVE: 1, FAIL: 2}  # backflow_version_verdict
ACTIVE, COMPLETE, ROLLED_BACK = "active", "complete", "rolled_back"
EVENT_TYPE = "rollout"
MAX_LOCATIONS = 5_000  # locations compared per rollout (the first ones seen); the rest only counted
MAX_LISTED = 50       # new functions, new exception types and vanished functions kept per rollout
ENDED_KEPT = 3        # ended rollouts kept per service (their verdict stays readable)
_QS = (0.5, 0.99)


def parse_shares(value) -> tuple[float, ...]:
    """Milestones: shares in (0, 1], given as a list (or a comma-separated string)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"must be a list of shares in (0, 1], got {value!r}")
    out = []
    for x in items:
        try:
            share = float(x)
        except (TypeError, ValueError):
            raise ValueError(f"must be a list of shares in (0, 1], got {x!r}") from None
        if not 0 < share <= 1:
            raise ValueError(f"must be a list of shares in (0, 1], got {x!r}")
        out.append(share)
    return tuple(sorted(set(out)))


def parse_types(value) -> tuple[str, ...]:
    """Event types, as a list (or a comma-separated string); checked against the registry
    when the settings are built (processor/detect/registry.py)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"must be a list of event types, got {value!r}")
    return tuple(x.strip() for x in items if x.strip())


@dataclass(frozen=True)
class RolloutSettings(Settings):
    enabled: bool = setting(True, parse_bool, "follow each new version's rollout, with a verdict")
    milestones: tuple = setting((0.01, 0.1, 0.5, 1.0), parse_shares,
                                "shares of the service's calls in a window at which a rollout event is sent")
    min_calls: int = setting(500, positive_int,
                             "calls of the new version below which a rollout without a failure is inconclusive")
    min_windows: int = setting(3, positive_int,
                               "windows with calls of the new version below which it is inconclusive")
    gone_windows: int = setting(5, positive_int,
                                "windows without a call after which a version is gone (the previous one: "
                                "the rollout is complete; the new one: rolled back)")
    fail_on: tuple = setting(("latency_regression", "error_regression", "scaling_regression",
                              "call_pattern_regression"), parse_types,
                             "open regressions of these types, attributed to the version, fail it")
    error_ratio: float = setting(1.5, positive_float,
                                 "the new version's error share over the same windows, against the previous "
                                 "one's, that fails it (with error_increase and error_z)")
    error_increase: float = setting(0.005, probability, "and by at least this much (0.005: half a percentage point)")
    error_z: float = setting(3.0, positive_float, "and with a two-proportion z-score of at least this")
    p50_ratio: float = setting(1.25, positive_float,
                               "a watched location's p50 in the new version over the previous one's that fails it")
    p99_ratio: float = setting(1.5, positive_float,
                               "the same for p99 (compared over ten times min_location_calls)")
    min_location_calls: int = setting(200, positive_int,
                                      "calls of each version at a location below which its p50 is not compared")
    shown: int = setting(10, positive_int, "busiest locations and entry points watched and shown")

    def validate(self) -> None:
        if self.error_ratio <= 1 or self.p50_ratio <= 1 or self.p99_ratio <= 1:
            raise ValueError("error_ratio, p50_ratio and p99_ratio must be > 1")


@dataclass
class Rollout:
    """One version's rollout in one service."""
    version: tuple            # (service, service.version, vcs.ref.head.revision)
    previous: tuple
    started_ns: int           # end of its first window
    state: str = ACTIVE
    milestone: str = "first_calls"  # the latest reached
    reached: list = field(default_factory=list)  # milestone shares reached
    share: float = 0.0        # in the latest window
    windows: int = 0          # windows with calls of the new version
    compared: int = 0         # windows with calls of both
    absent_new: int = 0       # consecutive windows without a call of each
    absent_prev: int = 0
    calls: list = field(default_factory=lambda: [0, 0])   # all windows of each: new, previous
    same: list = field(default_factory=lambda: [0, 0, 0, 0])  # same windows: calls, errors of new; of previous
    # per location key: [function, calls new, errors new, calls previous, errors previous]
    locations: dict = field(default_factory=dict)
    dropped: int = 0          # locations beyond MAX_LOCATIONS
    watched: dict = field(default_factory=dict)   # key -> [sketch new, sketch previous] (packed bytes)
    entries: list = field(default_factory=list)   # keys of entry points seen (call graph)
    regressions: dict = field(default_factory=dict)  # "type key" -> {type, key, function, severity, summary}
    new_exceptions: list = field(default_factory=list)  # [function, exception type]
    new_functions: list = field(default_factory=list)
    new_dependencies: list = field(default_factory=list)  # [caller, callee]
    verdict: str = INCONCLUSIVE
    told: str = ""            # the verdict of its latest event
    reasons: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    updated_ns: int = 0

    def plain(self) -> dict:
        return dataclasses.asdict(self)

    def end(self) -> None:
        """Once it ended: what it keeps for its verdict, not its whole location table."""
        self.locations = {k: v for k, v in self.locations.items() if k in self.watched}

    @classmethod
    def from_plain(cls, d: dict) -> "Rollout":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise ValueError("a rollout is not a mapping of " + ", ".join(sorted(names)))
        r = cls(**d)
        r.version, r.previous = tuple(r.version), tuple(r.previous)
        if len(r.version) != 3 or len(r.previous) != 3 or not all(isinstance(x, str) for x in r.version + r.previous):
            raise ValueError("a rollout's version is not (service, version, revision)")
        r.reached, r.calls, r.same, r.entries = list(r.reached), list(r.calls), list(r.same), list(r.entries)
        r.locations = {k: list(v) for k, v in dict(r.locations).items()}
        r.watched = {k: list(v) for k, v in dict(r.watched).items()}
        r.regressions = {k: dict(v) for k, v in dict(r.regressions).items()}
        r.new_exceptions = [list(x) for x in r.new_exceptions]
        r.new_dependencies = [list(x) for x in r.new_dependencies]
        r.new_functions, r.reasons, r.missing = list(r.new_functions), list(r.reasons), list(r.missing)
        return r


@dataclass
class ServiceRollouts:
    """A service's current version and its rollouts (active, and the last few ended)."""
    current: tuple | None = None
    rollouts: list = field(default_factory=list)

    def active(self) -> list[Rollout]:
        return [r for r in self.rollouts if r.state == ACTIVE]


class Rollouts:
    """Every service's rollouts (see the module docstring); fed each closed window of a
    service with its events. ``regression_types``: the event types that open a regression
    until a ``resolved`` event ends it (the registry's), listed in a rollout whatever
    ``fail_on`` says."""

    def __init__(self, settings: RolloutSettings | None = None, regression_types: tuple = ()):
        self.settings = settings or RolloutSettings()
        # (those that stay open until a resolved event: the one-shot ones are listed apart)
        self.regression_types = frozenset(regression_types) | frozenset(self.settings.fail_on)
        self.services: dict[tuple[str, str], ServiceRollouts] = {}
        self.published: list[dict] = []  # states changed since last taken (take_published)

    # -- checkpoint --------------------------------------------------------------------------

    def freeze(self, service: tuple[str, str]) -> dict | None:
        """A service's state as plain data (for its checkpoint field), None if none."""
        s = self.services.get(service)
        if s is None:
            return None
        return {"current": list(s.current) if s.current else None, "rollouts": [r.plain() for r in s.rollouts]}

    def thaw(self, service: tuple[str, str], state: dict | None) -> None:
        """A service's state from ``freeze``; ValueError (nothing changed) when it does not fit."""
        if state is None:
            return
        if not isinstance(state, dict) or set(state) != {"current", "rollouts"}:
            raise ValueError("rollouts: not a mapping of current, rollouts")
        cur = state["current"]
        if cur is not None and (len(cur) != 3 or not all(isinstance(x, str) for x in cur)):
            raise ValueError("rollouts: current is not (service, version, revision)")
        rollouts = [Rollout.from_plain(r) for r in state["rollouts"]]
        self.services[service] = ServiceRollouts(tuple(cur) if cur else None, rollouts)

    def forget(self, service: tuple[str, str]) -> None:
        self.services.pop(service, None)

    def take_published(self) -> list[dict]:
        """The verdict states changed since the last call (``state_of``), oldest first."""
        out, self.published = self.published, []
        return out

    # -- the window --------------------------------------------------------------------------

    def window(self, cw: ClosedWindow, first_seen: dict, events: list[Event], entry_keys: set,
               by_version: dict | None = None) -> list[Event]:
        """A service's closed window (``first_seen``: version -> end of its first window, the
        engine's; ``events``: the window's events; ``entry_keys``: the keys of its entry
        points per the call graph; ``by_version``: ``cw.calls_by_version()``, if the caller
        has it): the rollout events it gives."""
        service = (cw.environment, cw.service)
        if by_version is None:
            by_version = cw.calls_by_version()
        total = sum(by_version.values())
        if not total:
            return []
        main = max(by_version, key=lambda v: (by_version[v], v))
        state = self.services.get(service)
        if state is None:  # (the service's first window here: nothing known before it)
            self.services[service] = ServiceRollouts(main)
            return []
        out: list[Event] = []
        for r in state.active():
            self._observe(r, cw, by_version, total, events, entry_keys)
            told = r.told
            r.verdict, r.reasons, r.missing = self.verdict(r)
            milestone = self._milestone(r, main)
            if milestone is None and r.verdict == FAIL and told != FAIL:
                milestone = "failed"  # (not held back until the next milestone)
            if milestone is not None:
                if milestone == "previous_gone":
                    r.state, state.current = COMPLETE, main  # (main: another rollout may serve more)
                elif milestone in ("rolled_back", "superseded"):
                    r.state = ROLLED_BACK if milestone == "rolled_back" else COMPLETE
                out.append(self._event(cw, r, milestone))
                if r.state != ACTIVE:
                    r.end()
            self.published.append(self.state_of(r, cw))
        following = {r.version for r in state.active()}
        least = min(self.settings.milestones)
        for version in sorted(by_version):
            if version == state.current or version in following or not by_version[version]:
                continue
            # a version first seen now; or one seen before (a re-deploy after a rollback, a
            # return to an older version) once it serves the first milestone's share
            if first_seen.get(version) != cw.end_ns and by_version[version] < least * total:
                continue
            # (compared with the version serving most of the others' calls: the current one,
            # unless another rollout took over from it)
            others = {v: n for v, n in by_version.items() if v != version}
            previous = max(others, key=lambda v: (others[v], v)) if others else state.current
            if previous is None or previous == version:
                continue
            r = Rollout(version, previous, cw.end_ns)
            state.rollouts.append(r)
            self._observe(r, cw, by_version, total, events, entry_keys)
            r.verdict, r.reasons, r.missing = self.verdict(r)
            r.reached = [m for m in self.settings.milestones if r.share >= m - 1e-12]
            out.append(self._event(cw, r, "first_calls"))
            self.published.append(self.state_of(r, cw))
        ended = [r for r in state.rollouts if r.state != ACTIVE]
        if len(ended) > ENDED_KEPT:
            old = {id(r) for r in ended[:len(ended) - ENDED_KEPT]}
            for r in ended[:len(ended) - ENDED_KEPT]:  # (their fields of the verdicts hash go too)
                if not any(o.version == r.version and id(o) not in old for o in state.rollouts):
                    self.published.append({**self.state_of(r, cw), "deleted": True})
            state.rollouts = [r for r in state.rollouts if id(r) not in old]
        if state.current not in by_version and not state.active():
            state.current = main  # (the current version went without a rollout seen here)
        return out

    def _observe(self, r: Rollout, cw: ClosedWindow, by_version: dict, total: int, events: list[Event],
                 entry_keys: set) -> None:
        """The window into the rollout's figures."""
        s = self.settings
        new_calls, prev_calls = by_version.get(r.version, 0), by_version.get(r.previous, 0)
        r.share = new_calls / total
        r.updated_ns = cw.end_ns
        r.absent_new = 0 if new_calls else r.absent_new + 1
        r.absent_prev = 0 if prev_calls else r.absent_prev + 1
        r.calls[0] += new_calls
        r.calls[1] += prev_calls
        r.windows += bool(new_calls)
        self._note(r, events)
        if not (new_calls and prev_calls):
            return  # (compared over the windows in which both ran only)
        r.compared += 1
        for key in sorted(entry_keys):
            if key not in r.entries and len(r.entries) < s.shown:
                r.entries.append(key)
        present = [lw for lw in cw.locations if not is_overflow(lw.location)]
        busiest = sorted(present, key=lambda lw: (-lw.count, lw.location.key))[:s.shown]
        for key in r.entries + [lw.location.key for lw in busiest]:
            if key not in r.watched and len(r.watched) < 2 * s.shown:
                r.watched[key] = [b"", b""]
        same = r.same
        for lw in present:
            pair = (next((v for v in lw.versions if v.version == r.version), None),
                    next((v for v in lw.versions if v.version == r.previous), None))
            if pair == (None, None):
                continue
            key = lw.location.key
            row = r.locations.get(key)
            if row is None and len(r.locations) < MAX_LOCATIONS:
                row = r.locations[key] = [lw.location.function, 0, 0, 0, 0]
            elif row is None:
                r.dropped += 1
            sketches = r.watched.get(key)
            for j, v in enumerate(pair):
                if v is None:
                    continue
                same[2 * j] += v.count
                same[2 * j + 1] += v.errors
                if row is not None:
                    row[1 + 2 * j] += v.count
                    row[2 + 2 * j] += v.errors
                if sketches is not None:
                    sketches[j] = (LogSketch.unpack(sketches[j]).merge(v.sketch) if sketches[j] else v.sketch).pack()

    def _note(self, r: Rollout, events: list[Event]) -> None:
        """The window's events that concern the rollout: regressions opened (attributed to
        its version) and resolved, its new functions and exception types; a window's by
        function name (their order in the window follows the locations' ids, which follow
        arrival: one process and two tiers must list them alike)."""
        for e in sorted(events, key=lambda e: e.location.function):
            if e.type == "resolved":
                r.regressions.pop(f"{e.subject} {e.location.key}", None)
            elif e.version != r.version:
                continue
            elif e.type == "first_seen":
                if len(r.new_functions) < MAX_LISTED:
                    r.new_functions.append(e.location.function)
            elif e.type == "new_exception":
                if len(r.new_exceptions) < MAX_LISTED:
                    r.new_exceptions.append([e.location.function, e.subject])
            elif e.type == "new_dependency":
                if len(r.new_dependencies) < MAX_LISTED:
                    r.new_dependencies.append([e.location.function, e.detail.get("callee", "")])
            elif e.type in self.regression_types:
                r.regressions[f"{e.type} {e.location.key}"] = {
                    "type": e.type, "key": e.location.key, "function": e.location.function,
                    "severity": e.severity, "summary": e.summary}

    def _milestone(self, r: Rollout, main: tuple) -> str | None:
        """The milestone this window reached, if any (the highest share only); ``main``:
        the version that served most of the window's calls."""
        s = self.settings
        if r.absent_prev >= s.gone_windows and not r.absent_new:
            return "previous_gone"
        if r.absent_new >= s.gone_windows:  # (back to the previous version, or another took over)
            return "rolled_back" if main == r.previous else "superseded"
        hit = [m for m in s.milestones if r.share >= m - 1e-12 and m not in r.reached]
        if not hit:
            return None
        r.reached += hit
        return f"share_{_pct(max(hit))}"

    # -- the verdict -------------------------------------------------------------------------

    def verdict(self, r: Rollout) -> tuple[str, list[str], list[str]]:
        """(verdict, reasons, what is missing) of a rollout as its figures stand."""
        s = self.settings
        name = r.version[1] or "(no version)"
        reasons = [f"{g['type']} open: {g['summary']}" for g in _causes_first(r.regressions.values())
                   if g["type"] in s.fail_on]
        n1, e1, n0, e0 = r.same
        if n1 and n0:
            p1, p0, p = e1 / n1, e0 / n0, (e1 + e0) / (n1 + n0)
            z = (p1 - p0) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n0)) if 0 < p < 1 else 0.0
            if p1 >= s.error_ratio * p0 and p1 - p0 >= s.error_increase and z >= s.error_z:
                reasons.append(f"error share {p1:.2%} in {name} against {p0:.2%} in {r.previous[1]} "
                               f"over the same windows (z {z:.1f})")
        for row in self._watched_rows(r):
            for q, ratio, least in (("p50_ms", s.p50_ratio, s.min_location_calls),
                                    ("p99_ms", s.p99_ratio, 10 * s.min_location_calls)):
                a, b = row.get(q, {}).get("new"), row.get(q, {}).get("previous")
                # (the calls its quantiles rest on: those since it was watched)
                if (a is not None and b and min(row["sketched"]) >= least and a >= ratio * b):
                    reasons.append(f"{q[:3]} of {row['function']} {a / b:.2g}x in {name} "
                                   f"({b:.3g} ms to {a:.3g} ms over the same windows)")
        if reasons:
            return FAIL, reasons, []
        missing = []
        if r.calls[0] < s.min_calls:
            missing.append(f"{s.min_calls:,} calls of {name} (has {r.calls[0]:,})")
        if r.windows < s.min_windows:
            missing.append(f"{s.min_windows} windows with calls of {name} (has {r.windows})")
        if missing:
            return INCONCLUSIVE, [], missing
        ok = [f"no regression open in {name} after {r.calls[0]:,} calls in {r.windows} windows"]
        if n1 and n0:
            ok.append(f"error share {e1 / n1:.2%} against {e0 / n0:.2%} in {r.previous[1]} over the same windows")
        return PASS, ok, []

    def _watched_rows(self, r: Rollout) -> list[dict]:
        """The watched locations' figures in both versions over the same windows."""
        rows, sketches = [], []
        for key, pair in r.watched.items():
            row = r.locations.get(key)
            if row is None or not (row[1] or row[3]):
                continue
            rows.append({"function": row[0], "key": key, "entry_point": key in r.entries,
                         "sketched": [LogSketch.unpack(p).count if p else 0 for p in pair],
                         "calls": {"new": row[1], "previous": row[3]},
                         "error_share": {"new": round(row[2] / row[1], 5) if row[1] else None,
                                         "previous": round(row[4] / row[3], 5) if row[3] else None}})
            sketches += [LogSketch.unpack(p) if p else LogSketch() for p in pair]
        if rows:
            qs = window_quantiles(sketches, _QS) / 1e6
            for i, row in enumerate(rows):
                for j, q in enumerate(("p50_ms", "p99_ms")):
                    a, b = qs[2 * i, j], qs[2 * i + 1, j]
                    row[q] = {"new": None if np.isnan(a) else round(float(a), 3),
                              "previous": None if np.isnan(b) else round(float(b), 3)}
        return rows

    # -- out -----------------------------------------------------------------------------------

    def _event(self, cw: ClosedWindow, r: Rollout, milestone: str) -> Event:
        r.milestone, r.told = milestone, r.verdict
        name, prev = r.version[1] or "(no version)", r.previous[1] or "(no version)"
        what = {
            "first_calls": f"{name} took its first calls ({r.share:.1%} of the service's), replacing {prev}",
            "previous_gone": f"{prev} is gone: {name} serves the service",
            "rolled_back": f"{name} rolled back to {prev}",
            "superseded": f"{name} is gone, and {prev} too",
            "failed": f"{name} at {r.share:.1%} of the service's calls",
        }.get(milestone) or f"{name} reached {milestone[6:]}% of the service's calls"
        if r.verdict == FAIL:
            verdict = f"fail: {r.reasons[0]}" + (f" (and {len(r.reasons) - 1} more)" if len(r.reasons) > 1 else "")
        elif r.verdict == INCONCLUSIVE:
            verdict = "inconclusive: needs " + " and ".join(r.missing)
        else:
            verdict = "pass"
        rows = self._watched_rows(r)
        n1, e1, n0, e0 = r.same
        detail = {
            "milestone": milestone, "state": r.state, "share": round(r.share, 4),
            "previous": {"version": r.previous[1], "revision": r.previous[2]},
            "verdict": r.verdict, "reasons": r.reasons, "missing": r.missing,
            "calls": {"new": r.calls[0], "previous": r.calls[1]},
            "windows": {"with_calls": r.windows, "compared": r.compared},
            "same_windows": {"calls": {"new": n1, "previous": n0},
                             "error_share": {"new": round(e1 / n1, 5) if n1 else None,
                                             "previous": round(e0 / n0, 5) if n0 else None}},
            "regressions": _causes_first(r.regressions.values()),
            "new_exceptions": [{"function": f, "type": t} for f, t in r.new_exceptions],
            "new_functions": list(r.new_functions),
            "new_dependencies": [{"caller": a, "callee": b} for a, b in r.new_dependencies],
            "vanished_functions": self._vanished(r),
            "locations": [_shown(x) for x in rows if not x["entry_point"]][:self.settings.shown],
            "entry_points": [_shown(x) for x in rows if x["entry_point"]][:self.settings.shown],
            "started": r.started_ns // 1_000_000,
        }
        return Event(EVENT_TYPE, Location(cw.environment, cw.service, ""), r.version, cw.start_ns, cw.end_ns,
                     "critical" if r.verdict == FAIL else "info", f"{cw.service} {what}; {verdict}", detail,
                     subject=f"{r.version[1]}\x00{r.version[2]}\x00{milestone}")

    def _vanished(self, r: Rollout) -> list[str]:
        """Functions the previous version called over the same windows and the new one never
        did, where at its share of the calls it would have called them five times or more
        (a Poisson count of 0 then has a chance under 1%)."""
        n1, _, n0, _ = r.same
        if not (n1 and n0):
            return []
        out = [row[0] for row in r.locations.values() if not row[1] and row[3] * n1 / n0 >= 5]
        return sorted(out)[:MAX_LISTED]

    def states(self) -> list[dict]:
        """Every rollout held, as ``state_of`` gives it (what Redis must hold again after it
        lost its data)."""
        return [self.state_of(r, service) for service, s in self.services.items() for r in s.rollouts]

    def state_of(self, r: Rollout, where: ClosedWindow | tuple[str, str]) -> dict:
        """What ``{prefix}:verdicts:{environment}:{service}`` holds for the rollout (field
        ``[version, revision]``) and ``backflow_version_verdict`` shows; ``where``: a window
        of its service, or (environment, service)."""
        environment, service = where if isinstance(where, tuple) else (where.environment, where.service)
        return {"environment": environment, "service": service, "version": r.version[1],
                "revision": r.version[2], "previous": r.previous[1], "previous_revision": r.previous[2],
                "verdict": r.verdict, "reasons": r.reasons, "missing": r.missing, "milestone": r.milestone,
                "share": round(r.share, 4), "state": r.state, "calls": r.calls[0],
                "started": r.started_ns // 1_000_000, "updated": r.updated_ns // 1_000_000}


def _shown(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("entry_point", "sketched")}


def _causes_first(regressions) -> list[dict]:
    """Regressions, those whose function another one names (as its cause: "is in
    shop.db.find") first, then by type and function."""
    regs = list(regressions)
    named = {g["key"]: sum(1 for o in regs if o is not g and re.search(
        rf"\bin {re.escape(g['function'])}(?![\w.])", o["summary"])) for g in regs}
    return sorted(regs, key=lambda g: (-named[g["key"]], g["type"], g["function"]))


def _pct(share: float) -> str:
    return f"{share * 100:g}"
