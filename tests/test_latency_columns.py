"""LatencyColumns gives every location the state and events LatencyShift.update gives it,
float for float, whichever way each location's window goes (the common steps in numpy, or
one at a time)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.detect.latency import LatencyShift
from processor.detect.latency_columns import LatencyColumns
from processor.pipeline.sketch import LogSketch
from windows import observations

KINDS = ["", "median", "tail", "scaling", "errors", "vanish"]


def bits(value):
    """A frozen state with each float as its exact bits (so that 0.0 and -0.0 differ)."""
    if type(value) is float:
        return ("float", value.hex())
    if type(value) is tuple:
        return tuple(bits(v) for v in value)
    if type(value) is dict:  # (in order: the order is state too)
        return ("dict", tuple((bits(k), bits(v)) for k, v in value.items()))
    assert value is None or type(value) in (int, bool, str, bytes), type(value)
    return value


def _streams(seed: int, locations: int, windows: int, kinds=KINDS, rate=None):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(locations):
        kind = kinds[int(rng.integers(len(kinds)))]
        change_at = int(rng.integers(windows // 3, windows)) if kind else None
        out.append(list(observations(int(rng.integers(2**31)), windows, change_at, kind,
                                     effect=float(rng.choice([1.3, 2.0, 3.0])),
                                     rate=rate or float(rng.choice([0.1, 0.5, 6.0])),
                                     sigma=float(rng.choice([0.3, 0.6])))))
    return out


def _run(seed: int, locations: int = 10, windows: int = 160, min_numpy: int = 1, chunk: int = 2048, **params):
    """Feed the same windows to a LatencyShift per location and to LatencyColumns; compare
    the frozen state of every location after every window, and the events."""
    streams = _streams(seed, locations, windows, rate=params.pop("rate", None))
    proto = LatencyShift(window_s=60.0, half_life_s=3600.0, **params)
    cols = LatencyColumns(proto)
    cols.min_numpy = min_numpy  # (1: numpy for every window, however few its locations)
    cols.chunk = chunk
    singles = [proto.clone() for _ in range(locations)]
    published = [b""] * locations  # each location's baseline sketch, as the engine's stage keeps it
    ids = np.arange(locations) * 3 + 1  # rows need not be 0..n-1
    for i in ids.tolist():
        cols.put(i)
    for w in range(windows):
        present, obs_list, afters = [], [], []
        for k in range(locations):
            obs = streams[k][w]
            if obs.window is None or not obs.window.count:  # (the engine has no empty windows)
                continue
            before = published[k]
            sketch = LogSketch.unpack(before)
            after = (sketch.scaled(proto.decay).merge(obs.window.sketch) if before else obs.window.sketch).pack()
            obs.baseline_step = (before, proto.decay if before else None, after, sketch)
            published[k] = after
            present.append(k)
            obs_list.append(obs)
            afters.append(after)
        expected = []
        for k, obs in zip(present, obs_list):
            expected += [e.id for e in singles[k].update(obs)]
        got = [e.id for e in cols.update_present(ids[present], obs_list)]
        assert sorted(got) == sorted(expected), f"window {w}"
        for k, after in zip(present, afters):
            want, have = singles[k].freeze(after), cols.row(int(ids[k]))
            assert bits(have) == bits(want), f"window {w}, location {k}: {have} != {want}"
        every = ids.tolist()  # (records, as a checkpoint takes them all at once: the same rows back)
        cols.unchecked.clear()  # (rows a detector set itself would go plain: as records here too)
        records = cols.records(every, [0] * len(every))
        assert bits(tuple(cols.from_record(r) for r in records)) == bits(tuple(cols.row(i) for i in every))
    return cols


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_columns_equal_one_detector_per_location(seed):
    cols = _run(seed, warmup_windows=10, accept_windows=20)
    # both ways were taken, most windows in numpy
    assert cols.windows_one_at_a_time > 20 and cols.windows_in_numpy > 2 * cols.windows_one_at_a_time


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31), warmup=st.sampled_from([5, 30]), noise_z=st.sampled_from([0.0, 3.0]))
def test_columns_equal_one_detector_per_location_any_settings(seed, warmup, noise_z):
    _run(seed, locations=6, windows=120, warmup_windows=warmup, accept_windows=15, noise_z=noise_z)


def test_small_windows_held_marshalled_then_in_numpy_give_the_same():
    """Windows of fewer than min_numpy locations go one at a time, the rows held marshalled;
    a bigger window puts them back into the columns."""
    cols = _run(5, locations=12, windows=160, min_numpy=9, warmup_windows=10, rate=0.2)
    assert cols.windows_in_numpy > 100 and cols.windows_one_at_a_time > 100


def test_windows_taken_in_chunks_of_like_width_give_the_same():
    cols = _run(6, locations=12, windows=120, chunk=3, warmup_windows=10)
    assert cols.windows_in_numpy > 500


def test_a_row_round_trips():
    cols = _run(4, locations=4, windows=80, warmup_windows=10)
    for i in (1, 4, 7, 10):
        state = cols.row(i)
        cols.put(i, state)
        assert bits(cols.row(i)) == bits(state)
