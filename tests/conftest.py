import os
import subprocess
import sys
import time
import urllib.request

import pytest
import redis

from processor.commands.demo import http_status
from processor.devtools.redis_server import RedisServer, free_port


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free port, for the whole test session."""
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def redis_client(redis_server):
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.flushall()
    yield r
    r.close()


class BackflowProcess:
    """``backflow serve`` as a real subprocess on free ports."""

    def __init__(self, redis_url: str, *extra: str, prefix: str = "backflow", env: dict | None = None):
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.prefix = prefix
        self.args = [sys.executable, "-m", "processor", "serve",
                     "--otlp-grpc", f"127.0.0.1:{self.grpc_port}",
                     "--metrics", f"127.0.0.1:{self.metrics_port}",
                     "--redis-url", redis_url, "--prefix", prefix, "--otlp-http", "off", *extra]
        self.proc: subprocess.Popen | None = None
        self.log = ""

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 20.0, healthy: bool = True) -> "BackflowProcess":
        """Start and wait until /healthz says 200 (or, with ``healthy=False``, answers at all)."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backflow exited: {self.proc.stdout.read()}")
            status = self.http_status("/healthz")
            if status == 200 or (status and not healthy):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("backflow did not become healthy")

    def http_status(self, path: str) -> int:
        return http_status(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2)

    def http_body(self, path: str) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            return e.read().decode()

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self, sig=None, timeout: float = 30.0) -> int:
        import signal as _signal
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig or _signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log += self.proc.stdout.read()  # (empty when stopped before)
        return self.proc.returncode


@pytest.fixture
def backflow(redis_server, redis_client):
    """Factory: ``backflow(*extra_flags)`` starts a server; all are stopped at the end."""
    started = []

    def start(*extra: str, prefix: str = "backflow", env: dict | None = None) -> BackflowProcess:
        bf = BackflowProcess(redis_server.url, *extra, prefix=prefix, env=env).start()
        started.append(bf)
        return bf

    yield start
    for bf in started:
        bf.stop()


# tests/fixtures/ holds a small repository for the commands to look at, not tests.
collect_ignore = ["fixtures"]
