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
import os
import socket
import ssl
from typing import Any, Callable

import yaml

from processor.detect.registry import DetectorSettings, parse_detector_settings, parse_rollout_settings
from processor.detect.rollout import RolloutSettings
from processor.detect.settings import CommonSettings
from processor.parsing import (  # noqa: F401 (re-exported: the settings' parsers)
    ConfigError, parse_address, split_address, parse_address_or_off, parse_redis_url, redact_url,
    url_secrets, parse_readable_file, parse_writable_dir, parse_codeowners, parse_token, read_token, parse_prefix,
    positive_float, non_negative_float, positive_int, non_negative_int, parse_log_level, flag_of, env_of, parse_role,
    parse_replica_id, parse_addresses,
)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # attribute and YAML key; flag is --name-with-dashes, env BACKFLOW_NAME
    default: Any
    parse: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    @property
    def env(self) -> str:
        return env_of(self.name)


SETTINGS: tuple[Setting, ...] = (
    Setting("otlp_grpc", "0.0.0.0:4317", parse_address,
            "OTLP/gRPC listen address, HOST:PORT (:PORT for every interface)", "ADDR"),
    Setting("otlp_http", "0.0.0.0:4318", parse_address_or_off,
            "OTLP/HTTP listen address (POST /v1/traces, protobuf or JSON, gzip), 'off' disables", "ADDR"),
    Setting("tls_cert", None, parse_readable_file,
            "PEM certificate chain of the OTLP receivers (gRPC and HTTP); with tls_key, they speak "
            "only TLS", "FILE"),
    Setting("tls_key", None, parse_readable_file,
            "PEM private key (not encrypted) of tls_cert", "FILE"),
    Setting("tls_client_ca", None, parse_readable_file,
            "PEM CA certificates; when set, OTLP clients must present a certificate they "
            "signed (mutual TLS); needs tls_cert", "FILE"),
    Setting("auth_token", None, parse_token,
            "bearer token OTLP Export calls must send (gRPC metadata or HTTP header "
            "'authorization: Bearer TOKEN'), else UNAUTHENTICATED (HTTP 401); the gRPC health service "
            "stays open. Prefer the environment "
            "or auth_token_file to the flag, which the process list shows", "TOKEN"),
    Setting("auth_token_file", None, parse_readable_file,
            "file holding the bearer token (surrounding whitespace ignored); instead of auth_token",
            "FILE"),
    Setting("metrics", "0.0.0.0:9464", parse_address, "serves /metrics and /healthz", "ADDR"),
    Setting("redis_url", "redis://localhost:6379/0", parse_redis_url,
            "where streams and state go: rediss:// for TLS, redis://user:password@host for "
            "AUTH, TLS files as query parameters (ssl_ca_certs, ssl_certfile, ssl_keyfile)", "URL"),
    Setting("prefix", "backflow", parse_prefix, "prefix of every Redis key", "NAME"),
    Setting("window", 60.0, positive_float, "tumbling window length in seconds, event time", "SECONDS"),
    Setting("allowed_lateness", 10.0, non_negative_float,
            "event-time seconds a window stays open after the service's latest span passed its end",
            "SECONDS"),
    Setting("idle_timeout", 60.0, positive_float,
            "processing-time seconds without spans from a service after which its windows close",
            "SECONDS"),
    Setting("max_request_bytes", 4 * 1024 * 1024, positive_int,
            "largest OTLP request accepted (after decompression); larger ones get RESOURCE_EXHAUSTED "
            "(HTTP 413)",
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
    Setting("max_services", 10_000, positive_int,
            "services held in memory; the spans of further ones fold into the shared __overflow__ "
            "location, counted", "N"),
    Setting("max_versions", 100_000, positive_int,
            "service versions held in memory in all; spans of further ones count as one shared "
            "__overflow__ version, counted", "N"),
    Setting("max_versions_per_service", 10_000, positive_int,
            "versions held per service; spans of further ones count as the service's "
            "__overflow__ version, counted", "N"),
    Setting("version_idle_timeout", 7 * 86400.0, positive_float,
            "seconds without a span after which a version is forgotten (its slot under "
            "max_versions freed; its Redis summaries stay); it is new again if it comes back",
            "SECONDS"),
    Setting("location_idle_timeout", 35 * 86400.0, positive_float,
            "seconds without a span after which a code location is forgotten (its baseline, "
            "detectors and checkpoint freed; its Redis baseline and key stay), and a service with "
            "none left; a location that comes back is learned anew, without a second first_seen "
            "(the default, five weeks, keeps monthly jobs)", "SECONDS"),
    Setting("exemplars", 3, non_negative_int,
            "trace ids kept per code location and window (the slowest spans)", "N"),
    Setting("call_graph_wait", 5.0, non_negative_float,
            "event-time seconds a span waits for the rest of its trace before it is joined to its "
            "parent's location (the call graph: edges, self time, causes, entry points); at most "
            "allowed_lateness is used, so that a trace is joined before its window closes; 0 turns "
            "the call graph off", "SECONDS"),
    Setting("call_graph_max_spans", 1_000_000, positive_int,
            "spans the call graph's join holds at most; beyond it the oldest are joined as they "
            "are (counted in backflow_graph_spans_total{outcome=\"forced\"})", "N"),
    Setting("trend_period", 7 * 86400.0, non_negative_float,
            "seconds of each location's trend kept in Redis ({prefix}:trend:{key}: p50, p99, error share and "
            "calls per version and bucket; 0 keeps none)", "SECONDS"),
    Setting("trend_points", 168, positive_int,
            "buckets of the trend period (168: an hour each over 7 days); a bucket holds at least a window",
            "N"),
    Setting("baseline_half_life", 86400.0, positive_float,
            "event-time seconds after which a window's weight in the baseline has halved", "SECONDS"),
    Setting("redis_wait_replicas", 0, non_negative_int,
            "replicas that must have each batch of writes (Redis WAIT) before it counts as written; 1 or more "
            "with a replicated Redis (Redis Cluster, Sentinel) makes a master's failover lose nothing "
            "acknowledged; while fewer answer, writes wait and are sent again", "N"),
    Setting("events_maxlen", 100_000, positive_int,
            "approximate length the events stream is trimmed to (XADD MAXLEN ~)", "N"),
    Setting("redis_buffer", 100_000, positive_int,
            "events held for Redis; when it is full the pipeline waits while Redis answers (the "
            "receivers push back), and drops and counts the oldest only while Redis is unreachable "
            "(baselines are held as one latest state per location, never dropped)", "N"),
    Setting("spool_dir", None, parse_writable_dir,
            "directory where Redis writes wait on disk while Redis is away (redis-spool.log), "
            "sent at the next start if the process dies meanwhile; without it they wait in memory "
            "only (docs/operations.md). An aggregate replica's partials wait there (forward-ADDR.log) "
            "past 256 MiB in memory and at exit while a detect replica is away (docs/tiers.md)", "DIR"),
    Setting("spool_max_bytes", 1 << 30, positive_int,
            "size of the spool beyond which the receivers push back at the senders while Redis "
            "(or a detect replica: the size is shared among them) is away", "BYTES"),
    Setting("checkpoint_interval", 0.0, non_negative_float,
            "processing-time seconds between checkpoints of the baselines, detector state and "
            "window clocks to {prefix}:state, read back at start; 0 checkpoints whenever windows "
            "close", "SECONDS"),
    Setting("shutdown_timeout", 20.0, positive_float,
            "seconds SIGTERM has to stop accepting, close the open windows, checkpoint and write "
            "everything to Redis before the process exits anyway", "SECONDS"),
    Setting("metrics_max_locations", 1000, non_negative_int,
            "code locations with their own Prometheus series; the rest fold into one overflow "
            "series", "N"),
    Setting("codeowners", None, parse_codeowners,
            "CODEOWNERS file; every event's owners field gets the owners of its code.file.path "
            "(relative paths as given, absolute ones made relative as docs/commands.md's Ownership says)",
            "FILE"),
    Setting("role", "both", parse_role,
            "both: detect on the spans taken (one process per service); aggregate: close windows into "
            "partials sent to the detect replica at 'forward', no Redis (spans routed by trace id, or not "
            "at all); detect: both, taking the aggregate replicas' partials too (docs/tiers.md)", "ROLE"),
    Setting("forward", None, parse_addresses,
            "the detect replicas' OTLP/gRPC addresses (comma-separated) that an aggregate replica sends its "
            "partials to, each service's to one, chosen as the collector's loadbalancing exporter chooses "
            "with routing_key service", "ADDRS"),
    Setting("forward_tls_ca", None, parse_readable_file,
            "PEM CA certificates; when set, an aggregate replica speaks TLS to the detect replicas and "
            "trusts the certificates these signed (plaintext when unset)", "FILE"),
    Setting("forward_tls_cert", None, parse_readable_file,
            "PEM client certificate an aggregate replica presents to the detect replicas (their "
            "tls_client_ca: mutual TLS); with forward_tls_key, needs forward_tls_ca", "FILE"),
    Setting("forward_tls_key", None, parse_readable_file,
            "PEM private key (not encrypted) of forward_tls_cert", "FILE"),
    Setting("forward_auth_token", None, parse_token,
            "bearer token an aggregate replica sends with its partials (the detect replicas' auth_token); "
            "prefer the environment or forward_auth_token_file to the flag", "TOKEN"),
    Setting("forward_auth_token_file", None, parse_readable_file,
            "file holding forward_auth_token (surrounding whitespace ignored); instead of it", "FILE"),
    Setting("replica_id", None, parse_replica_id,
            "an aggregate replica's name in its reports (default: host name and process id)", "NAME"),
    Setting("replica_timeout", 30.0, positive_float,
            "seconds without a report after which the detect replica drops an aggregate replica and "
            "no longer waits for it to close windows (counted)", "SECONDS"),
    Setting("replica_wait", 10.0, non_negative_float,
            "processing-time seconds the detect replica waits for the other aggregate replicas once one "
            "has reported past a window, before it closes the window anyway (their figures of it come late)",
            "SECONDS"),
    Setting("log_interval", 60.0, positive_float,
            "seconds between the log's summary lines (spans, windows, locations, events); refused "
            "and late spans are logged at most once per interval too", "SECONDS"),
    Setting("log_level", "INFO", parse_log_level, "debug, info, warning or error", "LEVEL"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    otlp_grpc: str
    otlp_http: str
    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    # Kept out of repr(): a Config printed or logged must not show a secret.
    auth_token: str | None = dataclasses.field(repr=False)
    auth_token_file: str | None
    metrics: str
    redis_url: str = dataclasses.field(repr=False)
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
    max_services: int
    max_versions: int
    max_versions_per_service: int
    version_idle_timeout: float
    location_idle_timeout: float
    exemplars: int
    call_graph_wait: float
    call_graph_max_spans: int
    trend_period: float
    trend_points: int
    baseline_half_life: float
    redis_wait_replicas: int
    events_maxlen: int
    redis_buffer: int
    spool_dir: str | None
    spool_max_bytes: int
    checkpoint_interval: float
    shutdown_timeout: float
    metrics_max_locations: int
    codeowners: str | None
    role: str
    forward: str | None
    forward_tls_ca: str | None
    forward_tls_cert: str | None
    forward_tls_key: str | None
    forward_auth_token: str | None = dataclasses.field(repr=False)
    forward_auth_token_file: str | None
    replica_id: str | None
    replica_timeout: float
    replica_wait: float
    log_interval: float
    log_level: str
    config: str | None = None
    detectors: DetectorSettings = None  # the detectors: section (processor/detect/registry.py)
    rollouts: RolloutSettings = None    # the rollouts: section (processor/detect/rollout.py)
    # where each setting given was given (flag, environment variable, YAML): for messages
    sources: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.detectors is None:
            object.__setattr__(self, "detectors", DetectorSettings())
        if self.rollouts is None:
            object.__setattr__(self, "rollouts", RolloutSettings())

    @property
    def receiver_processes(self) -> int:
        """Receiver processes to run: ``workers``, with 0 meaning one per CPU."""
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def replica_name(self) -> str:
        """An aggregate replica's name in its reports: ``replica_id``, else host name and pid."""
        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def window_ns(self) -> int:
        return int(round(self.window * 1e9))

    @property
    def lateness_ns(self) -> int:
        return int(round(self.allowed_lateness * 1e9))

    @property
    def graph_wait_ns(self) -> int:
        """The call graph's wait (``call_graph_wait``, at most the allowed lateness)."""
        return min(int(round(self.call_graph_wait * 1e9)), self.lateness_ns)

    @property
    def secrets(self) -> list[str]:
        """Values that must never reach a log line: the token and the Redis passwords."""
        return ([t for t in (self.auth_token, self.forward_auth_token) if t]) + url_secrets(self.redis_url)

    @property
    def max_clock_skew_ns(self) -> int:
        return int(round(self.max_clock_skew * 1e9))

    @classmethod
    def defaults(cls, **overrides) -> "Config":
        values = {s.name: s.default for s in SETTINGS}
        values.update(overrides)
        return cls(**values)


assert {f.name for f in dataclasses.fields(Config)} == set(_BY_NAME) | {"config", "detectors", "rollouts", "sources"}


# The detector settings changed most often are flags and environment variables too; they
# override the same keys of the YAML file's detectors: section.
DETECTOR_FLAGS = ("warmup_windows", "accept_windows")


def _detector_flag(name: str) -> tuple[str, str, Any, str]:
    """(flag, environment variable, default, help) of a common detector setting."""
    f = {f.name: f for f in dataclasses.fields(CommonSettings)}[name]
    return flag_of(name), env_of(name), f.default, f.metadata["help"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; defaults stay None so precedence can be applied later."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file with the same settings (env BACKFLOW_CONFIG)")
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.name, metavar=s.metavar, default=None,
                            help=f"{s.help} (env {s.env}, default {_shown(s.default)})")
    for name in DETECTOR_FLAGS:
        flag, env, default, help_ = _detector_flag(name)
        parser.add_argument(flag, dest=name, metavar="N", default=None,
                            help=f"{help_} (env {env}, YAML detectors.{name}, default {default})")


def _shown(default: Any) -> str:
    return "none" if default is None else str(default)


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
        if name not in _BY_NAME and name not in ("detectors", "rollouts"):
            raise ConfigError(f"config: unknown key {key!r} in {path!r}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(flags: dict[str, Any], environ: dict[str, str]) -> Config:
    """Apply precedence and validation; raises ConfigError naming the setting."""
    config_path = flags.get("config") or environ.get("BACKFLOW_CONFIG")
    from_yaml = _read_yaml(config_path) if config_path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # setting -> where its value came from, for messages
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
        sources[s.name] = where
    for name in ("forward", "forward_tls_ca", "forward_tls_cert", "forward_tls_key", "forward_auth_token",
                 "forward_auth_token_file"):
        if values[name] and values["role"] != "aggregate":
            raise _invalid(name, sources, f"only an aggregate replica forwards; role is {values['role']}")
    _check_tls(values, sources)
    if values["trend_period"] and values["trend_period"] / values["trend_points"] < values["window"]:
        where = sources.get("trend_points") or sources.get("trend_period") or "the defaults"
        raise ConfigError(f"invalid setting trend_points ({where}): a trend bucket (trend_period / trend_points = "
                          f"{values['trend_period'] / values['trend_points']:g} s) must hold a window "
                          f"({values['window']:g} s)")
    _read_token_file(values, sources)
    if values["role"] == "aggregate" and not values["forward"]:
        raise _invalid("forward", sources, "role aggregate sends its partials to a detect replica: give its "
                                           "OTLP/gRPC address as forward")
    _read_token_file(values, sources, "forward_auth_token")
    detectors = parse_detector_settings(from_yaml.get("detectors"), where=str(config_path))
    rollouts = parse_rollout_settings(from_yaml.get("rollouts"), where=str(config_path))
    for name in ("detectors", "rollouts"):
        if name in from_yaml:
            sources[name] = f"{name} in {config_path}"
    return Config(config=config_path, detectors=_detector_overrides(detectors, flags, environ, sources),
                  rollouts=rollouts, sources=sources, **values)


# Settings an aggregate replica has no use for (no Redis, no detectors): named at its start.
_NOT_AGGREGATES = ("redis_url", "prefix", "events_maxlen", "redis_buffer", "redis_wait_replicas",
                   "checkpoint_interval", "codeowners", "trend_period", "trend_points", "baseline_half_life",
                   "replica_timeout", "replica_wait", "detectors", "rollouts") + DETECTOR_FLAGS


def unused_settings(cfg: Config) -> list[str]:
    """The settings given that ``cfg``'s role does not use, each with where it was given.

    >>> unused_settings(load_config(["--role", "aggregate", "--forward", "d:4317", "--replica-wait", "3"],
    ...                             environ={"BACKFLOW_WARMUP_WINDOWS": "5"}))
    ['replica_wait (--replica-wait)', 'warmup_windows (BACKFLOW_WARMUP_WINDOWS)']
    >>> unused_settings(load_config(["--replica-wait", "3"], environ={}))
    []
    """
    if cfg.role != "aggregate":
        return []
    return [f"{name} ({cfg.sources[name]})" for name in _NOT_AGGREGATES if name in cfg.sources]


def _detector_overrides(detectors: DetectorSettings, flags: dict[str, Any], environ: dict[str, str],
                        sources: dict[str, str]):
    """``detectors`` with the common settings given as flags or environment variables
    (where each was given, into ``sources``)."""
    common = detectors.common
    for name in DETECTOR_FLAGS:
        flag, env, _, _ = _detector_flag(name)
        if flags.get(name) is not None:
            raw, where = flags[name], flag
        elif environ.get(env) not in (None, ""):
            raw, where = environ[env], env
        else:
            continue
        parsed = CommonSettings.parse({name: raw}, "detectors", where)
        common = dataclasses.replace(common, **{name: getattr(parsed, name)})
        sources[name] = where
    if common is detectors.common:
        return detectors
    try:
        common.validate()
    except ValueError as e:
        raise ConfigError(f"invalid setting detectors: {e}") from None
    return DetectorSettings(common=common, **detectors.sections)


def _invalid(name: str, sources: dict[str, str], message: str) -> ConfigError:
    where = f" ({sources[name]})" if name in sources else ""  # not given: no source to name
    return ConfigError(f"invalid setting {name}{where}: {message}")


class _Encrypted(Exception):
    pass


def _no_passphrase():
    raise _Encrypted  # load_cert_chain asks for a passphrase only for an encrypted key


def _check_tls(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Both or neither of tls_cert and tls_key, and files that TLS can use: a receiver that
    cannot load them would otherwise fail only when it starts listening (in every worker).
    The same for the forwarder's files, whose client certificate needs its CA."""
    _check_pair(values, sources, "tls_cert", "tls_key")
    if values["tls_client_ca"] is not None and values["tls_cert"] is None:
        raise _invalid("tls_client_ca", sources, "mutual TLS needs tls_cert and tls_key as well")
    if values["tls_cert"] is not None:
        _check_ca(values, sources, "tls_client_ca")
    _check_pair(values, sources, "forward_tls_cert", "forward_tls_key")
    if values["forward_tls_cert"] is not None and values["forward_tls_ca"] is None:
        raise _invalid("forward_tls_cert", sources, "a client certificate is sent over TLS: give forward_tls_ca "
                                                    "(the CA that signed the detect replicas' certificates)")
    _check_ca(values, sources, "forward_tls_ca")


def _check_pair(values: dict[str, Any], sources: dict[str, str], cert_name: str, key_name: str) -> None:
    cert, key = values[cert_name], values[key_name]
    if (cert is None) != (key is None):
        given, missing = (cert_name, key_name) if key is None else (key_name, cert_name)
        raise _invalid(missing, sources,
                       f"{given} ({sources[given]}) is set but {missing} is not; give both or neither")
    if cert is None:
        return
    _check_ca(values, sources, cert_name)  # (a PEM certificate at all)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise _invalid(key_name, sources, f"{key!r} is encrypted; give the key unencrypted "
                                          "(gRPC takes no passphrase)") from None
    except ssl.SSLError as e:
        reason = f"the key does not belong to {cert_name}" if e.reason == "KEY_VALUES_MISMATCH" \
            else f"no usable PEM private key ({e.reason or e})"
        raise _invalid(key_name, sources, f"{key!r}: {reason}") from None


def _check_ca(values: dict[str, Any], sources: dict[str, str], name: str) -> None:
    if values[name] is None:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=values[name])
    except ssl.SSLError as e:
        raise _invalid(name, sources, f"no PEM certificate in {values[name]!r} ({e.reason or e})") from None


def _read_token_file(values: dict[str, Any], sources: dict[str, str], token: str = "auth_token") -> None:
    """auth_token_file's content becomes auth_token (or ``token``'s file, ``token``); giving
    both is an error (which one counts would otherwise depend on where each was set)."""
    file = f"{token}_file"
    path = values[file]
    if path is None:
        return
    if values[token] is not None:
        raise _invalid(file, sources, f"{token} is set as well; give one of them")
    try:
        values[token] = read_token(path)
    except ValueError as e:
        raise _invalid(file, sources, f"{path!r}: {e}") from None


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="backflow serve")
    add_arguments(parser)
    ns = parser.parse_args(argv or [])
    return resolve(vars(ns), dict(os.environ) if environ is None else environ)


def reference_markdown() -> str:
    """The settings table of docs/configuration.md (a test keeps the file in sync)."""
    rows = ["| YAML key | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.name}` | `{s.flag} {s.metavar}` | `{s.env}` | `{_shown(s.default)}` | {s.help} |")
    for name in DETECTOR_FLAGS:
        flag, env, default, help_ = _detector_flag(name)
        rows.append(f"| `detectors.{name}` | `{flag} N` | `{env}` | `{default}` | {help_} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
