"""The compiled decoder (_fastdecode) against the Python one, which is the reference.

Both must give the same Batch for every request, and refuse exactly the bytes that
protobuf's ``ParseFromString`` refuses. Requests come from the test builders, from
Hypothesis (random resources, scopes, spans and attributes of every AnyValue kind), from
the OpenTelemetry SDK's own OTLP encoder, and from a "scrambling" encoder that writes the
same messages the way protobuf allows but SDKs rarely do: fields out of order, singular
fields repeated (the last wins, sub-messages merge), unknown fields and groups, known
fields with another wire type, over-long varints. Malformed input: random bytes,
truncations and mutations of valid requests, invalid UTF-8, nesting at upb's limit. Both
decoders also refuse alike under the receiver's limits (latest end time, longest value kept).
"""

from __future__ import annotations

import math
import os
import random
import struct
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from processor.pipeline.location import CODE_ATTRIBUTES, OPERATION_ATTRIBUTES, RESOURCE_ATTRIBUTES, SPAN_ATTRIBUTES
from processor.receiver import decode
from processor.receiver.decode import MalformedRequest
from tests.otlp import S, encoded, kv, mutated, request

# The decoder is optional (setup.py): without a compiler the package installs and decodes in
# Python, 30 times slower, and this module is skipped. BACKFLOW_REQUIRE_FASTDECODE=1 (.ci/run
# sets it) makes a decoder that did not build, or that decode.py refused, an error instead.
REQUIRE_COMPILED = os.environ.get("BACKFLOW_REQUIRE_FASTDECODE", "") not in ("", "0")
try:
    from processor.receiver import _fastdecode
except ImportError as e:
    if REQUIRE_COMPILED:
        raise ImportError(f"BACKFLOW_REQUIRE_FASTDECODE is set and the compiled decoder does not import "
                          f"({e}): see the compiler's output in `make install`") from e
    pytest.skip(f"the compiled decoder is not built ({e})", allow_module_level=True)
if REQUIRE_COMPILED and decode._compiled is None:
    raise ImportError("BACKFLOW_REQUIRE_FASTDECODE is set and processor.receiver.decode does not use the "
                      "compiled decoder (see its warning: built for another schema or other attributes)")

T = 1_700_000_000_000_000_000
# BACKFLOW_FUZZ_EXAMPLES=5000 for a longer search than the default run's
EXAMPLES = int(os.environ.get("BACKFLOW_FUZZ_EXAMPLES", "80"))
HYPO = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- comparing the two decoders ---------------------------------------------------------

def assert_same(a: decode.Batch, b: decode.Batch) -> None:
    assert a.locations == b.locations
    assert a.versions == b.versions
    for col in ("loc", "ver", "start", "end", "error", "trace_id", "span_id", "parent_id", "kind"):
        x, y = getattr(a, col), getattr(b, col)
        assert x.dtype == y.dtype and x.shape == y.shape, col
        assert np.array_equal(x, y), col
    assert a.exceptions == b.exceptions
    assert a.rejected == b.rejected
    assert list(a.reasons.items()) == list(b.reasons.items())
    assert a.error_message() == b.error_message()


def outcome(fn, data):
    try:
        return fn(data)
    except MalformedRequest:
        return MalformedRequest


def parses(data: bytes) -> bool:
    try:
        ExportTraceServiceRequest().ParseFromString(data)
        return True
    except DecodeError:
        return False


def check_same(data: bytes, *, compiled_alone: bool = False, **limits) -> decode.Batch | type:
    """Both decoders on data: the same Batch, or both MalformedRequest exactly when
    ParseFromString refuses the bytes. compiled_alone: the C code must not leave the
    request to Python. limits: max_end_ns and max_attribute_length, given to both."""
    ok = parses(data)
    py = outcome(partial(decode.decode_request_python, **limits), data)
    assert (py is not MalformedRequest) == ok
    fast = outcome(partial(decode.compiled_batch, **limits), data)
    if fast is None:
        assert not compiled_alone, "the compiled decoder left the request to Python"
        fast = outcome(partial(decode.decode_request_compiled, **limits), data)
    if py is MalformedRequest:
        assert fast is MalformedRequest
    else:
        assert fast is not MalformedRequest
        assert_same(fast, py)
    # the validator alone (count_spans) refuses the same bytes and counts the same spans
    try:
        n = _fastdecode.count_spans(data)
    except ValueError:
        n = None
    if ok:
        assert n == decode.count_spans(data) == _python_count_spans(data)
    else:
        assert n is None and decode.count_spans(data) == 0
    return py


def _python_count_spans(data: bytes) -> int:
    req = ExportTraceServiceRequest()
    req.ParseFromString(data)
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


# --- the test builders -----------------------------------------------------------------

BUILDER_CASES = {
    "plain": [S(T + 5, 5), S(T + 9, 3, function="g", error=True)],
    "many": [S(T + i, function=f"f{i % 7}") for i in range(1, 200)],
    "services": [S(T + 1, service="cart", version="2.0", env="staging"), S(T + 2), S(T + 3, service="cart")],
    "span name": [S(T + 1, function=None, name="GET /cart"), S(T + 2, function=None, name="")],
    "exceptions": [S(T + 1), S(T + 2, exceptions=("ValueError", "KeyError")), S(T + 3, exceptions=("",))],
    "old semconv": [S(T + 1, function=None, attrs={"code.namespace": "shop.cart", "code.function": "apply",
                                                   "code.filepath": "cart.py", "code.lineno": 12})],
    "new semconv": [S(T + 1, attrs={"code.file.path": "a.py", "code.line.number": 7, "http.route": "/x"})],
    "line as string": [S(T + 1, attrs={"code.line.number": "", "code.lineno": "33"})],
    "non-string values": [S(T + 1, function=None, attrs={"code.function": 5, "code.namespace": True,
                                                         "code.line.number": 1.5, "code.filepath": 0})],
    "zero duration": [S(T + 1, duration=0)],
    "bad times": [S(T + 1, duration=T + 1), S(T + 2, duration=-5), S(2 ** 62, duration=1), S(2 ** 62 - 1, duration=1)],
    "unicode": [S(T + 1, function="größe.ß", service="ütf", env="☃", name="名前")],
}


@pytest.mark.parametrize("case", sorted(BUILDER_CASES))
def test_builders_give_the_same_batch(case):
    check_same(encoded(BUILDER_CASES[case]), compiled_alone=True)


LIMITS = [{"max_attribute_length": n} for n in (1, 2, 4, 7, 12)] + [
    {"max_end_ns": T + 2}, {"max_end_ns": T, "max_attribute_length": 3}, {"max_end_ns": 2 ** 64 - 1}]


