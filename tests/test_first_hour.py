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


def test_the_log_says_what_happens_and_when_detection_starts(redis_server):
    import time

    import grpc
    import redis

    from tests.conftest import BackflowProcess
    from tests.otlp import S, encoded

    redis.Redis.from_url(redis_server.url).flushall()
    bf = BackflowProcess(redis_server.url, "--window", "1", "--allowed-lateness", "0", "--warmup-windows", "3",
                         "--log-interval", "2").start()
    try:
        export = grpc.insecure_channel(bf.grpc_target).unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        t0 = time.time_ns()
        for i in range(6):  # a span a second: six windows of the same location
            export(encoded([S(t0 + i * 1_000_000_000, function="shop.cart.add")]), timeout=10)
            time.sleep(1.0)
        export(encoded([S(t0, function="shop.cart.add")]), timeout=10)  # its window closed: late
        export(encoded([S(time.time_ns(), duration=-5)]), timeout=10)  # end before start: refused
        bf.wait_for(lambda: (m := bf.metrics()).get("backflow_late_spans_total") == 1
                    and m.get("backflow_receiver_refused_spans_total{reason=\"invalid_span\",transport=\"grpc\"}"),
                    what="the late and the refused span counted")
        time.sleep(2.5)  # a summary line and the warnings (the log is read once serve stopped)
    finally:
        bf.stop()
    log = bf.log
    assert "regressions only once it is past its warm-up: its first 3 windows of 1 s (3 s;" in log
    assert "event first_seen info shop@1.0: shop.cart.add first seen" in log
    assert "service shop (prod): past its warm-up; regressions of its code locations can be reported" in log
    line = next(x for x in log.splitlines() if "last 2s:" in x)
    assert "spans accepted" in line and "windows closed" in line and "code locations held" in line
    assert "dropped 1 late spans since the last such line: their windows had closed" in log
    assert "refused 1 spans since the last such line: 1 invalid_span" in log
