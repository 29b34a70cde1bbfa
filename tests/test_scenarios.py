"""The detection benchmark's scenario generator and scoring (benchmarks/scenarios.py,
benchmarks/detection.py): deterministic, at least 5 spans/s per location, injected changes
of the stated size, OTLP encoding that decodes to the same spans, and scoring rules."""

from collections import Counter

import numpy as np
import pytest

from benchmarks.detection import Ev, score, summarize
from benchmarks.scenarios import (
    BASE_ERROR_SHARE, HOUR, LOAD_FOLLOWING, MINUTE, NEW_VERSION, OLD_VERSION, RHO_CAP, SURGE, SURGE_RAMP,
    OtlpEncoder, generate, generate_load,
)
from processor.receiver.decode import decode_request

SMALL = {"services": 2, "functions_per_service": 10, "hours": 4.0}


def _spans(batch):
    """Rows of a batch as comparable tuples, independent of its table order."""
    return sorted(
        (batch.locations[l].identity, batch.versions[v], s, e, bool(err), t.tobytes())
        for l, v, s, e, err, t in zip(batch.loc.tolist(), batch.ver.tolist(), batch.start.tolist(),
                                      batch.end.tolist(), batch.error.tolist(), batch.trace_id))


def _durations_of(sc, loc_index, chunks, new):
    """Durations (ns) of one location's spans of one version over some chunks."""
    loc = sc.locations[loc_index]
    out = []
    for c in chunks:
        b = sc.chunk(c)
        li = b.locations.index(loc) if loc in b.locations else -1
        vi = [i for i, v in enumerate(b.versions)
              if v[0] == loc.service and (v[1] == NEW_VERSION) == new]
        rows = (b.loc == li) & np.isin(b.ver, vi)
        out.append((b.end - b.start)[rows])
    return np.concatenate(out)


def _chunks(sc, t0_ns, t1_ns):
    return range(sc.chunk_of(t0_ns), sc.chunk_of(t1_ns))


def test_same_seed_gives_the_same_spans_and_changes():
    a, b = generate(5, **SMALL), generate(5, **SMALL)
    assert a.changes == b.changes
    for c in (0, 7, a.n_chunks - 1):
        x, y = a.chunk(c), b.chunk(c)
        assert x.locations == y.locations and x.versions == y.versions
        for col in ("loc", "ver", "start", "end", "error", "trace_id"):
            assert np.array_equal(getattr(x, col), getattr(y, col))
        assert x.exceptions == y.exceptions
    assert _spans(generate(6, **SMALL).chunk(7)) != _spans(a.chunk(7))


def test_batches_are_in_event_time_order_inside_their_chunk():
    sc = generate(1, **SMALL)
    last = 0
    for c in (0, 1, 2, sc.chunk_of(sc.changes[0].change_ns)):
        b = sc.chunk(c)
        t0 = sc.start_ns + c * sc.chunk_ns
        assert np.all(np.diff(b.end) >= 0) and b.end[0] >= max(t0, last)
        assert b.end[-1] < t0 + sc.chunk_ns
        assert np.all(b.start < b.end) and np.all(b.trace_id.any(axis=1))
        assert b.loc.dtype == np.int32 and b.ver.dtype == np.int32
        assert b.trace_id.shape == (len(b), 16)
        assert set(b.loc.tolist()) == set(range(len(b.locations)))  # tables hold only what is used
        last = int(b.end[-1])


def test_every_location_gets_at_least_5_spans_per_second_each_minute():
    sc = generate(2, services=2, functions_per_service=8, hours=1.0)
    per_minute = Counter()
    for c in range(sc.n_chunks):
        b = sc.chunk(c)
        minute = (c * sc.chunk_ns) // MINUTE
        for li, n in zip(*np.unique(b.loc, return_counts=True)):
            per_minute[(b.locations[li].key, minute)] += int(n)
        # the counts the scoring uses are the spans generated
        assert len(b) == int(sc.counts_old[:, c].sum() + sc.counts_new[:, c].sum())
    existing = [f.location.key for f in sc.functions if f.in_old]
    minutes = sc.n_chunks * sc.chunk_ns // MINUTE
    assert min(per_minute[(k, m)] for k in existing for m in range(minutes)) >= 300


