"""Sinks: the Redis sink survives outages in order and bounded; Prometheus stays bounded."""

import json

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from processor.pipeline.baseline import Baseline
from processor.devtools.redis_server import RedisServer
from processor.events import Event
from processor.pipeline.location import Location
from processor.sinks.prometheus import OVERFLOW, Metrics
from processor.sinks.redis_streams import RedisSink
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures

LOC = Location("prod", "shop", "shop.f", "shop.py", "3")


def event(i: int) -> Event:
    return Event("latency_regression", LOC, ("shop", "1", ""), i * 60_000_000_000,
                 (i + 1) * 60_000_000_000, "warning", f"event {i}", {"i": i})


@pytest.mark.e2e
def test_events_written_while_redis_is_away_arrive_in_order_once_it_is_back():
    srv = RedisServer()
    client = redis.Redis(port=srv.port, socket_timeout=1, socket_connect_timeout=1)
    written = []
    sink = RedisSink(client, "t", 1000, buffer_limit=100, on_event_written=written.append)
    sink.start()
    try:
        for i in range(5):
            sink.submit([event(i)], [])
        assert not sink.flush(timeout=0.5) and sink.pending() == 5 and not sink.reachable
        srv.start()
        assert sink.flush(timeout=20)
        entries = client.xrange("t:events")
        assert [e[b"summary"].decode() for _, e in entries] == [f"event {i}" for i in range(5)]
        assert written == ["latency_regression"] * 5 and sink.reachable
    finally:
        sink.stop(1)
        srv.stop()


class _Source:
    """Stands for a Baseline: rendered only when written."""

    def __init__(self, value: int):
        self.value, self.rendered, self.whole = value, 0, True

    def row(self, whole: bool = True) -> list[str]:
        self.rendered += 1
        return ["count", str(self.value)]


