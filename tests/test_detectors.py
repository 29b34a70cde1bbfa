"""Each detector fires on its own injected change, once, attributed to the new version,
and stays silent on stationary data from the same generator with other seeds."""

import math

import numpy as np
import pytest

from processor.config import Config
from processor.detect.dormant import Dormant
from processor.detect.errors import ErrorRateShift
from processor.detect.exceptions import NewException
from processor.detect.latency import LatencyShift
from processor.detect.latency import LatencySettings
from processor.detect.registry import DetectorSettings, build_detectors
from processor.detect.scaling import ScalingShift
from tests.windows import V2, observations

CHANGE = 200


def make(cls):
    return next(d for d in build_detectors(Config.defaults()) if isinstance(d, cls))


def events_of(cls, **kw):
    det = make(cls)
    return [e for obs in observations(**kw) for e in det.update(obs)]


def onset(events, type_):
    found = [e for e in events if e.type == type_]
    assert len(found) == 1, [e.summary for e in events]
    return found[0]


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_latency_median_shift_is_caught_at_p50(seed):
    e = onset(events_of(LatencyShift, seed=seed, windows=CHANGE + 60, change_at=CHANGE,
                        kind="median", effect=1.5), "latency_regression")
    assert e.detail["quantile"] == "p50" and e.version == V2
    assert 1.3 < e.detail["ratio"] < 1.7
    assert e.window_start_ns // (60 * 10**9) - CHANGE <= 5


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_latency_tail_only_shift_is_caught_in_the_tail(seed):
    e = onset(events_of(LatencyShift, seed=seed, windows=CHANGE + 60, change_at=CHANGE,
                        kind="tail", effect=3.0), "latency_regression")
    assert e.detail["quantile"] in ("p99", "p999") and e.version == V2
    assert e.detail["p_value"] < e.detail["alpha"]


def test_latency_regression_is_one_event_then_resolved_when_it_ends():
    det = make(LatencyShift)
    stream = list(observations(31, CHANGE + 60, change_at=CHANGE, kind="median", effect=2.0))
    calm = list(observations(32, 40))
    events = [e for obs in stream for e in det.update(obs)]
    events += [e for obs in calm for e in det.update(obs)]
    assert [e.type for e in events] == ["latency_regression", "resolved"]
    assert events[1].detail["reason"] == "recovered"


def test_error_regression_resolved_says_its_figures():
    det = make(ErrorRateShift)
    stream = list(observations(44, CHANGE + 60, change_at=CHANGE, kind="errors", effect=10.0))
    calm = list(observations(45, 60))
    events = [e for obs in stream + calm for e in det.update(obs)]
    assert [e.type for e in events] == ["error_regression", "resolved"]
    resolved = events[1]
    assert resolved.detail["reason"] == "recovered"
    assert "is back to its baseline (" in resolved.summary and "% vs " in resolved.summary
    assert resolved.detail["current_share"] < 3 * resolved.detail["baseline_share"]


@pytest.mark.parametrize("seed", [41, 42, 43])
def test_error_share_rise_is_caught(seed):
    e = onset(events_of(ErrorRateShift, seed=seed, windows=CHANGE + 60, change_at=CHANGE,
                        kind="errors", effect=10.0), "error_regression")
    assert e.version == V2 and e.detail["current_share"] > 5 * e.detail["baseline_share"]


def test_new_exception_type_is_reported_once():
    events = events_of(NewException, seed=51, windows=CHANGE + 30, change_at=CHANGE, kind="exception")
    e = onset(events, "new_exception")
    assert e.detail["exception_type"] == "ZeroDivisionError" and e.version == V2
    assert e.window_start_ns // (60 * 10**9) == CHANGE


@pytest.mark.parametrize("seed", [61, 62])
def test_steeper_growth_with_load_is_a_scaling_regression(seed):
    e = onset(events_of(ScalingShift, seed=seed, windows=CHANGE + 90, change_at=CHANGE,
                        kind="scaling", effect=2.0), "scaling_regression")
    assert e.version == V2 and e.detail["slope_increase"] > 0


def test_vanished_location_is_dormant_attributed_to_the_replacing_version():
    e = onset(events_of(Dormant, seed=71, windows=CHANGE + 30, change_at=CHANGE, kind="vanish"),
              "dormant")
    assert e.version == V2 and e.detail["last_version"] == "1.0"
    assert 10 <= e.window_start_ns // (60 * 10**9) - CHANGE + 1 <= 11  # 10 min silence


