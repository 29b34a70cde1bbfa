"""Real-trace benchmark: labelled microservice faults replayed through a real ``backflow serve``.

    python -m benchmarks.real_traces --data /work/data/trastrainer
    python -m benchmarks.real_traces --data DIR --runs 3 --json out.json

The data are the OnlineBoutique ("hipster") traces published with TraStrainer (the public
repository IntelligentDDS/TraStrainer, ``data/dataset/hipster/batches/batch1`` and
``batch2``; docs/benchmarks.md says how to get them). ``--data`` is a folder holding one or
more batch folders, each with ``trace/*.csv`` (one file per minute: TraceID, SpanID,
ParentID, PodName, OperationName, StartTimeUnixNano, EndTimeUnixNano, Duration in us) and a
``label.json`` (each injected fault's time, pod and type). The service is the pod name
without its two generated suffixes, the span name the operation; the spans carry no code
attributes, so Backflow keys them as ``span:<operation>`` locations.

Replay. Each batch goes, as OTLP ``ExportTraceServiceRequest``s (resource ``service.name``,
span name, trace, span and parent ids, start and end, status OK: the CSV has no status), to
a fresh ``backflow serve`` with its own redis-server, over gRPC, one request at a time, in
order of span end (event time, which is what serve's windows go by), as fast as serve takes
them. Serve runs as a new user would, one setting for every batch and fault: ``--window 10``
and a YAML file with ``detectors: {warmup_windows: 6}`` (the setting of issue 14; each fault
has only a few minutes of traffic before it), everything else at its default (allowed
lateness 10 s of event time: no span is late, since every service's spans arrive in end
order; idle timeout 60 s of processing time: never reached while a replay runs). The events
are read back from ``{prefix}:events``.

Scoring (``score``; the rules are printed with the figures):

- A fault lasts ``--fault-seconds`` (180: "about three minutes") from its label time t0
  (``inject_timestamp``, or ``inject_time`` when that is earlier: ``load_labels``). Its
  *related services* are the faulty service and its direct callers (services of the parent
  spans of its spans, from ParentID in the same batch).
- *Shown by the spans*: some location (service, operation) of a related service has p50 or
  p90 of span duration at least 1.5x higher in [t0, t0 + 180 s) than in [t0 - 180 s, t0),
  with at least 20 spans in each. A fault with fewer than 20 spans in either range at every
  related location has *no data* (the published minute files of 4 MiB and more can be
  missing: see docs/benchmarks.md).
- *Found*: a regression event (``latency_regression``, ``error_regression``,
  ``scaling_regression``) on a related service whose window overlaps [t0, t0 + 180 s).
  Delay: that event's window end - t0, for the earliest such window. Recall is counted on
  the faults the spans show; faults found but not shown are counted apart. Any related
  location counts, so a noisy caller's coincidental event is a find too; the stricter
  figure "at a location that shows it" counts only events at a location that meets the
  shown rule itself.
- *False events*: regression events that belong to no fault, that is, not on a related
  service of a fault whose [t0, t0 + 180 s + margin) their window overlaps (margin
  ``--margin-seconds``, 120: recovery). Per 1,000 location-hours, a location-hour being an
  hour of 10-s windows in which the location had spans.
- ``new_exception`` and ``dormant`` are reported apart, not scored.
- The naive rule, computed here on the same spans and 10-s windows (aligned as serve's, by
  span end): per location, a window with at least 20 spans whose p50 is above 1.5x the
  median of the p50s of the previous 10 windows of that location that had at least 20 spans
  (at least 6 of them: the same warm-up as Backflow's). Consecutive firing windows of a
  location are one event (an alert that stays on), at its first window.

Serve's events should not depend on replay timing (event time only); ``--runs`` (2 by
default) replays everything that many times, compares the events and prints median, min and
max of what differs (the replay's own speed, and the figures if the events ever differ).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np

from benchmarks.serve_metrics import healthy, metric, metric_by

S = 1_000_000_000
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
REGRESSIONS = ("latency_regression", "error_regression", "scaling_regression")
APART = ("new_exception", "dormant")
FAULT_TYPES = ("cpu_contention", "cpu_consumed", "network_delay", "exception", "return")

# Defaults: the issue's settings and the scoring rules above.
WINDOW_S = 10.0
WARMUP_WINDOWS = 6
FAULT_S = 180.0
MARGIN_S = 120.0
SHOWN_RATIO = 1.5
MIN_SPANS = 20
NAIVE_RATIO = 1.5
NAIVE_HISTORY = 10
NAIVE_MIN_HISTORY = WARMUP_WINDOWS
GROSS_RATIO = 3.0
SPANS_PER_REQUEST = 4000


# --- data --------------------------------------------------------------------------------------

def service_of(pod: str) -> str:
    """``frontend-579b9bff58-t2dbm`` -> ``frontend``: the pod name less its two suffixes."""
    parts = pod.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else pod


@dataclass
class Fault:
    batch: str
    index: int                # order in the batch's label.json (by time)
    t0_ns: int                # the earlier of inject_timestamp and inject_time (UTC)
    pod: str
    service: str
    type: str
    label_time: str           # inject_time as written
    label_disagree_s: float   # inject_timestamp - inject_time read as UTC (0 for most)

    @property
    def name(self) -> str:
        return f"{self.batch}#{self.index + 1}"


def load_labels(path: str, batch: str) -> list[Fault]:
    """label.json: ``{"HH": [{"inject_time", "inject_timestamp", "inject_pod", "inject_type"}]}``.

    The time is ``inject_timestamp`` (Unix seconds), or ``inject_time`` read as UTC when
    that is earlier: in the published batch1 two of them disagree (by 44 s and -60 s), and in
    both the spans move from the earlier of the two (a fault shows nothing before it starts).
    """
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    rows = [r for hour in doc.values() for r in hour]
    faults = []
    for r in rows:
        t0 = int(float(r["inject_timestamp"]))
        try:
            text_t = datetime.strptime(r["inject_time"], "%Y-%m-%d %H:%M:%S").replace(
                tzinfo=UTC).timestamp()
            disagree = t0 - text_t
        except (KeyError, ValueError):
            disagree = math.nan
        if disagree > 0:
            t0 -= int(disagree)
        faults.append(Fault(batch, 0, t0 * S, r["inject_pod"], service_of(r["inject_pod"]),
                            r["inject_type"], r.get("inject_time", ""), disagree))
    faults.sort(key=lambda f: f.t0_ns)
    for i, f in enumerate(faults):
        f.index = i
    return faults


@dataclass
class Traces:
    """One batch's spans, sorted by end time, as columns."""
    name: str
    files: list[str]
    services: list[str]
    locations: list[tuple[str, str]]     # (service, operation) per location id
    loc: np.ndarray                      # location id per span
    svc: np.ndarray                      # service id per span
    start: np.ndarray                    # ns
    end: np.ndarray                      # ns
    tid: np.ndarray                      # (n, 2) uint64: trace id, high and low halves
    sid: np.ndarray                      # uint64
    pid: np.ndarray                      # uint64, 0 for a root
    parent_svc: np.ndarray               # service id of the parent span, -1 if root or absent
    duplicates: int = 0                  # rows dropped: same (trace, span) id seen before
    bad_rows: int = 0                    # rows that could not be read

    def __len__(self) -> int:
        return len(self.end)

    @property
    def duration(self) -> np.ndarray:
        return self.end - self.start


