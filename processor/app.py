"""Wiring: receiver -> queue -> window stage -> baselines and detectors -> sinks.

One direction of data flow. The receiver threads only decode and enqueue; one pipeline
thread owns the windows, baselines and detectors, so their state needs no locks and the
same spans in the same order always give the same output; the Redis sink writes on a
thread of its own.
"""

from __future__ import annotations

import ctypes
import logging
import marshal
import queue
import threading
import time
from array import array
from dataclasses import dataclass

import redis

from processor.baseline import Baseline, BaselineStage
from processor.config import Config
from processor.detect import Detector, Observation, build_detectors
from processor.detect.first_seen import FirstSeen
from processor.events import Event
from processor.receiver.decode import Batch
from processor.receiver.grpc import OVERLOAD_RETRY_S, GrpcReceiver, Overloaded
from processor.receiver.workers import ReceiverPool
from processor.sinks.prometheus import Metrics, serve_http
from processor.sinks.redis_streams import RedisSink
from processor.window import ClosedWindow, WindowStage, is_overflow

log = logging.getLogger("backflow")

_STOP = object()
_COALESCE_SPANS = 16_384  # most spans the pipeline takes off its queue in one step


class Engine:
    """Windows -> baselines -> detectors, with no threads and no I/O: batches in, results out.

    Deterministic: the same batches in the same order give the same results. The pipeline
    thread drives one; benchmarks and tests can drive one directly.
    """

    def __init__(self, cfg: Config, known_keys: set[str] | None = None, clock=time.monotonic):
        self.cfg = cfg
        self.windows = WindowStage(cfg.window_ns, cfg.lateness_ns, cfg.idle_timeout, cfg.exemplars,
                                   clock=clock, max_locations=cfg.max_locations)
        self.baselines = BaselineStage(cfg.window, cfg.baseline_half_life)
        self.first_seen = FirstSeen(known_keys)
        # Each location's detectors, frozen between windows (Detector.freeze): one bytes object
        # per location id (None for ids without detectors: overflow locations), thawed for
        # the windows of its service. Live detectors would be a few hundred small objects each.
        self.frozen: list[bytes | None] = []
        self._prototypes = build_detectors(cfg)  # thawed() templates: the configuration's detectors
        self._fresh = marshal.dumps(tuple(d.freeze() for d in self._prototypes))  # a new location's
        self.service_locations: dict[tuple, array] = {}       # (env, service) -> its location ids
        self.version_first_seen: dict[tuple, dict] = {}       # (env, service) -> version -> first window end

    def detectors_of(self, loc_id: int) -> list[Detector]:
        """A location's detectors as they stand (thawed copies: changing them changes nothing)."""
        data = self.frozen[loc_id] if loc_id < len(self.frozen) else None
        if data is None:
            return []
        sketch = self.baselines.sketches[loc_id]
        return [p.thawed(s, sketch) for p, s in zip(self._prototypes, marshal.loads(data))]

    def ingest(self, batch: Batch) -> list[WindowResult]:
        return self._evaluate(self.windows.ingest(batch))

    def flush_idle(self, now: float | None = None) -> list[WindowResult]:
        return self._evaluate(self.windows.flush_idle(now))

    def flush_all(self) -> list[WindowResult]:
        return self._evaluate(self.windows.flush_all())

    def _evaluate(self, closed: list[ClosedWindow]) -> list[WindowResult]:
        return [self._window(cw) for cw in closed]

    def _window(self, cw: ClosedWindow) -> WindowResult:
        """One closed window of a service: first_seen for its new locations, then every
        location of the service, in the order they were first seen: the present ones' baselines
        and detectors, the absent ones' detectors that want silence."""
        # The overflow location counts in its service's totals but has no baseline, no
        # detectors and no first_seen: it is many functions mixed, not one.
        tracked = [lw for lw in cw.locations if not is_overflow(lw.location)]
        window_ns = cw.end_ns - cw.start_ns
        by_version: dict = {}
        inflight = cw.busy_ns / window_ns
        calls = 0
        for lw in cw.locations:
            calls += lw.count
            for v in lw.versions:
                by_version[v.version] = by_version.get(v.version, 0) + v.count
        service = (cw.environment, cw.service)
        first_seen = self.version_first_seen.setdefault(service, {})
        for v in sorted(by_version):
            first_seen.setdefault(v, cw.end_ns)
        service_version = max(by_version, key=lambda v: (by_version[v], v)) if by_version else ("", "", "")
        known = self.service_locations.get(service)
        if known is None:
            known = self.service_locations[service] = array("q")
        frozen = self.frozen
        events: list[Event] = []
        present = {}  # location id -> its place in tracked
        for i, lw in enumerate(tracked):
            loc_id = lw.loc_id
            present[loc_id] = i
            if loc_id >= len(frozen):
                frozen.extend([None] * (loc_id + 1 - len(frozen)))
            if frozen[loc_id] is None:  # new to this process
                events += self.first_seen.update(cw, lw)
                frozen[loc_id] = self._fresh
                known.append(loc_id)
        baselines: list = [None] * len(tracked)
        locations = self.windows.tables.locations
        stage = self.baselines
        prototypes = self._prototypes
        calls_per_s = calls / (window_ns / 1e9)
        for loc_id in known:
            i = present.get(loc_id)
            lw = step = None
            if i is not None:
                lw = tracked[i]
                # The baseline first: the latency detector, while it keeps the same sketch,
                # takes the stage's result instead of computing it again (baseline_step).
                baselines[i], before, decay = stage.absorb(cw, lw)
                step = (before, decay, stage.sketches[loc_id])
            obs = Observation(locations[loc_id], cw.start_ns, cw.end_ns, lw, inflight,
                              service_version, first_seen, calls_per_s, step)
            # The baseline sketch the detectors froze with, and the one they freeze with now.
            after = stage.sketches[loc_id]
            before = after if step is None else step[0]
            states = list(marshal.loads(frozen[loc_id]))
            for j, proto in enumerate(prototypes):
                if lw is not None or proto.wants_absent:
                    det = proto.thawed(states[j], before)
                    events += det.update(obs)
                    states[j] = det.freeze(after)
            frozen[loc_id] = marshal.dumps(tuple(states))
        return WindowResult(cw, events, baselines)


