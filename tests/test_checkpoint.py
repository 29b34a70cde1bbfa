"""Checkpoints: an engine restored from a checkpoint goes on exactly as the one that wrote it,
and a checkpoint field is data only: one that is forged or broken is refused, runs nothing,
and leaves the other fields to load."""

from __future__ import annotations

import builtins
import marshal

import numpy as np
import pickle
import struct

import grpc
import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.scenarios import generate
from processor.config import Config
from processor.pipeline import checkpoint
from processor.pipeline.baseline import Baseline
from processor.detect.columns import is_record
from processor.pipeline.engine import Engine, checkpoint_fingerprint
from processor.pipeline.location import Location
from processor.receiver.decode import Batch
from processor.sinks.redis_streams import RedisSink
from tests.otlp import S, encoded

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

CFG = dict(window=60.0, allowed_lateness=0.0, idle_timeout=1e9)
SEC = 1_000_000_000
T0 = 1_700_000_040 * SEC  # a 60 s window boundary


def _engine(**overrides) -> Engine:
    return Engine(Config.defaults(**(CFG | overrides)), known_keys=set(), clock=lambda: 0.0)


def _events(results) -> list[tuple]:
    return [(e.id, e.type, e.summary) for r in results for e in r.events]


def _baselines(results) -> list[tuple]:
    return [(b.location.key, tuple(sorted(b.fields().items()))) for r in results for b in r.baselines]


def _canonical(frozen: bytes) -> bytes:
    """Frozen detector state as marshal version 2 writes it: no references and no interning
    marks, so equal values of the same types (tuple or list, bool or int, every float bit)
    give the same bytes. The engine's own bytes (version 4) also mark each object by its
    reference count at the time, so even ``marshal.dumps(marshal.loads(b))`` differs from ``b``."""
    return marshal.dumps(marshal.loads(frozen), 2)


@pytest.fixture(scope="module")
def scenario():
    sc = generate(5, services=3, functions_per_service=8, hours=5.0)
    return list(sc)


