"""Receiver processes (--workers N): the same spans give the same events and baselines as
one process, and the receivers' counters reach the main process's /metrics."""

import pytest

from benchmarks.scenarios import generate
from processor.receiver.decode import count_spans
from tests.lanes import requests_by_service as split_by_service, send_lanes


@pytest.fixture(scope="module")
def requests_by_service():
    """A scenario's requests, split per service: each service is sent in order on its own
    connection, services side by side (as independent SDKs would)."""
    return split_by_service(generate(5, services=2, functions_per_service=5, hours=4.5,
                                     rate=(4.0, 8.0), min_rate=3.0))


def _send_all(target: str, requests_by_service: dict[str, list[bytes]]) -> int:
    send_lanes({svc: target for svc in requests_by_service}, requests_by_service)
    return sum(len(reqs) for reqs in requests_by_service.values())


def _run(backflow, redis_client, requests_by_service, workers: int, prefix: str):
    bf = backflow("--workers", str(workers), "--window", "60", "--allowed-lateness", "5",
                  "--idle-timeout", "100000", prefix=prefix)
    n_requests = _send_all(bf.grpc_target, requests_by_service)
    spans = sum(count_spans(r) for reqs in requests_by_service.values() for r in reqs)

    def settled():
        m = bf.metrics()
        accepted = sum(v for k, v in m.items() if k.startswith("backflow_receiver_accepted_spans_total"))
        return m if accepted == spans == m["backflow_processed_spans_total"] else None
    metrics = bf.wait_for(settled, what="every span counted accepted and processed")
    assert bf.stop() == 0, bf.log
    events = sorted((f["type"], f["key"], f["window.end"], f["service.version"], f["summary"])
                    for _, f in redis_client.xrange(f"{prefix}:events"))
    keys = redis_client.smembers(f"{prefix}:keys")
    baselines = {k: redis_client.hgetall(f"{prefix}:baseline:{k}") for k in keys}
    return n_requests, metrics, events, baselines


def test_two_receiver_processes_give_what_one_gives(backflow, redis_client, requests_by_service):
    n1, m1, events1, baselines1 = _run(backflow, redis_client, requests_by_service, 1, "one")
    n2, m2, events2, baselines2 = _run(backflow, redis_client, requests_by_service, 2, "two")
    assert any(e[0] != "first_seen" for e in events1), "the scenario should raise regressions"
    assert events2 == events1
    assert baselines2 == baselines1 and len(baselines1) >= 10
    spans = sum(v for k, v in m1.items() if k.startswith("backflow_receiver_accepted_spans_total"))
    assert spans > 0
    # the receiver processes' counters are relayed to the main process's /metrics
    assert sum(v for k, v in m2.items() if k.startswith("backflow_receiver_accepted_spans_total")) == spans


def test_receiver_processes_refuse_a_port_already_taken(backflow, redis_client):
    first = backflow("--workers", "2")
    from tests.conftest import BackflowProcess
    second = BackflowProcess(first.args[first.args.index("--redis-url") + 1], "--workers", "2")
    second.grpc_port = first.grpc_port
    second.args[second.args.index("--otlp-grpc") + 1] = first.grpc_target
    with pytest.raises(RuntimeError, match="cannot start: --otlp-grpc .*Address already in use"):
        second.start()
