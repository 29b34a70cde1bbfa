"""A cardinality explosion (a new function name per span) stays within --max-locations: the
excess folds into one overflow location per service, counted, and nothing else is lost."""

import time

import numpy as np
import pytest

from processor.pipeline.engine import Engine
from processor.config import Config
from processor.pipeline.location import Location
from processor.receiver.decode import Batch
from processor.pipeline.window import OVERFLOW_FUNCTION

SEC = 1_000_000_000
T0 = 1_700_000_020 * SEC - (1_700_000_020 * SEC) % (60 * SEC)


def _batch(functions: list[str], service: str, t0: int, dur_ms: float) -> Batch:
    n = len(functions)
    end = t0 + np.arange(n, dtype=np.int64) * 1000
    return Batch(
        locations=[Location("prod", service, f) for f in functions],
        versions=[(service, "1.0", "")],
        loc=np.arange(n, dtype=np.int32), ver=np.zeros(n, np.int32),
        start=end - int(dur_ms * 1e6), end=end, error=np.zeros(n, bool),
        trace_id=np.frombuffer(np.random.default_rng(n).bytes(16 * n), np.uint8).reshape(n, 16) | 1)


def test_locations_beyond_the_limit_fold_into_the_service_overflow_location():
    engine = Engine(Config.defaults(max_locations=100, allowed_lateness=0.0), known_keys=set())
    results = []
    # 30 steady functions, then 200,000 distinct names (one span each) in the same window
    results += engine.ingest(_batch([f"steady.f{i}" for i in range(30)], "shop", T0, 5.0))
    for chunk in range(20):
        names = [f"handler.user_{chunk}_{i}" for i in range(10_000)]
        results += engine.ingest(_batch(names, "shop", T0 + SEC + chunk * 10**7, 20.0))
    results += engine.ingest(_batch(["steady.f0"], "shop", T0 + 70 * SEC, 5.0))  # closes the window

    tables = engine.windows.tables
    assert tables.real_locations == 100
    assert len(tables.locations) == 101  # the limit, plus shop's overflow location
    assert engine.windows.stats["overflow"] == 200_000 - 70
    assert engine.windows.stats["spans"] == 30 + 200_000 + 1  # nothing lost
    (window,) = [r.window for r in results]
    by_function = {lw.location.function: lw for lw in window.locations}
    overflow = by_function[OVERFLOW_FUNCTION]
    assert overflow.count == 200_000 - 70
    assert abs(overflow.sketch.quantile(0.5) / 20e6 - 1) < 0.02
    # the overflow location is many functions mixed: no baseline, detectors or first_seen
    assert len(engine.detectors) == 100 and len(engine.baselines) == 100
    first_seen = [e for r in results for e in r.events if e.type == "first_seen"]
    assert len(first_seen) == 100 and all(e.location.function != OVERFLOW_FUNCTION for e in first_seen)
    # a known location still gets its own figures after the limit is reached
    assert by_function["steady.f3"].count == 1


def test_a_new_service_beyond_the_limit_goes_to_the_shared_overflow_location():
    engine = Engine(Config.defaults(max_locations=5, allowed_lateness=0.0), known_keys=set())
    engine.ingest(_batch([f"f{i}" for i in range(5)], "a", T0, 1.0))
    engine.ingest(_batch(["g1", "g2"], "b", T0, 1.0))
    engine.ingest(_batch(["f1", "h"], "a", T0, 1.0))
    names = {(loc.service, loc.function) for loc in engine.windows.tables.locations}
    assert (OVERFLOW_FUNCTION, OVERFLOW_FUNCTION) in names  # b arrived after the limit
    assert ("a", OVERFLOW_FUNCTION) in names                  # a was known: its own overflow
    assert engine.windows.stats["overflow"] == 3