def test_rates_follow_the_load_and_never_drop_below_5_per_second():
    sc = generate(3, **SMALL)
    assert sc.rate.min() >= 5.0
    assert 0.35 < sc.load.min() and sc.load.max() < 2.6  # 0.7..1.3 diurnal x lognormal(0, 0.15)
    t = (np.arange(sc.n_chunks) + 0.5) * sc.chunk_ns / 1e9
    phase = np.array([s.phase for s in sc.services])[:, None]
    diurnal = 1 + 0.3 * np.sin(2 * np.pi * t / 86400 + phase)
    burst = np.log(sc.load / diurnal)
    assert abs(burst.mean()) < 0.03 and 0.12 < burst.std() < 0.18  # lognormal(0, 0.15) per minute
    base = np.array([f.base_rate for f in sc.functions])
    assert 7 <= base.min() and base.max() <= 15


def test_rollout_canary_serves_10_percent_then_everything():
    sc = generate(4, services=6, functions_per_service=6, hours=4.0, canary_probability=1.0)
    for s in sc.services:
        assert s.canary and s.full_ns - s.change_ns == 30 * MINUTE
        assert s.change_ns >= sc.start_ns + 3 * HOUR
        both = np.array([f.in_old and f.in_new for f in sc.functions])
        rows = (sc.loc_service == s.index) & both
        before = _chunks(sc, sc.start_ns, s.change_ns)
        canary = _chunks(sc, s.change_ns, s.full_ns)
        after = _chunks(sc, s.full_ns, sc.end_ns)
        assert sc.counts_new[rows][:, before].sum() == 0
        share = sc.counts_new[rows][:, canary].sum() / (
            sc.counts_new[rows][:, canary].sum() + sc.counts_old[rows][:, canary].sum())
        assert 0.08 < share < 0.12
        assert sc.counts_old[rows][:, after].sum() == 0
    first = generate(4, services=1, functions_per_service=4, hours=1.0).chunk(0)
    assert {v[1] for v in first.versions} == {OLD_VERSION}


def test_30_to_40_percent_of_functions_change_plus_new_ones():
    sc = generate(5, services=4, functions_per_service=40, hours=4.0)
    for s in sc.services:
        kinds = Counter(c.kind for c in sc.changes if c.service == s.name)
        existing_changed = sum(n for k, n in kinds.items() if k != "new")
        assert 12 <= existing_changed <= 16
        assert 1 <= kinds["new"] <= 2
        assert all(c.version == s.new and c.change_ns == s.change_ns for c in sc.changes
                   if c.service == s.name)
    assert len({c.key for c in sc.changes}) == len(sc.changes)


@pytest.mark.parametrize("kind,k,q", [("p99", 2.0, 0.99), ("p99", 3.0, 0.99), ("p999", 3.0, 0.999)])
def test_tail_shift_keeps_the_median_and_moves_the_tail_by_about_k(kind, k, q):
    sc = generate(6, services=1, functions_per_service=10, hours=4.0, deck=((kind, k, 1),))
    for c in sc.changes:
        if c.kind == "new":
            continue
        old = sc.sample_durations(c.loc_index, False, 400_000)
        new = sc.sample_durations(c.loc_index, True, 400_000)
        assert abs(np.median(new) / np.median(old) - 1) < 0.03
        assert abs(np.quantile(old, q) / 1e6 / c.baseline - 1) < 0.1  # baseline is the old quantile
        # 1.5% (0.15%) of spans moved to [k q, 1.3 k q]: the quantile lands near 1.1 k q
        assert 0.9 * k < np.quantile(new, q) / np.quantile(old, q) < 1.3 * k


def test_median_shift_multiplies_the_generated_spans():
    sc = generate(7, services=1, functions_per_service=6, hours=4.0, deck=(("median", 2.0, 1),))
    c = next(c for c in sc.changes if c.kind == "median")
    before = _chunks(sc, c.full_ns - 30 * MINUTE, c.change_ns)
    old = _durations_of(sc, c.loc_index, before, new=False)
    new = _durations_of(sc, c.loc_index, _chunks(sc, c.full_ns, c.full_ns + 30 * MINUTE), new=True)
    assert len(old) > 9000 and len(new) > 9000
    assert 1.8 < np.median(new) / np.median(old) < 2.2


