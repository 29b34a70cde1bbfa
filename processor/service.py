"""The running service: the wiring of threads, queues and sinks around the engine.

receiver -> queue -> pipeline thread (windows, baselines, detectors) -> sinks. One direction
of data flow. The receiver threads only decode and enqueue; one pipeline thread owns the
engine, so its state needs no locks and the same spans in the same order always give the
same output; the Redis sink writes on a thread of its own. ``backflow serve``
(processor/commands/serve.py) runs one ``Backflow``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter

import numpy as np
from redis.cluster import RedisCluster

from processor.activity import Activity
from processor.config import Config, ConfigError, redact_url
from processor.owners import Owners
from processor.parsing import listening
from processor.pipeline import checkpoint
from processor.pipeline.engine import Engine, WindowResult
from processor.pipeline.memtrim import release_free_memory
from processor.receiver import build_receivers
from processor.receiver.decode import Batch
from processor.receiver.intake import OVERLOAD_RETRY_S, Overloaded
from processor.receiver.workers import ReceiverPool
from processor.pipeline.tiers import partials
from processor.pipeline.window import WindowStage
from processor.receiver.metrics import Deltas, to_counts
from processor.sinks.connect import REDIS_ERRORS, client_for, cluster_client, hash_tagged, is_cluster
from processor.sinks.forward import Forwarder, channel_credentials, spool_name
from processor.sinks.ring import HashRing
from processor.sinks.prometheus import Metrics, serve_http
from processor.sinks.redis_streams import RedisSink
from processor.sinks.spool import Spool

log = logging.getLogger("backflow")

_STOP = object()
_REDIS_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 5, "health_check_interval": 30}
_COALESCE_SPANS = 16_384  # most spans the pipeline takes off its queue in one step
_HOLD_SPANS = 1_000_000  # spans held for services whose checkpoint is being read, at most


def _take(q: queue.Queue) -> tuple[list, bool]:
    """The next batches, and whether the stop came: waits up to half a second for one, then
    takes what else is queued, up to _COALESCE_SPANS, as one step: under load the per-batch
    cost of the window stage is then paid once for many requests."""
    try:
        item = q.get(timeout=0.5)
    except queue.Empty:
        return [], False
    if item is _STOP:
        return [], True
    batches, n = [item], len(item)
    while n < _COALESCE_SPANS:
        try:
            more = q.get_nowait()
        except queue.Empty:
            break
        if more is _STOP:
            return batches, True
        batches.append(more)
        n += len(more)
    return batches, False


def _taken(batch, take, metrics: Metrics) -> list:
    """``take(batch)`` of a metrics batch; one that fails is logged, counted and dropped,
    not the pipeline with it (the receivers check what they can; this is the rest)."""
    try:
        return take(batch)
    except Exception:  # noqa: BLE001
        log.exception("a batch of %d OTLP metrics data points could not be taken; dropped", len(batch))
        metrics.refused_points.labels(transport="pipeline", reason="internal_error").inc(len(batch))
        return []


class Restorer:
    """Reads a service's checkpoint fields from ``{prefix}:state`` on a thread of its own,
    when the pipeline first sees the service: its ``svc:`` field, then the ``loc:`` fields
    it names. A process so reads the checkpoints of its own services only, and a service's
    restore does not hold up the others' spans. A service field written before it named its
    locations is served from one scan of the whole hash, kept until its services came."""

    def __init__(self, sink: RedisSink, chunk: int = 1000):
        self.sink = sink
        self.chunk = chunk
        self.requests: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()  # (service, its fields)
        self._legacy: dict[tuple, dict] | None = None  # service -> fields, from the scan
        self._thread = threading.Thread(target=self._run, name="restore", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self, service: tuple[str, str]) -> None:
        self.requests.put(service)

    def stop(self) -> None:
        self.requests.put(_STOP)

    def _run(self) -> None:
        while True:
            service = self.requests.get()
            if service is _STOP:
                return
            wait = 0.5
            while True:
                try:
                    fields = self.read(service)
                    break
                except REDIS_ERRORS as e:  # (its spans wait meanwhile, the others' go on)
                    log.warning("could not read the checkpoint of service %s (%s); trying again", service[1], e)
                    time.sleep(wait)
                    wait = min(wait * 2, 5.0)
                except Exception:  # noqa: BLE001 (what cannot be read is learned again, not waited for)
                    log.exception("the checkpoint of service %s could not be read; it is learned again", service[1])
                    fields = {}
                    break
            self.results.put((service, fields))

    def read(self, service: tuple[str, str]) -> dict[str, bytes]:
        """The checkpoint fields of ``service``: none for a service new to the prefix."""
        r, key, name = self.sink.r, self.sink.state_key, checkpoint.service_field(service)
        blob = r.hget(key, name)
        if blob is None:
            return {}
        try:
            state = checkpoint.decode(name, blob)
        except (checkpoint.Malformed, checkpoint.OtherFormat):
            return {name: blob}  # (refused and counted by checkpoint.restore)
        if state.locations is None:
            return self._legacy_fields(service, name, blob)
        out = {name: blob}
        names = [checkpoint.location_field(k) for k in state.locations]
        for a in range(0, len(names), self.chunk):
            part = names[a:a + self.chunk]
            out.update((n, v) for n, v in zip(part, r.hmget(key, part)) if v is not None)
        return out

    def _legacy_fields(self, service: tuple, name: str, blob: bytes) -> dict[str, bytes]:
        if self._legacy is None:
            log.info("checkpoint fields of %s:state written before they named their locations: reading "
                     "it whole once", self.sink.prefix)
            legacy: dict[tuple, dict] = {}  # (kept only once the whole hash was read: a failed scan is retried)
            for field, value in self.sink.read_state().items():
                try:
                    state = checkpoint.decode(field, value)
                except (checkpoint.Malformed, checkpoint.OtherFormat):
                    continue  # (whose it is cannot be told: learned again)
                if isinstance(state, checkpoint.LocationState):
                    loc = state.location
                    legacy.setdefault((loc.environment, loc.service), {})[field] = value
            self._legacy = legacy
        return {name: blob, **self._legacy.pop(service, {})}


class Pipeline:
    """The engine on a thread of its own, fed by a bounded queue, writing to the sinks."""

    def __init__(self, cfg: Config, sink: RedisSink, metrics: Metrics, known_keys: set[str]):
        self.cfg = cfg
        self.sink = sink
        self.metrics = metrics
        self.engine = Engine(cfg, known_keys)
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_batches)
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self.on_tick = lambda: None  # called after every step (receiver processes' backpressure)
        self._last_checkpoint = time.monotonic()
        self._checkpoint_rest = False  # a checkpoint's part was taken, the rest is due now
        self._closed_since_trim = 0    # location-windows closed since the heap was last trimmed
        self._refused: dict[str, int] = {}  # service / version names folded, as last counted
        self._graph_counted: dict[str, int] = {}  # the call graph's counts, as last counted
        self.activity = Activity(metrics, cfg.log_interval, cfg.allowed_lateness, role=cfg.role)
        # Lazy restore (``Restorer``): the services whose checkpoint was read, and those
        # waiting for theirs, with their batches held meanwhile, in order.
        self.restorer: Restorer | None = None
        self.ready: set[tuple] = set()
        self.pending: dict[tuple, list] = {}
        self._held = 0  # spans (or data points) held
        # services taken without their checkpoint (it could not be read by the stop): left
        # out of checkpoints, so that what they had learned is not written over
        self.unrestored: set[tuple] = set()
        self._stopping = threading.Event()

    def put(self, batch: Batch) -> None:
        """Called by the readers of receiver processes: waits while the queue is full (the
        receivers are told to refuse meanwhile, see ``has_room``)."""
        self.queue.put(batch)

    def offer(self, batch: Batch) -> None:
        """Called by receiver threads; raises Overloaded when the queue stays full."""
        try:
            self.queue.put(batch, timeout=0.05)
        except queue.Full:
            raise Overloaded(delay_s=OVERLOAD_RETRY_S) from None

    def has_room(self) -> bool:
        return not self.queue.full()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Process everything queued, close all open windows, hand results to the sink."""
        t0 = time.monotonic()
        self._stopping.set()
        try:
            # (bounded: a pipeline waiting for a full spool while Redis is away takes nothing)
            self.queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("the pipeline did not take the stop within %g s (waiting for Redis)", timeout)
            return
        self._thread.join(max(0.0, timeout - (time.monotonic() - t0)))

    def _run(self) -> None:
        engine, stats = self.engine, self.engine.windows.stats
        last_idle_check = last_arrival = time.monotonic()
        while True:
            if self.restorer is None:
                batches, stop = _take(self.queue)
            elif self._held > _HOLD_SPANS and not self._stopping.is_set():
                batches, stop = self._restored(block=True), False  # (for the checkpoints being read, not more spans)
            else:
                batches, stop = _take(self.queue)
                batches = self._restored() + self._hold(batches)
            if stop and self.pending:
                batches += self._restored(block=True, every=True)
            if batches:
                late, spans, overflow = stats["late"], stats["spans"], stats["overflow"]
                # (in arrival order: runs of span batches as one, metrics batches each on
                # their own, processor/receiver/metrics.py)
                for kind, run in itertools.groupby(batches, key=lambda b: isinstance(b, Batch)):
                    if kind:
                        self._emit(engine.ingest(Batch.concat(list(run))))
                    else:
                        for b in run:
                            self._ingest_metrics(b)
                # Locations first: a scrape that sees these spans processed sees their locations.
                self.metrics.active_keys.set(engine.windows.tables.held_locations)
                self.metrics.late.inc(stats["late"] - late)
                self.metrics.processed.inc(stats["spans"] - spans)
                self.metrics.overflow_spans.inc(stats["overflow"] - overflow)
                if engine.windows.graph is not None:
                    self.metrics.observe_graph(engine.windows.graph, self._graph_counted)
                self._count_refused_names()
                self._count_tiers()
            if stop:
                self._emit(engine.flush_all())
                self.checkpoint(force=True)
                return
            now = time.monotonic()
            if batches and batches[-1].received_at is not None:
                last_arrival = batches[-1].received_at
            if now - last_idle_check >= 1.0:
                last_idle_check = now
                # With a backlog, "now" is when the newest batch taken arrived: the batches
                # still queued arrived later, so a service that sent some is not idle.
                self._emit(engine.flush_idle(now if self.queue.empty() else last_arrival))
                self._count_tiers()
                self._forget(now if self.queue.empty() else last_arrival)
                self.activity.tick(now)
            if self.sink.take_wiped():
                self.republish()
            self.checkpoint()
            self.metrics.queue.set(self.queue.qsize())
            self.metrics.open_windows.set(engine.windows.open_windows())
            self.metrics.redis_pending.set(self.sink.pending())
            if self.sink.spool is not None:
                self.metrics.redis_spool_bytes.set(self.sink.spool.size)
            self.metrics.redis_up.set(1 if self.sink.reachable else 0)
            self.on_tick()

    def _hold(self, batches: list) -> list:
        """``batches`` less the spans and data points of services whose checkpoint was not
        read yet: held in ``pending`` (its reading asked for on a service's first sight)."""
        out = []
        for b in batches:
            spans = isinstance(b, Batch)
            if not spans and not self.engine.new_request(b):  # (once, before its parts are held apart)
                continue
            named = [(x.environment, x.service) for x in b.locations] if spans else \
                [(p.location.environment, p.location.service) for p in b.points]
            waiting = set(named).union(() if spans else (m.service for m in b.watermarks)) - self.ready
            if not waiting:
                out.append(b)
                continue
            for service in waiting:
                if service not in self.pending:
                    self.pending[service] = []
                    self.restorer.request(service)
            if spans:
                index = {s: i for i, s in enumerate(sorted(waiting))}
                of_row = np.array([index.get(n, -1) for n in named], np.int64)[b.loc]
                parts = {s: b.take(np.flatnonzero(of_row == i)) for s, i in index.items()}
                rest = np.flatnonzero(of_row < 0)
                if len(rest):
                    out.append(b.take(rest))
            else:
                parts = {s: dataclasses.replace(b, points=[p for p, n in zip(b.points, named) if n == s],
                                                watermarks=[m for m in b.watermarks if m.service == s],
                                                reasons=Counter()) for s in waiting}
                out.append(dataclasses.replace(b, points=[p for p, n in zip(b.points, named) if n not in waiting],
                                               watermarks=[m for m in b.watermarks if m.service not in waiting]))
            for service, part in parts.items():
                if len(part):
                    self.pending[service].append(part)
                    self._held += len(part)
        return out

    def _restored(self, block: bool = False, every: bool = False) -> list:
        """Restore the services whose checkpoint fields came; their batches held meanwhile,
        in order. ``block``: wait for one; ``every``: for all asked (shutdown, bounded)."""
        out = []
        deadline = time.monotonic() + 10.0
        while True:
            try:
                if block or (every and self.pending):
                    service, fields = self.restorer.results.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    service, fields = self.restorer.results.get_nowait()
            except queue.Empty:
                if every and self.pending:  # (Redis away at shutdown: the spans go on unrestored)
                    log.warning("the checkpoints of %d services could not be read before the stop; their "
                                "spans are taken without them", len(self.pending))
                    for held in self.pending.values():
                        out += held
                    self.ready.update(self.pending)
                    self.unrestored.update(self.pending)
                    self.pending.clear()
                    self._held = 0
                return out
            block = False
            result = checkpoint.restore(self.engine, fields, only=service)
            self.metrics.restored.inc(result.locations)
            for reason, n in result.rejected.items():
                self.metrics.checkpoint_rejected.labels(reason).inc(n)
            if result.locations:
                log.debug("restored %d code locations of %s", result.locations, service[1])
            self.ready.add(service)
            held = self.pending.pop(service, [])
            self._held -= sum(len(b) for b in held)
            out += held

    def _ingest_metrics(self, batch) -> None:
        self._emit(_taken(batch, self.engine.ingest_metrics, self.metrics))

    def _count_tiers(self) -> None:
        """The aggregate replicas known and dropped, and their figures refused."""
        replicas, stats = self.engine.replicas, self.engine.windows.stats
        self.metrics.tier_replicas.set(replicas.known)
        refused = self.metrics.refused_points
        for name, now, inc in (("dropped", replicas.dropped, self.metrics.tier_dropped.inc),
                               ("refused", stats["tier_refused"],
                                refused.labels(transport="pipeline", reason="window_length").inc),
                               ("duplicates", stats["tier_duplicates"],
                                refused.labels(transport="pipeline", reason="duplicate_request").inc)):
            before = self._refused.get(name, 0)
            if now > before:
                inc(now - before)
                self._refused[name] = now
                if name == "refused" and before == 0:
                    log.warning("an aggregate replica's window length is not this process's window (%g s): "
                                "its figures are refused; give both tiers the same --window", self.cfg.window)

    def _forget(self, now: float) -> None:
        """Forget what has been idle too long (``Engine.forget_idle``), its series on
        /metrics too, and count it."""
        f = self.engine.forget_idle(now)
        self.ready.difference_update(f.services)  # (its checkpoint field went: nothing to read if it comes back)
        if f.versions or f.locations or f.services:
            self.metrics.forget(f)
            self.metrics.active_keys.set(self.engine.windows.tables.held_locations)
            log.info("forgot %d code locations, %d services and %d versions idle for their "
                     "--location-idle-timeout / --version-idle-timeout", len(f.locations),
                     len(f.services), len(f.versions))

    def _count_refused_names(self) -> None:
        t = self.engine.windows.tables
        for kind, now, setting in (("service", t.refused_services, "max_services"),
                                   ("version", t.refused_versions, "max_versions(_per_service)")):
            before = self._refused.get(kind, 0)
            if now > before:
                self.metrics.overflow_names.labels(kind).inc(now - before)
                self._refused[kind] = now
                if before == 0:  # once: the metric counts the rest
                    log.warning("more %s names than %s: the spans of further ones are folded into "
                                "__overflow__ (backflow_overflow_names_total{kind=\"%s\"})", kind, setting, kind)

    def republish(self) -> None:
        """Redis came back without its data: hand every baseline (and with it the key set)
        and every rollout's verdict to the sink again, and mark every location for the next
        checkpoint."""
        engine = self.engine
        stage = engine.baselines
        baselines = [(b.location.key, b) for b in map(stage.baseline, range(len(stage.sketches))) if b is not None]
        verdicts = engine.rollouts.states() if engine.rollouts is not None else []
        self.sink.submit([], baselines, verdicts=verdicts)
        engine.dirty_services.update(engine.service_locations)
        for ids in engine.service_locations.values():
            engine.dirty_locations.update(ids)
        self._checkpoint_rest = True  # due now, not at the next interval
        self.metrics.redis_republished.inc()
        log.warning("published %d baselines again and marked %d locations for the checkpoint",
                    len(baselines), len(engine.dirty_locations))

    def checkpoint(self, force: bool = False) -> None:
        """Hand what changed since the last checkpoint to the sink, when it is due: every
        ``checkpoint_interval`` seconds, or whenever windows closed when that is 0. While
        the sink cannot write (Redis away, or the previous checkpoint still pending) nothing
        is encoded: the changes stay marked, and the next checkpoint takes them all."""
        engine = self.engine
        if not (engine.dirty_locations or engine.dirty_services or engine.forgotten_fields):
            return
        now = time.monotonic()
        if not force:
            due = self._checkpoint_rest or now - self._last_checkpoint >= self.cfg.checkpoint_interval
            # (with a spool, a checkpoint taken while Redis is away waits on disk behind the
            # writes of the same windows)
            if not due or not (self.sink.reachable or self.sink.spool is not None) or self.sink.state_pending():
                return
        self._last_checkpoint = now
        for service in self.unrestored:  # (their checkpoint in Redis stays as it was)
            engine.dirty_services.discard(service)
            engine.dirty_locations.difference_update(engine.service_locations.get(service, ()))
        # (a part at a time: the next loop takes the rest once the sink wrote this part)
        fields = checkpoint.dumps_dirty(engine, limit=None if force else _CHECKPOINT_PART)
        self._checkpoint_rest = bool(engine.dirty_locations)
        self.sink.submit_state(fields)
        self.metrics.checkpointed.inc(len(fields))

    def _emit(self, results: list[WindowResult]) -> None:
        now = time.monotonic()
        for r in results:
            self.metrics.observe_window(r.window)
            if r.edges:
                self.metrics.locations.observe_edges(r.edges)
            if r.verdicts:
                self.metrics.observe_verdicts(r.verdicts)
            self.sink.submit(r.events, [(b.location.key, b) for b in r.baselines], r.window, r.edges, r.verdicts)
            if r.detection_started:
                self.activity.detection_started(r.window.environment, r.window.service,
                                                self.cfg.detectors.warmup_windows)
            for e in r.events:
                self.activity.event(e, now)
            self._closed_since_trim += len(r.window.locations)
        # Counted across steps: many small closes fragment the heap as much as one big one
        # (the soak's RSS crept up by free heap while live memory stayed flat).
        if self._closed_since_trim >= _TRIM_AFTER_LOCATIONS:
            self._closed_since_trim = 0
            release_free_memory()


