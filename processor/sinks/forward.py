"""OTLP metrics out: an aggregate replica's partials to the detect replica, over gRPC.

Requests (``processor.pipeline.tiers.partials``, serialized) are sent one at a time, in the
order they were made, each until the detect replica takes it: a watermark must never reach
it before the windows it passes. While it is away they go to the spool on disk when there
is one (``spool_dir``, a file per detect replica), else wait in memory; past ``max_bytes``
in memory and the spool's size, ``has_room`` turns false and the replica's receivers tell
their senders to retry, so that nothing acknowledged is dropped. At exit, what was not
taken is written to the spool (memory's first, in order) and the next start sends it
first. A detect replica that answers UNAUTHENTICATED (a token changed on one side) is
retried the same way, with the token file read again. Each request is numbered
(``sequenced``): one sent again after its answer was lost, or after a restart, is taken
once. A request the detect replica refuses as malformed or too large would be refused
again: it is logged and counted, not retried.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import deque

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from processor.parsing import read_token
from processor.pipeline.tiers import sequenced
from processor.sinks.spool import Spool

log = logging.getLogger("backflow.forward")

_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
# retrying would not help (RESOURCE_EXHAUSTED: larger than the detect replica's max_request_bytes)
_FINAL = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED)
# (their details are not shown: a server in between might echo the header it got)
_AUTH = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None):
    """gRPC channel credentials trusting ``ca`` (with a client certificate for mutual TLS),
    or None for plaintext. (The files were checked in config.)"""
    if ca is None:
        return None

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def spool_name(target: str) -> str:
    """The spool file of the detect replica at ``target``.

    >>> spool_name("detect-0.backflow:4317"), spool_name("[::1]:4317")
    ('forward-detect-0.backflow_4317.log', 'forward-___1__4317.log')
    """
    return "forward-" + re.sub(r"[^A-Za-z0-9.\-]", "_", target) + ".log"


class Forwarder:
    """Sends serialized ExportMetricsServiceRequests to ``target`` (HOST:PORT) in order."""

    def __init__(self, target: str, replica: str, max_bytes: int = 256 << 20, timeout: float = 10.0,
                 on_sent=lambda points: None, on_refused=lambda n: None, credentials=None,
                 token: str | None = None, token_file: str | None = None, spool: Spool | None = None):
        self.target = target
        self.replica = replica
        self.session = random.getrandbits(62)  # (this run's requests: numbered from 0)
        self._number = 0
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.on_sent, self.on_refused = on_sent, on_refused
        # (gRPC's reconnect backoff grows to 2 minutes: a detect replica back after an outage
        # would wait that long for this replica, whose spool holds its partials)
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        self._channel = grpc.secure_channel(target, credentials, options) if credentials \
            else grpc.insecure_channel(target, options)
        self._token, self._token_file = token, token_file
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._export = self._channel.unary_unary(_EXPORT, request_serializer=None,
                                                 response_deserializer=ExportMetricsServiceResponse.FromString)
        # In order: memory, then the spool, then memory again (what came while the spool
        # could not be written). ``bytes`` counts memory's.
        self._queue: deque[tuple[bytes, int]] = deque()
        self._tail: deque[tuple[bytes, int]] = deque()
        self.spool = spool
        self._spool_at = spool.start if spool is not None else 0  # its first record not taken yet
        self._spooled = sum(1 for _ in spool.records(self._spool_at)) if spool is not None else 0
        if self._spooled:
            log.info("%d requests of partials for the detect replica at %s wait in %s from an earlier run; "
                     "sent first", self._spooled, target, spool.path)
        self._closed = False
        self._cond = threading.Condition()
        self.bytes = 0
        self.reachable = True
        self.last_error = ""
        self.sent = 0
        self._stopping = False
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="forward", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: list[tuple[bytes, int]]) -> None:
        """Requests with the data points each holds; never refused (see ``has_room``)."""
        with self._cond:
            for data, points in requests:
                self._place(sequenced(data, self.replica, self.session, self._number), points)
                self._number += 1
            self._cond.notify()

    def _place(self, data: bytes, points: int) -> None:
        if self._closed:  # (after stop(): behind what it kept, or lost)
            try:
                if self.spool is None:
                    raise OSError("no spool_dir")
                self.spool.append([data, points])
            except OSError as e:
                log.error("%d data points for the detect replica at %s came after the stop and are lost (%s)",
                          points, self.target, e)
            return
        # (to the spool while the detect replica is away too: what is on disk outlives a kill)
        if not self._tail and self.spool is not None and (self._spooled or self.bytes >= self.max_bytes
                                                          or not self.reachable):
            try:
                self.spool.append([data, points])
                self._spooled += 1
                return
            except OSError as e:
                log.error("cannot write the spool %s (%s); partials wait in memory and the receivers push "
                          "back", self.spool.path, e)
        (self._tail if self._tail or self._spooled else self._queue).append((data, points))
        self.bytes += len(data)

    def has_room(self) -> bool:
        if self.spool is None:
            return self.bytes < self.max_bytes
        return (self.bytes < self.max_bytes or not self._tail) and not self.spool.full

    def pending(self) -> int:
        return len(self._queue) + self._spooled + len(self._tail)

    def _next(self) -> tuple[bytes, int, int | None] | None:
        """The next request to send, with where the spool's next record starts when it came
        from the spool (None from memory); None once stopping with nothing left."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._queue:
                    return *self._queue[0], None
                if self._spooled:
                    got = self.spool.read_at(self._spool_at)
                    if got is not None:
                        (data, points), after = got
                        return data, points, after
                    log.error("%d requests of partials in the spool %s are lost", self._spooled, self.spool.path)
                    self._spooled, self._spool_at = 0, 0
                    self.spool.clear()
                    continue
                if self._tail:
                    self._queue, self._tail = self._tail, self._queue
                    continue
                if self._stopping:
                    return None
                self._cond.wait()

    def _run(self) -> None:
        wait, logged = 0.1, set()
        while True:
            item = self._next()
            if item is None:
                return
            data, points, after = item
            try:
                response = self._export(data, timeout=self.timeout, wait_for_ready=False, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if code in _FINAL:
                    log.error("the detect replica at %s refused %d data points (%s: %s); not sent again",
                              self.target, points, code.name, e.details())
                    self.on_refused(points)
                    self._done(data, after)
                    continue
                kind = code.name if code else type(e).__name__
                error = kind if code in _AUTH else f"{kind}: {e.details()}" if code else str(e)
                if code in _AUTH:
                    self._reread_token()
                if kind not in logged:  # (each kind once until the detect replica takes a request)
                    logged.add(kind)
                    log.warning("the detect replica at %s is not taking partials (%s); %d requests wait, "
                                "retrying", self.target, error, self.pending())
                self.reachable, self.last_error = False, error
                if self._stopping and time.monotonic() > self._deadline:
                    return
                time.sleep(wait)
                wait = min(wait * 2, 2.0)
                continue
            wait = 0.1
            logged.clear()
            if not self.reachable:
                log.info("the detect replica at %s takes partials again", self.target)
            self.reachable = True
            rejected = response.partial_success.rejected_data_points
            if rejected:
                log.warning("the detect replica refused %d of %d data points: %s", rejected, points,
                            response.partial_success.error_message)
                self.on_refused(rejected)
            self.on_sent(points - rejected)
            self._done(data, after)

    def _reread_token(self) -> None:
        """The token file again, so that a token rotated at the detect replica first
        (then in the file) is taken without a restart."""
        if self._token_file is None:
            return
        try:
            token = read_token(self._token_file)
        except (OSError, ValueError) as e:
            log.warning("cannot read forward_auth_token_file %r again: %s", self._token_file,
                        getattr(e, "strerror", None) or e)
            return
        if token != self._token:
            log.info("forward_auth_token_file holds a new token; sending with it")
            self._token, self._metadata = token, (("authorization", f"Bearer {token}"),)

    def _done(self, data: bytes, after: int | None) -> None:
        with self._cond:
            if self._closed:  # (stop() wrote what waited to the spool: a duplicate is taken once)
                return
            if after is None:
                self._queue.popleft()
                self.bytes -= len(data)
            else:
                self._spool_at, self._spooled = after, self._spooled - 1
                if self._spooled:
                    self.spool.mark(after)  # (a restart goes on from here)
                else:
                    self.spool.clear()
                    self._spool_at = 0
            self.sent += 1
            self._cond.notify_all()

    def stop(self, timeout: float, join: bool = True) -> bool:
        """Send what waits, within ``timeout`` seconds; True when everything was taken or
        kept in the spool (``join`` False: only tell the sending thread, for several
        forwarders side by side)."""
        if not self._stopping:
            # (with the detect replica away, the spool keeps what waits: no need to wait for it)
            away = self.spool is not None and not self.reachable
            self._deadline = time.monotonic() + (min(timeout, 1.0) if away else timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if not join:
            return True
        if self._thread.ident is not None:  # (started)
            self._thread.join(max(0.0, self._deadline - time.monotonic()))
        with self._cond:
            self._closed = True
            left = self.pending()
            kept = left and self.spool is not None and self._keep()
        if left and kept:
            log.warning("%d requests of partials not taken by the detect replica at %s wait in %s; the next "
                        "start sends them first", left, self.target, self.spool.path)
        elif left:
            log.error("exiting with %d requests of partials not taken by the detect replica at %s",
                      left, self.target)
        self._channel.close()
        return not left or kept

    def _keep(self) -> bool:
        """What waits, into the spool in its order: memory's, the spool's, memory's again
        (the spool rewritten only when memory's first part has some)."""
        try:
            if self._queue:
                self.spool.rewrite([[d, p] for d, p in self._queue], [[d, p] for d, p in self._tail])
            else:
                for d, p in self._tail:
                    self.spool.append([d, p])
            return True
        except OSError as e:
            log.error("cannot write the spool %s (%s)", self.spool.path, e)
            return False