@pytest.mark.parametrize("limits", LIMITS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("case", sorted(BUILDER_CASES))
def test_builders_under_limits_give_the_same_batch(case, limits):
    check_same(encoded(BUILDER_CASES[case]), compiled_alone=True, **limits)


@pytest.mark.parametrize("breakage", [
    lambda sp: setattr(sp, "trace_id", b"\x01" * 8),
    lambda sp: setattr(sp, "trace_id", b"\x00" * 16),
    lambda sp: setattr(sp, "span_id", b"\x01" * 4),
    lambda sp: setattr(sp, "span_id", b"\x00" * 8),
    lambda sp: setattr(sp, "start_time_unix_nano", 0),
    lambda sp: setattr(sp, "end_time_unix_nano", 0),
    lambda sp: setattr(sp, "start_time_unix_nano", sp.end_time_unix_nano + 1),
    lambda sp: setattr(sp, "end_time_unix_nano", 2 ** 64 - 1),
])
def test_refused_spans_are_counted_alike(breakage):
    req = request([S(T + 10), S(T + 20), S(T + 30)])
    breakage(req.resource_spans[0].scope_spans[0].spans[1])
    b = check_same(req.SerializeToString(), compiled_alone=True)
    assert len(b) == 2 and b.rejected == 1


def test_empty_request():
    b = check_same(b"", compiled_alone=True)
    assert len(b) == 0 and b.trace_id.shape == (0, 16)
    fast = decode.compiled_batch(b"")
    assert fast.end.dtype == np.int64 and fast.error.dtype == bool


def test_resource_without_spans_still_adds_its_version():
    req = ExportTraceServiceRequest()
    req.resource_spans.add().resource.attributes.append(kv("service.name", "idle"))
    b = check_same(req.SerializeToString(), compiled_alone=True)
    assert b.versions == [("idle", "", "")]


# --- the limits: end time and value length ---------------------------------------------

TOO_LONG = decode.REASONS[5]


def _long_value_request(where: str, value) -> bytes:
    """Three spans of one resource; the second holds ``value`` at ``where``."""
    req = request([S(T + 1, function="ok.before"), S(T + 2, function="f"), S(T + 3, function="ok.after")])
    rs = req.resource_spans[0]
    sp = rs.scope_spans[0].spans[1]
    if where in ("service.name", "service.version", "vcs.ref.head.revision", "deployment.environment.name"):
        rs.resource.attributes.append(kv(where, value))  # a later key wins
    elif where == "exception.type":
        sp.events.add(name="exception").attributes.append(kv(where, value))
    elif where == "span name":
        del sp.attributes[:]
        sp.name = str(value)
    elif where == "scope name":
        del sp.attributes[:]
        rs.scope_spans[0].scope.name = str(value)
    elif where == "code.namespace":
        del sp.attributes[:]
        sp.attributes.extend([kv("code.namespace", value), kv("code.function", "g")])
    else:
        sp.attributes.append(kv(where, value))
    return req.SerializeToString()


LONG_PLACES = ["code.function.name", "code.namespace", "code.file.path", "code.filepath", "code.line.number",
               "span name", "scope name", "exception.type", "service.name", "service.version",
               "vcs.ref.head.revision", "deployment.environment.name"]


@pytest.mark.parametrize("where", LONG_PLACES)
def test_a_value_kept_longer_than_the_limit_refuses_its_span(where):
    limit = 12
    whole_resource = where in ("service.name", "service.version", "vcs.ref.head.revision",
                               "deployment.environment.name")
    # "span:" + the name, and "namespace" + ".g", count whole: leave room for them
    room = limit - {"span name": 5, "code.namespace": 2}.get(where, 0)
    for value, refused in [("x" * room, 0), ("ü" * room, 0), ("名" * room, 0), (12345, 0),
                           ("x" * (room + 1), 1), ("ü" * (room + 1), 1), ("x" * 3_000_000, 1)]:
        if where == "scope name" and not refused:
            continue  # scope names are kept only beside span-name locations; see below
        b = check_same(_long_value_request(where, value), compiled_alone=True, max_attribute_length=limit)
        if whole_resource and refused:
            assert (len(b), b.rejected, b.versions) == (0, 3, [])
        else:
            assert (len(b), b.rejected) == (3 - refused, refused), value
            assert [loc.function for loc in b.locations][::len(b.locations) - 1] == ["ok.before", "ok.after"]
        assert dict(b.reasons) == ({TOO_LONG: b.rejected} if refused else {})
        # without a limit every span is kept
        assert len(check_same(_long_value_request(where, value), compiled_alone=True)) == 3


def test_a_long_scope_name_refuses_span_name_locations_only():
    req = request([S(T + 1, function=None, name="GET /"), S(T + 2, function="f")])
    req.resource_spans[0].scope_spans[0].scope.name = "s" * 13
    b = check_same(req.SerializeToString(), compiled_alone=True, max_attribute_length=12)
    assert (len(b), b.rejected, [loc.function for loc in b.locations]) == (1, 1, ["f"])


def test_a_refused_span_leaves_no_location_version_or_exception_behind():
    req = request([S(T + 1, function="new.f", exceptions=("E", "x" * 20)),   # type too long
                   S(T + 2, function="g", exceptions=("F",)),
                   S(T + 3, function="h", attrs={"code.file.path": "p" * 20}),  # the location is refused ...
                   S(T + 4, function="h", attrs={"code.file.path": "short"}),   # ... for all its spans
                   S(T + 5, function="i", service="s" * 20)])
    b = check_same(req.SerializeToString(), compiled_alone=True, max_attribute_length=10)
    assert [loc.function for loc in b.locations] == ["g"]
    assert b.exceptions == [(0, "F")] and b.versions == [("shop", "1.0", "")] and b.rejected == 4


@pytest.mark.parametrize("max_end", [T + 2, T + 3, T - 1, 0, 2 ** 62 - 2, 2 ** 62, 2 ** 64 - 1])
def test_spans_ending_after_the_end_limit_are_refused(max_end):
    spans = [S(T + 1), S(T + 2), S(T + 3), S(2 ** 62 - 1), S(2 ** 62)]
    b = check_same(encoded(spans), compiled_alone=True, max_end_ns=max_end)
    kept = [s.end for s in spans if s.end <= min(max_end, decode.MAX_END_NS)]
    assert b.end.tolist() == kept
    assert dict(b.reasons) == ({decode.REASONS[4]: len(spans) - len(kept)} if len(kept) < len(spans) else {})


# --- values rendered like str() ------------------------------------------------------

@pytest.mark.parametrize("value", [
    "x", "", 0, 7, -3, 2 ** 63 - 1, -2 ** 63, True, False, 0.0, -0.0, 1.5, 1e16, 1e-7, 1e22,
    123456789.123, float("nan"), float("inf"), float("-inf"), "名前",
])
@pytest.mark.parametrize("key", sorted(CODE_ATTRIBUTES))
def test_attribute_values_render_like_python(key, value):
    spans = [S(T + 1, function=None, attrs={key: value}),
             S(T + 2, function="f", attrs={key: value}),
             S(T + 3, function=None, attrs={key: value, "code.namespace": "ns"}),
             S(T + 4, function=None, attrs={key: value, "code.function": "fn"})]
    check_same(encoded(spans), compiled_alone=True)
    # the same on the resource (the fallback of every span attribute)
    req = request([S(T + 5, function=None)])
    req.resource_spans[0].resource.attributes.append(kv(key, value))
    check_same(req.SerializeToString(), compiled_alone=True)


# One of each family's attributes set, so that every attribute can decide a key.
_OPERATIONS = [{"http.request.method": "GET", "http.route": "/r/{id}"}, {"http.method": "PUT", "url.template": "/t"},
               {"http.request.method": "GET", "server.address": "api"}, {"http.method": "GET", "net.peer.name": "h"},
               {"rpc.system": "grpc", "rpc.method": "Get"}, {"db.system": "redis", "db.operation": "GET"},
               {"rpc.system": "grpc", "rpc.service": "shop.Cart", "rpc.method": "Add"},
               {"db.system.name": "pg", "db.query.summary": "SELECT orders"},
               {"db.system": "mysql", "db.operation.name": "SELECT", "db.collection.name": "orders"},
               {"messaging.operation.name": "send", "messaging.destination.name": "q"},
               {"http.response.status_code": 404}, {"http.status_code": 404}, {}]


@pytest.mark.parametrize("value", ["", "v", 0, 404, 503, True, False, 0.0, 2.5, float("nan")])
@pytest.mark.parametrize("key", sorted(OPERATION_ATTRIBUTES))
def test_operation_attributes_key_and_render_like_python(key, value):
    spans = [S(T + 1 + i, function=None, error=True, attrs={**base, key: value}) for i, base in enumerate(_OPERATIONS)]
    req = request(spans * 6)
    for i, sp in enumerate(req.resource_spans[0].scope_spans[0].spans):
        sp.kind = i // len(spans)  # unspecified, internal, server, client, producer, consumer
    check_same(req.SerializeToString(), compiled_alone=True)


def test_a_query_named_by_its_text_is_normalised_and_keyed_alike():
    texts = ["SELECT * FROM t WHERE id = 1", "SELECT * FROM t WHERE id = 2", "select 1"]
    spans = [S(T + 1 + i, function="shop.repo.find", attrs={"db.system.name": "pg", key: text})
             for i, (key, text) in enumerate(zip(("db.query.text", "db.statement", "db.query.text"), texts))]

    def client(spans):  # database client spans (kind CLIENT): keyed by their query
        req = request(spans)
        for sp in req.resource_spans[0].scope_spans[0].spans:
            sp.kind = 3
        return req.SerializeToString()

    b = check_same(client(spans), compiled_alone=True)
    assert [b.locations[i].function for i in b.loc] == ["db:pg SELECT * FROM t WHERE id = ?"] * 2 + ["db:pg select ?"]
    # not a client span: its code attributes name it, as before
    assert check_same(request(spans[:1]).SerializeToString()).locations[0].function == "shop.repo.find"
    # with a summary, the compiled decoder keys it itself, before the code attributes
    spans[0].attrs["db.query.summary"] = "SELECT t"
    b = check_same(client(spans[:1]), compiled_alone=True)
    assert b.locations[0].function == "db:pg SELECT t"


@pytest.mark.parametrize("value", ["", "v", 0, 5, True, False, 0.0, 2.5, float("nan")])
@pytest.mark.parametrize("key", sorted(RESOURCE_ATTRIBUTES - CODE_ATTRIBUTES))
def test_resource_values_render_like_python(key, value):
    req = request([S(T + 1)])
    req.resource_spans[0].resource.attributes.append(kv(key, value))
    check_same(req.SerializeToString(), compiled_alone=True)


@pytest.mark.parametrize("value", ["", "E", 0, 3, True, False, 0.0, 1.25])
def test_exception_types_render_like_python(value):
    req = request([S(T + 1)])
    ev = req.resource_spans[0].scope_spans[0].spans[0].events.add(name="exception")
    ev.attributes.append(kv("exception.type", value))
    ev.attributes.append(kv("exception.type", "second"))  # the first one counts
    ev2 = req.resource_spans[0].scope_spans[0].spans[0].events.add(name="exception")
    ev2.attributes.add(key="exception.type")  # no value: str(None)
    check_same(req.SerializeToString(), compiled_alone=True)


def _any(kind, v=None) -> AnyValue:
    if kind == "bytes":
        return AnyValue(bytes_value=v if v is not None else b"\x00b")
    if kind == "array":
        return AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a")]))
    return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k", value=AnyValue(int_value=1))]))


@pytest.mark.parametrize("kind", ["bytes", "array", "kvlist"])
@pytest.mark.parametrize("key", sorted(SPAN_ATTRIBUTES | {"service.name", "exception.type"}))
def test_bytes_array_and_kvlist_values_are_left_to_python(key, kind):
    req = request([S(T + 1, function=None)])
    rs = req.resource_spans[0]
    sp = rs.scope_spans[0].spans[0]
    if key == "exception.type":
        sp.events.add(name="exception").attributes.add(key=key, value=_any(kind))
    elif key == "service.name":
        rs.resource.attributes.add(key=key, value=_any(kind))
    else:
        sp.attributes.add(key=key, value=_any(kind))
    data = req.SerializeToString()
    assert decode.compiled_batch(data) is None
    check_same(data)


def test_unsupported_values_elsewhere_stay_compiled():
    """bytes, arrays and kvlists in attributes that are not read, or overwritten by a
    later scalar of the same key, keep the request on the compiled path."""
    req = request([S(T + 1)])
    sp = req.resource_spans[0].scope_spans[0].spans[0]
    sp.attributes.add(key="http.headers", value=_any("kvlist"))
    sp.attributes.add(key="code.filepath", value=_any("array"))
    sp.attributes.append(kv("code.filepath", "later.py"))
    sp.events.add(name="other").attributes.add(key="exception.type", value=_any("bytes"))
    check_same(req.SerializeToString(), compiled_alone=True)


# --- Hypothesis: random requests ---------------------------------------------------------

READ_KEYS = sorted(RESOURCE_ATTRIBUTES)
OTHER_KEYS = ["http.target", "thread.id", "", "code", "code.function.name ", "Code.function",
              "exception.type", "service.namespace", "telemetry.sdk.name"]
TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
SCALARS = st.one_of(
    st.tuples(st.just("str"), st.one_of(TEXT, st.sampled_from(["", "0", "12", "span:x", "a.b"]))),
    st.tuples(st.just("int"), st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.integers(-2, 200))),
    st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("double"), st.floats(allow_nan=True, allow_infinity=True)),
    st.tuples(st.just("strindex"), st.integers(-2 ** 31, 2 ** 31 - 1)),
    st.tuples(st.just("unset"), st.none()),     # AnyValue with no member
    st.tuples(st.just("novalue"), st.none()),   # KeyValue with no value at all
)
UNSUPPORTED = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=4)),
    st.tuples(st.just("array"), st.lists(TEXT, max_size=2)),
    st.tuples(st.just("kvlist"), st.lists(TEXT, max_size=2)),
)


