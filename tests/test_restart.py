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
    assert restarted.metrics()["backflow_restored_locations"] == len(learned) > 0
    _send_and_settle(restarted, second, 0)
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
    assert again.metrics()["backflow_restored_locations"] == 0
    _send_and_settle(again, second, 0)
    again.stop()
    relearned, _ = _published(redis_client, "lost")
    assert sorted(relearned) != sorted(events)
