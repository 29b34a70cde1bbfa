"""Detection-quality benchmark: recall, false events and delay on seeded scenarios.

    python -m benchmarks.detection                 # full: 2 seeds x 8 services x 40 functions
                                                   # x 8 h, and a gRPC replay of a small one
    python -m benchmarks.detection --quick         # 1 seed x 4 services x 15 functions x 6 h
    python -m benchmarks.detection --quick --grpc  # ... and the gRPC replay
    python -m benchmarks.detection --config detectors.yaml --seeds 3 --json out.json
    python -m benchmarks.detection --load-seeds 0  # without the load cases

Besides those, every run scores the load cases (``benchmarks.scenarios.generate_load``, 4
seeds x 4 services x 12 functions x 8 h; ``--load-seeds``): functions whose latency follows
the load, linearly or as a queue, while the load surges past anything the baseline saw
("surge") or a rollout changes how often the other functions are called ("mix"). Any event
on a load-following function is false; the target is none, over all seeds.

Scenarios come from ``benchmarks.scenarios`` (lognormal and Pareto-tailed latencies, diurnal
load with bursts, a "1.1.0" rollout per service, at once or as a canary, that brings injected
changes on 30-40% of the functions). Each seed's scenario goes through ``processor.pipeline.engine.Engine``
in-process ("direct"), batch after batch, with 60 s windows and 5 s allowed lateness unless
``--window`` or the YAML file says otherwise. The gRPC replay sends a smaller scenario through
a real ``backflow serve`` (with its own redis-server), reads the events back from the Redis
stream and checks that they are the same as the direct run's.

Scoring (``score``):

- A change is detected when an event of its expected type (``Change.expected_event``) at its
  location comes from a window with ``change_ns < window_end <= change_ns + 3 h``; the first
  such event counts. ``change_ns`` is the canary start for canaries. A window ending at
  ``change_ns`` holds no span of the new version, hence the strict ``<``.
- Delay: in windows ``(window_end - change_ns) / window``; in spans, the spans of the new
  version at that location with end in [change_ns, window_end) (dormant: none, so not given).
  Medians count undetected changes as infinitely late.
- Attribution: the detecting event's ``version[1]`` is the new version.
- False events: every event other than ``first_seen`` and ``resolved``, after the first 2 h,
  on an unchanged location, or on a changed location from a window ending at or before its
  change. Per 1,000 location-hours of exactly those (location, time) pairs: unchanged
  locations after 2 h plus changed ones between 2 h and their change.
- Cold start (reported, not a target): the events of the first 2 h (no change happens
  before 3 h, so all of them are false), per 1,000 location-hours from the end of the
  warm-up (``detectors.warmup_windows`` windows) to 2 h.
- ``first_seen`` of locations that exist from the start are expected once each and not scored.

The numbers the project's issue sets (at 60 s windows and >= 5 spans/s per location) are
checked and printed as PASS or FAIL; ``--check`` makes any FAIL, or a gRPC replay that differs,
exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from benchmarks.scenarios import (
    EXPECTED_QUANTILE, HOUR, NEW_VERSION, SURGE, Scenario, effect_label, generate, generate_load,
)
from benchmarks.serve_metrics import healthy, metric

FULL = {"services": 8, "functions_per_service": 40, "hours": 8.0}
QUICK = {"services": 4, "functions_per_service": 15, "hours": 6.0}
REPLAY = {"services": 2, "functions_per_service": 6, "hours": 5.0}
LOAD = {"services": 4, "functions_per_service": 12, "hours": 8.0}
LOAD_SEEDS = 4
WARMUP_NS = 2 * HOUR       # events before this are not scored as false
HORIZON_NS = 3 * HOUR      # a detection must come within this of the change
NOT_DETECTIONS = ("first_seen", "resolved")
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
EVENTS_STREAM = "backflow:events"


@dataclass(frozen=True)
class Ev:
    """An event, reduced to what the scoring and the replay comparison need."""
    type: str
    key: str
    version: str            # service.version the event is attributed to
    window_start_ns: int
    window_end_ns: int
    quantile: str = ""      # detail["quantile"] of latency events
    summary: str = field(default="", compare=False)  # for reading false events, not compared
    detail: str = field(default="", compare=False)
    severity: str = field(default="", compare=False)

    @property
    def identity(self) -> tuple[str, str, int]:
        """What the gRPC replay compares: (type, key, window.end in ms)."""
        return (self.type, self.key, self.window_end_ns // 1_000_000)


def events_of(results) -> list[Ev]:
    out = []
    for r in results:
        for e in r.events:
            detail = e.detail if isinstance(e.detail, dict) else {}
            out.append(Ev(e.type, e.location.key, e.version[1], e.window_start_ns, e.window_end_ns,
                          str(detail.get("quantile", "")), e.summary,
                          json.dumps(detail, sort_keys=True, default=str), e.severity))
    return out


# --- configuration -----------------------------------------------------------------------------

def build_config(config_path: str | None, window: float | None):
    """The engine's Config: YAML settings (detectors included) with the benchmark's overrides.

    Allowed lateness 5 s and an idle timeout that never fires (event time only) are forced;
    the window is ``window`` if given, else the YAML's, else the default (60 s).
    """
    from processor.config import resolve
    flags = {"config": config_path, "allowed_lateness": 5.0, "idle_timeout": 1e9}
    if window is not None:
        flags["window"] = window
    return resolve(flags, {})


# --- direct runs ---------------------------------------------------------------------------------

def run_direct(seed: int, sizes: dict, cfg, load_cases: bool = False) -> dict:
    """One scenario (of the load cases if ``load_cases``) through an in-process Engine;
    returns the score and the events."""
    from processor.pipeline.engine import Engine
    t_start = time.perf_counter()
    sc = (generate_load if load_cases else generate)(seed, **sizes)
    t_setup = time.perf_counter() - t_start
    engine = Engine(cfg, known_keys=set(), clock=lambda: 0.0)
    events: list[Ev] = []
    t_gen = t_eng = 0.0
    spans = 0
    for c in range(sc.n_chunks):
        t0 = time.perf_counter()
        batch = sc.chunk(c)
        t1 = time.perf_counter()
        events += events_of(engine.ingest(batch))
        t_eng += time.perf_counter() - t1
        t_gen += t1 - t0
        spans += len(batch)
    t1 = time.perf_counter()
    events += events_of(engine.flush_all())
    t_eng += time.perf_counter() - t1
    result = score(sc, events, cfg.window_ns,
                   speak_ns=cfg.detectors.common.warmup_windows * cfg.window_ns)
    result.update(seed=seed, spans=spans, late=int(engine.windows.stats["late"]), load_cases=load_cases,
                  events=[asdict(e) for e in events],
                  runtime={"setup_s": t_setup, "generate_s": t_gen, "engine_s": t_eng,
                           "total_s": time.perf_counter() - t_start})
    return result


# --- scoring -----------------------------------------------------------------------------------

def score(sc: Scenario, events: list[Ev], window_ns: int, warmup_ns: int = WARMUP_NS,
          horizon_ns: int = HORIZON_NS, speak_ns: int = 0) -> dict:
    """Score one scenario's events against its ground truth (see the module docstring);
    ``speak_ns``: how long after the start the detectors' warm-up ends (for the cold start)."""
    by_key: dict[str, list[Ev]] = defaultdict(list)
    for e in sorted(events, key=lambda e: (e.window_end_ns, e.type, e.key)):
        by_key[e.key].append(e)
    change_of = {c.key: c for c in sc.changes}

    rows = []
    for c in sc.changes:
        near = [e for e in by_key.get(c.key, ())
                if c.change_ns < e.window_end_ns <= c.change_ns + horizon_ns]
        hit = next((e for e in near if e.type == c.expected_event), None)
        others = [e for e in near if e.type not in NOT_DETECTIONS]
        row = {
            "seed": sc.seed, "key": c.key, "service": c.service, "function": c.function,
            "kind": c.kind, "effect": c.effect, "label": c.label, "canary": c.canary,
            "change_ns": c.change_ns, "baseline": c.baseline, "expected": c.expected_event,
            "detected": hit is not None, "delay_windows": None, "delay_spans": None,
            "event_version": None, "attributed": None, "quantile": None,
            "quantile_match": None, "any_event": bool(others),
            "other_types": sorted({e.type for e in others} - {c.expected_event}),
        }
        if hit is not None:
            row["delay_windows"] = (hit.window_end_ns - c.change_ns) / window_ns
            if c.kind != "vanished":
                row["delay_spans"] = sc.spans_between(c.loc_index, c.change_ns, hit.window_end_ns)
            row["event_version"] = hit.version
            row["attributed"] = hit.version == NEW_VERSION
            row["quantile"] = hit.quantile
            if c.kind in EXPECTED_QUANTILE:
                row["quantile_match"] = hit.quantile == EXPECTED_QUANTILE[c.kind]
        rows.append(row)

    warm_end = sc.start_ns + warmup_ns
    fn_of = {f.location.key: f for f in sc.functions}
    false: list[dict] = []
    warmup_events = 0
    cold: Counter = Counter()
    first_seen = Counter()
    for e in events:
        if e.type == "first_seen":
            first_seen[e.key] += 1
            continue
        if e.type in NOT_DETECTIONS:
            continue
        if e.window_end_ns <= warm_end:
            warmup_events += 1
            cold[f"{e.type} ({e.severity})" if e.severity else e.type] += 1
            continue
        c = change_of.get(e.key)
        if c is None or e.window_end_ns <= c.change_ns:
            f = fn_of.get(e.key)
            svc = sc.services[f.service] if f else None
            false.append({**asdict(e), "changed_later": c is not None,
                          "service": svc.name if svc else "",
                          "function": f.location.function if f else "",
                          "after_rollout": bool(svc and e.window_end_ns > svc.change_ns),
                          "load_sensitive": bool(f and (f.beta > 0 or f.rho > 0)),
                          "load_following": f.load_following if f else "",
                          "case": svc.case if svc else "",
                          "heavy_tail": bool(f and f.tail_shape > 0)})

    loc_hours = 0.0
    existing = []
    for f in sc.functions:
        if not f.in_old:
            continue
        existing.append(f.location.key)
        until = sc.end_ns if f.change is None else f.change.change_ns
        loc_hours += max(0, until - warm_end) / HOUR

    return {
        "changes": rows,
        "false_events": false,
        "location_hours": loc_hours,
        "warmup_events": warmup_events,
        "cold_start": {"events": dict(cold), "location_hours": sum(
            max(0, warm_end - sc.start_ns - speak_ns) / HOUR for f in sc.functions if f.in_old)},
        "first_seen": {
            "existing_locations": len(existing),
            "existing_announced_once": sum(1 for k in existing if first_seen[k] == 1),
            "repeated": sum(max(0, n - 1) for n in first_seen.values()),
        },
        "window_ns": window_ns,
        "load_following": {
            "functions": sum(1 for f in sc.functions if f.load_following),
            "by_case": dict(Counter(sc.services[f.service].case for f in sc.functions if f.load_following)),
            "location_hours": sum((sc.end_ns - warm_end) / HOUR for f in sc.functions if f.load_following),
        },
    }


