"""``backflow verdict``: a version's rollout verdict, for a person or a CI/CD step.

Reads ``{prefix}:verdicts:{environment}:{service}`` (written by ``backflow serve`` every
window of the service, processor/detect/rollout.py) and prints the latest verdict of the
version with its reasons; exits 0 for pass, 1 for fail, 3 for inconclusive (or no rollout
of the version seen, or Redis not answering) and 2 for a bad setting. ``--wait`` polls
until the verdict is pass or fail, or the time is up.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import redis

from processor.sinks.connect import REDIS_ERRORS
from processor.commands import common
from processor.config import ConfigError
from processor.detect.rollout import FAIL, INCONCLUSIVE, PASS
from processor.schema.conformance import escape_glob
from processor.sinks.redis_streams import verdict_key

EXIT = {PASS: 0, FAIL: 1, INCONCLUSIVE: 3}
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("verdict", help="a version's rollout verdict (exit 0 pass, 1 fail, 3 inconclusive)",
                       description="Print the latest rollout verdict of a version of a service, with its "
                                   "reasons. Exit status: 0 pass, 1 fail, 3 inconclusive (or no rollout "
                                   "of it seen yet), 2 a bad setting: a step for a CI/CD pipeline.")
    common.add_redis_arguments(p)
    p.add_argument("--service", required=True, metavar="NAME", help="service.name")
    p.add_argument("--version", required=True, metavar="VERSION", dest="service_version",
                   help="service.version of the rollout")
    p.add_argument("--environment", metavar="NAME", default=None,
                   help="deployment.environment.name (needed when the service runs in several)")
    p.add_argument("--revision", metavar="SHA", default=None,
                   help="vcs.ref.head.revision, when the version was built from several (default: the "
                        "latest updated)")
    p.add_argument("--wait", metavar="DURATION", default=None,
                   help="wait up to this long (e.g. 90s, 15m, 1h) for a pass or a fail")
    p.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between reads while waiting (default 5)")
    p.add_argument("--json", action="store_true", help="print the verdict's state as JSON")
    p.set_defaults(run=run)
    return p


def parse_duration(raw: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m`` or ``1h``.

    >>> parse_duration("15m"), parse_duration("90"), parse_duration("1.5h")
    (900.0, 90.0, 5400.0)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", raw or "")
    if not m:
        raise ValueError(f"must be a duration such as 90s, 15m or 1h, got {raw!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def find(client: redis.Redis, prefix: str, service: str, version: str, environment: str | None,
         revision: str | None) -> dict | None:
    """The latest state of the version's rollouts (the most recently updated revision);
    ConfigError when the service has rollouts in several environments and none was given."""
    if environment is not None:
        keys = [verdict_key(prefix, environment, service)]
    else:
        pattern = escape_glob(f"{prefix}:verdicts:") + "*" + escape_glob(f":{service}")
        keys = sorted(client.scan_iter(match=pattern, count=1000))
    found = []
    for key in keys:
        for value in client.hgetall(key).values():
            try:
                state = json.loads(value)
            except ValueError:
                continue
            if (isinstance(state, dict) and state.get("service") == service and state.get("version") == version
                    and (environment is None or state.get("environment") == environment)
                    and (revision is None or state.get("revision") == revision)):
                found.append(state)
    envs = sorted({s.get("environment", "") for s in found})
    if len(envs) > 1:
        raise ConfigError(f"invalid setting environment (--environment): {service} {version} has rollouts "
                          f"in {', '.join(repr(e) for e in envs)}; name one")
    return max(found, key=lambda s: (s.get("updated", 0), s.get("started", 0))) if found else None


def render(state: dict) -> str:
    """The verdict for a person.

    >>> print(render({"environment": "prod", "service": "shop", "version": "1.1", "revision": "",
    ...               "previous": "1.0", "verdict": "fail", "reasons": ["latency_regression open: p50 rose"],
    ...               "missing": [], "milestone": "share_10", "share": 0.1, "state": "active", "calls": 1200,
    ...               "started": 1700000000000, "updated": 1700000600000}))
    shop 1.1 in prod: FAIL
      rollout: replaces 1.0 since 2023-11-14 22:13:20Z; active, 10.0% of the service's calls, 1,200 calls (milestone share_10, 2023-11-14 22:23:20Z)
      - latency_regression open: p50 rose
    """
    name = state["version"] + (f" ({state['revision'][:12]})" if state.get("revision") else "")
    lines = [f"{state['service']} {name} in {state['environment'] or '(no environment)'}: {state['verdict'].upper()}",
             f"  rollout: replaces {state.get('previous') or '(no version)'} since "
             f"{common.time_of(state.get('started', 0))}; {state.get('state', '')}, "
             f"{state.get('share', 0):.1%} of the service's calls, {state.get('calls', 0):,} calls "
             f"(milestone {state.get('milestone', '')}, {common.time_of(state.get('updated', 0))})"]
    lines += [f"  - {r}" for r in state.get("reasons", [])]
    lines += [f"  needs {m}" for m in state.get("missing", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    url, prefix = common.redis_settings(args)
    wait = 0.0
    if args.wait is not None:
        try:
            wait = parse_duration(args.wait)
        except ValueError as e:
            raise ConfigError(f"invalid setting wait (--wait): {e}") from None
    if not args.interval > 0:
        raise ConfigError(f"invalid setting interval (--interval): must be > 0, got {args.interval}")
    if not args.service.strip() or not args.service_version.strip():
        raise ConfigError("invalid setting service (--service) or version (--version): empty")
    client = common.connect(url)
    deadline = time.monotonic() + wait
    stop = common.stop_on_signals()
    state = None
    while True:
        try:
            state = find(client, prefix, args.service, args.service_version, args.environment, args.revision)
        except REDIS_ERRORS as e:
            print(f"backflow verdict: {e}", file=sys.stderr)
            if time.monotonic() >= deadline or stop.is_set():
                return EXIT[INCONCLUSIVE]
        # (waiting, a rolled-back rollout is not the answer: a retry of it is awaited)
        if state is not None and state.get("verdict") in (PASS, FAIL) and not (
                wait and state.get("state") == "rolled_back"):
            break
        if time.monotonic() >= deadline or stop.wait(min(args.interval, max(0.0, deadline - time.monotonic()))):
            break
    if state is None:
        where = f" in {args.environment}" if args.environment is not None else ""
        print(f"{args.service} {args.service_version}{where}: INCONCLUSIVE\n  no rollout of it seen yet"
              if not args.json else json.dumps({"service": args.service, "version": args.service_version,
                                                "verdict": INCONCLUSIVE, "reasons": [],
                                                "missing": ["a rollout of it seen by backflow serve"]}))
        return EXIT[INCONCLUSIVE]
    print(json.dumps(state, ensure_ascii=False, sort_keys=True) if args.json else render(state))
    return EXIT.get(state.get("verdict"), EXIT[INCONCLUSIVE])