def make_kv(key: str, value) -> KeyValue:
    kind, v = value
    if kind == "novalue":
        return KeyValue(key=key)
    if kind == "unset":
        return KeyValue(key=key, value=AnyValue())
    if kind == "str":
        return KeyValue(key=key, value=AnyValue(string_value=v))
    if kind == "int":
        return KeyValue(key=key, value=AnyValue(int_value=v))
    if kind == "bool":
        return KeyValue(key=key, value=AnyValue(bool_value=v))
    if kind == "double":
        return KeyValue(key=key, value=AnyValue(double_value=v))
    if kind == "strindex":
        return KeyValue(key=key, value=AnyValue(string_value_strindex=v))
    if kind == "bytes":
        return KeyValue(key=key, value=AnyValue(bytes_value=v))
    if kind == "array":
        return KeyValue(key=key, value=AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=s) for s in v])))
    return KeyValue(key=key, value=AnyValue(kvlist_value=KeyValueList(
        values=[KeyValue(key=s, value=AnyValue(string_value=s)) for s in v])))


def attributes(read_keys, values, other_values, max_size=6, other_keys=OTHER_KEYS):
    read = st.tuples(st.sampled_from(read_keys), values)
    other = st.tuples(st.sampled_from(other_keys), other_values)
    return st.lists(st.one_of(read, other), max_size=max_size)


