"""Call-graph detection benchmark: seeded traces with parent links and injected changes.

    python -m benchmarks.call_graph                 # 3 seeds x 6 services x 8 h
    python -m benchmarks.call_graph --seeds 1 --hours 6

Each seed makes services whose entry points (HTTP handlers, SERVER spans) call functions,
which call queries (database CLIENT spans, keyed by their query) and other functions, each
edge a Poisson number of calls per call; a function's time is its own (lognormal) plus its
children's, run one after another. Load: diurnal and per-minute bursts per service, and one
service in three surges to 2.5x its load at a random time (no code change). At 3-4 h each
service rolls out "1.1.0" with one change on each of 2-3 of its edges or nodes:

- ``n_plus_one``: a child called ``k`` (5, 10 or 25) times as often per call of its parent;
- ``slower_child``: a function's own time x ``f`` (1.6, 2.5 or 4) under an unchanged parent;
- ``slower_query``: a query's time x ``f``;
- ``new_dependency``: a parent starts calling a query it never called.

Scored per change, within 3 h of the rollout:

- recall: ``call_pattern_regression`` naming the child (``n_plus_one``), ``new_dependency``
  naming it, a ``latency_regression`` of the slower node itself (``slower_*``);
- cause: for every ``latency_regression`` of an ancestor of a ``slower_*`` node, whether the
  top entry of ``detail.causes`` is the child on the path to it (the share of such events
  named correctly);
- impact: for those events, whether ``detail.impact`` gives the entry point's added time
  per call within 20% of the truth (the slower node's added mean time per entry call);
- false events: ``call_pattern_regression`` or ``new_dependency`` on an edge without a
  change, per 1,000 edge-hours.

Beside Backflow's detector, two other rules read the same windows of the same edges:
``naive`` (a child's calls in a window at least twice its mean over the previous hour, what
one would write on call counts) and ``adwin`` (River's ADWIN over each edge's calls per
parent call, an upward drift). All run through ``processor.pipeline.engine.Engine``
in-process with 60 s windows, 10 s of allowed lateness and the call graph's default wait.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from processor.config import Config
from processor.pipeline.engine import Engine
from processor.pipeline.location import Location
from processor.receiver.decode import Batch

SEC = 1_000_000_000
MS = 1_000_000
HOUR = 3600 * SEC
WINDOW = 60 * SEC
EPOCH_NS = 1_699_999_200 * SEC
CHUNK = 10 * SEC
ENV = "production"
KINDS = {"entry": 2, "function": 1, "query": 3}


@dataclass
class Node:
    """One code location of the call tree (the same location may not appear twice)."""
    index: int
    service: int
    kind: str                # entry, function or query
    location: Location
    parent: int              # -1 for an entry point
    per_call: float          # mean calls per call of the parent (Poisson), >= 1 for most
    self_ms: float           # median own time
    sigma: float
    new_only: bool = False   # exists in 1.1.0 only (a new dependency)
    per_call_new: float = 0.0
    self_factor_new: float = 1.0


@dataclass
class Change:
    kind: str
    node: int                # the node changed (the child of the edge)
    size: float
    service: int
    at_ns: int


@dataclass
class Scenario:
    nodes: list[Node]
    changes: list[Change]
    rollout: dict[int, int]              # service -> rollout time (ns)
    surge: dict[int, int]                # service -> surge start (ns), for the surging ones
    hours: float
    seed: int
    rates: dict[int, float] = field(default_factory=dict)   # entry node -> requests per second
    # the new version's share of a service's requests from each time after its rollout
    # (ns since the rollout, share), in order; by default all of them at once
    canary: tuple = ((0, 1.0),)

    def share(self, service: int, t_ns: int) -> float:
        since = t_ns - self.rollout[service]
        return max((s for at, s in self.canary if since >= at), default=0.0)


def build(seed: int, services: int, hours: float) -> Scenario:
    rng = np.random.default_rng([seed, 77])
    nodes: list[Node] = []
    changes: list[Change] = []
    rollout, surge, rates = {}, {}, {}

    def add(service, kind, name, parent, per_call, self_ms, sigma=0.4, new_only=False) -> Node:
        svc = f"svc{service}"
        fn = (f"db:postgresql {name}" if kind == "query" else f"{svc}.{name}")
        n = Node(len(nodes), service, kind, Location(ENV, svc, fn, f"{svc}/{name.split('.')[0]}.py" if kind != "query"
                                                        else "", str(10 + len(nodes)) if kind != "query" else ""),
                 parent, per_call, self_ms, sigma, new_only, per_call)
        nodes.append(n)
        return n

    for s in range(services):
        rollout[s] = int((3 + rng.uniform(0, 1)) * HOUR)
        if s % 3 == 2:
            surge[s] = int(rng.uniform(1.5, hours - 1.5) * HOUR)
        tree: list[Node] = []
        for e in range(3):
            entry = add(s, "entry", f"api.handler_{e}", -1, 1.0, float(rng.uniform(0.5, 2)))
            rates[entry.index] = float(rng.uniform(3.0, 6.0))
            tree.append(entry)
            for f in range(2):
                fn = add(s, "function", f"service.op_{e}_{f}", entry.index, 1.0, float(rng.uniform(1, 5)))
                tree.append(fn)
                for q in range(int(rng.integers(1, 3))):
                    per = float(rng.choice([1.0, 1.0, 2.0, 3.0]))
                    tree.append(add(s, "query", f"SELECT t{e}{f}{q} WHERE id = ?", fn.index, per,
                                    float(rng.uniform(0.5, 4))))
                if f == 0:
                    tree.append(add(s, "function", f"helpers.util_{e}", fn.index, 1.0, float(rng.uniform(0.5, 3))))
        # the changes of its rollout: 2-3 of them, each under an entry point of its own (so
        # that what an entry point gains is one change's)
        kinds = list(rng.permutation(["n_plus_one", "slower_child", "slower_query", "new_dependency"]))[
            :int(rng.integers(2, 4))]
        used: set[int] = set()
        entries = [n.index for n in tree if n.kind == "entry"]

        def root_of(n: Node) -> int:
            while n.parent >= 0:
                n = nodes[n.parent]
            return n.index

        for e_i, kind in enumerate(kinds):
            mine = [n for n in tree if root_of(n) == entries[e_i]]
            if kind == "n_plus_one":
                cand = [n for n in mine if n.kind == "query"]
                n = cand[int(rng.integers(len(cand)))]
                size = float(rng.choice([5.0, 10.0, 25.0]))
                n.per_call_new = n.per_call * size
            elif kind == "slower_child":
                cand = [n for n in mine if n.kind == "function"]
                n = cand[int(rng.integers(len(cand)))]
                size = float(rng.choice([1.6, 2.5, 4.0]))
                n.self_factor_new = size
            elif kind == "slower_query":
                cand = [n for n in mine if n.kind == "query"]
                n = cand[int(rng.integers(len(cand)))]
                size = float(rng.choice([1.6, 2.5, 4.0]))
                n.self_factor_new = size
            else:
                parents = [n for n in mine if n.kind == "function"]
                p = parents[int(rng.integers(len(parents)))]
                n = add(s, "query", f"SELECT new_{s}_{len(nodes)} WHERE id = ?", p.index, 0.0,
                        float(rng.uniform(0.5, 3)), new_only=True)
                n.per_call_new, size = 1.0, 1.0
            used.add(n.index)
            changes.append(Change(str(kind), n.index, size, s, rollout[s]))
    return Scenario(nodes, changes, rollout, surge, hours, seed, rates)


def _load(sc: Scenario, service: int, t_ns: int, rng) -> float:
    t = t_ns / HOUR
    load = 1 + 0.3 * math.sin(2 * math.pi * t / 24 + service)
    load *= float(np.exp(rng.normal(0, 0.15)))
    s = sc.surge.get(service)
    if s is not None and t_ns >= s:
        load *= 1 + 1.5 * min(1.0, (t_ns - s) / (20 * 60 * SEC))
    return load


def chunks(sc: Scenario):
    """The scenario as Batches of CHUNK of event time each (spans in end order)."""
    children: dict[int, list[Node]] = {}
    for n in sc.nodes:
        children.setdefault(n.parent, []).append(n)
    entries = [n for n in sc.nodes if n.parent == -1]
    locations = [n.location for n in sc.nodes]
    versions = [(f"svc{s}", v, "") for s in range(len(sc.rollout)) for v in ("1.0.0", "1.1.0")]
    for c in range(int(sc.hours * HOUR // CHUNK)):
        rng = np.random.default_rng([sc.seed, 91, c])
        t0 = c * CHUNK
        cols: dict[str, list] = {k: [] for k in ("loc", "ver", "start", "end", "trace", "span", "parent", "kind")}
        next_trace = c << 32
        for entry in entries:
            s = entry.service
            share = sc.share(s, t0)
            n_req = int(rng.poisson(sc.rates[entry.index] * _load(sc, s, t0, rng) * CHUNK / SEC))
            if not n_req:
                continue
            start = EPOCH_NS + t0 + np.sort(rng.integers(0, CHUNK - SEC, n_req))
            traces = np.arange(n_req) + next_trace
            next_trace += n_req
            # (a canary: each request of the new version with the share's chance)
            is_new = rng.random(n_req) < share if 0 < share < 1 else np.full(n_req, share >= 1)
            spans = []
            for new in (False, True):
                if (is_new == new).any():
                    spans += [(loc_i, cols_, new) for loc_i, cols_ in
                              _tree(entry, children, start[is_new == new], traces[is_new == new], new, rng)]
            for loc_i, (st, en, tr, sp, pa), new in spans:
                k = len(st)
                cols["loc"].append(np.full(k, loc_i, np.int32))
                cols["ver"].append(np.full(k, 2 * s + (1 if new else 0), np.int32))
                cols["start"].append(st)
                cols["end"].append(en)
                cols["trace"].append(tr)
                cols["span"].append(sp)
                cols["parent"].append(pa)
                cols["kind"].append(np.full(k, KINDS[sc.nodes[loc_i].kind], np.uint8))
        if not cols["loc"]:
            continue
        arr = {k: np.concatenate(v) for k, v in cols.items()}
        order = np.argsort(arr["end"], kind="stable")
        n = len(order)
        tid = np.zeros((n, 16), np.uint8)
        tid[:, :8] = arr["trace"][order].astype(">u8").view(np.uint8).reshape(n, 8)
        tid[:, 8] = 0xA5
        yield Batch(locations, versions, arr["loc"][order], arr["ver"][order], arr["start"][order],
                    arr["end"][order], np.zeros(n, bool), tid, span_id=arr["span"][order].astype(np.uint64),
                    parent_id=arr["parent"][order].astype(np.uint64), kind=arr["kind"][order])


def _tree(entry: Node, children: dict, start: np.ndarray, traces: np.ndarray, new: bool, rng):
    """Spans of every request at an entry point: (node index, (start, end, trace, span id,
    parent span id)) per node. A span's own time is split, 30% before its children and the
    rest after; its children (every call of every child location, in order) run one after
    another."""
    # instances, top-down: each node's calls, with the index of the parent's call they are in
    inst: dict[int, dict] = {}
    order: list[Node] = []

    def expand(node: Node, parent_of: np.ndarray) -> None:
        k = len(parent_of)
        factor = node.self_factor_new if new else 1.0
        inst[node.index] = {"parent_of": parent_of, "own": rng.lognormal(math.log(node.self_ms * MS * factor),
                                                                          node.sigma, k),
                            "id": rng.integers(1, 2**62, k, dtype=np.int64)}
        order.append(node)
        for child in children.get(node.index, ()):
            per = child.per_call_new if new else child.per_call
            counts = rng.poisson(per, k) if per > 0 else np.zeros(k, np.int64)
            if counts.sum():
                expand(child, np.repeat(np.arange(k), counts))

    expand(entry, np.zeros(len(start), np.int64))
    # durations, bottom-up: own time plus the children's (one after another)
    for node in reversed(order):
        me = inst[node.index]
        me["dur"] = me["own"].copy()
        for child in children.get(node.index, ()):
            c = inst.get(child.index)
            if c is not None:
                me["dur"] += np.bincount(c["parent_of"], c["dur"], len(me["own"]))
    # placement, top-down
    inst[entry.index].update(start=start.astype(np.int64), trace=traces, pid=np.zeros(len(start), np.int64))
    out = []
    for node in order:
        me = inst[node.index]
        kids = [inst[c.index] for c in children.get(node.index, ()) if c.index in inst]
        if kids:
            who = np.concatenate([c["parent_of"] for c in kids])
            dur = np.concatenate([c["dur"] for c in kids])
            o = np.argsort(who, kind="stable")
            w, d = who[o], dur[o]
            cum = np.cumsum(d)
            first = np.flatnonzero(np.concatenate(([True], w[1:] != w[:-1])))
            base = np.repeat(cum[first] - d[first], np.diff(np.concatenate((first, [len(w)]))))
            offset = np.empty(len(w))
            offset[o] = cum - d - base  # (time of the calls before it in the same parent call)
            starts = (me["start"][who] + (0.3 * me["own"][who]).astype(np.int64) + offset.astype(np.int64))
            a = 0
            for c in kids:
                b = a + len(c["parent_of"])
                c.update(start=starts[a:b], trace=me["trace"][c["parent_of"]], pid=me["id"][c["parent_of"]])
                a = b
        end = me["start"] + me["dur"].astype(np.int64)
        out.append((node.index, (me["start"], end, me["trace"], me["id"], me["pid"])))
    return out


# --- running and scoring -------------------------------------------------------------------

def run(sc: Scenario) -> tuple[list, dict, float]:
    """The scenario through an Engine: its events, each edge's windows (parent key, child key)
    -> [(window end, parent calls, child calls)], and the seconds it took."""
    eng = Engine(Config.defaults(allowed_lateness=10.0), known_keys=set())
    events, series = [], {}
    t = time.process_time()

    def take(results):
        for r in results:
            events.extend(r.events)
            for loc, g in r.edges:
                for child, f in g.children.items():
                    series.setdefault((loc.key, child.key), []).append((r.window.end_ns, g.calls, f.calls))

    for b in chunks(sc):
        take(eng.ingest(b))
    take(eng.flush_all())
    return events, series, time.process_time() - t


def naive(series: list) -> list[int]:
    """Window ends at which a child's calls reached twice their mean over the previous hour."""
    out, calls = [], [c for _, _, c in series]
    for i in range(30, len(series)):
        past = calls[max(0, i - 60):i]
        if calls[i] >= 2 * (sum(past) / len(past)) and calls[i] >= 10:
            out.append(series[i][0])
    return out


