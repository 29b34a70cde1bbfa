"""The baseline stage: a closed window's locations absorbed at once, as one by one."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.pipeline.baseline import Baseline, BaselineStage
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures

SEC = 1_000_000_000


def _window(rng, loc_id: int, loc: Location, scale: float) -> LocationWindow:
    n = int(rng.integers(1, 40))
    sk = LogSketch.from_values(rng.lognormal(np.log(scale), float(rng.uniform(0.05, 2.0)), n))
    errors = int(rng.integers(0, n + 1))
    return LocationWindow(loc_id, loc, n, errors, sk, [VersionFigures(("shop", str(loc_id % 3), ""), n, errors, sk)])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), locations=st.integers(1, 30), windows=st.integers(1, 12),
       presence=st.floats(0.2, 1.0), half_life=st.sampled_from([5.0, 30.0, 600.0, 21600.0]))
def test_absorbing_a_window_at_once_equals_one_location_at_a_time(seed, locations, windows, presence, half_life):
    """Same packed sketches (bit for bit), figures, versions and returned steps, over windows
    with gaps (different decays in one window), new locations and a restored baseline that
    has a sketch but no windows (no decay)."""
    rng = np.random.default_rng(seed)
    locs = [Location("prod", "shop", f"f{i}") for i in range(locations)]
    scales = rng.lognormal(np.log(5e6), 2.0, locations)
    one, many = BaselineStage(10.0, half_life), BaselineStage(10.0, half_life)
    restored = Baseline(locs[0], LogSketch.from_values(np.array([3e6, 4e6])), count=2.0, seconds=10.0)
    one.restore(0, restored)
    many.restore(0, restored)
    for w in range(windows):
        ids = [i for i in range(locations) if rng.random() < presence]
        lws = [_window(rng, i, locs[i], scales[i] * (1 + w / 4)) for i in ids]
        end = (w + 1) * 10 * SEC + int(rng.integers(0, 3)) * 10 * SEC
        cw = ClosedWindow("shop", end - 10 * SEC, end, lws, "prod")
        expected = [one.absorb(cw, lw) for lw in lws]
        baselines, befores, decays, unpacked = many.absorb_many(cw, lws)
        assert [b.packed_sketch for b in baselines] == [e[0].packed_sketch for e in expected]
        assert [b.fields() for b in baselines] == [e[0].fields() for e in expected]
        assert befores == [e[1] for e in expected] and decays == [e[2] for e in expected]
        assert [u.pack() for u in unpacked] == befores
    assert one.sketches == many.sketches
    assert one.figures == many.figures and one.updated_ns == many.updated_ns and one.versions == many.versions
    assert len(one) == len(many)


def test_a_forgotten_location_s_id_starts_a_new_baseline_at_its_own_time():
    """A reused id (the location was forgotten) starts from nothing: the new owner's
    windows decay by their own gaps, and its baseline says its own event time."""
    a, b = Location("prod", "shop", "a"), Location("prod", "shop", "b")
    sk = LogSketch.from_values(np.array([1e6, 2e6, 3e6]))
    one, many = BaselineStage(60.0, 600.0), BaselineStage(60.0, 600.0)
    for stage, absorb in ((one, lambda cw, lw: [stage.absorb(cw, lw)[0]]),
                          (many, lambda cw, lw: stage.absorb_many(cw, [lw])[0])):
        absorb(ClosedWindow("shop", 9_940 * SEC, 10_000 * SEC, [_lw(0, a, sk)], "prod"), _lw(0, a, sk))
        stage.forget(0)
        for end in (1_000, 1_060, 1_120):
            last = absorb(ClosedWindow("shop", (end - 60) * SEC, end * SEC, [_lw(0, b, sk)], "prod"), _lw(0, b, sk))
        assert last[0].updated_ns == 1_120 * SEC and last[0].windows == 3
    assert one.sketches == many.sketches and one.figures == many.figures and one.updated_ns == many.updated_ns


def _lw(loc_id: int, loc: Location, sk: LogSketch) -> LocationWindow:
    return LocationWindow(loc_id, loc, 3, 0, sk, [VersionFigures(("shop", "1", ""), 3, 0, sk)])


def test_merge_rows_takes_buckets_below_zero_and_above_the_top():
    """A window brought to another load (the latency detector's) may hold buckets below 0 or
    above MAX_BUCKET: merged per row as LogSketch.merge merges them, none moved to another row."""
    from processor.pipeline.baseline import _merge_rows
    from processor.pipeline.sketch import MAX_BUCKET

    def sk(index, counts):
        return LogSketch(np.array(index, np.int32), np.array(counts, np.float64))

    bases = [sk([10, 20], [1.0, 2.0]), sk([10, 20], [3.0, 4.0]), sk([], []), sk([MAX_BUCKET], [1.0])]
    windows = [sk([-2, 11], [5, 1]), sk([-2, 11], [5, 1]), sk([-7, -1], [1, 1]), sk([MAX_BUCKET + 3], [2])]
    decays = [0.5, None, 0.9, 0.9]
    merged, _ = _merge_rows(bases, decays, windows, quantiles=False)
    want = [(b.scaled(d) if d is not None else b).merge(w).pack() for b, d, w in zip(bases, decays, windows)]
    assert merged == want
