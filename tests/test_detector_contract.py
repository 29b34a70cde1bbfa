"""The contract every registered detector keeps, as River's check suite does for its
estimators: it fires on its own kind of change and stays quiet on stationary streams;
deterministic; its state survives freezing and is bounded; silent during warm-up; fed only
windows; its settings validated and all of them reaching it. Each detector states its own
case (``Detector._contract``, as River's ``_unit_test_params``)."""

import dataclasses
import importlib
import inspect
import marshal
import pkgutil

import pytest

import processor.detect
from processor.config import Config
from processor.detect.base import Detector
from processor.detect.registry import DETECTORS, DetectorSettings, build_detectors, parse_detector_settings
from processor.detect.settings import ConfigError
from tests.windows import V2, observations

IDS = [d.__name__ for d in DETECTORS]
CHANGE_AT, WINDOWS = 150, 260
STATIONARY_SEEDS = (31, 32, 33, 34)


def fresh(cls) -> Detector:
    return next(d for d in build_detectors(Config.defaults()) if type(d) is cls)


def run(det, stream):
    return [e.fields() for obs in stream for e in det.update(obs)]


def changed_stream(cls, seed=5, windows=WINDOWS):
    kind, effect = cls._contract()["change"]
    return list(observations(seed, windows, change_at=CHANGE_AT, kind=kind, effect=effect))


