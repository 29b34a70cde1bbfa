"""Checkpoints: an engine restored from a checkpoint goes on exactly as the one that wrote it."""

from __future__ import annotations

import pickle

import pytest

from benchmarks.scenarios import generate
from processor.pipeline import checkpoint
from processor.pipeline.engine import Engine
from processor.config import Config

CFG = dict(window=60.0, allowed_lateness=0.0, idle_timeout=1e9)


def _engine(**overrides) -> Engine:
    return Engine(Config.defaults(**(CFG | overrides)), known_keys=set(), clock=lambda: 0.0)


def _events(results) -> list[tuple]:
    return [(e.id, e.type, e.summary) for r in results for e in r.events]


def _baselines(results) -> list[tuple]:
    return [(b.location.key, tuple(sorted(b.fields().items()))) for r in results for b in r.baselines]


@pytest.fixture(scope="module")
def scenario():
    sc = generate(5, services=3, functions_per_service=8, hours=5.0)
    return list(sc)


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
    restored = _engine()
    n = checkpoint.restore(restored, pickle.loads(pickle.dumps(fields)))
    assert n == sum(f is not None for f in straight.frozen) > 0
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
    assert checkpoint.restore(same, fields) == checkpoint.restore(other, fields) > 0
    lid = next(i for i, f in enumerate(same.frozen) if f is not None)
    key = same.windows.tables.locations[lid]
    lid2 = other.windows.tables.location_id(key)
    assert same.frozen[lid] == first.frozen[first.windows.tables.location_id(key)]
    assert repr(same.detectors_of(lid)) == repr(first.detectors_of(first.windows.tables.location_id(key)))
    assert other.frozen[lid2] == other._fresh != same.frozen[lid]
    assert other.baselines.baseline(lid2).fields() == same.baselines.baseline(lid).fields()


def test_fields_of_another_format_are_skipped(scenario, caplog):
    first = _engine()
    for b in scenario[:20]:
        first.ingest(b)
    fields = checkpoint.dumps_dirty(first)
    broken = {name: (b"not a pickle" if i % 2 else blob) for i, (name, blob) in enumerate(fields.items())}
    broken["loc:old"] = pickle.dumps((checkpoint.FORMAT - 1, None))
    restored = _engine()
    n = checkpoint.restore(restored, broken)
    assert 0 < n < checkpoint.restore(_engine(), fields)
    assert "did not load" in caplog.text


def test_location_limit_applies_to_restored_locations(scenario):
    first = _engine()
    for b in scenario[:20]:
        first.ingest(b)
    fields = checkpoint.dumps_dirty(first)
    small = _engine(max_locations=3)
    assert checkpoint.restore(small, fields) == 3


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