ID16 = st.one_of(st.sampled_from([b"", b"\x00" * 16, b"\x01" * 8, b"\x01" * 17, b"\x00" * 15 + b"\x01"]),
                 st.binary(min_size=16, max_size=16))
ID8 = st.one_of(st.sampled_from([b"", b"\x00" * 8, b"\x01" * 4, b"\x01" * 9]), st.binary(min_size=8, max_size=8))
TIMES = st.one_of(st.sampled_from([0, 1, T, T + 1000, 2 ** 62 - 1, 2 ** 62, 2 ** 64 - 1]),
                  st.integers(0, 2 ** 64 - 1), st.integers(T, T + 10 ** 9))


@st.composite
def spans(draw, values, other_values):
    sp = Span(trace_id=draw(ID16), span_id=draw(ID8), name=draw(TEXT),
              start_time_unix_nano=draw(TIMES), end_time_unix_nano=draw(TIMES),
              kind=draw(st.one_of(st.integers(0, 5), st.sampled_from([6, -1, 2 ** 31 - 1]))),
              parent_span_id=draw(st.one_of(ID8, st.sampled_from([b"\x00" * 8, b"\x01" * 7]))))
    if draw(st.booleans()):  # mostly valid ids and times, so that spans are kept
        sp.trace_id = draw(st.binary(min_size=16, max_size=16).filter(any))
        sp.span_id = draw(st.binary(min_size=8, max_size=8).filter(any))
        sp.start_time_unix_nano = draw(st.integers(1, 2 ** 62 - 1))
        sp.end_time_unix_nano = draw(st.integers(sp.start_time_unix_nano, 2 ** 62 - 1))
    read = sorted(SPAN_ATTRIBUTES)
    sp.attributes.extend(make_kv(k, v) for k, v in draw(attributes(read, values, other_values)))
    sp.status.code = draw(st.sampled_from([0, 1, 2, 3, -1, 2 ** 31 - 1]))
    if draw(st.booleans()):
        sp.status.message = draw(TEXT)
    for name, attrs in draw(st.lists(st.tuples(
            st.sampled_from(["exception", "other", "", "Exception"]),
            attributes(["exception.type"], values, other_values, 3,
                       ["exception.message", "exception.typ", "other"])), max_size=3)):
        ev = sp.events.add(name=name, time_unix_nano=T)
        ev.attributes.extend(make_kv(k, v) for k, v in attrs)
    for _ in range(draw(st.integers(0, 1))):
        link = sp.links.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, trace_state=draw(TEXT))
        link.attributes.append(make_kv("other", draw(other_values)))
    return sp


@st.composite
def requests(draw, values=SCALARS, other_values=st.one_of(SCALARS, UNSUPPORTED)):
    req = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        rs = req.resource_spans.add()
        if draw(st.booleans()):
            rs.resource.attributes.extend(make_kv(k, v) for k, v in draw(attributes(READ_KEYS, values, other_values)))
        if draw(st.booleans()):
            rs.schema_url = draw(TEXT)
        for _ in range(draw(st.integers(0, 3))):
            ss = rs.scope_spans.add()
            if draw(st.booleans()):
                ss.scope.name = draw(st.one_of(TEXT, st.just("tests")))
                ss.scope.attributes.append(make_kv("scope.attr", draw(other_values)))
            ss.spans.extend(draw(st.lists(spans(values, other_values), max_size=5)))
    return req


@HYPO
@given(requests())
def test_random_requests_give_the_same_batch(req):
    check_same(req.SerializeToString(), compiled_alone=True)


@HYPO
@given(requests(values=st.one_of(SCALARS, UNSUPPORTED)))
def test_random_requests_with_any_value_kind_give_the_same_batch(req):
    check_same(req.SerializeToString())


LENGTH_LIMITS = st.sampled_from([0, 1, 2, 3, 4, 5, 8])


@HYPO
@given(requests(), LENGTH_LIMITS, TIMES)
def test_random_requests_under_limits_give_the_same_batch(req, max_length, max_end):
    check_same(req.SerializeToString(), compiled_alone=True, max_end_ns=max_end, max_attribute_length=max_length)


@HYPO
@given(requests(values=st.one_of(SCALARS, UNSUPPORTED)), LENGTH_LIMITS, TIMES)
def test_random_requests_with_any_value_kind_under_limits_give_the_same_batch(req, max_length, max_end):
    check_same(req.SerializeToString(), max_end_ns=max_end, max_attribute_length=max_length)


# --- the same messages, written the unusual ways protobuf allows ----------------------

VARINT_TYPES = {FD.TYPE_INT64, FD.TYPE_UINT64, FD.TYPE_INT32, FD.TYPE_UINT32, FD.TYPE_BOOL, FD.TYPE_ENUM}


