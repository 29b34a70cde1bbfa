"""One typed configuration object, built from flags, environment and YAML, validated at start.

Precedence: command-line flag > environment variable (``BACKFLOW_<NAME>``) > YAML file
(``--config``) > default. Every setting is declared once in ``SETTINGS``; the command line,
the environment names, the YAML keys and docs/configuration.md all come from that table.

>>> cfg = load_config(argv=["--window", "30"], environ={"BACKFLOW_PREFIX": "bf"})
>>> cfg.window, cfg.prefix, cfg.otlp_grpc
(30.0, 'bf', '0.0.0.0:4317')
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from typing import Any, Callable
from urllib.parse import urlparse

import yaml


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


# --- value parsers: each takes the raw value (str from flag/env, any from YAML) ---------------

def parse_address(value: Any) -> str:
    """``host:port`` or ``[v6]:port`` with a port in 1..65535."""
    text = str(value).strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]\s]*):(\d+)", text)
    if not m:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    if m.group(1):
        ipaddress.IPv6Address(host)
    elif not host:
        raise ValueError(f"expected HOST:PORT, host is empty in {text!r}")
    return text


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a validated ``host:port`` or ``[v6]:port``; the host without brackets.

    >>> split_address("[::1]:4317")
    ('::1', 4317)
    """
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def parse_address_or_off(value: Any) -> str:
    if str(value).strip().lower() == "off":
        return "off"
    return parse_address(value)


def parse_redis_url(value: Any) -> str:
    text = str(value).strip()
    u = urlparse(text)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"scheme must be redis://, rediss:// or unix://, got {text!r}")
    if u.scheme != "unix":
        if not u.hostname:
            raise ValueError(f"no host in {text!r}")
        u.port  # raises ValueError on a bad port
        db = u.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"database must be a number, got {db!r}")
    return text


def parse_prefix(value: Any) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9_.\-{}]+", text):
        raise ValueError(f"use letters, digits and _ . - {{ }} only, got {text!r}")
    return text


def _number(kind: type, low: float, low_inclusive: bool) -> Callable[[Any], float]:
    def parse(value: Any):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        if v < low or (v == low and not low_inclusive):
            raise ValueError(f"must be {'>=' if low_inclusive else '>'} {low:g}, got {value!r}")
        return v

    return parse


positive_float = _number(float, 0, low_inclusive=False)
non_negative_float = _number(float, 0, low_inclusive=True)
positive_int = _number(int, 1, low_inclusive=True)
non_negative_int = _number(int, 0, low_inclusive=True)


