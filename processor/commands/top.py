"""``backflow top``: a live table of code locations from Redis.

Figures come from the ``{prefix}:baseline:{key}`` hashes (calls/s, p50, p99, error share:
the baseline's, which decays with serve's ``--baseline-half-life``), the open regressions
from the latest events of ``{prefix}:events``. A regression is *open* when it is
- a ``latency_regression``, ``error_regression`` or ``scaling_regression`` not followed by
  a ``resolved`` event for it (``detail.resolves``) at the same location: every one ends
  with one, ``detail.reason`` ``recovered`` or ``accepted`` (the new level held for
  serve's ``--accept-windows`` and became the baseline);
- or a ``new_exception`` (which nothing resolves) whose window ended within the location's
  latest ``--open-windows`` windows;
- at a location called within ``--open-windows`` windows of its service's latest, so that
  one raised at a location no longer called does not stay open for ever;
- among the latest ``--events`` events of the stream.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field

import redis

from processor.sinks.connect import REDIS_ERRORS
from processor.commands import common
from processor.config import ConfigError
from processor.detect.registry import REGRESSION_TYPES as REGRESSIONS
from processor.detect.registry import RESOLVED_TYPES
from processor.report import trend
from processor.report.store import blended, parse_version_field

_FIELDS = ("service.name", "deployment.environment.name", "code.function.name", "code.file.path",
           "code.line.number", "service.version", "rate_per_s", "p50_ms", "p99_ms", "error_rate", "updated")
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
TREND_WIDTH = 48  # buckets in top's trend sparklines (two days of hours by default)


@dataclass
class Row:
    key: str
    service: str
    function: str
    where: str
    version: str
    calls: float
    p50: float
    p99: float
    errors: float
    updated_ms: int
    open: int = 0
    versions: list = field(default_factory=list)  # rows of the versions a blended baseline mixes
    environment: str = ""


SORTS = {
    "open": lambda r: (-r.open, -r.calls, r.function),
    "calls": lambda r: (-r.calls, r.function),
    "p50": lambda r: (-r.p50, r.function),
    "p99": lambda r: (-r.p99, r.function),
    "errors": lambda r: (-r.errors, r.function),
    "function": lambda r: (r.service, r.function),
}


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def read_rows(client: redis.Redis, prefix: str, services: tuple[str, ...] = (), chunk: int = 500) -> list[Row]:
    keys = sorted(client.smembers(f"{prefix}:keys"))
    rows = []
    for i in range(0, len(keys), chunk):
        pipe = client.pipeline(transaction=False)
        for key in keys[i:i + chunk]:
            pipe.hmget(f"{prefix}:baseline:{key}", _FIELDS)
        for key, values in zip(keys[i:i + chunk], pipe.execute()):
            if values[0] is None:  # announced, no baseline written (yet)
                continue
            h = dict(zip(_FIELDS, (v or "" for v in values)))
            if services and h["service.name"] not in services:
                continue
            place = h["code.file.path"] + (f":{h['code.line.number']}" if h["code.line.number"] else "")
            rows.append(Row(key, h["service.name"], h["code.function.name"], place, h["service.version"],
                            _float(h["rate_per_s"]), _float(h["p50_ms"]), _float(h["p99_ms"]),
                            _float(h["error_rate"]), int(_float(h["updated"])),
                            environment=h["deployment.environment.name"]))
    return rows


def open_regressions(events: list[dict[str, str]], updated_ms: dict[str, int], open_windows: int,
                     latest_ms: dict[str, int] | None = None) -> dict[str, int]:
    """Open regressions per key, from events oldest first (see the module's definition);
    ``updated_ms``: the latest window end of each location shown, ``latest_ms``: that of
    its service (its own when not given).

    >>> ev = [{"key": "a", "type": "latency_regression", "window.start": "0", "window.end": "10"},
    ...       {"key": "a", "type": "new_exception", "window.start": "10", "window.end": "20"},
    ...       {"key": "a", "type": "resolved", "detail": '{"resolves": "latency_regression"}'},
    ...       {"key": "b", "type": "error_regression", "window.start": "0", "window.end": "10"},
    ...       {"key": "c", "type": "error_regression", "window.start": "0", "window.end": "10"}]
    >>> open_regressions(ev, {"a": 20, "b": 1000, "c": 20}, open_windows=30, latest_ms={"c": 1000})
    {'a': 1, 'b': 1}
    """
    opened: dict[tuple[str, str], dict[str, str]] = {}
    for e in events:
        key, kind = e.get("key", ""), e.get("type", "")
        if kind in REGRESSIONS:
            opened[(key, kind)] = e
        elif kind == "resolved":
            try:
                resolves = json.loads(e.get("detail") or "{}").get("resolves", "")
            except (ValueError, AttributeError):
                continue
            opened.pop((key, resolves), None)
    counts: dict[str, int] = {}
    for (key, kind), e in opened.items():
        updated = updated_ms.get(key)
        if updated is None:  # a location not shown
            continue
        end, start = int(_float(e.get("window.end"))), int(_float(e.get("window.start")))
        span = open_windows * max(end - start, 1)
        if (latest_ms or {}).get(key, updated) - updated >= span:
            continue  # no longer called
        if kind not in RESOLVED_TYPES and updated - end >= span:
            continue  # a one-shot event, aged out
        counts[key] = counts.get(key, 0) + 1
    return counts


def recent_events(client: redis.Redis, prefix: str, count: int) -> list[dict[str, str]]:
    return [fields for _, fields in reversed(client.xrevrange(f"{prefix}:events", count=count))]


def _label(r: Row) -> str:
    if r.versions:
        return f"{r.service} ({len(r.versions)} versions)"
    return f"{r.service}@{r.version}" if r.version else r.service


def render(rows: list[Row], width: int, limit: int | None, header: str) -> str:
    """The table; ``limit``: lines of rows at most (a blended location's version lines count)."""
    total = len(rows)
    lines_left = len(rows) + sum(len(r.versions) for r in rows) if limit is None else max(limit, 0)
    flat: list[Row] = []
    shown = 0
    for r in rows:
        if lines_left < 1 or (shown and 1 + len(r.versions) > lines_left):
            break
        versions = r.versions[:lines_left - 1]  # (a first row taller than the limit is cut)
        flat += [r, *versions]
        lines_left -= 1 + len(versions)
        shown += 1
    numbers = [(f"{r.calls:.1f}", f"{r.p50:.3g}", f"{r.p99:.3g}", f"{r.errors:.2%}", str(r.open or ""))
               for r in flat]
    head = ("CALLS/S", "P50 MS", "P99 MS", "ERRORS", "OPEN")
    num_w = [max([len(h)] + [len(n[i]) for n in numbers]) for i, h in enumerate(head)]
    svc_w = max([len("SERVICE")] + [len(_label(r)) for r in flat])
    svc_w = min(svc_w, 24)
    rest = max(width - svc_w - sum(num_w) - 2 * (len(head) + 1), 20)
    lines = [header, "  ".join([f"{'SERVICE':<{svc_w}}"] + [f"{h:>{w}}" for h, w in zip(head, num_w)]
                               + ["FUNCTION (FILE:LINE)"])]
    for r, n in zip(flat, numbers):
        svc = _label(r)
        what = f"{r.function} ({r.where})" if r.where else r.function
        lines.append("  ".join([f"{svc[:svc_w]:<{svc_w}}"] + [f"{v:>{w}}" for v, w in zip(n, num_w)]
                               + [what[:rest]]).rstrip())
    if shown < total:
        lines.append(f"... {total - shown} more (--limit, or a taller terminal)")
    return "\n".join(lines)


def add_versions(client: redis.Redis, prefix: str, rows: list[Row]) -> None:
    """Give each row whose baseline blends versions a line per version (from the
    ``{prefix}:versions:{key}`` summaries: calls/s, p50, p99 and error share over the
    version's windows)."""
    pipe = client.pipeline(transaction=False)
    for r in rows:
        pipe.hgetall(f"{prefix}:versions:{r.key}")
    for r, fields in zip(rows, pipe.execute()):
        records = [v for v in (parse_version_field(n, x) for n, x in fields.items()) if v]
        r.versions = [Row(r.key, f"  @{v.version}", f"since {common.time_of(v.first_ms)}", "", "",
                          v.rate_per_s or 0.0, v.p50_ms or 0.0, v.p99_ms or 0.0, v.error_share or 0.0,
                          v.last_ms) for v in blended(records, r.updated_ms)]


def calls_view(client: redis.Redis, prefix: str, rows: list[Row], name: str, width: int) -> str:
    """One location's place in the call graph: its figures, its callees (from
    ``{prefix}:edges:{key}``) and its callers (``{prefix}:callers:{key}``)."""
    found = [r for r in rows if name in (r.key, r.function)]
    if not found:
        return f"backflow top: no code location named {name!r} (a code.function.name or a key)"
    r = found[0]
    edges = client.hgetall(f"{prefix}:edges:{r.key}")
    callers = client.hgetall(f"{prefix}:callers:{r.key}")
    lines = [f"{r.function} ({r.where})  {_label(r)}  {r.calls:.1f} calls/s  p50 {r.p50:.3g} ms  "
             f"p99 {r.p99:.3g} ms  errors {r.errors:.2%}"
             + (f"  ({len(found) - 1} more locations named so; by key: --calls KEY)" if len(found) > 1 else "")]
    by_version = trend.read(client, prefix, r.key)
    if by_version:  # its trend: the latest buckets, all versions, then each version's
        lines += ["", f"trend, latest {TREND_WIDTH} buckets (serve's trend_period / trend_points):",
                  f"  {'all versions':<16} {trend.summary(by_version, TREND_WIDTH)}"]
        newest = max(p.bucket for ps in by_version.values() for p in ps)
        known = [v for v in trend.series(by_version, "p50_ms", newest, TREND_WIDTH) if v is not None]
        for (version, revision), pts in sorted(by_version.items(), key=lambda vp: -vp[1][-1].bucket):
            calls = sum(p.calls for p in pts if p.bucket > newest - TREND_WIDTH)
            if calls:  # (on the scale of all versions' line, so that they compare)
                name = (version or "(none)") + (f" ({revision[:7]})" if revision else "")
                shown = trend.sparkline(trend.series({version: pts}, "p50_ms", newest, TREND_WIDTH),
                                        (min(known), max(known)))
                lines.append(f"  {name:<16} p50 {shown}  {calls:,} calls")
    callees = sorted((json.loads(v) for k, v in edges.items() if len(k) == 16 and v.startswith("{")),
                     key=lambda c: (-c["time_share"], c["function"]))
    if edges.get("calls"):
        lines += ["", f"calls, in its latest window with callees ({common.time_of(int(edges['updated']))}): "
                      f"{edges['calls']} calls, {float(edges['ms_per_call']):.3g} ms per call, of which its own code "
                      f"{float(edges['self_ms_per_call']):.3g} ms"]
    if callees:
        lines += [f"  {'CALLS/CALL':>10}  {'MS/CALL':>8}  {'SHARE':>6}  CALLEE"]
        lines += [f"  {c['calls_per_call']:>10.3g}  {c['ms_per_call']:>8.3g}  {c['time_share']:>6.1%}  "
                  f"{c['function']}"[:width] for c in callees]
    else:
        lines += ["", "calls nothing the call graph saw"]
    rows_of = sorted((json.loads(v) for v in callers.values()), key=lambda c: (-c["time_share"], c["function"]))
    if rows_of:
        lines += ["", "called by:", f"  {'CALLS/CALL':>10}  {'SHARE':>6}  CALLER (the share: of the caller's time)"]
        lines += [f"  {c['calls_per_call']:>10.3g}  {c['time_share']:>6.1%}  {c['function']}"[:width] for c in rows_of]
    else:
        lines += ["", "called by nothing the call graph saw (an entry point, or its callers are not traced)"]
    return "\n".join(lines)


def snapshot(client: redis.Redis, prefix: str, args: argparse.Namespace, width: int, height: int | None) -> str:
    rows = read_rows(client, prefix, tuple(args.service))
    if args.calls:
        return calls_view(client, prefix, rows, args.calls, width)
    service_ms: dict[tuple[str, str], int] = {}
    for r in rows:
        service_ms[r.environment, r.service] = max(service_ms.get((r.environment, r.service), 0), r.updated_ms)
    counts = open_regressions(recent_events(client, prefix, args.events), {r.key: r.updated_ms for r in rows},
                              args.open_windows, {r.key: service_ms[r.environment, r.service] for r in rows})
    for r in rows:
        r.open = counts.get(r.key, 0)
    rows.sort(key=SORTS[args.sort])
    limit = args.limit
    if height is not None:  # header, column names and the "more" line
        limit = min(limit or height, max(height - 3, 1))
    add_versions(client, prefix, rows if limit is None else rows[:limit])
    header = (f"backflow top  {prefix}  {len(rows)} locations, {sum(r.open for r in rows)} open regressions  "
              f"{time.strftime('%H:%M:%S')}")
    return render(rows, width, limit, header)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("top", help="a live table of code locations: calls/s, p50, p99, errors, open regressions",
                       description="A table of the code locations in Redis, refreshed in place; "
                                   "see docs/commands.md for what 'open' means.")
    common.add_redis_arguments(p)
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period (default 2)")
    p.add_argument("--sort", choices=tuple(SORTS), default="open",
                   help="order of the rows (default open: open regressions, then calls/s)")
    p.add_argument("--limit", type=int, metavar="N", help="most rows shown (default: what the terminal holds)")
    p.add_argument("--service", action="append", default=[], metavar="NAME",
                   help="locations of this service.name only (repeatable)")
    p.add_argument("--open-windows", type=int, default=30, metavar="N",
                   help="a new_exception counts as open for this many of its location's windows, and a "
                        "location not called for this many windows of its service has none open (default 30)")
    p.add_argument("--events", type=int, default=10_000, metavar="N",
                   help="latest events read to find open regressions (default 10000)")
    p.add_argument("--calls", "--detail", metavar="FUNCTION", dest="calls",
                   help="one location (its code.function.name or key) in detail: its trend (sparklines of p50, "
                        "p99 and error share per version), its callees with their calls and time per call "
                        "and share of its time, and its callers")
    p.set_defaults(run=run)
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("interval",):
        if not getattr(args, name) > 0:
            raise ConfigError(f"invalid setting {name} (--{name}): must be > 0, got {getattr(args, name)}")
    for name in ("limit", "open_windows", "events"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"invalid setting {name} (--{name.replace('_', '-')}): must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    url, prefix = common.redis_settings(args)
    client = common.connect(url)
    tty = sys.stdout.isatty()
    stop = None if args.once else common.stop_on_signals()
    while True:
        size = shutil.get_terminal_size()
        try:
            table = snapshot(client, prefix, args, size.columns if tty else 200,
                             size.lines if tty else None)
        except REDIS_ERRORS as e:
            if args.once:
                print(f"backflow top: {e}", file=sys.stderr)
                return 1
            table = f"backflow top: Redis unreachable ({e}); retrying"
        if args.once:
            print(table, flush=True)
            return 0
        sys.stdout.write((_CLEAR + table) if tty else table + "\n\n")
        sys.stdout.flush()
        if stop.wait(args.interval):
            return 0
