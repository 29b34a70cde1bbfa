"""Why a location got slower and what it cost its entry points, from the call graph.

A location's time per call is its own (self) time plus its children's time per call of it,
so a rise of its mean splits exactly among them. ``explain`` compares the window's figures
(``Observation.graph``) with the baselines the ``call_pattern`` detector kept before the
window (processor/detect/call_pattern.py), and adds to a latency regression's event:

- ``detail.causes``: the parts whose time per call rose, the largest first, each with the
  added milliseconds per call and its share of the rise (the shares of the parts that rose
  sum to 1); a part is a callee (its calls per call and mean time per call before and now)
  or the location's own code (``"self": true``);
- ``detail.impact``: per entry point of the same traces (a root, SERVER or CONSUMER span
  above it), the location's added milliseconds per entry call (``impact``), and that
  against the entry point's mean time per call (``relative``);
- a summary that names the main cause and the most affected entry point.

>>> from processor.detect.call_pattern import CallPattern
>>> from processor.pipeline.graph import Child, LocationGraph
>>> from processor.pipeline.location import Location
>>> loc, db = Location("prod", "shop", "orders.list"), Location("prod", "shop", "db.find")
>>> pattern = CallPattern()
>>> pattern.self_ns, pattern.children = (1e6, 5.0), {db.key: (1.0, 2e6, 5.0)}
>>> g = LocationGraph(calls=10, ns=10 * 8_000_000, child_ns=10 * 6_500_000,
...                   children={db: Child(10, 10 * 6_500_000)})
>>> [(c.get("callee"), c["share"], c["added_ms"]) for c in causes(g, pattern)]
[('db.find', 0.9, 4.5), (None, 0.1, 0.5)]
"""

from __future__ import annotations

import dataclasses
import math

from processor.events import Event

MAX_CAUSES = 5
MIN_SHARE = 0.05  # parts explaining less of the rise are left out of the list


def causes(graph, pattern) -> list[dict]:
    """The parts of the location's time per call that rose against ``pattern``'s baselines
    (a ``CallPattern`` as it was before the window), the largest first."""
    n = graph.calls
    if not n:
        return []
    parts = []
    self_b = pattern.self_ns[0] if pattern.self_ns[1] else None
    if self_b is not None:
        parts.append((graph.self_ns / n - self_b, {"self": True, "time_per_call_ms": _ms(graph.self_ns / n),
                                                   "baseline_ms": _ms(self_b)}))
    seen = set()
    for child, f in graph.children.items():
        seen.add(child.key)
        b = pattern.children.get(child.key)
        cpc_b, tpc_b = (b[0], b[1]) if b is not None else (0.0, 0.0)
        now = f.ns / n
        part = {"callee": child.function, "key": child.key, "service": child.service, "time_per_call_ms": _ms(now),
                "baseline_ms": _ms(tpc_b), "calls_per_call": round(f.calls / n, 3),
                "baseline_calls_per_call": round(cpc_b, 3), "new": b is None}
        if cpc_b > 0 and tpc_b > 0 and f.calls:
            part["mean_ratio"] = round((f.ns / f.calls) / (tpc_b / cpc_b), 3)
        parts.append((now - tpc_b, part))
    rose = sum(d for d, _ in parts if d > 0)
    if rose <= 0:
        return []
    out = []
    for d, part in sorted(parts, key=lambda dp: -dp[0]):
        if d <= 0 or d / rose < MIN_SHARE or len(out) >= MAX_CAUSES:
            break
        out.append({**part, "added_ms": _ms(d), "share": round(d / rose, 3)})
    return out


def impact(graph, pattern, entry_mean_ns) -> list[dict]:
    """Per entry point above the location, its added milliseconds per entry call against
    ``pattern``'s baseline, and against the entry point's mean time per call
    (``entry_mean_ns(location) -> ns or None``), the largest first.

    The added time is the baseline's calls per entry call times the rise of the location's
    time per call, plus the change of its calls per entry call times its time per call now;
    a change of calls per entry call within three standard deviations of a Poisson count
    (the window's own noise: how many times a request happened to call it) counts as none.
    """
    out = []
    for entry, (calls, ns, entry_calls) in graph.entries.items():
        b = pattern.entries.get(entry.key)
        if not entry_calls or not calls or b is None or not b[0]:
            continue
        cpe, mean = calls / entry_calls, ns / calls
        cpe_b, mean_b = b[0], b[1] / b[0]
        moved = cpe - cpe_b
        if abs(moved) <= 3 * math.sqrt(cpe_b / entry_calls):
            moved = 0.0
        added = cpe_b * (mean - mean_b) + moved * mean
        if added <= 0:
            continue
        row = {"entry": entry.function, "key": entry.key, "service": entry.service,
               "added_ms": _ms(added), "calls_per_entry_call": round(cpe, 3),
               "baseline_calls_per_entry_call": round(cpe_b, 3), "entry_calls": entry_calls}
        mean_e = entry_mean_ns(entry)
        if mean_e and mean_e > added:
            row["entry_mean_ms"] = _ms(mean_e)
            row["relative"] = round(added / (mean_e - added), 4)
        out.append(row)
    return sorted(out, key=lambda r: -r["added_ms"])[:MAX_CAUSES]


def explain(event: Event, graph, pattern, entry_mean_ns) -> Event:
    """``event`` (a latency regression) with its causes and impact in ``detail`` and the
    main ones named in its summary; the event as it was where the graph says nothing."""
    found, hit = causes(graph, pattern), impact(graph, pattern, entry_mean_ns)
    if not found and not hit:
        return event
    detail = dict(event.detail)
    summary = event.summary
    if found:
        detail["causes"] = found
        top = found[0]
        added = sum(c["added_ms"] for c in found) / sum(c["share"] for c in found)
        where = "its own code" if top.get("self") else top["callee"]
        extra = f", {top['mean_ratio']:.2g}x per call" if top.get("mean_ratio") else (", new" if top.get("new") else "")
        summary += f"; {top['share']:.0%} of the added {added:.3g} ms per call is in {where}{extra}"
    if hit:
        detail["impact"] = hit
        e = hit[0]
        summary += f"; {e['entry']}: +{e['added_ms']:.3g} ms per call" + (
            f" ({e['relative']:.0%} slower)" if "relative" in e else "")
    return dataclasses.replace(event, detail=detail, summary=summary)


def _ms(ns: float) -> float:
    return round(ns / 1e6, 6)
