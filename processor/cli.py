"""Command line: ``backflow serve``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from processor import __version__
from processor.config import ConfigError, add_arguments, resolve
from processor.logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backflow", description=(
        "Backflow: per-function baselines and regression events from OpenTelemetry spans."))
    p.add_argument("--version", action="version", version=f"backflow {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OTLP receiver, the detectors and the sinks")
    add_arguments(serve)
    from processor.commands import demo, notify, tail, top
    from processor.report.command import add_parser as add_report
    for command in (demo, tail, top, notify):
        command.add_parser(sub)
    add_report(sub)
    return p


def serve(cfg) -> int:
    from processor.app import Backflow  # heavy imports only when serving

    configure_logging(cfg.log_level, cfg.secrets)
    # Receiver threads answer Export calls while the pipeline thread computes: a shorter
    # GIL switch interval (5 ms by default) bounds how long a call waits for its turn.
    sys.setswitchinterval(0.001)
    app = Backflow(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        started = app.start(stop)
    except OSError as e:
        logging.getLogger("backflow").error("cannot start: %s", e)
        app.stop(deadline=2.0)
        return 1
    if started:
        logging.getLogger("backflow").info("backflow %s serving; metrics on %s", __version__, cfg.metrics)
    while not stop.wait(timeout=1.0):
        pass
    logging.getLogger("backflow").info("stopping: closing open windows, checkpointing and flushing "
                                       "(at most %g s)", cfg.shutdown_timeout)
    # Exit status 1 when Redis did not take everything in time: what was lost is logged.
    return 0 if app.stop(deadline=cfg.shutdown_timeout) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            cfg = resolve(vars(args), dict(os.environ))
        except ConfigError as e:
            print(f"backflow: {e}", file=sys.stderr)
            return 2
        return serve(cfg)
    from processor.config import url_secrets
    configure_logging("WARNING", url_secrets(getattr(args, "redis_url", None)
                                             or os.environ.get("BACKFLOW_REDIS_URL", "")))
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"backflow: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
