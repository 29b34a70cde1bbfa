"""``backflow demo``: everything on one machine, in under two minutes.

Starts a throwaway redis-server (or uses ``--redis-url``), ``backflow serve`` with short
windows and a short warm-up, and the demo shop (processor/devtools/demo/) sending spans through the
OpenTelemetry SDK; once the detectors have learned version 1.0.0 it rolls out 2.0.0, which
brings a slower function (median), a tail-only slowdown (p99), a new function, a function no
longer called and an exception spike. Events are printed as they arrive (tail's format),
and the demo ends once every expected event arrived, or at its deadline: status 0 when all
arrived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


from processor.sinks.connect import REDIS_ERRORS
from processor.commands import common
from processor.config import ConfigError, parse_redis_url, redact_url
from processor.commands.consume import GroupReader
from processor.devtools.demo.shop import V2
from processor.devtools.redis_server import RedisServer, free_port

# (type, function): what 2.0.0's rollout must bring, with the first_seen events of 1.0.0.
FIRST_SEEN = ("shop.cart.add_item", "shop.cart.apply_discount", "shop.payments.charge",
              "shop.payments.legacy_fraud_check", "shop.search.search")
EXPECTED = tuple(("first_seen", f) for f in FIRST_SEEN) + (
    ("latency_regression", "shop.cart.apply_discount"),   # median: 20 ms -> 40 ms
    ("latency_regression", "shop.search.search"),         # tail only: 4% of calls 12x slower
    ("first_seen", "shop.payments.fraud_score"),          # new in 2.0.0
    ("dormant", "shop.payments.legacy_fraud_check"),      # no longer called by 2.0.0
    ("new_exception", "shop.payments.charge"),            # GatewayTimeout
    ("error_regression", "shop.payments.charge"),         # 1% -> 20% errors
    ("rollout", ""),                                      # 2.0.0's rollout, with its verdict
)


@dataclass(frozen=True)
class Timing:
    window_s: float
    warmup_windows: int
    deadline_s: float

    @property
    def rollout_after_s(self) -> float:
        # the warm-up, and a few windows for the watermark and the first baselines
        return (self.warmup_windows + 4) * self.window_s


FULL = Timing(window_s=2.0, warmup_windows=10, deadline_s=110.0)
SHORT = Timing(window_s=1.0, warmup_windows=10, deadline_s=55.0)


def serve_config(t: Timing) -> dict:
    """The YAML given to ``backflow serve``: detectors that learn in seconds, not hours."""
    return {
        "window": t.window_s,
        "allowed_lateness": 1.0,  # the SDK exports every 200 ms
        "idle_timeout": 5.0,
        "baseline_half_life": 600.0,
        "detectors": {
            "warmup_windows": t.warmup_windows,
            "latency": {"min_tail_expected": 10},  # the tail is watched after ~1,000 calls of search
            "dormant": {"min_silence_s": 3 * t.window_s},
            "scaling": {"enabled": False},  # the demo's load is flat: nothing to learn there
        },
    }


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="run Redis, Backflow and an instrumented shop, roll out a bad "
                                    "version and print what Backflow finds (< 2 min)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true",
                   help=f"1 s windows, ends within {SHORT.deadline_s:.0f} s (for CI)")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help=f"end at the latest after this long (default {FULL.deadline_s:.0f}, "
                        f"with --short {SHORT.deadline_s:.0f})")
    p.add_argument("--redis-url", metavar="URL", default=None,
                   help="use this Redis instead of starting a throwaway redis-server (keys go under "
                        "a prefix of their own, printed at start)")
    p.add_argument("--prefix", metavar="NAME", default=None,
                   help="prefix of the demo's Redis keys (default backflow, or backflow-demo-<time> "
                        "with --redis-url)")
    p.set_defaults(run=run)
    return p


class Demo:
    def __init__(self, timing: Timing, redis_url: str | None, prefix: str | None, out=sys.stdout):
        self.timing = timing
        self.redis_url = redis_url
        self.prefix = prefix or ("backflow" if redis_url is None else f"backflow-demo-{int(time.time())}")
        self.out = out
        self.dir = tempfile.mkdtemp(prefix="backflow-demo-")
        self.redis: RedisServer | None = None
        self.serve: subprocess.Popen | None = None
        self.shop = None
        self.seen: set[tuple[str, str]] = set()
        self.stop = threading.Event()
        self.reader: threading.Thread | None = None

    def say(self, text: str) -> None:
        print(f"demo: {text}", file=self.out, flush=True)

    def run(self, interrupted: threading.Event) -> int:
        started = time.monotonic()
        deadline = started + self.timing.deadline_s
        try:
            url = self._start_redis()
            grpc_port, metrics_port = self._start_serve(url)
            self.reader = threading.Thread(target=self._print_events, args=(url,), name="demo-events",
                                           daemon=True)
            self.reader.start()
            from processor.devtools.demo.service import ROUTES, ShopService
            self.shop = ShopService(f"127.0.0.1:{grpc_port}").start()
            self.say(f"shop 1.0.0 serving {sum(r.per_second for r in ROUTES if '1.0.0' in r.versions):.0f} "
                     f"calls/s through the OpenTelemetry SDK; learning its baseline for "
                     f"{self.timing.rollout_after_s:.0f} s")
            rollout_at = time.monotonic() + self.timing.rollout_after_s
            rolled_out = False
            while not interrupted.is_set() and time.monotonic() < deadline:
                if self.serve.poll() is not None:
                    self.say(f"backflow serve exited with status {self.serve.returncode}:\n{self._serve_log()}")
                    return 1
                if not rolled_out and time.monotonic() >= rollout_at:
                    self.say(f"rolling out shop {V2}: apply_discount slower, search slower in its tail, "
                             "fraud_score replaces legacy_fraud_check, charge uses a new payment gateway")
                    self.shop.roll_out(V2)
                    rolled_out = True
                if all(e in self.seen for e in EXPECTED):
                    interrupted.wait(2 * self.timing.window_s)  # what else the last windows bring
                    break
                interrupted.wait(0.2)
            return self._summary(time.monotonic() - started)
        finally:
            self._stop_all()

    def _start_redis(self) -> str:
        if self.redis_url:
            self.say(f"using the Redis at {redact_url(self.redis_url)}, keys under {self.prefix}:")
            return self.redis_url
        self.redis = RedisServer().start()
        self.say(f"started redis-server on 127.0.0.1:{self.redis.port} (thrown away at the end)")
        return self.redis.url

    def _start_serve(self, url: str) -> tuple[int, int]:
        import yaml

        config = os.path.join(self.dir, "backflow.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(serve_config(self.timing), f)
        from processor.devtools.demo.service import CODEOWNERS, SHOP_ROOT
        codeowners = os.path.join(self.dir, "CODEOWNERS")
        with open(codeowners, "w") as f:
            f.write(CODEOWNERS)
        grpc_port, metrics_port = free_port(), free_port()
        args = [sys.executable, "-m", "processor", "serve", "--config", config,
                "--otlp-grpc", f"127.0.0.1:{grpc_port}", "--otlp-http", "off",
                "--metrics", f"127.0.0.1:{metrics_port}", "--prefix", self.prefix,
                "--codeowners", codeowners, "--log-level", "warning"]
        self.log_path = os.path.join(self.dir, "serve.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFLOW_")}  # ours, not the user's
        env["BACKFLOW_REDIS_URL"] = url  # not on the command line, where ps shows a password
        with open(self.log_path, "w") as log:
            self.serve = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while http_status(f"http://127.0.0.1:{metrics_port}/healthz") != 200:
            if self.serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"backflow serve did not start:\n{self._serve_log()}")
            time.sleep(0.1)
        self.say(f"backflow serve: OTLP/gRPC on 127.0.0.1:{grpc_port}, metrics on "
                 f"http://127.0.0.1:{metrics_port}/metrics, {self.timing.window_s:g} s windows, "
                 f"owners from the shop's CODEOWNERS (files under {SHOP_ROOT})")
        return grpc_port, metrics_port

    def _serve_log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def _print_events(self, url: str) -> None:
        def show(_entry_id: str, fields: dict[str, str]) -> None:
            self.seen.add((fields.get("type", ""), fields.get("code.function.name", "")))
            print(common.format_event(fields, color=self.out.isatty()), file=self.out, flush=True)

        reader = GroupReader(common.connect(url), f"{self.prefix}:events", "backflow-demo",
                             consumer="demo", start="0")
        while not self.stop.is_set():
            try:
                reader.run(show, self.stop, block_ms=200)
            except REDIS_ERRORS:
                self.stop.wait(0.5)

    def _summary(self, took_s: float) -> int:
        missing = [e for e in EXPECTED if e not in self.seen]
        self.say(f"after {took_s:.0f} s, {len(EXPECTED) - len(missing)} of {len(EXPECTED)} expected events:")
        for e in EXPECTED:
            self.say(f"  {'ok     ' if e in self.seen else 'MISSING'} {e[0] + ' ' + e[1] if e[1] else e[0]}")
        if missing:
            self.say("some expected events did not arrive (a busy machine? try again, or without --short)")
        self._verdict()
        return 1 if missing else 0

    def _verdict(self) -> None:
        """The rollout's verdict as ``backflow verdict`` prints it (docs/rollouts.md)."""
        from processor.commands.verdict import find, render

        url = self.redis_url or (self.redis.url if self.redis else None)
        try:
            state = find(common.connect(url), self.prefix, "shop", V2, None, None) if url else None
        except (*REDIS_ERRORS, common.ConfigError):
            state = None
        if state is not None:
            self.say(f"the verdict on {V2}, as `backflow verdict --service shop --version {V2}` prints it:")
            for line in render(state).splitlines():
                self.say("  " + line)

    def _stop_all(self) -> None:
        if self.shop is not None:
            self.shop.stop()
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()  # closes the open windows and writes them
            try:
                self.serve.wait(30)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait()
        time.sleep(0.3)  # the reader prints what the shutdown wrote
        self.stop.set()
        if self.reader is not None:
            self.reader.join(timeout=5)
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def http_status(url: str, timeout: float = 1.0) -> int:
    """The status a GET of ``url`` answers with; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def run(args: argparse.Namespace) -> int:
    timing = SHORT if args.short else FULL
    if args.duration is not None:
        if not args.duration > 0:
            raise ConfigError(f"invalid setting duration (--duration): must be > 0, got {args.duration}")
        timing = Timing(timing.window_s, timing.warmup_windows, args.duration)
    redis_url = None
    if args.redis_url is not None:
        try:
            redis_url = parse_redis_url(args.redis_url)
        except ValueError as e:
            raise ConfigError(f"invalid setting redis_url (--redis-url): {e}") from None
    if args.prefix is not None:
        common.redis_settings(argparse.Namespace(redis_url=None, prefix=args.prefix), {})  # validates
    if redis_url is None and not _has_redis_server():
        print("backflow demo: redis-server not found; install it (apt-get install redis-server) "
              "or pass --redis-url", file=sys.stderr)
        return 1
    interrupted = common.stop_on_signals()
    try:
        return Demo(timing, redis_url, args.prefix).run(interrupted)
    except RuntimeError as e:
        print(f"backflow demo: {e}", file=sys.stderr)
        return 1


def _has_redis_server() -> bool:
    from processor.devtools.redis_server import find_redis_server
    return find_redis_server() is not None

