"""A local redis-server for development, tests and ``make run``.

``python -m processor.devtools.redis_server run -- backflow serve`` starts a redis-server on
localhost:6379 (keeping its data in .run/redis) when ``BACKFLOW_REDIS_URL`` is unset and
nothing answers there, runs the command, and stops that redis-server when the command ends. Tests use ``RedisServer``
to get a throwaway server on a free port.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

_CANDIDATES = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    return next((p for p in _CANDIDATES if os.access(p, os.X_OK)), None)


_HANDED: set[int] = set()  # ports free_port gave out in this process
_RANDOM = random.SystemRandom()  # (unseeded: tests that seed random must not pick alike)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 when asked, for a server started afterwards. It is
    taken below the range the kernel gives outgoing connections (a port from that range,
    picked by binding port 0, could be taken by a client socket before the server binds
    it), and never twice in one process."""
    lo, hi = _outgoing_ports()
    pool = (10_000, lo - 1) if lo > 12_000 else (hi + 1, 65_535)
    for _ in range(500):
        port = _RANDOM.randint(*pool)
        if port in _HANDED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED.add(port)
        return port
    with socket.socket() as s:  # (nothing free there: whatever the kernel gives)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outgoing_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32_768, 60_999  # (Linux's default)


def answers_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """A redis-server process of our own: no persistence, loopback only.

    >>> srv = RedisServer().start()   # doctest: +SKIP
    >>> srv.url                        # doctest: +SKIP
    'redis://127.0.0.1:40123/0'
    """

    def __init__(self, port: int | None = None, binary: str | None = None, data_dir: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)  # more redis-server options (--requirepass, --tls-port)
        self.binary = binary or find_redis_server()
        if not self.binary:
            raise FileNotFoundError("redis-server not found; install it (apt-get install redis-server)")
        # With a data_dir the server keeps an append-only file there, so what Backflow
        # learnt (the first-seen set above all) survives a restart; without one it is a
        # throwaway server in a temporary folder.
        self.persistent = data_dir is not None
        self.dir = data_dir or tempfile.mkdtemp(prefix="backflow-redis-")
        os.makedirs(self.dir, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--dir", os.path.abspath(self.dir),
             "--protected-mode", "yes", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not answers_ping("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.persistent:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(command: list[str]) -> int:
    """Run ``command`` with a Redis: the configured one, one already on :6379, or our own."""
    own = None
    if not os.environ.get("BACKFLOW_REDIS_URL") and "--redis-url" not in command:
        if answers_ping("127.0.0.1", 6379):
            print("backflow: using the redis-server already on localhost:6379", file=sys.stderr)
        else:
            own = RedisServer(port=6379, data_dir=os.path.join(".run", "redis")).start()
            print("backflow: started a local redis-server on localhost:6379 (data in .run/redis)",
                  file=sys.stderr)
    proc = subprocess.Popen(command)
    forward = lambda sig, _frame: proc.send_signal(sig)  # noqa: E731
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        return proc.wait()
    finally:
        if own:
            own.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m processor.devtools.redis_server")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a command with a Redis available")
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given")
    return run(command)


if __name__ == "__main__":
    sys.exit(main())
