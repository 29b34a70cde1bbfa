"""Receivers: take OTLP requests, decode them into columnar batches, hand them over."""

from __future__ import annotations

from typing import Callable


def build_receivers(cfg, on_batch: Callable, metrics, has_room: Callable[[], bool],
                    reuse_port: bool = False) -> list:
    """The OTLP/gRPC receiver and, unless ``otlp_http`` is ``off``, the OTLP/HTTP one, with
    the settings' limits, TLS files and token; not started. The same in the main process and
    in every receiver process (``reuse_port``: they share the ports)."""
    from processor.receiver.grpc import GrpcReceiver, server_credentials
    from processor.receiver.http import HttpReceiver, tls_context
    from processor.receiver.intake import Intake

    def intake(transport: str) -> Intake:
        return Intake(transport, on_batch, metrics, has_room=has_room,
                      max_clock_skew_ns=cfg.max_clock_skew_ns, max_attribute_length=cfg.max_attribute_length)

    # TLS objects are built here, in the process that serves: they do not cross a process boundary.
    receivers = [GrpcReceiver(cfg.otlp_grpc, cfg.max_request_bytes, intake("grpc"), reuse_port=reuse_port,
                              credentials=server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca),
                              auth_token=cfg.auth_token)]
    if cfg.otlp_http != "off":
        receivers.append(HttpReceiver(cfg.otlp_http, cfg.max_request_bytes, intake("http"),
                                      reuse_port=reuse_port,
                                      tls=tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca),
                                      auth_token=cfg.auth_token))
    for receiver, setting in zip(receivers, ("otlp_grpc", "otlp_http")):
        receiver.setting = setting  # (named when it cannot listen)
    return receivers