@dataclass
class WindowResult:
    """What one closed window produced: its events and the baselines it changed."""
    window: ClosedWindow
    events: list[Event]
    baselines: list[Baseline]


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
        self.queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        engine, stats = self.engine, self.engine.windows.stats
        last_idle_check = last_arrival = time.monotonic()
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            stop = item is _STOP
            batches = [] if item is None or stop else [item]
            # Take what else is queued, up to _COALESCE_SPANS, as one batch: under load the
            # per-batch cost of the window stage is then paid once for many requests.
            n = sum(len(b) for b in batches)
            while batches and not stop and n < _COALESCE_SPANS:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                else:
                    batches.append(more)
                    n += len(more)
            if batches:
                late, spans, overflow = stats["late"], stats["spans"], stats["overflow"]
                self._emit(engine.ingest(Batch.concat(batches)))
                self.metrics.late.inc(stats["late"] - late)
                self.metrics.processed.inc(stats["spans"] - spans)
                self.metrics.overflow_spans.inc(stats["overflow"] - overflow)
            if stop:
                self._emit(engine.flush_all())
                return
            now = time.monotonic()
            if batches and batches[-1].received_at is not None:
                last_arrival = batches[-1].received_at
            if now - last_idle_check >= 1.0:
                last_idle_check = now
                # With a backlog, "now" is when the newest batch taken arrived: the batches
                # still queued arrived later, so a service that sent some is not idle.
                self._emit(engine.flush_idle(now if self.queue.empty() else last_arrival))
            self.metrics.queue.set(self.queue.qsize())
            self.metrics.open_windows.set(engine.windows.open_windows())
            self.metrics.active_keys.set(len(engine.windows.tables.locations))
            self.metrics.redis_pending.set(self.sink.pending())
            self.metrics.redis_up.set(1 if self.sink.reachable else 0)
            self.on_tick()

    def _emit(self, results: list[WindowResult]) -> None:
        locations = 0
        for r in results:
            self.metrics.observe_window(r.window)
            self.sink.submit(r.events, [(b.location.key, b) for b in r.baselines])
            locations += len(r.window.locations)
        if locations >= _TRIM_AFTER_LOCATIONS:
            _release_free_memory()


