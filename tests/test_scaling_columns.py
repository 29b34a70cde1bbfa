"""ScalingColumns gives every location the state and events ScalingShift.update gives it,
float for float, whichever way each location's window goes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.detect.scaling import ScalingShift
from processor.detect.scaling_columns import ScalingColumns
from test_latency_columns import _streams, bits


def _run(seed: int, locations: int = 10, windows: int = 200, **params):
    proto = ScalingShift(window_s=60.0, half_life_s=3600.0, **params)
    streams = _streams(seed, locations, windows, kinds=["", "scaling", "scaling", "median"])
    cols = ScalingColumns(proto)
    singles = [proto.clone() for _ in range(locations)]
    ids = np.arange(locations) * 2 + 3
    for i in ids.tolist():
        cols.put(i)
    for w in range(windows):
        present = [k for k in range(locations) if streams[k][w].window is not None and streams[k][w].window.count]
        obs = [streams[k][w] for k in present]
        expected = [e.id for k, o in zip(present, obs) for e in singles[k].update(o)]
        got = [e.id for e in cols.update_present(ids[present], obs)]
        assert sorted(got) == sorted(expected), f"window {w}"
        for k in present:
            want, have = singles[k].freeze(), cols.row(int(ids[k]))
            assert bits(have) == bits(want), f"window {w}, location {k}"
    return cols


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_columns_equal_one_detector_per_location(seed):
    cols = _run(seed, warmup_windows=20, accept_windows=30, resolve_windows=5)
    assert cols.windows_one_at_a_time > 5 and cols.windows_in_numpy > 10 * cols.windows_one_at_a_time


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31), recent=st.sampled_from([8, 30]), persist=st.sampled_from([1, 3]))
def test_columns_equal_one_detector_per_location_any_settings(seed, recent, persist):
    _run(seed, locations=6, windows=150, warmup_windows=15, recent_windows=recent, persist_windows=persist,
         accept_windows=20)