def varint(n: int, pad: int = 0, limit: int = 10) -> bytes:
    n &= (1 << 64) - 1
    out = []
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            break
    pad = max(0, min(pad, limit - len(out)))
    if pad:  # an over-long encoding of the same value
        out[-1] |= 0x80
        out += [0x80] * (pad - 1) + [0]
    return bytes(out)


def _repeated(fd) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


class Scrambler:
    def __init__(self, rnd: random.Random, p: float):
        self.rnd, self.p = rnd, p

    def chance(self) -> bool:
        return self.rnd.random() < self.p

    def field(self, number: int, wt: int, payload: bytes) -> bytes:
        pad = self.rnd.choice([1, 2, 4]) if self.chance() else 0
        tag = varint(number << 3 | wt, pad, limit=5)
        if wt == 2:
            return tag + varint(len(payload), pad, limit=5) + payload
        return tag + payload

    def scalar(self, fd, v) -> tuple[int, bytes]:
        t = fd.type
        if t in VARINT_TYPES:
            return 0, varint(int(v), 3 if self.chance() else 0)
        if t == FD.TYPE_DOUBLE:
            return 1, struct.pack("<d", v)
        if t == FD.TYPE_FIXED64:
            return 1, struct.pack("<Q", v)
        if t == FD.TYPE_FIXED32:
            return 5, struct.pack("<I", v)
        if t == FD.TYPE_STRING:
            return 2, v.encode()
        return 2, v

    def decoy(self, fd):
        t = fd.type
        if t in VARINT_TYPES:
            return self.rnd.choice([0, 1, 2, 5, -1])
        if t == FD.TYPE_DOUBLE:
            return self.rnd.choice([0.0, 2.5])
        if t == FD.TYPE_FIXED64:
            return self.rnd.choice([0, T, 2 ** 63])
        if t == FD.TYPE_FIXED32:
            return self.rnd.choice([0, 1])
        if t == FD.TYPE_STRING:
            return self.rnd.choice(["", "decoy", "code.function.name", "exception"])
        return self.rnd.choice([b"", b"\x01" * 16, b"\x02" * 8])

    def unknown(self, desc) -> bytes:
        known = {f.number for f in desc.fields}
        # a known field, any wire type; but an empty array, kvlist or bytes member would
        # change the kind of an AnyValue
        pick = sorted(known - {5, 6, 7} if desc.name == "AnyValue" else known)
        number = self.rnd.choice([n for n in (1, 2, 3, 5, 7, 9, 15, 17, 20, 99, 2 ** 29 - 1) if n not in known]
                                 + [self.rnd.choice(pick)])
        wt = self.rnd.choice([0, 1, 2, 5, 3])
        if wt == 0:
            return self.field(number, 0, varint(self.rnd.getrandbits(64), self.rnd.choice([0, 2])))
        if wt == 1:
            return self.field(number, 1, self.rnd.randbytes(8))
        if wt == 5:
            return self.field(number, 5, self.rnd.randbytes(4))
        if wt == 2:
            payload = self.rnd.choice([b"", b"\xff\xfe", "ü".encode(), self.rnd.randbytes(3), varint(2) + varint(300)])
            if number in known:
                payload = b""  # a known field: an empty value is valid whatever its type
            return self.field(number, 2, payload)
        inner = self.field(self.rnd.choice([1, 30]), 0, varint(5)) if self.chance() else b""
        return varint(number << 3 | 3) + inner + varint(number << 3 | 4)

    def chunks(self, msg) -> list[tuple[object, bytes]]:
        out: list[tuple[object, bytes]] = []
        for fd, value in msg.ListFields():
            repeated = _repeated(fd)
            for v in (list(value) if repeated else [value]):
                if fd.type == FD.TYPE_MESSAGE:
                    sub = self.chunks(v)
                    if not repeated and len(sub) > 1 and self.chance():  # split: occurrences merge
                        k = self.rnd.randrange(1, len(sub))
                        out.append((fd.number, self.field(fd.number, 2, self.body(sub[:k]))))
                        out.append((fd.number, self.field(fd.number, 2, self.body(sub[k:]))))
                    else:
                        out.append((fd.number, self.field(fd.number, 2, self.body(sub))))
                    continue
                if not repeated and fd.containing_oneof is None and self.chance():  # the last wins
                    out.append((fd.number, self.field(fd.number, *self.scalar(fd, self.decoy(fd)))))
                out.append((fd.number, self.field(fd.number, *self.scalar(fd, v))))
        if self.chance():
            out.append((object(), self.unknown(msg.DESCRIPTOR)))
        return out

    def body(self, chunks) -> bytes:
        if not self.chance():
            return b"".join(c for _, c in chunks)
        queues: dict = {}  # shuffled, keeping the order of each field number
        for number, c in chunks:
            queues.setdefault(number, []).append(c)
        lists = list(queues.values())
        out = []
        while lists:
            q = self.rnd.choice(lists)
            out.append(q.pop(0))
            if not q:
                lists.remove(q)
        return b"".join(out)

    def encode(self, msg) -> bytes:
        return self.body(self.chunks(msg))


def test_scrambler_writes_the_same_message():
    req = request([S(T + 1, exceptions=("E",), attrs={"code.lineno": 3})])
    for seed in range(50):
        data = Scrambler(random.Random(seed), 0.0).encode(req)
        assert data == req.SerializeToString()
        back = ExportTraceServiceRequest()
        back.ParseFromString(Scrambler(random.Random(seed), 0.3).encode(req))


@HYPO
@given(requests(), st.integers(0, 2 ** 32), st.sampled_from([0.1, 0.3, 0.7]), LENGTH_LIMITS)
def test_scrambled_requests_give_the_same_batch(req, seed, p, max_length):
    check_same(Scrambler(random.Random(seed), p).encode(req), max_attribute_length=max_length)


@pytest.mark.parametrize("seed", range(40))
def test_scrambled_builder_requests_give_the_same_batch(seed):
    spans = [S(T + i, function=None if i % 3 == 0 else f"f{i % 4}", name=f"op{i % 2}", error=i % 5 == 0,
               exceptions=("E",) * (i % 2), attrs={"code.lineno": i, "code.filepath": "a.py", "x": 1.5})
             for i in range(1, 30)]
    req = request(spans + [S(T + 99, service="other", env="dev")])
    check_same(Scrambler(random.Random(seed), 0.3).encode(req), compiled_alone=True)


# --- the OpenTelemetry SDK's own encoder ------------------------------------------------

