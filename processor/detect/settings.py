"""Typed detector settings: each detector declares a frozen dataclass of its settings, every
field made with ``setting(default, parse, help)``; the ``detectors:`` section of the YAML file
is parsed into them at start (processor/detect/registry.py), and docs/detection.md's table is
generated from them.

>>> @dataclass(frozen=True)
... class Example(Settings):
...     enabled: bool = setting(True, parse_bool, "watch it")
...     threshold: float = setting(12.0, positive_float, "how sure")
>>> Example.parse({"threshold": "3"}, "detectors.example", "config.yaml")
Example(enabled=True, threshold=3.0)
>>> Example.parse({"threshold": -1}, "detectors.example", "config.yaml")
Traceback (most recent call last):
...
processor.parsing.ConfigError: invalid setting detectors.example.threshold (config.yaml): must be > 0, got -1
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from processor.parsing import ConfigError, parse_bool, positive_float, positive_int, probability

__all__ = ["CommonSettings", "ConfigError", "Settings", "parse_bool", "positive_float", "positive_int",
           "probability", "setting"]


def setting(default: Any, parse: Callable[[Any], Any], help: str) -> Any:
    """A settings field: its default, the parser that validates a raw value, one line of help."""
    return dataclasses.field(default=default, metadata={"parse": parse, "help": help})


@dataclass(frozen=True)
class Settings:
    """Base of every settings dataclass: parsing and validation from a mapping."""

    @classmethod
    def parse(cls, raw: Any, path: str, where: str = "config"):
        """The settings from ``raw`` (a mapping; None for all defaults); a bad key or value
        raises ConfigError naming ``path.key`` and ``where``."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError(f"invalid setting {path} ({where}): must be a mapping")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            f = known.get(name)
            if f is None:
                raise ConfigError(f"config: unknown key {path + '.' + name!r} in {where}")
            try:
                values[name] = f.metadata["parse"](value)
            except ValueError as e:
                raise ConfigError(f"invalid setting {path}.{name} ({where}): {e}") from None
        settings = cls(**values)
        try:
            settings.validate()
        except ValueError as e:
            raise ConfigError(f"invalid setting {path} ({where}): {e}") from None
        return settings

    def validate(self) -> None:
        """Checks across fields; raises ValueError. Each field is checked by its parser."""

    @classmethod
    def rows(cls, path: str) -> list[tuple[str, Any, str]]:
        """(YAML key, default, help) of every field, for the generated reference."""
        return [(f"{path}.{f.name}", f.default, f.metadata["help"]) for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class CommonSettings(Settings):
    """Settings every detector may take (``detectors.warmup_windows``, ...), besides the window
    length and the baseline half-life, which come from the main configuration."""

    warmup_windows: int = setting(30, positive_int,
                                  "windows a location is watched silently before any detector speaks")
    accept_windows: int = setting(120, positive_int,
                                  "windows after which a lasting change becomes the new baseline")