def test_services_and_versions_beyond_their_caps_fold_into_overflow_and_memory_stays_bounded():
    engine = Engine(Config.defaults(max_services=50, max_versions=500, max_versions_per_service=20,
                                    allowed_lateness=0.0), known_keys=set())
    # 20,000 distinct service names, one span each, then one service with 5,000 versions
    for chunk in range(20):
        batch = _batch(["f"] * 1000, "svc", T0 + chunk * 10**7, 1.0)
        batch.locations = [Location("prod", f"svc_{chunk}_{i}", "f") for i in range(1000)]
        batch.versions = [(f"svc_{chunk}_{i}", "1.0", "") for i in range(1000)]
        batch.ver = np.arange(1000, dtype=np.int32)
        engine.ingest(batch)
    batch = _batch(["f"] * 5000, "svc_0_0", T0 + SEC, 1.0)
    batch.versions = [("svc_0_0", f"build-{i}", "") for i in range(5000)]
    batch.ver = np.arange(5000, dtype=np.int32)
    engine.ingest(batch)
    results = engine.ingest(_batch(["f"], "svc_0_0", T0 + 70 * SEC, 1.0))

    tables = engine.windows.tables
    assert len(tables.services) <= 51 and len(tables.versions) <= 500 + 51 + 1
    assert tables.refused_services == 20_000 - 50
    assert tables.refused_versions >= 5000 - 20
    assert engine.windows.stats["spans"] == 20_000 + 5000 + 1  # every span counted somewhere
    (window,) = [r.window for r in results if r.window.service == "svc_0_0"]
    (lw,) = window.locations
    versions = {v.version[1]: v.count for v in lw.versions}
    assert len(versions) == 20 + 1 and versions[OVERFLOW_FUNCTION] == 5000 - 19  # 1.0 and 19 builds kept


@pytest.mark.e2e
def test_serve_counts_and_logs_the_names_beyond_its_caps(redis_server):
    import grpc

    from tests.conftest import BackflowProcess
    from tests.otlp import S, encoded

    import redis

    redis.Redis.from_url(redis_server.url).flushall()  # no checkpoint of another test's services
    bf = BackflowProcess(redis_server.url, "--max-services", "3", "--max-versions-per-service", "2").start()
    try:
        now = time.time_ns()
        spans = [S(now - i, service=f"svc{i}") for i in range(5)]
        spans += [S(now - i, service="svc0", version=f"2.{i}") for i in range(4)]
        with grpc.insecure_channel(bf.grpc_target) as ch:
            ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")(encoded(spans), timeout=10)
        bf.wait_for(lambda: bf.metrics().get("backflow_processed_spans_total") == 9, what="processed")
        m = bf.metrics()
    finally:
        bf.stop()
    assert m['backflow_overflow_names_total{kind="service"}'] == 2
    assert m['backflow_overflow_names_total{kind="version"}'] == 3  # svc0 keeps its first and 2.0
    assert "more service names than max_services" in bf.log and "more version names" in bf.log


def _versioned(service: str, version: str, t: int, n: int = 3) -> Batch:
    b = _batch(["f"] * n, service, t, 1.0)
    b.versions = [(service, version, "")]
    return b


def test_versions_no_longer_sent_are_forgotten_and_new_deploys_get_their_own():
    """With two versions per service allowed, deploy after deploy: each new version is
    attributed as itself once the old ones have been idle for version_idle_timeout, and
    the counts of a reused slot are the new version's alone."""
    clock = [0.0]
    engine = Engine(Config.defaults(max_versions_per_service=2, version_idle_timeout=100.0,
                                    allowed_lateness=0.0, idle_timeout=10.0), known_keys=set(),
                    clock=lambda: clock[0])
    seen = []
    for deploy in range(6):
        t = T0 + deploy * 120 * SEC
        clock[0] = deploy * 200.0  # each deploy 200 s after the last: the previous one is idle
        for r in engine.ingest(_versioned("shop", f"v{deploy}", t)) + engine.flush_idle(clock[0] + 11):
            seen += [(v.version[1], v.count) for lw in r.window.locations for v in lw.versions]
        engine.forget_idle(clock[0] + 11)
    engine.flush_idle(clock[0] + 200.0)  # (window of the last deploy)
    engine.forget_idle(clock[0] + 200.0)
    assert seen == [(f"v{d}", 3) for d in range(6)], seen  # never __overflow__, nothing mixed
    tables = engine.windows.tables
    assert tables.refused_versions == 0 and len(tables.versions) <= 3
    assert set(engine.version_first_seen[("prod", "shop")]) <= {("shop", "v5", "")}