class AggregatePipeline:
    """An aggregate replica's pipeline (``--role aggregate``, processor/pipeline/tiers.py): the
    window stage on a thread of its own, its closed windows sent on as partials with the
    replica's watermarks, by a ``Forwarder``; no detectors, no Redis."""

    FULL_REPORT_S = 5.0  # every service's watermark again (a detect replica restarted learns them)

    def __init__(self, cfg: Config, forwarders: dict[str, Forwarder], metrics: Metrics):
        self.cfg = cfg
        self.forwarders = forwarders  # detect replica's address -> its Forwarder
        self.ring = HashRing(list(forwarders))
        self.metrics = metrics
        self.windows = WindowStage(cfg.window_ns, cfg.lateness_ns, cfg.idle_timeout, cfg.exemplars,
                                   max_locations=cfg.max_locations, max_services=cfg.max_services,
                                   max_versions=cfg.max_versions, max_versions_per_service=cfg.max_versions_per_service,
                                   version_idle_timeout=cfg.version_idle_timeout,
                                   location_idle_timeout=cfg.location_idle_timeout)
        self.windows.partial = True
        self.deltas = Deltas()
        self.replica = cfg.replica_name
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_batches)
        self._thread = threading.Thread(target=self._run, name="aggregate", daemon=True)
        self._reported: dict[tuple, tuple[int, int]] = {}  # service -> (watermark, open) as last sent
        self._full_at = 0.0
        self._stopping = threading.Event()  # (set by stop: Pipeline's)
        self.on_tick = lambda: None
        self.activity = Activity(metrics, cfg.log_interval, cfg.allowed_lateness, role="aggregate")

    put, offer, start, stop = Pipeline.put, Pipeline.offer, Pipeline.start, Pipeline.stop

    def has_room(self) -> bool:
        return not self.queue.full() and all(f.has_room() for f in self.forwarders.values())

    def _run(self) -> None:
        stats = self.windows.stats
        last_idle_check = time.monotonic()
        while True:
            batches, stop = _take(self.queue)
            closed = []
            late, spans, overflow = stats["late"], stats["spans"], stats["overflow"]
            for kind, run in itertools.groupby(batches, key=lambda b: isinstance(b, Batch)):
                if kind:
                    closed += self.windows.ingest(Batch.concat(list(run)))
                else:
                    for b in run:
                        closed += _taken(b, lambda b: self.windows.ingest_counts(
                            to_counts(b, self.deltas, self.windows.window_ns)), self.metrics)
            self.metrics.late.inc(stats["late"] - late)
            self.metrics.processed.inc(stats["spans"] - spans)
            self.metrics.overflow_spans.inc(stats["overflow"] - overflow)
            now = time.monotonic()
            if stop:
                self._send(self.windows.flush_all(), full=True)
                return
            if now - last_idle_check >= 1.0:
                last_idle_check = now
                closed += self.windows.flush_idle(now)
                self.windows.forget_idle(now)
            full = now - self._full_at >= self.FULL_REPORT_S
            if full:
                self._full_at = now
            self._send(closed, full)
            self.metrics.active_keys.set(self.windows.tables.held_locations)
            self.metrics.queue.set(self.queue.qsize())
            self.metrics.open_windows.set(self.windows.open_windows())
            self.metrics.forward_pending.set(sum(f.pending() for f in self.forwarders.values()))
            self.metrics.forward_up.set(1 if all(f.reachable for f in self.forwarders.values()) else 0)
            self.activity.tick(now)
            self.on_tick()

    def _send(self, closed: list, full: bool) -> None:
        """The closed windows as partials, then the watermarks that changed (all: ``full``),
        each service's to its detect replica."""
        t = self.windows.tables
        target = self.ring.backend_for
        windows: dict[str, list] = {}
        marks: dict[str, dict] = {}
        for cw in closed:
            windows.setdefault(target(cw.service), []).append(cw)
        if full:  # (services forgotten since leave it)
            self._reported = {}
        for s, clock in self.windows.services.items():
            name = t.services[s]
            mark = (clock.closed_through, len(clock.windows))
            if name is not None and (full or self._reported.get(name) != mark):
                marks.setdefault(target(name[1]), {})[name] = self._reported[name] = mark
        self.metrics.windows.inc(len(closed))
        for address, forwarder in self.forwarders.items():
            # (a full report announces the replica to every detect replica, even holding nothing)
            if address in windows or address in marks or full:
                forwarder.submit(partials(windows.get(address, []), marks.get(address, {}), self.replica,
                                          self.windows.window_ns))