def load_traces(batch_dir: str, name: str | None = None) -> Traces:
    files = sorted(glob.glob(os.path.join(batch_dir, "trace", "*.csv")))
    if not files:
        raise FileNotFoundError(f"no trace/*.csv under {batch_dir}")
    svc_ids: dict[str, int] = {}
    loc_ids: dict[tuple[int, str], int] = {}
    loc_l, start_l, end_l, tid_l, sid_l, pid_l = [], [], [], [], [], []
    bad = 0
    for path in files:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                continue
            col = {h.strip(): i for i, h in enumerate(header)}
            i_t, i_s, i_p = col["TraceID"], col["SpanID"], col["ParentID"]
            i_pod, i_op = col["PodName"], col["OperationName"]
            i_st, i_en = col["StartTimeUnixNano"], col["EndTimeUnixNano"]
            for row in reader:
                try:
                    svc = svc_ids.setdefault(service_of(row[i_pod]), len(svc_ids))
                    key = (svc, row[i_op])
                    lid = loc_ids.get(key)
                    if lid is None:
                        lid = loc_ids[key] = len(loc_ids)
                    st, en = int(row[i_st]), int(row[i_en])
                    t = int(row[i_t], 16)
                    s = int(row[i_s], 16)
                    p = row[i_p]
                    p = 0 if p in ("", "root", "0") else int(p, 16)
                except (ValueError, IndexError, KeyError):
                    bad += 1
                    continue
                loc_l.append(lid)
                start_l.append(st)
                end_l.append(en)
                tid_l.append(t)
                sid_l.append(s)
                pid_l.append(p)
    n = len(end_l)
    loc = np.array(loc_l, np.int32)
    start = np.array(start_l, np.int64)
    end = np.array(end_l, np.int64)
    mask64 = (1 << 64) - 1
    tid = np.empty((n, 2), np.uint64)
    tid[:, 0] = np.fromiter(((t >> 64) & mask64 for t in tid_l), np.uint64, n)
    tid[:, 1] = np.fromiter((t & mask64 for t in tid_l), np.uint64, n)
    sid = np.fromiter((s & mask64 for s in sid_l), np.uint64, n)
    pid = np.fromiter((p & mask64 for p in pid_l), np.uint64, n)
    del loc_l, start_l, end_l, tid_l, sid_l, pid_l
    services = [s for s, _ in sorted(svc_ids.items(), key=lambda kv: kv[1])]
    locations = [(services[s], op) for (s, op), _ in sorted(loc_ids.items(), key=lambda kv: kv[1])]
    loc_svc = np.array([svc_ids[s] for s, _ in locations], np.int16)

    # One row per (trace, span): a span written twice (in two minute files) is dropped once.
    order = np.lexsort((sid, tid[:, 1], tid[:, 0]))
    same = np.zeros(n, bool)
    if n > 1:
        o = order
        same[o[1:]] = ((sid[o[1:]] == sid[o[:-1]]) & (tid[o[1:], 0] == tid[o[:-1], 0])
                       & (tid[o[1:], 1] == tid[o[:-1], 1]))
    keep = ~same
    duplicates = int(same.sum())
    # Event-time order: by end, ties by start then span id (a total order: replays are alike).
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((sid[idx], start[idx], end[idx]))]
    loc, start, end, tid, sid, pid = loc[idx], start[idx], end[idx], tid[idx], sid[idx], pid[idx]
    svc = loc_svc[loc]

    # Parent's service: span ids looked up within the same trace (ids sorted once).
    parent_svc = np.full(len(idx), -1, np.int16)
    k = np.lexsort((sid, tid[:, 1], tid[:, 0]))
    keys_t0, keys_t1, keys_s = tid[k, 0], tid[k, 1], sid[k]
    has_p = np.flatnonzero(pid != 0)
    # Search on a combined structured key: (trace high, trace low, span).
    rec = np.rec.fromarrays([keys_t0, keys_t1, keys_s], names="a,b,c")
    q = np.rec.fromarrays([tid[has_p, 0], tid[has_p, 1], pid[has_p]], names="a,b,c")
    pos = np.searchsorted(rec, q)
    pos_c = np.minimum(pos, len(rec) - 1)
    found = ((pos < len(rec)) & (rec.a[pos_c] == q.a) & (rec.b[pos_c] == q.b)
             & (rec.c[pos_c] == q.c))
    parent_svc[has_p[found]] = svc[k[pos_c[found]]]
    return Traces(name or os.path.basename(os.path.normpath(batch_dir)),
                  [os.path.basename(f) for f in files], services, locations, loc, svc,
                  start, end, tid, sid, pid, parent_svc, duplicates, bad)


