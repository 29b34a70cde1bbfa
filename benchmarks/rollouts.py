"""Rollout verdicts on seeded canaries: does a version with a change fail, and one without pass?

    python -m benchmarks.rollouts                 # 2 seeds x 6 services x 7 h
    python -m benchmarks.rollouts --seeds 1 --hours 6

The call-graph benchmark's services (benchmarks/call_graph.py: entry points calling
functions and queries, diurnal load, bursts, one service in three surging to 2.5x without a
code change), each rolling out 1.1.0 at 3-4 h as a canary: 5% of the requests for 20
minutes, 25% for 20 minutes, then all. In half of the services (the even ones) the version
brings that benchmark's 2-3 injected changes (an N+1, a slower function or query, a new
query); in the others it changes nothing: a clean rollout, whose figures differ from the
old version's only by chance. All run through ``processor.pipeline.engine.Engine``
in-process, 60 s windows, default settings (``rollouts:`` included).

Per rollout, scored against what it is:

- changed: whether a ``rollout`` event said ``fail`` before the canary reached all
  requests (at 5% or 25%), and at any time; the minutes from the rollout to the first fail;
- clean: whether any ``rollout`` event said ``fail`` (a false fail), and the verdict of the
  last one (``pass`` expected once the version has its calls);

beside the rule one writes by hand in a canary tool's analysis (Flagger's request duration
check, Argo Rollouts' Prometheus query): every window in which both versions ran, each
entry point's p99 in the new version against the old one's, failing at 1.2x or more in one
window, or in three windows in a row (as a failure limit of 3 would).
"""

from __future__ import annotations

import argparse
import statistics
import time


from benchmarks.call_graph import EPOCH_NS, SEC, Scenario, build, chunks
from processor.config import Config
from processor.pipeline.engine import Engine
from processor.pipeline.sketch import window_quantiles

MINUTE = 60 * SEC
CANARY = ((0, 0.05), (20 * MINUTE, 0.25), (40 * MINUTE, 1.0))
NAIVE_RATIO = 1.2


def scenario(seed: int, services: int, hours: float) -> tuple[Scenario, set[int]]:
    """The call-graph scenario with canaries; the odd services' changes undone (clean)."""
    sc = build(seed, services, hours)
    sc.canary = CANARY
    clean = {s for s in range(services) if s % 2}
    for c in sc.changes:
        if c.service in clean:
            n = sc.nodes[c.node]
            n.per_call_new = 0.0 if n.new_only else n.per_call
            n.self_factor_new = 1.0
    sc.changes = [c for c in sc.changes if c.service not in clean]
    return sc, clean


def run(sc: Scenario) -> tuple[list, dict, dict, float]:
    """Rollout events per service, the naive rules' first fail per service (window end,
    ns): in one window, and in 3 windows in a row; and the engine's CPU seconds."""
    eng = Engine(Config.defaults(allowed_lateness=10.0), known_keys=set())
    entries = {n.location.key for n in sc.nodes if n.parent == -1}
    events, naive, naive3, streak = [], {}, {}, {}
    t = time.process_time()

    def take(results):
        for r in results:
            events.extend(e for e in r.events if e.type == "rollout")
            s = int(r.window.service[3:])
            rows = [(lw, {v.version[1]: v for v in lw.versions}) for lw in r.window.locations
                    if lw.location.key in entries]
            pairs = [(by["1.0.0"], by["1.1.0"]) for _, by in rows if "1.0.0" in by and "1.1.0" in by]
            if not pairs:
                continue
            q = window_quantiles([v.sketch for pair in pairs for v in pair], (0.99,))[:, 0]
            worse = any(q[2 * i + 1] >= NAIVE_RATIO * q[2 * i] for i in range(len(pairs)))
            streak[s] = streak.get(s, 0) + 1 if worse else 0
            if worse:
                naive.setdefault(s, r.window.end_ns)
            if streak[s] >= 3:
                naive3.setdefault(s, r.window.end_ns)

    for batch in chunks(sc):
        take(eng.ingest(batch))
    take(eng.flush_all())
    return events, naive, naive3, time.process_time() - t


def score(sc: Scenario, clean: set[int], events: list, naive: dict, naive3: dict) -> dict:
    out = {"changed_fail_in_canary": [], "changed_fail": [], "minutes_to_fail": [], "clean_false_fail": [],
           "clean_last_pass": []}
    for rule in ("naive", "naive3"):
        out |= {f"{rule}_changed_fail_in_canary": [], f"{rule}_clean_false_fail": [], f"{rule}_minutes_to_fail": []}
    full = sc.canary[-1][0]
    for s, at in sc.rollout.items():
        mine = [e for e in events if e.location.service == f"svc{s}" and e.version[1] == "1.1.0"]
        fails = [e.window_end_ns - EPOCH_NS for e in mine if e.detail["verdict"] == "fail"]
        first = min(fails, default=None)
        if s in clean:
            out["clean_false_fail"].append(bool(fails))
            out["clean_last_pass"].append(bool(mine) and mine[-1].detail["verdict"] == "pass")
        else:
            out["changed_fail"].append(first is not None)
            out["changed_fail_in_canary"].append(first is not None and first - at <= full + MINUTE)
            if first is not None:
                out["minutes_to_fail"].append((first - at) / MINUTE)
        for rule, firsts in (("naive", naive), ("naive3", naive3)):
            n = firsts[s] - EPOCH_NS if s in firsts else None
            if s in clean:
                out[f"{rule}_clean_false_fail"].append(n is not None)
            else:
                out[f"{rule}_changed_fail_in_canary"].append(n is not None and n - at <= full + MINUTE)
                if n is not None:
                    out[f"{rule}_minutes_to_fail"].append((n - at) / MINUTE)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--services", type=int, default=6)
    p.add_argument("--hours", type=float, default=7.0)
    args = p.parse_args(argv)
    totals: dict[str, list] = {}
    seconds = []
    for seed in range(1, args.seeds + 1):
        sc, clean = scenario(seed, args.services, args.hours)
        events, naive, naive3, took = run(sc)
        seconds.append(took)
        for k, v in score(sc, clean, events, naive, naive3).items():
            totals.setdefault(k, []).extend(v)

    def frac(k):
        v = totals[k]
        return f"{sum(v)}/{len(v)}"

    def minutes(k):
        v = totals[k]
        return f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" if v else "-"
    print(f"rollouts benchmark: {args.seeds} seeds x {args.services} services x {args.hours:g} h, canary "
          f"5% / 25% / 100% at 0 / 20 / 40 min, 60 s windows; engine CPU {statistics.median(seconds):.0f} s "
          f"per seed (median)")
    print("| rule | changed: fail during the canary | changed: fail at all | minutes to the first fail, "
          "median (min-max) | clean: false fail | clean: last verdict pass |")
    print("|---|---|---|---|---|---|")
    print(f"| Backflow's verdict | {frac('changed_fail_in_canary')} | {frac('changed_fail')} | "
          f"{minutes('minutes_to_fail')} | {frac('clean_false_fail')} | {frac('clean_last_pass')} |")
    for rule, what in (("naive", "in a window"), ("naive3", "in 3 windows in a row")):
        print(f"| naive: an entry point's p99 >= {NAIVE_RATIO}x the old version's {what} | "
              f"{frac(rule + '_changed_fail_in_canary')} | - | {minutes(rule + '_minutes_to_fail')} | "
              f"{frac(rule + '_clean_false_fail')} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
