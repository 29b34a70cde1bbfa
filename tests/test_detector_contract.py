"""The contract every detector keeps (as River's check suite does for its estimators):
deterministic, picklable, freezable and bounded state, silent during warm-up, fed only windows."""

import inspect
import marshal
import pickle

import pytest

from processor.config import Config
from processor.detect import Detector, build_detectors
from tests.windows import observations

DETECTORS = build_detectors(Config.defaults())
IDS = [type(d).__name__ for d in DETECTORS]


def fresh(det):
    return next(d for d in build_detectors(Config.defaults()) if type(d) is type(det))


def run(det, stream):
    return [e.fields() for obs in stream for e in det.update(obs)]


def test_every_event_type_has_a_detector():
    assert {d.event_type for d in DETECTORS} == {
        "latency_regression", "error_regression", "new_exception", "scaling_regression", "dormant"}


@pytest.mark.parametrize("det", DETECTORS, ids=IDS)
def test_is_fed_windows_not_spans(det):
    assert isinstance(det, Detector)
    assert list(inspect.signature(det.update).parameters) == ["obs"]


@pytest.mark.parametrize("det", DETECTORS, ids=IDS)
@pytest.mark.parametrize("kind", ["median", "errors", "exception", "scaling", "vanish"])
def test_same_windows_give_the_same_events(det, kind):
    a = run(fresh(det), observations(5, 260, change_at=150, kind=kind, effect=2.0))
    b = run(fresh(det), observations(5, 260, change_at=150, kind=kind, effect=2.0))
    assert a == b


@pytest.mark.parametrize("det", DETECTORS, ids=IDS)
@pytest.mark.parametrize("kind", ["median", "errors", "exception", "scaling", "vanish"])
def test_state_survives_pickling_mid_stream(det, kind):
    stream = list(observations(6, 260, change_at=150, kind=kind, effect=2.0))
    straight = run(fresh(det), stream)
    d = fresh(det)
    first = run(d, stream[:140])
    restored = pickle.loads(pickle.dumps(d))
    assert first + run(restored, stream[140:]) == straight


@pytest.mark.parametrize("det", DETECTORS, ids=IDS)
def test_state_stays_bounded(det):
    d = fresh(det)
    stream = observations(7, 600, rate=6.0)
    sizes = []
    for i, obs in enumerate(stream):
        d.update(obs)
        if i in (150, 599):
            sizes.append((len(pickle.dumps(d)), len(marshal.dumps(d.freeze()))))
    for k in (0, 1):
        assert sizes[1][k] <= sizes[0][k] * 1.25 + 512
    busy = fresh(det)
    for obs in observations(7, 200, rate=600.0):  # 100x the spans per window
        busy.update(obs)
    assert len(pickle.dumps(busy)) <= 16_384 and len(marshal.dumps(busy.freeze())) <= 16_384


@pytest.mark.parametrize("det", DETECTORS, ids=IDS)
@pytest.mark.parametrize("kind,effect", [("median", 3.0), ("errors", 50.0), ("exception", 1.0),
                                         ("vanish", 1.0), ("tail", 4.0)])
def test_silent_during_warm_up(det, kind, effect):
    warmup = Config.defaults().detectors.warmup_windows
    # the change starts in the middle of warm-up and the stream ends with it
    assert run(fresh(det), observations(8, warmup, change_at=warmup // 2, kind=kind, effect=effect)) == []


@pytest.mark.parametrize("det", DETECTORS, ids=IDS)
def test_parameters_are_shared_per_configuration_and_seen_by_river(det):
    other = fresh(det)
    assert other._p is det._p  # one tuple per configuration, not per location
    params = det._get_params()
    assert list(params) == list(inspect.signature(type(det)).parameters)
    clone = det.clone()
    assert type(clone) is type(det) and clone._get_params() == params and clone._p is det._p
    assert pickle.loads(pickle.dumps(det))._p is det._p
    different = type(det)(**{**params, "warmup_windows": params["warmup_windows"] + 1})
    assert different._p is not det._p and different.warmup_windows == params["warmup_windows"] + 1
    assert repr(det).startswith(type(det).__name__)


@pytest.mark.parametrize("det", DETECTORS, ids=IDS)
@pytest.mark.parametrize("kind", ["median", "tail", "errors", "exception", "scaling", "vanish"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-sketch", "own-sketch"])
def test_state_survives_freezing_between_every_window(det, kind, shared):
    """What the engine does between windows: the state frozen to plain values, marshalled,
    thawed into a detector of the same configuration; long enough for regressions to be
    opened, resolved and accepted. With ``shared`` the latency detector's baseline sketch is
    the one the location publishes, and is left out of the frozen state."""
    stream = list(observations(6, 420, change_at=150, kind=kind, effect=2.0))
    straight = run(fresh(det), stream)
    d, events = fresh(det), []
    for obs in stream:
        events += [e.fields() for e in d.update(obs)]
        sketch = getattr(d, "_baseline", b"") if shared else b"\x00"
        state = d.freeze(sketch)
        d = det.thawed(marshal.loads(marshal.dumps(state)), sketch)
        assert d.freeze(sketch) == state
        if shared and hasattr(d, "_baseline"):
            assert state[0] is None and d._baseline is sketch
    assert events == straight