def _median(values) -> float:
    """Median with None (undetected) counted as infinitely late."""
    a = np.array([math.inf if v is None else v for v in values], float)
    return float(np.median(a)) if len(a) else math.nan


def summarize(results: list[dict]) -> dict:
    """Totals over seeds: cells per (kind, effect), per kind, false events, targets."""
    rows = [r for res in results for r in res["changes"]]
    false = [e for res in results for e in res["false_events"]]
    loc_hours = sum(res["location_hours"] for res in results)

    def cell(rs: list[dict]) -> dict:
        det = [r for r in rs if r["detected"]]
        att = [r for r in det if r["attributed"] is not None]
        qm = [r for r in det if r["quantile_match"] is not None]
        return {
            "n": len(rs), "detected": len(det),
            "recall": len(det) / len(rs) if rs else math.nan,
            "any_event": sum(r["any_event"] for r in rs) / len(rs) if rs else math.nan,
            "median_delay_spans": _median([r["delay_spans"] if r["detected"] else None
                                           for r in rs]),
            "median_delay_windows": _median([r["delay_windows"] for r in rs]),
            "attribution": sum(r["attributed"] for r in att) / len(att) if att else math.nan,
            "quantile_match": sum(r["quantile_match"] for r in qm) / len(qm) if qm else math.nan,
        }

    kinds = sorted({r["kind"] for r in rows}, key=lambda k: _KIND_ORDER.get(k, 99))
    cells = []
    for kind in kinds:
        for effect in sorted({r["effect"] for r in rows if r["kind"] == kind}):
            rs = [r for r in rows if r["kind"] == kind and r["effect"] == effect]
            cells.append({"kind": kind, "effect": effect, "label": effect_label(kind, effect),
                          **cell(rs)})
        cells.append({"kind": kind, "effect": None, "label": "all",
                      **cell([r for r in rows if r["kind"] == kind])})

    scored = [r for r in rows if r["detected"] and r["kind"] != "vanished"]
    def share(rs):
        return sum(r["attributed"] for r in rs) / len(rs) if rs else math.nan
    attribution = {
        "all": share(scored), "n": len(scored),
        "canary": share([r for r in scored if r["canary"]]),
        "n_canary": sum(1 for r in scored if r["canary"]),
        "at_once": share([r for r in scored if not r["canary"]]),
        "n_at_once": sum(1 for r in scored if not r["canary"]),
        "dormant": share([r for r in rows if r["detected"] and r["kind"] == "vanished"]),
    }
    per_1000 = 1000 * len(false) / loc_hours if loc_hours else math.nan
    canary = {"n": sum(r["canary"] for r in rows), **cell([r for r in rows if r["canary"]])}
    summary = {
        "cells": cells,
        "changes": len(rows),
        "canary": canary,
        "false_events": {
            "count": len(false), "location_hours": loc_hours, "per_1000_location_hours": per_1000,
            "by_type": dict(Counter(e["type"] for e in false)),
            "on_changed_before_change": sum(e["changed_later"] for e in false),
            "after_rollout": sum(e["after_rollout"] for e in false),
            "load_sensitive": sum(e["load_sensitive"] for e in false),
            "heavy_tail": sum(e["heavy_tail"] for e in false),
            "warmup_events_not_scored": sum(res["warmup_events"] for res in results),
        },
        "cold_start": _cold_start(results),
        "attribution": attribution,
        "first_seen": {k: sum(res["first_seen"][k] for res in results)
                       for k in ("existing_locations", "existing_announced_once", "repeated")},
    }
    summary["targets"] = targets(rows, per_1000)
    return summary


