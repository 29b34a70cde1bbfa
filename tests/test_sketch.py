"""The log-bucket sketch: at most 1% relative error at every quantile, exact merges."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.pipeline.sketch import (_TRAILER, ALPHA, LogSketch, bucket_index, bucket_value, pack_rows,
                                       unpack_rows)

TOLERANCE = ALPHA * (1 + 1e-9)  # floating-point slack at bucket boundaries only


def lognormal(seed: int, n: int, sigma: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.lognormal(np.log(5e6), sigma, n)).astype(np.int64) + 1  # ns around 5 ms


def pareto(seed: int, n: int, shape: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round((rng.pareto(shape, n) + 1) * 1e5).astype(np.int64)  # from 0.1 ms, heavy tail


def assert_quantiles_within_alpha(values: np.ndarray, qs) -> None:
    sketch = LogSketch.from_values(values)
    got = sketch.quantiles(qs)
    exact = np.quantile(values, qs, method="lower")
    rel = np.abs(got - exact) / exact
    assert rel.max() <= TOLERANCE, (qs[int(rel.argmax())], got[int(rel.argmax())], exact[int(rel.argmax())])


QS = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20).map(
    lambda l: np.array(l + [0.5, 0.9, 0.99, 0.999, 0.0, 1.0]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20_000), sigma=st.floats(0.05, 3.0), qs=QS)
def test_lognormal_quantiles_within_one_percent(seed, n, sigma, qs):
    assert_quantiles_within_alpha(lognormal(seed, n, sigma), qs)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20_000), shape=st.floats(0.5, 4.0), qs=QS)
def test_pareto_quantiles_within_one_percent(seed, n, shape, qs):
    assert_quantiles_within_alpha(pareto(seed, n, shape), qs)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 5_000), cut=st.floats(0, 1))
def test_merge_of_parts_equals_sketch_of_whole(seed, n, cut):
    values = pareto(seed, n, 1.5)
    k = int(cut * n)
    merged = LogSketch.from_values(values[:k]).merge(LogSketch.from_values(values[k:]))
    whole = LogSketch.from_values(values)
    assert merged.index.tolist() == whole.index.tolist()
    assert merged.counts.tolist() == whole.counts.tolist()


@given(st.floats(1.0, 1e15))
def test_every_value_is_within_alpha_of_its_bucket(x):
    rep = bucket_value(bucket_index(np.array([x]))[0])
    assert abs(rep - x) / x <= TOLERANCE


def test_zero_and_sub_nanosecond_durations_count_as_one_ns():
    s = LogSketch.from_values(np.array([0, 0, 1]))
    assert s.count == 3 and abs(s.quantile(0.5) - 1.0) <= TOLERANCE


def test_empty_sketch_has_no_quantiles():
    assert np.isnan(LogSketch().quantile(0.5)) and LogSketch().count == 0


def test_scaling_decays_counts_and_drops_negligible_buckets():
    s = LogSketch.from_values(np.array([1_000, 1_000, 2_000_000]))
    half = s.scaled(0.5)
    assert half.count == 1.5
    assert len(s.scaled(1e-4).index) == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 5_000), factor=st.floats(1e-4, 1.0))
def test_pack_gives_back_the_same_sketch(seed, n, factor):
    s = LogSketch.from_values(pareto(seed, n, 1.5)).scaled(factor) if n else LogSketch()
    back = LogSketch.unpack(s.pack())
    assert back.index.dtype == np.int32 and back.counts.dtype == np.float64
    assert back.index.tobytes() == s.index.tobytes() and back.counts.tobytes() == s.counts.tobytes()


def test_empty_sketches_share_read_only_arrays():
    a, b = LogSketch(), LogSketch.unpack(LogSketch().pack())
    assert a.index is b.index and a.counts is b.counts
    assert not a.index.flags.writeable and not a.counts.flags.writeable
    merged = a.merge(LogSketch.from_values(np.array([5_000_000])))
    assert merged.count == 1.0 and a.count == 0.0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3_000), copies=st.sampled_from([1, 300, 70_000, 2**33]),
       offset=st.integers(-3_000, 0), sigma=st.sampled_from([0.01, 0.5, 3.0]))
def test_pack_keeps_whole_counts_narrow_and_gives_them_back(seed, n, copies, offset, sigma):
    """Windows and sums of windows have whole counts: stored in 1, 2 or 4 bytes (8 past
    2**32), with the buckets as a bitmap over their range, or none when it is dense;
    indices below zero (a load-shifted sketch) included."""
    s = LogSketch.from_values(lognormal(seed, n, sigma))
    s = LogSketch(s.index + np.int32(offset), s.counts * copies)
    data = s.pack()
    back = LogSketch.unpack(data)
    assert back.index.dtype == np.int32 and back.counts.dtype == np.float64
    assert back.index.tobytes() == s.index.tobytes() and back.counts.tobytes() == s.counts.tobytes()
    top = s.counts.max()
    width = 1 if top < 2**8 else 2 if top < 2**16 else 4 if top < 2**32 else 8
    span = int(s.index[-1] - s.index[0]) + 1
    bitmap = 0 if span == len(s.index) else (span + 7) // 8
    assert len(data) == width * len(s.index) + bitmap + 9


def test_packed_baseline_costs_a_count_and_a_bit_per_bucket():
    s = LogSketch.from_values(lognormal(3, 2_600, 0.5)).scaled(0.97)
    span = int(s.index[-1] - s.index[0]) + 1
    assert span > len(s.index)  # a gap or two in the tails
    assert len(s.pack()) == 8 * len(s.index) + (span + 7) // 8 + 9
    back = LogSketch.unpack(s.pack())
    assert not back.counts.flags.writeable  # a view of the bytes, read-only


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shift=st.integers(-3_000, 3_000), factor=st.floats(1e-3, 1.0))
def test_merge_adds_counts_bucket_by_bucket_in_order(seed, shift, factor):
    """Against the plain definition: every bucket of either, its count ours + theirs, summed
    in that order (bit for bit), whatever the overlap (none, some, all) and sign of indices."""
    a = LogSketch.from_values(lognormal(seed, 500, 1.0)).scaled(factor)
    b = LogSketch.from_values(pareto(seed + 1, 80, 1.5))
    b = LogSketch(b.index + np.int32(shift), b.counts)
    for x, y in ((a, b), (b, a), (a, a.scaled(0.5))):
        sums: dict[int, float] = {}
        for s in (x, y):
            for i, c in zip(s.index.tolist(), s.counts.tolist()):
                sums[i] = sums.get(i, 0.0) + c
        m = x.merge(y)
        assert m.index.dtype == np.int32 and m.index.tolist() == sorted(sums)
        assert m.counts.tolist() == [sums[i] for i in sorted(sums)]


def test_window_quantiles_of_many_sketches_equal_one_call_each():
    from processor.pipeline.sketch import window_quantiles

    rng = np.random.default_rng(11)
    sketches = [LogSketch.from_values(rng.lognormal(np.log(5e6), rng.uniform(0.1, 2.0), int(rng.integers(1, 400))))
                for _ in range(300)]
    sketches = [s.merge(LogSketch.from_values(np.array([1e3, 1e9]))) if i % 7 == 0 else s
                for i, s in enumerate(sketches)]  # some wide ones
    qs = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)
    assert np.array_equal(window_quantiles(sketches, qs), np.vstack([s.quantiles(qs) for s in sketches]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), chunk=st.integers(1, 16))
def test_quantiles_of_rows_end_to_end_equal_one_call_each(seed, rows, chunk):
    """Decayed (float) counts, whole ones and empty sketches, over several chunks."""
    from processor.pipeline.sketch import rows_quantiles

    rng = np.random.default_rng(seed)
    sketches = []
    for _ in range(rows):
        n = int(rng.integers(0, 300))
        sk = LogSketch.from_values(rng.lognormal(np.log(5e6), float(rng.uniform(0.01, 3.0)), n))
        if rng.random() < 0.6:
            sk = sk.scaled(float(rng.uniform(0.001, 1.0)))
        sketches.append(sk)
    bounds = np.concatenate(([0], np.cumsum([len(s.index) for s in sketches]))).tolist()
    qs = (0.5, 0.9, 0.99, 0.999)
    got = rows_quantiles(np.concatenate([s.index for s in sketches]), np.concatenate([s.counts for s in sketches]),
                         bounds, qs, chunk=chunk)
    want = np.vstack([s.quantiles(qs) for s in sketches])
    assert np.array_equal(got, want, equal_nan=True)


def test_quantiles_of_rows_with_a_wide_sketch_among_narrow_ones_equal_one_call_each():
    """Sketches are grouped by width (one of 2,000 buckets among a thousand narrow ones)."""
    from processor.pipeline.sketch import rows_quantiles

    rng = np.random.default_rng(7)
    sketches = [LogSketch.from_values(rng.lognormal(np.log(5e6), 0.2, 50)).scaled(0.9) for _ in range(1200)]
    sketches[600] = LogSketch(np.arange(100, 2100, dtype=np.int32), rng.random(2000))
    bounds = np.concatenate(([0], np.cumsum([len(s.index) for s in sketches]))).tolist()
    qs = (0.5, 0.99)
    got = rows_quantiles(np.concatenate([s.index for s in sketches]), np.concatenate([s.counts for s in sketches]),
                         bounds, qs)
    assert np.array_equal(got, np.vstack([s.quantiles(qs) for s in sketches]))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sketches=st.integers(1, 40), lead=st.integers(0, 3))
def test_pack_rows_and_unpack_rows_give_each_sketch_its_own(seed, sketches, lead):
    """Many sketches packed at once: byte for byte what each one's pack gives, whatever
    their count types (narrow whole counts, decayed floats, counts past 2**32), layouts
    (dense, sparse) and sizes (empty ones too)."""
    rng = np.random.default_rng(seed)
    many = []
    for _ in range(sketches):
        kind = int(rng.integers(6))
        values = rng.lognormal(np.log(2e7), float(rng.choice([0.01, 0.5, 3.0])), int(rng.integers(0, 300)))
        sk = LogSketch.from_values(values) if len(values) else LogSketch()
        if kind == 1:
            sk = sk.scaled(float(rng.uniform(0.01, 1.0)))
        elif kind == 2:
            sk = LogSketch(sk.index, sk.counts * float(rng.choice([300, 70_000, 2**33])))
        elif kind == 3:
            sk = LogSketch(np.arange(5, 5 + len(sk.index), dtype=np.int32), sk.counts)  # dense
        many.append(sk)
    pad = [LogSketch.from_values(np.array([1e6] * 3))] * lead  # rows before the first one packed
    index = np.concatenate([s.index for s in pad + many] + [np.zeros(0, np.int32)])
    counts = np.concatenate([s.counts for s in pad + many] + [np.zeros(0)])
    bounds = np.cumsum([0] + [len(s.index) for s in pad + many])[lead:].tolist()
    assert pack_rows(index, counts, bounds) == [s.pack() for s in many]
    # and back, all at once: what each one's unpack gives, bit for bit
    for got, want in zip(unpack_rows([s.pack() for s in many]), [LogSketch.unpack(s.pack()) for s in many]):
        assert got.index.dtype == want.index.dtype == np.int32 and got.counts.dtype == want.counts.dtype
        assert got.index.tobytes() == want.index.tobytes() and got.counts.tobytes() == want.counts.tobytes()


@pytest.mark.parametrize("bad", [b"\x11", b"\x00\x00\x00\x11", b"\x07\x07" + _TRAILER.pack(10, 30, 1 | 0x10),
                                 b"\x00" * 8 + _TRAILER.pack(1, 1, 7)])
def test_unpack_rows_takes_bytes_pack_did_not_make_as_unpack_does(bad):
    """Among good packs (a checkpoint's segments are not all checked), bytes pack did not
    make fail as ``LogSketch.unpack`` fails on them, and never borrow a neighbour's bytes."""
    rng = np.random.default_rng(2)
    good = [LogSketch.from_values(rng.lognormal(15, s, 40)).pack() for s in (0.001, 1.0) * 10]
    with pytest.raises(Exception) as one:
        LogSketch.unpack(bad)
    with pytest.raises(type(one.value)):
        unpack_rows(good[:10] + [bad] + good[10:])
