"""The detector registry: the one place a detector is listed.

Everything else about detectors is derived from the classes listed in ``DETECTORS``: the
``detectors:`` settings and their validation, the event types (Prometheus labels, ``tail``
filters), the SARIF rule texts, which types ``top`` shows as open regressions, the
generated settings table of docs/detection.md, and the cases of the shared contract suite
(tests/test_detector_contract.py); tests check the alert rules in deploy/ against it.

>>> [d.name for d in DETECTORS][:2]
['latency', 'errors']
>>> EVENT_TYPES[:3]
('first_seen', 'latency_regression', 'error_regression')
>>> settings = parse_detector_settings({"latency": {"threshold": 8}, "warmup_windows": 5})
>>> settings.latency.threshold, settings.warmup_windows, settings.errors.threshold
(8.0, 5, 12.0)
"""

from __future__ import annotations

from typing import Any

from processor.detect.base import Detector, RegressionDetector
from processor.detect.call_pattern import CallPattern
from processor.detect.dormant import Dormant
from processor.detect.errors import ErrorRateShift
from processor.detect.exceptions import NewException
from processor.detect.latency import LatencyShift
from processor.detect.new_dependency import NewDependency
from processor.detect.rollout import EVENT_TYPE as ROLLOUT, RolloutSettings
from processor.detect.scaling import ScalingShift
from processor.detect.settings import CommonSettings, ConfigError, Settings

# (detectors added later go last: a checkpoint's states are in this order; see
# engine.ADDED_LATER)
DETECTORS: tuple[type[Detector], ...] = (LatencyShift, ErrorRateShift, NewException, ScalingShift, Dormant,
                                         CallPattern, NewDependency)

# Events that no registered detector raises: first_seen comes from the engine (a location's
# first window), resolved ends what a detector opened, rollout tells a version's rollout
# (processor/detect/rollout.py, one per service, not per location).
FIRST_SEEN, RESOLVED = "first_seen", "resolved"
EVENT_TYPES: tuple[str, ...] = (FIRST_SEEN,) + tuple(d.event_type for d in DETECTORS) + (ROLLOUT,)
REGRESSION_TYPES: tuple[str, ...] = tuple(d.event_type for d in DETECTORS if d.regression)
# Regressions that stay open until a resolved event ends them (recovered, or accepted as the
# new baseline); the others (new_exception) are one-shot.
RESOLVED_TYPES: tuple[str, ...] = tuple(d.event_type for d in DETECTORS if issubclass(d, RegressionDetector))
DESCRIPTIONS: dict[str, str] = {
    FIRST_SEEN: "A code location was called in production for the first time.",
    **{d.event_type: d.description for d in DETECTORS},
    RESOLVED: "A regression reported earlier ended.",
    ROLLOUT: "A new version of a service reached a milestone of its rollout (first calls, a share of the "
             "service's calls, the previous version gone, rolled back), with its verdict: pass, fail or "
             "inconclusive.",
}

_BY_NAME = {d.name: d for d in DETECTORS}
assert len(_BY_NAME) == len(DETECTORS) and len(set(EVENT_TYPES)) == len(EVENT_TYPES), "names must be unique"


class DetectorSettings:
    """The ``detectors:`` section: ``settings.warmup_windows`` (the common settings) and
    ``settings.<detector name>`` (that detector's typed settings)."""

    def __init__(self, values: dict[tuple[str, str], Any] | None = None, **sections: Settings):
        """``sections``: typed settings by detector name (``common`` for the common ones);
        ``values``: single values by (section, name), section "" for the common ones, as a
        shorthand for tests and benchmarks."""
        import dataclasses

        parts = {"common": sections.pop("common", CommonSettings()),
                 **{name: sections.pop(name, d.Settings()) for name, d in _BY_NAME.items()}}
        if sections:
            raise TypeError(f"no detector named {sorted(sections)}")
        for (section, name), value in (values or {}).items():
            key = section or "common"
            parts[key] = dataclasses.replace(parts[key], **{name: value})
        self.common: CommonSettings = parts.pop("common")
        self.sections: dict[str, Settings] = parts

    def __getattr__(self, name: str):
        # Only for names not set on the object; while unpickling (receiver processes get the
        # settings pickled) neither attribute exists yet, and this must say AttributeError.
        d = self.__dict__
        if name in d.get("sections", {}):
            return d["sections"][name]
        if "common" not in d:
            raise AttributeError(name)
        return getattr(d["common"], name)

    def __eq__(self, other) -> bool:
        return isinstance(other, DetectorSettings) and (self.common, self.sections) == (other.common, other.sections)

    def __repr__(self) -> str:
        return f"DetectorSettings({self.common!r}, {self.sections!r})"


def parse_detector_settings(raw: Any, where: str = "config") -> DetectorSettings:
    """Validate the ``detectors:`` mapping; a bad key or value raises ConfigError naming it."""
    if raw is None:
        return DetectorSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid setting detectors ({where}): must be a mapping")
    common_raw, sections = {}, {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in _BY_NAME:
            sections[name] = _BY_NAME[name].Settings.parse(value, f"detectors.{name}", where)
        else:
            common_raw[name] = value
    return DetectorSettings(common=CommonSettings.parse(common_raw, "detectors", where), **sections)


def parse_rollout_settings(raw: Any, where: str = "config") -> RolloutSettings:
    """Validate the ``rollouts:`` mapping; ``fail_on`` must name regressions that stay open
    until resolved (a one-shot event, such as a new exception, would fail for good)."""
    settings = RolloutSettings.parse(raw, "rollouts", where)
    unknown = sorted(set(settings.fail_on) - set(RESOLVED_TYPES))
    if unknown:
        raise ConfigError(f"invalid setting rollouts.fail_on ({where}): {', '.join(unknown)} "
                          f"not among {', '.join(RESOLVED_TYPES)}")
    return settings


def build_detectors(cfg) -> list[Detector]:
    """The enabled detectors of a configuration, in registry order: the prototypes every
    code location's detectors are thawed from."""
    d = cfg.detectors
    return [cls.from_settings(d.sections[cls.name], d.common, cfg.window, cfg.baseline_half_life)
            for cls in DETECTORS if d.sections[cls.name].enabled]


def reference_markdown() -> str:
    """docs/detection.md's generated part: the event types, then every setting."""
    rows = ["| event type | detector | what it means |", "|---|---|---|",
            f"| `{FIRST_SEEN}` | (the engine) | {DESCRIPTIONS[FIRST_SEEN]} |"]
    for d in DETECTORS:
        rows.append(f"| `{d.event_type}` | `{d.__name__}` (`{d.__module__.rsplit('.', 1)[-1]}.py`) | {d.description} |")
    rows.append(f"| `{RESOLVED}` | the detector that opened it | {DESCRIPTIONS[RESOLVED]} |")
    rows.append(f"| `{ROLLOUT}` | `Rollouts` (`rollout.py`) | {DESCRIPTIONS[ROLLOUT]} |")
    rows += ["", "| YAML key | default | meaning |", "|---|---|---|"]
    for path, default, help_ in CommonSettings.rows("detectors"):
        rows.append(f"| `{path}` | `{default}` | {help_} |")
    for d in DETECTORS:
        for path, default, help_ in d.Settings.rows(f"detectors.{d.name}"):
            rows.append(f"| `{path}` | `{default}` | {help_} |")
    for path, default, help_ in RolloutSettings.rows("rollouts"):
        rows.append(f"| `{path}` | `{list(default) if isinstance(default, tuple) else default}` | {help_} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