def test_every_detector_module_is_registered():
    found = set()
    for info in pkgutil.iter_modules(processor.detect.__path__):
        module = importlib.import_module(f"processor.detect.{info.name}")
        found |= {obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, Detector)
                  and obj.__module__ == module.__name__ and obj.event_type}
    assert found == set(DETECTORS)


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_declares_a_name_an_event_type_a_description_and_typed_settings(cls):
    assert cls.name and cls.event_type and cls.description.endswith(".")
    assert dataclasses.is_dataclass(cls.Settings) and cls.Settings.__dataclass_params__.frozen
    assert "enabled" in {f.name for f in dataclasses.fields(cls.Settings)}


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_every_setting_reaches_the_detector(cls):
    """A setting that no constructor parameter takes would be accepted and do nothing."""
    params = inspect.signature(cls).parameters
    changed = {}
    for f in dataclasses.fields(cls.Settings):
        if f.name == "enabled":
            continue
        assert f.name in params, f"detectors.{cls.name}.{f.name} is not a parameter of {cls.__name__}"
        changed[f.name] = f.default * 2 if not isinstance(f.default, float) or f.default < 0.5 else f.default / 2
    settings = DetectorSettings(**{cls.name: cls.Settings(**changed)})
    det = next(d for d in build_detectors(Config.defaults(detectors=settings)) if type(d) is cls)
    assert {k: det._get_params()[k] for k in changed} == changed


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_a_bad_setting_is_refused_naming_it(cls):
    for f in dataclasses.fields(cls.Settings):
        with pytest.raises(ConfigError, match=rf"detectors\.{cls.name}\.{f.name}\b"):
            parse_detector_settings({cls.name: {f.name: "not a value"}}, "test.yaml")
    with pytest.raises(ConfigError, match=rf"detectors\.{cls.name}\.no_such_setting"):
        parse_detector_settings({cls.name: {"no_such_setting": 1}}, "test.yaml")


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_can_be_disabled(cls):
    settings = DetectorSettings(**{cls.name: cls.Settings(enabled=False)})
    kinds = [type(d) for d in build_detectors(Config.defaults(detectors=settings))]
    assert cls not in kinds and len(kinds) == len(DETECTORS) - 1


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_is_fed_windows_not_spans(cls):
    assert list(inspect.signature(cls.update).parameters) == ["self", "obs"]


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_fires_on_its_own_kind_of_change_attributed_to_the_new_version(cls, seed):
    det = fresh(cls)
    events = [e for obs in changed_stream(cls, seed) for e in det.update(obs)]
    own = [e for e in events if e.type == cls.event_type]
    assert own, f"{cls.__name__} raised nothing on a {cls._contract()['change']} change"
    assert own[0].version == V2 and own[0].window_start_ns >= CHANGE_AT * 60 * 10**9


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
@pytest.mark.parametrize("rate", [0.2, 6.0, 60.0])
def test_stays_quiet_on_stationary_streams(cls, rate):
    allowed = cls._contract()["max_stationary"]
    for seed in STATIONARY_SEEDS:
        events = run(fresh(cls), observations(seed, 400, rate=rate))
        assert len(events) <= allowed, [e["summary"] for e in events]


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_same_windows_give_the_same_events(cls):
    a = run(fresh(cls), changed_stream(cls))
    b = run(fresh(cls), changed_stream(cls))
    assert a and a == b


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_state_survives_a_freeze_mid_stream(cls):
    """Frozen (what a checkpoint keeps) after the change began and before it was reported,
    thawed into a detector of the same configuration: the rest of the stream gives the same
    events and the same final state as a detector that was never frozen."""
    stream = changed_stream(cls, windows=WINDOWS + 150)
    straight = fresh(cls)
    expected = run(straight, stream)
    d = fresh(cls)
    first = run(d, stream[:CHANGE_AT + 1])
    state = marshal.loads(marshal.dumps(d.freeze()))
    restored = fresh(cls).thawed(state)
    assert expected and first + run(restored, stream[CHANGE_AT + 1:]) == expected
    assert restored.freeze() == straight.freeze() and restored.freeze() != fresh(cls).freeze()


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-sketch", "own-sketch"])
def test_state_survives_freezing_between_every_window(cls, shared):
    """What the engine does between windows: the state frozen to plain values, marshalled,
    thawed into a detector of the same configuration; long enough for regressions to be
    opened and resolved. With ``shared`` the latency detector's baseline sketch is the one the
    location publishes, and is left out of the frozen state."""
    stream = changed_stream(cls, windows=420)
    straight = run(fresh(cls), stream)
    d, events, left_out = fresh(cls), [], 0
    for obs in stream:
        events += [e.fields() for e in d.update(obs)]
        sketch = getattr(d, "_baseline", b"") if shared else b"\x00"
        state = d.freeze(sketch)
        d = fresh(cls).thawed(marshal.loads(marshal.dumps(state)), sketch)
        assert d.freeze(sketch) == state
        left_out += shared and hasattr(d, "_baseline") and state[0] is None
    assert straight and events == straight
    assert (left_out > 0) == (shared and hasattr(d, "_baseline"))


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_state_stays_bounded(cls):
    d = fresh(cls)
    sizes = []
    for i, obs in enumerate(observations(7, 600, rate=6.0)):
        d.update(obs)
        if i in (150, 599):
            sizes.append(len(marshal.dumps(d.freeze())))
    assert sizes[1] <= sizes[0] * 1.25 + 512
    busy = fresh(cls)
    for obs in observations(7, 200, rate=600.0):  # 100x the spans per window
        busy.update(obs)
    assert len(marshal.dumps(busy.freeze())) <= 16_384


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
@pytest.mark.parametrize("kind,effect", [("median", 3.0), ("errors", 50.0), ("exception", 1.0),
                                         ("vanish", 1.0), ("tail", 4.0), ("scaling", 2.0)])
def test_silent_during_warm_up(cls, kind, effect):
    warmup = Config.defaults().detectors.warmup_windows
    # the change starts in the middle of warm-up and the stream ends with it
    assert run(fresh(cls), observations(8, warmup, change_at=warmup // 2, kind=kind, effect=effect)) == []


@pytest.mark.parametrize("cls", DETECTORS, ids=IDS)
def test_parameters_are_seen_by_river(cls):
    det = fresh(cls)
    params = det._get_params()
    assert list(params) == list(inspect.signature(cls).parameters)
    clone = det.clone()
    assert type(clone) is cls and clone._get_params() == params
    different = cls(**{**params, "warmup_windows": params["warmup_windows"] + 1})
    assert different.warmup_windows == params["warmup_windows"] + 1 and different._get_params() != params
    assert repr(det).startswith(cls.__name__)


def test_settings_cross_a_process_boundary():
    """Receiver processes are spawned with the configuration pickled."""
    import pickle

    settings = parse_detector_settings({"latency": {"threshold": 7}, "warmup_windows": 4})
    back = pickle.loads(pickle.dumps(Config.defaults(detectors=settings)))
    assert back.detectors == settings and back.detectors.latency.threshold == 7.0 and back.detectors.warmup_windows == 4
