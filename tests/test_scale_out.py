"""Scaled out: two `backflow serve` instances sharing one Redis and one prefix, each fed the
services that the gateway collectors' loadbalancing exporter (deploy/k8s/gateway/otelcol.yaml,
``routing_key: service``) routes to it, publish exactly what one instance fed everything
publishes; and each checkpoint field, baseline and event is written by the one instance
that owns its service."""

from __future__ import annotations

import codecs
import json
import re
import threading
from collections import defaultdict
from pathlib import Path

import msgpack
import pytest
import redis
import yaml

from benchmarks.scenarios import generate
from processor.receiver.decode import count_spans
from tests.conftest import BackflowProcess
from tests.lanes import requests_by_service as split_by_service, send_lanes
from processor.sinks.ring import HashRing, backend_points

GATEWAY_COLLECTOR = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "gateway" / "otelcol.yaml"
FLAGS = ("--window", "60", "--allowed-lateness", "5", "--idle-timeout", "100000",
         "--checkpoint-interval", "2")


def gateway_ring() -> HashRing:
    """The ring of the shipped gateway collector configuration."""
    exporter = yaml.safe_load(GATEWAY_COLLECTOR.read_text())["exporters"]["loadbalancing/backflow"]
    assert exporter["routing_key"] == "service"
    return HashRing(exporter["resolver"]["static"]["hostnames"])


def test_the_ring_gives_the_loadbalancing_exporters_own_test_vectors():
    # consistent_hashing_test.go: positions of two backends at 5 points each, and the
    # backend chosen for four keys on a ring of two backends at 100 points.
    assert sorted(backend_points("endpoint-1", 5)) == [1401, 4175, 14133, 17836, 21667]
    assert sorted(backend_points("endpoint-2", 5)) == [10240, 15002, 21263, 26806, 27020]
    ring = HashRing(["endpoint-1", "endpoint-2"])
    assert len(ring.positions) == 200
    assert [ring.backend_for(k) for k in (bytes([1, 2, 0, 0]), bytes([128, 128, 0, 0]),
                                          "ad-service-7", "get-recommendations-1")] == \
        ["endpoint-1", "endpoint-2", "endpoint-1", "endpoint-2"]


@pytest.fixture(scope="module")
def requests_by_service():
    return split_by_service(generate(7, services=4, functions_per_service=3, hours=4.0,
                                     rate=(4.0, 8.0), min_rate=3.0))


class WriteLog:
    """Redis MONITOR on a thread: which client (by the name it gave with CLIENT SETNAME)
    wrote which baseline hash and which checkpoint field, and which keys it announced."""

    _ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')

    def __init__(self, url: str, prefix: str):
        self.prefix = prefix
        self.names: dict[str, str] = {}  # client address -> client name
        self.state_fields: dict[str, set[str]] = defaultdict(set)  # field -> writers
        self.baselines: dict[str, set[str]] = defaultdict(set)     # key -> writers
        self.announced: dict[str, set[str]] = defaultdict(set)     # key (SADD / first_seen) -> writers
        self.unnamed: list[bytes] = []
        self._client = redis.Redis.from_url(url)
        self._conn = self._client.connection_pool.get_connection()
        self._conn.send_command("MONITOR")
        assert self._conn.read_response() == b"OK"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while True:
            try:
                line = self._conn.read_response()
            except (redis.ConnectionError, OSError, ValueError):
                return
            head, _, rest = line.partition(b"] ")
            addr = head.rsplit(b" ", 1)[-1].decode()
            if addr == "lua":
                continue  # the commands of a script; the EVALSHA that ran it is logged
            args = [a for a in self._ARG.findall(rest)]
            if not args:
                continue
            cmd = args[0].upper()
            if cmd == b"CLIENT" and len(args) > 2 and args[1].upper() == b"SETNAME":
                self.names[addr] = args[2].decode()
                continue
            who = self.names.get(addr)
            key = args[1].decode() if len(args) > 1 else ""
            if cmd == b"HSET" and key == f"{self.prefix}:state":
                targets = [(self.state_fields, a.decode()) for a in args[2::2]]
            elif cmd == b"HSET" and key.startswith(f"{self.prefix}:baseline:"):
                targets = [(self.baselines, key.rsplit(":", 1)[1])]
            elif cmd == b"SADD" and key == f"{self.prefix}:keys":
                targets = [(self.announced, a.decode()) for a in args[2:]]
            elif cmd == b"EVALSHA" and len(args) > 5 and args[3].decode().startswith(f"{self.prefix}:baseline:"):
                # the one-baseline script (spooled batches): its hash, and its key added to the set
                targets = [(self.baselines, args[3].decode().rsplit(":", 1)[1]), (self.announced, args[5].decode())]
            elif cmd == b"EVALSHA" and len(args) > 4 and args[3].decode() == f"{self.prefix}:keys" \
                    and args[4].decode().startswith(f"{self.prefix}:baseline:"):
                # the baselines script (docs/sinks.md): its hashes, then one JSON array of rows,
                # each the key it adds to the set and the fields (as MONITOR escapes them)
                n = int(args[2])
                rows = json.loads(codecs.escape_decode(args[3 + n])[0])
                targets = ([(self.baselines, k.decode().rsplit(":", 1)[1]) for k in args[4:3 + n]]
                           + [(self.announced, row[0]) for row in rows])
            elif cmd == b"EVALSHA" and len(args) == 5 and args[3].decode() == f"{self.prefix}:state":
                # the checkpoint script: fields and values as one MessagePack array
                pairs = msgpack.unpackb(codecs.escape_decode(args[4])[0], raw=True)
                targets = [(self.state_fields, a.decode()) for a in pairs[::2]]
            elif cmd == b"EVALSHA" and len(args) > 9 and args[5].decode() == f"{self.prefix}:keys":
                # the event script: the key it adds to the set if the event is a first_seen
                targets = [(self.announced, args[9].decode())] if args[9] else []
            else:
                continue
            if who is None:
                self.unnamed.append(line[:200])
            for table, name in targets:
                table[name].add(who)

    def close(self):
        self._conn.disconnect()
        self._thread.join(5)
        self._client.close()


