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
from processor.config import ConfigError, add_arguments, resolve, unused_settings
from processor.logs import configure_logging
from processor.parsing import ListenError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="run the OTLP receiver, the detectors and the sinks",
                       description="Receive OTLP spans, learn a baseline per code location and publish "
                                   "events to Redis and metrics to Prometheus. first_seen events come as "
                                   "soon as a location's first window closes; regressions only after its "
                                   "warm-up, --warmup-windows windows of --window seconds (30 x 60 s = "
                                   "30 min by default).")
    add_arguments(p)
    p.set_defaults(run=run)
    return p


def plaintext_token_warning(cfg) -> str | None:
    """What to say at start when a bearer token crosses the network in plaintext: required
    on a receiver that speaks plaintext beyond this host, or sent to detect replicas beyond
    it without forward_tls_ca.

    >>> from types import SimpleNamespace as C
    >>> def cfg(**kw):
    ...     return C(**{"auth_token": "t", "tls_cert": None, "otlp_grpc": "0.0.0.0:4317", "otlp_http": None,
    ...                 "forward_auth_token": None, "forward_tls_ca": None, "forward": None, **kw})
    >>> plaintext_token_warning(cfg())[:40]
    'a bearer token is required, but OTLP/gRP'
    >>> plaintext_token_warning(cfg(otlp_grpc="127.0.0.1:4317"))
    >>> plaintext_token_warning(cfg(tls_cert="c.pem"))
    >>> plaintext_token_warning(cfg(auth_token=None, forward_auth_token="t", forward="detect:4317"))[:49]
    "the partials' bearer token goes to detect:4317 in"
    >>> plaintext_token_warning(cfg(auth_token=None, forward_auth_token="t", forward="localhost:4317"))
    """
    said = []
    exposed = [f"{name} on {addr}" for name, addr in (("OTLP/gRPC", cfg.otlp_grpc), ("OTLP/HTTP", cfg.otlp_http))
               if addr and _beyond_host(addr)]
    if cfg.auth_token and not cfg.tls_cert and exposed:
        said.append(f"a bearer token is required, but {' and '.join(exposed)} speak plaintext: the token "
                    f"crosses the network readable by anyone on the path; give tls_cert and tls_key "
                    f"(docs/security.md), or listen on a network you trust")
    away = [a for a in (cfg.forward or "").split(",") if a and _beyond_host(a)]
    if cfg.forward_auth_token and not cfg.forward_tls_ca and away:
        said.append(f"the partials' bearer token goes to {', '.join(away)} in plaintext, readable by anyone "
                    f"on the path; give forward_tls_ca (docs/tiers.md), or forward on a network you trust")
    return "; ".join(said) or None


def _beyond_host(address: str) -> bool:
    return address.rpartition(":")[0].strip("[]") not in ("127.0.0.1", "::1", "localhost")


def detection_timing(cfg) -> str:
    """When events can come, for the start log: first_seen at once, regressions after the
    warm-up of each code location.

    >>> from types import SimpleNamespace as C
    >>> detection_timing(C(window=60.0, detectors=C(warmup_windows=30)))[-83:]
    'its first 30 windows of 60 s (30 min; --warmup-windows, --window) are watched first'
    """
    warm, window = cfg.detectors.warmup_windows, cfg.window
    total = warm * window
    span = f"{total / 60:g} min" if total >= 60 else f"{total:g} s"
    return (f"events: first_seen as soon as a code location's first window closes; regressions only "
            f"once it is past its warm-up: its first {warm} windows of {window:g} s ({span}; "
            f"--warmup-windows, --window) are watched first")


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
    warning = plaintext_token_warning(cfg)
    if warning:
        logging.getLogger("backflow").warning(warning)
    unused = unused_settings(cfg)
    if unused:  # (often set for every process alike: said, not refused)
        logging.getLogger("backflow").warning(
            "an aggregate replica does not use %s: the detect replicas do (docs/tiers.md)", ", ".join(unused))
    # Receiver threads answer Export calls while the pipeline thread computes: a shorter
    # GIL switch interval (5 ms by default) bounds how long a call waits for its turn.
    sys.setswitchinterval(0.001)
    app = Backflow(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        started = app.start(stop)
    except ConfigError as e:  # (found only once Redis answered: a setting to change)
        logging.getLogger("backflow").error("cannot start: %s", e)
        app.stop(deadline=2.0)
        return 2
    except OSError as e:
        logging.getLogger("backflow").error("cannot start: %s", e)
        app.stop(deadline=2.0)
        return 2 if isinstance(e, ListenError) else 1  # (2: a setting to change)
    if started:
        logging.getLogger("backflow").info("backflow %s serving; metrics on %s", __version__, cfg.metrics)
        if cfg.role != "aggregate":  # (an aggregate replica detects nothing)
            logging.getLogger("backflow").info(detection_timing(cfg))
    while not stop.wait(timeout=1.0):
        pass
    logging.getLogger("backflow").info("stopping: closing open windows, checkpointing and flushing "
                                       "(at most %g s)", cfg.shutdown_timeout)
    # Exit status 1 when Redis did not take everything in time: what was lost is logged.
    return 0 if app.stop(deadline=cfg.shutdown_timeout) else 1