# Closing windows of many locations allocates and frees per-location figures by the
# hundred thousand; glibc keeps the freed heap unless asked, so RSS would stay at the peak.
_TRIM_AFTER_LOCATIONS = 20_000


def _release_free_memory() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (raises AttributeError where libc is not glibc)
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to ask
        return None


_LIBC = _load_glibc()


class Backflow:
    """The whole process: ``start()``, then ``stop()`` on SIGTERM."""

    def __init__(self, cfg: Config, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics(max_locations=cfg.metrics_max_locations)
        client = redis.Redis.from_url(cfg.redis_url, socket_timeout=5, socket_connect_timeout=5,
                                      health_check_interval=30)
        self.sink = RedisSink(client, cfg.prefix, cfg.events_maxlen, cfg.redis_buffer,
                              on_event_written=lambda t: self.metrics.events.labels(type=t).inc(),
                              on_dropped=self.metrics.redis_dropped.inc)
        self.pipeline: Pipeline | None = None
        self.receiver: GrpcReceiver | None = None
        self.receivers: ReceiverPool | None = None
        self.http = None
        self._listening = False

    def healthy(self) -> bool:
        receivers_up = self.receivers.alive() if self.receivers else True
        return self._listening and receivers_up and self.sink.reachable

    def start(self) -> None:
        self.http = serve_http(self.cfg.metrics, self.metrics.registry, self.healthy)
        if not self.sink.ping():
            log.warning("Redis at %s is not answering yet; writes are buffered until it does",
                        _redacted(self.cfg.redis_url))
        known = self.sink.known_keys() if self.sink.reachable else set()
        self.pipeline = Pipeline(self.cfg, self.sink, self.metrics, known)
        self.pipeline.start()
        self.sink.start()
        if self.cfg.receiver_processes > 1:
            self.receivers = ReceiverPool(self.cfg, self.cfg.receiver_processes, self.pipeline.put,
                                          self.pipeline.has_room, self.metrics)
            self.pipeline.on_tick = self.receivers.update_backpressure
            self.receivers.start()
        else:
            self.receiver = GrpcReceiver(self.cfg.otlp_grpc, self.cfg.max_request_bytes,
                                         self.pipeline.offer, self.metrics, has_room=self.pipeline.has_room)
            self.receiver.start()
        self._listening = True
        if self.cfg.otlp_http != "off":
            log.info("OTLP/HTTP (%s) is not served yet; send OTLP/gRPC to %s",
                     self.cfg.otlp_http, self.cfg.otlp_grpc)

    def stop(self, deadline: float = 20.0) -> None:
        """Stop accepting, drain the queue, close every window, write it all out."""
        t0 = time.monotonic()
        self._listening = False
        if self.receiver:
            self.receiver.stop(grace=min(5.0, deadline / 4))
        if self.receivers:
            self.receivers.stop()
        if self.pipeline:
            self.pipeline.stop(timeout=max(1.0, deadline - (time.monotonic() - t0)))
        left = max(0.5, deadline - (time.monotonic() - t0))
        if not self.sink.stop(timeout=left):
            log.error("exiting with %d Redis writes not delivered", self.sink.pending())
        if self.http:
            self.http.shutdown()


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    from urllib.parse import urlparse
    u = urlparse(url)
    if u.password:
        return url.replace(f":{u.password}@", ":***@")
    return url