def adwin(series: list) -> list[int]:
    """Window ends at which River's ADWIN over calls per parent call saw an upward drift."""
    from river import drift

    d, out = drift.ADWIN(), []
    for i, (end, parent, child) in enumerate(series):
        if not parent:
            continue
        before = d.estimation
        d.update(child / parent)
        if d.drift_detected and i > 30 and d.estimation > before:
            out.append(end)
    return out


def score(sc: Scenario, events: list, series: dict) -> dict:
    nodes = sc.nodes
    key = {n.index: n.location.key for n in nodes}
    horizon = 3 * HOUR
    out = {"changes": {}, "ours": {}, "naive": {}, "adwin": {}}
    changed_edges = {(key[nodes[c.node].parent], key[c.node]): c for c in sc.changes
                     if c.kind in ("n_plus_one", "new_dependency")}
    rel = [e for e in events if e.window_end_ns - EPOCH_NS > 0]

    def within(e, c) -> bool:
        return c.at_ns < e.window_end_ns - EPOCH_NS <= c.at_ns + horizon

    found = {"n_plus_one": [], "new_dependency": [], "slower": [], "cause": [], "impact": []}
    for c in sc.changes:
        child, parent = key[c.node], key[nodes[c.node].parent]
        if c.kind == "n_plus_one":
            found["n_plus_one"].append(any(e.type == "call_pattern_regression" and e.location.key == parent
                                           and e.detail.get("callee_key") == child and within(e, c) for e in rel))
        elif c.kind == "new_dependency":
            found["new_dependency"].append(any(e.type == "new_dependency" and e.location.key == parent
                                               and e.detail.get("callee_key") == child and within(e, c) for e in rel))
        else:
            found["slower"].append(any(e.type == "latency_regression" and e.location.key == child and within(e, c)
                                       for e in rel))
        if c.kind in ("n_plus_one", "slower_child", "slower_query"):
            # the ancestors' latency regressions: cause on the path, impact on the entry point
            path = [c.node]
            while nodes[path[-1]].parent >= 0:
                path.append(nodes[path[-1]].parent)
            entry = path[-1]
            n = nodes[c.node]
            mean = n.self_ms * MS * math.exp(n.sigma ** 2 / 2)
            per_entry = math.prod(nodes[i].per_call for i in path[:-1])
            own_sub = _subtree_mean(nodes, c.node)
            added = (mean * (c.size - 1) * per_entry if c.kind != "n_plus_one"
                     else own_sub * (c.size - 1) * per_entry)
            for e in rel:
                if e.type != "latency_regression" or not within(e, c) or "escalates" in e.detail:
                    continue
                if e.location.key in {key[i] for i in path[1:]}:
                    step = path[path.index(next(i for i in path if key[i] == e.location.key)) - 1]
                    top = (e.detail.get("causes") or [{}])[0]
                    found["cause"].append(top.get("key") == key[step])
                hit = [x for x in e.detail.get("impact", []) if x["key"] == key[entry]]
                if hit and e.location.key in {key[i] for i in path[:-1]}:
                    found["impact"].append(abs(hit[0]["added_ms"] * MS - added) <= 0.2 * added)
    out["ours"] = {k: (sum(v), len(v)) for k, v in found.items()}
    # false events on edges without a change, per 1,000 edge-hours after the warm-up
    edge_hours = sum(max(0.0, (s[-1][0] - s[0][0]) / HOUR - 0.5) for s in series.values())
    false_ours = sum(1 for e in rel if e.type in ("call_pattern_regression", "new_dependency")
                     and (e.location.key, e.detail.get("callee_key")) not in changed_edges)
    out["ours"]["false_per_1000_edge_hours"] = 1000 * false_ours / max(edge_hours, 1e-9)
    for name, rule in (("naive", naive), ("adwin", adwin)):
        hits, fires_false = [], 0
        for edge, s in series.items():
            ends = rule(s)
            c = changed_edges.get(edge)
            if c is not None and c.kind == "n_plus_one":
                hits.append(any(c.at_ns < end - EPOCH_NS <= c.at_ns + horizon for end in ends))
                fires_false += sum(1 for end in ends if end - EPOCH_NS <= c.at_ns)
            else:
                fires_false += len(ends)
        out[name] = {"n_plus_one": (sum(hits), len(hits)),
                     "false_per_1000_edge_hours": 1000 * fires_false / max(edge_hours, 1e-9)}
    return out