_CHECKPOINT_PART = 5_000  # locations encoded per checkpoint step

# Closing windows of this many locations frees enough to be worth returning to the system.
_TRIM_AFTER_LOCATIONS = 20_000


def _orphan_spools(directory: str | None, ours: set[str]) -> None:
    """Spools of detect replicas no longer forwarded to (``--forward`` changed) are named at
    start: their partials belong to services now routed elsewhere, so they are not sent."""
    if directory is None or not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if name.startswith("forward-") and name.endswith(".log") and name not in ours \
                and os.path.getsize(os.path.join(directory, name)):
            log.warning("the spool %s holds partials for a detect replica not in forward; not sent (remove it "
                        "once done with it, or forward to that replica again)", os.path.join(directory, name))


class Backflow:
    """The whole process: ``start()``, then ``stop()`` on SIGTERM."""

    def __init__(self, cfg: Config, metrics: Metrics | None = None):
        self.cfg = cfg
        if metrics is None:
            metrics = Metrics(max_locations=cfg.metrics_max_locations)
            metrics.for_role(cfg.role)
        self.metrics = metrics
        self.pipeline: Pipeline | AggregatePipeline | None = None
        self.receivers_here: list = []  # OTLP/gRPC and OTLP/HTTP, when they run in this process
        self.receivers: ReceiverPool | None = None
        self.http = None
        self._listening = False
        self.forwarders: dict[str, Forwarder] = {}
        self.sink: RedisSink | None = None
        self.restorer: Restorer | None = None
        if cfg.role == "aggregate":  # (no Redis: the detect replicas keep the state)
            credentials = channel_credentials(cfg.forward_tls_ca, cfg.forward_tls_cert, cfg.forward_tls_key)
            targets = list(dict.fromkeys(cfg.forward.split(",")))
            self.forwarders = {a: Forwarder(a, cfg.replica_name, on_sent=self.metrics.forward_points.labels("sent").inc,
                                            on_refused=self.metrics.forward_points.labels("refused").inc,
                                            credentials=credentials, token=cfg.forward_auth_token,
                                            token_file=cfg.forward_auth_token_file,
                                            spool=Spool(cfg.spool_dir, cfg.spool_max_bytes // len(targets),
                                                        spool_name(a)) if cfg.spool_dir else None)
                               for a in targets}
            _orphan_spools(cfg.spool_dir, {spool_name(a) for a in targets})
            return
        client = client_for(cfg.redis_url, **_REDIS_OPTIONS)
        self.sink = RedisSink(client, cfg.prefix, cfg.events_maxlen, cfg.redis_buffer,
                              on_event_written=lambda t: self.metrics.events.labels(type=t).inc(),
                              on_dropped=self.metrics.redis_dropped.inc,
                              on_waited=self.metrics.redis_waited.inc,
                              spool=Spool(cfg.spool_dir, cfg.spool_max_bytes) if cfg.spool_dir else None,
                              owners=Owners.from_file(cfg.codeowners).of if cfg.codeowners else None,
                              trend_period=cfg.trend_period, trend_points=cfg.trend_points,
                              wait_replicas=cfg.redis_wait_replicas)

    def health(self) -> tuple[bool, str]:
        """/healthz: serving or not, and why. A Redis outage after start is "degraded", not
        down: spans are still taken and writes buffered, and a liveness probe that restarted
        the process would lose that buffer."""
        if not self._listening:
            return False, "not ready: the receiver is not listening"
        if self.receivers and not self.receivers.alive():
            return False, "not ready: a receiver process is down"
        if self.forwarders:
            away = [f for f in self.forwarders.values() if not f.reachable]
            if not away:
                return True, "ok"
            return True, "degraded: " + "; ".join(
                f"the detect replica at {f.target} is not taking partials ({f.last_error}), {f.pending()} "
                f"requests wait" for f in away)
        if self.sink.reachable:
            return True, "ok"
        if not self.sink.ever_reached:
            return False, "not ready: Redis has not answered yet"
        spooled = f", {self.sink.spool.size} bytes in the spool" if self.sink.spool is not None else ""
        return True, (f"degraded: Redis unreachable; {self.sink.pending()} writes buffered{spooled}, "
                      f"{self.sink.dropped} events dropped")

    def start(self, stop: threading.Event | None = None) -> bool:
        """Serve /healthz, load the checkpoint, listen. Waits for Redis first: what was
        learned before is there, and spans processed without it would be judged against
        nothing (senders meanwhile get connection errors and retry). False when ``stop`` was
        set while waiting."""
        with listening("metrics", self.cfg.metrics):
            self.http = serve_http(self.cfg.metrics, self.metrics.registry, self.health)
        if self.forwarders:
            self.pipeline = AggregatePipeline(self.cfg, self.forwarders, self.metrics)
            self.pipeline.start()
            for f in self.forwarders.values():
                f.start()
            log.info("aggregate replica %s: partials of %g s windows go to the detect replica at %s",
                     self.pipeline.replica, self.cfg.window, self.cfg.forward)
            return self._listen()
        stop = stop or threading.Event()
        wait = 0.5
        if not self.sink.ping():
            # The reason tells a wrong password or certificate from a Redis not up yet.
            log.warning("Redis at %s is not answering (%s); waiting for it before listening",
                        redact_url(self.cfg.redis_url), self.sink.last_error)
        while not self.sink.ping():
            if stop.wait(wait):
                return False
            wait = min(wait * 2, 5.0)
        self._check_cluster()
        try:
            self.sink.replay_spool()  # what an earlier run could not write, before anything else
        except REDIS_ERRORS as e:
            log.warning("could not send the spool yet (%s); it goes first once Redis answers", e)
        known = self.sink.known_keys()
        self.pipeline = Pipeline(self.cfg, self.sink, self.metrics, known)
        # (each service's checkpoint is read when its first span comes: Restorer)
        self.restorer = self.pipeline.restorer = Restorer(self.sink)
        self.restorer.start()
        self.pipeline.start()
        self.sink.start()
        return self._listen()

    def _check_cluster(self) -> None:
        """Against Redis Cluster: a cluster client (if Redis did not answer when the client
        was made), and a prefix that is a hash tag, or ConfigError."""
        try:
            if not is_cluster(self.sink.r):
                return
        except REDIS_ERRORS as e:  # (INFO refused: a plain server that hides it)
            log.debug("INFO cluster: %s", e)
            return
        if not isinstance(self.sink.r, RedisCluster):
            try:
                self.sink.use(cluster_client(self.sink.r, self.cfg.redis_url, **_REDIS_OPTIONS))
            except REDIS_ERRORS as e:
                raise ConfigError(f"redis_url: {redact_url(self.cfg.redis_url)} is a Redis Cluster node, but its "
                                  f"cluster could not be read: {e}") from None
        if not hash_tagged(self.cfg.prefix):
            raise ConfigError(f"invalid setting prefix: {redact_url(self.cfg.redis_url)} is a Redis Cluster; the "
                              f"keys a write touches together must share a slot: give a prefix that is a hash tag, "
                              f"such as '{{{self.cfg.prefix}}}' (docs/operations.md)")
        log.info("Redis at %s is a cluster; every key is under the hash tag of %s", redact_url(self.cfg.redis_url),
                 self.cfg.prefix)

    def _listen(self) -> bool:
        """Start the receivers, in this process or in receiver processes."""
        if self.cfg.receiver_processes > 1:
            self.receivers = ReceiverPool(self.cfg, self.cfg.receiver_processes, self.pipeline.put,
                                          self.pipeline.has_room, self.metrics)
            self.pipeline.on_tick = self.receivers.update_backpressure
            self.receivers.start()
        else:
            for receiver in build_receivers(self.cfg, self.pipeline.offer, self.metrics, self.pipeline.has_room):
                self.receivers_here.append(receiver)  # (stopped by stop() if a later one cannot listen)
                with listening(receiver.setting, receiver.address):
                    receiver.start()
        self._listening = True
        return True

    def stop(self, deadline: float = 20.0) -> bool:
        """Stop accepting, drain the queue, close every window, checkpoint, write it all
        out, within about ``deadline`` seconds; False when writes were left undelivered."""
        t0 = time.monotonic()
        self._listening = False
        for receiver in self.receivers_here:
            receiver.stop(grace=min(5.0, deadline / 4))
        if self.receivers:
            self.receivers.stop()
        if self.pipeline:
            self.pipeline.stop(timeout=max(1.0, deadline - (time.monotonic() - t0)))
        drained = self.pipeline is None or not self.pipeline._thread.is_alive()
        if self.restorer:
            self.restorer.stop()
        left = max(0.5, deadline - (time.monotonic() - t0))
        if self.forwarders:
            for f in self.forwarders.values():  # (side by side: each sends what waits for it)
                f.stop(timeout=left, join=False)
            delivered = all([f.stop(timeout=left) for f in self.forwarders.values()]) and drained
            if not drained:
                log.error("the pipeline did not close its windows in time: their partials were not sent")
            if self.http:
                self.http.shutdown()
            return delivered
        delivered = self.sink.stop(timeout=left)
        if not delivered:
            log.error("exiting with %d Redis writes not delivered", self.sink.pending())
        if self.sink.spool is not None and self.sink.spool.size:
            log.warning("%d bytes of Redis writes wait in %s; the next start sends them first",
                        self.sink.spool.size, self.sink.spool.path)
        if self.http:
            self.http.shutdown()
        return delivered