@pytest.mark.e2e
def test_baselines_coalesce_per_key_while_redis_is_away_and_follow_their_key_s_first_seen():
    srv = RedisServer()
    client = redis.Redis(port=srv.port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
    sink = RedisSink(client, "t", 1000, buffer_limit=10)
    sink.start()
    try:
        first = Event("first_seen", LOC, ("shop", "1", ""), 0, 60_000_000_000, "info", "new", {})
        sources = [_Source(i) for i in range(1000)]
        sink.submit([first], [(LOC.key, sources[0])])
        for src in sources[1:]:  # a thousand windows of the same location during the outage
            sink.submit([], [(LOC.key, src), ("other", src)])
        assert sink.pending() == 3  # one event and one baseline per key, not a thousand
        srv.start()
        assert sink.flush(timeout=20)
        assert client.hgetall(f"t:baseline:{LOC.key}") == {"count": "999"}
        assert sum(s.rendered for s in sources) <= 2 + 2 * 50  # rendered when written, not queued
        # the baseline's SADD did not beat the first_seen script to the key set
        assert [e["type"] for _, e in client.xrange("t:events")] == ["first_seen"]
    finally:
        sink.stop(1)
        srv.stop()


def test_a_full_buffer_drops_the_oldest_writes_and_counts_them():
    dropped = []
    client = redis.Redis(port=1, socket_timeout=0.2, socket_connect_timeout=0.2)  # nothing there
    sink = RedisSink(client, "t", 1000, buffer_limit=3, on_dropped=dropped.append)
    for i in range(5):
        sink.submit([event(i)], [])
    assert sum(dropped) == 2 and sink.pending() == 3
    assert [w.source.summary for w in sink.buffer] == ["event 2", "event 3", "event 4"]


def test_first_seen_is_written_once_even_if_submitted_twice(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    written = []
    sink = RedisSink(client, "t", 1000, 100, on_event_written=written.append)
    sink.start()
    first = Event("first_seen", LOC, ("shop", "1", ""), 0, 60_000_000_000, "info", "new", {})
    sink.submit([first], [(LOC.key, {"count": "1"})])
    sink.submit([first], [])
    assert sink.flush(10)
    sink.stop(1)
    assert client.xlen("t:events") == 1 and written == ["first_seen"]
    assert client.smembers("t:keys") == {LOC.key.encode()}


def test_events_stream_is_trimmed_approximately(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    sink = RedisSink(client, "t", events_maxlen=100, buffer_limit=10_000)
    sink.start()
    sink.submit([event(i) for i in range(2000)], [])
    assert sink.flush(20)
    sink.stop(1)
    assert 100 <= client.xlen("t:events") < 2000


def _window(n_locations: int) -> ClosedWindow:
    lws = []
    for i in range(n_locations):
        sk = LogSketch.from_values(np.array([1_000_000 * (i + 1)] * 10))
        loc = Location("prod", "shop", f"f{i}")
        lws.append(LocationWindow(i, loc, 10, 1, sk, [VersionFigures(("shop", "1", ""), 10, 1, sk)]))
    return ClosedWindow("shop", 0, 60_000_000_000, lws)


def test_per_location_series_beyond_the_limit_fold_into_one_overflow_series():
    m = Metrics(CollectorRegistry(), max_locations=3)
    m.observe_window(_window(10))
    text = generate_latest(m.registry).decode()
    lines = [l for l in text.splitlines() if l.startswith("backflow_location_error_ratio{")]
    assert len(lines) == 4  # three locations and the overflow series
    assert sum(f'code_function_name="{OVERFLOW}"' in l for l in lines) == 1
    assert m.registry.get_sample_value("backflow_metrics_overflow_locations") == 7
    overflow_p50 = m.registry.get_sample_value("backflow_location_latency_milliseconds", {
        "service_name": "", "deployment_environment_name": "", "code_function_name": OVERFLOW,
        "quantile": "0.5"})
    # the overflow series is the merged sketch of f3..f9 (4 ms .. 10 ms, 10 spans each)
    assert abs(overflow_p50 - 7.0) / 7.0 <= 0.0101


# --- fields travel to the scripts as JSON (redis_streams.py): check what lands in Redis, exactly ---

PI = Location("prodé", "boutique", "café.naïve_ß", "données/π.py", "7")


def _pi_event(kind: str, i: int) -> Event:
    return Event(kind, PI, ("boutique", "1.2-β", "ümlaut"), i * 60_000_000_000, (i + 1) * 60_000_000_000,
                 "info", f"régression {i} ✓ 日本語 🚀 100%", {"note": "ü", "i": i})


def test_a_mixed_batch_with_non_ascii_text_lands_in_redis_exactly(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    written = []
    sink = RedisSink(client, "t:ü", 1000, 100, on_event_written=written.append)
    baseline = Baseline(PI, LogSketch.from_values(np.array([1e6, 2e6, 3e6])), 3, 1, 60, 1,
                        60_000_000_000, ("boutique", "1.2-β", "ümlaut"))
    # what JSON escapes, and what Redis's cjson must give back byte for byte
    odd = {"naïve %s %d": "100% ✓", "empty": "", "🚀": "x" * 300, 'quote " and \\ back': "\x00nul\x01\n\t\u2028",
           "[1, 2]": "null", "": "{}"}
    events = [_pi_event("latency_regression", 0), _pi_event("first_seen", 1),
              _pi_event("first_seen", 2),  # the same key again: the script writes nothing
              _pi_event("error_regression", 3), event(4)]
    sink.submit(events, [(PI.key, baseline), ("clé ✓", odd)])
    sink.start()
    try:
        assert sink.flush(10)
    finally:
        sink.stop(1)
    stream = client.xrange("t:ü:events")
    expected = [events[i] for i in (0, 1, 3, 4)]
    # every field, in the order written, in the order submitted
    assert [list(fields.items()) for _, fields in stream] == [list(e.fields().items()) for e in expected]
    assert written == ["latency_regression", "first_seen", "error_regression", "latency_regression"]
    assert client.hgetall(f"t:ü:baseline:{PI.key}") == baseline.fields()
    assert client.hgetall("t:ü:baseline:clé ✓") == odd
    assert client.smembers("t:ü:keys") == {PI.key, "clé ✓"}
    assert sink.reachable and sink.pending() == 0


def test_writes_survive_a_flushed_script_cache_even_in_the_middle_of_a_batch(redis_server, monkeypatch):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    written = []
    sink = RedisSink(client, "t", 1000, 100, on_event_written=written.append)
    other = Location("prod", "shop", "shop.g")
    sink.submit([_pi_event("first_seen", 0)], [])
    sink._write(sink._take())
    client.script_flush()  # as after a Redis restart: NOSCRIPT, loaded, the batch sent again
    sink.submit([event(1), Event("first_seen", other, ("shop", "1", ""), 0, 1, "info", "g", {}),
                 event(2)], [(other.key, {"n": "1"})])
    sink._write(sink._take())
    sink._write(sink._take())  # the baseline
    # Flushed between two commands of a batch: those before it ran, the others answer
    # NOSCRIPT; the whole batch goes again, and what ran is skipped, in place.
    flushed = []
    execute = redis.client.Pipeline.execute

    def flush_in_the_middle(pipe, raise_on_error=True):
        if flushed or len(pipe.command_stack) < 4:
            return execute(pipe, raise_on_error)
        at = len(pipe.command_stack) // 2
        pipe.command_stack.insert(at, (("SCRIPT FLUSH",), {}))
        replies = execute(pipe, raise_on_error)
        flushed.append(replies.pop(at))
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "execute", flush_in_the_middle)
    last = Location("prod", "shop", "shop.h")
    sink.submit([event(3), Event("first_seen", last, ("shop", "1", ""), 0, 1, "info", "h", {}),
                 _pi_event("first_seen", 3), event(4)], [])
    sink._write(sink._take())
    assert flushed == [True]
    assert [e["summary"] for _, e in client.xrange("t:events")] == [
        "régression 0 ✓ 日本語 🚀 100%", "event 1", "g", "event 2", "event 3", "h", "event 4"]
    assert written == ["first_seen", "latency_regression", "first_seen", "latency_regression",
                       "latency_regression", "first_seen", "latency_regression"]
    assert client.smembers("t:keys") == {PI.key, other.key, last.key}
    assert client.hgetall(f"t:baseline:{other.key}") == {"n": "1"}


def test_an_error_reply_raises_after_the_whole_batch_and_the_connection_stays_usable(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    client.set("t:baseline:bad", "not a hash")
    sink = RedisSink(client, "t", 1000, 100)
    sink.submit([], [("a", {"n": "1"}), ("bad", {"n": "2"}), ("c", {"n": "3"})])
    batch = sink._take()
    try:
        sink._write(batch)
        raise AssertionError("the WRONGTYPE reply did not raise")
    except redis.ResponseError as e:
        # (one command registers the instance, one writes the batch's baselines)
        assert "WRONGTYPE" in str(e) and "command #2 of 2" in str(e)
    # the baselines after the refused one were written, and every reply was read; the
    # refused baseline's key was not added to the set
    assert client.hgetall("t:baseline:c") == {"n": "3"}
    assert client.smembers("t:keys") == {"a", "c"}
    client.delete("t:baseline:bad")
    sink._write(batch)  # a retry on the same pooled connection, in sync
    assert client.hgetall("t:baseline:bad") == {"n": "2"}
    assert client.smembers("t:keys") == {"a", "bad", "c"}


@pytest.mark.e2e
def test_the_sink_uses_the_client_s_password_and_database():
    srv = RedisServer().start()
    try:
        redis.Redis(port=srv.port).config_set("requirepass", "sécret")
        client = redis.Redis.from_url(f"redis://:s%C3%A9cret@127.0.0.1:{srv.port}/3")
        sink = RedisSink(client, "t", 1000, 100)
        sink.submit([_pi_event("first_seen", 0)], [(PI.key, {"n": "1"})])
        sink.start()
        assert sink.flush(10)
        sink.stop(1)
        assert client.xlen("t:events") == 1 and client.hgetall(f"t:baseline:{PI.key}") == {b"n": b"1"}
        assert client.dbsize() == 4  # events, baseline, key set, instances
        assert redis.Redis(port=srv.port, password="sécret", db=0).dbsize() == 0
    finally:
        srv.stop()


def test_a_burst_while_redis_answers_waits_for_room_instead_of_dropping(redis_server):
    # More events in one window than the buffer holds is a burst, not an outage: every one
    # arrives, none is dropped, and the wait is counted.
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    dropped, waited = [], []
    sink = RedisSink(client, "t", 100_000, buffer_limit=50, on_dropped=dropped.append,
                     on_waited=waited.append, batch_size=20)
    assert sink.ping()
    sink.start()
    try:
        sink.submit([event(i) for i in range(3000)], [])
        assert sink.flush(20)
        assert client.xlen("t:events") == 3000 and sink.dropped == 0 and dropped == []
        assert sum(waited) > 0
        summaries = [e[b"summary"].decode() for _, e in client.xrange("t:events", count=5)]
        assert summaries == [f"event {i}" for i in range(5)]  # in order
    finally:
        sink.stop(1)


@pytest.mark.e2e
def test_a_submit_waiting_for_room_drops_only_once_redis_goes_away():
    srv = RedisServer()
    srv.start()
    client = redis.Redis(port=srv.port, socket_timeout=1, socket_connect_timeout=1)
    dropped = []
    sink = RedisSink(client, "t", 100_000, buffer_limit=50, on_dropped=dropped.append, batch_size=20)
    try:
        assert sink.ping()  # answered: a full buffer waits (the writer is not started yet)
        import threading
        done = threading.Event()
        threading.Thread(target=lambda: (sink.submit([event(i) for i in range(200)], []), done.set()),
                         daemon=True).start()
        assert not done.wait(1.0) and sink.pending() == 50 and dropped == []
        srv.stop()
        sink.start()  # its first write fails: Redis is away, the wait ends in drops, counted
        assert done.wait(10)
        assert sum(dropped) == 150 and sink.pending() <= 50
    finally:
        sink.stop(0.1)
        srv.stop()


@pytest.mark.e2e
def test_with_a_spool_what_waits_for_redis_goes_to_disk_and_arrives_in_order_once_it_is_back(tmp_path):
    from processor.sinks.spool import Spool

    srv = RedisServer()
    client = redis.Redis(port=srv.port, socket_timeout=1, socket_connect_timeout=1)
    spool = Spool(str(tmp_path), max_bytes=1 << 20)
    sink = RedisSink(client, "t", 100_000, buffer_limit=10, spool=spool, batch_size=5)
    sink.start()
    try:
        sk = LogSketch.from_values(np.full(3, 10_000_000))
        for i in range(40):  # four times the memory buffer, while Redis is away
            lw = LocationWindow(0, LOC, 3, 1, sk, [VersionFigures(("shop", "1.0", "abc"), 3, 1, sk)])
            sink.submit([event(i)], [(LOC.key, {"n": str(i)})], ClosedWindow("shop", i * 10**9, (i + 1) * 10**9,
                                                                           [lw], "prod"))
        sink.submit_state({"loc:x": b"\x00state"})
        assert sink.flush(timeout=20) and sink.pending() == 0  # all on disk, nothing dropped
        assert spool.size > 0 and sink.dropped == 0
        # baselines are spooled one call each of the one-baseline script, which the version
        # before the batched one knows too: a rollback can replay the spool
        scripts = [c[1] for record in spool.records() for c in record if c[0] == "SCRIPT"]
        assert "baseline" in scripts and set(scripts) <= {"event", "baseline", "merge", "forget"}
        # and merges as the batch script itself (EVAL), under their batch's marker
        assert any(c[0] == "EVAL" for record in spool.records() for c in record)
        # a second sink on the same spool (the next start) sends it before anything else
        srv.start()
        sink.stop(1)
        again = RedisSink(client, "t", 100_000, buffer_limit=10, spool=Spool(str(tmp_path), 1 << 20))
        again.replay_spool()
        assert [e[b"summary"].decode() for _, e in client.xrange("t:events")] == [f"event {i}" for i in range(40)]
        assert client.hgetall(f"t:baseline:{LOC.key}") == {b"n": b"39"}
        assert client.hget("t:state", "loc:x") == b"\x00state"
        summary = json.loads(client.hget(f"t:versions:{LOC.key}", '["1.0", "abc"]'))
        assert (summary["calls"], summary["errors"], summary["windows"]) == (120, 40, 40)
        assert again.spool.size == 0
        again.replay_spool()  # nothing left: nothing written twice
        assert client.xlen("t:events") == 40
    finally:
        sink.stop(0.1)
        srv.stop()


@pytest.mark.e2e
def test_a_spool_of_one_merge_per_call_written_before_batched_merges_replays_once(tmp_path):
    """Spools written before merges were batched hold one call of the one-merge script
    each, with a marker per merge: they replay, and a record sent twice merges once."""
    from processor.sinks.spool import Spool
    from processor.sinks.versions import VERSIONS_KEPT, field_name

    srv = RedisServer().start()
    try:
        client = redis.Redis(port=srv.port)
        spool = Spool(str(tmp_path), max_bytes=1 << 20)
        args = [field_name("1.0", "abc"), 3, 1, 1, 10.0, 30.0, 60.0, 0, 10_000, VERSIONS_KEPT, 3600]
        record = [["SCRIPT", "merge", 2, f"t:versions:{LOC.key}", "t:written:merge:old.1", json.dumps(args)]]
        spool.append(record)
        spool.append(record)  # (sent twice: its marker skips the second)
        # a record the script cannot apply (a value that is not JSON): dropped and counted,
        # not replayed for ever in front of everything else
        client.hset("t:versions:other", field_name("1.0", "abc"), "not json")
        spool.append([["SCRIPT", "merge", 2, "t:versions:other", "t:written:merge:old.2", json.dumps(args)]])
        sink = RedisSink(client, "t", 1000, buffer_limit=10, spool=spool)
        sink.replay_spool()
        summary = json.loads(client.hget(f"t:versions:{LOC.key}", field_name("1.0", "abc")))
        assert (summary["calls"], summary["errors"], summary["windows"]) == (3, 1, 1)
        assert spool.size == 0 and sink.summaries_dropped == 1
    finally:
        srv.stop()


@pytest.mark.e2e
def test_a_full_spool_pushes_back_instead_of_dropping(tmp_path):
    import threading

    from processor.sinks.spool import Spool

    client = redis.Redis(port=RedisServer().port, socket_timeout=0.2, socket_connect_timeout=0.2)  # nobody
    sink = RedisSink(client, "t", 1000, buffer_limit=5, spool=Spool(str(tmp_path), max_bytes=1), batch_size=5)
    sink.start()
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (sink.submit([event(i) for i in range(50)], []), done.set()),
                         daemon=True).start()
        assert not done.wait(3.0)  # waiting for room: the receivers push back meanwhile
        assert sink.dropped == 0
    finally:
        sink.stop(0.1)


@pytest.mark.e2e
def test_a_spool_is_kept_when_redis_refuses_it_for_a_passing_reason(tmp_path):
    from processor.sinks.spool import Spool

    srv = RedisServer().start()
    client = redis.Redis(port=srv.port, socket_timeout=1, socket_connect_timeout=1)
    try:
        sink = RedisSink(client, "t", 1000, 100, spool=Spool(str(tmp_path), 1 << 20))
        sink._to_spool([sink_write for sink_write in _event_writes(sink, 3)])
        client.config_set("maxmemory", "1")  # every write answered OOM until this is undone
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            sink.replay_spool()
        assert sink.spool.size > 0 and client.xlen("t:events") == 0  # kept, nothing lost
        client.config_set("maxmemory", "0")
        sink.replay_spool()
        assert client.xlen("t:events") == 3 and sink.spool.size == 0
    finally:
        srv.stop()


def _event_writes(sink: RedisSink, n: int) -> list:
    """What submit() queues for n events, taken as the writer thread would."""
    sink.submit([event(i) for i in range(n)], [])
    return sink._take()


@pytest.mark.e2e
def test_stopping_while_redis_is_away_after_a_first_seen_spools_and_returns(tmp_path):
    # The markers of a batch acknowledged just before Redis went away wait for the next
    # batch; with a spool they are left to expire instead of keeping the writer busy.
    from processor.sinks.spool import Spool

    srv = RedisServer().start()
    client = redis.Redis(port=srv.port, socket_timeout=1, socket_connect_timeout=1)
    sink = RedisSink(client, "t", 1000, 100, spool=Spool(str(tmp_path), 1 << 20))
    sink.start()
    try:
        first = Event("first_seen", LOC, ("shop", "1", ""), 0, 60_000_000_000, "info", "new", {})
        sink.submit([first], [])
        assert sink.flush(10)
        srv.stop()
        sink.submit([event(1)], [])
        assert sink.stop(timeout=10)  # everything went to the spool: nothing pending
        assert sink.spool.size > 0
    finally:
        sink.stop(0.1)
        srv.stop()


def _absorbed(stage, windows: list[tuple[str, int]]) -> list[Baseline]:
    """The snapshots a BaselineStage hands out for LOC's windows [(version, calls)]."""
    out = []
    for w, (version, calls) in enumerate(windows):
        sk = LogSketch.from_values(np.full(calls, 5_000_000))
        lw = LocationWindow(0, LOC, calls, 0, sk, [VersionFigures(("shop", version, "r" + version), calls, 0, sk)])
        out += stage.absorb_many(ClosedWindow("shop", w * 10**10, (w + 1) * 10**10, [lw], "prod"), [lw])[0]
    return out


def test_a_baseline_is_whole_at_first_and_when_its_version_changes_else_its_figures_only():
    from processor.pipeline.baseline import BaselineStage

    snaps = _absorbed(BaselineStage(10.0, 3600.0), [("1", 3), ("1", 4), ("2", 5), ("2", 6)])
    assert [b.whole for b in snaps] == [True, False, True, False]
    figures = snaps[1].row(whole=False)
    assert "code.function.name" not in figures and "service.version" not in figures
    assert dict(zip(figures[::2], figures[1::2])) == {k: v for k, v in snaps[1].fields().items()
                                                       if k in figures[::2]}
    assert set(figures[::2]) | {"key", "service.name", "deployment.environment.name", "code.function.name",
                                "code.file.path", "code.line.number", "otel.scope.name", "service.version",
                                "vcs.ref.head.revision"} == set(snaps[1].fields())


@pytest.mark.e2e
def test_figures_only_are_written_over_a_whole_hash_and_a_missing_one_is_written_whole(redis_server):
    from processor.pipeline.baseline import BaselineStage

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    first, second, third = _absorbed(BaselineStage(10.0, 3600.0), [("1", 3), ("1", 4), ("1", 5)])
    sink = RedisSink(client, "t", 1000, buffer_limit=10)
    key = f"t:baseline:{LOC.key}"
    # a whole snapshot not yet written, replaced by one of figures only: written whole
    sink.submit([], [(LOC.key, first)])
    sink.submit([], [(LOC.key, second)])
    sink._write(sink._take())
    assert client.hgetall(key) == second.fields()
    # figures only over the hash there: the identity stays
    client.hset(key, "code.file.path", "kept.py")
    sink.submit([], [(LOC.key, third)])
    sink._write(sink._take())
    assert client.hget(key, "code.file.path") == "kept.py" and client.hget(key, "windows") == "3"
    # the hash of another version (Redis lost a later write): not written over, sent whole
    client.hset(key, "service.version", "0")
    again = _absorbed(BaselineStage(10.0, 3600.0), [("1", 3), ("1", 4)])[1]
    sink.submit([], [(LOC.key, again)])
    sink._write(sink._take())
    assert client.hget(key, "service.version") == "0" and client.hget(key, "windows") == "3"
    sink._write(sink._take())
    assert client.hgetall(key) == again.fields()
    # a whole write that failed, put back behind a newer row of figures: that one goes whole
    first, second = _absorbed(BaselineStage(10.0, 3600.0), [("2", 3), ("2", 4)])
    sink.submit([], [(LOC.key, first)])
    in_flight = sink._take()
    sink.submit([], [(LOC.key, second)])
    assert not second.whole
    sink._put_back(in_flight)
    sink._write(sink._take())
    assert client.hgetall(key) == second.fields() and client.hget(key, "service.version") == "2"
    # the hash gone (deleted, evicted): figures only are not written, and it comes back whole
    client.delete(key, "t:keys")
    fourth = _absorbed(BaselineStage(10.0, 3600.0), [("2", 3), ("2", 4)])[1]
    assert not fourth.whole
    sink.submit([], [(LOC.key, fourth)])
    sink._write(sink._take())
    assert not client.exists(key) and sink.pending() == 1
    sink._write(sink._take())
    assert client.hgetall(key) == fourth.fields() and client.smembers("t:keys") == {LOC.key}
