"""What every OTLP transport does with the bytes of an Export request.

gRPC and HTTP differ in how a request arrives and how the outcome is said (status codes,
headers, encodings); what happens between is one piece of code, here: refuse while the
pipeline is full (before decoding), decode with the receiver's limits, hand the batch on,
and count accepted spans, refused spans by reason and refused requests, under the
transport's label.
"""

from __future__ import annotations

import hmac
import time
from typing import Callable, Iterable

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from processor.receiver.decode import (
    REASON_LABELS, Batch, MalformedRequest, count_spans, decode_request, end_limit,
)
from processor.receiver.metrics import decode_metrics

OVERLOAD_RETRY_S = 1.0  # retry delay sent to senders while the pipeline is full


class Overloaded(Exception):
    """The pipeline cannot take the batch now; the sender should retry after ``delay_s``."""

    def __init__(self, delay_s: float):
        super().__init__(f"pipeline full, retry in {delay_s:g}s")
        self.delay_s = delay_s


def bearer_token(value: str) -> bytes | None:
    """The token of an ``authorization`` value ``Bearer <token>`` (scheme in any case).

    >>> bearer_token(" bearer abc "), bearer_token("Basic abc")
    (b'abc', None)
    """
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip().encode("utf-8", "replace")


def token_matches(values: Iterable[str], token: bytes) -> bool:
    """Whether one of the ``authorization`` values carries ``token``. compare_digest: the
    time taken does not tell how much of a guess was right."""
    return any(t is not None and hmac.compare_digest(t, token) for t in map(bearer_token, values))


class Intake:
    """Export requests of one transport (``"grpc"``, ``"http"``) into the pipeline.

    ``on_batch(batch)`` hands a decoded batch on and raises ``Overloaded`` when full;
    ``has_room()`` tells, before decoding, whether it would. Spans ending more than
    ``max_clock_skew_ns`` ahead of this host's clock, or keeping a value longer than
    ``max_attribute_length`` characters, are refused (0: no such limit).
    """

    def __init__(self, transport: str, on_batch: Callable[[Batch], None], metrics,
                 has_room: Callable[[], bool] = lambda: True, max_clock_skew_ns: int = 0,
                 max_attribute_length: int = 0):
        self.transport = transport
        self.on_batch = on_batch
        self.metrics = metrics
        self.has_room = has_room
        self.max_clock_skew_ns = max_clock_skew_ns
        self.max_attribute_length = max_attribute_length

    def refuse_request(self, reason: str) -> None:
        """Count a whole request refused (``malformed``, ``unauthenticated``, ...)."""
        self.metrics.refused_requests.labels(transport=self.transport, reason=reason).inc()

    def check_room(self, spans: Callable[[], int]) -> None:
        """Raise ``Overloaded`` when the pipeline is full, counting the request's ``spans()``
        as refused. Called before decoding: under overload, decoding what will be refused
        anyway only takes the CPU the pipeline needs to catch up."""
        if not self.has_room():
            self._refused("overloaded", spans())
            raise Overloaded(delay_s=OVERLOAD_RETRY_S)

    def export(self, request: bytes) -> ExportTraceServiceResponse:
        """Take a serialized ExportTraceServiceRequest; the response tells the spans refused
        (OTLP partial success). Raises ``Overloaded`` (every span of the request counted as
        overloaded: the sender will send them again) or ``MalformedRequest`` (counted)."""
        self.check_room(lambda: count_spans(request))
        received_at = time.monotonic()
        try:
            batch = decode_request(request, end_limit(self.max_clock_skew_ns), self.max_attribute_length)
        except MalformedRequest:
            self.refuse_request("malformed")
            raise
        batch.received_at = received_at
        if len(batch):
            try:
                self.on_batch(batch)
            except Overloaded:
                # The whole request is refused and will be sent again: count all its spans
                # as overloaded (as the refusal before decoding does), none as invalid yet.
                self._refused("overloaded", len(batch) + batch.rejected)
                raise
            self.metrics.accepted.labels(transport=self.transport).inc(len(batch))
        for why, n in batch.reasons.items():
            self._refused(REASON_LABELS[why], n)
        response = ExportTraceServiceResponse()
        if batch.rejected:
            response.partial_success.rejected_spans = batch.rejected
            response.partial_success.error_message = batch.error_message()
        return response

    def export_metrics(self, request: bytes) -> ExportMetricsServiceResponse:
        """Take a serialized ExportMetricsServiceRequest (processor/receiver/metrics.py);
        the response tells the data points refused. Raises ``Overloaded`` or
        ``MalformedRequest`` (counted) as ``export`` does."""
        if not self.has_room():
            raise Overloaded(delay_s=OVERLOAD_RETRY_S)
        received_at = time.monotonic()
        try:
            batch = decode_metrics(request, end_limit(self.max_clock_skew_ns), self.max_attribute_length)
        except MalformedRequest:
            self.refuse_request("malformed")
            raise
        batch.received_at = received_at
        if len(batch) or batch.replicas:  # (an aggregate replica's announcement holds no point)
            self.on_batch(batch)
            self.metrics.accepted_points.labels(transport=self.transport).inc(len(batch))
        for why, n in batch.reasons.items():
            self.metrics.refused_points.labels(transport=self.transport, reason=why).inc(n)
        response = ExportMetricsServiceResponse()
        if batch.rejected:
            response.partial_success.rejected_data_points = batch.rejected
            response.partial_success.error_message = "; ".join(f"{n} {why}" for why, n in batch.reasons.items())
        return response

    def _refused(self, reason: str, spans: int) -> None:
        self.metrics.refused.labels(transport=self.transport, reason=reason).inc(spans)
