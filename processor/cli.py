"""Command line: ``backflow <command>``; dispatch only, each command is a module of
processor/commands/ with ``add_parser(subparsers)`` and ``run(args) -> exit status``."""

from __future__ import annotations

import argparse
import os
import sys

from processor import __version__
from processor.config import ConfigError, url_secrets
from processor.logs import configure_logging

COMMANDS = ("serve", "demo", "tail", "top", "notify", "report", "verdict")


def _parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="backflow", description=(
        "Backflow: per-function baselines and regression events from OpenTelemetry spans."))
    p.add_argument("--version", action="version", version=f"backflow {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"processor.commands.{name}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":  # serve configures its own logging from its settings
        configure_logging("WARNING", url_secrets(getattr(args, "redis_url", None)
                                                 or os.environ.get("BACKFLOW_REDIS_URL", "")))
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"backflow: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
