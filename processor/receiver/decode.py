"""OTLP ExportTraceServiceRequest -> one columnar ``Batch``.

The only per-span Python work in Backflow happens here, so it reads just what keying and
aggregation need: the code.* attributes, timestamps, status, trace id and exception
events. Spans that cannot be used are refused with a reason and counted (OTLP partial
success); the rest of the request goes on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from processor.location import (
    CODE_ATTRIBUTES, RESOURCE_ATTRIBUTES, SPAN_NAME_MARK, Location,
    file_of, function_of, line_of, resource_of,
)

STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR
_EMPTY: dict = {}
# Spans whose end lies beyond 2**62 ns (year 2116) are refused: the int64 columns stay exact.
_MAX_TIME_NS = 1 << 62


class MalformedRequest(ValueError):
    """The request bytes are not an ExportTraceServiceRequest."""


@dataclass
class Batch:
    """Spans of one request as columns; ``loc`` and ``ver`` index the per-batch tables."""
    locations: list[Location]
    versions: list[tuple[str, str, str]]  # (service, service.version, vcs.ref.head.revision)
    loc: np.ndarray        # int32, per span
    ver: np.ndarray        # int32, per span
    start: np.ndarray      # int64 ns
    end: np.ndarray        # int64 ns
    error: np.ndarray      # bool, status ERROR
    trace_id: np.ndarray   # uint8 (n, 16)
    exceptions: list[tuple[int, str]] = field(default_factory=list)  # (row, exception.type)
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    received_at: float | None = None  # processing time (monotonic) the receiver got it

    def __len__(self) -> int:
        return len(self.end)

    def error_message(self) -> str:
        """OTLP partial-success message: how many spans were refused and why."""
        if not self.rejected:
            return ""
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.reasons.items()))
        return f"{self.rejected} spans rejected: {parts}"


def _scalar(value):
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    return getattr(value, kind)


def count_spans(data: bytes) -> int:
    """Spans in a request, without reading them (to count what is refused unread)."""
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(data)
    except DecodeError:
        return 0
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def decode_request(data: bytes) -> Batch:
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(data)
    except DecodeError as e:
        raise MalformedRequest(f"not an OTLP ExportTraceServiceRequest: {e}") from None
    return decode_message(req)


def decode_message(req: ExportTraceServiceRequest) -> Batch:
    locations: list[Location] = []
    loc_index: dict[tuple, int] = {}
    versions: list[tuple[str, str, str]] = []
    ver_index: dict[tuple, int] = {}
    loc_col: list[int] = []
    ver_col: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    errors: list[bool] = []
    trace_ids: list[bytes] = []
    exceptions: list[tuple[int, str]] = []
    reasons: Counter = Counter()

    for res_i, rs in enumerate(req.resource_spans):
        rattrs = {kv.key: _scalar(kv.value) for kv in rs.resource.attributes
                  if kv.key in RESOURCE_ATTRIBUTES}
        res = resource_of(rattrs)
        vkey = (res.service, res.version, res.revision)
        vi = ver_index.get(vkey)
        if vi is None:
            vi = ver_index[vkey] = len(versions)
            versions.append(vkey)
        for ss in rs.scope_spans:
            scope = ss.scope.name
            for span in ss.spans:
                tid = span.trace_id
                st = span.start_time_unix_nano
                en = span.end_time_unix_nano
                if len(tid) != 16 or not any(tid):
                    reasons["trace_id not 16 bytes or zero"] += 1
                    continue
                sid = span.span_id
                if len(sid) != 8 or not any(sid):
                    reasons["span_id not 8 bytes or zero"] += 1
                    continue
                if not st or not en:
                    reasons["missing start or end time"] += 1
                    continue
                if en < st:
                    reasons["end before start"] += 1
                    continue
                if en >= _MAX_TIME_NS:
                    reasons["end time too far in the future"] += 1
                    continue
                code = None
                for kv in span.attributes:
                    k = kv.key
                    if k in CODE_ATTRIBUTES:
                        if code is None:
                            code = {}
                        code[k] = _scalar(kv.value)
                code = code or _EMPTY
                fn = function_of(code, res.attrs, span.name)
                lkey = (res_i, fn)
                li = loc_index.get(lkey)
                if li is None:
                    li = loc_index[lkey] = len(locations)
                    locations.append(Location(
                        environment=res.environment, service=res.service, function=fn,
                        file=file_of(code, res.attrs), line=line_of(code, res.attrs),
                        scope=scope if fn.startswith(SPAN_NAME_MARK) else "",
                    ))
                if span.events:
                    for ev in span.events:
                        if ev.name == "exception":
                            etype = next((str(_scalar(a.value)) for a in ev.attributes
                                          if a.key == "exception.type"), "")
                            if etype:
                                exceptions.append((len(ends), etype))
                loc_col.append(li)
                ver_col.append(vi)
                starts.append(st)
                ends.append(en)
                errors.append(span.status.code == STATUS_ERROR)
                trace_ids.append(tid)

    n = len(ends)
    return Batch(
        locations=locations,
        versions=versions,
        loc=np.array(loc_col, dtype=np.int32),
        ver=np.array(ver_col, dtype=np.int32),
        start=np.array(starts, dtype=np.int64),
        end=np.array(ends, dtype=np.int64),
        error=np.array(errors, dtype=bool),
        trace_id=np.frombuffer(b"".join(trace_ids), dtype=np.uint8).reshape(n, 16),
        exceptions=exceptions,
        rejected=sum(reasons.values()),
        reasons=reasons,
    )
