"""What a new user meets in their first hour (issue 16): errors that name the setting."""

import socket
import subprocess
import sys

import pytest

from processor.devtools.redis_server import free_port

pytestmark = pytest.mark.e2e  # starts backflow serve against a redis-server


def serve(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "processor", "serve", "--redis-url", redis_url,
                           "--otlp-grpc", f"127.0.0.1:{free_port()}", "--otlp-http", f"127.0.0.1:{free_port()}",
                           "--metrics", f"127.0.0.1:{free_port()}", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("setting, workers", [("--metrics", "1"), ("--otlp-grpc", "1"), ("--otlp-http", "1"),
                                              ("--otlp-http", "2")])
def test_a_busy_port_names_its_setting_and_address_and_exits_2(redis_server, setting, workers):
    with socket.socket() as holder:  # another program on the port, as a user would have
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        p = serve(redis_server.url, setting, address, "--workers", workers)
    assert p.returncode == 2, p.stdout + p.stderr
    line = next(x for x in (p.stdout + p.stderr).splitlines() if "cannot start" in x)
    assert f"{setting} {address}: " in line and f"BACKFLOW_{setting[2:].upper().replace('-', '_')}" in line, line


def test_a_port_alone_means_every_interface_as_for_the_collector(redis_server):
    from tests.conftest import BackflowProcess

    port = free_port()
    bf = BackflowProcess(redis_server.url, "--otlp-http", f":{port}").start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        bf.stop()
    assert f"OTLP/HTTP listening on 0.0.0.0:{port}" in bf.log