def test_error_share_rises_to_the_injected_share():
    sc = generate(8, services=1, functions_per_service=10, hours=5.0, deck=(("error", 0.05, 1),))
    errs = [c for c in sc.changes if c.kind == "error"]
    assert errs and all(c.baseline == BASE_ERROR_SHARE for c in errs)
    for c in errs:
        assert sc.error_share(c.loc_index, False) == BASE_ERROR_SHARE
        assert sc.error_share(c.loc_index, True) == 0.05
    after = _chunks(sc, errs[0].full_ns, sc.end_ns)
    n = err = 0
    for ch in after:
        b = sc.chunk(ch)
        keys = np.array([l.key for l in b.locations])[b.loc]
        mine = np.isin(keys, [c.key for c in errs])
        n += int(mine.sum())
        err += int(b.error[mine].sum())
        assert all(b.error[r] for r, _ in b.exceptions)  # every exception is on an error span
    share = err / n
    assert abs(share - 0.05) < 4 * np.sqrt(0.05 * 0.95 / n)


def test_new_exception_type_appears_only_in_the_new_version():
    sc = generate(9, services=1, functions_per_service=10, hours=4.0,
                  deck=(("new_exception", 0.002, 1),))
    c = next(c for c in sc.changes if c.kind == "new_exception")
    fn = sc.functions[c.loc_index]
    seen = {False: Counter(), True: Counter()}
    for ch in range(sc.chunk_of(c.change_ns) - 60, sc.n_chunks):
        b = sc.chunk(ch)
        for r, t in b.exceptions:
            if b.locations[b.loc[r]].key == c.key:
                seen[b.versions[b.ver[r]][1] == NEW_VERSION][t] += 1
    new_types = set(seen[True]) - set(fn.exception_types)
    assert len(new_types) == 1 and not (set(seen[False]) - set(fn.exception_types))


def test_scaling_change_slows_down_under_load_only():
    sc = generate(10, services=1, functions_per_service=10, hours=4.0, deck=(("scaling", 1.0, 1),))
    for c in (c for c in sc.changes if c.kind == "scaling"):
        def median(new, load):
            return np.median(sc.sample_durations(c.loc_index, new, 100_000, load=load))
        low = [median(False, 0.7), median(True, 0.7)]
        high = [median(False, 1.3), median(True, 1.3)]
        assert abs(low[1] / low[0] - 1) < 0.03
        expected = (1 + (c.baseline + 1.0) * 0.6) / (1 + c.baseline * 0.6)
        assert abs(high[1] / high[0] / expected - 1) < 0.05


def test_vanished_and_new_functions():
    sc = generate(11, services=2, functions_per_service=10, hours=4.0, deck=(("vanished", 0.0, 1),))
    for c in sc.changes:
        i = c.loc_index
        if c.kind == "vanished":
            assert sc.counts_new[i].sum() == 0
            assert sc.counts_old[i, _chunks(sc, c.full_ns, sc.end_ns)].sum() == 0
            assert c.expected_event == "dormant"
        else:
            assert c.kind == "new" and c.expected_event == "first_seen"
            assert sc.counts_old[i].sum() == 0
            assert sc.counts_new[i, _chunks(sc, sc.start_ns, c.change_ns)].sum() == 0
            assert sc.counts_new[i, _chunks(sc, c.full_ns, sc.end_ns)].min() >= 50


def test_otlp_encoding_decodes_to_the_same_spans():
    sc = generate(12, services=2, functions_per_service=10, hours=4.0, deck=(("error", 0.05, 1),))
    enc = OtlpEncoder(sc)
    b = sc.chunk(sc.chunk_of(sc.services[0].full_ns) + 1)
    assert b.exceptions
    reqs = enc.encode(b)
    decoded = [decode_request(r) for r in reqs]
    assert all(d.rejected == 0 for d in decoded)
    assert sorted(s for d in decoded for s in _spans(d)) == _spans(b)
    exc = sorted((int(d.end[r]), t) for d in decoded for r, t in d.exceptions)
    assert exc == sorted((int(b.end[r]), t) for r, t in b.exceptions)
    d = decoded[0]
    loc = d.locations[0]
    assert loc.file and loc.line and loc.environment == "production"
    assert all(v[2] and len(v[2]) == 12 for v in d.versions)
    small = enc.encode(b, max_bytes=20_000)  # split into several requests, none lost
    assert len(small) > 1
    assert sorted(s for r in small for s in _spans(decode_request(r))) == _spans(b)