def test_a_version_with_spans_in_an_open_window_is_not_forgotten():
    clock = [0.0]
    engine = Engine(Config.defaults(version_idle_timeout=100.0, allowed_lateness=0.0, idle_timeout=1000.0),
                    known_keys=set(), clock=lambda: clock[0])
    engine.ingest(_versioned("shop", "old", T0 + SEC))
    clock[0] = 150.0  # "old" idle for 150 s, but its window is still open (new spans keep coming)
    engine.ingest(_versioned("shop", "new", T0 + 2 * SEC))
    engine.forget_idle(clock[0])
    assert ("shop", "old", "") in engine.windows.tables._ver_ids
    clock[0] = 200.0
    (r,) = engine.ingest(_versioned("shop", "new", T0 + 61 * SEC))  # the window closes
    assert {v.version[1]: v.count for v in r.window.locations[0].versions} == {"old": 3, "new": 3}
    clock[0] = 300.0  # the next check, a tenth of the timeout later
    engine.forget_idle(clock[0])
    assert ("shop", "old", "") not in engine.windows.tables._ver_ids
    assert ("shop", "new", "") in engine.windows.tables._ver_ids


@pytest.mark.e2e
def test_serve_forgets_an_idle_version_and_takes_the_next_deploy_as_itself(redis_server):
    import grpc
    import redis

    from processor.pipeline.location import location_key
    from tests.conftest import BackflowProcess
    from tests.otlp import S, encoded

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    bf = BackflowProcess(redis_server.url, "--max-versions-per-service", "1", "--version-idle-timeout", "2",
                         "--window", "1", "--allowed-lateness", "0", "--idle-timeout", "1").start()
    try:
        export = grpc.insecure_channel(bf.grpc_target).unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        export(encoded([S(time.time_ns(), service="shop", version="1.0")]), timeout=10)
        bf.wait_for(lambda: bf.metrics().get("backflow_forgotten_versions_total") == 1, timeout=20,
                    what="1.0 forgotten")
        export(encoded([S(time.time_ns(), service="shop", version="2.0")]), timeout=10)
        key = location_key("prod", "shop", "shop.f")
        bf.wait_for(lambda: client.hgetall(f"backflow:versions:{key}"), what="version summaries")
        bf.wait_for(lambda: any("2.0" in f for f in client.hkeys(f"backflow:versions:{key}")), timeout=20,
                    what="2.0's summary")
        m = bf.metrics()
    finally:
        bf.stop()
    assert m.get('backflow_overflow_names_total{kind="version"}', 0) == 0  # 2.0 took 1.0's freed slot
    fields = client.hkeys(f"backflow:versions:{key}")
    assert not any("__overflow__" in f for f in fields), fields


def test_a_forgotten_version_frees_its_place_under_the_total_cap_too():
    from processor.pipeline.window import Tables

    t = Tables(max_versions=2)
    t.service_id(("prod", "shop"))
    a, b = t.version_id(("shop", "1", "")), t.version_id(("shop", "2", ""))
    assert t.versions[t.version_id(("shop", "3", ""))][1] == OVERFLOW_FUNCTION  # at the cap
    t.ver_seen.view[[a, b]] = 0.0
    assert sorted(v[1] for v in t.forget_versions(idle_before=1.0, busy=set())) == ["1", "2"]
    assert t.versions[t.version_id(("shop", "4", ""))] == ("shop", "4", "")


def _forgetting_engine(clock: list, **settings) -> Engine:
    cfg = dict(location_idle_timeout=100.0, version_idle_timeout=100.0, allowed_lateness=0.0,
               idle_timeout=10.0)
    return Engine(Config.defaults(**{**cfg, **settings}), known_keys=set(), clock=lambda: clock[0])


