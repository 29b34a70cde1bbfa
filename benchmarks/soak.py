"""Soak benchmark: a steady load for ten minutes; does memory stay flat once all locations are known?

    python -m benchmarks.soak               # 10 minutes at 40,000 spans/s, 2,000 code locations
    python -m benchmarks.soak --minutes 1   # short run

A real ``backflow serve`` (server defaults, except ``--window 4 --allowed-lateness 0``)
with a real redis-server behind it, fed by client processes that send pre-encoded OTLP
requests at a paced, steady rate (``--rate``, a fraction of what this machine sustains:
see ``benchmarks.ingest``). Every few seconds (``--interval``) it samples the server: RSS,
open file descriptors and threads of all its processes, CPU, and from /metrics the queue,
the Redis writes pending, spans accepted, processed, late and refused; Redis's
``used_memory``; and the clients' Export call latencies. At the end it prints the first
minute of the steady part against the last one, the RSS slope over the steady part and a
verdict; the exit status is 1 when memory or file descriptors grow, or when a span was
late, refused or rejected, a Redis write dropped, or a client call failed.

Workload. ``--locations`` code locations in 4 services per lane (client thread), each
lane sending one call at a time, so every service's spans arrive in event-time order and
none is late. A lane cycles through its templates: one that names every function of its
services (all locations are known within the first seconds, and every location has spans
in every window) and ``--templates`` Zipf-skewed ones (popular functions). Each send
re-patches the template's trace and span ids, start and end times (fixed64 fields, with
numpy, as ``benchmarks.ingest`` does): nothing is built up front but the templates, so
the run can go on for hours.

Event time follows the wall clock (``--speed 1``): a span ends "now". With the default
60 s window only ten windows would close in ten minutes and no detector would get past
its warm-up (30 windows; 60 for the scaling detector), so the soak uses ``--window 4``:
150 windows in ten minutes, so windows keep closing, baselines and checkpoints (the
default ``--checkpoint-interval 0``: whenever windows close) keep being written to Redis,
and every detector is past warm-up after 61 windows (244 s). What the server pays for
is location-windows (a location's detectors fed and its checkpoint pickled when a window
closes, about 0.5-1 ms each once past warm-up) more than spans: 2,000 locations every
4 s are 500 a second, about a third of a core here, which leaves room on a shared
machine. ``--window 60 --speed 15`` does the same work with event time running 15 times
faster than the clock; more locations need a longer window (or fewer minutes past warm-up).

Durations. A location's baseline sketches grow by a bucket whenever a span lands in a
latency bucket not seen before: with fresh lognormal durations on every send they keep
growing for hours, bounded but slowly (``benchmarks.memory`` measures that steady state,
about 11.7 KB per location). That would read as a slope here, so by default each template
draws ``--variants`` duration vectors once and every send uses one of them: a location's
latency values are a fixed set, seen within seconds, and what grows afterwards is not
the sketches filling. ``--fresh-durations`` draws new ones on every send.

Steady part: from the first sample at which every location is held
(``backflow_active_keys``) and every detector is past warm-up (61 windows of event time
since the first send; for a run too short for that, its second half), to the end.
Processing lag is derived from /metrics (the server has no lag gauge): the backlog is
spans accepted minus spans processed and late (accepted by the receiver, not yet through
the window stage), and the lag in seconds is that backlog over the sending rate.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from benchmarks.ingest import (
    EXPORT_METHOD, SERVICES_PER_LANE, Stack, Workload, retry_delay, _revision,
    build_templates, draw_durations, proc_cpu_seconds, proc_status_kb, proc_tree, render, run_main,
)

MIB = 2**20
WARMUP_WINDOWS = 61   # the scaling detector's warm-up (60 windows) and the window it is judged in
GROWTH_MIB_PER_H = 1.0


# --- analysis (tested in tests/test_soak.py) ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SlopeFit:
    """Least-squares slope of y on t with a 95% confidence interval, per second."""
    slope: float
    lo: float
    hi: float
    n: int
    n_eff: float   # samples, discounted for lag-1 autocorrelation of the residuals
    r1: float      # that autocorrelation


def fit_slope(t: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> SlopeFit:
    """Ordinary least squares, with the standard error widened for autocorrelated residuals.

    RSS sampled every few seconds is not independent noise around a line: it moves in
    steps (a malloc arena, a burst of window closes) and stays there for a while. OLS
    would then be overconfident, so the slope's variance is inflated by (1 + r1) / (1 - r1),
    r1 the lag-1 autocorrelation of the residuals (the AR(1) correction), and the t quantile
    taken with the matching effective sample size."""
    from scipy import stats

    t = np.asarray(t, np.float64)
    y = np.asarray(y, np.float64)
    n = len(t)
    if n < 3:
        raise ValueError("a slope needs at least 3 samples")
    tc = t - t.mean()
    sxx = float(tc @ tc)
    slope = float(tc @ (y - y.mean())) / sxx
    resid = y - y.mean() - slope * tc
    ss = float(resid @ resid)
    r1 = float(resid[1:] @ resid[:-1]) / ss if ss > 0 else 0.0
    r1 = min(max(r1, 0.0), 0.95)
    n_eff = n * (1 - r1) / (1 + r1)
    se = math.sqrt(ss / (n - 2) / sxx) * math.sqrt((1 + r1) / (1 - r1))
    half = float(stats.t.ppf(0.5 + confidence / 2, max(n_eff - 2, 1.0))) * se
    return SlopeFit(slope, slope - half, slope + half, n, n_eff, r1)


@dataclasses.dataclass(frozen=True)
class MemoryVerdict:
    growing: bool
    fit: SlopeFit
    mean_bytes: float
    threshold_mib_h: float

    def per_hour(self, v: float) -> float:
        return v * 3600 / MIB

    @property
    def text(self) -> str:
        f = self.fit
        slope, lo, hi = self.per_hour(f.slope), self.per_hour(f.lo), self.per_hour(f.hi)
        pct = slope * MIB / self.mean_bytes * 100
        fig = (f"RSS slope {slope:+.2f} MiB/h ({pct:+.2f}% of {self.mean_bytes / MIB:.0f} MiB per hour; "
               f"95% CI {lo:+.2f} .. {hi:+.2f} MiB/h)")
        if self.growing:
            return f"memory GROWING: {fig}, above {self.threshold_mib_h:g} MiB/h even at the low end"
        return (f"memory flat: {fig}; growth faster than {max(hi, self.threshold_mib_h):.2f} MiB/h "
                f"ruled out")


def memory_verdict(t: np.ndarray, rss: np.ndarray, threshold_mib_h: float = GROWTH_MIB_PER_H
                   ) -> MemoryVerdict:
    """Growing when the low end of the slope's 95% interval is above ``threshold_mib_h``:
    the growth is both real (told apart from the noise) and large enough to matter.

    1 MiB/h is 24 MiB a day, 0.7 GiB a month: for a process meant to run for weeks at
    100-300 MiB, the smallest leak worth failing a soak for. A 10-minute run resolves a few
    MiB/h against RSS noise of about 1 MiB, so in practice a leak is caught when it adds a
    MiB or more over the steady part; the interval says what was ruled out."""
    fit = fit_slope(t, rss)
    return MemoryVerdict(fit.lo * 3600 / MIB > threshold_mib_h, fit, float(np.mean(rss)), threshold_mib_h)


def grows(start: list[float], end: list[float]) -> bool:
    """A count (file descriptors, threads) grew: everything in the last minute is above
    everything in the first. A connection opened and closed meanwhile is not growth."""
    return bool(start) and bool(end) and min(end) > max(start)


@dataclasses.dataclass
class Sample:
    t: float                 # seconds since the clients started
    rss: int                 # bytes, all the server's processes
    fds: int
    threads: int
    cpu_s: float
    metrics: dict[str, float]
    redis_used: int
    redis_events: int

    def m(self, name: str) -> float:
        return self.metrics.get(name, 0.0)

    @property
    def backlog(self) -> float:
        """Spans accepted by the receiver that have not been through the window stage."""
        return (self.m("backflow_receiver_accepted_spans_total") - self.m("backflow_processed_spans_total")
                - self.m("backflow_late_spans_total"))


def steady_start(samples: list[Sample], locations: int, warmup_s: float) -> float | None:
    """Time of the first sample at which all ``locations`` are held and ``warmup_s`` has passed."""
    for s in samples:
        if s.m("backflow_active_keys") >= locations and s.t >= warmup_s:
            return s.t
    return None


def quantile(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(samples: list[Sample], calls: list[tuple[float, float]], t0: float, t1: float,
              rate: float) -> dict[str, tuple]:
    """Figures of the samples (and client calls) in [t0, t1]: gauges as (mean, max), counters
    as a rate over the span of the samples."""
    ss = [s for s in samples if t0 <= s.t <= t1]
    lat = [x for t, x in calls if t0 <= t <= t1]
    out: dict[str, tuple] = {}
    if not ss:
        return out

    def gauge(name, f):
        v = [f(s) for s in ss]
        out[name] = (float(np.mean(v)), float(max(v)))

    gauge("rss", lambda s: s.rss / MIB)
    gauge("fds", lambda s: s.fds)
    gauge("threads", lambda s: s.threads)
    gauge("queue", lambda s: s.m("backflow_queue_batches"))
    gauge("backlog", lambda s: s.backlog)
    gauge("lag", lambda s: s.backlog / rate)
    gauge("pending", lambda s: s.m("backflow_redis_pending_writes"))
    gauge("open_windows", lambda s: s.m("backflow_open_windows"))
    gauge("keys", lambda s: s.m("backflow_active_keys"))
    gauge("late", lambda s: s.m("backflow_late_spans_total"))
    gauge("refused", lambda s: s.m("backflow_receiver_refused_spans_total"))
    gauge("redis_used", lambda s: s.redis_used / MIB)
    gauge("redis_events", lambda s: s.redis_events)
    out["fds_all"] = tuple(s.fds for s in ss)
    out["threads_all"] = tuple(s.threads for s in ss)
    dt = ss[-1].t - ss[0].t
    for name, f in (("cpu", lambda s: s.cpu_s),
                    ("accepted", lambda s: s.m("backflow_receiver_accepted_spans_total")),
                    ("processed", lambda s: s.m("backflow_processed_spans_total")),
                    ("windows", lambda s: s.m("backflow_windows_closed_total")),
                    ("checkpointed", lambda s: s.m("backflow_checkpoint_fields_total")),
                    ("events", lambda s: s.m("backflow_events_total"))):
        out[name] = ((f(ss[-1]) - f(ss[0])) / dt if dt > 0 else float("nan"),)
    out["latency"] = (quantile(lat, 0.5) * 1e3, quantile(lat, 0.99) * 1e3, max(lat, default=float("nan")) * 1e3,
                      len(lat))
    return out


# --- clients ------------------------------------------------------------------------------------

def client_main(proc: int, lanes: list[int], workloads: tuple[Workload, Workload], target: str,
                lane_rate: float, speed: float, variants: int, fresh: bool, seconds: float,
                report_s: float, ready_q, start_evt, stop_evt, out_q) -> None:
    """One client process: its lanes' templates, then one thread per lane sending them in
    turn, paced at ``lane_rate`` spans/s, for ``seconds`` or until ``stop_evt``. Every
    ``report_s`` it reports (time, latency) of the calls that returned, and its counts."""
    try:
        import grpc

        seed = workloads[0].seed
        lane_tpls, lane_durs = {}, {}
        for lane in lanes:
            tpls = [t for w in workloads for t in build_templates(w, lane)]
            rng = np.random.default_rng([seed, 17, lane])
            lane_tpls[lane] = tpls
            lane_durs[lane] = [[draw_durations(t, rng) for _ in range(variants)] for t in tpls]
        channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 16 << 20)])
        grpc.channel_ready_future(channel).result(timeout=20)
        call = channel.unary_unary(EXPORT_METHOD)
        ready_q.put((proc, None))
        if not start_evt.wait(timeout=300):
            return
        lock = threading.Lock()
        acc = {"calls": [], "acks": [], "spans": 0, "retries": 0, "rejected": 0, "errors": []}
        m0 = time.monotonic()
        end = m0 + seconds
        # Event time is the wall clock's, sped up by ``speed``: spans end "now".
        e0 = time.time_ns()
        # A service's clock advances gap_ns per span of it; a lane's share of the rate spread
        # over its services makes a request cover the event time until the lane's next one.
        gap_ns = int(speed * 1e9 * SERVICES_PER_LANE / lane_rate)

        def lane_run(lane: int) -> None:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

            tpls, durs = lane_tpls[lane], lane_durs[lane]
            rng = np.random.default_rng([seed, 19, lane])
            due, next_t, i = time.monotonic(), 0, 0
            try:
                while not stop_evt.is_set():
                    tpl = tpls[i % len(tpls)]
                    j = i % len(tpls)
                    i += 1
                    now = time.monotonic()
                    if now >= end:
                        break
                    if due > now and stop_evt.wait(due - now):
                        break
                    # Paced; after a stall, catch up by at most a second's worth.
                    due = max(due, time.monotonic() - 1.0) + tpl.n / lane_rate
                    t0 = max(next_t, e0 + int(speed * (time.monotonic() - m0) * 1e9))
                    data = render(tpl, t0, gap_ns, rng,
                                  None if fresh else durs[j][int(rng.integers(variants))])
                    next_t = t0 + (tpl.kmax + 1) * gap_ns
                    retries = 0
                    while True:
                        t_call = time.perf_counter()
                        try:
                            resp = call(data, timeout=60)
                            break
                        except grpc.RpcError as e:
                            if e.code() != grpc.StatusCode.UNAVAILABLE or stop_evt.is_set():
                                raise
                            retries += 1
                            time.sleep(retry_delay(e, 0.05))
                    latency = time.perf_counter() - t_call
                    rejected = (ExportTraceServiceResponse.FromString(resp).partial_success.rejected_spans
                                if resp else 0)
                    with lock:
                        acc["calls"].append((time.monotonic(), latency))
                        acc["acks"].append((time.monotonic(), tpl.n))
                        acc["spans"] += tpl.n
                        acc["retries"] += retries
                        acc["rejected"] += rejected
            except Exception as e:  # reported to the parent, which fails the run
                with lock:
                    acc["errors"].append(f"lane {lane}: {type(e).__name__}: {e}")

        def report() -> None:
            with lock:
                out = dict(acc, proc=proc)
                acc.update(calls=[], acks=[], spans=0, retries=0, rejected=0, errors=[])
            out_q.put(out)

        threads = [threading.Thread(target=lane_run, args=(lane,), daemon=True) for lane in lanes]
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            threads[0].join(report_s)
            for th in threads:
                th.join(0)
            report()
        channel.close()
        out_q.put({"proc": proc, "done": True})
    except Exception:
        ready_q.put((proc, traceback.format_exc()))
        out_q.put({"proc": proc, "done": True, "errors": [traceback.format_exc()]})


# --- the run ------------------------------------------------------------------------------------

def sample(stack: Stack, t: float, probe, last: Sample | None) -> Sample:
    """The server and Redis now; ``probe`` is a Redis client with a short timeout, so that a
    stalled Redis does not hold up the run (its figures are then the last sample's)."""
    rss = fds = threads = 0
    for p in proc_tree(stack.pid):
        try:
            rss += proc_status_kb(p, "VmRSS") * 1024
            threads += proc_status_kb(p, "Threads")
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, KeyError):  # a process that just exited
            pass
    cpu = proc_cpu_seconds(stack.pid)
    m = stack.metrics()
    m = {k: v for k, v in m.items() if not k.startswith("backflow_location_")}
    try:
        used, events = int(probe.info("memory")["used_memory"]), int(probe.xlen("backflow:events"))
    except redis.RedisError:
        used, events = (last.redis_used, last.redis_events) if last else (0, 0)
    return Sample(t, rss, fds, threads, cpu, m, used, events)