def find_batches(data: str) -> list[str]:
    """Batch folders under ``data`` (or ``data`` itself): those with trace/ and label.json."""
    def is_batch(d):
        return os.path.isdir(os.path.join(d, "trace")) and os.path.isfile(os.path.join(d, "label.json"))
    if is_batch(data):
        return [data]
    out = sorted(d for d in glob.glob(os.path.join(data, "*")) if is_batch(d))
    if not out:
        raise FileNotFoundError(f"{data}: no batch folder (trace/*.csv and label.json) found; "
                                "docs/benchmarks.md says how to get the data")
    return out


def callers_of(tr: Traces) -> dict[str, set[str]]:
    """Direct callers of each service: services of parent spans of its spans."""
    m = (tr.parent_svc >= 0) & (tr.parent_svc != tr.svc)
    pairs = np.unique(np.stack([tr.svc[m].astype(np.int32), tr.parent_svc[m].astype(np.int32)]),
                      axis=1) if m.any() else np.empty((2, 0), np.int32)
    out: dict[str, set[str]] = {s: set() for s in tr.services}
    for child, parent in pairs.T.tolist():
        out[tr.services[child]].add(tr.services[parent])
    return out


def minute_gaps(files: list[str]) -> list[str]:
    """``HH_MM_trace.csv`` names missing between the first and the last file."""
    minutes = []
    for f in files:
        try:
            h, m = f.split("_")[:2]
            minutes.append(int(h) * 60 + int(m))
        except ValueError:
            return []
    have = set(minutes)
    return [f"{t // 60:02d}_{t % 60:02d}" for t in range(min(minutes), max(minutes) + 1)
            if t not in have] if minutes else []


# --- per-window statistics and the naive rule -------------------------------------------------

@dataclass
class WindowTable:
    """Per (location, window) of ``window_ns`` by span end: count, p50, p90 (ns)."""
    loc: np.ndarray
    win: np.ndarray        # window index: end // window_ns
    count: np.ndarray
    p50: np.ndarray
    p90: np.ndarray


def _quantile_sorted(x: np.ndarray, lo: np.ndarray, n: np.ndarray, q: float) -> np.ndarray:
    """numpy's default (linear) quantile of each group x[lo:lo+n], x sorted within groups."""
    h = (n - 1) * q
    f = np.floor(h).astype(np.int64)
    c = np.minimum(f + 1, n - 1)
    a, b = x[lo + f].astype(float), x[lo + c].astype(float)
    return a + (h - f) * (b - a)


def window_table(tr: Traces, window_ns: int) -> WindowTable:
    win = tr.end // window_ns
    dur = tr.duration
    order = np.lexsort((dur, win, tr.loc))
    l, w, d = tr.loc[order], win[order], dur[order]
    change = np.flatnonzero((np.diff(l) != 0) | (np.diff(w) != 0)) + 1
    lo = np.concatenate(([0], change))
    n = np.diff(np.concatenate((lo, [len(d)])))
    return WindowTable(l[lo], w[lo], n, _quantile_sorted(d, lo, n, 0.5),
                       _quantile_sorted(d, lo, n, 0.9))


def naive_events(tr: Traces, wt: WindowTable, window_ns: int, ratio: float = NAIVE_RATIO,
                 history: int = NAIVE_HISTORY, min_history: int = NAIVE_MIN_HISTORY,
                 min_spans: int = MIN_SPANS) -> tuple[list[dict], int]:
    """The naive rule's events (one per run of firing windows) and its firing windows."""
    events: list[dict] = []
    firing_windows = 0
    bounds = np.flatnonzero(np.diff(wt.loc) != 0) + 1
    for lo, hi in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [len(wt.loc)]))):
        service, op = tr.locations[int(wt.loc[lo])]
        past: deque = deque(maxlen=history)
        open_ev = None
        for i in range(lo, hi):
            if wt.count[i] < min_spans:
                continue
            p50 = float(wt.p50[i])
            fire = len(past) >= min_history and p50 > ratio * float(np.median(past))
            if fire:
                firing_windows += 1
                if open_ev is None:
                    ws = int(wt.win[i]) * window_ns
                    open_ev = {"type": "naive", "service": service, "function": "span:" + op,
                               "window_start_ns": ws, "window_end_ns": ws + window_ns,
                               "ratio": p50 / float(np.median(past)), "spans": int(wt.count[i]),
                               "windows": 0}
                    events.append(open_ev)
                open_ev["windows"] += 1
            else:
                open_ev = None
            past.append(p50)
    return events, firing_windows


def location_hours(wt: WindowTable, window_ns: int) -> float:
    return len(wt.loc) * window_ns / S / 3600


# --- what the spans show -----------------------------------------------------------------------

