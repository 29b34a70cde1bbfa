"""The aggregate replica's Forwarder against a real gRPC server standing for the detect
replica: order kept across memory and the spool, past the memory bound and across a
restart, and nothing lost when the detect replica is away at exit."""

import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (ExportMetricsServiceRequest,
                                                                           ExportMetricsServiceResponse)

from processor.devtools.redis_server import free_port
from processor.pipeline.tiers import sequenced
from processor.sinks.forward import Forwarder, spool_name
from processor.sinks.spool import Spool

_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


class Detect:
    """A gRPC server taking Export calls: the (session, number) of each request taken, in
    order; UNAVAILABLE while ``away``."""

    def __init__(self):
        self.away = threading.Event()
        self.away_after: int | None = None  # (away once that many are taken)
        self.taken: list[tuple[int, int]] = []
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        handler = grpc.unary_unary_rpc_method_handler(
            self._export, request_deserializer=ExportMetricsServiceRequest.FromString,
            response_serializer=ExportMetricsServiceResponse.SerializeToString)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.metrics.v1.MetricsService", {"Export": handler})])
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"

    def _export(self, request, context):
        if self.away_after is not None and len(self.taken) >= self.away_after:
            self.away.set()
        if self.away.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "away")
        attrs = {kv.key: kv.value.int_value for rm in request.resource_metrics for kv in rm.resource.attributes}
        self.taken.append((attrs["backflow.session"], attrs["backflow.sequence"]))
        return ExportMetricsServiceResponse()

    def stop(self):
        self.server.stop(0)


@pytest.fixture
def detect():
    d = Detect()
    yield d
    d.stop()


def _requests(n: int, size: int = 1000) -> list[tuple[bytes, int]]:
    req = ExportMetricsServiceRequest()
    req.resource_metrics.add().scope_metrics.add().metrics.add(name="x" * size)
    return [(req.SerializeToString(), 1)] * n


def _wait(predicate, what: str, timeout: float = 20.0):
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        done.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_past_the_memory_bound_requests_go_to_the_spool_and_come_back_in_order(detect, tmp_path):
    spool = Spool(str(tmp_path), 1 << 20, spool_name(detect.target))
    f = Forwarder(detect.target, "agg-0", max_bytes=3000, spool=spool)
    detect.away.set()
    f.start()
    for _ in range(20):  # one at a time, as windows close
        f.submit(_requests(1))
    assert f.pending() == 20 and spool.size > 0 and f.bytes <= 3000 + 1100  # (memory stops at the bound)
    assert f.has_room()  # (the spool takes the rest: no push back yet)
    detect.away.clear()
    _wait(lambda: f.pending() == 0, "everything taken")
    assert detect.taken == [(f.session, n) for n in range(20)]
    assert spool.size == 0 and f.stop(5)


def test_without_a_spool_the_receivers_push_back_at_the_bound(detect):
    f = Forwarder(detect.target, "agg-0", max_bytes=3000)
    detect.away.set()
    f.start()
    f.submit(_requests(5))
    assert f.pending() == 5 and not f.has_room()
    detect.away.clear()
    _wait(lambda: f.pending() == 0, "everything taken")
    assert f.has_room() and f.stop(5)


def test_what_waits_at_exit_is_kept_in_order_and_sent_first_at_the_next_start(detect, tmp_path):
    name = spool_name(detect.target)
    f = Forwarder(detect.target, "agg-0", max_bytes=3000, spool=Spool(str(tmp_path), 1 << 20, name))
    detect.away.set()
    f.start()
    for _ in range(6):
        f.submit(_requests(1))
    assert f.stop(0.5)  # (nothing taken, all kept: memory's first, then the spool's)
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o600  # (partials: readable by this user only)
    again = Forwarder(detect.target, "agg-0", max_bytes=3000, spool=Spool(str(tmp_path), 1 << 20, name))
    assert again.pending() == 6 and again.session != f.session
    again.submit(_requests(2))
    detect.away.clear()
    again.start()
    _wait(lambda: again.pending() == 0, "the earlier run's requests and this one's taken")
    assert detect.taken == [(f.session, n) for n in range(6)] + [(again.session, n) for n in range(2)]
    assert again.stop(5) and (tmp_path / name).stat().st_size == 0