@pytest.mark.parametrize("seed", range(100, 106))
@pytest.mark.parametrize("cls", [LatencyShift, ErrorRateShift, NewException, ScalingShift, Dormant],
                         ids=lambda c: c.__name__)
def test_silent_on_stationary_data(cls, seed):
    # six hours of a load-sensitive location with diurnal load and bursts
    assert events_of(cls, seed=seed, windows=360) == []


@pytest.mark.parametrize("seed", range(200, 210))
def test_errors_silent_on_a_steady_share_of_any_level(seed):
    # Locations that always fail often (a probe answering 404, a cache miss raised as an
    # error): a steady share from 0.1% to 30% at 2 to 190 spans a window is no regression.
    rng = np.random.default_rng(seed)
    share, rate = 10 ** rng.uniform(-3, -0.5), 10 ** rng.uniform(-1.5, 0.5)
    assert events_of(ErrorRateShift, seed=seed, windows=360, error_share=share, rate=rate) == []


@pytest.mark.parametrize("seed", range(400, 405))
def test_errors_still_caught_where_a_location_is_called_once_a_window(seed):
    # Its warm-up rests on about 30 spans: an error or two in them must not set the
    # baseline share so high that a rise from 1% to 20% goes unseen.
    events = events_of(ErrorRateShift, seed=seed, windows=300, change_at=200, kind="errors",
                       effect=20.0, error_share=0.01, rate=1 / 60)
    assert any(e.type == "error_regression" and e.version == V2 for e in events)


def test_canary_regression_is_blamed_on_the_new_version_running_side_by_side():
    import numpy as np

    from processor.detect.base import Observation
    from processor.pipeline.sketch import LogSketch
    from processor.pipeline.window import LocationWindow, VersionFigures
    from tests.windows import LOC, V1, W_NS

    rng = np.random.default_rng(81)
    det = make(LatencyShift)
    events = []
    for i in range(CHANGE + 30):
        old = rng.lognormal(np.log(20e6), 0.5, 400)
        parts = [(V1, old)]
        if i >= CHANGE:  # a canary: 10% of the calls, three times slower
            parts = [(V1, old[:360]), (V2, rng.lognormal(np.log(60e6), 0.5, 40))]
        figures = [VersionFigures(v, len(d), 0, LogSketch.from_values(d)) for v, d in parts]
        sk = LogSketch.from_values(np.concatenate([d for _, d in parts]))
        lw = LocationWindow(0, LOC, 400, 0, sk, figures)
        first_seen = {V1: W_NS, V2: (CHANGE + 1) * W_NS}
        events += det.update(Observation(LOC, i * W_NS, (i + 1) * W_NS, lw, 0.0, V1, first_seen))
    e = onset(events, "latency_regression")
    assert e.version == V2  # though V1 still serves 90% of the calls
    assert e.detail["side_by_side"]["version"] == "1.1"
    assert e.detail["side_by_side"]["z_vs_others"] > 3
    # a median shift: nearly all the canary's calls above the baseline median, half of the others'
    assert e.detail["quantile"] == "p50"
    assert e.detail["versions"]["1.1"]["share"] > 1.8 * e.detail["versions"]["(others)"]["share"]
    assert e.window_start_ns // W_NS - CHANGE <= 3  # judged on its own spans, not averaged away


def test_dormant_means_agree_with_rivers_ewmean_bit_for_bit():
    import random

    from river import stats

    rng = random.Random(5)
    det = make(Dormant)
    presence, calls = stats.EWMean(det.fading_factor), stats.EWMean(det.fading_factor)
    for obs in observations(91, 400, change_at=300, kind="vanish", rate=0.02):  # silent windows too
        det.update(obs)
        if obs.count:
            presence.update(1.0)
            calls.update(obs.count)
        elif det.windows:
            presence.update(0.0)
        assert (det.presence, det.calls) == (presence.get(), calls.get())
    for _ in range(2000):  # and on arbitrary values, the first one included
        a = rng.random()
        ewm, mean = stats.EWMean(a), None
        for x in (rng.choice([0.0, 1.0, rng.randint(0, 10**6), rng.lognormvariate(0, 3)]) for _ in range(20)):
            ewm.update(x)
            mean = float(x) if mean is None else a * x + (1 - a) * mean
            assert mean == ewm.get()