def _cold_start(results: list[dict]) -> dict:
    """The events of the first 2 h, after the warm-up: all false (see the module docstring)."""
    by_type = Counter()
    for res in results:
        by_type.update(res.get("cold_start", {}).get("events", {}))
    hours = sum(res.get("cold_start", {}).get("location_hours", 0.0) for res in results)
    n = sum(by_type.values())
    return {"events": n, "by_type": dict(by_type), "location_hours": hours,
            "per_1000_location_hours": 1000 * n / hours if hours else math.nan}


_KIND_ORDER = {k: i for i, k in enumerate(
    ["median", "p99", "p999", "error", "new_exception", "scaling", "vanished", "new"])}


def targets(rows: list[dict], false_per_1000: float) -> list[dict]:
    """The issue's targets, each with its figure and PASS/FAIL."""
    def group(pred):
        return [r for r in rows if pred(r)]

    median25 = group(lambda r: r["kind"] == "median" and r["effect"] >= 1.25 - 1e-9)
    p99_2x = group(lambda r: r["kind"] == "p99" and r["effect"] >= 2.0 - 1e-9)
    err_5x = group(lambda r: r["kind"] == "error" and r["effect"] >= 0.005 - 1e-12)
    p99_eq2 = group(lambda r: r["kind"] == "p99" and abs(r["effect"] - 2.0) < 1e-9)
    err_eq5 = group(lambda r: r["kind"] == "error" and abs(r["effect"] - 0.005) < 1e-12)

    def recall(rs):
        return sum(r["detected"] for r in rs) / len(rs) if rs else math.nan

    def delay(rs):
        return _median([r["delay_spans"] if r["detected"] else None for r in rs])

    out = []
    for name, value, limit, op, n in (
        ("recall, median shifts >= +25%", recall(median25), 0.95, ">=", len(median25)),
        ("recall, p99 shifts >= 2x", recall(p99_2x), 0.95, ">=", len(p99_2x)),
        ("recall, error shares >= 5x", recall(err_5x), 0.95, ">=", len(err_5x)),
        ("false events per 1,000 location-hours", false_per_1000, 1.0, "<=", None),
        ("median delay (spans), median shifts >= +25%", delay(median25), 1000, "<=", len(median25)),
        ("median delay (spans), p99 shifts of 2x", delay(p99_eq2), 5000, "<=", len(p99_eq2)),
        ("median delay (spans), error shares of 5x", delay(err_eq5), 5000, "<=", len(err_eq5)),
    ):
        ok = (value >= limit if op == ">=" else value <= limit) if not math.isnan(value) else False
        out.append({"target": name, "value": value, "limit": limit, "op": op, "n": n,
                    "pass": bool(ok and (n is None or n > 0))})
    return out


