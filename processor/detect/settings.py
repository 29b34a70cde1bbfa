"""Detector settings: the ``detectors:`` section of the YAML file, validated at start.

Every threshold is here with its default; docs/detection.md is generated from this table
and a test keeps the two in sync. Defaults come from ``benchmarks/detection.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from processor.config import ConfigError, non_negative_float, positive_float, positive_int


def _probability(value: Any) -> float:
    v = positive_float(value)
    if v >= 1:
        raise ValueError(f"must be < 1, got {value!r}")
    return v


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class DetectorSetting:
    section: str
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str

    @property
    def path(self) -> str:
        return f"detectors.{self.section}.{self.name}" if self.section else f"detectors.{self.name}"


S = DetectorSetting
DETECTOR_SETTINGS: tuple[DetectorSetting, ...] = (
    S("", "warmup_windows", 30, positive_int, "windows a location is watched silently before any detector speaks"),
    S("", "accept_windows", 120, positive_int, "windows after which a lasting change becomes the new baseline"),
    S("latency", "enabled", True, _bool, "watch latency at p50, p99 and p99.9"),
    S("latency", "threshold", 12.0, positive_float, "CUSUM decision interval (nats) on exceedances of the baseline's quantile"),
    S("latency", "median_delta", 0.1, _probability, "share above the baseline median that the median CUSUM tests for (0.5 + this)"),
    S("latency", "tail_ratio", 2.5, positive_float, "factor on the share above the baseline's p99 / p99.9 that the tail CUSUMs test for"),
    S("latency", "min_tail_expected", 20.0, positive_float, "baseline spans expected above a tail quantile before that tail is watched"),
    S("latency", "min_relative", 0.15, non_negative_float, "smallest relative rise of the quantile that is reported"),
    S("latency", "min_absolute_ms", 0.5, non_negative_float, "smallest absolute rise of the quantile (ms) that is reported"),
    S("latency", "alpha", 1e-3, _probability, "significance of the confirming rank test (p50) or binomial test (tails)"),
    S("errors", "enabled", True, _bool, "watch the share of spans with status ERROR"),
    S("errors", "threshold", 12.0, positive_float, "CUSUM decision interval (nats) on error counts"),
    S("errors", "ratio", 3.0, positive_float, "rise of the error share the CUSUM tests for"),
    S("errors", "prior_share", 0.001, _probability, "error share assumed before a location has shown its own"),
    S("errors", "prior_spans", 2000.0, positive_float, "weight of that assumption, in spans"),
    S("errors", "min_ratio", 1.5, positive_float, "smallest relative rise of the error share that is reported"),
    S("errors", "min_absolute", 0.001, non_negative_float, "smallest absolute rise of the error share that is reported"),
    S("errors", "alpha", 1e-3, _probability, "significance of the confirming binomial test"),
    S("exceptions", "enabled", True, _bool, "report exception types new at a location"),
    S("exceptions", "max_types", 64, positive_int, "exception types remembered per location"),
    S("scaling", "enabled", True, _bool, "watch how latency grows with load"),
    S("scaling", "warmup_windows", 60, positive_int, "windows of (load, latency) points before the baseline line is trusted"),
    S("scaling", "recent_windows", 30, positive_int, "recent windows whose residual slope is tested"),
    S("scaling", "z_threshold", 5.0, positive_float, "t of the residual slope that counts as a rise"),
    S("scaling", "persist_windows", 3, positive_int, "windows in a row the rise must hold"),
    S("scaling", "min_relative", 0.15, non_negative_float, "smallest extra latency across the recent load range that is reported"),
    S("scaling", "min_load_range", 0.2, non_negative_float, "smallest spread of log load in the recent windows to judge a slope"),
    S("scaling", "resolve_windows", 10, positive_int, "windows in a row with a flat residual slope that close a scaling regression"),
    S("dormant", "enabled", True, _bool, "report steadily called locations that fall silent"),
    S("dormant", "min_silence_s", 600.0, positive_float, "silence (event-time seconds) before a location is called dormant"),
    S("dormant", "min_presence", 0.9, _probability, "share of windows with calls that makes a location steady"),
    S("dormant", "alpha", 1e-6, _probability, "how unlikely the silence must be at the location's usual rate"),
)
_BY_PATH = {(s.section, s.name): s for s in DETECTOR_SETTINGS}
SECTIONS = sorted({s.section for s in DETECTOR_SETTINGS if s.section})


class DetectorSettings:
    """Attribute access by section: ``settings.latency.threshold``, ``settings.warmup_windows``."""

    def __init__(self, values: dict[tuple[str, str], Any] | None = None):
        self._values = {k: s.default for k, s in _BY_PATH.items()}
        self._values.update(values or {})
        for section in SECTIONS:
            setattr(self, section, _Section({n: v for (sec, n), v in self._values.items() if sec == section}))
        for (sec, n), v in self._values.items():
            if not sec:
                setattr(self, n, v)

    def __eq__(self, other) -> bool:
        return isinstance(other, DetectorSettings) and self._values == other._values

    def __repr__(self) -> str:
        return f"DetectorSettings({self._values!r})"


class _Section:
    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)


def parse_detector_settings(raw: Any, where: str = "config") -> DetectorSettings:
    """Validate the ``detectors:`` mapping; a bad key or value raises ConfigError naming it."""
    if raw is None:
        return DetectorSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid setting detectors ({where}): must be a mapping")
    values = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"invalid setting detectors.{key} ({where}): must be a mapping")
            items = [((key, str(k).replace("-", "_")), v) for k, v in value.items()]
        else:
            items = [(("", key), value)]
        for path, v in items:
            setting = _BY_PATH.get(path)
            if setting is None:
                name = ".".join(p for p in ("detectors",) + path if p)
                raise ConfigError(f"config: unknown key {name!r} in {where}")
            try:
                values[path] = setting.parse(v)
            except ValueError as e:
                raise ConfigError(f"invalid setting {setting.path} ({where}): {e}") from None
    return DetectorSettings(values)


def reference_markdown() -> str:
    rows = ["| YAML key | default | meaning |", "|---|---|---|"]
    for s in DETECTOR_SETTINGS:
        rows.append(f"| `{s.path}` | `{s.default}` | {s.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
