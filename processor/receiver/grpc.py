"""OTLP/gRPC receiver: TraceService/Export plus grpc.health.v1.

The handler takes the raw request bytes (no generated deserializer, so each request is
parsed exactly once, by ``decode``), hands the batch to the pipeline and answers with OTLP
partial success for the spans it refused. When the pipeline is full it answers UNAVAILABLE
with a google.rpc.RetryInfo delay: the OTLP throttling rule, which exporters retry.

Security (both optional): TLS on the listening port (``server_credentials``, mutual TLS
with a client CA), and a bearer token that Export calls must send as ``authorization``
metadata, checked before anything of the request is looked at. The health service needs
no token: probes (Kubernetes' gRPC probe among them) send none.
"""

from __future__ import annotations

import hmac
import logging
import time
from concurrent import futures
from typing import Callable

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from processor.receiver.decode import (
    REASON_LABELS, Batch, MalformedRequest, count_spans, decode_request, end_limit,
)

log = logging.getLogger("backflow.grpc")

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
OVERLOAD_RETRY_S = 1.0  # RetryInfo delay sent with UNAVAILABLE when the pipeline is full


class Overloaded(Exception):
    """The pipeline cannot take the batch now; the sender should retry after ``delay_s``."""

    def __init__(self, delay_s: float):
        super().__init__(f"pipeline full, retry in {delay_s:g}s")
        self.delay_s = delay_s


def _unavailable(context: grpc.ServicerContext, delay_s: float) -> None:
    detail = error_details_pb2.RetryInfo(retry_delay=Duration(
        seconds=int(delay_s), nanos=int((delay_s % 1) * 1e9)))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="Backflow is overloaded, retry later")
    status.details.add().Pack(detail)
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(grpc.StatusCode.UNAVAILABLE, status.message)


def server_credentials(cert: str | None, key: str | None, client_ca: str | None = None):
    """gRPC server credentials from PEM files, or None for plaintext. With ``client_ca``
    clients must present a certificate it signed. (The files were checked in config.)"""
    if cert is None:
        return None

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_server_credentials(
        [(read(key), read(cert))], root_certificates=read(client_ca) if client_ca else None,
        require_client_auth=client_ca is not None)


def _bearer_tokens(context: grpc.ServicerContext):
    """The tokens of the call's ``authorization: Bearer ...`` metadata, as bytes."""
    for key, value in context.invocation_metadata():
        if key == "authorization":  # gRPC metadata keys arrive lower-cased
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                yield token.strip().encode("utf-8", "replace")


class GrpcReceiver:
    """``on_batch(batch)`` hands a decoded batch on; it raises ``Overloaded`` when full.

    ``credentials`` (from ``server_credentials``) makes the port TLS-only; with
    ``auth_token`` an Export call without that bearer token gets UNAUTHENTICATED. Spans
    ending more than ``max_clock_skew_ns`` ahead of this host's clock, or keeping a value
    longer than ``max_attribute_length`` characters, are refused (0: no such limit).
    """

    def __init__(self, address: str, max_request_bytes: int, on_batch: Callable[[Batch], None],
                 metrics, workers: int = 8, has_room: Callable[[], bool] = lambda: True,
                 reuse_port: bool = False, credentials: grpc.ServerCredentials | None = None,
                 auth_token: str | None = None, max_clock_skew_ns: int = 0, max_attribute_length: int = 0):
        self.address = address
        self.max_clock_skew_ns = max_clock_skew_ns
        self.max_attribute_length = max_attribute_length
        self.on_batch = on_batch
        self.has_room = has_room
        self.metrics = metrics
        self.credentials = credentials
        self._token = auth_token.encode() if auth_token else None
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-grpc"),
            options=[
                ("grpc.max_receive_message_length", max_request_bytes),
                # A second Backflow on the same port must fail, not share it; only the
                # receiver processes of one Backflow share it (see receiver/workers.py).
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ],
        )
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(self._export),  # raw bytes in and out
        })
        self.server.add_generic_rpc_handlers((handler,))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def start(self) -> None:
        if self.credentials is None:
            port = self.server.add_insecure_port(self.address)
        else:
            port = self.server.add_secure_port(self.address, self.credentials)
        if port == 0:
            raise OSError(f"cannot listen on {self.address}")
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("OTLP/gRPC listening on %s (%s, %s)", self.address,
                 "TLS" if self.credentials else "plaintext",
                 "bearer token required" if self._token else "no token required")

    def stop(self, grace: float) -> None:
        """Stop taking requests; requests in flight get ``grace`` seconds to finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()

    def _authenticated(self, context: grpc.ServicerContext) -> bool:
        # compare_digest: the time taken does not tell how much of a guess was right.
        return any(hmac.compare_digest(t, self._token) for t in _bearer_tokens(context))

    def _export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self._token is not None and not self._authenticated(context):
            # First of all: nothing of an unauthenticated request is read, not even its
            # span count, and it cannot make others' requests wait or be refused.
            self.metrics.refused_requests.labels(transport="grpc", reason="unauthenticated").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if not self.has_room():
            # Refuse before decoding: under overload, decoding what will be refused anyway
            # only takes the CPU the pipeline needs to catch up.
            self.metrics.refused.labels(transport="grpc", reason="overloaded").inc(count_spans(request))
            _unavailable(context, OVERLOAD_RETRY_S)
        received_at = time.monotonic()
        try:
            batch = decode_request(request, end_limit(self.max_clock_skew_ns), self.max_attribute_length)
        except MalformedRequest as e:
            self.metrics.refused_requests.labels(transport="grpc", reason="malformed").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        batch.received_at = received_at
        if len(batch):
            try:
                self.on_batch(batch)
            except Overloaded as e:
                # The whole request is refused and will be sent again: count all its spans
                # as overloaded (as the refusal before decoding does), none as invalid yet.
                self.metrics.refused.labels(transport="grpc", reason="overloaded").inc(
                    len(batch) + batch.rejected)
                _unavailable(context, e.delay_s)
            self.metrics.accepted.labels(transport="grpc").inc(len(batch))
        for why, n in batch.reasons.items():
            self.metrics.refused.labels(transport="grpc", reason=REASON_LABELS[why]).inc(n)
        resp = ExportTraceServiceResponse()
        if batch.rejected:
            resp.partial_success.rejected_spans = batch.rejected
            resp.partial_success.error_message = batch.error_message()
        return resp.SerializeToString()
