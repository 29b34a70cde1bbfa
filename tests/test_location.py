"""Code location, environment and version from attributes, new names before old ones."""

import pytest

from processor.pipeline.location import (
    Location, file_of, function_of, line_of, location_key, resource_of,
)


def test_new_function_name_wins_over_old_names():
    attrs = {"code.function.name": "shop.cart.apply", "code.namespace": "x", "code.function": "y"}
    assert function_of(attrs, {}, "span") == "shop.cart.apply"


def test_old_namespace_and_function_are_joined():
    assert function_of({"code.namespace": "shop.cart", "code.function": "apply"}, {}, "s") == "shop.cart.apply"


def test_old_function_alone():
    assert function_of({"code.function": "apply"}, {}, "s") == "apply"


def test_namespace_alone_is_not_a_function():
    assert function_of({"code.namespace": "shop.cart"}, {}, "GET /") == "span:GET /"


def test_span_name_fallback_is_marked():
    assert function_of({}, {}, "GET /cart") == "span:GET /cart"


def test_span_attributes_win_over_resource_attributes():
    span = {"code.function": "span_level"}
    res = {"code.function.name": "resource_level", "code.file.path": "r.py", "code.line.number": 3}
    assert function_of(span, res, "s") == "span_level"
    assert function_of({}, res, "s") == "resource_level"
    assert file_of({"code.filepath": "s.py"}, res) == "s.py"
    assert file_of({}, res) == "r.py"
    assert line_of({"code.lineno": 7}, res) == "7"
    assert line_of({}, res) == "3"


@pytest.mark.parametrize("attrs,expected", [
    ({"code.file.path": "new.py", "code.filepath": "old.py"}, "new.py"),
    ({"code.filepath": "old.py"}, "old.py"),
    ({}, ""),
])
def test_file_path_new_then_old(attrs, expected):
    assert file_of(attrs, {}) == expected


@pytest.mark.parametrize("attrs,expected", [
    ({"code.line.number": 12, "code.lineno": 99}, "12"),
    ({"code.lineno": 99}, "99"),
    ({"code.line.number": 0}, "0"),
    ({}, ""),
])
def test_line_number_new_then_old(attrs, expected):
    assert line_of(attrs, {}) == expected


def test_resource_identity_new_and_old_environment_names():
    r = resource_of({"service.name": "shop", "deployment.environment.name": "prod",
                     "deployment.environment": "old", "service.version": "1.4.3",
                     "vcs.ref.head.revision": "abc"})
    assert (r.environment, r.service, r.version, r.revision) == ("prod", "shop", "1.4.3", "abc")
    assert resource_of({"deployment.environment": "staging"}).environment == "staging"


def test_missing_service_name_is_unknown_service():
    assert resource_of({}).service == "unknown_service"


def test_key_depends_on_environment_service_and_function_only():
    a = Location("prod", "shop", "f", file="a.py", line="1")
    b = Location("prod", "shop", "f", file="b.py", line="2")
    assert a.key == b.key == location_key("prod", "shop", "f")
    assert Location("staging", "shop", "f").key != a.key
    assert Location("prod", "shop2", "f").key != a.key
    assert len(a.key) == 16 and int(a.key, 16) >= 0


def test_key_has_no_separator_collisions():
    assert location_key("a", "b.c", "d") != location_key("a.b", "c", "d")
