"""Prometheus: self-metrics, per-location gauges under a cardinality limit, /healthz.

Per-location series are limited to ``max_locations`` code locations (the first ones seen);
the others fold into one overflow series with ``code_function="__overflow__"``, as the
collector's spanmetrics connector does, so a cardinality explosion cannot blow up the
scrape.
"""

from __future__ import annotations

import functools
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from processor.pipeline.baseline import QUANTILES
from processor.config import split_address
from processor.detect.registry import EVENT_TYPES, RESOLVED
from processor.detect.rollout import ENDED_KEPT, VERDICT_VALUES
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import ClosedWindow

OVERFLOW = "__overflow__"
MAX_CALLEES = 10  # callees per caller with a series of their own
_LABELS = ["service_name", "deployment_environment_name", "code_function_name"]


class LocationGauges:
    """A custom collector: latest closed window's figures per code location."""

    def __init__(self, max_locations: int):
        self.max_locations = max_locations
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str, str], tuple] = {}  # labels -> (sketch, errors, count, window s)
        self._edges: dict[tuple[str, str, str], list] = {}  # labels -> [(callee function, its service, ms per call)]
        self.overflowed: set[str] = set()

    def observe(self, cw: ClosedWindow) -> None:
        # Only references are kept here; quantiles are computed when scraped, because
        # windows close far more often per location than Prometheus scrapes.
        window_s = (cw.end_ns - cw.start_ns) / 1e9
        spill = []
        with self._lock:
            for lw in cw.locations:
                loc = lw.location
                labels = (loc.service, loc.environment, loc.function)
                if labels not in self._rows and len(self._rows) >= self.max_locations:
                    self.overflowed.add(loc.key)
                    spill.append(lw)
                    continue
                self._rows[labels] = (lw.sketch, lw.errors, lw.count, window_s)
            if spill:  # (the sketches are merged when scraped, as quantiles are computed then)
                self._rows[("", "", OVERFLOW)] = ([lw.sketch for lw in spill], sum(lw.errors for lw in spill),
                                                  sum(lw.count for lw in spill), window_s)

    def observe_edges(self, edges) -> None:
        """The call graph's callers of a closed window ((Location, LocationGraph) pairs): per
        caller with a series of its own, the time per call of each of its ``MAX_CALLEES``
        largest callees and of its own code (``(self)``)."""
        with self._lock:
            for loc, g in edges:
                labels = (loc.service, loc.environment, loc.function)
                if labels not in self._rows or not g.calls:
                    continue
                top = sorted(g.children.items(), key=lambda cf: (-cf[1].ns, cf[0].function))[:MAX_CALLEES]
                self._edges[labels] = [("(self)", loc.service, g.self_ns / g.calls / 1e6)] + [
                    (c.function, c.service, f.ns / g.calls / 1e6) for c, f in top]

    def forget(self, locations) -> None:
        """Drop the series of forgotten locations (their ids and places are reused)."""
        with self._lock:
            for loc in locations:
                self._edges.pop((loc.service, loc.environment, loc.function), None)
                self._rows.pop((loc.service, loc.environment, loc.function), None)
                self.overflowed.discard(loc.key)
            if not self.overflowed:  # (none left to fold: the overflow series goes too)
                self._rows.pop(("", "", OVERFLOW), None)

    def describe(self):
        # Named, so that a scrape restricted by ``name[]`` to other metrics skips this one.
        return self._families()

    def _families(self):
        lat = GaugeMetricFamily("backflow_location_latency_milliseconds",
                                "Span duration per code location at a quantile, latest closed window",
                                labels=_LABELS + ["quantile"])
        err = GaugeMetricFamily("backflow_location_error_ratio",
                                "Share of spans with status ERROR per code location, latest closed window",
                                labels=_LABELS)
        rate = GaugeMetricFamily("backflow_location_calls_per_second",
                                 "Spans per second per code location, latest closed window",
                                 labels=_LABELS)
        callee = GaugeMetricFamily("backflow_location_callee_milliseconds_per_call",
                                   "A code location's time per call spent in a callee (the call graph; "
                                   "callee_function_name=\"(self)\": its own code), its latest window with "
                                   "callees; its largest callees only", labels=_LABELS + ["callee_function_name",
                                                                                   "callee_service_name"])
        return [lat, err, rate, callee]

    def collect(self):
        lat, err, rate, callee = self._families()
        with self._lock:
            rows = list(self._rows.items())
            edges = list(self._edges.items())
        for labels, parts in edges:
            for function, service, ms in parts:
                callee.add_metric(list(labels) + [function, service], ms)
        for labels, row in rows:
            sketch, errors, count, window_s = row
            if isinstance(sketch, list):  # the overflow series: the locations folded into it
                sketch = functools.reduce(LogSketch.merge, sketch)
                with self._lock:  # merged once (unless a newer window replaced the row)
                    if self._rows.get(labels) is row:
                        self._rows[labels] = (sketch, errors, count, window_s)
            for q, v in zip(QUANTILES, sketch.quantiles(QUANTILES) / 1e6):
                lat.add_metric(list(labels) + [str(q)], float(v))
            err.add_metric(list(labels), errors / count)
            rate.add_metric(list(labels), count / window_s)
        yield from (lat, err, rate, callee)