def test_without_a_spool_what_waits_at_exit_is_reported_lost(detect, caplog):
    f = Forwarder(detect.target, "agg-0")
    detect.away.set()
    f.start()
    f.submit(_requests(3))
    assert not f.stop(0.5)
    assert "exiting with 3 requests of partials not taken" in caplog.text


def test_a_damaged_spool_record_ends_the_replay_there_and_is_logged(detect, tmp_path, caplog):
    name = spool_name(detect.target)
    spool = Spool(str(tmp_path), 1 << 20, name)
    for n in range(3):
        spool.append([sequenced(_requests(1)[0][0], "agg-0", 7, n), 1])  # (an earlier run's, session 7)
    whole = spool.size
    spool.close()
    data = bytearray((tmp_path / name).read_bytes())
    data[whole - 10] ^= 0xFF  # (in the third record's payload: its CRC no longer matches)
    (tmp_path / name).write_bytes(bytes(data))
    f = Forwarder(detect.target, "agg-0", spool=Spool(str(tmp_path), 1 << 20, name))
    assert f.pending() == 2  # (the whole records before the damage)
    f.start()
    _wait(lambda: f.pending() == 0, "the whole records taken")
    assert detect.taken == [(7, 0), (7, 1)] and f.stop(5)
    assert "record cut short" in caplog.text


def test_while_the_detect_replica_is_away_requests_are_on_disk_at_once(detect, tmp_path):
    """What a kill -9 would leave: a new process on the same spool finds every request made
    after the detect replica went away (the one being retried is memory's)."""
    name = spool_name(detect.target)
    f = Forwarder(detect.target, "agg-0", spool=Spool(str(tmp_path), 1 << 20, name))
    detect.away.set()
    f.start()
    f.submit(_requests(1))
    _wait(lambda: not f.reachable, "the detect replica seen away")
    f.submit(_requests(5))
    after_kill = Forwarder(detect.target, "agg-0", spool=Spool(str(tmp_path), 1 << 20, name))
    assert (after_kill.pending(), f.pending()) == (5, 6)  # (memory: the first request only)
    detect.away.clear()
    _wait(lambda: f.pending() == 0, "everything taken")
    assert detect.taken == [(f.session, n) for n in range(6)]


def test_a_full_spool_pushes_back(detect, tmp_path):
    f = Forwarder(detect.target, "agg-0", max_bytes=3000, spool=Spool(str(tmp_path), 3000, "s.log"))
    detect.away.set()
    f.start()
    f.submit(_requests(1))
    _wait(lambda: not f.reachable, "the detect replica seen away")
    for _ in range(3):
        assert f.has_room()
        f.submit(_requests(1))
    assert f.bytes < 3000 and not f.has_room()  # (memory holds one: the spool is what is full)
    detect.away.clear()
    _wait(lambda: f.pending() == 0, "everything taken")
    assert f.has_room() and len(detect.taken) == 4


def test_a_restart_while_the_spool_is_sent_goes_on_where_it_was(detect, tmp_path):
    name = spool_name(detect.target)
    spool = Spool(str(tmp_path), 1 << 20, name)
    for n in range(6):
        spool.append([sequenced(_requests(1)[0][0], "agg-0", 7, n), 1])
    detect.away_after = 3
    f = Forwarder(detect.target, "agg-0", spool=spool)
    f.start()
    _wait(lambda: not f.reachable, "three taken, then away")
    killed = Forwarder(detect.target, "agg-0", spool=Spool(str(tmp_path), 1 << 20, name))  # (as after kill -9)
    assert killed.pending() == 3
    f.stop(0)
    detect.away_after = None
    detect.away.clear()
    killed.start()
    _wait(lambda: killed.pending() == 0, "the other three taken")
    assert detect.taken == [(7, n) for n in range(6)] and killed.stop(5)


def test_a_failed_spool_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno
    import os
    spool = Spool(str(tmp_path), 1 << 20, "s.log")
    spool.append(["first"])
    real = os.write

    def half_then_full(fd, data):  # (a disk that fills up in the middle of a record)
        real(fd, bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        spool.append(["lost: not acknowledged"])
    monkeypatch.setattr(os, "write", real)
    spool.append(["third"])
    assert list(spool.records()) == [["first"], ["third"]] and spool.size == (tmp_path / "s.log").stat().st_size
