"""How the engine keeps each location's state between windows: the baseline stage's columns,
one packed sketch shared with the latency detector while the two agree, and the detectors
frozen into one bytes object per location."""

import numpy as np

from processor.pipeline.engine import Engine
from processor.config import Config
from processor.detect.registry import DetectorSettings
from processor.pipeline.location import Location
from processor.receiver.decode import Batch

SEC = 1_000_000_000
T0 = 1_700_000_040 * SEC  # a 60 s window boundary
LOC = Location("prod", "shop", "shop.cart.apply")


def config(**detectors) -> Config:
    values = {("", "warmup_windows"): 10, ("scaling", "warmup_windows"): 10}
    values.update({tuple(k.split("__")): v for k, v in detectors.items()})
    return Config.defaults(allowed_lateness=0.0, detectors=DetectorSettings(values))


def window(w: int, slower_from: int, rng) -> Batch:
    n = 300
    end = T0 + w * 60 * SEC + np.sort(rng.integers(0, 55 * SEC, n))
    level = 40e6 if w >= slower_from else 20e6
    dur = rng.lognormal(np.log(level), 0.3, n).astype(np.int64)
    return Batch(locations=[LOC], versions=[("shop", "1.0", "")], loc=np.zeros(n, np.int32),
                 ver=np.zeros(n, np.int32), start=end - dur, end=end, error=np.zeros(n, bool),
                 trace_id=np.frombuffer(rng.bytes(16 * n), np.uint8).reshape(n, 16) | 1)


def run(engine: Engine, windows: int, slower_from: int):
    """Per window: (events, published baselines, the latency detector's state after it)."""
    rng = np.random.default_rng(5)
    out = []
    for w in range(windows + 1):  # the last batch closes the last window
        for r in engine.ingest(window(w, slower_from, rng)):
            lid = r.window.locations[0].loc_id
            latency = [d for d in engine.detectors_of(lid) if type(d).__name__ == "LatencyShift"]
            out.append((r.events, r.baselines, latency[0] if latency else None))
    return out


def test_published_baselines_are_the_stages_own_while_a_regression_holds_the_detectors_still():
    with_latency = run(Engine(config(), known_keys=set()), 60, slower_from=30)
    without = run(Engine(config(latency__enabled=False), known_keys=set()), 60, slower_from=30)
    opened = [i for i, (events, _, _) in enumerate(with_latency)
              if any(e.type == "latency_regression" for e in events)]
    assert opened and 30 <= opened[0] < 45
    for (_, published, latency), (_, reference, _) in zip(with_latency, without):
        assert [b.fields() for b in published] == [b.fields() for b in reference]
    stage_sketch = lambda i: with_latency[i][1][0].packed_sketch  # noqa: E731
    for i, (_, _, latency) in enumerate(with_latency):
        if i < opened[0]:  # the same decayed merge, so the detector's frozen state leaves it out
            assert latency._baseline == stage_sketch(i) and latency.freeze(stage_sketch(i))[0] is None
        else:  # held still while the regression is open: its own, the stage's moves on
            assert latency._baseline == with_latency[opened[0] - 1][2]._baseline
            assert latency._baseline != stage_sketch(i)


def test_a_published_baseline_is_a_snapshot_later_windows_leave_alone():
    engine = Engine(config(), known_keys=set())
    results = run(engine, 15, slower_from=99)
    first = results[3][1][0]
    fields = first.fields()
    assert fields["windows"] == "4"
    assert first.fields() == fields and results[-1][1][0].fields()["windows"] == "15"
    assert engine.baselines.baseline(0).fields() == results[-1][1][0].fields()
    assert len(engine.baselines) == 1


def test_detectors_are_kept_frozen_one_bytes_object_per_location():
    engine = Engine(config(), known_keys=set())
    run(engine, 15, slower_from=99)
    assert len(engine.detectors) == 1 and isinstance(engine.detectors.state(0), bytes)
    names = [type(d).__name__ for d in engine.detectors_of(0)]
    assert names == ["LatencyShift", "ErrorRateShift", "NewException", "ScalingShift", "Dormant", "CallPattern",
                     "NewDependency"]
    # thawed copies: changing them leaves the engine's state as it was
    before = engine.detectors.state(0)
    engine.detectors_of(0)[0].baseline_windows = 0
    assert engine.detectors.state(0) == before
    assert engine.detectors_of(0)[0].baseline_windows == 15


def test_windows_without_calls_leave_the_detector_on_the_published_baseline():
    """A location absent from some windows: the stage decays its baseline by the event time
    since the last window, and the latency detector by the same, so the two stay one sketch
    (nothing of its own to keep or merge) instead of parting at the first gap."""
    engine = Engine(config(), known_keys=set())
    rng = np.random.default_rng(5)
    gaps = {3, 4, 9, 15, 16, 17, 22}
    shared = []
    for w in range(30):
        if w in gaps:
            continue
        for r in engine.ingest(window(w, 99, rng)):
            published = r.baselines[0].packed_sketch
            latency = engine.detectors_of(0)[0]
            shared.append(latency._baseline == published and latency.freeze(published)[0] is None)
    assert len(shared) == 30 - len(gaps) - 1 and all(shared)
    assert not engine.detectors.columns[0].own and engine.baselines.baseline(0).windows == len(shared)
