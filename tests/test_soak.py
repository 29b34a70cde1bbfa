"""The soak benchmark's analysis (benchmarks/soak.py): the RSS slope and the verdicts, on
synthetic samples. The soak itself runs for minutes and is not part of the suite."""

import numpy as np
import pytest

from benchmarks.soak import MIB, Sample, fit_slope, grows, memory_verdict, steady_start, summarize

T = np.arange(0, 480, 5.0)  # 8 minutes sampled every 5 s, as the steady part of a default run
BASE = 180 * MIB


def ar1(rng, n: int, phi: float, sd: float) -> np.ndarray:
    """Stationary AR(1) noise: RSS wanders and stays where it went for a while."""
    e = rng.normal(0, sd * np.sqrt(1 - phi**2), n)
    x = np.empty(n)
    x[0] = rng.normal(0, sd)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x


def test_fit_slope_recovers_a_line():
    f = fit_slope(T, 3.0 * T + 7.0)
    assert f.slope == pytest.approx(3.0)
    assert f.lo == pytest.approx(3.0) and f.hi == pytest.approx(3.0)


@pytest.mark.parametrize("seed", range(20))
def test_flat_memory_with_white_noise_is_flat(seed):
    rng = np.random.default_rng(seed)
    v = memory_verdict(T, BASE + rng.normal(0, 0.5 * MIB, len(T)))
    assert not v.growing, v.text
    assert v.fit.lo < 0 < v.fit.hi or abs(v.fit.slope) * 3600 / MIB < 10


@pytest.mark.parametrize("seed", range(20))
def test_flat_memory_that_wanders_is_flat(seed):
    # Autocorrelated noise fools plain least squares; the AR(1) correction widens the interval.
    rng = np.random.default_rng(seed)
    v = memory_verdict(T, BASE + ar1(rng, len(T), 0.9, 1.0 * MIB))
    assert not v.growing, v.text
    assert v.fit.r1 > 0.5


@pytest.mark.parametrize("seed", range(20))
def test_a_leak_of_30_mib_per_hour_is_growing(seed):
    # 4 MiB over the 8 minutes, under the same wandering noise.
    rng = np.random.default_rng(seed)
    rss = BASE + 30 * MIB / 3600 * T + ar1(rng, len(T), 0.9, 1.0 * MIB) / 4 + rng.normal(0, 0.3 * MIB, len(T))
    v = memory_verdict(T, rss)
    assert v.growing, v.text
    assert "GROWING" in v.text


def test_the_threshold_is_what_separates_flat_from_growing():
    # Noise-free lines: the interval is a point, so only the threshold decides.
    assert not memory_verdict(T, BASE + 0.5 * MIB / 3600 * T).growing
    assert memory_verdict(T, BASE + 2.0 * MIB / 3600 * T).growing
    assert not memory_verdict(T, BASE + 2.0 * MIB / 3600 * T, threshold_mib_h=5).growing
    assert "flat" in memory_verdict(T, np.full(len(T), float(BASE))).text


def test_counts_grow_only_when_the_end_is_above_all_of_the_start():
    assert not grows([12, 12, 13], [13, 12, 13])
    assert grows([12, 12, 12], [13, 14, 13])
    assert not grows([], [13])


def sample(t, keys, rss=BASE, accepted=0, processed=0):
    return Sample(t, rss, 12, 19, t / 2, {"backflow_active_keys": keys,
                                         "backflow_receiver_accepted_spans_total": accepted,
                                         "backflow_processed_spans_total": processed}, 0, 0)


def test_steady_part_starts_when_every_location_is_held_and_warmup_passed():
    ss = [sample(t, min(2000, 400 * t)) for t in range(0, 100, 5)]
    assert steady_start(ss, 2000, 0) == 5
    assert steady_start(ss, 2000, 42) == 45
    assert steady_start(ss, 3000, 0) is None


def test_summarize_gives_means_maxima_rates_and_latency():
    ss = [sample(t, 2000, rss=BASE + t * MIB, accepted=1000 * t, processed=1000 * t - 500) for t in range(0, 61, 5)]
    calls = [(t, 0.001 * (1 + t % 10)) for t in range(60)]
    s = summarize(ss, calls, 0, 60, rate=1000)
    assert s["rss"] == pytest.approx((180 + 30, 240))
    assert s["accepted"][0] == pytest.approx(1000)
    assert s["backlog"] == (500, 500) and s["lag"] == (0.5, 0.5)
    assert s["cpu"][0] == pytest.approx(0.5)
    p50, p99, mx, n = s["latency"]
    assert (n, mx) == (60, pytest.approx(10.0)) and p50 == pytest.approx(6.0)
