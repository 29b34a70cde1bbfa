"""proto/backflow/v1: the committed classes are current, the schema names what the code
writes, and the converter is strict (docs/schema.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FieldDescriptorType

from processor.events import Event as EventRecord
from processor.pipeline.baseline import Baseline as BaselineRecord
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.schema import (
    Baseline,
    Callee,
    Caller,
    Edges,
    Event,
    SchemaError,
    VersionSummaries,
    VersionSummary,
    conformance,
    from_fields,
    generate,
    to_fields,
    version_from_field,
    version_to_field,
    versions_from_hash,
    versions_to_hash,
)

LOC = Location("prod", "shop", "shop.cart.apply_discount", "shop/cart.py", "42", "shop.instrumentation")


def event_record(**kw) -> dict[str, str]:
    e = EventRecord(kw.pop("type", "latency_regression"), LOC, ("shop", "1.4.3", "9f2c4e1"),
                    1_700_000_000_000_000_000, 1_700_000_060_000_000_000, "warning",
                    "p99 of shop.cart.apply_discount rose 2.1x (120 ms to 252 ms) in 1.4.3",
                    {"quantile": "p99", "baseline_ms": 120.0, "current_ms": 252.5, "exemplars": ["ab" * 16]})
    return e.fields(kw.pop("owners", "@shop-team"))


def baseline_record(values_ms=(10, 12, 15, 40), windows=3) -> dict[str, str]:
    b = BaselineRecord(LOC, LogSketch.from_values(np.array(values_ms, dtype=np.int64) * 1_000_000),
                       count=len(values_ms), errors=1, seconds=60.0, windows=windows,
                       updated_ns=1_700_000_060_000_000_000, version=("shop", "1.4.3", "9f2c4e1"))
    return b.fields()


# --- the committed classes are the ones the .proto files give -------------------------------

def test_committed_classes_are_what_protoc_generates_from_proto(tmp_path):
    made = generate.generate(tmp_path)
    committed = sorted(p.relative_to(generate.OUT) for p in (generate.OUT / generate.PACKAGE).glob("*_pb2.py*"))
    assert made == committed, "run: .venv/bin/python -m processor.schema.generate"
    assert len(made) == 2 * len(generate.protos()) >= 6
    stale = [str(p) for p in made if (tmp_path / p).read_bytes() != (generate.OUT / p).read_bytes()]
    assert not stale, f"stale generated files {stale}: run .venv/bin/python -m processor.schema.generate"


# --- the schema names what Backflow writes ------------------------------------------------------

def test_every_field_is_named_by_the_rule_dots_as_underscores():
    for cls in (Event, Baseline, VersionSummary, VersionSummaries, Edges, Callee, Caller):
        for f in cls.DESCRIPTOR.fields:
            assert f.name == f.json_name.replace(".", "_"), f.full_name


def test_event_fields_are_the_events_written_in_their_order():
    assert [f.json_name for f in Event.DESCRIPTOR.fields] == list(event_record())


def test_baseline_fields_are_the_hash_written_in_their_order():
    assert [f.json_name for f in Baseline.DESCRIPTOR.fields] == list(baseline_record())


def test_what_backflow_writes_converts_and_comes_back_the_same():
    fields = event_record()
    e = from_fields(Event, fields)
    assert (e.type, e.code_line_number, e.window_start, e.window_end) == (
        "latency_regression", "42", 1_700_000_000_000, 1_700_000_060_000)
    assert json.loads(e.detail)["quantile"] == "p99"
    assert to_fields(e) == fields
    fields = baseline_record()
    b = from_fields(Baseline, fields)
    assert (b.count, b.windows, b.updated) == (4, 3, 1_700_000_060_000)
    assert b.HasField("p99_ms") and b.p99_ms == float(fields["p99_ms"])
    assert from_fields(Baseline, to_fields(b)) == b
    assert {k: float(v) for k, v in to_fields(b).items() if k.endswith("_ms")} == \
           {k: float(v) for k, v in fields.items() if k.endswith("_ms")}


def test_bytes_from_redis_convert_like_text():
    fields = {k.encode(): v.encode() for k, v in event_record().items()}
    assert to_fields(from_fields(Event, fields)) == event_record()


def test_an_empty_optional_number_is_unknown_and_stays_empty():
    fields = {**baseline_record(), "p999_ms": "", "rate_per_s": ""}
    b = from_fields(Baseline, fields)
    assert not b.HasField("p999_ms") and not b.HasField("rate_per_s") and b.HasField("p50_ms")
    assert to_fields(b) == fields


@pytest.mark.e2e
def test_what_the_redis_sink_writes_converts(redis_server, redis_client):
    """Events, baseline and a version summary merged twice, by the real sink in a real Redis."""
    import redis as redis_py

    from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures
    from processor.sinks.redis_streams import RedisSink

    sink = RedisSink(redis_py.Redis.from_url(redis_server.url), "t", events_maxlen=1000, buffer_limit=1000)
    sink.start()
    sk = LogSketch.from_values(np.array([20, 21, 80], dtype=np.int64) * 1_000_000)
    for w in range(2):
        start, end = (1_700_000_000 + 60 * w) * 10 ** 9, (1_700_000_060 + 60 * w) * 10 ** 9
        lw = LocationWindow(0, LOC, 3, 1, sk, [VersionFigures(("shop", "1.4.3", "9f2c4e1"), 3, 1, sk)])
        e = EventRecord("first_seen" if w == 0 else "dormant", LOC, ("shop", "1.4.3", "9f2c4e1"), start, end,
                        "info", "first call", {"count": 3})
        b = BaselineRecord(LOC, sk, count=3 * (w + 1), errors=w + 1, seconds=60.0 * (w + 1), windows=w + 1,
                           updated_ns=end, version=("shop", "1.4.3", "9f2c4e1"))
        sink.submit([e], [(LOC.key, b)], window=ClosedWindow("shop", start, end, [lw], "prod"))
        assert sink.flush(10)
    sink.stop(5)
    t = conformance.check(redis_py.Redis.from_url(redis_server.url), "t")
    assert (len(t.events), len(t.baselines), len(t.versions), t.problems) == (2, 1, 1, [])
    [(name, value)] = redis_client.hgetall(f"t:versions:{LOC.key}").items()
    v = version_from_field(name, value)
    assert (v.service_version, v.vcs_ref_head_revision, v.calls, v.errors, v.windows, v.seconds) == (
        "1.4.3", "9f2c4e1", 6, 2, 2, 120.0)
    assert (v.first, v.last) == (1_700_000_000_000, 1_700_000_120_000) and v.p50_ms > 0
    assert set(json.loads(value)) == {f.name for f in VersionSummary.DESCRIPTOR.fields} - {
        "service_version", "vcs_ref_head_revision"}
    again = versions_from_hash(LOC.key, dict([version_to_field(v)]))
    assert again == VersionSummaries(key=LOC.key, versions=[v])
    assert versions_to_hash(again) == {name: version_to_field(v)[1]}
    b = from_fields(Baseline, redis_client.hgetall(f"t:baseline:{LOC.key}"))
    assert (b.count, b.windows, b.error_rate) == (6, 2, float(f"{2 / 6:.6g}"))


# --- strictness: every error names the field ----------------------------------------------------

@pytest.mark.parametrize("change, field, words", [
    ({"colour": "red"}, "colour", "unknown field"),
    ({"window.start": None}, "window.start", "missing"),
    ({"window.start": ""}, "window.start", "not an integer"),
    ({"window.end": "1.7e12"}, "window.end", "not an integer"),
    ({"window.end": " 17"}, "window.end", "not an integer"),
    ({"window.end": "017"}, "window.end", "not an integer"),
    ({"window.end": str(2 ** 63)}, "window.end", "int64 range"),
    ({"detail": "count=3"}, "detail", "not JSON"),
    ({"detail": "[1, 2]"}, "detail", "not a JSON object"),
    ({"detail": '{"p": NaN}'}, "detail", "not JSON"),
    ({"detail": '{"a": 1, "a": 2}'}, "detail", "twice"),
    ({"owners": b"\xff"}, "owners", "not UTF-8"),
])
def test_an_event_that_does_not_conform_is_an_error_naming_the_field(change, field, words):
    fields = event_record()
    for k, v in change.items():
        if v is None:
            del fields[k]
        else:
            fields[k] = v
    with pytest.raises(SchemaError, match=words) as e:
        from_fields(Event, fields)
    assert e.value.field == field and repr(field) in str(e.value)


@pytest.mark.parametrize("change, field, words", [
    ({"count": ""}, "count", "not an integer"),
    ({"count": "4.0"}, "count", "not an integer"),
    ({"p50_ms": "fast"}, "p50_ms", "not a finite decimal"),
    ({"p50_ms": "nan"}, "p50_ms", "not a finite decimal"),
    ({"p50_ms": "inf"}, "p50_ms", "not a finite decimal"),
    ({"p50_ms": "1e999"}, "p50_ms", "not a finite decimal"),
    ({"p50_ms": "1_000"}, "p50_ms", "not a finite decimal"),
    ({"error_rate": "0x1"}, "error_rate", "not a finite decimal"),
    ({"window.start": "1"}, "window.start", "unknown field"),
])
def test_a_baseline_that_does_not_conform_is_an_error_naming_the_field(change, field, words):
    with pytest.raises(SchemaError, match=words) as e:
        from_fields(Baseline, {**baseline_record(), **change})
    assert e.value.field == field


def test_decimal_numbers_in_the_forms_python_and_redis_write_them_parse():
    for text, value in [("0", 0.0), ("1.5", 1.5), ("1e+06", 1e6), ("2.5E-3", 0.0025), ("-0.25", -0.25),
                        (".5", 0.5), ("7.", 7.0), ("120", 120.0)]:
        assert from_fields(Baseline, {**baseline_record(), "p50_ms": text}).p50_ms == value


def test_a_message_that_cannot_be_written_is_an_error_too():
    e = from_fields(Event, event_record())
    e.detail = "not json"
    with pytest.raises(SchemaError, match="detail"):
        to_fields(e)
    b = from_fields(Baseline, baseline_record())
    b.p50_ms = math.inf
    with pytest.raises(SchemaError, match="p50_ms"):
        to_fields(b)


GOOD_VALUE = json.dumps({"calls": 4, "errors": 0, "windows": 1, "seconds": 60, "p50_ms": 10.5, "p99_ms": 12,
                         "first": 1_700_000_000_000, "last": 1_700_000_060_000})


@pytest.mark.parametrize("name, value, field, words", [
    ('["1.0"]', GOOD_VALUE, '(hash field name) ["1.0"]', "two strings"),
    ("1.0", GOOD_VALUE, "(hash field name) 1.0", "not a JSON array"),
    ("shop 1.0", GOOD_VALUE, "(hash field name) shop 1.0", "not JSON"),
    ('["1.0", 3]', GOOD_VALUE, '(hash field name) ["1.0", 3]', "two strings"),
    ('["1.0", ""]', "{}", "calls", "missing"),
    ('["1.0", ""]', GOOD_VALUE[:-1] + ', "p90_ms": 1}', "p90_ms", "unknown field"),
    ('["1.0", ""]', GOOD_VALUE.replace('"calls": 4', '"calls": 4.5'), "calls", "not an integer"),
    ('["1.0", ""]', GOOD_VALUE.replace('"calls": 4', '"calls": "4"'), "calls", "not a finite JSON number"),
    ('["1.0", ""]', GOOD_VALUE.replace('"errors": 0', '"errors": false'), "errors", "not a finite JSON number"),
    ('["1.0", ""]', GOOD_VALUE.replace('"seconds": 60', '"seconds": null'), "seconds", "not a finite JSON number"),
    ('["1.0", ""]', "not a hash value", '["1.0", ""]', "not JSON"),
])
def test_a_version_summary_that_does_not_conform_is_an_error_naming_the_field(name, value, field, words):
    with pytest.raises(SchemaError, match=words) as e:
        version_from_field(name, value)
    assert e.value.field == field


def test_an_integer_redis_wrote_in_exponent_form_is_still_an_integer():
    v = version_from_field('["1.0", ""]', GOOD_VALUE.replace('"calls": 4', '"calls": 1e+15'))
    assert v.calls == 10 ** 15


def test_nested_messages_have_no_flat_mapping():
    with pytest.raises(TypeError, match="no Redis mapping"):
        from_fields(VersionSummaries, {})


# --- the conformance check over a whole Redis ---------------------------------------------------

@pytest.mark.e2e
def test_conformance_counts_every_record_and_names_what_does_not_conform(redis_server, redis_client):
    import redis as redis_py
    for n in range(3):
        redis_client.xadd("p:events", event_record())
    redis_client.xadd("p:events", {**event_record(), "window.end": "later"})
    redis_client.hset(f"p:baseline:{LOC.key}", mapping=baseline_record())
    redis_client.hset("p:baseline:other", mapping=baseline_record())  # its key field says LOC.key
    redis_client.hset("p:versions:k1", mapping={'["1.0", ""]': GOOD_VALUE, '["2.0", ""]': "{}"})
    redis_client.set("p:baseline:not-a-hash", "left alone")
    redis_client.xadd("q:events", event_record())

    raw = redis_py.Redis.from_url(redis_server.url)  # bytes: text that is not UTF-8 is reported
    assert conformance.prefixes(raw) == {"p", "q"}
    t = conformance.check(raw, "p", batch=2)
    assert (len(t.events), len(t.baselines), len(t.versions)) == (4, 2, 2)
    assert len(t.problems) == 3, t.problems
    assert "p:events entry" in t.problems[0] and "'window.end'" in t.problems[0]
    assert t.problems[1].startswith("p:baseline:other: Baseline field 'key'")
    assert t.problems[2].startswith("p:versions:k1: VersionSummary field 'calls'")
    assert conformance.main(["--redis-url", redis_server.url, "--prefix", "q"]) == 0
    assert conformance.main(["--redis-url", redis_server.url]) == 1


# --- docs/schema.md shows the messages as they are ----------------------------------------------

def test_the_tables_of_docs_schema_md_are_the_messages():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "schema.md").read_text()
    names = {FieldDescriptorType.TYPE_STRING: "string", FieldDescriptorType.TYPE_INT64: "int64",
             FieldDescriptorType.TYPE_DOUBLE: "double"}
    for cls in (Event, Baseline, VersionSummary):
        rows = []
        for f in cls.DESCRIPTOR.fields:
            kind = ("optional " if f.has_presence else "") + names[f.type]
            redis_name = f"`{f.json_name}`" if cls is not VersionSummary or f.index > 1 else f"name\\[{f.index}\\]"
            rows.append(f"| {redis_name} | `{f.name}` | {kind} |")
        assert "\n".join(rows) in text, f"docs/schema.md: the table of {cls.DESCRIPTOR.name}"
    assert "\n".join(graph_rows(cls) for cls in (Edges, Callee, Caller)) in text, "docs/schema.md: call graph"


def graph_rows(cls) -> str:
    """The table of a call-graph message as docs/schema.md shows it."""
    names = {FieldDescriptorType.TYPE_STRING: "string", FieldDescriptorType.TYPE_INT64: "int64",
             FieldDescriptorType.TYPE_DOUBLE: "double", FieldDescriptorType.TYPE_MESSAGE: "map<string, double>"}
    special = {"key": "(the hash's name)" if cls is Edges else "(the hash field's name)",
               "callees": "(a field per callee)"}
    rows = [f"`{cls.DESCRIPTOR.name}`:", "", "| Redis field or JSON member | proto field | type |", "|---|---|---|"]
    for f in cls.DESCRIPTOR.fields:
        kind = "repeated Callee" if f.name == "callees" else names[f.type]
        rows.append(f"| {special.get(f.name, f'`{f.json_name}`')} | `{f.name}` | {kind} |")
    return "\n".join(rows) + "\n"


def test_the_verdict_table_of_docs_schema_md_is_the_message_and_a_bad_verdict_names_its_field():
    import json
    from pathlib import Path

    from processor.schema import SchemaError, Verdict, verdict_from_field

    text = (Path(__file__).resolve().parents[1] / "docs" / "schema.md").read_text()
    names = {FieldDescriptorType.TYPE_STRING: "string", FieldDescriptorType.TYPE_INT64: "int64",
             FieldDescriptorType.TYPE_DOUBLE: "double"}
    rows = [f"| `{f.json_name}` | `{f.name}` | {'repeated ' if f.is_repeated else ''}{names[f.type]} |"
            for f in Verdict.DESCRIPTOR.fields]
    assert "\n".join(rows) in text, "docs/schema.md: the table of Verdict"
    good = {"environment": "prod", "service": "shop", "version": "1.1", "revision": "", "previous": "1.0",
            "previous_revision": "", "verdict": "fail", "reasons": ["p50 of f 2x"], "missing": [],
            "milestone": "share_10", "share": 0.1, "state": "active", "calls": 300, "started": 1, "updated": 2}
    msg = verdict_from_field('["1.1", ""]', json.dumps(good))
    assert list(msg.reasons) == ["p50 of f 2x"] and msg.calls == 300
    for change, field in (({"reasons": "p50 of f 2x"}, "reasons"), ({"calls": "300"}, "calls"),
                          ({"extra": 1}, "extra"), ({"version": "1.2"}, "version")):
        with pytest.raises(SchemaError, match=field):
            verdict_from_field('["1.1", ""]', json.dumps({**good, **change}))
    with pytest.raises(SchemaError, match="not a JSON array of two strings"):
        verdict_from_field('["1.1"]', json.dumps(good))
