"""Redis Cluster (processor/sinks/connect.py): `backflow serve` with a hash-tag prefix, and
`tail`, `top`, `verdict`, `report` and `notify`, against a real cluster of three masters with a
replica each; a master killed during ingest fails over with nothing lost and nothing twice,
the batches counting once a replica has them (``--redis-wait-replicas 1``)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from redis.cluster import RedisCluster

from processor.devtools.redis_server import free_port
from processor.receiver.decode import count_spans
from tests.conftest import BackflowProcess
from tests.rediscluster import Cluster
from tests.test_notify import Webhook
from tests.test_workers import _send_all, requests_by_service  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e

FLAGS = ("--window", "60", "--allowed-lateness", "5", "--idle-timeout", "2", "--checkpoint-interval", "0")


@pytest.fixture(scope="module")
def cluster():
    c = Cluster().start()
    yield c
    c.stop()


def _published(client, prefix: str):
    events = sorted((f["id"], f["type"], f["key"], f["window.end"], f["service.version"], f["summary"])
                    for _, f in client.xrange(f"{prefix}:events"))
    keys = client.smembers(f"{prefix}:keys")
    return events, {k: client.hgetall(f"{prefix}:baseline:{k}") for k in keys}


def _settle(bf: BackflowProcess, total: int, timeout: float = 120):
    def settled():
        m = bf.metrics()
        return m if (m["backflow_processed_spans_total"] == total and m["backflow_open_windows"] == 0
                     and m["backflow_redis_pending_writes"] == 0) else None
    return bf.wait_for(settled, timeout=timeout, what=f"{total} spans processed, windows closed, writes done")


def test_serve_refuses_a_prefix_that_is_not_a_hash_tag(cluster):
    out = subprocess.run([sys.executable, "-m", "processor", "serve", "--redis-url", cluster.url,
                          "--otlp-grpc", f"127.0.0.1:{free_port()}", "--otlp-http", "off",
                          "--metrics", f"127.0.0.1:{free_port()}", "--prefix", "backflow"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "is a Redis Cluster" in out.stdout + out.stderr and "'{backflow}'" in out.stdout + out.stderr


def test_a_master_killed_during_ingest_fails_over_with_nothing_lost(
        cluster, redis_server, redis_client, requests_by_service):  # noqa: F811
    total = sum(count_spans(r) for reqs in requests_by_service.values() for r in reqs)

    # What one plain Redis gets.
    plain = BackflowProcess(redis_server.url, *FLAGS, prefix="{plain}").start()
    try:
        _send_all(plain.grpc_target, requests_by_service)
        _settle(plain, total)
    finally:
        assert plain.stop() == 0, plain.log
    expected = _published(redis_client, "{plain}")
    assert any(e[1] != "first_seen" for e in expected[0])

    # The same through the cluster, its master of {bf} killed halfway.
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    master = cluster.master_of("{bf}:events")
    bf = BackflowProcess(cluster.url, *FLAGS, "--redis-wait-replicas", "1", prefix="{bf}").start()
    try:
        sender = threading.Thread(target=_send_all, args=(bf.grpc_target, requests_by_service))
        sender.start()
        bf.wait_for(lambda: sum(v for k, v in bf.metrics().items() if k.startswith("backflow_events_total")) > 0,
                    timeout=60, what="the first events written")
        cluster.kill(master)
        bf.wait_for(lambda: bf.metrics()["backflow_redis_up"] == 0, timeout=30, what="the writes failing")
        deadline = time.monotonic() + 30
        while cluster.master_of("{bf}:events") == master:  # (its replica is elected)
            assert time.monotonic() < deadline, "no failover"
            time.sleep(0.2)
        cluster.restart(master)  # (back as a replica of the new master: writes have a replica again)
        cluster.wait_healthy()
        sender.join()
        m = _settle(bf, total, timeout=180)
        assert m["backflow_redis_up"] == 1
    finally:
        code = bf.stop()
    assert code == 0, bf.log
    assert "Redis write failed" in bf.log
    got = _published(client, "{bf}")
    assert got[0] == expected[0]  # every event, once
    assert got[1] == expected[1]


def test_the_commands_read_a_cluster(cluster, requests_by_service):  # noqa: F811
    bf = BackflowProcess(cluster.url, *FLAGS, prefix="{cmd}").start()
    try:
        _send_all(bf.grpc_target, requests_by_service)
        _settle(bf, sum(count_spans(r) for reqs in requests_by_service.values() for r in reqs))
    finally:
        assert bf.stop() == 0, bf.log
    env = {"BACKFLOW_REDIS_URL": cluster.url, "BACKFLOW_PREFIX": "{cmd}"}

    def run(*args):
        import os
        return subprocess.run([sys.executable, "-m", "processor", *args], capture_output=True, text=True,
                              timeout=60, env={**os.environ, **env})

    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    n = client.xlen("{cmd}:events")
    tail = run("tail", "--no-follow", "--start", "all", "--json", "--group", "t")
    assert tail.returncode == 0, tail.stderr
    assert len(tail.stdout.splitlines()) == n > 0
    first = json.loads(tail.stdout.splitlines()[0])
    top = run("top", "--once", "--limit", "100")
    assert top.returncode == 0, top.stderr
    assert first["code.function.name"] in top.stdout
    service, version = first["service.name"], first["service.version"]
    verdict = run("verdict", "--service", service, "--version", version)
    assert verdict.returncode in (0, 1, 3) and service in verdict.stdout, verdict.stderr
    report = run("report", "--service", service)
    assert report.returncode == 0, report.stderr
    assert first["code.function.name"] in report.stdout
    hook = Webhook()
    try:
        posted = run("notify", "--webhook", hook.url, "--no-follow", "--start", "all", "--rate-per-minute", "100000",
                     "--burst", "100000")
        assert posted.returncode == 0, posted.stderr
        assert len(hook.posts) == n and first["summary"].split(":")[0] in " ".join(hook.texts())
    finally:
        hook.close()