def parse_log_level(value: Any) -> str:
    text = str(value).strip().upper()
    if text not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"one of debug, info, warning, error; got {value!r}")
    return text


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # attribute and YAML key; flag is --name-with-dashes, env BACKFLOW_NAME
    default: Any
    parse: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "BACKFLOW_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("otlp_grpc", "0.0.0.0:4317", parse_address, "OTLP/gRPC listen address", "ADDR"),
    Setting("otlp_http", "0.0.0.0:4318", parse_address_or_off,
            "OTLP/HTTP listen address, 'off' disables (not served yet: see README)", "ADDR"),
    Setting("metrics", "0.0.0.0:9464", parse_address, "serves /metrics and /healthz", "ADDR"),
    Setting("redis_url", "redis://localhost:6379/0", parse_redis_url,
            "where streams and state go (rediss:// for TLS)", "URL"),
    Setting("prefix", "backflow", parse_prefix, "prefix of every Redis key", "NAME"),
    Setting("window", 60.0, positive_float, "tumbling window length in seconds, event time", "SECONDS"),
    Setting("allowed_lateness", 10.0, non_negative_float,
            "event-time seconds a window stays open after the service's latest span passed its end",
            "SECONDS"),
    Setting("idle_timeout", 60.0, positive_float,
            "processing-time seconds without spans from a service after which its windows close",
            "SECONDS"),
    Setting("max_request_bytes", 4 * 1024 * 1024, positive_int,
            "largest OTLP request accepted (after decompression); larger ones get RESOURCE_EXHAUSTED",
            "BYTES"),
    Setting("max_clock_skew", 3600.0, non_negative_float,
            "spans ending more than this far ahead of this host's clock are refused (reason "
            "clock_skew), so that one sender's wrong clock cannot move its service's watermark into "
            "the future and make its later spans late; 0 turns the check off", "SECONDS"),
    Setting("max_attribute_length", 4096, non_negative_int,
            "most characters of a value kept from a span (function, file, line, scope name, service, "
            "environment, version, revision, exception type); spans with a longer one are refused "
            "(reason attribute_too_long), as such values become Redis fields and Prometheus labels; "
            "0 turns the check off", "CHARS"),
    Setting("queue_batches", 256, positive_int,
            "decoded requests waiting for the window stage; when full, senders are told to retry",
            "N"),
    Setting("workers", 1, non_negative_int,
            "receiver processes; 1 receives in the main process, N > 1 runs N processes sharing "
            "the OTLP ports (SO_REUSEPORT) that decode and hand their spans to the main one; "
            "0 means one per CPU", "N"),
    Setting("max_locations", 100_000, positive_int,
            "code locations held in memory; spans of further locations fold into one "
            "__overflow__ location per service, counted", "N"),
    Setting("exemplars", 3, non_negative_int,
            "trace ids kept per code location and window (the slowest spans)", "N"),
    Setting("baseline_half_life", 86400.0, positive_float,
            "event-time seconds after which a window's weight in the baseline has halved", "SECONDS"),
    Setting("events_maxlen", 100_000, positive_int,
            "approximate length the events stream is trimmed to (XADD MAXLEN ~)", "N"),
    Setting("redis_buffer", 100_000, positive_int,
            "events held while Redis is unreachable; beyond this the oldest are dropped and "
            "counted (baselines are held as one latest state per location, never dropped)", "N"),
    Setting("metrics_max_locations", 1000, non_negative_int,
            "code locations with their own Prometheus series; the rest fold into one overflow "
            "series", "N"),
    Setting("log_level", "INFO", parse_log_level, "debug, info, warning or error", "LEVEL"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    otlp_grpc: str
    otlp_http: str
    metrics: str
    redis_url: str
    prefix: str
    window: float
    allowed_lateness: float
    idle_timeout: float
    max_request_bytes: int
    max_clock_skew: float
    max_attribute_length: int
    queue_batches: int
    workers: int
    max_locations: int
    exemplars: int
    baseline_half_life: float
    events_maxlen: int
    redis_buffer: int
    metrics_max_locations: int
    log_level: str
    config: str | None = None
    detectors: Any = None  # processor.detect.settings.DetectorSettings

    def __post_init__(self):
        if self.detectors is None:
            from processor.detect.settings import DetectorSettings
            object.__setattr__(self, "detectors", DetectorSettings())

    @property
    def receiver_processes(self) -> int:
        """Receiver processes to run: ``workers``, with 0 meaning one per CPU."""
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def window_ns(self) -> int:
        return int(round(self.window * 1e9))

    @property
    def lateness_ns(self) -> int:
        return int(round(self.allowed_lateness * 1e9))

    @property
    def max_clock_skew_ns(self) -> int:
        return int(round(self.max_clock_skew * 1e9))

    @classmethod
    def defaults(cls, **overrides) -> "Config":
        values = {s.name: s.default for s in SETTINGS}
        values.update(overrides)
        return cls(**values)


assert {f.name for f in dataclasses.fields(Config)} == set(_BY_NAME) | {"config", "detectors"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; defaults stay None so precedence can be applied later."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file with the same settings (env BACKFLOW_CONFIG)")
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.name, metavar=s.metavar, default=None,
                            help=f"{s.help} (env {s.env}, default {s.default})")


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path!r} must hold a mapping of settings")
    for key in data:
        name = str(key).replace("-", "_")
        if name not in _BY_NAME and name != "detectors":
            raise ConfigError(f"config: unknown key {key!r} in {path!r}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(flags: dict[str, Any], environ: dict[str, str]) -> Config:
    """Apply precedence and validation; raises ConfigError naming the setting."""
    config_path = flags.get("config") or environ.get("BACKFLOW_CONFIG")
    from_yaml = _read_yaml(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if flags.get(s.name) is not None:
            raw, where = flags[s.name], s.flag
        elif environ.get(s.env) not in (None, ""):
            raw, where = environ[s.env], s.env
        elif s.name in from_yaml:
            raw, where = from_yaml[s.name], f"{s.name} in {config_path}"
        else:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(raw)
        except ValueError as e:
            raise ConfigError(f"invalid setting {s.name} ({where}): {e}") from None
    from processor.detect.settings import parse_detector_settings
    detectors = parse_detector_settings(from_yaml.get("detectors"), where=str(config_path))
    return Config(config=config_path, detectors=detectors, **values)


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="backflow serve")
    add_arguments(parser)
    ns = parser.parse_args(argv or [])
    return resolve(vars(ns), dict(os.environ) if environ is None else environ)


def reference_markdown() -> str:
    """The settings table of docs/configuration.md (a test keeps the file in sync)."""
    rows = ["| YAML key | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.name}` | `{s.flag} {s.metavar}` | `{s.env}` | `{s.default}` | {s.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