@pytest.fixture(scope="module")
def learned(scenario):
    """An engine past warm-up (half the scenario, every window closed) and its checkpoint."""
    engine = _engine()
    for b in scenario[: len(scenario) // 2]:
        engine.ingest(b)
    engine.flush_all()
    return engine, checkpoint.dumps_dirty(engine)


def _locations(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k.startswith("loc:")}


@pytest.mark.slow
def test_a_restored_engine_raises_the_events_the_running_one_raises(scenario):
    cut = len(scenario) // 2
    straight, first = _engine(), _engine()
    for b in scenario[:cut]:
        straight.ingest(b)
        first.ingest(b)
    # Open windows are what a kill loses: close them in both, as the idle flush would.
    straight.flush_all()
    first.flush_all()
    fields = checkpoint.dumps_dirty(first)
    assert fields and not first.dirty_locations  # taken, and the marks cleared
    # Through bytes, as from Redis: nothing of the first engine is shared with the second.
    assert all(type(v) is bytes for v in fields.values())
    restored = _engine()
    result = checkpoint.restore(restored, dict(fields))
    assert result == checkpoint.Restored(sum(f is not None for f in straight.frozen), 0, 0)
    assert result.locations > 0
    results_straight, results_restored = [], []
    for b in scenario[cut:]:
        results_straight += straight.ingest(b)
        results_restored += restored.ingest(b)
    results_straight += straight.flush_all()
    results_restored += restored.flush_all()
    events = _events(results_straight)
    assert any(t not in ("first_seen",) for _, t, _ in events)  # regressions after the cut
    assert _events(results_restored) == events
    assert _baselines(results_restored) == _baselines(results_straight)


@pytest.mark.slow
def test_a_fresh_engine_relearns_and_misses_what_the_restored_one_sees(scenario):
    # The check above could pass if nothing depended on state: without the checkpoint the
    # second half must give other events (first_seen again, regressions missed in warm-up).
    cut = len(scenario) // 2
    straight, fresh = _engine(), _engine()
    for b in scenario[:cut]:
        straight.ingest(b)
    a = _events(r for b in scenario[cut:] for r in straight.ingest(b))
    b = _events(r for b in scenario[cut:] for r in fresh.ingest(b))
    assert a != b


def test_every_location_comes_back_as_it_was(learned):
    """Field by field: the location, the baseline (its packed sketch byte for byte) and the
    detectors' state, of the same value and types as the engine's own frozen bytes."""
    engine, fields = learned
    tables = engine.windows.tables
    checked = 0
    for loc_id, frozen in enumerate(engine.frozen):
        if frozen is None:
            continue
        loc = tables.locations[loc_id]
        name = checkpoint.location_field(loc.key)
        state = checkpoint.decode(name, fields[name])
        assert state.location == loc and state.location.key == loc.key
        assert (state.location.file, state.location.line, state.location.scope) == (loc.file, loc.line, loc.scope)
        assert state.order == loc_id and state.fingerprint == engine._fingerprint
        saved = marshal.loads(state.detectors)  # (columnar detectors' rows as records of their columns)
        assert any(is_record(s) for s in saved)
        tick = engine.service_ticks[(loc.environment, loc.service)]
        plain = marshal.dumps(engine.detectors.plain(saved, tick))
        assert _canonical(plain) == _canonical(frozen)
        assert marshal.loads(plain) == marshal.loads(frozen)
        original = engine.baselines.baseline(loc_id)
        assert state.baseline.packed_sketch == original.packed_sketch
        assert state.baseline.fields() == original.fields()
        assert state.baseline.to_plain() == original.to_plain()
        checked += 1
    assert checked == 24  # 3 services x 8 functions, every one past warm-up
    for service, first_seen in engine.version_first_seen.items():
        name = checkpoint.service_field(service)
        state = checkpoint.decode(name, fields[name])
        assert state.version_first_seen == first_seen and first_seen
        clock = engine.windows.services[tables.service_id(service)]
        assert (state.max_end, state.closed_through) == (clock.max_end, clock.closed_through)


def test_windows_closed_before_the_checkpoint_stay_closed(scenario):
    first = _engine()
    for b in scenario[:10]:
        first.ingest(b)
    restored = _engine()
    checkpoint.restore(restored, checkpoint.dumps_dirty(first))
    late = restored.windows.stats["late"]
    restored.ingest(scenario[0])  # spans of windows that closed before the checkpoint
    assert restored.windows.stats["late"] - late > 0


def test_detectors_saved_under_other_settings_are_built_anew(scenario):
    first = _engine()
    for b in scenario[:40]:
        first.ingest(b)
    fields = checkpoint.dumps_dirty(first)
    same, other = _engine(), _engine(window=30.0)
    assert checkpoint.restore(same, fields).locations == checkpoint.restore(other, fields).locations > 0
    lid = next(i for i, f in enumerate(same.frozen) if f is not None)
    key = same.windows.tables.locations[lid]
    lid2 = other.windows.tables.location_id(key)
    assert _canonical(same.frozen[lid]) == _canonical(first.frozen[first.windows.tables.location_id(key)])
    assert repr(same.detectors_of(lid)) == repr(first.detectors_of(first.windows.tables.location_id(key)))
    # built anew: every location's detectors alike (a new location's), unlike the restored ones
    assert len({_canonical(f) for f in other.frozen if f is not None}) == 1
    assert len({_canonical(f) for f in same.frozen if f is not None}) > 1
    assert _canonical(other.frozen[lid2]) != _canonical(same.frozen[lid])
    assert other.baselines.baseline(lid2).fields() == same.baselines.baseline(lid).fields()


def test_location_limit_applies_to_restored_locations(scenario):
    first = _engine()
    for b in scenario[:20]:
        first.ingest(b)
    fields = checkpoint.dumps_dirty(first)
    small = _engine(max_locations=3)
    assert checkpoint.restore(small, fields).locations == 3


def test_a_checkpoint_taken_in_parts_holds_every_location(scenario):
    first, second = _engine(), _engine()
    for b in scenario[:20]:
        first.ingest(b)
        second.ingest(b)
    whole = checkpoint.dumps_dirty(second)
    parts = {}
    while first.dirty_locations or first.dirty_services:
        part = checkpoint.dumps_dirty(first, limit=3)
        assert len([k for k in part if k.startswith("loc:")]) <= 3
        parts.update(part)
    assert parts.keys() == whole.keys()


def test_a_location_whose_state_is_not_plain_data_is_left_out_and_logged(scenario, caplog):
    engine = _engine()
    for b in scenario[:20]:
        engine.ingest(b)
    lid = next(i for i, f in enumerate(engine.frozen) if f is not None)
    # A detector (here the exceptions' columns) holding a list: msgpack gives it back a tuple
    exceptions = next(c for c in engine.detectors.columns.values() if hasattr(c, "known"))
    _, windows, warm_ns = exceptions.row(lid)
    exceptions.put(lid, ({"TimeoutError": [1.0, 2.0]}, windows, warm_ns))
    engine.dirty_locations.add(lid)
    fields = checkpoint.dumps_dirty(engine)
    key = engine.windows.tables.locations[lid].key
    assert checkpoint.location_field(key) not in fields and len(_locations(fields)) > 0
    assert "not checkpointed" in caplog.text and "list is not plain data" in caplog.text
    # Rows the numpy steps wrote are not checked again; this one is, at every checkpoint
    caplog.clear()
    checked = [i for i, f in enumerate(engine.frozen) if f is not None and i != lid]
    assert all(engine.detectors.to_check(i) == [] for i in checked)  # (their rows were checked)
    assert engine.detectors.to_check(lid) != []
    engine.dirty_locations.add(lid)
    assert checkpoint.location_field(key) not in checkpoint.dumps_dirty(engine)
    assert "list is not plain data" in caplog.text


# --- format 2, and what is refused -------------------------------------------------------

class _Touch:
    """A pickle whose loading creates a file: what a forged format-2 field would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _SetGlobal:
    def __reduce__(self):
        return (exec, ("import builtins; builtins.BACKFLOW_CHECKPOINT_RAN = True",))


def test_format_2_fields_are_skipped_not_unpickled_and_logged_once(learned, tmp_path, caplog):
    _, fields = learned
    old = {name: pickle.dumps((2, _Touch(tmp_path / name.replace(":", "_"))), protocol=5) for name in fields}
    old["svc:x:y"] = pickle.dumps((2, _SetGlobal()), protocol=pickle.HIGHEST_PROTOCOL)
    result = checkpoint.restore(_engine(), old)
    assert result == checkpoint.Restored(0, 0, len(fields) + 1)
    assert list(tmp_path.iterdir()) == [] and not hasattr(builtins, "BACKFLOW_CHECKPOINT_RAN")
    skipped = [r for r in caplog.records if "another format" in r.getMessage()]
    assert len(skipped) == 1 and str(len(fields) + 1) in skipped[0].getMessage()
    assert "one-time relearn" in skipped[0].getMessage()


def test_a_crafted_pickle_in_redis_is_refused_runs_nothing_and_the_good_fields_restore(
        learned, redis_server, tmp_path, caplog):
    engine, fields = learned
    target = tmp_path / "pwned"
    payloads = {
        "loc:0000000000000001": pickle.dumps(_Touch(target), protocol=5),   # format 2's header
        "loc:0000000000000002": pickle.dumps(_Touch(target), protocol=0),   # text pickle: not MessagePack
        "svc:prod:pwned": pickle.dumps(_SetGlobal(), protocol=2),
    }
    # The payloads are live: unpickled, they would do it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Touch(control), protocol=0)).close()
    assert control.exists()
    control.unlink()

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.delete("crafted:state")
        client.hset("crafted:state", mapping={**fields, **payloads})
        read = RedisSink(client, "crafted", 1000, buffer_limit=10).read_state()
        assert read.keys() == fields.keys() | payloads.keys()
        restored = _engine()
        result = checkpoint.restore(restored, read)
    finally:
        client.delete("crafted:state")
        client.close()
    assert not target.exists() and not hasattr(builtins, "BACKFLOW_CHECKPOINT_RAN")
    assert list(tmp_path.iterdir()) == []
    assert result == checkpoint.Restored(len(_locations(fields)), malformed=1, other_format=2)
    assert sorted(restored.version_first_seen) == sorted(engine.version_first_seen)
    assert ("checkpoint field 'loc:0000000000000002' refused" in caplog.text
            and "not MessagePack" in caplog.text)


@pytest.mark.e2e
def test_backflow_serve_refuses_a_crafted_pickle_and_counts_it(learned, backflow, redis_client, tmp_path):
    """The same through ``backflow serve``: the process that would hold the TLS key."""
    _, fields = learned
    target = tmp_path / "pwned"
    # (a service's checkpoint is read at its first span: the crafted fields named among its locations)
    name = min(k for k in fields if k.startswith("svc:"))
    state = checkpoint.decode(name, fields[name])
    mine = [k for k in state.locations]
    state.locations = (*mine, "0000000000000001", "0000000000000002")
    redis_client.hset("crafted:state", mapping={
        **fields, name: checkpoint.encode_service(state),
        "loc:0000000000000001": pickle.dumps(_Touch(target), protocol=5),
        "loc:0000000000000002": pickle.dumps(_Touch(target), protocol=0),
    })
    bf = backflow(prefix="crafted")
    assert bf.metrics()["backflow_restored_locations"] == 0
    env, service = state.service
    with grpc.insecure_channel(bf.grpc_target) as ch:
        ch.unary_unary(EXPORT)(encoded([S(state.max_end + 1, service=service, env=env)]), timeout=10)
    metrics = bf.wait_for(lambda: (m := bf.metrics())["backflow_processed_spans_total"] == 1 and m,
                          what="the span processed")
    assert not target.exists()
    assert metrics["backflow_restored_locations"] == len(mine) > 0
    assert metrics['backflow_checkpoint_rejected_fields_total{reason="malformed"}'] == 1
    assert metrics['backflow_checkpoint_rejected_fields_total{reason="other_format"}'] == 1
    assert bf.stop() == 0 and not target.exists()
    assert "one-time relearn" in bf.log and "'loc:0000000000000002' refused" in bf.log


def test_the_good_fields_load_beside_broken_ones(learned, caplog):
    _, fields = learned
    names = sorted(_locations(fields))
    broken = dict(fields)
    for name in names[::2]:
        broken[name] = fields[name][:-7]  # cut short
    result = checkpoint.restore(_engine(), broken)
    assert result == checkpoint.Restored(len(names) - len(names[::2]), len(names[::2]), 0)
    assert "learned again" in caplog.text


class _Field:
    """A location field of the learned engine: its name and the plain map it holds (with a
    short repr, for hypothesis to print)."""

    def __init__(self, fields: dict):
        self.name = min(_locations(fields))
        self.map = msgpack.unpackb(fields[self.name], use_list=False, strict_map_key=False)

    def __repr__(self) -> str:
        return f"<field {self.name}>"


@pytest.fixture(scope="module")
def good(learned) -> _Field:
    return _Field(learned[1])


def _with(d: dict, path: tuple, value) -> dict:
    """``d`` with the value at ``path`` replaced (``...`` as the value: removed)."""
    d = dict(d)
    if len(path) > 1:
        d[path[0]] = _with(d[path[0]], path[1:], value)
    elif value is ...:
        del d[path[0]]
    else:
        d[path[0]] = value
    return d


def _sketch(lo: int, span: int, flags: int, counts: bytes = struct.pack("<d", 1.0)) -> bytes:
    """Packed-sketch bytes as a forger would write them: counts, then the trailer."""
    return counts + struct.pack("<iIB", lo, span, flags)


def _deep_detectors(m: dict) -> bytes:
    """The field with detectors nested 2,000 arrays deep (written by hand: packb refuses)."""
    packer = msgpack.Packer()
    return packer.pack_map_header(len(m)) + b"".join(
        packer.pack(k) + (b"\x91" * 2000 + b"\xc0" if k == "detectors" else packer.pack(v))
        for k, v in m.items())


MALFORMED = [
    # (what, how the plain map changes, or the bytes themselves)
    ("empty", b""),
    ("not MessagePack", b"\xc1\xc1"),
    ("truncated", lambda m: msgpack.packb(m)[:-1]),
    ("trailing bytes", lambda m: msgpack.packb(m) + b"\x00"),
    ("not a map", msgpack.packb([3, "loc"])),
    ("an extension type", lambda m: msgpack.packb(_with(m, ("fingerprint",), msgpack.ExtType(5, b"x")))),
    ("a timestamp", lambda m: msgpack.packb(_with(m, ("order",), msgpack.Timestamp(1, 0)))),
    ("no format", lambda m: msgpack.packb(_with(m, ("format",), ...))),
    ("format not a number", lambda m: msgpack.packb(_with(m, ("format",), "3"))),
    ("a key missing", lambda m: msgpack.packb(_with(m, ("order",), ...))),
    ("a key more", lambda m: msgpack.packb(_with(m, ("code",), "import os"))),
    ("order not an integer", lambda m: msgpack.packb(_with(m, ("order",), 1.5))),
    ("fingerprint not a string", lambda m: msgpack.packb(_with(m, ("fingerprint",), b"x"))),
    ("location a list", lambda m: msgpack.packb(_with(m, ("location",), ["prod", "shop"]))),
    ("location field not a string", lambda m: msgpack.packb(_with(m, ("location", "line"), 12))),
    ("another location than the name's",
     lambda m: msgpack.packb(_with(m, ("location", "function"), "other"))),
    ("baseline not a map", lambda m: msgpack.packb(_with(m, ("baseline",), b"pickle"))),
    ("baseline count NaN", lambda m: msgpack.packb(_with(m, ("baseline", "count"), float("nan")))),
    ("baseline count negative", lambda m: msgpack.packb(_with(m, ("baseline", "errors"), -1.0))),
    ("baseline windows a bool", lambda m: msgpack.packb(_with(m, ("baseline", "windows"), True))),
    ("baseline version short", lambda m: msgpack.packb(_with(m, ("baseline", "version"), ["shop", "1"]))),
    ("sketch a string", lambda m: msgpack.packb(_with(m, ("baseline", "sketch"), "abc"))),
    ("sketch too short", lambda m: msgpack.packb(_with(m, ("baseline", "sketch"), b"\x01\x02"))),
    ("sketch of four billion buckets",  # would allocate 16 GB if unpacked as it says
     lambda m: msgpack.packb(_with(m, ("baseline", "sketch"), _sketch(0, 2**32 - 1, 0x10)))),
    ("sketch of a wrong count type",
     lambda m: msgpack.packb(_with(m, ("baseline", "sketch"), _sketch(0, 1, 0x17)))),
    ("sketch not as pack makes it",  # a whole count as float64: pack stores it in one byte
     lambda m: msgpack.packb(_with(m, ("baseline", "sketch"), _sketch(5, 1, 0x10)))),
    ("sketch counts negative", lambda m: msgpack.packb(_with(m, ("baseline", "sketch"), _sketch(
        5, 1, 0x10, struct.pack("<d", -0.5))))),
    ("sketch counts infinite", lambda m: msgpack.packb(_with(m, ("baseline", "sketch"), _sketch(
        5, 1, 0x10, struct.pack("<d", float("inf")))))),
    ("detectors not a tuple", lambda m: msgpack.packb(_with(m, ("detectors",), {"a": 1}))),
    ("detectors nested too deep", _deep_detectors),
]


@pytest.mark.parametrize("what,change", MALFORMED, ids=[w for w, _ in MALFORMED])
def test_a_malformed_field_is_refused(good, what, change):
    name = good.name
    blob = change(good.map) if callable(change) else change
    with pytest.raises(checkpoint.Malformed):
        checkpoint.decode(name, blob)
    assert checkpoint.restore(_engine(), {name: blob}) == checkpoint.Restored(0, 1, 0)


def test_a_good_field_is_not_refused_by_the_table_s_own_means(good):
    # The table's cases are refused for what they change, not for how the test packs maps.
    assert checkpoint.decode(good.name, msgpack.packb(good.map)).location.key == good.name[4:]


def test_service_fields_are_checked_as_well(learned):
    _, fields = learned
    name = next(k for k in fields if k.startswith("svc:"))
    good = msgpack.unpackb(fields[name], use_list=False, strict_map_key=False)
    assert checkpoint.decode(name, msgpack.packb(good)).service == tuple(name.split(":")[1:])
    for change in [("service",), ["prod"]], [("max_end",), 1.0], [("closed_through",), None], \
            [("version_first_seen",), {"1.0": 5}], [("version_first_seen",), [["shop", "1", "", "5"]]], \
            [("version_first_seen",), [["shop", "1", 5]]], [("extra",), 1]:
        with pytest.raises(checkpoint.Malformed):
            checkpoint.decode(name, msgpack.packb(_with(good, *change)))
    with pytest.raises(checkpoint.Malformed):
        checkpoint.decode("svc:prod:elsewhere", fields[name])
    with pytest.raises(checkpoint.Malformed):
        checkpoint.decode("state:" + name, fields[name])


def test_a_field_of_a_newer_format_is_skipped_as_another_format(good):
    blob = msgpack.packb(_with(good.map, ("format",), checkpoint.FORMAT + 1))
    with pytest.raises(checkpoint.OtherFormat):
        checkpoint.decode(good.name, blob)
    assert checkpoint.restore(_engine(), {good.name: blob}) == checkpoint.Restored(0, 0, 1)


# Any MessagePack value, as a forger could write one.
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12)


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if type(v) is dict:
            yield from _paths(v, prefix + (k,))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_anywhere_in_a_field_is_refused_or_loads_as_data(good, data):
    name = good.name
    path = data.draw(st.sampled_from(sorted(_paths(good.map))))
    blob = msgpack.packb(_with(good.map, path, data.draw(_values)))
    try:
        state = checkpoint.decode(name, blob)
    except (checkpoint.Malformed, checkpoint.OtherFormat):  # (another format: a number put in "format")
        return
    # Accepted: then it is plain data the engine can take (a detector state of the wrong
    # shape is the engine's to handle when it thaws it).
    checkpoint._check_detectors(marshal.loads(state.detectors))
    assert state.baseline is None or isinstance(state.baseline, Baseline)
    assert checkpoint.restore(_engine(), {name: blob}).locations == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_broken_bytes_are_refused_never_raise(good, data):
    name = good.name
    blob = bytearray(msgpack.packb(good.map))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    blob = bytes(blob[: data.draw(st.integers(0, len(blob)))])
    try:
        checkpoint.decode(name, blob)
    except (checkpoint.Malformed, checkpoint.OtherFormat):
        pass
    result = checkpoint.restore(_engine(), {name: blob, "svc:a:b": data.draw(st.binary(max_size=64))})
    assert result.locations + result.malformed + result.other_format >= 1


def test_detector_state_of_the_wrong_shape_is_relearned_not_a_crash_later(good, scenario, caplog):
    """Plain data that passes the type checks but does not fit the detectors (too few of
    them, a state cut short): the location is restored with fresh detectors, and its next
    windows are judged without error."""
    detectors = good.map["detectors"]
    # ... or a latency state the detector thaws but its columns cannot hold (a load fit cut
    # to 20 of its 21 sums)
    latency = detectors[0]
    (fit, n), *rest = latency[2]
    cut = (*latency[:2], ((fit[:160], n), *rest), *latency[3:])
    for shape in (detectors[:2], tuple(s[:1] if isinstance(s, tuple) else s for s in detectors),
                  (cut, *detectors[1:])):
        engine = _engine()
        field = msgpack.packb(_with(good.map, ("detectors",), shape), use_bin_type=True)
        assert checkpoint.restore(engine, {good.name: field}).locations == 1
        lid = next(i for i, f in enumerate(engine.frozen) if f is not None)
        assert [type(d).__name__ for d in engine.detectors_of(lid)] == [
            type(d).__name__ for d in engine.detectors.prototypes]
        assert marshal.loads(engine.detectors.state(lid)) == marshal.loads(engine.detectors.fresh)
        for batch in scenario[len(scenario) // 2:][:50]:
            engine.ingest(batch)
        engine.flush_all()
    assert "learn again" in caplog.text


def _sparse_batch(w: int, present: list[int]) -> "Batch":
    from processor.pipeline.location import Location

    sec = 1_000_000_000
    n = 30 * len(present)
    rng = np.random.default_rng(w)
    end = 1_700_000_040 * sec + w * 60 * sec + np.sort(rng.integers(0, 55 * sec, n))
    dur = rng.lognormal(np.log(5e6), 0.4, n).astype(np.int64)
    return Batch(locations=[Location("prod", "shop", f"f{i}") for i in present],
                 versions=[("shop", "1.0" if w < 70 else "2.0", "")],
                 loc=np.tile(np.arange(len(present), dtype=np.int32), 30), ver=np.zeros(n, np.int32),
                 start=end - dur, end=end, error=np.zeros(n, bool),
                 trace_id=np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16) | 1)


def test_checkpoints_that_skip_unchanged_absent_locations_restore_the_same_engine():
    """Checkpoints taken window by window rewrite only what changed: an absent location's
    field stays as it was. Restored from those fields, an engine raises the events of the
    one that kept running: locations that fell silent (dormant) before and after the cut,
    one silent across the cut that comes back, rare ones."""
    def present(w):
        on = [i for i in range(6) if w < 50 or i < 2]           # f2..f5 fall silent at 50
        on += [6] if not 40 <= w < 65 else []                   # f6: silent across the cut, back at 65
        on += [7] if w % 9 == 0 else []                         # f7: rare
        return on

    straight, first = _engine(), _engine()
    redis_state: dict = {}
    cut, end = 55, 110
    skipped = 0
    for w in range(cut):
        straight.ingest(_sparse_batch(w, present(w)))
        results = first.ingest(_sparse_batch(w, present(w)))
        fields = checkpoint.dumps_dirty(first)
        # only what changed is rewritten: the window's locations, and those found silent
        changed = {lw.location.key for r in results for lw in r.window.locations}
        changed |= {e.location.key for r in results for e in r.events if e.type == "dormant"}
        rewritten = {k for k in fields if k.startswith("loc:")}
        assert rewritten == {checkpoint.location_field(k) for k in changed}
        skipped += len(first.service_locations[("prod", "shop")]) - len(rewritten) if results else 0
        redis_state.update(fields)
    assert skipped > 20
    straight.flush_all()
    first.flush_all()
    redis_state.update(checkpoint.dumps_dirty(first))
    restored = _engine()
    checkpoint.restore(restored, dict(redis_state))
    a, b = [], []
    for w in range(cut, end):
        a += straight.ingest(_sparse_batch(w, present(w)))
        b += restored.ingest(_sparse_batch(w, present(w)))
    a += straight.flush_all()
    b += restored.flush_all()
    events = _events(a)
    assert {t for _, t, _ in events} >= {"dormant", "resolved"}
    assert _events(b) == events
    keys = {loc.key: i for i, loc in enumerate(straight.windows.tables.locations) if loc}
    for i, loc in enumerate(restored.windows.tables.locations):
        if loc:
            assert _canonical(restored.frozen[i]) == _canonical(straight.frozen[keys[loc.key]])


def test_fields_written_before_the_window_count_restore_without_relearning(learned, caplog):
    """Before ``ticks``, a service field had no window count and the dormant state seven
    fields (rewritten every window, so current): such fields restore as they are."""
    engine, fields = learned
    dormant = [type(d).__name__ for d in engine.detectors.prototypes].index("Dormant")
    old = {}
    for name, blob in fields.items():
        d = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        if name.startswith("svc:"):
            del d["ticks"]
        else:
            d["detectors"][dormant] = d["detectors"][dormant][:7]
        old[name] = msgpack.packb(d, use_bin_type=True)
    restored = _engine()
    assert checkpoint.restore(restored, old).locations == len(_locations(fields))
    assert "learn again" not in caplog.text
    lid = next(i for i, f in enumerate(restored.frozen) if f is not None)
    assert restored.detectors_of(lid)[dormant].windows > 0  # its state, not a fresh one


def test_fields_with_the_settings_text_as_fingerprint_restore_without_relearning(learned):
    """Fields keep a digest of the detector settings; those written before kept the text
    itself (about a kilobyte per location), and must restore as they are."""
    engine, fields = learned
    fp = msgpack.unpackb(next(iter(_locations(fields).values())), raw=False)["fingerprint"]
    assert len(fp) == 32 and fp == engine._fingerprint
    text = checkpoint_fingerprint(engine.cfg, whole=True)
    assert len(text) > 200 and text != fp
    old = {}
    for name, blob in fields.items():
        d = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        if name.startswith("loc:"):
            d["fingerprint"] = text
        old[name] = msgpack.packb(d, use_bin_type=True)
    restored, relearned = _engine(), _engine(window=30.0)
    assert checkpoint.restore(restored, old).locations == len(_locations(fields))
    checkpoint.restore(relearned, old)
    lid = next(i for i, f in enumerate(restored.frozen) if f is not None)
    assert _canonical(restored.frozen[lid]) == _canonical(engine.frozen[lid])
    # the digest still tells other settings apart: those are built anew
    assert len({_canonical(f) for f in relearned.frozen if f is not None}) == 1


def _wide_window(w: int, locs: list, rng) -> Batch:
    """A window of a service of many locations (windows taken in numpy, rows kept in the
    columns): 80% of them present, 5 spans each; from window 40 the first ten are 3x slower
    and the next five fail half their calls."""
    sel = np.flatnonzero(rng.random(len(locs)) < 0.8)
    n = len(sel) * 5
    end = T0 + w * 60 * SEC + np.sort(rng.integers(0, 55 * SEC, n))
    loc = np.tile(np.arange(len(sel), dtype=np.int32), 5)
    slow = (w >= 40) & (sel[loc] < 10)
    dur = (rng.lognormal(np.log(5e6), 0.3, n) * np.where(slow, 3.0, 1.0)).astype(np.int64)
    error = (w >= 40) & (sel[loc] >= 10) & (sel[loc] < 15) & (rng.random(n) < 0.5)
    return Batch(locations=[locs[i] for i in sel], versions=[("shop", "1.0", "")], loc=loc,
                 ver=np.zeros(n, np.int32), start=end - dur, end=end, error=error,
                 trace_id=np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16) | 1)


def test_rows_kept_in_columns_come_back_from_their_records():
    """Detectors whose rows live in their columns are checkpointed as records of them: an
    engine restored from those raises the same events and ends in the same state as the one
    that went on."""
    locs = [Location("prod", "shop", f"shop.mod.f{i}") for i in range(40)]
    rng = np.random.default_rng(11)
    batches = [_wide_window(w, locs, rng) for w in range(70)]
    straight, fields = _engine(), {}
    for b in batches[:35]:
        straight.ingest(b)
        fields.update(checkpoint.dumps_dirty(straight))
    straight.flush_all()  # (the open window too, as serve does when it stops)
    fields.update(checkpoint.dumps_dirty(straight))
    saved = [marshal.loads(checkpoint.decode(n, v).detectors) for n, v in fields.items() if n.startswith("loc:")]
    columnar = straight.detectors.columns
    assert all(all(is_record(s) for j, s in enumerate(states) if j in columnar) for states in saved)
    restored = _engine()
    checkpoint.restore(restored, fields)
    a = _events(r for b in batches[35:] for r in straight.ingest(b))
    b = _events(r for b in batches[35:] for r in restored.ingest(b))
    assert {t for _, t, _ in a} >= {"latency_regression", "error_regression"} and a == b
    assert [_canonical(f) for f in restored.frozen] == [_canonical(f) for f in straight.frozen]


def test_a_record_that_does_not_fit_its_columns_is_relearned(caplog):
    """Records cut short, with other values of the wrong kind, or a ring that disagrees with
    its flag: that location's detectors learn again; a sound field beside it comes back."""
    locs = [Location("prod", "shop", f"shop.mod.f{i}") for i in range(40)]
    rng = np.random.default_rng(11)
    engine, fields = _engine(), {}
    for w in range(90):  # (the scaling detector's ring comes after its 60 windows of warm-up)
        engine.ingest(_wide_window(w, locs, rng))
        fields.update(checkpoint.dumps_dirty(engine))
    names = sorted(n for n in fields if n.startswith("loc:"))
    bad_name, good_name = names[0], names[1]
    data = msgpack.unpackb(fields[bad_name], use_list=False, raw=False, strict_map_key=False)
    latency, errors, _, scaling, dormant = data["detectors"][:5]
    assert scaling[2][1] is not None  # (past warm-up: the ring is there)
    wrong = [
        (latency[0], latency[1][:-8], latency[2]),                     # bytes cut short
        (latency[0], latency[1], latency[2][:-1]),                     # a value missing
        (latency[0], latency[1], (*latency[2][:5], b"\0" * 24)),       # pending windows the flag does not count
        (scaling[0], scaling[1], (scaling[2][0], scaling[2][1][:-24])),  # a ring cut short
        (dormant[0], dormant[1], (dormant[2][0], "34")),               # a tick that is not a number
        (dormant[0], dormant[1][:41] + struct.pack("<q", -2**62), dormant[2]),  # its last window long before 0
    ]
    for k, record in enumerate(wrong):
        j = 3 if k == 3 else 4 if k >= 4 else 0
        states = list(data["detectors"])
        states[j] = record
        field = msgpack.packb({**data, "detectors": tuple(states)}, use_bin_type=True)
        restored = _engine()
        svc = [n for n in fields if n.startswith("svc:")]
        assert checkpoint.restore(restored, {bad_name: field, good_name: fields[good_name],
                                             **{n: fields[n] for n in svc}}).locations == 2
        ids = {restored.windows.tables.locations[i].key: i for i, f in enumerate(restored.frozen) if f is not None}
        bad, good = (ids[n.removeprefix("loc:")] for n in (bad_name, good_name))
        fresh = marshal.loads(restored.detectors.fresh)  # (the dormant detector's at the service's tick)
        assert marshal.loads(restored.detectors.state(bad)) == (*fresh[:4], (*fresh[4][:8], 89), *fresh[5:]), k
        assert marshal.loads(restored.detectors.state(good)) == marshal.loads(
            engine.detectors.state(engine.windows.tables.location_id(restored.windows.tables.locations[good]))), k
    assert caplog.text.count("learn again") == len(wrong)
