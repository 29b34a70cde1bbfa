"""LoadFit.update_rows: many fits updated in one numpy pass give the same floats as
``update`` one fit and one point at a time."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.detect.stats import LoadFit, mean_log_ms, mean_log_rows
from processor.pipeline.sketch import LogSketch


def _points(rng: np.random.Generator, n: int, kind: int) -> np.ndarray:
    """(x, y, weight) rows as detectors give them: log load and mean log latency, flat, a
    power law, a queue near saturation, or no spread in load; weights mostly 1."""
    x = np.log(rng.uniform(5, 500, n)) if kind != 3 else np.full(n, 3.0)
    if kind == 0:
        y = rng.normal(2.0, 0.3, n)
    elif kind == 1:
        y = 0.7 * x + rng.normal(0, 0.05, n)
    else:
        y = -np.log1p(-np.minimum(np.exp(x) / 520, 0.999)) + rng.normal(0, 0.02, n)
    w = np.where(rng.random(n) < 0.8, 1.0, rng.uniform(0.1, 3, n))
    return np.column_stack([x, y, w])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fits=st.integers(1, 12), steps=st.integers(1, 40),
       decay=st.sampled_from([1.0, 0.999, 0.9]))
def test_update_rows_equals_update_one_by_one(seed, fits, steps, decay):
    rng = np.random.default_rng(seed)
    series = [_points(rng, steps, int(rng.integers(0, 4))) for _ in range(fits)]
    one_by_one = [LoadFit(decay) for _ in range(fits)]
    sums, n = np.zeros((fits, 21)), np.zeros(fits, np.int64)
    for t in range(steps):
        some = np.flatnonzero(rng.random(fits) < 0.7)  # not every fit gets a point each step
        for i in some:
            one_by_one[i].update(*series[i][t])
        rows = sums[some]
        count = n[some]
        p = np.array([series[i][t] for i in some]).reshape(-1, 3)
        LoadFit.update_rows(rows, count, p[:, 0], p[:, 1], p[:, 2], decay)
        sums[some], n[some] = rows, count
        for i, f in enumerate(one_by_one):
            assert (f.sums.tobytes(), f.n) == (sums[i].tobytes(), int(n[i]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), decayed=st.booleans())
def test_mean_log_rows_equals_mean_log_ms_of_each(seed, n, decayed):
    """Many sketches' mean log latency at once (by groups of like size): the same floats
    as one sketch at a time, for sizes across numpy's pairwise-sum blocks."""
    rng = np.random.default_rng(seed)
    sketches = []
    for _ in range(n):
        values = rng.lognormal(np.log(2e7), float(rng.choice([0.05, 0.5, 2.0])), int(rng.integers(0, 2000)))
        sk = LogSketch.from_values(values) if len(values) else LogSketch()
        sketches.append(sk.scaled(0.9) if decayed else sk)
    got = mean_log_rows(sketches)
    want = [mean_log_ms(sk) for sk in sketches]
    assert [g.hex() for g in got.tolist()] == [w.hex() for w in want]