def test_idle_services_are_forgotten_and_new_ones_take_their_places():
    """Service names churn (each round 50 new services, the last round's idle): memory
    follows the live ones, and no new service is folded into __overflow__ for want of room."""
    clock = [0.0]
    engine = _forgetting_engine(clock, max_services=50, max_locations=150)
    first_seen = []
    for round_ in range(12):
        clock[0] = round_ * 200.0  # each round 200 s after the last: its services are idle
        t = T0 + round_ * 120 * SEC
        engine.forget_idle(clock[0])  # (the pipeline asks every second)
        for s in range(50):
            engine.ingest(_batch(["f", "g", "h"], f"svc-{round_}-{s}", t, 1.0))
        for r in engine.flush_idle(clock[0] + 11):
            first_seen += [e for e in r.events if e.type == "first_seen"]
    tables = engine.windows.tables
    assert tables.refused_services == 0 and engine.windows.stats["overflow"] == 0
    assert len(first_seen) == 12 * 150  # every round's locations were its own
    # what is held is one round's, not twelve
    assert len(tables.services) <= 50 and tables.held_locations == 150 and len(tables.locations) <= 150
    assert len(engine.baselines) == 150 and len(engine.detectors) == 150
    assert len(engine.service_locations) == 50 and len(engine.version_first_seen) == 50
    assert len(engine.windows.services) == 50
    stats = engine.windows.stats
    assert (stats["forgotten_locations"], stats["forgotten_services"]) == (11 * 150, 11 * 50)


def test_a_forgotten_location_comes_back_learned_anew_without_a_second_first_seen():
    clock = [0.0]
    engine = _forgetting_engine(clock)
    windows = []
    for step, t in enumerate((T0, T0 + 60 * SEC, T0 + 400 * SEC)):
        clock[0] = step * 60.0 if step < 2 else 500.0  # idle for 380 s before the third window
        engine.ingest(_batch(["f"], "shop", t, 1.0))
        if step == 1:
            windows += engine.flush_idle(clock[0] + 11)
            assert engine.windows.tables.held_locations == 1
            engine.forget_idle(clock[0] + 200)
            assert engine.windows.tables.held_locations == 0 and len(engine.baselines) == 0
            assert ("prod", "shop") not in engine.service_locations
        windows += engine.flush_idle(clock[0] + 11)
    first_seen = [e for r in windows for e in r.events if e.type == "first_seen"]
    assert len(first_seen) == 1 and first_seen[0].window_end_ns == T0 + 60 * SEC
    (lw,) = windows[-1].window.locations
    assert engine.baselines.baseline(lw.loc_id).windows == 1  # learned anew
    assert lw.loc_id in engine.detectors
    assert list(engine.service_locations[("prod", "shop")]) == [lw.loc_id]


def test_a_location_with_spans_in_an_open_window_is_not_forgotten():
    clock = [0.0]
    engine = _forgetting_engine(clock, idle_timeout=1000.0)
    engine.ingest(_batch(["old"], "shop", T0 + SEC, 1.0))
    clock[0] = 150.0  # "old" idle for 150 s, but its window is still open
    engine.ingest(_batch(["new"], "shop", T0 + 2 * SEC, 1.0))
    assert engine.forget_idle(clock[0]).locations == []
    (r,) = engine.ingest(_batch(["new"], "shop", T0 + 61 * SEC, 1.0))  # the window closes
    assert sorted(lw.location.function for lw in r.window.locations) == ["new", "old"]
    clock[0] = 300.0
    assert [loc.function for _, loc in engine.forget_idle(clock[0]).locations] == ["old"]


