"""What the consumer commands share: Redis settings, event filters, group options, and
the one-line form of an event that ``tail`` and ``demo`` print."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import redis

from processor.config import ConfigError, parse_prefix, parse_redis_url
from processor.parsing import env_of
from processor.commands.consume import EventFilter, default_consumer
from processor.detect.registry import EVENT_TYPES, RESOLVED
from processor.sinks.connect import client_for

KNOWN_TYPES = EVENT_TYPES + (RESOLVED,)


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", metavar="URL", default=None,
                        help="the Redis that backflow serve writes to (env BACKFLOW_REDIS_URL, "
                             "default redis://localhost:6379/0)")
    parser.add_argument("--prefix", metavar="NAME", default=None,
                        help="prefix of every Redis key (env BACKFLOW_PREFIX, default backflow)")


def redis_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """(redis URL, prefix) with serve's precedence (flag > environment > default) and
    validation; ConfigError names the setting."""
    env = os.environ if environ is None else environ
    out = []
    for name, flag, default, parse in (("redis_url", "--redis-url", "redis://localhost:6379/0", parse_redis_url),
                                       ("prefix", "--prefix", "backflow", parse_prefix)):
        env_name = env_of(name)
        if getattr(args, name) is not None:
            raw, where = getattr(args, name), flag
        elif env.get(env_name):
            raw, where = env[env_name], env_name
        else:
            out.append(default)
            continue
        try:
            out.append(parse(raw))
        except ValueError as e:
            raise ConfigError(f"invalid setting {name} ({where}): {e}") from None
    return out[0], out[1]


def connect(url: str) -> redis.Redis:
    """A client of ``url``, a cluster one against Redis Cluster (processor/sinks/connect.py)."""
    # socket_timeout above the longest XREADGROUP BLOCK (1 s), so a blocked read is not cut
    return client_for(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                      health_check_interval=30)


def add_filter_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    g = parser.add_argument_group("filters (all given must match)")
    g.add_argument("--service", action="append", default=[], metavar="NAME",
                   help=f"{what} events of this service.name only (repeatable)")
    g.add_argument("--type", action="append", default=[], metavar="TYPE", dest="types",
                   help=f"{what} this event type only (repeatable): {', '.join(KNOWN_TYPES)}")
    g.add_argument("--path", action="append", default=[], metavar="GLOB",
                   help=f"{what} events whose code.file.path matches this shell-style glob only "
                        "(repeatable; * also matches /, e.g. 'shop/payments/*')")
    g.add_argument("--owner", metavar="OWNER",
                   help=f"{what} events owned by this CODEOWNERS owner only (@org/team, @user "
                        "or e-mail; see backflow serve --codeowners)")


def event_filter(args: argparse.Namespace) -> EventFilter:
    unknown = [t for t in args.types if t not in KNOWN_TYPES]
    if unknown:
        raise ConfigError(f"invalid setting type (--type): unknown event type {unknown[0]!r}; "
                          f"one of {', '.join(KNOWN_TYPES)}")
    if args.owner is not None and not args.owner.strip():
        raise ConfigError("invalid setting owner (--owner): empty")
    return EventFilter(services=tuple(args.service), types=tuple(args.types),
                       paths=tuple(args.path), owner=args.owner.strip() if args.owner else None)


def add_group_arguments(parser: argparse.ArgumentParser, default_group: str) -> None:
    g = parser.add_argument_group("consumer group")
    g.add_argument("--group", default=default_group,
                   help=f"consumer group; it keeps its position in Redis (default {default_group}); "
                        "use one group per view, as a group's entries are shared among its consumers")
    g.add_argument("--consumer", default=None,
                   help="consumer name within the group; a consumer restarted under the same name "
                        "gets again what it was given but did not finish (default: the host name)")
    g.add_argument("--start", choices=("new", "all"), default="new",
                   help="where a new group starts: events from now on (new, default) or the whole "
                        "stream (all); an existing group goes on from its own position")
    g.add_argument("--claim-idle", type=float, default=300.0, metavar="SECONDS",
                   help="take over the events another consumer of the group left pending this long "
                        "(a consumer that does not come back); 0: never (default 300)")


def group_options(args: argparse.Namespace) -> dict:
    if not args.claim_idle >= 0:
        raise ConfigError(f"invalid setting claim_idle (--claim-idle): must be >= 0, got {args.claim_idle}")
    return {"group": args.group, "consumer": args.consumer or default_consumer(),
            "start": "$" if args.start == "new" else "0", "claim_idle_ms": int(args.claim_idle * 1000)}


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: commands finish what they hold and exit 0."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


_COLORS = {"critical": "\x1b[31;1m", "warning": "\x1b[33m", "info": "\x1b[2m"}


def event_time(fields: dict[str, str]) -> str:
    """The end of the event's window (event time), UTC."""
    try:
        ms = int(fields.get("window.end") or 0)
    except ValueError:
        return "-"
    return time_of(ms)