def test_two_new_exception_types_in_one_window_are_two_events_with_their_own_ids():
    from collections import Counter

    from processor.detect.base import Observation
    from processor.pipeline.sketch import LogSketch
    from processor.pipeline.window import LocationWindow, VersionFigures
    from tests.windows import LOC

    det = make(NewException)
    types = ["KeyError", "TimeoutError"]
    events = []
    for i in range(det.warmup_windows + 2):
        exc = Counter(types) if i > det.warmup_windows else Counter()
        vf = VersionFigures(V2, 10, sum(exc.values()), LogSketch(), exc)
        events += det.update(Observation(LOC, i, i + 1, LocationWindow(0, LOC, 10, 0, LogSketch(), [vf], exc)))
    assert sorted(e.detail["exception_type"] for e in events) == types
    assert len({e.id for e in events}) == 2 and len({e.window_start_ns for e in events}) == 1


@pytest.mark.parametrize("seed", [41, 42, 43])
def test_a_worse_shift_while_a_latency_regression_is_open_is_reported_as_an_escalation(seed):
    events = events_of(LatencyShift, seed=seed, windows=CHANGE + 80, change_at=CHANGE, kind="median",
                       effect=1.6, worse_at=CHANGE + 40, worse=3.0)
    assert [e.type for e in events] == ["latency_regression", "latency_regression"]
    opened, escalation = events
    assert "escalates" not in opened.detail and escalation.detail["escalates"] == opened.id
    assert escalation.window_start_ns // (60 * 10**9) - (CHANGE + 40) <= 2
    assert 4.0 < escalation.detail["ratio"] < 6.0 and escalation.detail["ratio_to_reported"] >= 2
    assert escalation.version == V2 and escalation.severity == "critical" and "further" in escalation.summary


@pytest.mark.parametrize("seed", [44, 45])
def test_a_steady_open_latency_regression_is_not_escalated(seed):
    events = events_of(LatencyShift, seed=seed, windows=CHANGE + 110, change_at=CHANGE, kind="median", effect=1.6)
    assert [e.type for e in events] == ["latency_regression"]


def test_a_worse_error_share_while_an_error_regression_is_open_is_reported_as_an_escalation():
    events = events_of(ErrorRateShift, seed=46, windows=CHANGE + 80, change_at=CHANGE, kind="errors",
                       effect=10.0, error_share=0.002, worse_at=CHANGE + 40, worse=5.0, rate=30.0)
    assert [e.type for e in events] == ["error_regression", "error_regression"]
    assert events[1].detail["escalates"] == events[0].id and events[1].detail["ratio_to_reported"] >= 2


def test_escalation_can_be_turned_off():
    settings = DetectorSettings(latency=LatencySettings(escalate_ratio=0.0))
    det = next(d for d in build_detectors(Config.defaults(detectors=settings)) if isinstance(d, LatencyShift))
    stream = observations(41, CHANGE + 80, change_at=CHANGE, kind="median", effect=1.6, worse_at=CHANGE + 40, worse=3.0)
    assert [e.type for obs in stream for e in det.update(obs)] == ["latency_regression"]


def _exception_windows(det, version_from: int, new_at: int, n_new: int, calls: int = 1000):
    """A location whose version 1.1 started at window ``version_from``; a new exception type
    appears at ``new_at`` in ``n_new`` of ``calls`` calls."""
    from collections import Counter

    from processor.detect.base import Observation
    from processor.pipeline.sketch import LogSketch
    from processor.pipeline.window import LocationWindow, VersionFigures
    from tests.windows import LOC, V1, W_NS

    events = []
    for i in range(new_at + 1):
        version = V2 if i >= version_from else V1
        exc = Counter({"KeyError": n_new}) if i == new_at else Counter()
        vf = VersionFigures(version, calls, sum(exc.values()), LogSketch(), exc)
        first_seen = {V1: W_NS, **({V2: (version_from + 1) * W_NS} if i >= version_from else {})}
        events += det.update(Observation(LOC, i * W_NS, (i + 1) * W_NS,
                                         LocationWindow(0, LOC, calls, 0, LogSketch(), [vf], exc),
                                         service_version=version, version_first_seen=first_seen))
    return events


@pytest.mark.parametrize("warmup,version_from,new_at,n_new,severity", [
    (30, 10, 300, 3, "info"),        # a version running for 290 windows, 0.3% of the calls: a rare error
    (30, 295, 300, 3, "warning"),    # the version arrived 5 windows ago: news
    (30, 10, 300, 50, "warning"),    # an old version, but 5% of the calls: not rare
    (10, 0, 50, 3, "info"),          # 40 windows after a short warm-up, in the version it watched
    (10, 45, 50, 3, "warning"),      # a version that arrived after that warm-up, 5 windows ago
])
def test_a_rare_new_exception_in_a_long_running_version_is_info(warmup, version_from, new_at, n_new, severity):
    events = _exception_windows(NewException(warmup_windows=warmup), version_from, new_at=new_at, n_new=n_new)
    assert [(e.type, e.severity) for e in events] == [("new_exception", severity)]
    assert events[0].detail["rare"] == (severity == "info")