# --- load cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2])
def test_load_cases_add_load_following_functions_and_leave_the_rest_as_it_was(seed):
    plain, loaded = generate(seed, **SMALL), generate_load(seed, **SMALL)
    assert loaded.changes == plain.changes
    n = len(plain.functions)
    assert [f.location for f in loaded.functions[:n]] == plain.locations
    following = loaded.functions[n:]
    assert len(following) == LOAD_FOLLOWING * len(loaded.services)
    assert all(f.change is None and f.in_old and f.in_new for f in following)
    assert {f.load_following for f in following} == {"linear", "queue"}
    assert len({f.location.key for f in loaded.functions}) == len(loaded.functions)
    assert [s.case for s in loaded.services] == ["surge", "mix"]


def test_load_following_latency_is_linear_or_queue_like_in_the_load():
    sc = generate_load(3, **SMALL)
    for f in (f for f in sc.functions if f.load_following):
        def median(load, f=f):
            return np.median(sc.sample_durations(f.index, False, 100_000, load=load))
        rise = median(2.0) / median(1.0)
        if f.load_following == "linear":
            assert 0.5 <= f.beta <= 1.5 and f.rho == 0
            assert rise == pytest.approx((1 + f.beta * 1.3) / (1 + f.beta * 0.3), rel=0.03)
        else:
            assert 0.15 <= f.rho <= 0.25 and f.beta == 0
            assert rise == pytest.approx((1 - f.rho) / (1 - 2 * f.rho), rel=0.03)  # convex: 1.2x-1.5x
            assert median(8.0) / median(1.0) == pytest.approx((1 - f.rho) / (1 - RHO_CAP), rel=0.03)
        assert np.median(sc.sample_durations(f.index, True, 100_000)) == pytest.approx(median(1.0), rel=0.03)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_surge_takes_the_load_past_anything_the_first_hours_saw(seed):
    sc = generate_load(seed, services=2, functions_per_service=6, hours=8.0)
    s = sc.services[0]
    assert s.case == "surge" and s.surge == SURGE and sc.start_ns + 2.5 * HOUR <= s.surge_ns <= sc.start_ns + 4 * HOUR
    before = sc.load[s.index, :sc.chunk_of(s.surge_ns)]
    after = sc.load[s.index, sc.chunk_of(s.surge_ns + SURGE_RAMP):]
    assert np.median(after) > 1.5 * np.median(before) and np.quantile(after, 0.9) > before.max()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_mix_rollout_calls_the_other_functions_less_often_at_the_same_load(seed):
    sc = generate_load(seed, services=2, functions_per_service=12, hours=8.0)
    s = sc.services[1]
    assert s.case == "mix" and s.surge == 1.0
    mixed = [f for f in sc.functions if f.service == s.index and f.calls_new != 1.0]
    assert mixed and all(f.change is None and not f.load_following and 0.2 <= f.calls_new <= 0.4 for f in mixed)
    rows = sc.loc_service == s.index
    calls = (sc.counts_old[rows] + sc.counts_new[rows]).sum(axis=0) / sc.load[s.index]
    before = calls[_chunks(sc, sc.start_ns, s.change_ns)].mean()
    after = calls[_chunks(sc, s.full_ns, sc.end_ns)].mean()
    assert after < 0.92 * before  # the load measure drops while the load does not


# --- scoring ------------------------------------------------------------------------------------

def _ev(type_, key, end_ns, version=NEW_VERSION, window=60 * 10**9, quantile=""):
    return Ev(type_, key, version, end_ns - window, end_ns, quantile)


