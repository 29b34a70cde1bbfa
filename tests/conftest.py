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

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        out = {}
        for line in self.metrics_text().splitlines():
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


# --- What `backflow serve` wrote conforms to proto/backflow/v1 (docs/schema.md) -------------
# After every test that started a BackflowProcess, each event, baseline and version summary
# under those processes' prefixes, in their Redis, must convert to its message; a Redis the
# test stops is read just before it stops. A record that does not is a teardown error
# naming it and the field (once: a record left in the session's server is not reported
# again). tests/test_schema_conformance.py shows that a bad record fails a test.
SCHEMA_CHECKED = {"tests": 0, "events": 0, "baselines": 0, "versions": 0, "edges": 0, "verdicts": 0, "unread": 0,
                  "bad": 0}
_SCHEMA_REPORTED: set[str] = set()


@pytest.fixture(autouse=True)
def _published_records_conform(monkeypatch):
    from urllib.parse import urlsplit

    from processor.schema.conformance import Tally, check
    from processor.sinks.connect import REDIS_ERRORS, client_for

    started: list[BackflowProcess] = []
    tally, read = Tally(), set()
    real_stop = RedisServer.stop
    # This module may be loaded twice (as conftest, and as tests.conftest by the tests that
    # import BackflowProcess from it): both classes are followed.
    classes = {m.BackflowProcess for m in (sys.modules.get("conftest"), sys.modules.get("tests.conftest"))
               if m is not None and hasattr(m, "BackflowProcess")} | {BackflowProcess}

    def targets() -> set[tuple[str, str]]:  # (Redis URL, prefix) of each process started
        urls = [[a for flag, a in zip(bf.args, bf.args[1:]) if flag == "--redis-url"][-1] for bf in started]
        return {(url, bf.prefix) for url, bf in zip(urls, started)}

    def read_records(ports: set[int] | None = None) -> None:
        for url, prefix in targets():
            try:
                if ports is not None and urlsplit(url).port not in ports:
                    continue
                client = client_for(url, socket_timeout=10, socket_connect_timeout=2)  # (a cluster's too)
                try:
                    tally.update(check(client, prefix))
                finally:
                    client.close()
                read.add((url, prefix))
            except (*REDIS_ERRORS, ValueError, OSError):
                pass  # gone, or a test's wrong password: nothing there to read

    def following(real_start):
        def start(self, *args, **kwargs):
            started.append(self)
            return real_start(self, *args, **kwargs)
        return start

    def stop(self):
        args = self.extra_args
        read_records({self.port} | {int(p) for flag, p in zip(args, args[1:]) if flag == "--tls-port"})
        real_stop(self)

    for cls in classes:
        monkeypatch.setattr(cls, "start", following(cls.start))
    monkeypatch.setattr(RedisServer, "stop", stop)
    yield
    if not started:
        return
    read_records()
    SCHEMA_CHECKED["tests"] += 1
    SCHEMA_CHECKED["events"] += len(tally.events)
    SCHEMA_CHECKED["baselines"] += len(tally.baselines)
    SCHEMA_CHECKED["versions"] += len(tally.versions)
    SCHEMA_CHECKED["edges"] += len(tally.edges)
    SCHEMA_CHECKED["verdicts"] += len(tally.verdicts)
    SCHEMA_CHECKED["unread"] += len(targets() - read)
    new = [p for p in tally.problems if p not in _SCHEMA_REPORTED]
    _SCHEMA_REPORTED.update(new)
    SCHEMA_CHECKED["bad"] += len(new)
    if new:
        pytest.fail(f"{len(new)} records in Redis do not conform to proto/backflow/v1 (docs/schema.md):\n"
                    + "\n".join(new[:20]), pytrace=False)


def pytest_terminal_summary(terminalreporter):
    c = SCHEMA_CHECKED
    if c["tests"]:
        terminalreporter.write_line(
            f"proto/backflow/v1 conformance: {c['events']} events, {c['baselines']} baselines, "
            f"{c['versions']} version summaries, {c['edges']} call-graph hashes and {c['verdicts']} rollout verdicts "
            f"checked after {c['tests']} tests that started backflow serve, "
            f"{c['bad']} not conforming"
            + (f"; {c['unread']} Redis targets unreadable (gone, or wrong credentials)" if c["unread"] else ""))


# --- Test tiers (docs/testing.md) -------------------------------------------------------------
# e2e: the test starts a process (redis-server, `backflow serve`, receiver processes, a command
# in a subprocess, git, promtool, node...); slow: it starts none but takes seconds. `make
# test-fast` runs the others. A test using one of these fixtures is e2e without saying so;
# any other test that starts a process fails, naming the program, until it is marked, so
# that the fast tier stays fast and honest.
E2E_FIXTURES = {"redis_server", "redis_client", "backflow"}


@pytest.hookimpl(tryfirst=True)  # before -m "not e2e" deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _processes_only_in_e2e_tests(request, monkeypatch):
    if request.node.get_closest_marker("e2e") is not None:
        return
    import _posixsubprocess

    def refuse(how):
        def starts(*args, **kwargs):
            program = args[0][0] if how == "fork_exec" and args and args[0] else args[0] if args else "?"
            raise AssertionError(f"{request.node.nodeid} starts a process ({how} {os.fsdecode(program)!r}) and is "
                                 "not marked e2e: mark it (pytest.mark.e2e) so that make test-fast leaves it out")
        return starts

    monkeypatch.setattr(subprocess, "_fork_exec", refuse("fork_exec"), raising=False)  # subprocess, asyncio
    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse("fork_exec"))  # multiprocessing's spawn
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse(name))
