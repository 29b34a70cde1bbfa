"""Generated per-window observations of one code location, for detector tests.

Lognormal latencies whose level follows the service's load, binomial errors, a known
exception type, two versions, and the call graph's figures (two callees: a query called
1-2 times per call, a cache read once); a change of one kind starts at ``change_at`` in
version 2 (``fanout``: the query is called ``effect`` times as often; ``dependency``: a
third callee appears).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from processor.detect.base import Observation
from processor.pipeline.graph import Child, LocationGraph
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import LocationWindow, VersionFigures

W_NS = 60 * 10**9
LOC = Location("prod", "shop", "shop.cart.apply", "shop/cart.py", "42")
V1, V2 = ("shop", "1.0", "aaa"), ("shop", "1.1", "bbb")
QUERY = Location("prod", "shop", "shop.db.find_items", "shop/db.py", "7")
CACHE = Location("prod", "shop", "shop.cache.get", "shop/cache.py", "19")
NEW = Location("prod", "shop", "shop.payments.charge", "shop/payments.py", "88")


def observations(seed: int, windows: int = 300, change_at: int | None = None, kind: str = "",
                 effect: float = 1.0, rate: float = 6.0, median_ms: float = 20.0, sigma: float = 0.6,
                 beta0: float = 0.3, error_share: float = 0.001, worse_at: int | None = None,
                 worse: float = 1.0):
    """``worse_at``: from that window on the change is ``worse`` times as large (an
    escalation of an open regression)."""
    rng = np.random.default_rng(seed)
    graph_rng = np.random.default_rng(seed + 1_000_003)  # (its own: the other figures stay as they were)
    first_seen = {V1: W_NS}
    base_effect = effect
    for i in range(windows):
        effect = base_effect * (worse if worse_at is not None and i >= worse_at else 1.0)
        changed = change_at is not None and i >= change_at
        version = V2 if changed else V1
        if changed:
            first_seen.setdefault(V2, (i + 1) * W_NS)
        load = float(np.exp(0.25 * np.sin(2 * np.pi * i / 1440) + rng.normal(0, 0.15)))
        if kind == "vanish" and changed:
            yield Observation(LOC, i * W_NS, (i + 1) * W_NS, None, 40 * load, V2, dict(first_seen),
                              service_calls=200 * load)
            continue
        n = int(rng.poisson(rate * 60 * load))
        beta = beta0 + (effect if changed and kind == "scaling" else 0.0)
        level = median_ms * (1 + beta * (load - 0.7)) * (effect if changed and kind == "median" else 1.0)
        d = rng.lognormal(np.log(level * 1e6), sigma, n)
        if changed and kind == "tail":
            p99 = median_ms * 1e6 * np.exp(2.326 * sigma)
            slow = rng.random(n) < 0.015
            d[slow] = rng.uniform(effect * p99, 1.3 * effect * p99, int(slow.sum()))
        share = error_share * (effect if changed and kind == "errors" else 1.0)
        errors = int(rng.binomial(n, share))
        exceptions = Counter({"TimeoutError": errors})
        if changed and kind == "exception":
            exceptions["ZeroDivisionError"] = 1
        sk = LogSketch.from_values(d)
        lw = LocationWindow(0, LOC, n, errors, sk, [VersionFigures(version, n, errors, sk, exceptions)],
                            exceptions)
        yield Observation(LOC, i * W_NS, (i + 1) * W_NS, lw, 40 * load, version, dict(first_seen),
                          service_calls=200 * load + n / 60,
                          graph=_graph(graph_rng, n, float(d.sum()), version, changed and kind, effect))


def _graph(rng, n: int, ns: float, version, change, effect: float) -> LocationGraph | None:
    """The call graph's figures of a window of ``n`` calls taking ``ns`` in all."""
    if not n:
        return None
    queries = int(rng.binomial(2 * n, 0.75) * (effect if change == "fanout" else 1))
    children = {QUERY: Child(queries, int(0.4 * ns * queries / (1.5 * n)), {version: queries}),
                CACHE: Child(n, int(0.1 * ns), {version: n})}
    if change == "dependency":
        children[NEW] = Child(n, int(0.2 * ns), {version: n})
    child_ns = min(int(ns), sum(c.ns for c in children.values()))
    return LocationGraph(n, int(ns), child_ns, {version: n}, children)
