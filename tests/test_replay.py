"""The same spans in any batching give the same events (speed only matters through the
processing-time idle flush, which a continuous replay never triggers)."""

import numpy as np
import pytest

from benchmarks.scenarios import generate
from processor.pipeline.engine import Engine
from processor.config import Config
from tests.otlp import batch_rows


def _events(batches) -> list[tuple]:
    cfg = Config.defaults(window=60.0, allowed_lateness=5.0, idle_timeout=1e9,
                          detectors=None)
    engine = Engine(cfg, known_keys=set(), clock=lambda: 0.0)
    results = []
    for b in batches:
        results += engine.ingest(b)
    results += engine.flush_all()
    return sorted((e.type, e.location.key, e.window_end_ns, e.version, e.summary)
                  for r in results for e in r.events)


@pytest.mark.slow  # a whole scenario through two engines: seconds (docs/testing.md)
def test_rebatched_scenario_gives_identical_events():
    sc = generate(3, services=2, functions_per_service=6, hours=4.5)
    batches = list(sc)
    rng = np.random.default_rng(0)
    rebatched = []
    for b in batches:  # cut every chunk at random points into 1 to 5 pieces
        cuts = sorted(set(rng.integers(0, len(b), rng.integers(0, 5)).tolist()) | {0, len(b)})
        rebatched += [batch_rows(b, np.arange(lo, hi)) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
    original = _events(batches)
    assert len(rebatched) > len(batches)
    assert any(t != "first_seen" for t, *_ in original)  # the scenario does raise regressions
    assert _events(rebatched) == original