def summarize_load(results: list[dict]) -> dict:
    """The load cases over seeds: false events on load-following functions (each seed's
    count, by type, case and shape), the other false events, recall of their changes."""
    lf = [[e for e in res["false_events"] if e["load_following"]] for res in results]
    flat = [e for es in lf for e in es]
    rest = summarize(results)
    functions = sum(res["load_following"]["functions"] for res in results)
    hours = sum(res["load_following"]["location_hours"] for res in results)
    per_seed = [len(es) for es in lf]
    out = {
        "seeds": [res["seed"] for res in results], "functions": functions, "location_hours": hours,
        "false_events": len(flat), "per_seed": per_seed,
        "median": float(np.median(per_seed)) if per_seed else math.nan,
        "min": min(per_seed, default=0), "max": max(per_seed, default=0),
        "by_type": dict(Counter(e["type"] for e in flat)),
        "by_case": dict(Counter(e["case"] for e in flat)),
        "by_shape": dict(Counter(e["load_following"] for e in flat)),
        "functions_with_events": len({(e["key"], res["seed"]) for res, es in zip(results, lf) for e in es}),
        "other_false_events": rest["false_events"]["count"] - len(flat),
        "other_false_by_type": dict(Counter(e["type"] for res in results for e in res["false_events"]
                                            if not e["load_following"])),
        "recall_targets": [t for t in rest["targets"] if t["target"].startswith("recall")],
    }
    out["target"] = {"target": "false events on load-following functions, load cases", "value": len(flat),
                     "limit": 0, "op": "<=", "n": functions, "pass": bool(results) and not flat}
    return out


