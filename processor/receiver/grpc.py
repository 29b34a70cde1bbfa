"""OTLP/gRPC receiver: TraceService/Export plus grpc.health.v1.

The handler takes the raw request bytes (no generated deserializer, so each request is
parsed exactly once, by ``decode``), gives them to the ``Intake`` it shares with OTLP/HTTP
(decode, hand the batch to the pipeline, count) and answers with OTLP partial success for
the spans refused. When the pipeline is full it answers UNAVAILABLE
with a google.rpc.RetryInfo delay: the OTLP throttling rule, which exporters retry.

Security (both optional): TLS on the listening port (``server_credentials``, mutual TLS
with a client CA), and a bearer token that Export calls must send as ``authorization``
metadata, checked before anything of the request is looked at. The health service needs
no token: probes (Kubernetes' gRPC probe among them) send none.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from processor.receiver.decode import MalformedRequest
from processor.receiver.intake import Intake, Overloaded, token_matches

log = logging.getLogger("backflow.grpc")

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"  # processor/receiver/metrics.py


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


class GrpcReceiver:
    """TraceService/Export into ``intake`` (see processor/receiver/intake.py).

    ``credentials`` (from ``server_credentials``) makes the port TLS-only; with
    ``auth_token`` an Export call without that bearer token gets UNAUTHENTICATED.
    """

    def __init__(self, address: str, max_request_bytes: int, intake: Intake, workers: int = 8,
                 reuse_port: bool = False, credentials: grpc.ServerCredentials | None = None,
                 auth_token: str | None = None):
        self.address = address
        self.intake = intake
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
        metrics = grpc.method_handlers_generic_handler(METRICS_SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(self._export_metrics),
        })
        self.server.add_generic_rpc_handlers((handler, metrics))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def start(self) -> None:
        try:
            if self.credentials is None:
                port = self.server.add_insecure_port(self.address)
            else:
                port = self.server.add_secure_port(self.address, self.credentials)
        except RuntimeError:  # (older grpcio returns 0 instead)
            port = 0
        if port == 0:
            raise OSError("gRPC could not bind it (in use, or not an address of this host)")
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

    def _export(self, request: bytes, context: grpc.ServicerContext, metrics: bool = False) -> bytes:
        if self._token is not None and not token_matches(
                # gRPC metadata keys arrive lower-cased
                (v for k, v in context.invocation_metadata() if k == "authorization"), self._token):
            # First of all: nothing of an unauthenticated request is read, not even its
            # span count, and it cannot make others' requests wait or be refused.
            self.intake.refuse_request("unauthenticated")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        try:
            return (self.intake.export_metrics(request) if metrics else self.intake.export(request)).SerializeToString()
        except MalformedRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Overloaded as e:
            _unavailable(context, e.delay_s)

    def _export_metrics(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._export(request, context, metrics=True)