def test_forgotten_locations_and_services_leave_the_checkpoint():
    from processor.pipeline import checkpoint

    clock = [0.0]
    engine = _forgetting_engine(clock)
    engine.ingest(_batch(["f"], "gone", T0, 1.0))
    engine.ingest(_batch(["f"], "kept", T0, 1.0))
    engine.flush_idle(11.0)
    state = {k: v for k, v in checkpoint.dumps_dirty(engine).items()}
    assert len(state) == 4
    clock[0] = 150.0
    engine.ingest(_batch(["f"], "kept", T0 + 100 * SEC, 1.0))  # only "kept" sends again
    engine.forget_idle(150.0)
    fields = checkpoint.dumps_dirty(engine)
    gone = {name: at for name, at in fields.items() if not isinstance(at, bytes)}
    # (each with the event time of what it held: the end of its newest window)
    assert gone == {checkpoint.location_field(Location("prod", "gone", "f").key): T0 + 60 * SEC,
                    "svc:prod:gone": T0}  # (and its newest span)
    for name, blob in fields.items():  # as the sink applies them: HSET, or delete
        if name in gone:
            state.pop(name)
        else:
            state[name] = blob
    fresh = Engine(engine.cfg, known_keys=set())
    assert checkpoint.restore(fresh, state).locations == 1
    assert [s[1] for s in fresh.windows.tables.services if s] == ["kept"]


def test_restored_versions_never_seen_again_leave_the_first_seen_table():
    clock = [0.0]
    engine = _forgetting_engine(clock)
    old = ("shop", "0.9", "")
    engine.restore_service(("prod", "shop"), T0, T0, {old: T0 - 86400 * SEC, ("shop", "1.0", ""): T0})
    engine.ingest(_batch(["f"], "shop", T0 + 200 * SEC, 1.0))
    engine.ingest(_batch(["g"], "other", T0, 1.0))
    engine.flush_idle(11.0)
    clock[0] = 150.0
    engine.ingest(_batch(["f"], "shop", T0 + 300 * SEC, 1.0))
    engine.forget_idle(150.0)  # "other" is forgotten: a pass runs
    assert set(engine.version_first_seen[("prod", "shop")]) == {("shop", "1.0", "")}


def test_metrics_drop_the_series_of_forgotten_locations():
    from prometheus_client import CollectorRegistry, generate_latest

    from processor.sinks.prometheus import Metrics

    clock = [0.0]
    engine = _forgetting_engine(clock)
    metrics = Metrics(CollectorRegistry())
    engine.ingest(_batch(["f"], "shop", T0, 1.0))
    for r in engine.flush_idle(11.0):
        metrics.observe_window(r.window)
    assert b'code_function_name="f"' in generate_latest(metrics.registry)
    metrics.forget(engine.forget_idle(200.0))
    text = generate_latest(metrics.registry).decode()
    assert 'code_function_name="f"' not in text
    assert "backflow_forgotten_locations_total 1.0" in text and "backflow_forgotten_services_total 1.0" in text


@pytest.mark.e2e
def test_serve_forgets_an_idle_service_and_gives_its_place_to_the_next(redis_server):
    """A real serve with room for one service: once "a" is idle it is forgotten (checkpoint
    field, /metrics series), "b" gets its own place, and "a" coming back is not announced
    a second time."""
    import grpc
    import redis

    from processor.pipeline.location import location_key
    from tests.conftest import BackflowProcess
    from tests.otlp import S, encoded

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    bf = BackflowProcess(redis_server.url, "--max-services", "1", "--location-idle-timeout", "2",
                         "--version-idle-timeout", "2", "--window", "1", "--allowed-lateness", "0",
                         "--idle-timeout", "1", "--checkpoint-interval", "0").start()
    a, b = location_key("prod", "a", "shop.f"), location_key("prod", "b", "shop.f")

    def first_seen(key):
        return [f for _, f in client.xrange("backflow:events") if f["type"] == "first_seen" and f["key"] == key]

    try:
        export = grpc.insecure_channel(bf.grpc_target).unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        export(encoded([S(time.time_ns(), service="a")]), timeout=10)
        bf.wait_for(lambda: client.hexists("backflow:state", f"loc:{a}"), what="a's checkpoint")
        assert 'service_name="a"' in bf.metrics_text()
        bf.wait_for(lambda: bf.metrics().get("backflow_forgotten_services_total") == 1, timeout=20,
                    what="a forgotten")
        bf.wait_for(lambda: not client.hexists("backflow:state", f"loc:{a}"), what="a's field deleted")
        assert not client.hexists("backflow:state", "svc:prod:a")
        assert client.sismember("backflow:keys", a)  # Redis keeps what was seen
        assert 'service_name="a"' not in bf.metrics_text()
        assert bf.metrics().get("backflow_forgotten_locations_total") == 1

        export(encoded([S(time.time_ns(), service="b")]), timeout=10)
        bf.wait_for(lambda: first_seen(b), what="b's first_seen")
        export(encoded([S(time.time_ns(), service="a")]), timeout=10)  # b is not idle yet: a folds
        bf.wait_for(lambda: bf.metrics().get("backflow_forgotten_services_total") == 2, timeout=20,
                    what="b forgotten")
        export(encoded([S(time.time_ns(), service="a")]), timeout=10)
        bf.wait_for(lambda: client.hexists("backflow:state", f"loc:{a}"), what="a back")
        m = bf.metrics()
    finally:
        bf.stop()
    assert len(first_seen(a)) == 1 and len(first_seen(b)) == 1
    assert m.get('backflow_overflow_names_total{kind="service"}') == 1  # a, while b held the place