@pytest.mark.parametrize("seed", [51, 52, 53, 54])
def test_a_sparse_location_s_3x_shift_is_found_within_15_minutes(seed):
    """Three calls a minute: the fast median CUSUM needs a handful of slow calls, not the
    sixty the small-shift one would."""
    e = onset(events_of(LatencyShift, seed=seed, windows=CHANGE + 30, change_at=CHANGE, kind="median",
                        effect=3.0, rate=0.05), "latency_regression")
    assert e.detail["quantile"] == "p50" and e.version == V2
    assert e.window_start_ns // (60 * 10**9) - CHANGE < 15


@pytest.mark.parametrize("seed", range(60, 68))
def test_sparse_stationary_locations_stay_quiet(seed):
    assert events_of(LatencyShift, seed=seed, windows=1440, rate=0.05) == []


def _load_following(seed: int, shape: str, windows: int = 480, surge_at: int = 150, rollout_at: int = 300):
    """A location whose latency follows its service's load and that no version changes: in
    proportion to it (``linear``) or as a queue (``queue``, 1 / (1 - rho load)). The load
    doubles over an hour from ``surge_at``, past anything the warm-up saw; at ``rollout_at``
    version 1.1 calls the service's other functions 30% less often (the load measure drops
    at the same load)."""
    from processor.detect.base import Observation
    from processor.pipeline.sketch import LogSketch
    from processor.pipeline.window import LocationWindow, VersionFigures
    from tests.windows import LOC, V1, W_NS

    rng = np.random.default_rng(seed)
    first_seen = {V1: W_NS}
    for i in range(windows):
        surge = 1.0 + float(np.clip((i - surge_at) / 60, 0.0, 1.0))
        load = surge * float(np.exp(0.15 * np.sin(2 * np.pi * i / 1440) + rng.normal(0, 0.12)))
        factor = 1 + 1.2 * (load - 0.7) if shape == "linear" else 0.75 / (1 - 0.25 * load)
        version = V2 if i >= rollout_at else V1
        if i >= rollout_at:
            first_seen.setdefault(V2, (i + 1) * W_NS)
        mix = 0.7 if i >= rollout_at else 1.0
        n = int(rng.poisson(8 * 60 * load))
        sk = LogSketch.from_values(rng.lognormal(np.log(30e6 * factor), 0.5, n))
        lw = LocationWindow(0, LOC, n, 0, sk, [VersionFigures(version, n, 0, sk)])
        yield Observation(LOC, i * W_NS, (i + 1) * W_NS, lw, 0.0, version, dict(first_seen),
                          service_calls=150 * load * mix + n / 60)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", ["linear", "queue"])
def test_latency_that_follows_load_past_the_baseline_and_through_a_rollout_is_no_regression(shape, seed):
    """Issue 14: the load goes past the range the warm-up saw (a queue is convex there), then
    a rollout changes how often the other functions are called; the function is unchanged."""
    latency, scaling = make(LatencyShift), make(ScalingShift)
    events = [e for obs in _load_following(seed, shape) for det in (latency, scaling) for e in det.update(obs)]
    assert events == [], [e.summary for e in events]
    assert latency.load.slope > 0.5 and latency.load_ref is not None  # it did follow the load


@pytest.mark.parametrize("seed", [41, 42, 43])
def test_a_gross_tail_shift_right_after_a_short_warm_up_is_not_taken_for_noise(seed):
    # The windows that build a shift's evidence must not count as the location's own spread
    # before it is judged: a gross tail shift soon after the warm-up is still caught.
    det = LatencyShift(window_s=60.0, warmup_windows=10)
    change = 14
    events = [e for obs in observations(seed, change + 20, change_at=change, kind="tail", effect=12.0, rate=4.0)
              for e in det.update(obs)]
    e = onset(events, "latency_regression")
    assert e.detail["quantile"] in ("p99", "p999") and e.detail["ratio"] > 3
    assert e.window_start_ns // (60 * 10**9) - change <= 8


