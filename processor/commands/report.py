"""``backflow report --repo PATH``: what production said about the code in a checkout.

Reads Redis (``--redis-url``/``BACKFLOW_REDIS_URL``, ``--prefix``/``BACKFLOW_PREFIX``, as
``serve``), maps baselines and events onto the checkout, and prints per-file findings, the
locations not found in it, and the instrumented functions production never reported.
``--sarif FILE`` also writes SARIF 2.1.0; ``--since REV`` adds, for every function changed
between REV and HEAD, its figures before and after the version that shipped the change.

Exit status: 0, or 2 with a one-line message for bad input (no such directory, not a git
checkout when ``--since`` is given, an unknown revision, a bad Redis URL), or 1 when Redis
cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from processor.config import ConfigError, parse_prefix, parse_redis_url, redact_url
from processor.sinks.connect import REDIS_ERRORS, client_for

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="map production baselines and events onto a source checkout",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", metavar="PATH", default=".", help="the source checkout (default: the current directory)")
    p.add_argument("--redis-url", metavar="URL", default=None,
                   help=f"where Backflow wrote (env BACKFLOW_REDIS_URL, default {DEFAULT_REDIS_URL})")
    p.add_argument("--prefix", metavar="NAME", default=None, help="Redis key prefix (env BACKFLOW_PREFIX, default backflow)")
    p.add_argument("--service", metavar="NAME", default=None, help="only this service.name")
    p.add_argument("--environment", metavar="NAME", default=None, help="only this deployment.environment.name")
    p.add_argument("--sarif", metavar="FILE", default=None, help="also write SARIF 2.1.0 to FILE ('-' for stdout)")
    p.add_argument("--since", metavar="REV", default=None,
                   help="for every Python function changed in REV..HEAD, production before and after "
                        "the version that shipped the change")
    p.add_argument("--include-tests", action="store_true",
                   help="list instrumented functions of test files among those never seen in production too")
    p.set_defaults(run=run)
    return p


class UsageError(Exception):
    """Bad input: exit status 2."""


def _settings(args, environ) -> tuple[str, str, str]:
    repo = args.repo
    if not os.path.isdir(repo):
        raise UsageError(f"--repo {repo!r}: no such directory")
    url = args.redis_url or environ.get("BACKFLOW_REDIS_URL") or DEFAULT_REDIS_URL
    prefix = args.prefix or environ.get("BACKFLOW_PREFIX") or "backflow"
    try:
        url = parse_redis_url(url)
    except ValueError as e:
        raise UsageError(f"invalid redis_url: {e}") from None
    try:
        prefix = parse_prefix(prefix)
    except ValueError as e:
        raise UsageError(f"invalid prefix: {e}") from None
    return repo, url, prefix


def run(args, environ=None, out=None) -> int:

    from processor.report.findings import build_report, render_text
    from processor.report.sarif import sarif_log
    from processor.report.source import SourceIndex
    from processor.report.store import read_production

    environ = os.environ if environ is None else environ
    out = out or sys.stdout
    try:
        repo, url, prefix = _settings(args, environ)
        changes = None
        if args.since is not None:
            from processor.report import since
            top = since.git(repo, "rev-parse", "--show-toplevel", check=False)
            if top.returncode != 0:
                raise UsageError(f"--since needs a git checkout; {repo!r} is not one")
            try:
                changes = since.changed_functions(repo, args.since)
            except since.GitError as e:
                raise UsageError(f"--since {args.since}: {e}") from None
    except (UsageError, ConfigError) as e:
        print(f"backflow report: {e}", file=sys.stderr)
        return 2

    client = client_for(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
    try:
        prod = read_production(client, prefix, args.service, args.environment)
    except REDIS_ERRORS as e:
        print(f"backflow report: cannot read Redis at {redact_url(url)}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()

    index = SourceIndex.from_checkout(repo)
    report = build_report(index, prod, include_tests=args.include_tests)
    text = render_text(report)
    if changes is not None:
        text += "\n" + _since_text(repo, args.since, changes, prod, index)
    if args.sarif:
        doc = json.dumps(sarif_log(report, repo), indent=2, sort_keys=False)
        if args.sarif == "-":
            out.write(doc + "\n")
            return 0
        with open(args.sarif, "w", encoding="utf-8") as f:
            f.write(doc + "\n")
    out.write(text)
    return 0


def _since_text(repo, rev, changes, prod, head_index) -> str:
    from processor.report import since
    from processor.report.findings import event_line, identity, when
    from processor.report.source import SourceIndex

    base_sources = {}
    for c in changes:
        if c.status == "deleted":
            base_sources[c.path] = since._show(repo, since.verify_revision(repo, rev), c.path)
    base_index = SourceIndex.from_sources(base_sources)
    rows = since.behaviours(changes, prod, head_index, base_index, since.Versions(repo))
    out = [f"Functions changed since {rev} ({len(changes)}):"]
    for b in rows:
        c = b.change
        head = f"  {c.path}:{c.function.line}  {c.dotted}  {c.status}"
        if c.commit:
            head += f" in {c.commit[:12]}"
        if b.where is not None:
            head += f"  [{identity(b.where)}]"
        out.append(head)
        if b.shipped_in:
            out.append(f"      shipped in {b.shipped_in[0] or '-'} ({b.shipped_in[1][:12] or 'no revision'})")
        for label, r in (("before", b.before), ("after", b.after)):
            if r is not None:
                out.append(f"      {label:<6} {r.version or '-'}: {int(r.calls)} calls, "
                           f"{_fmt(r.rate_per_s, '{:.3g}/s')}, p50 {_fmt(r.p50_ms, '{:.3g} ms')}, "
                           f"p99 {_fmt(r.p99_ms, '{:.3g} ms')}, errors {_fmt(r.error_share, '{:.2%}')} "
                           f"({r.windows} windows, {when(r.first_ms)} to {when(r.last_ms)})")
            elif b.where is not None:
                out.append(f"      {label:<6} -" + ("  (the function is new)" if label == "before" and c.status == "added"
                                                    else ""))
        for side, e in b.events:
            out.append(f"      event ({side}) {event_line(e)}")
        if b.note:
            out.append(f"      ({b.note})")
    return "\n".join(out) + "\n"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else spec.format(v)
