"""Strict conversion between Redis records and the proto/backflow/v1 messages.

The mapping (docs/schema.md, and the head of each .proto file): an event (a stream entry)
and a baseline (a hash) are flat maps of strings; each field's ``json_name`` is its Redis
field name, and its proto name is that name with "." as "_". Numbers are decimal strings,
an ``optional`` number may be "" (unknown: the field is not set), and ``Event.detail`` is a
JSON object. A version summary is one field of ``{prefix}:versions:{key}``: its name is the
JSON array ``[service.version, vcs.ref.head.revision]``, its value a JSON object of the
other fields. Anything else is a ``SchemaError`` naming the field: an unknown field, a
missing one, or a value that does not parse as the field's type.

>>> from processor.schema import Event
>>> fields = {"id": "a1", "type": "first_seen", "key": "k1", "service.name": "shop",
...           "deployment.environment.name": "prod", "code.function.name": "shop.cart.add",
...           "code.file.path": "shop/cart.py", "code.line.number": "12",
...           "otel.scope.name": "shop", "service.version": "1.4.3",
...           "vcs.ref.head.revision": "", "window.start": "1700000000000",
...           "window.end": "1700000060000", "severity": "info", "summary": "first call",
...           "detail": '{"count": 3}', "owners": ""}
>>> e = from_fields(Event, fields)
>>> e.service_name, e.window_end
('shop', 1700000060000)
>>> to_fields(e) == fields
True
>>> from_fields(Event, {**fields, "window.end": "soon"})
Traceback (most recent call last):
...
processor.schema.redis_map.SchemaError: Event field 'window.end': 'soon' is not an integer (int64, decimal digits)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from processor.schema.backflow.v1.edges_pb2 import Callee, Caller, Edges
from processor.schema.backflow.v1.verdict_pb2 import Verdict
from processor.schema.backflow.v1.version_summary_pb2 import (
    VersionSummaries,
    VersionSummary,
)

M = TypeVar("M", bound=Message)

# String fields that hold a JSON object (full proto names).
JSON_OBJECT_FIELDS = frozenset({"backflow.v1.Event.detail"})
# Members of a version summary's field name, in order; the value holds the other fields.
VERSION_NAME_FIELDS = ("service_version", "vcs_ref_head_revision")

_INT = re.compile(r"0|-?[1-9][0-9]*")
_DOUBLE = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_KEY = re.compile(r"[0-9a-f]{16}")  # a code location's key
_STRING, _INT64_TYPE, _DOUBLE_TYPE = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_DOUBLE


class SchemaError(ValueError):
    """A record that does not conform; ``field`` is the Redis field name it is about."""

    def __init__(self, message: str, field: str, problem: str):
        self.message, self.field, self.problem = message, field, problem
        super().__init__(f"{message} field {field!r}: {problem}")


def _text(value, message: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise SchemaError(message, field, "is not UTF-8 text") from None
    raise SchemaError(message, field, f"is a {type(value).__name__}, not a string")


def _int(text: str, message: str, field: str) -> int:
    if not _INT.fullmatch(text):
        raise SchemaError(message, field, f"{text!r} is not an integer (int64, decimal digits)")
    value = int(text)
    if not _INT64[0] <= value <= _INT64[1]:
        raise SchemaError(message, field, f"{text} is out of the int64 range")
    return value


def _double(text: str, message: str, field: str) -> float:
    value = float(text) if _DOUBLE.fullmatch(text) else math.nan
    if not math.isfinite(value):
        raise SchemaError(message, field, f"{text!r} is not a finite decimal number (double)")
    return value


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a member appears twice")
    return out


def _json(text: str, message: str, field: str, kind: type):
    try:
        value = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise SchemaError(message, field, f"is not JSON ({e})") from None
    if not isinstance(value, kind):
        raise SchemaError(message, field, f"is JSON but not a {'JSON object' if kind is dict else 'JSON array'}")
    return value


def _flat(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """The message's fields by Redis name; only flat messages of strings and numbers map."""
    out = {}
    for f in descriptor.fields:
        if f.type not in (_STRING, _INT64_TYPE, _DOUBLE_TYPE) or f.is_repeated:
            raise TypeError(f"{descriptor.full_name}.{f.name} has no Redis mapping")
        out[f.json_name] = f
    return out


