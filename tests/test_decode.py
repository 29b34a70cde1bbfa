"""Decoding OTLP requests into columns; unusable spans refused with reasons."""

import numpy as np
import pytest

from processor.receiver.decode import MalformedRequest, decode_message, decode_request
from tests.otlp import S, encoded, request

T = 1_700_000_000_000_000_000


def test_columns_hold_one_row_per_span_in_order():
    b = decode_request(encoded([S(T + 5, 5), S(T + 9, 3, function="g", error=True)]))
    assert len(b) == 2
    assert b.end.tolist() == [T + 5, T + 9]
    assert (b.end - b.start).tolist() == [5, 3]
    assert b.error.tolist() == [False, True]
    assert [b.locations[i].function for i in b.loc] == ["shop.f", "g"]
    assert b.trace_id.shape == (2, 16)


def test_same_function_in_one_request_is_one_location():
    b = decode_request(encoded([S(T + i) for i in range(1, 50)]))
    assert len(b.locations) == 1 and set(b.loc.tolist()) == {0}


def test_resource_gives_service_environment_and_version():
    b = decode_request(encoded([S(T + 1, service="cart", version="2.0", env="staging")]))
    loc = b.locations[0]
    assert (loc.service, loc.environment) == ("cart", "staging")
    assert b.versions[b.ver[0]] == ("cart", "2.0", "")


def test_span_name_fallback_keeps_scope_name():
    b = decode_request(encoded([S(T + 1, function=None, name="GET /cart")]))
    assert b.locations[0].function == "span:GET /cart"
    assert b.locations[0].scope == "tests"


def test_code_locations_keep_their_scope_name_too_unless_too_long():
    b = decode_request(encoded([S(T + 1, function="shop.cart.add")]))
    assert (b.locations[0].function, b.locations[0].scope) == ("shop.cart.add", "tests")
    req = request([S(T + 1, function="shop.cart.add")])
    req.resource_spans[0].scope_spans[0].scope.name = "s" * 50
    b = decode_request(req.SerializeToString(), max_attribute_length=20)
    assert (len(b), b.locations[0].scope) == (1, "")  # the span is kept, the scope name not


def test_exception_events_are_collected_per_row():
    b = decode_request(encoded([S(T + 1), S(T + 2, exceptions=("ValueError", "KeyError"))]))
    assert b.exceptions == [(1, "ValueError"), (1, "KeyError")]


@pytest.mark.parametrize("breakage,reason", [
    (lambda sp: setattr(sp, "trace_id", b"\x01" * 8), "trace_id not 16 bytes or zero"),
    (lambda sp: setattr(sp, "trace_id", b"\x00" * 16), "trace_id not 16 bytes or zero"),
    (lambda sp: setattr(sp, "span_id", b"\x01" * 4), "span_id not 8 bytes or zero"),
    (lambda sp: setattr(sp, "start_time_unix_nano", 0), "missing start or end time"),
    (lambda sp: setattr(sp, "end_time_unix_nano", 0), "missing start or end time"),
    (lambda sp: setattr(sp, "start_time_unix_nano", sp.end_time_unix_nano + 1), "end before start"),
])
def test_unusable_span_is_refused_and_the_rest_kept(breakage, reason):
    req = request([S(T + 10), S(T + 20), S(T + 30)])
    breakage(req.resource_spans[0].scope_spans[0].spans[1])
    b = decode_message(req)
    assert len(b) == 2 and b.end.tolist() == [T + 10, T + 30]
    assert b.rejected == 1 and b.reasons == {reason: 1}
    assert b.error_message() == f"1 spans rejected: 1 {reason}"


def test_garbage_bytes_are_a_malformed_request():
    with pytest.raises(MalformedRequest):
        decode_request(b"\xff\xff\xff\xff not protobuf")


def test_empty_request_gives_empty_batch():
    b = decode_request(b"")
    assert len(b) == 0 and b.trace_id.shape == (0, 16) and b.rejected == 0
    assert b.end.dtype == np.int64