def shown(tr: Traces, fault: Fault, related: set[str], fault_ns: int,
          ratio: float = SHOWN_RATIO, min_spans: int = MIN_SPANS) -> dict:
    """p50 and p90 before and during the fault at each location of the related services."""
    t0 = fault.t0_ns
    a, b, c = np.searchsorted(tr.end, [t0 - fault_ns, t0, t0 + fault_ns])
    related_ids = {i for i, s in enumerate(tr.services) if s in related}
    lb, db = tr.loc[a:b], tr.duration[a:b]
    ld, dd = tr.loc[b:c], tr.duration[b:c]
    per_loc = []
    for lid in sorted(set(np.unique(lb).tolist()) | set(np.unique(ld).tolist())):
        service, op = tr.locations[lid]
        if tr.services.index(service) not in related_ids:
            continue
        before, during = db[lb == lid], dd[ld == lid]
        entry = {"service": service, "function": "span:" + op,
                 "n_before": len(before), "n_during": len(during)}
        if len(before) >= min_spans and len(during) >= min_spans:
            q_b = np.quantile(before, [0.5, 0.9])
            q_d = np.quantile(during, [0.5, 0.9])
            entry.update(p50_before_ms=q_b[0] / 1e6, p50_during_ms=q_d[0] / 1e6,
                         p90_before_ms=q_b[1] / 1e6, p90_during_ms=q_d[1] / 1e6,
                         p50_ratio=float(q_d[0] / q_b[0]) if q_b[0] > 0 else math.inf,
                         p90_ratio=float(q_d[1] / q_b[1]) if q_b[1] > 0 else math.inf)
        per_loc.append(entry)
    judged = [e for e in per_loc if "p50_ratio" in e]
    hits = [e for e in judged if e["p50_ratio"] >= ratio or e["p90_ratio"] >= ratio]
    best = max(judged, key=lambda e: max(e["p50_ratio"], e["p90_ratio"]), default=None)
    return {
        "has_data": bool(judged), "shown": bool(hits),
        "spans_before": int(b - a), "spans_during": int(c - b),
        "max_p50_ratio": max((e["p50_ratio"] for e in judged), default=None),
        "max_p90_ratio": max((e["p90_ratio"] for e in judged), default=None),
        "best": best, "locations_shown": [[e["service"], e["function"]] for e in hits],
    }


# --- replay through backflow serve ---------------------------------------------------------------

def encode_requests(tr: Traces, spans_per_request: int = SPANS_PER_REQUEST) -> list[bytes]:
    """The batch as serialized ExportTraceServiceRequests, in end order, one resource per
    service within a request (each service's spans keep their end order)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import Status

    ok = Status(code=Status.STATUS_CODE_OK)
    names = [op for _, op in tr.locations]
    out = []
    n = len(tr)
    for lo in range(0, n, spans_per_request):
        hi = min(n, lo + spans_per_request)
        svc = tr.svc[lo:hi]
        order = np.argsort(svc, kind="stable")
        cut = np.flatnonzero(np.diff(svc[order])) + 1
        req = ExportTraceServiceRequest()
        t_hi, t_lo = tr.tid[lo:hi, 0].tolist(), tr.tid[lo:hi, 1].tolist()
        sids, pids = tr.sid[lo:hi].tolist(), tr.pid[lo:hi].tolist()
        starts, ends, locs = tr.start[lo:hi].tolist(), tr.end[lo:hi].tolist(), tr.loc[lo:hi].tolist()
        for part in np.split(order, cut):
            rs = req.resource_spans.add()
            rs.resource.attributes.append(KeyValue(
                key="service.name", value=AnyValue(string_value=tr.services[int(svc[part[0]])])))
            spans = rs.scope_spans.add().spans
            for i in part.tolist():
                sp = spans.add(
                    trace_id=t_hi[i].to_bytes(8, "big") + t_lo[i].to_bytes(8, "big"),
                    span_id=sids[i].to_bytes(8, "big"),
                    parent_span_id=pids[i].to_bytes(8, "big") if pids[i] else b"",
                    name=names[locs[i]], start_time_unix_nano=starts[i],
                    end_time_unix_nano=ends[i])
                sp.status.CopyFrom(ok)
        out.append(req.SerializeToString())
    return out


def serve_args(config_path: str, window_s: float) -> list[str]:
    """What the benchmark gives ``backflow serve`` besides addresses: the user's settings."""
    return ["--window", f"{window_s:g}", "--config", config_path]


def run_serve(requests: list[bytes], n_spans: int, config_path: str, window_s: float,
              prefix: str = "backflow", log=print) -> dict:
    """Send the requests to a fresh ``backflow serve`` (and redis-server); return its events."""
    import grpc
    import redis

    from processor.devtools.redis_server import RedisServer, free_port

    t_start = time.perf_counter()
    grpc_port, metrics_port = free_port(), free_port()
    with RedisServer() as rs, tempfile.TemporaryFile("w+") as server_log:
        args = [sys.executable, "-m", "processor", "serve",
                "--otlp-grpc", f"127.0.0.1:{grpc_port}", "--metrics", f"127.0.0.1:{metrics_port}",
                "--redis-url", rs.url, "--prefix", prefix, "--otlp-http", "off",
                "--log-level", "warning", *serve_args(config_path, window_s)]
        proc = subprocess.Popen(args, stdout=server_log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 60
            while not healthy(metrics_port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    server_log.seek(0)
                    raise RuntimeError(f"backflow serve did not start: {server_log.read()[-2000:]}")
                time.sleep(0.1)
            retries = 0
            t_send = time.perf_counter()
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[
                    ("grpc.max_send_message_length", 64 << 20)]) as channel:
                export = channel.unary_unary(EXPORT)  # bytes in, bytes out
                for req in requests:
                    while True:
                        try:
                            export(req, timeout=120)
                            break
                        except grpc.RpcError as e:
                            if e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                                grpc.StatusCode.RESOURCE_EXHAUSTED):
                                raise
                            retries += 1
                            time.sleep(0.05)
            t_sent = time.perf_counter() - t_send
            deadline = time.monotonic() + 900
            while True:
                done = (metric(metrics_port, "backflow_processed_spans_total")
                        + metric(metrics_port, "backflow_late_spans_total"))
                if done >= n_spans:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server processed {done:.0f} of {n_spans} spans")
                time.sleep(0.2)
            t_processed = time.perf_counter() - t_send
            late = metric(metrics_port, "backflow_late_spans_total")
            refused = metric_by(metrics_port, "backflow_receiver_refused_spans_total", "reason")
            processed = metric(metrics_port, "backflow_processed_spans_total")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        client = redis.Redis.from_url(rs.url, decode_responses=True)
        entries = [f for _, f in client.xrange(f"{prefix}:events")]
        client.close()
        server_log.seek(0)
        server_out = server_log.read()
    events = [{"type": f.get("type", ""), "key": f.get("key", ""),
               "service": f.get("service.name", ""), "function": f.get("code.function.name", ""),
               "window_start_ns": int(f.get("window.start") or 0) * 1_000_000,
               "window_end_ns": int(f.get("window.end") or 0) * 1_000_000,
               "severity": f.get("severity", ""), "summary": f.get("summary", ""),
               "detail": f.get("detail", "")} for f in entries]
    return {"events": events, "spans": n_spans, "processed": processed, "late": late,
            "refused": refused, "retries": retries, "requests": len(requests),
            "exit_status": rc, "send_s": t_sent, "processed_s": t_processed,
            "total_s": time.perf_counter() - t_start, "server_log_tail": server_out[-2000:]}