def run(args, tmp: str) -> dict:
    lanes = args.clients * args.inflight
    w_all = Workload(lanes=lanes, locations=args.locations, spans_min=1000, spans_max=1000, gap_ns=0,
                     seed=args.seed, coverage="roundrobin", templates=0)
    w_zipf = dataclasses.replace(w_all, spans_min=512, coverage="zipf", templates=args.templates)
    seconds = args.minutes * 60
    lane_rate = args.rate / lanes
    extra = ["--workers", str(args.workers), *args.server_args]
    if args.kill9:  # the guarantee across kill -9 is the spool's (docs/operations.md)
        extra += ["--spool-dir", os.path.join(tmp, "spool")]
    with Stack(tmp, "soak", extra, window=args.window) as stack:
        ctx = mp.get_context("spawn")
        ready_q, out_q, start_evt, stop_evt = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
        procs = []
        try:
            for p in range(args.clients):
                proc = ctx.Process(target=client_main, daemon=True, name=f"soak-client-{p}", args=(
                    p, list(range(p * args.inflight, (p + 1) * args.inflight)), (w_all, w_zipf), stack.target,
                    lane_rate, args.speed, args.variants, args.fresh_durations, seconds, min(args.interval, 5.0),
                    ready_q, start_evt, stop_evt, out_q))
                proc.start()
                procs.append(proc)
            for _ in procs:
                _, err = ready_q.get(timeout=300)
                if err:
                    raise RuntimeError(f"client failed while preparing:\n{err}")
            print(f"  server pid {stack.pid}; {args.clients} client processes x "
                  f"{args.inflight} lanes ready; sending {args.rate:,.0f} spans/s for {args.minutes:g} min",
                  flush=True)
            samples: list[Sample] = []
            calls: list[tuple[float, float]] = []
            acks: list[tuple[float, int]] = []  # (time, spans) of each acknowledged call
            kill: dict = {}
            totals = {"spans": 0, "retries": 0, "rejected": 0}
            errors: list[str] = []
            done = 0
            start_evt.set()
            # (no retries: redis-py's default retries would hold a sample for seconds)
            probe = redis.Redis(port=stack.redis_port, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
            m0 = time.monotonic()
            next_sample, next_print = m0, m0 + args.progress
            # Redis stalls (SIGSTOP for --stall-seconds), evenly spread over the run
            stalls = [m0 + seconds * (k + 1) / (args.redis_stalls + 1) for k in range(args.redis_stalls)]
            # kill -9 in the middle: 1 s into the middle stall when there is one
            kill_at = m0 + seconds / 2 + 1.0 if args.kill9 else None

            def drain() -> None:
                nonlocal done
                while True:
                    try:
                        r = out_q.get_nowait()
                    except queue.Empty:
                        return
                    done += bool(r.get("done"))
                    errors.extend(r.get("errors", []))
                    calls.extend((t - m0, x) for t, x in r.get("calls", []))
                    acks.extend((t - m0, n) for t, n in r.get("acks", []))
                    for k in totals:
                        totals[k] += r.get(k, 0)

            while time.monotonic() < m0 + seconds:
                time.sleep(max(0.0, min(next_sample, kill_at or next_sample) - time.monotonic()))
                if kill_at is not None and time.monotonic() >= kill_at:
                    kill_at = None
                    m = stack.metrics()  # what was acknowledged but not yet through the window stage
                    kill["backlog"] = (sum(v for k, v in m.items() if k.startswith("backflow_receiver_accepted_spans_total"))
                                       - m.get("backflow_processed_spans_total", 0) - m.get("backflow_late_spans_total", 0))
                    kill["t"] = time.monotonic() - m0
                    stack.restart_after_kill9()
                    kill["restarted"] = time.monotonic() - m0
                    print(f"  [{kill['t']:5.0f} s] serve killed (kill -9), healthy again after "
                          f"{kill['restarted'] - kill['t']:.1f} s", flush=True)
                    continue
                next_sample += args.interval
                if stack.server.poll() is not None:
                    raise RuntimeError("backflow serve died:\n" + stack.log())
                drain()
                if stalls and time.monotonic() >= stalls[0]:
                    stalls.pop(0)
                    os.kill(stack.redis.pid, signal.SIGSTOP)
                    threading.Timer(args.stall_seconds, os.kill, (stack.redis.pid, signal.SIGCONT)).start()
                    print(f"  [{time.monotonic() - m0:5.0f} s] Redis stopped (SIGSTOP) for "
                          f"{args.stall_seconds:g} s", flush=True)
                s = sample(stack, time.monotonic() - m0, probe, samples[-1] if samples else None)
                samples.append(s)
                if errors:
                    break
                if time.monotonic() >= next_print:
                    next_print += args.progress
                    recent = [x for t, x in calls if t >= s.t - args.progress]
                    print(f"  [{s.t:5.0f} s] RSS {s.rss / MIB:6.1f} MiB  fds {s.fds}  threads {s.threads}  "
                          f"queue {s.m('backflow_queue_batches'):.0f}  backlog {s.backlog:,.0f} spans  "
                          f"p99 {quantile(recent, 0.99) * 1e3:.1f} ms  keys {s.m('backflow_active_keys'):,.0f}  "
                          f"windows {s.m('backflow_windows_closed_total'):,.0f}  "
                          f"late {s.m('backflow_late_spans_total'):,.0f}  "
                          f"refused {s.m('backflow_receiver_refused_spans_total'):,.0f}", flush=True)
            stop_evt.set()
            deadline = time.monotonic() + 90
            while done < len(procs) and time.monotonic() < deadline:
                time.sleep(0.2)
                drain()
                if all(not pr.is_alive() for pr in procs):
                    drain()
                    break
            if done < len(procs):
                errors.append(f"{len(procs) - done} client processes did not finish")
            accounting = account(stack)
            log = stack.log()
            event_types = collections.Counter(f[b"type"].decode() for _, f in stack.rclient.xrange("backflow:events"))
        finally:
            stop_evt.set()
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
    return {"samples": samples, "calls": calls, "totals": totals, "errors": errors, "log": log,
            "event_types": event_types, "accounting": accounting, "acks": acks, "kill": kill,
            "cmd": stack.cmd, "workload": (w_all, w_zipf)}


def account(stack: Stack) -> dict:
    """Once the clients stopped: every span processed (the queue empty), then SIGTERM (the
    open windows close and are written), then what Redis holds: the calls in the version
    summaries and the ids of the events stream."""
    deadline = time.monotonic() + 120
    m = stack.metrics()
    while time.monotonic() < deadline and (m.get("backflow_queue_batches", 0) or m.get("backflow_redis_pending_writes", 0)):
        time.sleep(0.5)
        m = stack.metrics()
    processed, late = m.get("backflow_processed_spans_total", 0), m.get("backflow_late_spans_total", 0)
    stack.server.send_signal(signal.SIGTERM)
    exit_status = stack.server.wait(timeout=90)
    r = stack.rclient
    calls = 0
    for key in r.scan_iter(b"backflow:versions:*", count=1000):
        calls += sum(json.loads(v)["calls"] for v in r.hvals(key))
    ids = [f[b"id"] for _, f in r.xrange("backflow:events")]
    return {"processed": processed, "late": late, "summary_calls": calls, "events": len(ids),
            "ids_twice": len(ids) - len(set(ids)), "exit_status": exit_status}


# --- report -------------------------------------------------------------------------------------

def report(args, r: dict, t_start: float, load0: tuple, command: str) -> int:
    samples: list[Sample] = r["samples"]
    calls = r["calls"]
    warmup_s = WARMUP_WINDOWS * args.window / args.speed
    # A run too short for the warm-up still gets a steady part: its second half.
    t_steady = steady_start(samples, args.locations, min(warmup_s, args.minutes * 30))
    if r["kill"] and t_steady is not None:
        # The process after the kill: its counters start at 0 and its memory anew.
        t_steady = max(t_steady, r["kill"]["restarted"] + 30.0)
    t_known = next((s.t for s in samples if s.m("backflow_active_keys") >= args.locations), None)
    last = samples[-1]
    status = 0
    print()
    print(f"Backflow soak: {args.minutes:g} min at {args.rate:,.0f} spans/s, {args.locations:,} code locations, "
          f"window {args.window:g} s (event time x{args.speed:g}), sampled every {args.interval:g} s")
    if r["errors"]:
        print("client errors:\n  " + "\n  ".join(r["errors"][:5]))
        status = 1
    if t_steady is None or sum(s.t >= t_steady for s in samples) < 4:
        print(f"no steady part: all {args.locations:,} locations held at "
              f"{'never' if t_known is None else f'{t_known:.0f} s'}, run ended at {last.t:.0f} s "
              f"with {len(samples)} samples")
        print("server log (tail):\n" + r["log"])
        return 1
    span = min(60.0, (last.t - t_steady) / 2)
    a = summarize(samples, calls, t_steady, t_steady + span, args.rate)
    b = summarize(samples, calls, last.t - span, last.t, args.rate)
    rows = [
        ("RSS, all server processes (MiB)", "rss", "{:.1f}", True),
        ("open file descriptors", "fds", "{:.0f}", True),
        ("threads", "threads", "{:.0f}", True),
        ("server CPU (cores)", "cpu", "{:.2f}", False),
        ("spans accepted / s", "accepted", "{:,.0f}", False),
        ("spans processed / s", "processed", "{:,.0f}", False),
        ("queue (backflow_queue_batches)", "queue", "{:.1f}", True),
        ("backlog: accepted - processed (spans)", "backlog", "{:,.0f}", True),
        ("processing lag: backlog / rate (s)", "lag", "{:.3f}", True),
        ("Redis pending writes", "pending", "{:,.0f}", True),
        ("open windows", "open_windows", "{:,.0f}", True),
        ("late spans, since the start", "late", "{:,.0f}", True),
        ("refused spans, since the start", "refused", "{:,.0f}", True),
        ("windows closed / s", "windows", "{:,.1f}", False),
        ("checkpoint fields / s", "checkpointed", "{:,.0f}", False),
        ("events / s", "events", "{:,.2f}", False),
        ("Redis used_memory (MiB)", "redis_used", "{:.1f}", True),
        ("events stream length", "redis_events", "{:,.0f}", True),
    ]
    width = 40
    col = 24
    print("-" * (width + 2 * col + 4))
    print(f"{'':<{width}}  {f'start {t_steady:.0f}-{t_steady + span:.0f} s':>{col}}  "
          f"{f'end {last.t - span:.0f}-{last.t:.0f} s':>{col}}")
    print(f"{'':<{width}}  {'mean (max)':>{col}}  {'mean (max)':>{col}}")

    def cell(v: tuple, fmt: str, gauge: bool) -> str:
        return fmt.format(v[0]) + (f" ({fmt.format(v[1])})" if gauge else "")

    for label, key, fmt, gauge in rows:
        print(f"{label:<{width}}  {cell(a[key], fmt, gauge):>{col}}  {cell(b[key], fmt, gauge):>{col}}")
    la, lb = a["latency"], b["latency"]
    print(f"{'Export latency p50 / p99 / max (ms)':<{width}}  "
          f"{f'{la[0]:.1f} / {la[1]:.1f} / {la[2]:.0f}':>{col}}  {f'{lb[0]:.1f} / {lb[1]:.1f} / {lb[2]:.0f}':>{col}}")
    print("-" * (width + 2 * col + 4))
    tot = r["totals"]
    m = last.metrics
    late = m.get("backflow_late_spans_total", 0)
    refused = m.get("backflow_receiver_refused_spans_total", 0)
    refused_req = m.get("backflow_receiver_refused_requests_total", 0)
    dropped = m.get("backflow_redis_dropped_writes_total", 0)
    print(f"all {args.locations:,} locations held at {t_known:.0f} s; detectors past warm-up "
          f"({WARMUP_WINDOWS} windows) at {warmup_s:.0f} s"
          + ("" if warmup_s <= t_steady else " (after the end of this short run: warm-up not over)")
          + f"; steady part {t_steady:.0f}-{last.t:.0f} s, {sum(s.t >= t_steady for s in samples)} samples")
    print(f"sent {tot['spans']:,} spans in {len(calls):,} Export calls ({tot['spans'] / last.t:,.0f} spans/s); "
          f"{m.get('backflow_windows_closed_total', 0):,.0f} windows closed, "
          f"{m.get('backflow_checkpoint_fields_total', 0):,.0f} checkpoint fields, "
          f"{m.get('backflow_events_total', 0):,.0f} events ("
          + ", ".join(f"{n:,} {t}" for t, n in r["event_types"].most_common()) + ")")
    cmd, shown = r["cmd"][4:], []
    for flag, value in zip(cmd[::2], cmd[1::2]):
        if flag not in ("--otlp-grpc", "--otlp-http", "--metrics", "--redis-url"):
            shown += [flag, value]
    print("server: backflow serve " + " ".join(shown) + " (else its defaults)")
    print(f"late {late:,.0f}, refused {refused:,.0f} spans / {refused_req:,.0f} requests, rejected (partial "
          f"success) {tot['rejected']:,}, UNAVAILABLE retries {tot['retries']:,}, Redis writes dropped "
          f"{dropped:,.0f}")
    steady = [s for s in samples if s.t >= t_steady]
    verdict = memory_verdict(np.array([s.t for s in steady]), np.array([s.rss for s in steady]),
                             args.threshold)
    known = [s for s in samples if t_known is not None and s.t >= t_known]
    if len(known) >= 3 and len(known) > len(steady):
        incl = fit_slope(np.array([s.t for s in known]), np.array([s.rss for s in known]))
        print(f"(RSS slope from {t_known:.0f} s, warm-up included: {incl.slope * 3600 / MIB:+.2f} MiB/h)")
    print(verdict.text)
    fds_grow = grows(list(a["fds_all"]), list(b["fds_all"]))
    print(f"file descriptors: {'GROWING' if fds_grow else 'flat'} ({min(a['fds_all'])}-{max(a['fds_all'])} "
          f"at the start, {min(b['fds_all'])}-{max(b['fds_all'])} at the end)")
    if b["lag"][0] > max(1.0, 4 * a["lag"][0]):
        print("note: processing lag rose: the server is not keeping up with --rate")
    print(f"total time {time.monotonic() - t_start:.0f} s; {os.cpu_count()} CPUs; load average "
          f"{load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; python {sys.version.split()[0]}")
    print(f"command: {command}   (in {os.getcwd()}, backflow at {_revision()})")
    if r["kill"] and verdict.growing:
        # (a few minutes of a process restarted from its checkpoint: its heap still settles)
        print("note: with --kill9 the memory verdict covers only the restarted process's first "
              "minutes and is not held against the run; run without --kill9 for it")
    elif verdict.growing or fds_grow:
        status = 1
    if fds_grow:
        status = 1
    acc = r["accounting"]
    acked = tot["spans"] - tot["rejected"]
    faults = ", ".join(x for x in (f"{args.redis_stalls} Redis stalls of {args.stall_seconds:g} s" if args.redis_stalls
                                   else "", f"kill -9 at {r['kill']['t']:.0f} s" if r["kill"] else "") if x)
    if r["kill"]:
        ok, lost, could, span = kill_accounting(r, acc, acked, args.window / args.speed, args.rate)
        print(f"accounting: {'PASS' if ok else 'FAIL'}: acknowledged {acked:,} spans, in the version summaries "
              f"{acc['summary_calls']:,}: {lost:,} lost, where at most {could:,} may be (those acknowledged in "
              f"the {span:.1f} s before the kill: {r['kill']['backlog']:,.0f} spans queued, then windows still "
              f"open); late after the "
              f"restart {acc['late']:,.0f}; {acc['events']:,} events, {acc['ids_twice']} ids twice; serve exited "
              f"{acc['exit_status']} after SIGTERM; {faults}")
    else:
        ok = (acked == acc["processed"] + acc["late"] and acc["processed"] == acc["summary_calls"]
              and acc["ids_twice"] == 0)
        print(f"accounting: {'PASS' if ok else 'FAIL'}: acknowledged {acked:,} spans, "
              f"processed {acc['processed']:,.0f} (late {acc['late']:,.0f}), in the version summaries "
              f"{acc['summary_calls']:,}; {acc['events']:,} events, {acc['ids_twice']} ids twice; serve exited "
              f"{acc['exit_status']} after SIGTERM" + (f"; {faults}" if faults else ""))
    if not ok:
        status = 1
    retries = 0 if r["kill"] else tot["retries"]  # (the senders retry while the killed server restarts)
    if late or refused or refused_req or tot["rejected"] or retries or dropped:
        print("FAIL: spans were late, refused or rejected, or Redis writes dropped, at a steady load "
              "the server should take")
        status = 1
    return status


def kill_accounting(r: dict, acc: dict, acked: int, window_s: float, rate: float) -> tuple[bool, int, int, float]:
    """With a kill -9: (pass, spans lost, spans that may be lost, seconds they span). The
    guarantee (with a spool) loses only the spans not yet in a closed window: those still
    queued (the backlog at the kill, ``backlog / rate`` seconds of them) and those of the
    windows still open behind them, so the spans acknowledged within a window, the backlog's
    seconds and one more before the kill. Nothing may be counted twice (lost < 0) and no
    event id may appear twice.

    >>> kill_accounting({"kill": {"t": 100.0, "backlog": 0}, "acks": [(50.0, 10), (96.0, 5), (99.0, 5)]},
    ...                 {"summary_calls": 12, "ids_twice": 0, "late": 0}, 20, 4.0, 10.0)
    (True, 8, 10, 5.0)
    """
    t = r["kill"]["t"]
    span = window_s + max(r["kill"]["backlog"], 0) / rate + 1.0
    could = sum(n for when, n in r["acks"] if t - span <= when <= t)
    lost = acked - acc["summary_calls"]
    return 0 <= lost <= could and acc["ids_twice"] == 0 and acc["late"] == 0, lost, could, span


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10)")
    p.add_argument("--rate", type=float, default=40_000, help="spans/s over all clients (default 40,000)")
    p.add_argument("--locations", type=int, default=2000, help="code locations (default 2,000)")
    p.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--inflight", type=int, default=4, help="lanes (one call at a time each) per client "
                   "process; each owns 4 services (default 4)")
    p.add_argument("--window", type=float, default=4.0, help="--window of the server, event-time seconds "
                   "(default 4)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="event-time seconds per wall-clock second (default 1: spans end now)")
    p.add_argument("--templates", type=int, default=6, help="Zipf-skewed templates per lane (default 6)")
    p.add_argument("--variants", type=int, default=16,
                   help="duration vectors drawn per template, one used per send (default 16)")
    p.add_argument("--fresh-durations", action="store_true",
                   help="draw new durations on every send (sketches then keep growing slowly)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--progress", type=float, default=30.0, help="seconds between progress lines (default 30)")
    p.add_argument("--threshold", type=float, default=GROWTH_MIB_PER_H,
                   help="MiB/h the low end of the RSS slope's 95%% interval must exceed to count as "
                        "growing (default 1)")
    p.add_argument("--workers", type=int, default=1, help="--workers of the server (default 1)")
    p.add_argument("--server-arg", dest="server_args", action="append", default=[], metavar="ARG",
                   help="extra argument for backflow serve, repeatable (e.g. --server-arg=--exemplars=5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--redis-stalls", type=int, default=0,
                   help="times Redis is stopped (SIGSTOP) during the run, evenly spread (default 0)")
    p.add_argument("--stall-seconds", type=float, default=6.0, help="length of each Redis stall (default 6)")
    p.add_argument("--kill9", action="store_true",
                   help="kill -9 the server in the middle of the run (1 s into the middle Redis stall, if "
                        "any) and start it again; the server gets a --spool-dir")
    args = p.parse_args(argv)
    if not shutil.which("redis-server"):
        print("redis-server not found on PATH", file=sys.stderr)
        return 2
    command = "python -m benchmarks.soak" + "".join(" " + a for a in argv)
    t_start, load0 = time.monotonic(), os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="backflow-soak-")
    try:
        r = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not r["samples"]:
        print("no samples taken", file=sys.stderr)
        return 1
    return report(args, r, t_start, load0, command)


if __name__ == "__main__":
    run_main(main)