def _subtree_mean(nodes: list[Node], index: int) -> float:
    """Mean time of one call of a node with its children, before the change."""
    n = nodes[index]
    total = n.self_ms * MS * math.exp(n.sigma ** 2 / 2)
    for c in nodes:
        if c.parent == index and not c.new_only:
            total += c.per_call * _subtree_mean(nodes, c.index)
    return total


def join_memory(spans: int = 100_000, batch: int = 1000) -> tuple[float, float]:
    """Bytes the call graph's join holds per waiting span, with ``spans`` waiting (added a
    request of ``batch`` at a time, none complete), and at its peak while they are joined."""
    import tracemalloc

    from processor.pipeline.graph import CallGraph

    rng = np.random.default_rng(5)
    g = CallGraph(window_ns=WINDOW, wait_ns=10 * SEC, max_spans=10 * spans)
    tracemalloc.start()
    for a in range(0, spans, batch):
        k = min(batch, spans - a)
        g.add(rng.integers(1, 2**63, k, dtype=np.int64).astype(np.uint64), np.arange(a + 1, a + k + 1, dtype=np.uint64),
              np.zeros(k, np.uint64), rng.integers(0, 1000, k), np.zeros(k, np.int64), np.zeros(k, np.int64),
              np.full(k, SEC), np.full(k, 2 * SEC), np.full(k, 2, np.uint8))
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    g.flush({0: 100 * SEC}, {0: 0})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return held / spans, peak / spans


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--services", type=int, default=6)
    p.add_argument("--hours", type=float, default=7.0)
    p.add_argument("--join-memory", action="store_true",
                   help="only the join's memory: bytes per span with 100,000 spans waiting, and at the "
                        "peak of joining them")
    args = p.parse_args(argv)
    if args.join_memory:
        held, peak = join_memory()
        print(f"call graph join, 100,000 spans waiting: {held:.0f} bytes per span held "
              f"({held * 1e5 / 2**20:.1f} MiB), {peak:.0f} bytes per span at the peak of joining them")
        return 0
    totals: dict = {}
    seconds, spans_note = [], []
    for seed in range(1, args.seeds + 1):
        sc = build(seed, args.services, args.hours)
        events, series, took = run(sc)
        seconds.append(took)
        r = score(sc, events, series)
        for rule, figures in r.items():
            for k, v in figures.items():
                if isinstance(v, tuple):
                    a, b = totals.setdefault((rule, k), (0, 0))
                    totals[(rule, k)] = (a + v[0], b + v[1])
                else:
                    totals.setdefault((rule, k), []).append(v)
        kinds = sorted({c.kind for c in sc.changes})
        spans_note.append(f"seed {seed}: {len(sc.changes)} changes ({', '.join(kinds)}), {len(series)} edges")
    print(f"call-graph benchmark: {args.seeds} seeds x {args.services} services x {args.hours:g} h, "
          f"60 s windows; engine CPU {statistics.median(seconds):.0f} s per seed (median)")
    for line in spans_note:
        print("  " + line)
    print("| rule | N+1 recall | new dependency recall | slower node recall | cause named (top cause on the path) "
          "| impact within 20% | false events per 1,000 edge-hours |")
    print("|---|---|---|---|---|---|---|")
    for rule in ("ours", "naive", "adwin"):
        def f(k):
            v = totals.get((rule, k))
            if v is None:
                return "n/a"
            if isinstance(v, list):
                return f"{statistics.mean(v):.2f}"
            return f"{v[0]}/{v[1]}" + (f" ({v[0] / v[1]:.0%})" if v[1] else "")
        name = {"ours": "call_pattern / new_dependency / causes (Backflow)", "naive": "naive: calls >= 2x last hour",
                "adwin": "River ADWIN on calls per call"}[rule]
        print(f"| {name} | {f('n_plus_one')} | {f('new_dependency')} | {f('slower')} | {f('cause')} | "
              f"{f('impact')} | {f('false_per_1000_edge_hours')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