def event_identity(e: dict) -> tuple:
    """What two replays must agree on: type, location, window, and the detail's quantile."""
    try:
        q = str(json.loads(e["detail"]).get("quantile", "")) if e.get("detail") else ""
    except (ValueError, AttributeError):
        q = ""
    return (e["type"], e["service"], e["function"], e["window_end_ns"], q)


# --- scoring -------------------------------------------------------------------------------------

def _overlaps(e: dict, lo_ns: int, hi_ns: int) -> bool:
    return e["window_start_ns"] < hi_ns and e["window_end_ns"] > lo_ns


def score(faults: list[Fault], related: dict[str, set[str]], shown_of: dict[str, dict],
          events: list[dict], loc_hours: float, fault_ns: int, margin_ns: int,
          kinds: tuple[str, ...] = REGRESSIONS) -> dict:
    """Faults found, delays and false events for one detector's events of one batch.

    ``related``: fault name -> related services; ``shown_of``: fault name -> ``shown()``.
    """
    scored = sorted((e for e in events if e["type"] in kinds),
                    key=lambda e: (e["window_end_ns"], e["service"], e["function"], e["type"]))
    rows = []
    for f in faults:
        rel = related[f.name]
        hits = [e for e in scored if e["service"] in rel and _overlaps(e, f.t0_ns, f.t0_ns + fault_ns)]
        first = hits[0] if hits else None
        at = {tuple(x) for x in shown_of[f.name]["locations_shown"]}
        strict = next((e for e in hits if (e["service"], e["function"]) in at), None)
        # the call graph's word on the fault: a latency regression's top cause in the faulty
        # service (a callee of it, or the own code of one of its locations), and its impact
        graph = []
        for e in hits:
            if e["type"] != "latency_regression":
                continue
            try:
                d = json.loads(e["detail"]) if e.get("detail") else {}
            except ValueError:
                d = {}
            top = (d.get("causes") or [None])[0]
            if top is not None:
                where = e["service"] if top.get("self") else top.get("service")
                # (or a call to it: a client span named by its RPC, whose own time the network's
                # and the callee's queueing delays are, since the callee's span does not see them)
                name = e["function"] if top.get("self") else top.get("callee", "")
                calls_it = f.service.lower() in name.lower().replace("_", "")
                graph.append({"cause_in_faulty_service": where == f.service,
                              "cause_leads_to_it": where == f.service or calls_it, "impact": bool(d.get("impact")),
                              "at": [e["service"], e["function"]],
                              "cause": "(self)" if top.get("self") else [top.get("service"), top.get("callee")]})
        rows.append({"fault": f.name, "found": first is not None, "graph": graph,
                     "delay_s": (first["window_end_ns"] - f.t0_ns) / S if first else None,
                     "found_at_shown": strict is not None,
                     "delay_at_shown_s": (strict["window_end_ns"] - f.t0_ns) / S if strict else None,
                     "event": {k: first[k] for k in ("type", "service", "function",
                                                     "window_start_ns", "window_end_ns")}
                     | ({"summary": first["summary"]} if first.get("summary") else {})
                     if first else None,
                     "events_in_fault": len(hits)})
    false = []
    for e in scored:
        owner = next((f for f in faults if e["service"] in related[f.name]
                      and _overlaps(e, f.t0_ns, f.t0_ns + fault_ns + margin_ns)), None)
        if owner is not None:
            continue
        during = next((f for f in faults if _overlaps(e, f.t0_ns, f.t0_ns + fault_ns + margin_ns)),
                      None)
        false.append({**{k: e[k] for k in ("type", "service", "function", "window_start_ns",
                                           "window_end_ns")},
                      "summary": e.get("summary", ""), "detail": e.get("detail", ""),
                      "during_fault": during.name if during else None,
                      "ratio": e.get("ratio")})
    return {"faults": rows, "false_events": false, "location_hours": loc_hours,
            "events": len(scored)}


