"""OTLP ExportTraceServiceRequest -> one columnar ``Batch``.

The only per-span work in Backflow happens here, so it reads just what keying and
aggregation need: the code.* attributes, timestamps, status, trace id and exception
events. Spans that cannot be used are refused with a reason and counted (OTLP partial
success); the rest of the request goes on.

Two decoders give the same ``Batch``: ``decode_message`` below (Python over protobuf's
upb messages, the reference) and the compiled ``_fastdecode`` (C, built by setup.py when
a compiler is there), which reads the wire format itself and accepts and refuses exactly
the bytes ``ParseFromString`` does. ``decode_request`` uses the compiled one when it was
built, unless ``BACKFLOW_PURE_PYTHON=1``, and also falls back to Python for a request in
which an attribute that is read holds a bytes, array or kvlist value (whose ``str()`` the C
code does not reproduce).

Both decoders take the same two limits, so that hostile input cannot reach what Backflow
keeps (see docs/hostile-input.md): ``max_end_ns``, the latest end time accepted (the
receiver passes its clock plus ``--max-clock-skew``: one sender's broken clock must not move
its service's watermark into the future), and ``max_attribute_length``, the most characters
of any value kept from a span (function, file, line, scope name, service, environment,
version, revision, exception type: they become Redis fields and Prometheus labels).
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from processor.pipeline.location import (
    RESOURCE_ATTRIBUTES, SPAN_ATTRIBUTES, SPAN_NAME_MARK, Location,
    client_error_on_server, file_of, function_of, line_of, normalize_query, resource_of,
)

log = logging.getLogger("backflow.decode")

STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR
_NO_PARENT = bytes(8)
_EMPTY: dict = {}
# Spans whose end lies beyond 2**62 ns (year 2116) are refused whatever the limits: the
# int64 columns stay exact.
MAX_END_NS = (1 << 62) - 1
# Why a span is refused, in the order the checks run; _fastdecode reports these by number.
REASONS = (
    "trace_id not 16 bytes or zero",
    "span_id not 8 bytes or zero",
    "missing start or end time",
    "end before start",
    "end time too far in the future",
    "attribute value too long",
)
# The ``reason`` label under which the receiver counts each of them.
REASON_LABELS = {
    **dict.fromkeys(REASONS[:4], "invalid_span"),
    REASONS[4]: "clock_skew",
    REASONS[5]: "attribute_too_long",
}
_FUTURE, _TOO_LONG = 4, 5


def end_limit(max_clock_skew_ns: int, now_ns: int | None = None) -> int:
    """The latest end time to accept: this host's clock plus the allowed skew; with no skew
    limit (0), ``MAX_END_NS``.

    >>> end_limit(0) == MAX_END_NS, end_limit(5, now_ns=100)
    (True, 105)
    """
    if not max_clock_skew_ns:
        return MAX_END_NS
    return min(MAX_END_NS, (time.time_ns() if now_ns is None else now_ns) + max_clock_skew_ns)


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
    # Parent links, for the call graph (None: a batch made without them, as in many tests)
    span_id: np.ndarray | None = None    # uint64, the span id's 8 bytes in native order
    parent_id: np.ndarray | None = None  # uint64, 0 for a root (or a parent id not 8 bytes)
    kind: np.ndarray | None = None       # uint8, SpanKind (0-5)

    def __len__(self) -> int:
        return len(self.end)

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        """One batch holding the given ones in order (the window stage's result does not
        depend on batching, so the pipeline takes queued batches together: fewer, larger
        numpy calls). Per-batch tables are concatenated; duplicates in them are harmless.

        >>> b = decode_request(b"")
        >>> len(Batch.concat([b, b]))
        0
        """
        if len(batches) == 1:
            return batches[0]
        locations, versions, exceptions = [], [], []
        loc, ver, offset = [], [], 0
        reasons: Counter = Counter()
        for b in batches:
            loc.append(b.loc + len(locations))
            ver.append(b.ver + len(versions))
            locations += b.locations
            versions += b.versions
            exceptions += [(r + offset, t) for r, t in b.exceptions]
            offset += len(b)
            reasons.update(b.reasons)
        arrivals = [b.received_at for b in batches if b.received_at is not None]
        links = all(b.span_id is not None for b in batches)
        return Batch(
            locations=locations, versions=versions,
            loc=np.concatenate(loc).astype(np.int32), ver=np.concatenate(ver).astype(np.int32),
            start=np.concatenate([b.start for b in batches]),
            end=np.concatenate([b.end for b in batches]),
            error=np.concatenate([b.error for b in batches]),
            trace_id=np.concatenate([b.trace_id for b in batches]),
            exceptions=exceptions, rejected=sum(b.rejected for b in batches), reasons=reasons,
            received_at=max(arrivals) if arrivals else None,
            span_id=np.concatenate([b.span_id for b in batches]) if links else None,
            parent_id=np.concatenate([b.parent_id for b in batches]) if links else None,
            kind=np.concatenate([b.kind for b in batches]) if links else None)

    def take(self, rows: np.ndarray) -> "Batch":
        """The spans at ``rows`` (ascending), exceptions renumbered."""
        pos = np.full(len(self), -1, np.int64)
        pos[rows] = np.arange(len(rows))
        links = self.span_id is not None
        return Batch(self.locations, self.versions, self.loc[rows], self.ver[rows], self.start[rows], self.end[rows],
                     self.error[rows], self.trace_id[rows],
                     [(int(pos[r]), t) for r, t in self.exceptions if pos[r] >= 0], received_at=self.received_at,
                     span_id=self.span_id[rows] if links else None,
                     parent_id=self.parent_id[rows] if links else None, kind=self.kind[rows] if links else None)

    def to_wire(self) -> bytes:
        """Bytes for another process (receiver workers -> pipeline); see ``from_wire``."""
        return pickle.dumps((
            [(x.environment, x.service, x.function, x.file, x.line, x.scope) for x in self.locations],
            self.versions, self.loc, self.ver, self.start, self.end, self.error, self.trace_id,
            self.exceptions, self.rejected, dict(self.reasons), self.received_at,
            self.span_id, self.parent_id, self.kind), protocol=5)

    @staticmethod
    def from_wire(data: bytes) -> "Batch":
        """The batch ``to_wire`` wrote, locations interned as the decoder does.

        >>> b = decode_request(b"")
        >>> len(Batch.from_wire(b.to_wire())) == len(b)
        True
        """
        locs, versions, loc, ver, start, end, error, tid, exc, rejected, reasons, at, *links = pickle.loads(data)
        return Batch([_location(t) for t in locs], versions, loc, ver, start, end, error, tid,
                     exc, rejected, Counter(reasons), at, *links)

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
    if _fastdecode is not None:
        try:
            return _fastdecode.count_spans(data)
        except ValueError:
            return 0
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(data)
    except DecodeError:
        return 0
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def decode_request(data: bytes, max_end_ns: int = MAX_END_NS, max_attribute_length: int = 0) -> Batch:
    """The request's spans as a ``Batch``; ``MalformedRequest`` when it does not parse.
    Spans ending after ``max_end_ns``, or keeping a value longer than ``max_attribute_length``
    characters (0: no limit), are refused with their reason."""
    if _fastdecode is not None:
        return decode_request_compiled(data, max_end_ns, max_attribute_length)
    return decode_request_python(data, max_end_ns, max_attribute_length)


def decode_request_python(data: bytes, max_end_ns: int = MAX_END_NS, max_attribute_length: int = 0) -> Batch:
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(data)
    except DecodeError as e:
        raise MalformedRequest(f"not an OTLP ExportTraceServiceRequest: {e}") from None
    return decode_message(req, max_end_ns, max_attribute_length)


def decode_request_compiled(data: bytes, max_end_ns: int = MAX_END_NS, max_attribute_length: int = 0) -> Batch:
    """``decode_request`` by ``_fastdecode``, or by Python for the requests it leaves to it."""
    batch = compiled_batch(data, max_end_ns, max_attribute_length)
    return batch if batch is not None else decode_request_python(data, max_end_ns, max_attribute_length)


# Location objects by their fields: a location recurs in request after request and a
# dataclass costs microseconds to build (they are frozen, so batches may share them).
_LOCATIONS: dict[tuple, Location] = {}
_LOCATIONS_MAX = 1 << 15


def _location(fields: tuple) -> Location:
    loc = _LOCATIONS.get(fields)
    if loc is None:
        if len(_LOCATIONS) >= _LOCATIONS_MAX:
            _LOCATIONS.clear()
        loc = _LOCATIONS[fields] = Location(*fields)
    return loc


def compiled_batch(data: bytes, max_end_ns: int = MAX_END_NS, max_attribute_length: int = 0) -> Batch | None:
    """The ``Batch`` from ``_fastdecode`` alone; None when it leaves the request to Python."""
    if _compiled is None:
        raise RuntimeError("processor.receiver._fastdecode is not built")
    try:
        out = _compiled.decode(data, max_end_ns, max_attribute_length)
    except ValueError as e:
        raise MalformedRequest(f"not an OTLP ExportTraceServiceRequest: {e}") from None
    if out is None:
        return None
    n, loc, ver, start, end, error, trace_id, span_id, parent_id, kind, locations, versions, exceptions, reasons = out
    return Batch(
        locations=locations,  # Location objects, cached by the compiled module
        versions=versions,
        loc=np.frombuffer(loc, dtype=np.int32),
        ver=np.frombuffer(ver, dtype=np.int32),
        start=np.frombuffer(start, dtype=np.int64),
        end=np.frombuffer(end, dtype=np.int64),
        error=np.frombuffer(error, dtype=bool),
        trace_id=np.frombuffer(trace_id, dtype=np.uint8).reshape(n, 16),
        exceptions=exceptions,
        rejected=sum(count for _, count in reasons),
        reasons=Counter({REASONS[i]: count for i, count in reasons}),
        span_id=np.frombuffer(span_id, dtype=np.uint64),
        parent_id=np.frombuffer(parent_id, dtype=np.uint64),
        kind=np.frombuffer(kind, dtype=np.uint8),
    )


def decode_message(req: ExportTraceServiceRequest, max_end_ns: int = MAX_END_NS,
                   max_attribute_length: int = 0) -> Batch:
    max_end_ns = min(max_end_ns, MAX_END_NS)
    limit = max_attribute_length or None  # None: no length limit

    def too_long(*values: str) -> bool:
        return limit is not None and any(len(v) > limit for v in values)

    locations: list[Location] = []
    loc_index: dict[tuple, int] = {}  # -1: a location refused for a value too long
    versions: list[tuple[str, str, str]] = []
    ver_index: dict[tuple, int] = {}
    loc_col: list[int] = []
    ver_col: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    errors: list[bool] = []
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    parent_ids: list[bytes] = []
    kinds: list[int] = []
    exceptions: list[tuple[int, str]] = []
    reasons: Counter = Counter()

    for res_i, rs in enumerate(req.resource_spans):
        rattrs = {kv.key: _scalar(kv.value) for kv in rs.resource.attributes
                  if kv.key in RESOURCE_ATTRIBUTES}
        res = resource_of(rattrs)
        vkey = (res.service, res.version, res.revision)
        if too_long(res.environment, *vkey):
            vi = -1  # every span of this resource is refused; its version is not kept either
        else:
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
                    reasons[REASONS[0]] += 1
                    continue
                sid = span.span_id
                if len(sid) != 8 or not any(sid):
                    reasons[REASONS[1]] += 1
                    continue
                if not st or not en:
                    reasons[REASONS[2]] += 1
                    continue
                if en < st:
                    reasons[REASONS[3]] += 1
                    continue
                if en > max_end_ns:
                    reasons[REASONS[_FUTURE]] += 1
                    continue
                if vi < 0:
                    reasons[REASONS[_TOO_LONG]] += 1
                    continue
                code = None
                for kv in span.attributes:
                    k = kv.key
                    if k in SPAN_ATTRIBUTES:
                        if code is None:
                            code = {}
                        code[k] = _scalar(kv.value)
                code = code or _EMPTY
                # Exception types before the location: a span refused for one of them must
                # not leave a location behind in the batch (the window stage keeps them all).
                span_exceptions = []
                if span.events:
                    for ev in span.events:
                        if ev.name == "exception":
                            etype = next((str(_scalar(a.value)) for a in ev.attributes
                                          if a.key == "exception.type"), "")
                            if etype:
                                span_exceptions.append(etype)
                if too_long(*span_exceptions):
                    reasons[REASONS[_TOO_LONG]] += 1
                    continue
                fn = function_of(code, res.attrs, span.name, span.kind)
                lkey = (res_i, fn)
                li = loc_index.get(lkey)
                if li is None:
                    loc = Location(
                        environment=res.environment, service=res.service, function=fn,
                        file=file_of(code, res.attrs), line=line_of(code, res.attrs),
                        # beside a code location only shown: dropped there when too long
                        scope=scope if fn.startswith(SPAN_NAME_MARK) or not too_long(scope) else "",
                    )
                    if too_long(loc.function, loc.file, loc.line, loc.scope):
                        li = loc_index[lkey] = -1
                    else:
                        li = loc_index[lkey] = len(locations)
                        locations.append(loc)
                if li < 0:
                    reasons[REASONS[_TOO_LONG]] += 1
                    continue
                exceptions += [(len(ends), etype) for etype in span_exceptions]
                loc_col.append(li)
                ver_col.append(vi)
                starts.append(st)
                ends.append(en)
                errors.append(span.status.code == STATUS_ERROR and not client_error_on_server(code, span.kind))
                trace_ids.append(tid)
                span_ids.append(sid)
                parent = span.parent_span_id
                parent_ids.append(parent if len(parent) == 8 else _NO_PARENT)
                kinds.append(span.kind if 0 <= span.kind <= 5 else 0)

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
        span_id=np.frombuffer(b"".join(span_ids), dtype=np.uint64),
        parent_id=np.frombuffer(b"".join(parent_ids), dtype=np.uint64),
        kind=np.array(kinds, dtype=np.uint8),
    )


# --- the compiled decoder ---------------------------------------------------------------

def descriptor_schema() -> dict:
    """{message: {field number: (type, repeated, message type)}} of the installed
    opentelemetry-proto, from ExportTraceServiceRequest down: what _fastdecode must match."""
    out: dict = {}
    todo = [ExportTraceServiceRequest.DESCRIPTOR]
    while todo:
        d = todo.pop()
        if d.full_name in out:
            continue
        fields = out[d.full_name] = {}
        for f in d.fields:
            repeated = (f.is_repeated if hasattr(f, "is_repeated")
                        else f.label == f.LABEL_REPEATED)
            fields[f.number] = (f.type, repeated, f.message_type.full_name if f.message_type else None)
            if f.message_type is not None:
                todo.append(f.message_type)
    return out


def _load_compiled():
    try:
        from processor.receiver import _fastdecode as mod
    except ImportError:
        return None
    if mod.schema() != descriptor_schema():
        log.warning("processor.receiver._fastdecode was built for another OTLP schema than the "
                    "installed opentelemetry-proto; decoding in Python")
        return None
    if (set(mod.SPAN_ATTRIBUTES) != SPAN_ATTRIBUTES
            or set(mod.RESOURCE_ATTRIBUTES) != RESOURCE_ATTRIBUTES):
        log.warning("processor.receiver._fastdecode reads other attributes than processor.pipeline.location "
                    "names; decoding in Python")
        return None
    mod.set_location_type(Location)  # it interns locations as _location does
    mod.set_query_normalizer(normalize_query)  # (one normalisation, in Python, cached there by text)
    return mod


# The compiled module when it is built and matches the installed schema (tests use it even
# when BACKFLOW_PURE_PYTHON is set); _fastdecode is what decode_request uses.
_compiled = _load_compiled()
_fastdecode = None if os.environ.get("BACKFLOW_PURE_PYTHON", "") not in ("", "0") else _compiled
COMPILED = _fastdecode is not None  # decode_request runs the compiled decoder
