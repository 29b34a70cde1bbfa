"""The scaling, error and exception detectors' columns give every location the state and
events their detector's own update gives it, float for float, whichever way each
location's window goes (in numpy, or through the detector itself). The latency
detector's, which also follow the published baseline, are tested in
test_latency_columns.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.detect.errors import ErrorRateShift
from processor.detect.exceptions import NewException
from processor.detect.scaling import ScalingShift
from test_latency_columns import _streams, bits

KINDS = {ErrorRateShift: ["", "errors", "errors", "exception", "median"],
         NewException: ["", "errors", "errors", "exception", "median"],
         ScalingShift: ["", "scaling", "scaling", "median"]}


def _run(cls, seed: int, locations: int = 10, windows: int = 200, **params):
    proto = cls(window_s=60.0, half_life_s=3600.0, **params) if cls is ScalingShift else cls(**params)
    streams = _streams(seed, locations, windows, kinds=KINDS[cls])
    cols = proto.columns()
    cols.min_numpy = 1  # (numpy for every window, however few its locations)
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
            assert bits(have) == bits(want), f"window {w}, location {k}: {have} != {want}"
        every = ids.tolist()  # (records, as a checkpoint takes them all at once: the same rows back)
        cols.unchecked.clear()  # (rows a detector set itself would go plain: as records here too)
        records = cols.records(every, [0] * len(every))
        assert bits(tuple(cols.from_record(r) for r in records)) == bits(tuple(cols.row(i) for i in every))
    return cols


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("cls", [ScalingShift, ErrorRateShift, NewException])
def test_columns_equal_one_detector_per_location(cls, seed):
    params = {"accept_windows": 30, "resolve_windows": 5} if cls is ScalingShift else {}
    cols = _run(cls, seed, warmup_windows=20, **params)
    # both ways were taken, most windows in numpy
    assert cols.windows_one_at_a_time > 0 and cols.windows_in_numpy > 10 * cols.windows_one_at_a_time


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31), recent=st.sampled_from([8, 30]), persist=st.sampled_from([1, 3]))
def test_scaling_columns_any_settings(seed, recent, persist):
    _run(ScalingShift, seed, locations=6, windows=150, warmup_windows=15, recent_windows=recent,
         persist_windows=persist, accept_windows=20)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31), warmup=st.sampled_from([3, 30]), ratio=st.sampled_from([1.5, 3.0]))
def test_error_columns_any_settings(seed, warmup, ratio):
    _run(ErrorRateShift, seed, locations=6, windows=150, warmup_windows=warmup, ratio=ratio, accept_windows=20,
         threshold=6.0)