def time_of(ms: int) -> str:
    """Epoch milliseconds as UTC time; "-" for none."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000)) if ms else "-"


def where(fields: dict[str, str]) -> str:
    """``function file:line``, with what is known."""
    place = fields.get("code.file.path", "")
    if place and fields.get("code.line.number"):
        place += ":" + fields["code.line.number"]
    return " ".join(p for p in (fields.get("code.function.name", ""), place) if p)


def service_at_version(fields: dict[str, str]) -> str:
    version = fields.get("service.version", "")
    return fields.get("service.name", "") + (f"@{version}" if version else "")


def what_happened(fields: dict[str, str]) -> str:
    """``service@version function file:line: summary``; without a file, a summary that
    starts with the function's name is not preceded by it again."""
    summary, function = fields.get("summary", ""), fields.get("code.function.name", "")
    if not function and not fields.get("code.file.path"):  # (a service's event: a rollout)
        service = fields.get("service.name", "")
        return summary if service and summary.startswith(service + " ") else f"{service_at_version(fields)}: {summary}"
    named = not fields.get("code.file.path") and function and summary.startswith(function)
    return f"{service_at_version(fields)} " + ("" if named else f"{where(fields)}: ") + summary


def format_event(fields: dict[str, str], color: bool = False) -> str:
    """One line for a person: time, severity, type, service@version, function file:line,
    summary, owners.

    >>> format_event({"window.end": "1700000060000", "severity": "warning",
    ...               "type": "latency_regression", "service.name": "shop", "service.version": "2.0",
    ...               "code.function.name": "shop.cart.apply", "code.file.path": "shop/cart.py",
    ...               "code.line.number": "12", "summary": "p50 rose 2.1x", "owners": "@acme/cart"})
    '2023-11-14 22:14:20Z warning  latency_regression shop@2.0 shop.cart.apply shop/cart.py:12: p50 rose 2.1x [owners @acme/cart]'

    Without a file, a summary that names the function is not preceded by it again:

    >>> format_event({"window.end": "1700000060000", "severity": "info", "type": "first_seen",
    ...               "service.name": "shop", "code.function.name": "span:GET",
    ...               "summary": "span:GET first seen in 1.0"})[21:]
    'info     first_seen         shop span:GET first seen in 1.0'

    A service's event (a rollout) names no function:

    >>> format_event({"window.end": "1700000060000", "severity": "info", "type": "rollout",
    ...               "service.name": "shop", "service.version": "1.1",
    ...               "summary": "shop 1.1 reached 10% of the service's calls; pass"})[21:]
    "info     rollout            shop 1.1 reached 10% of the service's calls; pass"
    """
    severity = fields.get("severity", "")
    shown = f"{severity:<8}"
    if color and severity in _COLORS:
        shown = f"{_COLORS[severity]}{shown}\x1b[0m"
    line = f"{event_time(fields)} {shown} {fields.get('type', ''):<18} {what_happened(fields)}"
    if fields.get("owners"):
        line += f" [owners {fields['owners']}]"
    return line