GRAPH_OUTCOMES = {"joined": "joined", "orphan": "orphans", "late": "late", "forced": "forced"}


class Metrics:
    """Every metric Backflow exports, on one registry passed in (tests build their own)."""

    def __init__(self, registry: CollectorRegistry | None = None, max_locations: int = 1000):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.accepted = Counter("backflow_receiver_accepted_spans", "Spans accepted by the receiver",
                                ["transport"], registry=r)
        self.refused = Counter("backflow_receiver_refused_spans",
                               "Spans refused by the receiver (malformed, or pipeline full)",
                               ["transport", "reason"], registry=r)
        self.refused_requests = Counter("backflow_receiver_refused_requests",
                                        "Whole requests refused (not OTLP, too large, no valid bearer token)",
                                        ["transport", "reason"], registry=r)
        self.accepted_points = Counter("backflow_receiver_accepted_points",
                                       "OTLP metrics data points taken (the spanmetrics duration histogram and "
                                       "exception events, processor/receiver/metrics.py)", ["transport"], registry=r)
        self.refused_points = Counter("backflow_receiver_refused_points",
                                      "OTLP metrics data points refused, by reason", ["transport", "reason"],
                                      registry=r)
        self.late = Counter("backflow_late_spans", "Spans dropped because their window had closed",
                            registry=r)
        self.overflow_spans = Counter("backflow_overflow_spans",
                                      "Spans of code locations beyond --max-locations, folded into "
                                      "their service's __overflow__ location", registry=r)
        self.forgotten_locations = Counter("backflow_forgotten_locations",
                                           "Code locations forgotten after --location-idle-timeout "
                                           "without a span: baseline, detectors and checkpoint "
                                           "field freed", registry=r)
        self.forgotten_services = Counter("backflow_forgotten_services",
                                          "Services forgotten once none of their code locations "
                                          "was left, their slots under --max-services freed",
                                          registry=r)
        self.forgotten_versions = Counter("backflow_forgotten_versions",
                                          "Versions forgotten after --version-idle-timeout without a span, "
                                          "their slots under the version caps freed", registry=r)
        self.overflow_names = Counter("backflow_overflow_names",
                                      "Distinct service or version names beyond max_services, "
                                      "max_versions or max_versions_per_service, folded into an "
                                      "__overflow__ location or version", ["kind"], registry=r)
        self.checkpointed = Counter("backflow_checkpoint_fields",
                                    "Checkpoint fields (code locations and services) handed to the "
                                    "Redis sink for {prefix}:state", registry=r)
        self.restored = Gauge("backflow_restored_locations",
                              "Code locations whose baseline and detectors were restored from the "
                              "checkpoint since start (each service's when its first span came)", registry=r)
        self.checkpoint_rejected = Counter(
            "backflow_checkpoint_rejected_fields",
            "Checkpoint fields of {prefix}:state not loaded at start (their locations are learned "
            "again): malformed (does not parse: corrupt or forged), other_format (another "
            "format's, such as format 2's pickles, never unpickled)", ["reason"], registry=r)
        for reason in ("malformed", "other_format"):
            self.checkpoint_rejected.labels(reason)
        self.graph_spans = Counter("backflow_graph_spans",
                                   "Spans through the call graph's join: joined (their trace complete), "
                                   "orphan (joined, but their parent never came), late (their window "
                                   "had closed when their trace was joined: dropped from the graph), "
                                   "forced (joined before their trace was complete: the join was full)",
                                   ["outcome"], registry=r)
        for outcome in GRAPH_OUTCOMES:
            self.graph_spans.labels(outcome)
        self.graph_waiting = Gauge("backflow_graph_waiting_spans",
                                   "Spans in the call graph's join waiting for the rest of their trace",
                                   registry=r)
        self.processed = Counter("backflow_processed_spans",
                                 "Spans aggregated into a window by the window stage", registry=r)
        self.events = Counter("backflow_events", "Events written to the events stream", ["type"],
                              registry=r)
        self.windows = Counter("backflow_windows_closed", "Windows closed (service x window)",
                               registry=r)
        self.active_keys = Gauge("backflow_active_keys", "Code locations held in memory",
                                 registry=r)
        self.open_windows = Gauge("backflow_open_windows", "Windows open (service x window)",
                                  registry=r)
        self.queue = Gauge("backflow_queue_batches", "Decoded requests waiting for the window stage",
                           registry=r)
        self.redis_pending = Gauge("backflow_redis_pending_writes",
                                   "Writes waiting for Redis (buffered while it is away)", registry=r)
        self.redis_dropped = Counter("backflow_redis_dropped_writes",
                                     "Writes dropped because the Redis buffer was full while Redis "
                                     "was away", registry=r)
        self.redis_republished = Counter("backflow_redis_republished",
                                         "Times Redis was found without what it held (restarted "
                                         "without its data) and the process published it again",
                                         registry=r)
        self.redis_spool_bytes = Gauge("backflow_redis_spool_bytes",
                                       "Bytes of Redis writes waiting in the spool on disk (--spool-dir)",
                                       registry=r)
        self.redis_waited = Counter("backflow_redis_backpressure_seconds",
                                    "Seconds the pipeline waited for room in the Redis buffer while "
                                    "Redis answered (the receivers pushed back meanwhile)", registry=r)
        self.redis_up = Gauge("backflow_redis_up", "1 when the last Redis call succeeded", registry=r)
        # two tiers (processor/pipeline/tiers.py): an aggregate replica's sending, a detect replica's replicas
        self.forward_points = Counter("backflow_forward_points",
                                      "Data points of partials an aggregate replica sent to the detect replica: "
                                      "sent (taken), refused (refused by it)", ["outcome"], registry=r)
        for outcome in ("sent", "refused"):
            self.forward_points.labels(outcome)
        self.forward_pending = Gauge("backflow_forward_pending_requests",
                                     "Requests of partials waiting to be taken by the detect replica", registry=r)
        self.forward_up = Gauge("backflow_forward_up", "1 when the detect replica took the last request",
                                registry=r)
        self.tier_replicas = Gauge("backflow_tier_replicas",
                                   "Aggregate replicas the detect replica waits for (those that reported within "
                                   "replica_timeout)", registry=r)
        self.tier_dropped = Counter("backflow_tier_replicas_dropped",
                                    "Aggregate replicas dropped after replica_timeout without a report", registry=r)
        self.overflow_locations = Gauge("backflow_metrics_overflow_locations",
                                        "Code locations folded into the overflow series",
                                        registry=r)
        self.locations = LocationGauges(max_locations)
        r.register(self.locations)
        # A rollout's verdict and share, for progressive delivery tools (deploy/argo-rollouts,
        # deploy/flagger); the series of a service's latest few rollouts are kept.
        self.version_verdict = Gauge("backflow_version_verdict",
                                     "Verdict of a version's rollout against the version it replaces: "
                                     "0 pass, 1 inconclusive, 2 fail (docs/rollouts.md)",
                                     ["environment", "service", "version"], registry=r)
        self.version_share = Gauge("backflow_version_share",
                                   "The version's share of its service's calls in its latest closed window",
                                   ["environment", "service", "version"], registry=r)
        self._verdict_series: dict[tuple[str, str], list[str]] = {}
        for t in EVENT_TYPES + (RESOLVED,):
            self.events.labels(type=t)

    def for_role(self, role: str) -> None:
        """Leave out the families that do not apply to ``role``: an aggregate replica has no
        Redis and no replicas of its own, the others forward nothing (a gauge left at 0
        would read as down to an alert)."""
        if role == "aggregate":
            gone = [self.redis_pending, self.redis_dropped, self.redis_republished, self.redis_spool_bytes,
                    self.redis_waited, self.redis_up, self.tier_replicas, self.tier_dropped]
        else:
            gone = [self.forward_points, self.forward_pending, self.forward_up]
        for metric in gone:
            self.registry.unregister(metric)

    def forget(self, forgotten) -> None:
        """Count what the engine forgot (``Forgotten``) and drop its per-location series."""
        self.forgotten_versions.inc(len(forgotten.versions))
        self.forgotten_locations.inc(len(forgotten.locations))
        self.forgotten_services.inc(len(forgotten.services))
        self.locations.forget(loc for _, loc in forgotten.locations)
        self.overflow_locations.set(len(self.locations.overflowed))

    def observe_graph(self, graph, counted: dict) -> None:
        """The call graph's counts since ``counted`` (updated), and the spans waiting."""
        for outcome, stat in GRAPH_OUTCOMES.items():
            now = graph.stats[stat]
            if now > counted.get(stat, 0):
                self.graph_spans.labels(outcome).inc(now - counted.get(stat, 0))
                counted[stat] = now
        self.graph_waiting.set(graph.waiting)

    def observe_verdicts(self, states: list[dict]) -> None:
        """Rollouts' verdict states (``Rollouts.state_of``) into the version gauges."""
        for v in states:
            labels = (v["environment"], v["service"], v["version"])
            kept = self._verdict_series.setdefault(labels[:2], [])
            if labels[2] in kept:
                kept.remove(labels[2])
            if v.get("deleted") or v["state"] == "rolled_back":
                # (a rollout rolled back is over: its verdict must not gate a retry of it)
                for gauge in (self.version_verdict, self.version_share):
                    try:
                        gauge.remove(*labels)
                    except KeyError:
                        pass
                continue
            self.version_verdict.labels(*labels).set(VERDICT_VALUES[v["verdict"]])
            self.version_share.labels(*labels).set(v["share"])
            kept.append(labels[2])
            while len(kept) > ENDED_KEPT + 1:
                gone = (*labels[:2], kept.pop(0))
                self.version_verdict.remove(*gone)
                self.version_share.remove(*gone)

    def observe_window(self, cw: ClosedWindow) -> None:
        self.windows.inc()
        self.locations.observe(cw)
        self.overflow_locations.set(len(self.locations.overflowed))


def serve_http(address: str, registry: CollectorRegistry,
               health: Callable[[], tuple[bool, str]]) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` on a thread. ``health()`` gives (serving, one
    line): 200 with the line when serving ("ok", or "degraded: ..."), else 503."""
    host, port = split_address(address)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            path, _, query = self.path.partition("?")
            if path == "/metrics":
                # ?name[]=...: only those series, as prometheus_client's own handler allows
                names = parse_qs(query).get("name[]")
                body = generate_latest(registry.restricted_registry(names) if names else registry)
                status, ctype = 200, CONTENT_TYPE_LATEST
            elif path == "/healthz":
                ok, line = health()
                body = line.encode() + b"\n"
                status, ctype = (200 if ok else 503), "text/plain; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not worth a log line
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
