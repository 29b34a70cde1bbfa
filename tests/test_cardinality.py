"""A cardinality explosion (a new function name per span) stays within --max-locations: the
excess folds into one overflow location per service, counted, and nothing else is lost."""

import numpy as np

from processor.pipeline.engine import Engine
from processor.config import Config
from processor.pipeline.location import Location
from processor.receiver.decode import Batch
from processor.pipeline.window import OVERFLOW_FUNCTION

SEC = 1_000_000_000
T0 = 1_700_000_020 * SEC - (1_700_000_020 * SEC) % (60 * SEC)


def _batch(functions: list[str], service: str, t0: int, dur_ms: float) -> Batch:
    n = len(functions)
    end = t0 + np.arange(n, dtype=np.int64) * 1000
    return Batch(
        locations=[Location("prod", service, f) for f in functions],
        versions=[(service, "1.0", "")],
        loc=np.arange(n, dtype=np.int32), ver=np.zeros(n, np.int32),
        start=end - int(dur_ms * 1e6), end=end, error=np.zeros(n, bool),
        trace_id=np.frombuffer(np.random.default_rng(n).bytes(16 * n), np.uint8).reshape(n, 16) | 1)


def test_locations_beyond_the_limit_fold_into_the_service_overflow_location():
    engine = Engine(Config.defaults(max_locations=100, allowed_lateness=0.0), known_keys=set())
    results = []
    # 30 steady functions, then 200,000 distinct names (one span each) in the same window
    results += engine.ingest(_batch([f"steady.f{i}" for i in range(30)], "shop", T0, 5.0))
    for chunk in range(20):
        names = [f"handler.user_{chunk}_{i}" for i in range(10_000)]
        results += engine.ingest(_batch(names, "shop", T0 + SEC + chunk * 10**7, 20.0))
    results += engine.ingest(_batch(["steady.f0"], "shop", T0 + 70 * SEC, 5.0))  # closes the window

    tables = engine.windows.tables
    assert tables.real_locations == 100
    assert len(tables.locations) == 101  # the limit, plus shop's overflow location
    assert engine.windows.stats["overflow"] == 200_000 - 70
    assert engine.windows.stats["spans"] == 30 + 200_000 + 1  # nothing lost
    (window,) = [r.window for r in results]
    by_function = {lw.location.function: lw for lw in window.locations}
    overflow = by_function[OVERFLOW_FUNCTION]
    assert overflow.count == 200_000 - 70
    assert abs(overflow.sketch.quantile(0.5) / 20e6 - 1) < 0.02
    # the overflow location is many functions mixed: no baseline, detectors or first_seen
    assert len(engine.detectors) == 100 and len(engine.baselines) == 100
    first_seen = [e for r in results for e in r.events if e.type == "first_seen"]
    assert len(first_seen) == 100 and all(e.location.function != OVERFLOW_FUNCTION for e in first_seen)
    # a known location still gets its own figures after the limit is reached
    assert by_function["steady.f3"].count == 1


def test_a_new_service_beyond_the_limit_goes_to_the_shared_overflow_location():
    engine = Engine(Config.defaults(max_locations=5, allowed_lateness=0.0), known_keys=set())
    engine.ingest(_batch([f"f{i}" for i in range(5)], "a", T0, 1.0))
    engine.ingest(_batch(["g1", "g2"], "b", T0, 1.0))
    engine.ingest(_batch(["f1", "h"], "a", T0, 1.0))
    names = {(loc.service, loc.function) for loc in engine.windows.tables.locations}
    assert (OVERFLOW_FUNCTION, OVERFLOW_FUNCTION) in names  # b arrived after the limit
    assert ("a", OVERFLOW_FUNCTION) in names                  # a was known: its own overflow
    assert engine.windows.stats["overflow"] == 3
