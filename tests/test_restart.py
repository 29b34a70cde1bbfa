"""kill -9 and a restart: detection goes on from the checkpoint in Redis, as if nothing
had happened, when the kill comes after the windows closed (what was open is lost)."""

from __future__ import annotations

import signal

from processor.receiver.decode import count_spans
from tests.test_workers import _send_all, requests_by_service  # noqa: F401 (a fixture)

FLAGS = ("--window", "60", "--allowed-lateness", "5", "--idle-timeout", "2", "--checkpoint-interval", "0")


def _halves(requests_by_service):  # noqa: F811 (a plain argument, not the fixture)
    first = {s: reqs[: len(reqs) // 2] for s, reqs in requests_by_service.items()}
    second = {s: reqs[len(reqs) // 2:] for s, reqs in requests_by_service.items()}
    return first, second


def _send_and_settle(bf, requests: dict, spans_before: int) -> int:
    """Send, then wait until every span is processed, every window closed (idle flush) and
    every write, checkpoint included, is in Redis."""
    _send_all(bf.grpc_target, requests)
    total = spans_before + sum(count_spans(r) for reqs in requests.values() for r in reqs)

    def settled():
        m = bf.metrics()
        return (m["backflow_processed_spans_total"] == total and m["backflow_open_windows"] == 0
                and m["backflow_redis_pending_writes"] == 0 and m["backflow_checkpoint_fields_total"] > 0)
    bf.wait_for(settled, timeout=60, what="spans processed, windows closed, writes done")
    return total


def _published(redis_client, prefix: str):
    events = [(f["id"], f["type"], f["key"], f["window.end"], f["service.version"], f["summary"])
              for _, f in redis_client.xrange(f"{prefix}:events")]
    keys = redis_client.smembers(f"{prefix}:keys")
    return events, {k: redis_client.hgetall(f"{prefix}:baseline:{k}") for k in keys}


def test_kill_9_and_restart_goes_on_where_it_stopped(backflow, redis_client, requests_by_service):  # noqa: F811
    first, second = _halves(requests_by_service)

    straight = backflow(*FLAGS, prefix="straight")
    spans = _send_and_settle(straight, first, 0)
    _send_and_settle(straight, second, spans)
    assert straight.stop() == 0, straight.log
    events, baselines = _published(redis_client, "straight")

    killed = backflow(*FLAGS, prefix="killed")
    _send_and_settle(killed, first, 0)
    before, learned = _published(redis_client, "killed")
    assert redis_client.hlen("killed:state") > 0
    killed.stop(sig=signal.SIGKILL)
    assert killed.proc.returncode == -signal.SIGKILL

    restarted = backflow(*FLAGS, prefix="killed")
    assert restarted.metrics()["backflow_restored_locations"] == 0  # (read at a service's first span)
    _send_and_settle(restarted, second, 0)
    assert restarted.metrics()["backflow_restored_locations"] == len(learned) > 0
    assert restarted.stop() == 0, restarted.log
    after, baselines_after = _published(redis_client, "killed")

    regressions = [e for e in set(events) - set(before) if e[1] != "first_seen"]
    assert regressions, "the second half should raise regressions, which need the learned baselines"
    # (services are sent side by side, so their events interleave differently run to run)
    assert sorted(after) == sorted(events)  # no first_seen again, nothing missed, nothing twice
    assert baselines_after == baselines

    # What this relies on: the second half's events depend on what the first half taught,
    # so a restart that lost the checkpoint publishes other ones.
    lost = backflow(*FLAGS, prefix="lost")
    _send_and_settle(lost, first, 0)
    lost.stop(sig=signal.SIGKILL)
    redis_client.delete("lost:state")
    again = backflow(*FLAGS, prefix="lost")
    _send_and_settle(again, second, 0)
    assert again.metrics()["backflow_restored_locations"] == 0
    again.stop()
    relearned, _ = _published(redis_client, "lost")
    assert sorted(relearned) != sorted(events)


def test_a_process_reads_the_checkpoints_of_its_own_services_only_and_at_their_first_span(
        backflow, redis_client):
    """Restoring is per service, when its first span comes: a process holds the checkpoints of
    the services it is sent, not of every service under the prefix, and while one service's
    checkpoint is read (Redis paused here), the others' windows go on closing."""
    import grpc

    from tests.otlp import S, encoded

    flags = ("--window", "1", "--allowed-lateness", "0", "--idle-timeout", "1000", "--checkpoint-interval", "0")
    t0 = 1_700_000_000 * 10**9
    sec = 10**9

    def send(bf, spans):
        with grpc.insecure_channel(bf.grpc_target) as ch:
            ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")(encoded(spans), timeout=30)

    def spans(service, functions, seconds, start=0):
        return [S(t0 + (start + s) * sec + i, service=service, function=f"{service}.f{i}")
                for s in range(seconds) for i in range(functions)]

    # One process learns four services, and checkpoints them.
    first = backflow(*flags, prefix="lazy")
    sizes = {"a": 2, "b": 3, "c": 4, "d": 5}
    for service, n in sizes.items():
        send(first, spans(service, n, 3))
    first.wait_for(lambda: first.metrics()["backflow_processed_spans_total"] == 3 * sum(sizes.values()),
                   what="spans processed")
    assert first.stop() == 0, first.log
    assert len([k for k in redis_client.hkeys("lazy:state") if k.startswith("loc:")]) == sum(sizes.values())

    # Another process on the prefix is sent services a and b only: it reads theirs, no more.
    second = backflow(*flags, prefix="lazy")
    send(second, spans("a", 2, 2, start=10))
    m = second.wait_for(lambda: (m := second.metrics())["backflow_restored_locations"] == 2
                        and m["backflow_processed_spans_total"] == 4 and m, what="service a restored, its spans taken")
    assert m["backflow_active_keys"] == 2
    # While Redis is paused, b's first spans wait for its checkpoint; a's windows go on closing.
    closed = m["backflow_windows_closed_total"]
    redis_client.execute_command("CLIENT", "PAUSE", 6000, "ALL")
    send(second, spans("b", 3, 2, start=10))
    send(second, spans("a", 2, 3, start=12))
    # (both counters: a scrape may fall between the windows' count and the spans')
    during = second.wait_for(lambda: (m := second.metrics())["backflow_windows_closed_total"] >= closed + 2
                             and m["backflow_processed_spans_total"] == 2 * 2 + 2 * 3 and m,
                             timeout=5, what="a's windows closed and its spans taken while b's checkpoint is read")
    assert during["backflow_restored_locations"] == 2  # (b's not read yet: its spans held, none lost)
    after = second.wait_for(lambda: (m := second.metrics())["backflow_processed_spans_total"] == 4 + 6 + 6 and m,
                            timeout=30, what="b's spans processed once its checkpoint came")
    assert after["backflow_restored_locations"] == 2 + 3 and after["backflow_active_keys"] == 5
    assert after["backflow_late_spans_total"] == 0
    assert second.stop() == 0, second.log
    # b's locations were not new: no second first_seen for them
    firsts = [f["code.function.name"] for _, f in redis_client.xrange("lazy:events") if f["type"] == "first_seen"]
    assert sorted(firsts) == sorted(f"{s}.f{i}" for s, n in sizes.items() for i in range(n))


def test_the_restorer_reads_a_service_s_fields_and_old_style_ones_from_one_scan(redis_server, redis_client):
    """A svc: field written before it named its locations: the service's fields come from one
    read of the whole hash; a location named by another service's field is not loaded."""
    from processor.config import Config
    from processor.pipeline import checkpoint
    from processor.pipeline.engine import Engine
    from processor.receiver.decode import Batch
    from processor.pipeline.location import Location
    from processor.service import Restorer
    from processor.sinks.redis_streams import RedisSink
    import numpy as np
    import redis

    engine = Engine(Config.defaults(window=60.0, allowed_lateness=0.0), clock=lambda: 0.0)
    t0 = 1_700_000_000 * 10**9
    for service in ("a", "b"):
        locs = [Location("prod", service, f"{service}.f{i}") for i in range(3)]
        end = t0 + np.arange(30, dtype=np.int64) * 10**9
        engine.ingest(Batch(locs, [(service, "1.0", "")], (np.arange(30) % 3).astype(np.int32),
                            np.zeros(30, np.int32), end - 10**6, end, np.zeros(30, bool),
                            np.full((30, 16), 3, np.uint8)))
    engine.flush_all()
    fields = checkpoint.dumps_dirty(engine)
    old_style = dict(fields)
    for name in [n for n in fields if n.startswith("svc:")]:
        state = checkpoint.decode(name, fields[name])
        state.locations = None  # (as written before svc: fields named their locations)
        old_style[name] = checkpoint.encode_service(state)
    redis_client.hset("old:state", mapping=old_style)
    client = redis.Redis.from_url(redis_server.url)
    restorer = Restorer(RedisSink(client, "old", 1000, 1000))
    got = restorer.read(("prod", "a"))
    assert sorted(got) == sorted(n for n in fields if n == "svc:prod:a" or (
        n.startswith("loc:") and checkpoint.decode(n, fields[n]).location.service == "a"))
    assert len(got) == 4 and ("prod", "b") in restorer._legacy  # (b's from the same read, kept for it)
    assert restorer.read(("prod", "b")).keys() - got.keys() and ("prod", "b") not in restorer._legacy
    # a restore loads the service's own fields only, whatever else it is handed
    fresh = Engine(Config.defaults(window=60.0, allowed_lateness=0.0), clock=lambda: 0.0)
    assert checkpoint.restore(fresh, fields, only=("prod", "a")).locations == 3
