"""Redis going away and coming back, and SIGTERM: nothing Backflow took is lost silently.

Each test runs its own redis-server, so it can stop and restart it (same port, same data
directory: what was written before the outage is still there afterwards).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import pytest
import redis

from processor.devtools.redis_server import RedisServer
from tests.conftest import BackflowProcess
from tests.otlp import S, encoded

pytestmark = pytest.mark.e2e  # starts redis-server and backflow serve (docs/testing.md)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
OUTAGE_S = float(os.environ.get("BACKFLOW_OUTAGE_SECONDS", "30"))  # the 30 s


class Sender:
    """Sends, every ``period`` seconds, one span of a function not seen before (each brings
    one first_seen event when its 1 s window closes) and a few of a steady one."""

    def __init__(self, target: str, period: float = 0.25):
        self.channel = grpc.insecure_channel(target)
        self.export = self.channel.unary_unary(EXPORT)
        self.period = period
        self.functions: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[Exception] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            fn = f"shop.new_{len(self.functions)}"
            now = time.time_ns()
            try:
                self.export(encoded([S(now, function=fn)] + [S(now - i, function="shop.steady") for i in range(5)]),
                            timeout=10)
                self.functions.append(fn)
            except grpc.RpcError as e:
                self.errors.append(e)
            self._stop.wait(self.period)

    def __enter__(self) -> "Sender":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.channel.close()


def _first_seen_in_stream(url: str, prefix: str) -> list[str]:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [f["code.function.name"] for _, f in r.xrange(f"{prefix}:events")
                if f["type"] == "first_seen" and f["code.function.name"].startswith("shop.new_")]
    finally:
        r.close()


def _outage(tmp_path, outage_s: float, *flags: str) -> dict:
    """Spans flowing, Redis stopped for ``outage_s``, then started again on the same port and
    data; what Backflow said meanwhile, and what reached Redis in the end."""
    srv = RedisServer(data_dir=str(tmp_path / "redis")).start()
    bf = BackflowProcess(srv.url, "--window", "1", "--allowed-lateness", "0", "--idle-timeout", "1",
                         *flags).start()
    out = {}
    try:
        with Sender(bf.grpc_target) as sender:
            time.sleep(3)
            srv.stop()
            t0 = time.monotonic()
            bf.wait_for(lambda: bf.metrics()["backflow_redis_up"] == 0, what="Redis seen down")
            time.sleep(max(0.0, outage_s - (time.monotonic() - t0)))
            out["healthz"] = (bf.http_status("/healthz"), bf.http_body("/healthz"))
            out["pending"] = bf.metrics()["backflow_redis_pending_writes"]
            srv = RedisServer(port=srv.port, data_dir=srv.dir).start()
            time.sleep(2)
        assert not sender.errors, sender.errors[:3]
        out["sent"] = sender.functions
        bf.wait_for(lambda: (lambda m: m["backflow_redis_pending_writes"] == 0 and m["backflow_open_windows"] == 0)(
            bf.metrics()), timeout=30, what="the buffer delivered")
        out["metrics"] = bf.metrics()
        out["healthz_after"] = bf.http_body("/healthz")
        out["seen"] = _first_seen_in_stream(srv.url, "backflow")
    finally:
        bf.stop()
        srv.stop()
    out["log"] = bf.log
    return out


def test_an_outage_loses_no_event_and_delivers_them_in_order(tmp_path):
    out = _outage(tmp_path, OUTAGE_S)
    status, body = out["healthz"]
    assert status == 200 and body.startswith("degraded: Redis unreachable"), body
    assert out["pending"] > 0 and out["healthz_after"].strip() == "ok"
    assert len(out["sent"]) >= OUTAGE_S * 2  # spans kept coming during the outage
    # Every function sent got its first_seen, once, in the order the windows closed.
    assert out["seen"] == out["sent"]
    assert out["metrics"]["backflow_redis_dropped_writes_total"] == 0
    assert "Redis write failed" in out["log"]


def test_a_full_buffer_drops_the_oldest_events_and_counts_them(tmp_path):
    out = _outage(tmp_path, 8, "--redis-buffer", "5")
    sent, seen = out["sent"], out["seen"]
    lost = [fn for fn in sent if fn not in seen]
    assert len(lost) > 0, "the outage should overflow a 5-event buffer"
    assert out["metrics"]["backflow_redis_dropped_writes_total"] == len(lost)
    assert seen == [fn for fn in sent if fn not in lost]  # the rest, in order, once each


def _send(target: str, spans: list[S]) -> None:
    with grpc.insecure_channel(target) as ch:
        ch.unary_unary(EXPORT)(encoded(spans), timeout=10)


def test_sigterm_closes_the_open_windows_checkpoints_and_exits(backflow, redis_client):
    bf = backflow("--window", "60", "--idle-timeout", "1000")
    now = time.time_ns()
    _send(bf.grpc_target, [S(now - i, function=f"shop.f{i % 3}") for i in range(30)])
    bf.wait_for(lambda: bf.metrics()["backflow_processed_spans_total"] == 30, what="spans processed")
    assert bf.metrics()["backflow_open_windows"] == 1
    t0 = time.monotonic()
    assert bf.stop(sig=signal.SIGTERM) == 0, bf.log
    assert time.monotonic() - t0 < 20
    firsts = {f["code.function.name"] for _, f in redis_client.xrange("backflow:events") if f["type"] == "first_seen"}
    assert firsts == {"shop.f0", "shop.f1", "shop.f2"}
    assert sorted(redis_client.hkeys("backflow:state"))[-1].startswith("svc:")
    assert len([k for k in redis_client.hkeys("backflow:state") if k.startswith("loc:")]) == 3
    again = backflow("--window", "60", "--idle-timeout", "1000")
    # The window closed early by the stop takes the spans that come after the restart (a
    # second part of it, not late ones), and the baseline counts both parts.
    _send(again.grpc_target, [S(now + 1 + i, function="shop.f0") for i in range(7)])
    again.wait_for(lambda: again.metrics()["backflow_processed_spans_total"] == 7, what="spans processed")
    assert again.metrics()["backflow_restored_locations"] == 3  # (the service's, at its first span)
    assert again.metrics()["backflow_late_spans_total"] == 0
    assert again.stop() == 0
    counts = {f["code.function.name"]: f for f in [redis_client.hgetall(f"backflow:baseline:{k}")
                                                     for k in redis_client.smembers("backflow:keys")]}
    assert counts["shop.f0"]["count"] == str(10 + 7) and counts["shop.f0"]["windows"] == "2"


def test_sigterm_with_redis_away_exits_by_the_deadline(tmp_path):
    with RedisServer() as srv:
        bf = BackflowProcess(srv.url, "--window", "60", "--shutdown-timeout", "3").start()
        try:
            _send(bf.grpc_target, [S(time.time_ns() - i, function=f"shop.f{i}") for i in range(20)])
            bf.wait_for(lambda: bf.metrics()["backflow_processed_spans_total"] == 20, what="spans processed")
            srv.stop()
            t0 = time.monotonic()
            code = bf.stop(sig=signal.SIGTERM)
            took = time.monotonic() - t0
        finally:
            bf.stop()
    assert code == 1  # it says that it could not deliver everything...
    assert "Redis writes not delivered" in bf.log
    assert took < 3 + 3  # ...and does not wait past the deadline (plus process teardown)


def test_a_burst_of_new_locations_beyond_the_buffer_is_written_whole_while_redis_is_up(redis_server):
    # 3,000 first_seen events from one window against a 50-event buffer: a burst, not an
    # outage. The pipeline waits for Redis instead of dropping.
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    bf = BackflowProcess(redis_server.url, "--window", "1", "--allowed-lateness", "0", "--idle-timeout", "1",
                         "--redis-buffer", "50").start()
    try:
        now = time.time_ns()
        _send(bf.grpc_target, [S(now - i, function=f"shop.new_{i}") for i in range(3000)])
        bf.wait_for(lambda: (lambda m: m["backflow_processed_spans_total"] == 3000
                             and m["backflow_open_windows"] == 0 and m["backflow_redis_pending_writes"] == 0)(
            bf.metrics()), timeout=60, what="the burst written")
        m = bf.metrics()
    finally:
        bf.stop()
    seen = _first_seen_in_stream(redis_server.url, "backflow")
    assert sorted(seen) == sorted(f"shop.new_{i}" for i in range(3000)) and len(set(seen)) == 3000
    assert m["backflow_redis_dropped_writes_total"] == 0
    assert m["backflow_redis_backpressure_seconds_total"] > 0


def test_a_redis_that_comes_back_empty_gets_what_the_process_holds_again(tmp_path):
    srv = RedisServer().start()  # no data kept: a restart comes back empty
    bf = BackflowProcess(srv.url, "--window", "1", "--allowed-lateness", "0", "--idle-timeout", "1").start()
    once = [f"shop.once_{i}" for i in range(20)]
    try:
        now = time.time_ns()
        _send(bf.grpc_target, [S(now - i, function=fn) for i, fn in enumerate(once)])
        bf.wait_for(lambda: (lambda m: m["backflow_open_windows"] == 0 and m["backflow_redis_pending_writes"] == 0
                             and m["backflow_checkpoint_fields_total"] > 0)(bf.metrics()),
                    timeout=30, what="the first windows written")
        srv.stop()
        srv = RedisServer(port=srv.port).start()  # same address, nothing in it
        r = redis.Redis.from_url(srv.url, decode_responses=True)
        # Only a steady function keeps sending: the others' baselines come back only if the
        # process notices that Redis lost them.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and r.scard("backflow:keys") < len(once) + 1:
            _send(bf.grpc_target, [S(time.time_ns(), function="shop.steady")])
            time.sleep(0.3)
        bf.wait_for(lambda: bf.metrics()["backflow_redis_pending_writes"] == 0, timeout=30, what="written")
        m = bf.metrics()
        keys = r.smembers("backflow:keys")
        baselines = [k for k in r.scan_iter("backflow:baseline:*")]
        state = r.hkeys("backflow:state")
    finally:
        bf.stop()
        srv.stop()
    assert len(keys) == len(once) + 1  # the key set: every location, not only the one still sending
    assert len(baselines) == len(once) + 1
    assert sum(f.startswith("loc:") for f in state) == len(once) + 1  # the checkpoint again
    assert m["backflow_redis_republished_total"] == 1
    assert "Redis lost what it held" in bf.log


def _kill_during_outage(tmp_path, *flags: str, stall: bool = False) -> dict:
    """Spans flowing, Redis stopped (or, with ``stall``, stalled with SIGSTOP), the process
    killed (-9) 8 s (6 s) into the outage; Redis back on the same data, and the process
    started again with the same flags."""
    srv = RedisServer(data_dir=str(tmp_path / "redis")).start()
    common = ("--window", "1", "--allowed-lateness", "0", "--idle-timeout", "1", *flags)
    bf = BackflowProcess(srv.url, *common).start()
    out = {}
    try:
        with Sender(bf.grpc_target, period=0.2) as sender:
            time.sleep(3)
            if stall:
                os.kill(srv.proc.pid, signal.SIGSTOP)
            else:
                srv.stop()
                bf.wait_for(lambda: bf.metrics()["backflow_redis_up"] == 0, what="Redis seen down")
            outage_from = len(sender.functions)
            time.sleep(6 if stall else 8)
            bf.proc.kill()
            bf.proc.wait()
            sent = list(sender.functions)
        out["outage_sent"] = sent[outage_from:]
        if stall:
            os.kill(srv.proc.pid, signal.SIGCONT)
        else:
            srv = RedisServer(port=srv.port, data_dir=srv.dir).start()
        bf = BackflowProcess(srv.url, *common).start()
        bf.wait_for(lambda: bf.metrics()["backflow_redis_pending_writes"] == 0, timeout=30, what="delivered")
        time.sleep(1)
        out["sent"], out["seen"] = sent, _first_seen_in_stream(srv.url, "backflow")
        r = redis.Redis.from_url(srv.url, decode_responses=True)
        ids = [f["id"] for _, f in r.xrange("backflow:events")]
        out["duplicate_ids"] = len(ids) - len(set(ids))
    finally:
        bf.stop()
        if stall:
            os.kill(srv.proc.pid, signal.SIGCONT)
        srv.stop()
    out["log"] = bf.log
    return out


def test_kill_9_during_an_outage_loses_only_the_open_window_with_a_spool(tmp_path):
    out = _kill_during_outage(tmp_path, "--spool-dir", str(tmp_path / "spool"))
    lost = [fn for fn in out["sent"] if fn not in out["seen"]]
    assert len(out["outage_sent"]) >= 30
    # At most the last two seconds' functions (the open window and the one closing) are lost.
    assert len(lost) <= 10 and set(lost) <= set(out["sent"][-10:]), lost
    assert out["duplicate_ids"] == 0
    assert "kept in the spool while Redis was away" in out["log"]


def test_kill_9_while_redis_is_stalled_loses_only_the_open_window_with_a_spool(tmp_path):
    # A stalled Redis (SIGSTOP) does not refuse writes, it leaves them unanswered: the
    # windows closed meanwhile must reach the spool within a second, not wait in memory for
    # the socket to time out, or kill -9 loses them.
    out = _kill_during_outage(tmp_path, "--spool-dir", str(tmp_path / "spool"), stall=True)
    sent = out["sent"]
    lost = [fn for fn in sent if fn not in out["seen"]]
    assert len(out["outage_sent"]) >= 25
    # The open window, the one closing and the last second's unanswered write: 3 s at most.
    assert len(lost) <= 15 and set(lost) <= set(sent[-15:]), (len(out["outage_sent"]), lost)
    assert out["duplicate_ids"] == 0


def test_kill_9_during_an_outage_without_a_spool_loses_what_waited_in_memory(tmp_path):
    out = _kill_during_outage(tmp_path)
    lost = [fn for fn in out["sent"] if fn not in out["seen"]]
    assert len(lost) >= len(out["outage_sent"]) - 10  # the documented cost of no --spool-dir


def test_sigterm_with_redis_away_and_a_spool_keeps_everything_for_the_next_start(tmp_path):
    spool = str(tmp_path / "spool")
    srv = RedisServer(data_dir=str(tmp_path / "redis")).start()
    flags = ("--window", "60", "--shutdown-timeout", "10", "--spool-dir", spool)
    bf = BackflowProcess(srv.url, *flags).start()
    try:
        _send(bf.grpc_target, [S(time.time_ns() - i, function=f"shop.f{i}") for i in range(20)])
        bf.wait_for(lambda: bf.metrics()["backflow_processed_spans_total"] == 20, what="spans processed")
        srv.stop()
        code = bf.stop(sig=signal.SIGTERM)  # closes the open window: its writes go to the spool
        assert code == 0 and "wait in" in bf.log, bf.log
        srv = RedisServer(port=srv.port, data_dir=srv.dir).start()
        bf = BackflowProcess(srv.url, *flags).start()
        r = redis.Redis.from_url(srv.url, decode_responses=True)
        bf.wait_for(lambda: r.xlen("backflow:events") >= 20, what="the spooled events")
        calls = sum(json.loads(v)["calls"] for k in r.scan_iter("backflow:versions:*") for v in r.hvals(k))
        assert calls == 20 and r.scard("backflow:keys") == 20  # every span's figures, once
        assert sum(f.startswith("loc:") for f in r.hkeys("backflow:state")) == 20  # and the checkpoint
    finally:
        bf.stop()
        srv.stop()