def from_fields(cls: type[M], fields: Mapping) -> M:
    """A stream entry or hash (names and values str or bytes) as a message of ``cls``."""
    descriptor = cls.DESCRIPTOR
    name = descriptor.name
    by_name = _flat(descriptor)
    values = {}
    for key, value in fields.items():
        field = _text(key, name, repr(key))
        if field not in by_name:
            raise SchemaError(name, field, "is not in the schema (unknown field)")
        values[field] = _text(value, name, field)
    for field in by_name:
        if field not in values:
            raise SchemaError(name, field, "is missing")
    msg = cls()
    for field, f in by_name.items():
        text = values[field]
        if f.type == _STRING:
            if f.full_name in JSON_OBJECT_FIELDS:
                _json(text, name, field, dict)
            setattr(msg, f.name, text)
        elif text == "" and f.has_presence:
            continue  # unknown
        elif f.type == _INT64_TYPE:
            setattr(msg, f.name, _int(text, name, field))
        else:
            setattr(msg, f.name, _double(text, name, field))
    return msg


def _format_double(value: float, message: str, field: str) -> str:
    if not math.isfinite(value):
        raise SchemaError(message, field, f"{value!r} is not a finite number")
    return repr(float(value))


def to_fields(msg: Message) -> dict[str, str]:
    """The stream entry or hash of a message, in field-number order, every value a string."""
    descriptor = msg.DESCRIPTOR
    name = descriptor.name
    out = {}
    for field, f in _flat(descriptor).items():
        value = getattr(msg, f.name)
        if f.type == _STRING:
            if f.full_name in JSON_OBJECT_FIELDS:
                _json(value, name, field, dict)
            out[field] = value
        elif f.has_presence and not msg.HasField(f.name):
            out[field] = ""
        elif f.type == _INT64_TYPE:
            out[field] = str(value)
        else:
            out[field] = _format_double(value, name, field)
    return out