def test_requests_encoded_by_the_sdk_give_the_same_batch():
    trace_encoder = pytest.importorskip("opentelemetry.exporter.otlp.proto.common._internal.trace_encoder")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Status, StatusCode

    spans = []
    for res_attrs in ({"service.name": "cart", "service.version": "2.1", "deployment.environment.name": "prod",
                       "vcs.ref.head.revision": "abc123"},
                      {"deployment.environment": "dev", "code.namespace": "res.ns", "code.function": "res_fn"},
                      {}):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create(res_attrs))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        for scope in ("scope.a", "scope.b"):
            tracer = provider.get_tracer(scope, "1.0")
            for i in range(25):
                attrs = {"http.route": "/x", "thread.id": i, "flag": bool(i % 2), "ratio": i / 7,
                         "tags": ["a", "b"], "ids": [1, 2]}
                if i % 4 == 0:
                    attrs.update({"code.function.name": f"mod.f{i % 3}", "code.file.path": "mod.py",
                                  "code.line.number": 10 + i})
                elif i % 4 == 1:
                    attrs.update({"code.namespace": "mod.Class", "code.function": "method", "code.lineno": i})
                elif i % 4 == 2:
                    attrs.update({"code.line.number": "", "code.lineno": str(i)})
                with tracer.start_as_current_span(f"op-{i % 3}", attributes=attrs) as span:
                    if i % 5 == 0:
                        span.record_exception(ValueError("boom"))
                        span.set_status(Status(StatusCode.ERROR, "failed"))
                    if i % 7 == 0:
                        span.add_event("exception", {"exception.type": 42})
                        span.add_event("retry", {"attempt": 1})
        spans += exporter.get_finished_spans()
        provider.shutdown()
    data = trace_encoder.encode_spans(spans).SerializeToString()
    b = check_same(data, compiled_alone=True)
    assert len(b) == len(spans) and b.exceptions and b.error.any()
    assert {loc.function for loc in b.locations} >= {"mod.f0", "mod.Class.method", "res.ns.res_fn"}


# --- malformed input ------------------------------------------------------------------

@settings(max_examples=3 * EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    check_same(data)


@settings(max_examples=3 * EXAMPLES, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=6),
    st.sampled_from([b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x2a", b"\x39", b"\x41", b"\x4a", b"\x7a", b"\x0b", b"\x0c",
                     b"\x80", b"\xff", b"\x00"]),
    st.integers(0, 127).map(lambda n: bytes([n])),
), max_size=40).map(b"".join))
def test_random_tag_soup(data):
    check_same(data)


def _valid_request_bytes() -> bytes:
    req = request([S(T + 1, exceptions=("E",), attrs={"code.lineno": 3, "x": 2.5}),
                   S(T + 2, function=None, name="GET /", error=True),
                   S(T + 3, service="b", attrs={"code.filepath": "ü.py"})])
    sp = req.resource_spans[0].scope_spans[0].spans[0]
    sp.links.add(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, trace_state="k=v")
    sp.status.message = "msg"
    req.resource_spans[0].resource.entity_refs.add(type="service", id_keys=["service.name"])
    return req.SerializeToString()


def test_every_truncation():
    data = _valid_request_bytes()
    for i in range(len(data)):
        check_same(data[:i])


@HYPO
@given(mutated(requests().map(lambda r: r.SerializeToString())))
def test_mutations_of_valid_requests(data):
    check_same(data)


BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xf5\x80\x80\x80", b"\xe2\x82", b"a\x80", b"\xf0\x8f\xbf\xbf", b"abcdefgh\xe2\x28\xa1"]
GOOD_UTF8 = [b"\xc2\x80", b"\xe0\xa0\x80", b"\xed\x9f\xbf", b"\xee\x80\x80", b"\xf0\x90\x80\x80",
             b"\xf4\x8f\xbf\xbf", "名前ü☃".encode(), b"abcdefgh\xc3\xa9"]


def _with_string(place: str, s: bytes) -> bytes:
    """A valid request with s as the bytes of one string field (placeholder swap)."""
    mark = "\x01" + "M" * 14 + "\x01"
    req = request([S(T + 1, function=None, exceptions=("E",))])
    rs = req.resource_spans[0]
    sp = rs.scope_spans[0].spans[0]
    target = {
        "span name": lambda: setattr(sp, "name", mark),
        "attribute key": lambda: sp.attributes.append(kv(mark, 1)),
        "code value": lambda: sp.attributes.append(kv("code.function.name", mark)),
        "other value": lambda: sp.attributes.append(kv("other", mark)),
        "resource value": lambda: rs.resource.attributes.append(kv("service.name", mark)),
        "scope name": lambda: setattr(rs.scope_spans[0].scope, "name", mark),
        "scope version": lambda: setattr(rs.scope_spans[0].scope, "version", mark),
        "trace_state": lambda: setattr(sp, "trace_state", mark),
        "status message": lambda: setattr(sp.status, "message", mark),
        "event name": lambda: setattr(sp.events[0], "name", mark),
        "exception type": lambda: setattr(sp.events[0].attributes[0].value, "string_value", mark),
        "link trace_state": lambda: setattr(sp.links.add(), "trace_state", mark),
        "entity ref id key": lambda: rs.resource.entity_refs.add().id_keys.append(mark),
        "schema_url": lambda: setattr(rs, "schema_url", mark),
        "nested array": lambda: sp.attributes.add(key="a", value=AnyValue(array_value=ArrayValue(
            values=[AnyValue(string_value=mark)]))),
        "trace_id (bytes)": lambda: setattr(sp, "trace_id", mark.encode()),
        "bytes value": lambda: sp.attributes.add(key="b", value=AnyValue(bytes_value=mark.encode())),
    }
    target[place]()
    data = req.SerializeToString()
    assert data.count(mark.encode()) == 1
    assert len(s) <= len(mark)
    return data.replace(mark.encode(), s.ljust(len(mark), b" "))


@pytest.mark.parametrize("s", BAD_UTF8 + GOOD_UTF8)
@pytest.mark.parametrize("place", ["span name", "attribute key", "code value", "other value", "resource value",
                                   "scope name", "scope version", "trace_state", "status message", "event name",
                                   "exception type", "link trace_state", "entity ref id key", "schema_url",
                                   "nested array", "trace_id (bytes)", "bytes value"])
def test_invalid_utf8_is_refused_where_upb_refuses_it(place, s):
    check_same(_with_string(place, s))


def _tag(number: int, wt: int) -> bytes:
    return varint(number << 3 | wt)


def _ld(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + varint(len(payload)) + payload


def _span_request(span_body: bytes) -> bytes:
    """ExportTraceServiceRequest > ResourceSpans > ScopeSpans > Span(span_body)."""
    return _ld(1, _ld(2, _ld(2, span_body)))


VALID_SPAN = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, start_time_unix_nano=T,
                  end_time_unix_nano=T + 5, name="op").SerializeToString()


