"""A generated scenario's OTLP requests split by service, and sent as independent SDKs
would send them: each service in order on a connection of its own, services side by side.
Shared by the tests that compare deployments (receiver processes, scaled-out instances)."""

from __future__ import annotations

import threading

import grpc
import numpy as np

from benchmarks.scenarios import OtlpEncoder, Scenario
from tests.otlp import batch_rows

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def requests_by_service(sc: Scenario) -> dict[str, list[bytes]]:
    """Each service's requests, in event-time order."""
    enc = OtlpEncoder(sc)
    out: dict[str, list[bytes]] = {}
    for c in range(sc.n_chunks):
        b = sc.chunk(c)
        svc = np.array([loc.service for loc in b.locations])[b.loc]
        for name in np.unique(svc).tolist():
            out.setdefault(name, []).extend(enc.encode(batch_rows(b, np.flatnonzero(svc == name))))
    return out


def send_lanes(target_of: dict[str, str], requests: dict[str, list[bytes]]) -> None:
    """Send each service's requests to ``target_of[service]``, one lane (thread and channel)
    per service, retrying UNAVAILABLE (a full pipeline) as an OTLP exporter does."""
    errors = []

    def lane(target, reqs):
        # A channel of its own (local subchannel pool): its own TCP connection, so the
        # kernel may hand it to any receiver process sharing the port.
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                    ("grpc.max_send_message_length", 64 << 20)]) as ch:
            export = ch.unary_unary(EXPORT)
            try:
                for r in reqs:
                    while True:
                        try:
                            export(r, timeout=60)
                            break
                        except grpc.RpcError as e:
                            if e.code() != grpc.StatusCode.UNAVAILABLE:
                                raise
            except Exception as e:  # reported below
                errors.append(e)

    threads = [threading.Thread(target=lane, args=(target_of[svc], reqs)) for svc, reqs in requests.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