# --- gRPC replay -------------------------------------------------------------------------------


def run_replay(seed: int, sizes: dict, cfg, config_path: str | None, log=print) -> dict:
    """Send a scenario through a real ``backflow serve`` and read its events from Redis."""
    import grpc
    import redis

    from benchmarks.scenarios import OtlpEncoder
    from processor.devtools.redis_server import RedisServer, free_port

    t_start = time.perf_counter()
    sc = generate(seed, **sizes)
    encoder = OtlpEncoder(sc)
    grpc_port, metrics_port = free_port(), free_port()
    with RedisServer() as rs, tempfile.TemporaryFile("w+") as server_log:
        args = [sys.executable, "-m", "processor", "serve",
                "--otlp-grpc", f"127.0.0.1:{grpc_port}", "--metrics", f"127.0.0.1:{metrics_port}",
                "--redis-url", rs.url, "--otlp-http", "off", "--window", f"{cfg.window:g}",
                "--allowed-lateness", "5", "--idle-timeout", "100000", "--log-level", "warning"]
        if config_path:
            args += ["--config", config_path]
        proc = subprocess.Popen(args, stdout=server_log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 60
            while not healthy(metrics_port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    server_log.seek(0)
                    raise RuntimeError(f"backflow serve did not start: {server_log.read()[-2000:]}")
                time.sleep(0.1)

            # Encoding (Python per span) runs on a thread while the calls wait on the server.
            requests: queue.Queue = queue.Queue(maxsize=64)
            spans_sent = [0]

            def produce():
                try:
                    for c in range(sc.n_chunks):
                        batch = sc.chunk(c)
                        for req in encoder.encode(batch):
                            requests.put(req)
                        spans_sent[0] += len(batch)
                finally:
                    requests.put(None)

            producer = threading.Thread(target=produce, name="encode", daemon=True)
            producer.start()
            n_requests = retries = 0
            t_send = time.perf_counter()
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[
                    ("grpc.max_send_message_length", 64 << 20)]) as channel:
                export = channel.unary_unary(EXPORT)  # bytes in, bytes out
                while (req := requests.get()) is not None:
                    while True:
                        try:
                            export(req, timeout=60)
                            break
                        except grpc.RpcError as e:
                            if e.code() != grpc.StatusCode.UNAVAILABLE:
                                raise
                            retries += 1
                            time.sleep(0.2)
                    n_requests += 1
            producer.join()
            t_sent = time.perf_counter() - t_send
            deadline = time.monotonic() + 600
            while True:
                done = (metric(metrics_port, "backflow_processed_spans_total")
                        + metric(metrics_port, "backflow_late_spans_total"))
                if done >= spans_sent[0]:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server processed {done:.0f} of {spans_sent[0]} spans")
                time.sleep(0.2)
            late = metric(metrics_port, "backflow_late_spans_total")
            refused = metric(metrics_port, "backflow_receiver_refused_spans_total")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        client = redis.Redis.from_url(rs.url, decode_responses=True)
        entries = [f for _, f in client.xrange(EVENTS_STREAM)]
        client.close()
        server_log.seek(0)
        server_out = server_log.read()
    events = [(f["type"], f["key"], int(f["window.end"]), f.get("service.version", ""))
              for f in entries]
    return {"seed": seed, "sizes": sizes, "spans": spans_sent[0], "requests": n_requests,
            "retries": retries, "late": late, "refused": refused, "exit_status": rc,
            "send_s": t_sent, "total_s": time.perf_counter() - t_start, "events": events,
            "server_log_tail": server_out[-2000:]}


def compare_replay(direct_events: list[dict], replay: dict) -> dict:
    direct = Counter((e["type"], e["key"], e["window_end_ns"] // 1_000_000) for e in direct_events)
    via_grpc = Counter((t, k, w) for t, k, w, _ in replay["events"])
    d_ver = {(e["type"], e["key"], e["window_end_ns"] // 1_000_000): e["version"]
             for e in direct_events}
    version_mismatch = sum(1 for t, k, w, v in replay["events"] if d_ver.get((t, k, w), v) != v)
    only_direct = sorted((direct - via_grpc).elements())
    only_grpc = sorted((via_grpc - direct).elements())
    return {"identical": not only_direct and not only_grpc and version_mismatch == 0,
            "events": sum(via_grpc.values()), "direct_events": sum(direct.values()),
            "only_direct": only_direct[:20], "only_grpc": only_grpc[:20],
            "n_only_direct": len(only_direct), "n_only_grpc": len(only_grpc),
            "version_mismatch": version_mismatch,
            "by_type": dict(Counter(t for t, _, _, _ in replay["events"]))}


# --- report --------------------------------------------------------------------------------------

def _fmt(x, spec=".0f", none="-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def report(summary: dict, results: list[dict], args, cfg, replay: dict | None, wall: float) -> str:
    out = []
    w = out.append
    seeds = [r["seed"] for r in results]
    spans = sum(r["spans"] for r in results)
    w(f"Backflow detection benchmark: seeds {seeds}, {args.sizes['services']} services x "
      f"{args.sizes['functions_per_service']} functions x {args.sizes['hours']:g} h, "
      f"window {cfg.window:g} s, lateness {cfg.allowed_lateness:g} s"
      + (f", config {args.config}" if args.config else ""))
    w(f"{spans:,} spans, {summary['changes']} injected changes "
      f"({summary['canary']['n']} in canaries), late spans {sum(r['late'] for r in results)}")
    w("")
    w(f"{'kind':<14}{'effect':<22}{'n':>5}{'det':>5}{'recall':>8}{'any ev':>8}"
      f"{'delay spans':>13}{'delay win':>11}{'attrib':>8}{'quantile':>10}")
    for c in summary["cells"]:
        if c["label"] == "all":
            label, kind = "all", ""
        else:
            label, kind = c["label"], c["kind"]
        w(f"{kind:<14}{label:<22}{c['n']:>5}{c['detected']:>5}{_fmt(c['recall'] * 100, '.0f'):>7}%"
          f"{_fmt(c['any_event'] * 100, '.0f'):>7}%{_fmt(c['median_delay_spans'], ',.0f'):>13}"
          f"{_fmt(c['median_delay_windows'], '.1f'):>11}{_fmt(c['attribution'] * 100, '.0f'):>7}%"
          f"{_fmt(c['quantile_match'] * 100, '.0f'):>9}%")
    w("  (delays are medians with undetected changes counted as infinitely late; 'any ev' is the")
    w("   share of changes with any event other than first_seen/resolved at the location; 'attrib'")
    w("   the share of detections attributed to the new version; 'quantile' the share of latency")
    w("   detections naming the changed quantile)")
    w("")
    fe = summary["false_events"]
    by_type = ", ".join(f"{t} {n}" for t, n in sorted(fe["by_type"].items())) or "none"
    w(f"false events: {fe['count']} in {fe['location_hours']:,.0f} location-hours = "
      f"{_fmt(fe['per_1000_location_hours'], '.2f')} per 1,000 location-hours ({by_type}; "
      f"{fe['on_changed_before_change']} on changed locations before their change)")
    w(f"  of these: {fe['after_rollout']} after their service's rollout, {fe['load_sensitive']} at "
      f"load-sensitive and {fe['heavy_tail']} at heavy-tailed functions; "
      f"{fe['warmup_events_not_scored']} events in the first 2 h not scored")
    cs = summary["cold_start"]
    by_cold = ", ".join(f"{t} {n}" for t, n in sorted(cs["by_type"].items())) or "none"
    w(f"cold start (not a target): {cs['events']} events between the end of the warm-up and 2 h, in "
      f"{cs['location_hours']:,.0f} location-hours = {_fmt(cs['per_1000_location_hours'], '.2f')} per "
      f"1,000 location-hours ({by_cold})")
    a = summary["attribution"]
    w(f"attribution to the new version: {_fmt(a['all'] * 100, '.0f')}% of {a['n']} detections "
      f"(canary {_fmt(a['canary'] * 100, '.0f')}% of {a['n_canary']}, at once "
      f"{_fmt(a['at_once'] * 100, '.0f')}% of {a['n_at_once']}; dormant events, not counted: "
      f"{_fmt(a['dormant'] * 100, '.0f')}%)")
    cn = summary["canary"]
    w(f"canary changes: recall {_fmt(cn['recall'] * 100, '.0f')}% of {cn['n']}")
    fs = summary["first_seen"]
    w(f"first_seen of locations present from the start: {fs['existing_announced_once']} of "
      f"{fs['existing_locations']} announced exactly once; repeated first_seen: {fs['repeated']}")
    ld = summary.get("load_cases")
    if ld:
        z = args.load_sizes
        w("")
        w(f"load cases (seeds {ld['seeds']}, {z['services']} services x {z['functions_per_service']} functions"
          f" x {z['hours']:g} h; services alternate a load surge to {SURGE:g}x and a rollout that calls other"
          f" functions less often):")
        by = ", ".join(f"{k} {v}" for k, v in sorted(ld["by_type"].items())) or "none"
        cases = ", ".join(f"{k} {v}" for k, v in sorted(ld["by_case"].items())) or "-"
        shapes = ", ".join(f"{k} {v}" for k, v in sorted(ld["by_shape"].items())) or "-"
        w(f"  false events on the {ld['functions']} load-following functions: {ld['false_events']} ({by}; "
          f"by case: {cases}; by shape: {shapes}); per seed {ld['per_seed']} "
          f"(median {_fmt(ld['median'], 'g')}, min {ld['min']}, max {ld['max']})")
        other = ", ".join(f"{k} {v}" for k, v in sorted(ld["other_false_by_type"].items())) or "none"
        w(f"  other false events in these scenarios: {ld['other_false_events']} ({other})")
        for t in ld["recall_targets"]:
            w(f"  {t['target']} in these scenarios: {_fmt(t['value'] * 100, '.1f')}% (n={t['n']})")
    w("")
    w("targets:")
    for t in summary["targets"]:
        v = t["value"]
        is_recall = t["target"].startswith("recall")
        shown = (_fmt(v * 100, ".1f") + "%") if is_recall else str(v) if isinstance(v, int) else _fmt(v, ",.2f")
        lim = f"{t['limit'] * 100:g}%" if is_recall else f"{t['limit']:,g}"
        n = f" (n={t['n']})" if t["n"] is not None else ""
        w(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {shown} {t['op']} {lim}{n}")
    if replay is not None:
        w("")
        if "error" in replay:
            w(f"grpc replay identical: no (error: {replay['error']})")
        else:
            cmp = replay["compare"]
            same = "yes" if cmp["identical"] else "no"
            w(f"grpc replay identical: {same} ({cmp['events']} events; "
              f"direct {cmp['direct_events']}; {replay['spans']:,} spans in {replay['requests']} "
              f"requests, {replay['retries']} retries, late {replay['late']:.0f}, "
              f"refused {replay['refused']:.0f}, exit status {replay['exit_status']})")
            if not cmp["identical"]:
                w(f"  only direct: {cmp['n_only_direct']} {cmp['only_direct'][:5]}")
                w(f"  only grpc:   {cmp['n_only_grpc']} {cmp['only_grpc'][:5]}")
                w(f"  version differs: {cmp['version_mismatch']}")
    w("")
    w("runtime:")
    for r in results:
        rt = r["runtime"]
        w(f"  seed {r['seed']}: {rt['total_s']:.0f} s (generate {rt['generate_s']:.0f} s, engine "
          f"{rt['engine_s']:.0f} s = {r['spans'] / max(rt['engine_s'], 1e-9) / 1e6:.2f} M spans/s)")
    if replay is not None and "error" not in replay:
        rate = replay["spans"] / max(replay["send_s"], 1e-9) / 1e3
        w(f"  grpc replay: {replay['total_s']:.0f} s ({rate:.0f}k spans/s sent; direct reference "
          f"{replay['direct_s']:.0f} s)")
    w(f"  wall: {wall:.0f} s")
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detection",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short run: 1 seed, 4 services x 15 functions x 6 h")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (full 2, quick 1)")
    p.add_argument("--seed", type=int, default=1, help="first seed")
    p.add_argument("--services", type=int, default=None)
    p.add_argument("--functions", type=int, default=None, help="functions per service")
    p.add_argument("--hours", type=float, default=None)
    p.add_argument("--window", type=float, default=None,
                   help="window seconds (default: YAML or 60)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="Backflow YAML settings (detectors too)")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes for the seeds (default: seeds, at most CPUs)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--grpc", action="store_true",
                   help="also run the gRPC replay (on by default in full runs)")
    g.add_argument("--no-grpc", action="store_true", help="skip the gRPC replay")
    p.add_argument("--grpc-services", type=int, default=REPLAY["services"],
                   help="replay scenario size")
    p.add_argument("--grpc-functions", type=int, default=REPLAY["functions_per_service"])
    p.add_argument("--grpc-hours", type=float, default=REPLAY["hours"])
    p.add_argument("--load-seeds", type=int, default=LOAD_SEEDS,
                   help=f"seeds of the load cases (default {LOAD_SEEDS}; 0: none)")
    p.add_argument("--json", metavar="FILE", default=None, help="write every figure as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a target fails or the replay differs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t_wall = time.perf_counter()
    from processor.config import ConfigError
    try:
        cfg = build_config(args.config, args.window)
    except ConfigError as e:
        print(f"benchmarks.detection: {e}", file=sys.stderr)
        return 2
    sizes = dict(QUICK if args.quick else FULL)
    for k, v in (("services", args.services), ("functions_per_service", args.functions),
                 ("hours", args.hours)):
        if v is not None:
            sizes[k] = v
    args.sizes = sizes
    args.load_sizes = dict(LOAD)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    seeds = [args.seed + i for i in range(n_seeds)]
    load_seeds = [args.seed + i for i in range(max(0, args.load_seeds))]
    do_replay = (args.grpc or not args.quick) and not args.no_grpc
    n_runs = n_seeds + len(load_seeds)
    jobs = max(1, min(args.jobs or n_runs, n_runs, os.cpu_count() or 1))
    replay_sizes = {"services": args.grpc_services, "functions_per_service": args.grpc_functions,
                    "hours": args.grpc_hours}

    def size(z):
        return (f"{z['services']} services x {z['functions_per_service']} functions"
                f" x {z['hours']:g} h")

    print(f"running {len(seeds)} seed(s) with {jobs} process(es): {size(sizes)}"
          + (f"; {len(load_seeds)} seed(s) of the load cases: {size(args.load_sizes)}" if load_seeds else "")
          + (f"; then a gRPC replay of {size(replay_sizes)}" if do_replay else ""), flush=True)
    ctx = mp.get_context("spawn")  # no fork after grpc/threads in this process
    runs = [(s, sizes, cfg, False) for s in seeds] + [(s, args.load_sizes, cfg, True) for s in load_seeds]
    if jobs == 1:
        everything = [run_direct(*run) for run in runs]
    else:
        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            everything = list(pool.map(run_direct, *zip(*runs)))
    for r in everything:
        print(f"  seed {r['seed']}{' (load cases)' if r['load_cases'] else ''}: {r['spans']:,} spans, "
              f"{len(r['events'])} events, {r['runtime']['total_s']:.0f} s", flush=True)
    results = [r for r in everything if not r["load_cases"]]
    load_results = [r for r in everything if r["load_cases"]]

    replay = None
    if do_replay:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            ref = pool.submit(run_direct, seeds[0], replay_sizes, cfg)
            try:
                replay = run_replay(seeds[0], replay_sizes, cfg, args.config)
            except Exception as e:  # noqa: BLE001 (reported, and fails --check)
                replay = {"error": f"{type(e).__name__}: {e}"}
            direct = ref.result()
        if "error" not in replay:
            replay["compare"] = compare_replay(direct["events"], replay)
            replay["direct_s"] = direct["runtime"]["total_s"]
        replay.pop("events", None)

    summary = summarize(results)
    if load_results:
        summary["load_cases"] = summarize_load(load_results)
        summary["targets"].append(summary["load_cases"]["target"])
    wall = time.perf_counter() - t_wall
    print()
    print(report(summary, results, args, cfg, replay, wall))
    if args.json:
        doc = {
            "seeds": seeds, "sizes": sizes, "window_s": cfg.window,
            "allowed_lateness_s": cfg.allowed_lateness, "config": args.config,
            "summary": summary,
            "changes": [r for res in results for r in res["changes"]],
            "false_events": [e for res in results for e in res["false_events"]],
            "load_cases_false_events": [{**e, "seed": res["seed"]} for res in load_results
                                        for e in res["false_events"]],
            "per_seed": [{k: v for k, v in res.items()
                          if k not in ("changes", "false_events", "events")} for res in everything],
            "grpc_replay": replay, "wall_s": wall,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_finite(doc), f, indent=1, default=_json_default, allow_nan=False)
    if args.check:
        failed = [t for t in summary["targets"] if not t["pass"]]
        if failed or (replay is not None and not replay.get("compare", {}).get("identical")):
            return 1
    return 0


def _finite(o):
    """NaN and infinity (no figure, never detected) as null: strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