@pytest.mark.parametrize("extra", [
    _tag(20, 0) + b"\xff" * 9 + b"\x01",            # 10-byte varint
    _tag(20, 0) + b"\xff" * 9 + b"\x7f",            # 10-byte varint, bits beyond 64
    _tag(20, 0) + b"\xff" * 10 + b"\x01",           # 11-byte varint
    _tag(6, 0) + b"\x80" * 10 + b"\x00",            # 11-byte varint in a known field
    b"\xaa\x80\x80\x80\x00" + b"\x01a",             # 5-byte tag of a known field
    b"\xa8\x80\x80\x80\x10" + b"\x01",              # tag above 2**32
    b"\x80\x80\x80\x80\x80\x00\x01",                # 6-byte tag
    varint((2 ** 29 - 1) << 3) + b"\x01",           # the largest field number
    varint((2 ** 29) << 3) + b"\x01",               # beyond it
    b"\x00\x01", b"\x02\x00",                        # field 0
    b"\x0e", b"\x0f",                                # wire types 6 and 7
    _tag(20, 4),                                     # end-group outside a group
    _tag(20, 3) + _tag(21, 0) + b"\x01" + _tag(20, 4),
    _tag(20, 3) + _tag(21, 0) + b"\x01" + _tag(22, 4),
    _tag(20, 3) + _tag(21, 0) + b"\x01",
    _tag(20, 3) + _tag(0, 0) + b"\x00" + _tag(20, 4),   # field 0 inside an unknown group: upb
    _tag(20, 3) + _tag(0, 2) + b"\x00" + _tag(20, 4),   # skips it (found by fuzz/decode_fuzz.py)
    _tag(20, 3) + _tag(0, 1) + b"\x00" * 8 + _tag(0, 5) + b"\x00" * 4 + _tag(20, 4),
    _tag(20, 3) + _tag(0, 3) + _tag(0, 0) + b"\x01" + _tag(0, 4) + _tag(20, 4),
    _tag(20, 3) + b"\x80\x00" + b"\x00" + _tag(20, 4),  # field 0 in a two-byte tag
    _tag(20, 3) + b"\x80\x80\x80\x80\x80\x00" + b"\x00" + _tag(20, 4),  # a six-byte tag
    _tag(20, 3) + _tag(0, 4),                        # an end-group 0 does not close group 20
    _tag(20, 3) + _tag(0, 3) + _tag(20, 4),          # nor does end-group 20 close group 0
    _tag(0, 3) + _tag(0, 4),                         # and outside a group, field 0 is an error
    _tag(5, 3) + _tag(5, 4),                         # a group in place of a known string
    _tag(15, 3) + _tag(15, 4),                       # and of a known message
    _tag(5, 2) + b"\x81\x80\x80\x80\x00" + b"a",     # 5-byte length
    _tag(5, 2) + b"\x81\x80\x80\x80\x80\x00" + b"a",  # 6-byte length
    _tag(5, 2) + b"\xff\xff\xff\xff\x0f",            # length beyond the end
    _tag(7, 1) + b"\x00" * 7,                        # truncated fixed64
    _tag(16, 5) + b"\x00" * 3,                       # truncated fixed32
    _tag(16, 1) + b"\x01" * 8,                       # fixed32 field as fixed64: unknown
    _tag(7, 0) + varint(T + 100),                    # fixed64 field as varint: unknown
    _tag(1, 0) + b"\x05",                            # bytes field as varint: unknown
    _ld(6, varint(2)),                               # enum packed: unknown
    _ld(15, _tag(3, 0) + varint(2 ** 32 + 2)),      # status code truncated to int32: ERROR
    _ld(15, _tag(3, 0) + varint(2)) + _ld(15, _ld(2, b"m")),   # status occurrences merge
    _ld(15, _tag(3, 0) + varint(2)) + _ld(15, _tag(3, 0) + varint(1)),
    _ld(1, b"\x00" * 16),                            # a later trace_id wins
    _ld(5, b"") + _ld(9, _ld(1, b"code.function.name")),   # key without value: None
    _ld(9, _ld(2, _ld(1, b"f")) + _ld(1, b"code.function.name")),        # value before key
    _ld(9, _ld(1, b"code.function.name") + _ld(2, _ld(1, b"f")) + _ld(2, _tag(3, 0) + b"\x07")),
    _ld(9, _ld(1, b"code.function.name") + _ld(2, _ld(1, b"f")) + _ld(2, b"")),
    _ld(9, _ld(1, b"code.function.name") + _ld(2, _ld(1, b"f") + _tag(8, 0) + b"\x05")),
    _ld(9, _ld(1, b"x") + _ld(1, b"code.lineno") + _tag(3, 0) + b"\x01" + _ld(2, _tag(4, 1) + struct.pack("<d", 2.0))),
    _ld(9, _ld(1, b"code.function.name") + _ld(2, _ld(5, b"") + _ld(1, b"g"))),   # array then string
    _ld(9, _ld(1, b"code.function.name") + _ld(2, _ld(1, b"g") + _ld(7, b""))),    # string then bytes
    _ld(11, _ld(2, b"exception") + _ld(3, _ld(1, b"exception.type"))),           # str(None)
    _ld(11, _ld(3, _ld(1, b"exception.type") + _ld(2, _ld(1, b"E"))) + _ld(2, b"exception")),  # name last
    _ld(11, _ld(2, b"exception") + _ld(3, _ld(2, _ld(1, b"E")) + _ld(1, b"exception.type"))),
])
def test_wire_format_edge_cases(extra):
    for data in (_span_request(VALID_SPAN + extra), _span_request(extra + VALID_SPAN), VALID_SPAN + extra,
                 _ld(1, extra + _ld(2, _ld(2, VALID_SPAN))), _ld(1, _ld(2, extra + _ld(2, VALID_SPAN)))):
        check_same(data)


def _nested_any(levels: int) -> bytes:
    """AnyValue bytes: `levels` ArrayValue/AnyValue pairs around a string."""
    b = _ld(1, b"x")
    for _ in range(levels):
        b = _ld(5, _ld(1, b))
    return b


def _groups(levels: int) -> bytes:
    return _tag(20, 3) * levels + _tag(20, 4) * levels


@pytest.mark.parametrize("levels", [44, 45, 46, 47, 48])
@pytest.mark.parametrize("where", ["span attribute", "resource attribute", "event attribute", "scope attribute"])
def test_nesting_at_the_limit(where, levels):
    """upb allows 100 levels of sub-messages and groups below the request, no more."""
    kvb = _ld(1, b"k") + _ld(2, _nested_any(levels))
    kv_other = _ld(1, b"k") + _ld(2, _nested_any(levels) + _groups(2))
    for body in (kvb, kv_other):
        if where == "span attribute":
            data = _span_request(VALID_SPAN + _ld(9, body))
        elif where == "resource attribute":
            data = _ld(1, _ld(1, _ld(1, body)) + _ld(2, _ld(2, VALID_SPAN)))
        elif where == "event attribute":
            data = _span_request(VALID_SPAN + _ld(11, _ld(3, body)))
        else:
            data = _ld(1, _ld(2, _ld(1, _ld(3, body)) + _ld(2, VALID_SPAN)))
        check_same(data)