def _json_number(value, integral: bool, message: str, field: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(message, field, f"{value!r} is not a finite JSON number")
    if not integral:
        return float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise SchemaError(message, field, f"{value!r} is not an integer (int64)")
        value = int(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise SchemaError(message, field, f"{value} is out of the int64 range")
    return value


def version_from_field(name, value) -> VersionSummary:
    """One field of ``{prefix}:versions:{key}``: its name and its value (str or bytes)."""
    message = VersionSummary.DESCRIPTOR.name
    fields = {f.name: f for f in VersionSummary.DESCRIPTOR.fields}
    label = _text(name, message, "(hash field name)")
    pair = _json(label, message, f"(hash field name) {label}", list)
    if len(pair) != 2 or not all(isinstance(v, str) for v in pair):
        raise SchemaError(message, f"(hash field name) {label}",
                          "is not a JSON array of two strings [service.version, vcs.ref.head.revision]")
    members = _json(_text(value, message, label), message, label, dict)
    expected = [f for f in fields if f not in VERSION_NAME_FIELDS]
    for member in members:
        if member not in expected:
            raise SchemaError(message, member, f"in {label} is not in the schema (unknown field)")
    for member in expected:
        if member not in members:
            raise SchemaError(message, member, f"in {label} is missing")
    msg = VersionSummary(**dict(zip(VERSION_NAME_FIELDS, pair)))
    for member in expected:
        integral = fields[member].type == _INT64_TYPE
        setattr(msg, member, _json_number(members[member], integral, message, member))
    return msg


def version_to_field(msg: VersionSummary) -> tuple[str, str]:
    """The hash field (name, value) of a version summary, as processor/sinks/versions.py names it."""
    name = json.dumps([getattr(msg, f) for f in VERSION_NAME_FIELDS])
    members = {}
    for f in msg.DESCRIPTOR.fields:
        if f.name in VERSION_NAME_FIELDS:
            continue
        value = getattr(msg, f.name)
        if f.type == _DOUBLE_TYPE:
            _format_double(value, msg.DESCRIPTOR.name, f.name)
        members[f.name] = value
    return name, json.dumps(members)


def versions_from_hash(key: str, fields: Mapping) -> VersionSummaries:
    """The whole hash ``{prefix}:versions:{key}``."""
    return VersionSummaries(key=key, versions=[version_from_field(n, v) for n, v in fields.items()])


def versions_to_hash(msg: VersionSummaries) -> dict[str, str]:
    return dict(version_to_field(v) for v in msg.versions)


def _json_message(cls: type[M], key: str, text, label: str) -> M:
    """A message of ``cls`` from a JSON object of its fields under their json_name (every
    one but ``key``, which is given); numbers as JSON numbers, a map of numbers as a JSON
    object of them."""
    descriptor = cls.DESCRIPTOR
    message = descriptor.name
    members = _json(_text(text, message, label), message, label, dict)
    fields = {f.json_name: f for f in descriptor.fields if f.name != "key" or key is None}
    for member in members:
        if member not in fields:
            raise SchemaError(message, member, f"in {label} is not in the schema (unknown field)")
    msg = cls(key=key) if key is not None else cls()
    for member, f in fields.items():
        if member not in members:
            raise SchemaError(message, member, f"in {label} is missing")
        value = members[member]
        if f.is_repeated and f.type == _STRING:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SchemaError(message, member, f"in {label} is not a JSON array of strings")
            getattr(msg, f.name).extend(value)
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise SchemaError(message, member, f"in {label} is not a JSON object")
            target = getattr(msg, f.name)
            for k, v in value.items():
                target[k] = _json_number(v, False, message, member)
        elif f.type == _STRING:
            if not isinstance(value, str):
                raise SchemaError(message, member, f"in {label}: {value!r} is not a string")
            setattr(msg, f.name, value)
        else:
            setattr(msg, f.name, _json_number(value, f.type == _INT64_TYPE, message, member))
    return msg


def edges_from_hash(key: str, fields: Mapping) -> Edges:
    """The whole hash ``{prefix}:edges:{key}``: the caller's fields, and a field per callee
    (its key, 16 hex digits) holding a JSON object."""
    own = {f.json_name for f in Edges.DESCRIPTOR.fields if f.name not in ("key", "callees")}
    plain = {}
    callees = []
    for name, value in fields.items():
        label = _text(name, Edges.DESCRIPTOR.name, repr(name))
        if label in own:
            plain[label] = value
        elif _KEY.fullmatch(label):
            callees.append(_json_message(Callee, label, value, label))
        else:
            raise SchemaError(Edges.DESCRIPTOR.name, label, "is not in the schema (unknown field)")
    for name in own:
        if name not in plain:
            raise SchemaError(Edges.DESCRIPTOR.name, name, "is missing")
    msg = Edges(key=key, callees=callees)
    for f in Edges.DESCRIPTOR.fields:
        if f.json_name in plain:
            text = _text(plain[f.json_name], Edges.DESCRIPTOR.name, f.json_name)
            setattr(msg, f.name, text if f.type == _STRING else _int(text, Edges.DESCRIPTOR.name, f.json_name)
                    if f.type == _INT64_TYPE else _double(text, Edges.DESCRIPTOR.name, f.json_name))
    return msg


def verdict_from_field(name, value) -> Verdict:
    """One field of ``{prefix}:verdicts:{environment}:{service}``: its name (the version
    as a JSON array [service.version, vcs.ref.head.revision]) and its value (str or bytes)."""
    message = Verdict.DESCRIPTOR.name
    label = _text(name, message, "(hash field name)")
    pair = _json(label, message, f"(hash field name) {label}", list)
    if len(pair) != 2 or not all(isinstance(v, str) for v in pair):
        raise SchemaError(message, f"(hash field name) {label}",
                          "is not a JSON array of two strings [service.version, vcs.ref.head.revision]")
    msg = _json_message(Verdict, None, value, label)
    if [msg.version, msg.revision] != pair:
        raise SchemaError(message, "version", f"in {label} is not the version in the field's name")
    return msg


def callers_from_hash(fields: Mapping) -> list[Caller]:
    """The hash ``{prefix}:callers:{key}``: one Caller per field (named by the caller's key)."""
    out = []
    for name, value in fields.items():
        label = _text(name, Caller.DESCRIPTOR.name, repr(name))
        if not _KEY.fullmatch(label):
            raise SchemaError(Caller.DESCRIPTOR.name, label, "is not a caller's key (16 hex digits)")
        out.append(_json_message(Caller, label, value, label))
    return out