@pytest.mark.e2e
def test_a_forgotten_field_another_process_wrote_since_stays(redis_server):
    """The service moved to another instance, which checkpoints it with later windows: the
    instance that forgot it must not delete those fields."""
    import redis

    from processor.pipeline import checkpoint
    from processor.sinks.redis_streams import RedisSink

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    clock = [0.0]
    engine = _forgetting_engine(clock)
    engine.ingest(_batch(["f"], "moved", T0, 1.0))
    engine.ingest(_batch(["f"], "gone", T0, 1.0))
    engine.flush_idle(11.0)
    ours = checkpoint.dumps_dirty(engine)
    assert len(ours) == 4
    later = Engine(engine.cfg, known_keys=set())  # the other instance, a few windows on
    later.ingest(_batch(["f"], "moved", T0 + 300 * SEC, 1.0))
    later.flush_idle(11.0)
    theirs = checkpoint.dumps_dirty(later)
    sink = RedisSink(client, "backflow", 1000, 1000)
    sink.start()
    try:
        sink.submit_state({**ours, **theirs})  # Redis holds "gone" as ours, "moved" as theirs
        assert sink.flush(10)
        engine.forget_idle(200.0)
        forgotten = checkpoint.dumps_dirty(engine)
        assert len(forgotten) == 4 and not any(isinstance(v, bytes) for v in forgotten.values())
        sink.submit_state(forgotten)
        assert sink.flush(10)
    finally:
        sink.stop(5)
    left = {k.decode(): v for k, v in client.hgetall("backflow:state").items()}
    assert left == theirs


def test_restored_versions_are_kept_while_the_process_is_younger_than_the_version_timeout():
    clock = [0.0]
    engine = _forgetting_engine(clock, version_idle_timeout=1000.0)
    canary = ("shop", "2.0", "")  # live, first seen long ago, not sent since the restart yet
    engine.restore_service(("prod", "shop"), T0, T0, {canary: T0 - 8 * 86400 * SEC})
    engine.ingest(_batch(["f"], "shop", T0 + 200 * SEC, 1.0))
    engine.ingest(_batch(["g"], "other", T0, 1.0))
    engine.flush_idle(11.0)
    clock[0] = 150.0
    engine.ingest(_batch(["f"], "shop", T0 + 300 * SEC, 1.0))
    assert engine.forget_idle(150.0).services == [("prod", "other")]
    assert canary in engine.version_first_seen[("prod", "shop")]


def test_the_overflow_series_goes_once_nothing_is_folded_into_it():
    from prometheus_client import CollectorRegistry, generate_latest

    from processor.sinks.prometheus import Metrics

    clock = [0.0]
    engine = _forgetting_engine(clock)
    metrics = Metrics(CollectorRegistry(), max_locations=1)
    engine.ingest(_batch(["f", "g"], "shop", T0, 1.0))
    for r in engine.flush_idle(11.0):
        metrics.observe_window(r.window)
    assert 'code_function_name="__overflow__"' in generate_latest(metrics.registry).decode()
    metrics.forget(engine.forget_idle(200.0))
    text = generate_latest(metrics.registry).decode()
    assert "code_function_name=" not in text and "backflow_metrics_overflow_locations 0.0" in text
