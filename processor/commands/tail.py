"""``backflow tail``: follow the events stream through a consumer group and print each
matching event, as a line for a person or as a JSON line of its fields."""

from __future__ import annotations

import argparse
import json
import os
import sys


from processor.sinks.connect import REDIS_ERRORS
from processor.commands import common
from processor.commands.consume import GroupReader


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tail", help="print events as they arrive (a consumer group: resumes after a restart)",
                       description="Follow {prefix}:events through a Redis consumer group: every event "
                                   "shown is acknowledged, and a restart goes on where it stopped.")
    common.add_redis_arguments(p)
    common.add_filter_arguments(p, "show")
    common.add_group_arguments(p, "backflow-tail")
    p.add_argument("--json", action="store_true", help="print each event's fields as a JSON line")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="print what is waiting, then exit")
    p.add_argument("--limit", type=int, metavar="N", help="exit after showing N events")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    url, prefix = common.redis_settings(args)
    event_filter = common.event_filter(args)
    if args.limit is not None and args.limit < 1:
        raise common.ConfigError(f"invalid setting limit (--limit): must be >= 1, got {args.limit}")
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def show(_entry_id: str, fields: dict[str, str]) -> None:
        line = json.dumps(fields, ensure_ascii=False) if args.json else common.format_event(fields, color)
        print(line, flush=True)

    reader = GroupReader(common.connect(url), f"{prefix}:events", **common.group_options(args))
    stop = common.stop_on_signals()
    try:
        reader.run(show, stop, follow=args.follow, limit=args.limit, event_filter=event_filter)
    except BrokenPipeError:  # `backflow tail | head`: the reader went away
        sys.stderr.close()
        return 0
    except REDIS_ERRORS as e:
        print(f"backflow tail: {e}", file=sys.stderr)
        return 1
    return 0