def summarize(faults: list[Fault], shown_of: dict[str, dict], scores: list[dict]) -> dict:
    """Figures over every batch: recall on shown faults (all, per type, gross), delay, false."""
    by_name = {f.name: f for f in faults}
    rows = [r for s in scores for r in s["faults"]]
    false = [e for s in scores for e in s["false_events"]]
    loc_hours = sum(s["location_hours"] for s in scores)
    shown_rows = [r for r in rows if shown_of[r["fault"]]["shown"]]

    def recall(rs, found_key="found", delay_key="delay_s"):
        found = [r for r in rs if r[found_key]]
        return {"n": len(rs), "found": len(found),
                "recall": len(found) / len(rs) if rs else None,
                "median_delay_s": statistics.median(r[delay_key] for r in found) if found else None}

    def gross(r):
        sh = shown_of[r["fault"]]
        return sh["max_p50_ratio"] is not None and sh["max_p50_ratio"] >= GROSS_RATIO

    per_type = {t: recall([r for r in shown_rows if by_name[r["fault"]].type == t])
                for t in sorted({by_name[r["fault"]].type for r in rows},
                                key=lambda t: (FAULT_TYPES.index(t) if t in FAULT_TYPES else 99, t))}
    return {
        "shown": recall(shown_rows),
        "shown_at_location": recall(shown_rows, "found_at_shown", "delay_at_shown_s"),
        "per_type": per_type,
        "gross": recall([r for r in shown_rows if gross(r)]),
        "not_shown_found": sum(1 for r in rows if r["found"] and not shown_of[r["fault"]]["shown"]),
        "false_events": len(false),
        "false_outside_faults": sum(1 for e in false if e["during_fault"] is None),
        "false_during_other_fault": sum(1 for e in false if e["during_fault"] is not None),
        "false_by_type": dict(Counter(e["type"] for e in false)),
        "location_hours": loc_hours,
        "false_per_1000_location_hours": 1000 * len(false) / loc_hours if loc_hours else None,
        # faults with a latency regression that has causes: how many name the faulty service
        # in their first such event, and how many carry the impact on an entry point
        "causes": {"faults": sum(1 for r in shown_rows if r.get("graph")),
                   "faulty_service_named": sum(1 for r in shown_rows if r.get("graph")
                                               and r["graph"][0]["cause_in_faulty_service"]),
                   "leads_to_it": sum(1 for r in shown_rows if r.get("graph") and r["graph"][0]["cause_leads_to_it"]),
                   "with_impact": sum(1 for r in shown_rows if r.get("graph") and r["graph"][0]["impact"])},
    }


# --- report --------------------------------------------------------------------------------------