@pytest.mark.parametrize("levels", [93, 94, 95, 96, 97, 98, 99, 100, 101])
def test_unknown_groups_at_the_limit(levels):
    for data in (_groups(levels), _ld(1, _groups(levels)), _span_request(VALID_SPAN + _groups(levels)),
                 _span_request(VALID_SPAN + _ld(9, _ld(2, _groups(levels))))):
        check_same(data)


def test_deep_nesting_does_not_crash():
    check_same(_span_request(VALID_SPAN + _ld(9, _ld(1, b"k") + _ld(2, _nested_any(2000)))))
    check_same(_groups(100_000))


# --- wiring ---------------------------------------------------------------------------

def test_compiled_schema_matches_the_installed_opentelemetry_proto():
    assert _fastdecode.schema() == decode.descriptor_schema()
    assert decode._compiled is _fastdecode


def test_compiled_decoder_reads_the_attributes_location_names():
    assert set(_fastdecode.SPAN_ATTRIBUTES) == SPAN_ATTRIBUTES
    assert set(_fastdecode.RESOURCE_ATTRIBUTES) == RESOURCE_ATTRIBUTES


@pytest.mark.e2e
def test_decode_request_uses_the_compiled_decoder_unless_told_not_to():
    code = "from processor.receiver import decode; print(decode.COMPILED)"
    env = {k: v for k, v in os.environ.items() if k != "BACKFLOW_PURE_PYTHON"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for value in (None, "1", "0"):
        e = dict(env, **({"BACKFLOW_PURE_PYTHON": value} if value is not None else {}))
        out[value] = subprocess.run([sys.executable, "-c", code], env=e, cwd=root, capture_output=True,
                                    text=True, check=True).stdout.strip()
    assert out == {None: "True", "1": "False", "0": "True"}


def test_columns_are_numpy_arrays_of_the_batch_dtypes():
    b = decode.compiled_batch(encoded([S(T + 1, error=True), S(T + 2)]))
    assert [b.loc.dtype, b.ver.dtype, b.start.dtype, b.end.dtype, b.error.dtype, b.trace_id.dtype] == [
        np.int32, np.int32, np.int64, np.int64, np.bool_, np.uint8]
    assert b.error.tolist() == [True, False] and b.trace_id.shape == (2, 16)
    assert all(math.isfinite(x) for x in b.end)
    assert [b.span_id.dtype, b.parent_id.dtype, b.kind.dtype] == [np.uint64, np.uint64, np.uint8]


def test_parent_links_and_kinds_are_read_as_python_reads_them():
    spans = [Span(trace_id=b"\x01" * 16, span_id=bytes([i + 1]) * 8, parent_span_id=parent, kind=kind,
                  start_time_unix_nano=T, end_time_unix_nano=T + 5, name="op")
             for i, (parent, kind) in enumerate([(b"", 2), (b"\x01" * 8, 3), (b"\x02" * 7, 1), (b"\x03" * 8, 9)])]
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.extend(spans)
    data = req.SerializeToString()
    a, b = decode.compiled_batch(data), decode.decode_request_python(data)
    assert_same(a, b)
    one = int(np.frombuffer(b"\x01" * 8, np.uint64)[0])
    three = int(np.frombuffer(b"\x03" * 8, np.uint64)[0])
    # a parent id that is not 8 bytes counts as none; a kind beyond SpanKind as unspecified
    assert a.parent_id.tolist() == [0, one, 0, three] and a.kind.tolist() == [2, 3, 1, 0]
    assert a.span_id.tolist()[1] == int(np.frombuffer(b"\x02" * 8, np.uint64)[0])


# --- the location cache -----------------------------------------------------------------

def test_a_location_decoded_again_is_the_same_object():
    data = encoded([S(T + 1, function="shop.a"), S(T + 2, function="shop.b", attrs={"code.line.number": 7})])
    a, b = decode.compiled_batch(data), decode.compiled_batch(data)
    assert a.locations == b.locations and all(x is y for x, y in zip(a.locations, b.locations))


def test_locations_differing_in_any_field_are_not_confused_by_the_cache():
    # Each field moves bytes between neighbours of the cache key: "ab"+"c" vs "a"+"bc".
    spans = [S(T + 1, service="ab", function="c"), S(T + 2, service="a", function="bc"),
             S(T + 3, function="f", attrs={"code.file.path": "x.py", "code.line.number": 12}),
             S(T + 4, function="f", attrs={"code.file.path": "x.py1", "code.line.number": 2}),
             S(T + 5, function="f", env="prod2"), S(T + 6, function=None, name="op2")]
    for s in spans:  # one request each, so only the process-wide cache can mix them up
        check_same(encoded([s]), compiled_alone=True)
    check_same(encoded(spans), compiled_alone=True)


def test_the_location_cache_starts_again_when_full_and_stays_right():
    names = [f"svc.mod.fn_{i}" for i in range(33_000 + 2_000)]  # past the 32,768 held
    for lo in range(0, len(names), 5_000):
        data = encoded([S(T + i, function=n) for i, n in enumerate(names[lo:lo + 5_000])])
        fast = decode.compiled_batch(data)
        assert [loc.function for loc in fast.locations] == names[lo:lo + 5_000]
    check_same(encoded([S(T + i, function=n) for i, n in enumerate(names[:300])]), compiled_alone=True)


def test_threads_decoding_at_once_get_the_locations_the_python_decoder_gets():
    import threading
    requests = [encoded([S(T + i, function=f"shop.f{(t * 7 + i) % 500}") for i in range(400)]) for t in range(8)]
    expected = [decode.decode_request_python(r).locations for r in requests]
    failures = []

    def run(t: int) -> None:
        for _ in range(20):
            if decode.compiled_batch(requests[t]).locations != expected[t]:
                failures.append(t)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures


@pytest.mark.e2e
def test_the_fuzz_harness_runs_without_atheris():
    """fuzz/decode_fuzz.py (see its docstring) keeps working: its Hypothesis loop, briefly,
    and its replay of the seeds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join("fuzz", "decode_fuzz.py"), "--fallback", "--examples", "40"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the decoders agreed on all" in out.stdout
    out = subprocess.run([sys.executable, os.path.join("fuzz", "decode_fuzz.py"), "--replay", "no-such-corpus"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "inputs replayed, the decoders agreed on all" in out.stdout