def _settle(bf: BackflowProcess, spans: int) -> dict[str, float]:
    def settled():
        m = bf.metrics()
        accepted = sum(v for k, v in m.items() if k.startswith("backflow_receiver_accepted_spans_total"))
        return m if accepted == spans == m["backflow_processed_spans_total"] else None
    return bf.wait_for(settled, timeout=120, what=f"{spans} spans accepted and processed")


def _published(r: redis.Redis, prefix: str):
    events = sorted(tuple(sorted(f.items())) for _, f in r.xrange(f"{prefix}:events"))
    keys = r.smembers(f"{prefix}:keys")
    baselines = {k: r.hgetall(f"{prefix}:baseline:{k}") for k in keys}
    return events, keys, baselines


def test_two_instances_routed_by_service_publish_what_one_instance_publishes(
        redis_server, redis_client, requests_by_service):
    ring = gateway_ring()
    backends = sorted(set(ring.backends))
    assert len(backends) == 2
    owner = {svc: backends.index(ring.backend_for(svc)) for svc in requests_by_service}
    assert set(owner.values()) == {0, 1}, f"each instance should get a service: {owner}"
    spans = {svc: sum(count_spans(r) for r in reqs) for svc, reqs in requests_by_service.items()}

    # One instance fed everything.
    single = BackflowProcess(redis_server.url, *FLAGS, prefix="single").start()
    try:
        send_lanes({svc: single.grpc_target for svc in requests_by_service}, requests_by_service)
        _settle(single, sum(spans.values()))
    finally:
        assert single.stop() == 0, single.log

    # Two instances, one prefix, each fed the services the ring gives it.
    log = WriteLog(redis_server.url, "split")
    names = [f"backflow-{i}" for i in range(2)]
    instances = []
    try:
        for name in names:
            instances.append(BackflowProcess(f"{redis_server.url}?client_name={name}", *FLAGS,
                                             prefix="split").start())
        send_lanes({svc: instances[i].grpc_target for svc, i in owner.items()}, requests_by_service)
        metrics = [_settle(bf, sum(n for svc, n in spans.items() if owner[svc] == i))
                   for i, bf in enumerate(instances)]
    finally:
        codes = [bf.stop() for bf in instances]
        log.close()
    assert codes == [0, 0], [bf.log for bf in instances]

    events1, keys1, baselines1 = _published(redis_client, "single")
    events2, keys2, baselines2 = _published(redis_client, "split")
    assert any(dict(e)["type"] != "first_seen" for e in events1), "the scenario should raise regressions"
    assert events2 == events1
    assert keys2 == keys1 and len(keys1) >= 12
    assert baselines2 == baselines1

    # Each location's baseline, announcement and checkpoint field, and each service's
    # checkpoint field, was written by exactly the instance its service is routed to.
    assert not log.unnamed, log.unnamed[:3]
    service_of = {k: b["service.name"] for k, b in baselines2.items()}
    expected_writer = {k: names[owner[svc]] for k, svc in service_of.items()}
    assert {k: w for k, w in log.baselines.items()} == {k: {w} for k, w in expected_writer.items()}
    assert {k: w for k, w in log.announced.items()} == {k: {w} for k, w in expected_writer.items()}
    state_fields = set(redis_client.hkeys("split:state"))
    assert state_fields == set(redis_client.hkeys("single:state"))
    assert set(log.state_fields) == state_fields
    for field, writers in log.state_fields.items():
        kind, _, rest = field.partition(":")
        svc = service_of[rest] if kind == "loc" else rest.split(":", 1)[1]
        assert writers == {names[owner[svc]]}, (field, writers)
    # In memory too, each instance held the locations of its own services only.
    for i, m in enumerate(metrics):
        assert m["backflow_active_keys"] == sum(1 for svc in service_of.values() if owner[svc] == i)
