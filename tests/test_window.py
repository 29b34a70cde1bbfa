"""Event-time windows: membership, watermarks per service, lateness, idle flush, replay."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.receiver.decode import decode_request
from processor.pipeline.window import WindowStage
from tests.otlp import S, encoded

SEC = 1_000_000_000
W = 60 * SEC
T0 = 1_700_000_000 * SEC - (1_700_000_000 * SEC) % W  # a window boundary


def batch(spans):
    return decode_request(encoded(spans))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def stage(lateness=0, idle=60.0, clock=None):
    return WindowStage(W, lateness * SEC, idle_timeout=idle, exemplars=2, clock=clock or FakeClock())


def test_span_belongs_to_the_window_holding_its_end():
    st_ = stage()
    st_ = stage(lateness=1)
    st_.ingest(batch([S(T0 + W - 1), S(T0 + W)]))  # last ns of window 0, first of window 1
    closed = st_.flush_all()
    assert [(c.start_ns - T0, c.locations[0].count) for c in closed] == [(0, 1), (W, 1)]


def test_window_closes_when_the_watermark_passes_its_end():
    st_ = stage(lateness=5)
    assert st_.ingest(batch([S(T0 + 10 * SEC)])) == []
    assert st_.ingest(batch([S(T0 + W + 4 * SEC)])) == []        # watermark W-1s: still open
    closed = st_.ingest(batch([S(T0 + W + 5 * SEC)]))           # watermark reaches W
    assert [c.start_ns for c in closed] == [T0]
    assert closed[0].end_ns == T0 + W


def test_span_for_a_closed_window_is_late_counted_and_dropped():
    st_ = stage(lateness=0)
    st_.ingest(batch([S(T0 + SEC), S(T0 + W + SEC)]))  # closes window 0
    assert st_.stats["late"] == 0
    st_.ingest(batch([S(T0 + 2 * SEC)]))
    assert st_.stats["late"] == 1
    (w1,) = st_.flush_all()
    assert w1.start_ns == T0 + W and w1.locations[0].count == 1


def test_lateness_is_decided_span_by_span_within_a_batch():
    st_ = stage(lateness=0)
    st_.ingest(batch([S(T0 + SEC), S(T0 + W + SEC), S(T0 + 2 * SEC)]))
    assert st_.stats["late"] == 1


def test_watermarks_are_per_service():
    st_ = stage(lateness=0)
    st_.ingest(batch([S(T0 + SEC, service="a"), S(T0 + SEC, service="b")]))
    closed = st_.ingest(batch([S(T0 + 3 * W, service="a")]))
    assert [c.service for c in closed] == ["a"]
    st_.ingest(batch([S(T0 + 2 * SEC, service="b")]))  # b's window 0 is still open
    assert st_.stats["late"] == 0


def test_idle_service_windows_close_in_processing_time():
    clock = FakeClock()
    st_ = stage(idle=30.0, clock=clock)
    st_.ingest(batch([S(T0 + SEC, service="quiet")]))
    clock.t = 29.0
    assert st_.flush_idle() == []
    clock.t = 30.0
    (closed,) = st_.flush_idle()
    assert closed.service == "quiet" and st_.open_windows() == 0
    st_.ingest(batch([S(T0 + 2 * SEC, service="quiet")]))  # its window is gone: late
    assert st_.stats["late"] == 1


def test_closed_window_counts_errors_versions_exceptions_and_exemplars():
    spans = [S(T0 + SEC, duration=d * 1000, version=v, error=e, exceptions=x)
             for d, v, e, x in [(5, "1", False, ()), (50, "1", True, ("IOError",)),
                                (7, "2", False, ()), (9, "2", True, ("IOError", "KeyError"))]]
    st_ = stage()
    b = batch(spans)
    st_.ingest(b)
    (cw,) = st_.flush_all()
    (lw,) = cw.locations
    assert (lw.count, lw.errors) == (4, 2)
    assert {v.version[1]: (v.count, v.errors) for v in lw.versions} == {"1": (2, 1), "2": (2, 1)}
    assert lw.exceptions == {"IOError": 2, "KeyError": 1}
    slowest = [b.trace_id[i].tobytes().hex() for i in (1, 3)]  # 50 us and 9 us
    assert lw.exemplars == slowest


def _random_spans(seed: int, n: int, tied: bool = False) -> list[S]:
    """Several services and functions, ends mostly increasing with bounded disorder;
    ``tied``: durations from three values only, so the slowest spans tie everywhere."""
    rng = np.random.default_rng(seed)
    ends = T0 + np.cumsum(rng.exponential(0.3 * SEC, n)).astype(np.int64)
    ends = ends - rng.integers(0, 20 * SEC, n)  # out of order by up to 20 s
    durations = (rng.integers(1, 4, n) * 1_000_000 if tied
                 else rng.lognormal(14, 1, n).astype(np.int64) + 1)
    return [S(int(e), duration=int(d),
              function=f"f{rng.integers(0, 6)}", service=f"s{rng.integers(0, 3)}",
              version=str(rng.integers(1, 3)), error=bool(rng.random() < 0.05),
              exceptions=("E",) if rng.random() < 0.02 else ())
            for e, d in zip(ends, durations)]


def _canonical(closed):
    # Windows of different services may close in another order; each service's own
    # windows always close oldest first, and that is all its detectors see.
    closed = sorted(closed, key=lambda c: (c.service, c.start_ns))
    return [(c.service, c.start_ns, lw.location.key, lw.count, lw.errors,
             lw.sketch.index.tolist(), lw.sketch.counts.tolist(),
             sorted((v.version, v.count, v.errors) for v in lw.versions),
             sorted(lw.exceptions.items()), lw.exemplars)
            for c in closed for lw in c.locations]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), cuts=st.lists(st.integers(1, 599), max_size=30),
       tied=st.booleans())
def test_replay_in_any_batching_gives_identical_windows(seed, cuts, tied):
    spans = _random_spans(seed, 600, tied)
    # Per-span trace ids must match across batchings, so encode span by span and join.
    singles = [encoded([s]) for s in spans]
    def run_split(points):
        st_ = stage(lateness=5)
        out = []
        bounds = [0, *sorted(set(points)), len(spans)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if lo < hi:
                out += st_.ingest(decode_request(b"".join(singles[lo:hi])))
        return out + st_.flush_all(), st_.stats["late"]

    one_by_one, late_a = run_split(list(range(1, len(spans))))
    as_cut, late_b = run_split(cuts)
    assert late_a == late_b > 0
    assert _canonical(one_by_one) == _canonical(as_cut)


def test_environments_of_one_service_have_their_own_watermarks():
    st_ = stage(lateness=0)
    st_.ingest(batch([S(T0 + SEC, env="prod"), S(T0 + 3 * W, env="staging")]))
    st_.ingest(batch([S(T0 + 2 * SEC, env="prod")]))  # prod's first window is still open
    assert st_.stats["late"] == 0
    closed = st_.flush_all()
    assert sorted((c.environment, c.service) for c in closed) == [("prod", "shop"), ("staging", "shop")]


def test_idle_time_counts_from_arrival_not_from_processing():
    clock = FakeClock()
    st_ = stage(idle=30.0, clock=clock)
    b = batch([S(T0 + SEC, service="busy")])
    b.received_at = 100.0  # arrived at 100 s, processed later after a backlog
    clock.t = 120.0
    st_.ingest(b)
    assert st_.flush_idle() == []  # idle for 20 s since arrival, not for 120 s
    clock.t = 130.0
    assert len(st_.flush_idle()) == 1


def test_exemplar_ties_are_settled_by_trace_id_whatever_the_batching():
    # Five equally slow spans of one function, trace ids decreasing in arrival order: the
    # exemplars must be the two smallest trace ids whether they came in one batch or five.
    spans = [S(T0 + i * SEC, duration=3_000_000) for i in range(5)]
    singles = [encoded([s]) for s in reversed(spans)][::-1]  # ids fall as the spans arrive

    def exemplars(batches):
        st_ = stage()
        for b in batches:
            st_.ingest(decode_request(b))
        (closed,) = st_.flush_all()
        return closed.locations[0].exemplars

    together, apart = exemplars([b"".join(singles)]), exemplars(singles)
    assert together == apart
    assert together == sorted(together) and len(together) == 2
