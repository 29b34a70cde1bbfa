"""{prefix}:versions:{key}: the Redis sink keeps one summary per code location and version
(processor/sinks/versions.py), merged window by window, bounded, and kept through outages."""

import json

import numpy as np
import pytest
import redis

from processor.devtools.redis_server import RedisServer
from processor.pipeline.location import Location
from processor.sinks import versions as versions_mod
from processor.sinks.redis_streams import RedisSink
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures

LOC = Location("prod", "shop", "shop.checkout.Checkout.total", "shop/checkout.py", "12")
W = 60_000_000_000


def window(i: int, per_version: dict[str, tuple[list[float], int]]) -> ClosedWindow:
    """Window i of LOC: {version: (latencies in ms, errors)}."""
    figs, count, errors, sketch = [], 0, 0, LogSketch()
    for version, (ms, errs) in per_version.items():
        sk = LogSketch.from_values((np.asarray(ms) * 1e6).astype(np.int64))
        figs.append(VersionFigures(("shop", version, f"rev-{version}"), len(ms), errs, sk))
        count, errors, sketch = count + len(ms), errors + errs, sketch.merge(sk)
    return ClosedWindow("shop", i * W, (i + 1) * W, [LocationWindow(0, LOC, count, errors, sketch, figs)], "prod")


def summaries(client, prefix="t"):
    return {tuple(json.loads(k)): json.loads(v) for k, v in client.hgetall(f"{prefix}:versions:{LOC.key}").items()}


@pytest.fixture
def sink(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    s = RedisSink(client, "t", 1000, buffer_limit=100)
    s.start()
    yield s, client
    s.stop(1)


def test_windows_of_one_version_add_up_calls_errors_and_time_and_weight_quantiles_by_calls(sink):
    s, client = sink
    s.submit([], [], window(0, {"1.0": ([10.0] * 30, 3)}))
    assert s.flush(10)
    s.submit([], [], window(1, {"1.0": ([30.0] * 10, 0)}))
    assert s.flush(10)
    v = summaries(client)[("1.0", "rev-1.0")]
    assert (v["calls"], v["errors"], v["windows"], v["seconds"]) == (40, 3, 2, 120)
    assert (v["first"], v["last"]) == (0, 2 * W // 1_000_000)
    assert v["p50_ms"] == pytest.approx((10 * 30 + 30 * 10) / 40, rel=0.011)
    assert v["p99_ms"] == pytest.approx((10 * 30 + 30 * 10) / 40, rel=0.011)


def test_versions_serving_side_by_side_get_a_record_each(sink):
    s, client = sink
    s.submit([], [], window(0, {"1.0": ([10.0] * 90, 0), "1.1": ([50.0] * 10, 5)}))
    assert s.flush(10)
    got = summaries(client)
    assert set(got) == {("1.0", "rev-1.0"), ("1.1", "rev-1.1")}
    assert got[("1.1", "rev-1.1")]["errors"] == 5 and got[("1.1", "rev-1.1")]["p50_ms"] == pytest.approx(50, rel=0.011)
    assert got[("1.0", "rev-1.0")]["calls"] == 90


def test_only_the_most_recently_seen_versions_are_kept(sink, monkeypatch):
    s, client = sink
    monkeypatch.setattr(versions_mod, "VERSIONS_KEPT", 3)
    for i in range(5):
        s.submit([], [], window(i, {f"1.{i}": ([10.0], 0)}))
        assert s.flush(10)
    assert {v for v, _ in summaries(client)} == {"1.2", "1.3", "1.4"}


@pytest.mark.e2e
def test_windows_closed_while_redis_is_away_are_summed_and_written_once_it_is_back():
    srv = RedisServer()
    client = redis.Redis(port=srv.port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
    s = RedisSink(client, "t", 1000, buffer_limit=100)
    try:
        for i in range(4):
            s.submit([], [], window(i, {"1.0": ([10.0] * 5, 1)}))
        # Started after the four windows were noted: a record taken for a write that fails
        # while more windows arrive would count twice in pending() until it is put back.
        s.start()
        assert not s.flush(0.5) and s.pending() == 1  # four windows, one pending record
        srv.start()
        assert s.flush(20)
        v = summaries(client)[("1.0", "rev-1.0")]
        assert (v["calls"], v["errors"], v["windows"], v["last"]) == (20, 4, 4, 4 * W // 1_000_000)
    finally:
        s.stop(1)
        srv.stop()


def test_overflow_locations_get_no_record(sink):
    s, client = sink
    over = Location("prod", "shop", "__overflow__")
    sk = LogSketch.from_values(np.array([10_000_000]))
    cw = ClosedWindow("shop", 0, W, [LocationWindow(0, over, 1, 0, sk, [VersionFigures(("shop", "1", ""), 1, 0, sk)])],
                      "prod")
    s.submit([], [], cw)
    assert s.flush(10)
    assert not client.keys("t:versions:*")


def test_a_summary_redis_refuses_is_dropped_and_blocks_nothing_else(sink):
    # A key of another type under the summaries' name: the merge fails for good. It must
    # not be retried for ever nor hold back the checkpoint fields written after the
    # summaries; the others of its batch are merged once, and it leaves no marker.
    s, client = sink
    other = Location("prod", "shop", "shop.other", "shop/other.py", "3")
    client.set(f"t:versions:{other.key}", "not a hash")
    sk = LogSketch.from_values(np.full(4, 10_000_000))
    lw = LocationWindow(1, other, 4, 0, sk, [VersionFigures(("shop", "1.0", "rev-1.0"), 4, 0, sk)])
    cw = window(0, {"1.0": ([10.0] * 4, 1)})
    s.submit([], [], ClosedWindow("shop", 0, W, cw.locations + [lw], "prod"))
    s.submit_state({"loc:x": b"blob"})
    assert s.flush(10) and s.reachable
    assert s.summaries_dropped == 1
    assert summaries(client)[("1.0", "rev-1.0")]["calls"] == 4  # written once
    assert client.hget("t:state", "loc:x") == "blob"
    assert not client.keys("t:written:*")


def test_a_merge_sent_and_put_back_is_retried_as_sent_not_summed_with_newer_windows():
    # Redis may have merged it already (the reply was lost): its marker names it by its
    # token, so it must go again with the same figures and token; windows noted meanwhile
    # are a merge of their own.
    ledger = versions_mod.VersionLedger()
    ledger.note(window(0, {"1.0": ([10.0] * 3, 0)}))
    sent_token, sent_items = ledger.take(10)
    sent = [(key, p.calls, p.windows) for key, p in sent_items]
    ledger.note(window(1, {"1.0": ([10.0] * 5, 1)}))
    ledger.put_back((sent_token, sent_items))
    assert len(ledger) == 2
    token, items = ledger.take(10)
    assert token == sent_token and [(key, p.calls, p.windows) for key, p in items] == sent == [
        ((LOC.key, "1.0", "rev-1.0", 0), 3, 1)]  # (the last member: the trend bucket, 0 without a trend)
    newer_token, newer = ledger.take(10)
    assert [(p.calls, p.windows) for _, p in newer] == [(5, 1)] and newer_token != token and not len(ledger)
