"""OTLP metrics out: an aggregate replica's partials to the detect replica, over gRPC.

Requests (``processor.pipeline.tiers.partials``, serialized) are sent one at a time, in the
order they were made, each until the detect replica takes it: a watermark must never reach
it before the windows it passes. While it is away they wait in memory; past ``max_bytes``,
``has_room`` turns false and the replica's receivers tell their senders to retry, so that
nothing acknowledged is dropped; a detect replica that answers UNAUTHENTICATED (a token
changed on one side) is retried the same way, with the token file read again. Each request
is numbered (``sequenced``): one sent again
after its answer was lost is taken once. A request the detect replica refuses as
malformed or too large would be refused again: it is logged and counted, not retried.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from processor.parsing import parse_token
from processor.pipeline.tiers import sequenced

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


class Forwarder:
    """Sends serialized ExportMetricsServiceRequests to ``target`` (HOST:PORT) in order."""

    def __init__(self, target: str, replica: str, max_bytes: int = 256 << 20, timeout: float = 10.0,
                 on_sent=lambda points: None, on_refused=lambda n: None, credentials=None,
                 token: str | None = None, token_file: str | None = None):
        self.target = target
        self.replica = replica
        self.session = random.getrandbits(62)  # (this run's requests: numbered from 0)
        self._number = 0
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.on_sent, self.on_refused = on_sent, on_refused
        options = [("grpc.max_send_message_length", 64 << 20)]
        self._channel = grpc.secure_channel(target, credentials, options) if credentials \
            else grpc.insecure_channel(target, options)
        self._token, self._token_file = token, token_file
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._export = self._channel.unary_unary(_EXPORT, request_serializer=None,
                                                 response_deserializer=ExportMetricsServiceResponse.FromString)
        self._queue: deque[tuple[bytes, int]] = deque()
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
                data = sequenced(data, self.replica, self.session, self._number)
                self._number += 1
                self._queue.append((data, points))
                self.bytes += len(data)
            self._cond.notify()

    def has_room(self) -> bool:
        return self.bytes < self.max_bytes

    def pending(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        wait, logged = 0.1, set()
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                data, points = self._queue[0]
            try:
                response = self._export(data, timeout=self.timeout, wait_for_ready=False, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if code in _FINAL:
                    log.error("the detect replica at %s refused %d data points (%s: %s); not sent again",
                              self.target, points, code.name, e.details())
                    self.on_refused(points)
                    self._done(data)
                    continue
                kind = code.name if code else type(e).__name__
                error = kind if code in _AUTH else f"{kind}: {e.details()}" if code else str(e)
                if code in _AUTH:
                    self._reread_token()
                if kind not in logged:  # (each kind once until the detect replica takes a request)
                    logged.add(kind)
                    log.warning("the detect replica at %s is not taking partials (%s); %d requests wait, "
                                "retrying", self.target, error, len(self._queue))
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
            self._done(data)

    def _reread_token(self) -> None:
        """The token file again, so that a token rotated at the detect replica first
        (then in the file) is taken without a restart."""
        if self._token_file is None:
            return
        try:
            with open(self._token_file, encoding="ascii", errors="replace") as f:
                token = parse_token(f.read())
        except (OSError, ValueError) as e:
            log.warning("cannot read forward_auth_token_file %r again: %s", self._token_file,
                        getattr(e, "strerror", None) or e)
            return
        if token != self._token:
            log.info("forward_auth_token_file holds a new token; sending with it")
            self._token, self._metadata = token, (("authorization", f"Bearer {token}"),)

    def _done(self, data: bytes) -> None:
        with self._cond:
            self._queue.popleft()
            self.bytes -= len(data)
            self.sent += 1
            self._cond.notify_all()

    def stop(self, timeout: float, join: bool = True) -> bool:
        """Send what waits, within ``timeout`` seconds; True when everything was taken
        (``join`` False: only tell the sending thread, for several forwarders side by side)."""
        if not self._stopping:
            self._deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if not join:
            return True
        if self._thread.ident is not None:  # (started)
            self._thread.join(max(0.0, self._deadline - time.monotonic()))
        left = len(self._queue)
        if left:
            log.error("exiting with %d requests of partials not taken by the detect replica at %s",
                      left, self.target)
        self._channel.close()
        return not left
