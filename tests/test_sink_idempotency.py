"""A batch sent again after its replies were lost writes nothing twice (docs/sinks.md).

Redis may execute a batch whose replies never reach the sink: the connection drops after
the request went through, or Redis stalls past the socket timeout and runs the batch once
it resumes. The sink (redis-py's retry, then its own) sends the batch again. These tests
make that happen against a real redis-server, with a TCP proxy that cuts connections at
chosen points and with SIGSTOP/SIGCONT, and check that every event id is in the stream
once, every version summary is one merge, and each event is counted once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
import redis

from processor.devtools.redis_server import RedisServer
from processor.events import Event
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures
from processor.sinks.idempotency import WRITTEN_TTL
from processor.sinks.redis_streams import RedisSink
from processor.sinks.versions import field_name

pytestmark = pytest.mark.e2e  # redis-server, stopped and cut off

W = 60_000_000_000
V = ("shop", "2.0", "rev-2")


class CuttingProxy:
    """Forwards TCP between the sink and redis-server and, for each pattern given, cuts
    the first connection whose request carries it, at one of three points:

    - ``"before-replies"``: the whole request reaches Redis, which runs it; its replies are
      swallowed and the connection closed once Redis has gone quiet;
    - ``"mid-replies"``: the first half of the first reply chunk gets through, then the cut;
    - ``"mid-request"``: half of the request chunk reaches Redis (which runs the commands
      complete in it), then the cut.
    """

    def __init__(self, upstream_port: int, mode: str, patterns: list[bytes]):
        self.upstream_port, self.mode = upstream_port, mode
        self.patterns = list(patterns)  # each cuts once
        self.cuts: list[bytes] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            conn = {"cut": False, "tail": b""}
            threading.Thread(target=self._requests, args=(client, upstream, conn), daemon=True).start()
            threading.Thread(target=self._replies, args=(client, upstream, conn), daemon=True).start()

    def _armed(self, conn: dict, chunk: bytes) -> bytes | None:
        seen = conn["tail"] + chunk
        conn["tail"] = seen[-64:]
        with self._lock:
            for p in self.patterns:
                if p in seen:
                    self.patterns.remove(p)
                    self.cuts.append(p)
                    return p
        return None

    @staticmethod
    def _shut(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _requests(self, client: socket.socket, upstream: socket.socket, conn: dict) -> None:
        try:
            while chunk := client.recv(65536):
                if not conn["cut"] and self._armed(conn, chunk):
                    conn["cut"] = True
                    if self.mode == "mid-request":
                        upstream.sendall(chunk[: len(chunk) // 2])
                        time.sleep(0.2)  # Redis runs what is complete in it
                        self._shut(client, upstream)
                        return
                upstream.sendall(chunk)
        except OSError:
            pass
        self._shut(client, upstream)

    def _replies(self, client: socket.socket, upstream: socket.socket, conn: dict) -> None:
        upstream.settimeout(0.3)
        swallowed = 0
        try:
            while True:
                try:
                    chunk = upstream.recv(65536)
                except TimeoutError:
                    if conn["cut"] and swallowed:  # Redis went quiet after running the request
                        break
                    continue
                if not chunk:
                    break
                if conn["cut"] and self.mode == "before-replies":
                    swallowed += len(chunk)
                    continue
                if conn["cut"] and self.mode == "mid-replies":
                    client.sendall(chunk[: len(chunk) // 2])
                    time.sleep(0.2)
                    break
                client.sendall(chunk)
        except OSError:
            pass
        self._shut(client, upstream)


def _location(i: int) -> Location:
    return Location("prod", "shop", f"shop.mod.f{i}", "shop/mod.py", str(i))


def _workload(n: int, start: int = 0):
    """n new locations: a first_seen and a latency_regression each, a baseline each, and one
    window with a version record each (calls i + 1, errors 1)."""
    locs = [_location(i) for i in range(start, start + n)]
    events = []
    for loc in locs:
        events.append(Event("first_seen", loc, V, 0, W, "info", f"first call of {loc.function}", {"count": 1}))
        events.append(Event("latency_regression", loc, V, 0, W, "warning", f"{loc.function} slower",
                            {"p99_ms": 12.5}))
    sk = LogSketch.from_values(np.full(2, 5_000_000))
    lws = [LocationWindow(j, loc, 2 + j, 1, sk, [VersionFigures(V, 2 + j, 1, sk)]) for j, loc in enumerate(locs)]
    baselines = [(loc.key, {"count": str(2 + j)}) for j, loc in enumerate(locs)]
    return locs, events, baselines, ClosedWindow("shop", 0, W, lws, "prod")


def _check_written_once(client: redis.Redis, locs, events, written, prefix: str = "t") -> None:
    stream = client.xrange(f"{prefix}:events")
    ids = [f[b"id"].decode() for _, f in stream]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} event ids written twice"
    assert sorted(ids) == sorted(e.id for e in events)
    # counted once each, whichever attempt wrote it
    assert sorted(written) == sorted(e.type for e in events)
    assert client.scard(f"{prefix}:keys") == len(locs)
    for j, loc in enumerate(locs):
        raw = client.hget(f"{prefix}:versions:{loc.key}", field_name(V[1], V[2]))
        assert raw is not None, loc.key
        v = json.loads(raw)
        assert (v["calls"], v["errors"], v["windows"], v["seconds"]) == (2 + j, 1, 1, 60), (loc.key, v)
    # the markers of merges and first_seen events are gone once acknowledged; those of
    # other events stay, with their TTL
    assert not client.keys(f"{prefix}:written:merge:*")
    markers = client.keys(f"{prefix}:written:event:*")
    assert len(markers) == sum(e.type != "first_seen" for e in events)
    assert 0 < client.ttl(markers[0]) <= WRITTEN_TTL


@pytest.mark.parametrize("mode", ["before-replies", "mid-replies", "mid-request"])
def test_a_batch_cut_off_after_redis_took_it_is_written_once(redis_server, mode):
    direct = redis.Redis.from_url(redis_server.url)
    direct.flushall()
    # cut the first batch of events, of baselines and of version merges, and a later one
    patterns = [b"latency_regression", b"t:baseline:", b"t:versions:", b"shop.mod.f70"]
    proxy = CuttingProxy(redis_server.port, mode, patterns)
    client = redis.Redis(port=proxy.port, socket_timeout=2, socket_connect_timeout=2)
    written: list[str] = []
    sink = RedisSink(client, "t", 100_000, buffer_limit=10_000, on_event_written=written.append,
                     batch_size=40, trend_period=86400, trend_points=24)
    locs, events, baselines, window = _workload(80)
    sink.submit(events, baselines, window)
    sink.start()
    try:
        assert sink.flush(60)
    finally:
        sink.stop(1)
        proxy.close()
    assert sorted(proxy.cuts) == sorted(patterns)  # every cut happened
    _check_written_once(direct, locs, events, written)
    from processor.report import trend  # the trend's points merge with the summaries: once

    assert [[p.calls for p in trend.read(direct, "t", loc.key)[(V[1], V[2])]] for loc in locs] == [
        [2 + j] for j in range(len(locs))]


@pytest.mark.parametrize("in_flight", ["events", "merges"])
def test_a_redis_stall_longer_than_the_socket_timeout_writes_nothing_twice(in_flight):
    """Redis stopped (SIGSTOP) with a batch in flight, past the socket timeout: the sink
    gives up on the batch and sends it again; Redis, resumed, runs both."""
    srv = RedisServer().start()
    client = redis.Redis(port=srv.port, socket_timeout=0.5, socket_connect_timeout=0.5)
    written: list[str] = []
    sink = RedisSink(client, "t", 100_000, buffer_limit=10_000, on_event_written=written.append,
                     batch_size=100)
    locs, events, baselines, window = _workload(60)
    sink.start()
    try:
        if in_flight == "events":
            sink.submit(events[:2], [], window)
            during = (events[2:], baselines)
        else:
            sink.submit(events, baselines)
            during = ([], [], window)
        assert sink.flush(10)  # the sink's pooled connection is open
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            sink.submit(*during)
            time.sleep(2.0)  # four socket timeouts
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert sink.flush(30)
        _check_written_once(client, locs, events, written)
    finally:
        sink.stop(1)
        srv.stop()