def test_scoring_detection_delay_attribution_and_false_events():
    W = 60 * 10**9
    sc = generate(13, **SMALL)
    changes = [c for c in sc.changes if c.kind not in ("new", "vanished")]
    a, b = changes[0], changes[1]
    unchanged = next(f.location.key for f in sc.functions if f.change is None)
    at_a = (a.change_ns // W + 3) * W                       # third window end after the change
    events = [_ev("first_seen", f.location.key, sc.start_ns + W, OLD_VERSION)
              for f in sc.functions if f.in_old]
    events += [
        _ev(a.expected_event, a.key, at_a, quantile="p50"),
        _ev(a.expected_event, a.key, at_a + W),              # later duplicate: first one counts
        _ev(b.expected_event, b.key, b.change_ns - W, OLD_VERSION),  # before: false, not detection
        _ev(b.expected_event, b.key, b.change_ns),           # window ends at the change: false
        _ev(b.expected_event, b.key, b.change_ns + 4 * HOUR),  # beyond the horizon: ignored
        _ev("latency_regression", unchanged, sc.start_ns + 3 * HOUR, OLD_VERSION),  # false
        _ev("latency_regression", unchanged, sc.start_ns + HOUR),       # in warm-up: not scored
        _ev("resolved", unchanged, sc.start_ns + 3 * HOUR),             # never false
    ]
    res = score(sc, events, W)
    rows = {r["key"]: r for r in res["changes"]}
    ra, rb = rows[a.key], rows[b.key]
    assert ra["detected"] and ra["attributed"] and ra["event_version"] == NEW_VERSION
    assert ra["delay_windows"] == pytest.approx((at_a - a.change_ns) / W)
    assert ra["delay_spans"] == sc.spans_between(a.loc_index, a.change_ns, at_a) > 0
    assert not rb["detected"] and not rb["any_event"]
    assert [e["type"] for e in res["false_events"]].count(b.expected_event) == 2
    assert sum(e["key"] == unchanged for e in res["false_events"]) == 1
    assert len(res["false_events"]) == 3 and res["warmup_events"] == 1
    assert res["first_seen"]["existing_announced_once"] == res["first_seen"]["existing_locations"]
    # location-hours: unchanged locations after 2 h, changed ones from 2 h to their change
    warm_end = sc.start_ns + 2 * HOUR
    expected = sum(((sc.end_ns if f.change is None else f.change.change_ns) - warm_end) / HOUR
                   for f in sc.functions if f.in_old)
    assert res["location_hours"] == pytest.approx(expected)

    summary = summarize([res])
    fe = summary["false_events"]
    assert fe["count"] == 3 and fe["on_changed_before_change"] == 2
    assert fe["per_1000_location_hours"] == pytest.approx(3000 / expected)
    cell = next(c for c in summary["cells"] if c["kind"] == a.kind and c["effect"] == a.effect)
    same = [c for c in sc.changes if c.kind == a.kind and c.effect == a.effect]
    assert cell["n"] == len(same) and cell["detected"] == 1
    assert cell["recall"] == pytest.approx(1 / len(same))


def test_cold_start_counts_the_first_two_hours_from_the_end_of_the_warm_up():
    W = 60 * 10**9
    sc = generate(13, **SMALL)
    unchanged = next(f.location.key for f in sc.functions if f.change is None)
    events = [_ev("latency_regression", unchanged, sc.start_ns + HOUR, OLD_VERSION),
              _ev("scaling_regression", unchanged, sc.start_ns + 90 * MINUTE, OLD_VERSION),
              _ev("resolved", unchanged, sc.start_ns + 95 * MINUTE, OLD_VERSION)]
    res = score(sc, events, W, speak_ns=30 * W)
    existing = sum(1 for f in sc.functions if f.in_old)
    assert res["cold_start"] == {"events": {"latency_regression": 1, "scaling_regression": 1},
                                 "location_hours": pytest.approx(existing * 1.5)}
    cold = summarize([res])["cold_start"]
    assert cold["events"] == 2 and cold["per_1000_location_hours"] == pytest.approx(2000 / (existing * 1.5))


def test_scoring_targets_pass_only_when_met():
    W = 60 * 10**9
    sc = generate(14, services=4, functions_per_service=40, hours=4.0)
    # every change detected two windows after it: all recall targets pass
    events = [_ev(c.expected_event, c.key, (c.change_ns // W + 2) * W) for c in sc.changes]
    t = {x["target"]: x for x in summarize([score(sc, events, W)])["targets"]}
    assert all(x["pass"] for name, x in t.items() if name.startswith("recall"))
    assert t["false events per 1,000 location-hours"]["pass"]
    assert t["median delay (spans), median shifts >= +25%"]["value"] < 2000
    # nothing detected: every recall and delay target fails
    t = {x["target"]: x for x in summarize([score(sc, [], W)])["targets"]}
    assert not any(x["pass"] for name, x in t.items() if "false" not in name)