class _ScalarDormant(Dormant):
    """The dormant rule written for one location, scalar by scalar, as it was before its
    state became columns: what the columnar code must reproduce."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.state = list(self.freeze())  # presence, calls, windows, last_seen, version, pwls, silent

    def update(self, obs):
        st, ff = self.state, self.fading_factor
        if obs.window is not None and obs.window.count > 0:
            n = obs.window.count
            st[0], st[1] = (1.0, float(n)) if st[2] == 0 else (ff * 1.0 + (1 - ff) * st[0], ff * n + (1 - ff) * st[1])
            st[2] += 1
            st[3], st[4], st[5] = obs.end_ns, obs.window.main_version.version, st[0]
            if st[6]:
                st[6] = False
                return [obs.event("resolved", "info", f"{obs.location.function} is called again",
                                  {"resolves": self.event_type, "reason": "called again", "count": n},
                                  subject=self.event_type)]
            return []
        if st[2] == 0:
            return []
        st[0] = ff * 0.0 + (1 - ff) * st[0]
        if st[6] or st[2] < self.warmup_windows:
            return []
        silence_s = (obs.end_ns - st[3]) / 1e9
        rate = st[1] / self.window_s
        p = math.exp(-rate * silence_s)
        if silence_s < self.min_silence_s or p >= self.alpha or st[5] < self.min_presence:
            return []
        st[6] = True
        return [self._silence(obs, silence_s, rate, p, st[4], st[5], st[3])]

    def freeze(self, sketch=b""):
        return tuple(self.state) if hasattr(self, "state") else super().freeze(sketch)[:7]


def test_dormant_columns_over_many_locations_agree_with_one_detector_each():
    """The engine's path (every location of a service in one update) gives the events and
    states of the scalar rule fed location by location, window by window: locations that
    vanish, come back, start late and stay rare, with rows out of order."""
    from processor.detect.base import Observation
    from processor.pipeline.location import Location
    from processor.pipeline.sketch import LogSketch
    from processor.pipeline.window import LocationWindow, VersionFigures

    rng = np.random.default_rng(3)
    n, windows = 80, 160
    proto = Dormant(warmup_windows=10, min_silence_s=300)
    cols, singles = proto.columns(), [_ScalarDormant(warmup_windows=10, min_silence_s=300) for _ in range(n)]
    rows = rng.permutation(1000)[:n]  # location ids: sparse, unordered
    for r in rows:
        cols.put(int(r))
    locs = [Location("p", "s", f"f{i}") for i in range(n)]
    presence = rng.uniform(0.5, 1.0, n)
    gone = rng.integers(20, windows + 40, n)   # some vanish, some never do
    back = gone + rng.integers(10, 60, n)      # and some come back
    start = rng.integers(0, 30, n)
    got, want = [], []
    for w in range(windows):
        version = ("s", "1" if w < 80 else "2", "")
        counts = np.array([int(rng.poisson(50)) if start[i] <= w and (w < gone[i] or w >= back[i])
                           and rng.random() < presence[i] else 0 for i in range(n)])

        def obs(i, w=w, version=version, counts=counts):
            lw = None if not counts[i] else LocationWindow(
                int(rows[i]), locs[i], int(counts[i]), 0, LogSketch(), [VersionFigures(version, int(counts[i]), 0, LogSketch())])
            return Observation(locs[i], w * 60 * 10**9, (w + 1) * 60 * 10**9, lw, service_version=version)

        for i in range(n):
            want += [e.fields() for e in singles[i].update(obs(i))]
        order = np.concatenate([np.flatnonzero(counts > 0), np.flatnonzero(counts == 0)])
        got += [e.fields() for e in cols.update(
            rows[order], counts[order], [version] * int((counts > 0).sum()), (w + 1) * 60 * 10**9, version,
            lambda k, order=order, obs=obs: obs(int(order[k])), tick=w + 1)]
    assert sorted(e["id"] for e in got) == sorted(e["id"] for e in want) and len(want) > 10
    assert {e["type"] for e in want} == {"dormant", "resolved"}
    # the same state; presence decayed to now, as the scalar rule decays it window by window
    assert [(cols.presence_at(int(r), windows),) + cols.row(int(r), windows)[1:7] for r in rows] == [
        d.freeze() for d in singles]
    # as records (a checkpoint's, all rows at once) at the ticks of their services: the same rows back
    ticks = [windows + k % 3 for k in range(n)]
    records = cols.records(rows.tolist(), ticks)
    assert [cols.from_record(r) for r in records] == [cols.row(int(r), t) for r, t in zip(rows, ticks)]
