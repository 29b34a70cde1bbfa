"""Small builders of OTLP requests for tests (raw protobuf, no SDK), of sub-batches, and of
broken requests (Hypothesis)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from processor.receiver.decode import Batch

_ids = itertools.count(1)


def kv(key: str, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


@dataclass
class S:
    """One span: end time and duration in ns, attributes, status, exception types."""
    end: int
    duration: int = 1_000_000
    function: str | None = "shop.f"
    service: str = "shop"
    version: str = "1.0"
    env: str = "prod"
    error: bool = False
    exceptions: tuple[str, ...] = ()
    attrs: dict = field(default_factory=dict)
    name: str = "op"


def request(spans: list[S]) -> ExportTraceServiceRequest:
    """One ResourceSpans per (service, version, env), in first-seen order; span order kept."""
    req = ExportTraceServiceRequest()
    by_res = {}
    for s in spans:
        rk = (s.service, s.version, s.env)
        if rk not in by_res:
            rs = req.resource_spans.add()
            rs.resource.attributes.extend([kv("service.name", s.service),
                                           kv("service.version", s.version),
                                           kv("deployment.environment.name", s.env)])
            by_res[rk] = rs.scope_spans.add()
            by_res[rk].scope.name = "tests"
        sp = by_res[rk].spans.add()
        n = next(_ids)
        sp.trace_id = n.to_bytes(16, "big")
        sp.span_id = n.to_bytes(8, "big")
        sp.name = s.name
        sp.start_time_unix_nano = s.end - s.duration
        sp.end_time_unix_nano = s.end
        if s.function is not None:
            sp.attributes.append(kv("code.function.name", s.function))
        for k, v in s.attrs.items():
            sp.attributes.append(kv(k, v))
        if s.error:
            sp.status.code = 2
        for et in s.exceptions:
            ev = sp.events.add()
            ev.name = "exception"
            ev.attributes.append(kv("exception.type", et))
    return req


def encoded(spans: list[S]) -> bytes:
    return request(spans).SerializeToString()


def batch_rows(b: Batch, rows) -> Batch:
    """The spans of ``b`` at ``rows`` (in that order), exceptions renumbered."""
    pos = {int(r): i for i, r in enumerate(rows)}
    return Batch(b.locations, b.versions, b.loc[rows], b.ver[rows], b.start[rows], b.end[rows],
                 b.error[rows], b.trace_id[rows], [(pos[r], t) for r, t in b.exceptions if r in pos])


@st.composite
def mutated(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    """The bytes of a request drawn from ``valid`` (not empty) with one to three edits: a bit
    flipped, a byte set to one that matters to the wire format or to UTF-8, bytes inserted or
    deleted, or the end cut off."""
    raw = bytearray(draw(valid.filter(bool)))
    for _ in range(draw(st.integers(1, 3))):
        if not raw:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        i = draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            raw[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0xC0, 0xED, 0x0B, 0x0C, 0x04]))
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del raw[i]
        else:
            del raw[i:]
    return bytes(raw)