def _f(x, spec=".0f", none="-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _spread(values: list, spec: str) -> str:
    """One figure if all runs agree, else median [min-max]."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(set(vals)) == 1:
        return _f(vals[0], spec)
    return f"{_f(statistics.median(vals), spec)} [{_f(min(vals), spec)}-{_f(max(vals), spec)}]"


def _recall_cell(runs: list[dict], pick) -> str:
    cells = [pick(r) for r in runs]
    found = [c["found"] for c in cells]
    n = cells[0]["n"]
    if n == 0:
        return "-"
    pct = [100 * f / n for f in found]
    return f"{_spread(found, 'd')} of {n} ({_spread(pct, '.0f')}%)"


def rules_text(args) -> list[str]:
    fs, ms = args.fault_seconds, args.margin_seconds
    return [
        (f"shown: p50 or p90 >= {SHOWN_RATIO:g}x in [t0, t0+{fs:g}s) vs [t0-{fs:g}s, t0), >= {MIN_SPANS}"
         " spans in each, at some location of the faulty service or a direct caller (ParentID)"),
        (f"found: a {', '.join(REGRESSIONS)} event on the faulty service or a direct caller whose"
         f" window overlaps [t0, t0+{fs:g}s); delay = window end - t0 (median over found faults)"),
        (f"false: such events on no related service of a fault within [t0, t0+{fs:g}s+{ms:g}s)"
         f" margin; per 1,000 location-hours of {args.window:g}-s windows with spans"),
        (f"naive rule: window p50 > {NAIVE_RATIO:g}x the median p50 of the location's previous"
         f" {NAIVE_HISTORY} windows with >= {MIN_SPANS} spans (>= {NAIVE_MIN_HISTORY} of them),"
         f" >= {MIN_SPANS} spans; a run of firing windows is one event"),
        (f"gross: a related location's p50 >= {GROSS_RATIO:g}x; 'at a location that shows it': the"
         " event is at a location that meets the shown rule itself"),
    ]


def report(doc: dict, args) -> str:
    out: list[str] = []
    w = out.append
    d = doc["data"]
    w(f"Real traces: {d['source']} ({', '.join(b['name'] for b in d['batches'])}) from {d['path']}")
    w(f"  {d['spans']:,} spans in {d['files']} minute files ({d['missing_minutes']} minutes missing"
      f" between the first and last file), {d['services']} services, {d['locations']} locations,"
      f" {doc['location_hours']:.1f} location-hours")
    w(f"  serve: {' '.join(doc['serve_args'])} with detectors.warmup_windows: {args.warmup_windows}"
      f" (the rest default); spans in end order, {args.spans_per_request} per request")
    reps = doc["replays"]
    late = sum(r["late"] for run in reps for r in run["batches"])
    refused: Counter = Counter()
    for run in reps:
        for r in run["batches"]:
            refused.update(r["refused"])
    lost = sum(r["spans"] - r["processed"] - r["late"] for run in reps for r in run["batches"])
    w(f"  runs: {len(reps)}; events identical in every run: {'yes' if doc['deterministic'] else 'NO'};"
      f" late spans {late:.0f}, spans sent but not processed {lost:.0f}; refused and sent again: "
      + (", ".join(f"{n:,.0f} ({k})" for k, n in sorted(refused.items())) or "none"))
    fl = doc["faults"]
    n_data = sum(1 for f in fl if f["shown"]["has_data"])
    n_shown = sum(1 for f in fl if f["shown"]["shown"])
    w(f"  faults: {len(fl)} labelled, {n_data} with >= {MIN_SPANS} spans before and during,"
      f" {n_shown} shown by the spans")
    w("")
    bf, nv = doc["backflow_runs"], [doc["naive"]]
    w(f"{'':<40}{'Backflow':>24}{'naive rule':>24}")

    def line(label, a, b):
        w(f"{label:<40}{a:>24}{b:>24}")

    line("found, of the faults the spans show", _recall_cell(bf, lambda r: r["shown"]),
         _recall_cell(nv, lambda r: r["shown"]))
    for t in bf[0]["per_type"]:
        if bf[0]["per_type"][t]["n"]:
            line(f"  {t}", _recall_cell(bf, lambda r, t=t: r["per_type"][t]),
                 _recall_cell(nv, lambda r, t=t: r["per_type"][t]))
    line(f"  gross (p50 >= {GROSS_RATIO:g}x)", _recall_cell(bf, lambda r: r["gross"]),
         _recall_cell(nv, lambda r: r["gross"]))
    line("  at a location that shows it", _recall_cell(bf, lambda r: r["shown_at_location"]),
         _recall_cell(nv, lambda r: r["shown_at_location"]))
    line("median delay from fault start (s)",
         _spread([r["shown"]["median_delay_s"] for r in bf], ".0f"),
         _spread([r["shown"]["median_delay_s"] for r in nv], ".0f"))
    line("  gross shifts (s)", _spread([r["gross"]["median_delay_s"] for r in bf], ".0f"),
         _spread([r["gross"]["median_delay_s"] for r in nv], ".0f"))
    line("found, of faults not shown", _spread([r["not_shown_found"] for r in bf], "d"),
         _spread([r["not_shown_found"] for r in nv], "d"))
    line("false events", _spread([r["false_events"] for r in bf], "d"),
         _spread([r["false_events"] for r in nv], "d"))
    line("  per 1,000 location-hours", _spread([r["false_per_1000_location_hours"] for r in bf], ",.0f"),
         _spread([r["false_per_1000_location_hours"] for r in nv], ",.0f"))
    line("  outside any fault", _spread([r["false_outside_faults"] for r in bf], "d"),
         _spread([r["false_outside_faults"] for r in nv], "d"))
    line("  during a fault, unrelated service", _spread([r["false_during_other_fault"] for r in bf], "d"),
         _spread([r["false_during_other_fault"] for r in nv], "d"))
    c = bf[0].get("causes")
    if c is not None:
        w(f"call graph (first run): of the faults the spans show, {c['faults']} have a latency regression with"
          f" detail.causes; its top cause is in the faulty service (a callee there, or its own code) for"
          f" {c['faulty_service_named']} of them, and is that or a call to the faulty service (a client span"
          f" named by its RPC) for {c.get('leads_to_it', '-')}; {c['with_impact']} give the impact on an entry point")
    w(f"naive rule firing windows (not merged into runs): {doc['naive_firing_windows']:,}")
    o = doc["other_events"]
    w("Backflow events not scored (first run): " + (", ".join(f"{k} {v}" for k, v in sorted(o.items())) or "none"))
    w("")
    w(f"{'fault':<10}{'t0 (UTC)':<10}{'service':<23}{'type':<16}{'spans b/d':>12}{'p50x':>7}{'p90x':>7}"
      f"  {'Backflow':<10}{'naive':<8}")
    bf_rows = {r["fault"]: r for r in doc["scores"][0]["backflow"]}
    nv_rows = {r["fault"]: r for r in doc["scores"][0]["naive"]}
    for f in fl:
        sh = f["shown"]
        t = datetime.fromtimestamp(f["t0_ns"] / S, UTC).strftime("%H:%M:%S")
        mark = "" if sh["shown"] else (" (not shown)" if sh["has_data"] else " (no data)")

        def cell(r):
            return f"{r['delay_s']:.0f} s" if r["found"] else "miss"
        w(f"{f['name']:<10}{t:<10}{f['service']:<23}{f['type']:<16}"
          f"{sh['spans_before']:>6}/{sh['spans_during']:<5}{_f(sh['max_p50_ratio'], '.1f'):>7}"
          f"{_f(sh['max_p90_ratio'], '.1f'):>7}  {cell(bf_rows[f['name']]):<10}{cell(nv_rows[f['name']]):<8}{mark}")
    w("")
    w("rules:")
    for r in rules_text(args):
        w("  " + r)
    w("")
    sp = [sum(b["spans"] for b in run["batches"]) / max(sum(b["processed_s"] for b in run["batches"]), 1e-9)
          for run in reps]
    w(f"replay: {_spread([run['total_s'] for run in reps], '.0f')} s per run, "
      f"{_spread(sp, ',.0f')} spans/s processed (median [min-max] over runs); "
      f"encoding {doc['encode_s']:.0f} s, loading {doc['load_s']:.0f} s; wall {doc['wall_s']:.0f} s")
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_traces",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True,
                   help="folder of batch folders (trace/*.csv and label.json), or one batch folder")
    p.add_argument("--batches", default=None,
                   help="comma-separated batch folder names to use (default: all found)")
    p.add_argument("--runs", type=int, default=2, help="replays of everything (default 2)")
    p.add_argument("--window", type=float, default=WINDOW_S, help="serve --window (default 10)")
    p.add_argument("--warmup-windows", type=int, default=WARMUP_WINDOWS,
                   help="detectors.warmup_windows in the YAML given to serve (default 6)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="serve's YAML file instead of the one the benchmark writes")
    p.add_argument("--fault-seconds", type=float, default=FAULT_S)
    p.add_argument("--margin-seconds", type=float, default=MARGIN_S)
    p.add_argument("--spans-per-request", type=int, default=SPANS_PER_REQUEST)
    p.add_argument("--json", metavar="FILE", default=None, help="write every figure as JSON")
    return p


def _finite(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _finite(float(o))
    return o


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t_wall = time.perf_counter()
    commit = _commit()  # the code that runs, not what HEAD is when the run ends
    window_ns = round(args.window * S)
    fault_ns, margin_ns = int(args.fault_seconds * S), int(args.margin_seconds * S)
    try:
        batch_dirs = find_batches(args.data)
    except FileNotFoundError as e:
        print(f"benchmarks.real_traces: {e}", file=sys.stderr)
        return 2
    if args.batches:
        wanted = set(args.batches.split(","))
        batch_dirs = [b for b in batch_dirs if os.path.basename(os.path.normpath(b)) in wanted]

    tmp = tempfile.TemporaryDirectory(prefix="backflow-real-traces-")
    config_path = args.config
    if config_path is None:
        config_path = os.path.join(tmp.name, "backflow.yaml")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(f"detectors:\n  warmup_windows: {args.warmup_windows}\n")

    batches = []
    t0 = time.perf_counter()
    for bdir in batch_dirs:
        name = os.path.basename(os.path.normpath(bdir))
        print(f"loading {name} ...", flush=True)
        tr = load_traces(bdir, name)
        faults = load_labels(os.path.join(bdir, "label.json"), name)
        batches.append((tr, faults))
        print(f"  {len(tr):,} spans, {len(tr.files)} files, {len(faults)} faults", flush=True)
    load_s = time.perf_counter() - t0

    # What the spans show, and the naive rule: no server involved.
    all_faults, related, shown_of, naive_scores, loc_hours = [], {}, {}, [], {}
    naive_firing = 0
    tables = {}
    for tr, faults in batches:
        callers = callers_of(tr)
        wt = window_table(tr, window_ns)
        tables[tr.name] = wt
        loc_hours[tr.name] = location_hours(wt, window_ns)
        for f in faults:
            related[f.name] = {f.service} | callers.get(f.service, set())
            shown_of[f.name] = shown(tr, f, related[f.name], fault_ns)
        all_faults += faults
        nev, firing = naive_events(tr, wt, window_ns)
        naive_firing += firing
        naive_scores.append(score(faults, related, shown_of, nev, loc_hours[tr.name], fault_ns,
                                  margin_ns, kinds=("naive",)))

    # Replays through backflow serve.
    replays, encode_s = [], 0.0
    for run in range(args.runs):
        replays.append({"run": run + 1, "batches": [], "total_s": 0.0})
    for tr, faults in batches:
        t1 = time.perf_counter()
        reqs = encode_requests(tr, args.spans_per_request)
        encode_s += time.perf_counter() - t1
        for run in range(args.runs):
            print(f"replaying {tr.name}, run {run + 1} of {args.runs}: {len(tr):,} spans in "
                  f"{len(reqs):,} requests ...", flush=True)
            r = run_serve(reqs, len(tr), config_path, args.window)
            r["name"] = tr.name
            print(f"  {len(r['events'])} events, {r['processed_s']:.0f} s, late {r['late']:.0f},"
                  f" exit status {r['exit_status']}", flush=True)
            replays[run]["batches"].append(r)
            replays[run]["total_s"] += r["total_s"]
        del reqs

    idents = [sorted(event_identity(e) for b in run["batches"] for e in b["events"]) for run in replays]
    deterministic = all(i == idents[0] for i in idents[1:])
    bf_runs, scores = [], []
    for run in replays:
        per_batch = []
        for (tr, faults), r in zip(batches, run["batches"]):
            per_batch.append(score(faults, related, shown_of, r["events"], loc_hours[tr.name],
                                   fault_ns, margin_ns))
        bf_runs.append(summarize(all_faults, shown_of, per_batch))
        scores.append({"backflow": [x for s in per_batch for x in s["faults"]],
                       "backflow_false": [x for s in per_batch for x in s["false_events"]]})
    naive = summarize(all_faults, shown_of, naive_scores)
    for s in scores:
        s["naive"] = [x for n in naive_scores for x in n["faults"]]
    other = Counter(e["type"] for b in replays[0]["batches"] for e in b["events"]
                    if e["type"] not in REGRESSIONS)

    doc = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": commit,
        "data": {
            "source": "TraStrainer OnlineBoutique (hipster)", "path": args.data,
            "batches": [{"name": tr.name, "files": len(tr.files), "spans": len(tr),
                         "missing_minutes": minute_gaps(tr.files), "duplicates": tr.duplicates,
                         "bad_rows": tr.bad_rows, "services": tr.services,
                         "locations": len(tr.locations), "location_hours": loc_hours[tr.name],
                         "callers": {k: sorted(v) for k, v in callers_of(tr).items()}}
                        for tr, _ in batches],
            "spans": sum(len(tr) for tr, _ in batches),
            "files": sum(len(tr.files) for tr, _ in batches),
            "missing_minutes": sum(len(minute_gaps(tr.files)) for tr, _ in batches),
            "services": len({s for tr, _ in batches for s in tr.services}),
            "locations": len({loc for tr, _ in batches for loc in tr.locations}),
        },
        "settings": {"window_s": args.window, "warmup_windows": args.warmup_windows,
                     "config": args.config, "fault_s": args.fault_seconds,
                     "margin_s": args.margin_seconds, "spans_per_request": args.spans_per_request},
        "serve_args": ["backflow", "serve", *serve_args(
            "FILE" if args.config is None else args.config, args.window)],
        "rules": rules_text(args),
        "location_hours": sum(loc_hours.values()),
        "faults": [{**asdict(f), "name": f.name, "related": sorted(related[f.name]),
                    "shown": shown_of[f.name]} for f in all_faults],
        "backflow_runs": bf_runs,
        "naive": naive,
        "naive_firing_windows": naive_firing,
        "scores": scores,
        "naive_false_events": [x for n in naive_scores for x in n["false_events"]],
        "deterministic": deterministic,
        "other_events": dict(other),
        "replays": [{"run": run["run"], "total_s": run["total_s"],
                     "batches": [{k: v for k, v in b.items() if k != "events"}
                                 | {"events": len(b["events"])} for b in run["batches"]]}
                    for run in replays],
        "events": [e for b in replays[0]["batches"] for e in b["events"]],
        "encode_s": encode_s, "load_s": load_s,
    }
    doc["wall_s"] = time.perf_counter() - t_wall
    print()
    print(report(doc, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_finite(doc), f, indent=1, default=str, allow_nan=False)
    tmp.cleanup()
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
