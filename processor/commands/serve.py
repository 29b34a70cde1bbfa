"""``backflow serve``: the OTLP receivers, the pipeline and the sinks until SIGTERM or SIGINT.

The settings are flags, environment variables and ``--config`` YAML (processor/config.py);
the running process is ``processor.service.Backflow``, imported only when serving.
"""

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


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="run the OTLP receiver, the detectors and the sinks")
    add_arguments(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    try:
        cfg = resolve(vars(args), dict(os.environ))
    except ConfigError as e:
        print(f"backflow: {e}", file=sys.stderr)
        return 2
    return serve(cfg)


def serve(cfg) -> int:
    """Run until SIGTERM or SIGINT; the exit status."""
    from processor.service import Backflow  # heavy imports only when serving


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
