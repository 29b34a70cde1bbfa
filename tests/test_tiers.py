"""Two tiers (processor/pipeline/tiers.py): aggregate replicas close windows into partials
sent as OTLP metrics, a detect replica merges them and closes its windows by the replicas'
watermarks. Events equal those of one process fed everything: in-process over every
interleaving tried, and with three real ``backflow serve --role aggregate`` and one
``--role detect``."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.scenarios import OtlpEncoder, generate
from processor.config import Config, ConfigError, load_config
from processor.pipeline import checkpoint
from processor.pipeline.engine import Engine
from processor.pipeline.sketch import LogSketch
from processor.pipeline.location import Location
from processor.pipeline.tiers import Replicas, explicit_bounds, partials, sequenced
from processor.pipeline.window import WindowStage
from processor.receiver.decode import Batch, count_spans
from processor.receiver.metrics import ExplicitBuckets, Watermark, decode_metrics
from processor.sinks.ring import HashRing
from tests.conftest import BackflowProcess
from tests.lanes import send_lanes
from tests.otlp import batch_rows

CFG = Config.defaults(window=60.0, allowed_lateness=5.0, idle_timeout=1e9)
SEC, MS = 10**9, 10**6
T0 = 1_700_000_000 * SEC
FLAGS = ("--window", "60", "--allowed-lateness", "5", "--idle-timeout", "100000", "--checkpoint-interval", "2")


@pytest.fixture(scope="module")
def scenario():
    return generate(7, services=4, functions_per_service=3, hours=4.0, rate=(4.0, 8.0), min_rate=3.0)


def _replica_of(b, n: int) -> np.ndarray:
    """Each span's replica, by its trace id (the collector's loadbalancing exporter routes by it)."""
    return (np.ascontiguousarray(b.trace_id).view(">u8")[:, 1] % n).astype(np.int64)


def test_explicit_bounds_give_back_the_sketchs_buckets_exactly():
    rng = np.random.default_rng(3)
    for _ in range(200):
        index = np.unique(rng.integers(-3, 2200, rng.integers(1, 40)))
        counts = rng.integers(1, 1000, len(index))
        bounds, bucket_counts = explicit_bounds(index, counts)
        assert (np.diff(bounds) > 0).all() and len(bucket_counts) == len(bounds) + 1
        values = ExplicitBuckets(bounds, bucket_counts).values()
        back = LogSketch.from_values(np.repeat(values, bucket_counts))
        assert back.index.tolist() == np.maximum(index, 0).tolist() if (index > 0).all() else True
        assert back.count == counts.sum()
        if (index > 0).all():
            assert back.counts.astype(np.int64).tolist() == counts.tolist()


class Tiers:
    """``n`` aggregate window stages and a detect engine, in one process; each replica's
    requests go through the OTLP bytes, held back by ``delay`` steps per replica."""

    def __init__(self, n: int, delay=(0, 0, 0), wait: float = 1e9):
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        cfg = Config.defaults(**{**{k: getattr(CFG, k) for k in ("window", "allowed_lateness", "idle_timeout")},
                                 "replica_wait": wait, "replica_timeout": 1e9})
        self.detect = Engine(cfg, clock=clock)
        self.detect.replicas.settle = 0.0  # (every replica announces itself below, at once)
        self.stages = []
        for _ in range(n):
            w = WindowStage(cfg.window_ns, cfg.lateness_ns, cfg.idle_timeout, cfg.exemplars, clock=clock)
            w.partial = True
            self.stages.append(w)
        self.reported = [{} for _ in range(n)]
        self.held = [[] for _ in range(n)]
        self.delay = delay
        self.events = []
        for i in range(n):  # (each replica announces itself at start)
            self._deliver([data for data, _ in partials([], {}, f"r{i}", cfg.window_ns)])

    def requests(self, i: int, closed, full=False):
        w = self.stages[i]
        marks = {}
        for s, c in w.services.items():
            mark, name = (c.closed_through, len(c.windows)), w.tables.services[s]
            if full or self.reported[i].get(name) != mark:
                marks[name] = self.reported[i][name] = mark
        return [data for data, _ in partials(closed, marks, f"r{i}", w.window_ns, per_request=50)]

    def step(self, i: int, closed, full=False):
        self.held[i].append(self.requests(i, closed, full))
        while len(self.held[i]) > self.delay[i]:
            self._deliver(self.held[i].pop(0))

    def _deliver(self, requests):
        for data in requests:
            for r in self.detect.ingest_metrics(decode_metrics(data)):
                self.events += r.events

    def finish(self):
        for i, w in enumerate(self.stages):
            self.step(i, w.flush_all(), full=True)
            while self.held[i]:
                self._deliver(self.held[i].pop(0))
        for r in self.detect.flush_all():
            self.events += r.events


def _fields(events):
    return sorted(tuple(sorted((k, str(v)) for k, v in vars(e).items())) for e in events)


def _single(scenario):
    single = Engine(CFG, clock=lambda: 0.0)
    events = []
    for c in range(scenario.n_chunks):
        for r in single.ingest(scenario.chunk(c)):
            events += r.events
    for r in single.flush_all():
        events += r.events
    return events, single


@pytest.mark.parametrize("delay", [(0, 0, 0), (0, 3, 9)], ids=["in step", "replicas behind"])
def test_three_replicas_and_a_detect_engine_raise_what_one_engine_raises(scenario, delay):
    expected, single = _single(scenario)
    tiers = Tiers(3, delay)
    for c in range(scenario.n_chunks):
        b = scenario.chunk(c)
        replica = _replica_of(b, 3)
        for i, w in enumerate(tiers.stages):
            tiers.step(i, w.ingest(batch_rows(b, np.flatnonzero(replica == i))))
    tiers.finish()
    assert {e.type for e in expected} >= {"first_seen", "latency_regression", "new_exception", "rollout"}
    assert _fields(tiers.events) == _fields(expected)
    stats = tiers.detect.windows.stats
    assert stats["late"] == 0 and stats["spans"] == single.windows.stats["spans"]
    # the same baselines, bucket for bucket
    ids = tiers.detect.windows.tables._loc_ids
    for loc_id, loc in enumerate(single.windows.tables.locations):
        if loc is not None and single.baselines.baseline(loc_id) is not None:
            a, b = single.baselines.baseline(loc_id), tiers.detect.baselines.baseline(ids[loc.key])
            assert (a.windows, a.sketch.index.tolist(), a.sketch.counts.tolist()) == \
                (b.windows, b.sketch.index.tolist(), b.sketch.counts.tolist())


def test_a_replica_behind_holds_windows_until_it_reports_or_the_wait_ends(scenario):
    tiers = Tiers(2, delay=(0, 10_000), wait=30.0)
    tiers.detect.replicas.seen.pop("r1")  # (not announced yet)
    closed_at = []
    for c in range(scenario.n_chunks // 4):
        b = scenario.chunk(c)
        replica = _replica_of(b, 2)
        for i, w in enumerate(tiers.stages):
            tiers.step(i, w.ingest(batch_rows(b, np.flatnonzero(replica == i))))
    tiers.now = 1.0
    # replica 1 announced nothing yet: replica 0 alone is known, its windows close
    assert tiers.detect.windows.stats["windows"] > 0
    # now replica 1 announces itself: windows wait for it, up to replica_wait
    tiers._deliver([partials([], {}, "r1", CFG.window_ns)[0][0]])
    before = tiers.detect.windows.stats["windows"]
    for c in range(scenario.n_chunks // 4, scenario.n_chunks // 2):
        b = scenario.chunk(c)
        tiers.step(0, tiers.stages[0].ingest(batch_rows(b, np.flatnonzero(_replica_of(b, 2) == 0))))
    assert tiers.detect.windows.stats["windows"] == before, "closed without the replica known to hold them"
    tiers.now = 20.0
    closed_at.append(len(tiers.detect.flush_idle(20.0)))
    tiers.now = 40.0
    closed_at.append(len(tiers.detect.flush_idle(40.0)))
    assert closed_at[0] == 0 and closed_at[1] > 0, closed_at


def _spans(*at_s, function="shop.f"):
    """A batch of one 10 ms span ending at each of ``at_s`` seconds after T0."""
    end = np.array([T0 + int(t * SEC) for t in at_s], np.int64)
    n = len(end)
    return Batch([Location("prod", "shop", function)], [("shop", "1.0", "")], np.zeros(n, np.int32),
                 np.zeros(n, np.int32), end - 10 * MS, end, np.zeros(n, bool), np.full((n, 16), 7, np.uint8))


def test_a_replica_holding_a_window_open_is_waited_for_however_long():
    """A sparse service: replica 0's window stays open until its own next span passes it,
    long after replica 1 passed it; the detect replica waits (no figure is late)."""
    tiers = Tiers(2, wait=1.0)
    tiers.step(0, tiers.stages[0].ingest(_spans(30)))
    tiers.step(1, tiers.stages[1].ingest(_spans(80)))   # replica 1 passes window [0, 60)
    for t in (5.0, 60.0, 600.0):  # (processing time goes on: the wait is for replicas that never reported it)
        tiers.now = t
        tiers.detect.flush_idle(t)
    assert tiers.detect.windows.stats["windows"] == 0
    tiers.step(0, tiers.stages[0].ingest(_spans(100)))  # replica 0 passes it too: it closes, whole
    assert tiers.detect.windows.stats["windows"] == 1 and tiers.detect.windows.stats["late"] == 0
    tiers.finish()
    assert tiers.detect.windows.stats["spans"] == 3 and tiers.detect.windows.stats["late"] == 0


@pytest.mark.parametrize("returns", [True, False])
def test_a_restarted_detect_replica_waits_for_the_replicas_its_checkpoint_names(returns):
    """After a restart, a replica slower to reconnect than another (its spool holds the
    service's partials) is waited for: until it reports, or is dropped after the timeout."""
    tiers = Tiers(2)
    tiers.step(0, tiers.stages[0].ingest(_spans(10, 70)), full=True)
    tiers.step(1, tiers.stages[1].ingest(_spans(20, 80)), full=True)
    assert tiers.detect.windows.stats["windows"] == 1  # [0, 60)
    fields = checkpoint.dumps_dirty(tiers.detect)
    tiers.detect = Engine(tiers.detect.cfg, clock=lambda: tiers.now)  # (the restart)
    tiers.detect.replicas.settle = 0.0
    checkpoint.restore(tiers.detect, fields)
    tiers.step(0, tiers.stages[0].ingest(_spans(130)))  # replica 0 is back first, past [60, 120)
    assert tiers.detect.windows.stats["windows"] == 0
    if returns:
        tiers.step(1, tiers.stages[1].ingest(_spans(140)))  # replica 1's figures of [60, 120), then past it
        assert tiers.detect.windows.stats["windows"] == 1 and tiers.detect.windows.stats["late"] == 0
        tiers.finish()
        assert tiers.detect.windows.stats["spans"] == 4 and tiers.detect.windows.stats["late"] == 0
    else:
        tiers.detect.replicas.timeout = 30.0
        tiers.now = 40.0
        tiers.step(0, [], full=True)  # (replica 0 reports on)
        tiers.detect.flush_idle(40.0)  # replica 1 is dropped: replica 0's figures close the window
        assert tiers.detect.windows.stats["windows"] == 1 and tiers.detect.replicas.dropped == 1


def test_a_restored_replica_that_no_longer_reports_the_service_is_waited_for_the_timeout_only():
    """Alive (it reports another service) but silent on this one; and a name dropped in this
    run that a later service's checkpoint names again is not waited for."""
    r = Replicas(timeout=30.0, wait=10.0, settle=0.0)
    shop, cart, shoes = ("prod", "shop"), ("prod", "cart"), ("prod", "shoes")
    r.restore(shop, ["r0", "r1"], 1000, now=0.0)
    for t in (1.0, 10.0, 20.0, 29.0):
        r.report([Watermark("r0", shop, 1000 + int(t) * 60, 0, 60), Watermark("r1", cart, 5000, 0, 60)], now=t)
        assert r.watermark(shop, now=t) == 1000  # (r1 may hold shop's partials in its spool)
    assert shop in r.expire(now=30.0) and r.known == 2  # r1's mark on shop goes; r1 stays
    # (from now on r1 is a known replica that has not reported shop: replica_wait, as ever)
    assert r.watermark(shop, now=39.0) == 1000 + 29 * 60
    r.restore(cart, ["old"], 2000, now=31.0)
    assert r.known == 3
    r.report([Watermark("r0", shop, 3000, 0, 60), Watermark("r1", cart, 5000, 0, 60)], now=60.0)
    assert r.expire(now=61.0) and "old" not in r.seen and r.known == 2
    r.restore(shoes, ["old", "r0"], 3000, now=62.0)  # (old was dropped: only r0 is waited for)
    assert r.known == 2 and set(r.marks[shoes]) == {"r0"}


def test_a_restored_replica_dropped_as_silent_leaves_no_mark_behind():
    """agg-2, restored for two services, is dropped as silent; agg-0 is alive but never
    reports b: b's restored marks go by their time, one after the other, without a trace."""
    r = Replicas(timeout=30.0, wait=10.0, settle=0.0)
    a, b = ("prod", "a"), ("prod", "b")
    assert r.restore(a, ["agg-2"], 1000, now=0.0)
    assert r.restore(b, ["agg-0", "agg-2"], 1000, now=20.0)
    for t in (21.0, 34.0, 49.0):
        r.announce(["agg-0"], now=t)
    assert r.expire(now=35.0) and "agg-2" not in r.seen  # (silent since 0)
    assert b in r.expire(now=50.0) and r.watermark(b, now=50.0) is None  # (no replica reports b any more)
    assert not r.restore(a, ["agg-2"], 1000, now=51.0)  # (dropped in this run)


def test_data_before_its_watermark_does_not_close_windows_by_itself():
    """A first request holding only partials (the watermarks come in a later one): the
    service's windows wait for the replicas, not for its figures' own ends."""
    cfg = Config.defaults(window=60.0, allowed_lateness=0.0)
    stage = WindowStage(cfg.window_ns, 0, 1e9, 3, clock=lambda: 0.0)
    stage.partial = True
    closed = stage.ingest(_spans(10, 70, 130, 190))
    detect = Engine(cfg, clock=lambda: 0.0)
    for data, _ in partials(closed, {}, "r0", cfg.window_ns):
        detect.ingest_metrics(decode_metrics(data))
    assert detect.windows.stats["windows"] == 0 and detect.windows.open_windows() == 3


def test_a_service_no_replica_reports_closes_by_its_own_figures_again():
    tiers = Tiers(1)
    tiers.step(0, tiers.stages[0].ingest(_spans(10, 70)), full=True)
    tiers.now = 100.0
    tiers.detect.replicas.timeout = 30.0
    tiers.detect.flush_idle(100.0)  # the replica is dropped
    assert tiers.detect.replicas.known == 0
    # spans sent straight to the detect replica close its windows as spans do
    before = tiers.detect.windows.stats["windows"]
    tiers.detect.ingest(_spans(200, 300))
    assert tiers.detect.windows.stats["windows"] > before


def test_a_request_sent_again_is_taken_once():
    tiers = Tiers(1)
    closed = tiers.stages[0].ingest(_spans(10, 20, 70))
    (data, _), = partials(closed, {}, "r0", CFG.window_ns)
    again = sequenced(data, "r0", 42, 0)
    for _ in range(2):
        tiers.detect.ingest_metrics(decode_metrics(again))
    tiers.detect.ingest_metrics(decode_metrics(sequenced(data, "r0", 43, 0)))  # (another run of it: taken)
    assert tiers.detect.windows.stats["spans"] == 4 and tiers.detect.windows.stats["tier_duplicates"] == 1
    # A spool sent again from its start after a kill: every number up to the highest taken
    for n in (1, 2, 0, 1, 2):
        tiers.detect.ingest_metrics(decode_metrics(sequenced(data, "r0", 43, n)))
    assert tiers.detect.windows.stats["spans"] == 8 and tiers.detect.windows.stats["tier_duplicates"] == 4


def test_numbers_long_taken_and_requests_a_little_out_of_order_are_told_apart():
    replicas = Replicas(timeout=30, wait=10)
    assert all(replicas.first(("r0", 1, n)) for n in range(1500))
    assert not any(replicas.first(("r0", 1, n)) for n in (0, 5, 475, 1499))  # (a spool sent again from its start)
    assert replicas.first(("r0", 1, 1501)) and replicas.first(("r0", 1, 1500))  # (relayed out of order)
    assert replicas.first(("r0", 2, 0))  # (another run)


def test_requests_stay_under_the_byte_limit():
    rng = np.random.default_rng(5)
    stage = WindowStage(60 * SEC, 0, 1e9, 3, clock=lambda: 0.0)
    stage.partial = True
    n = 200_000
    locations = [Location("prod", "shop", f"shop.f{i}") for i in range(2000)]
    end = T0 + rng.integers(0, 59 * SEC, n)
    dur = np.exp(rng.uniform(np.log(1e5), np.log(3e9), n)).astype(np.int64)  # 100 us to 3 s
    end.sort()
    closed = stage.ingest(Batch(locations, [("shop", "1.0", "")], rng.integers(0, 2000, n).astype(np.int32),
                                np.zeros(n, np.int32), end - dur, end, np.zeros(n, bool),
                                rng.integers(0, 256, (n, 16), dtype=np.uint8)))
    requests = partials(closed + stage.flush_all(), {}, "r0", 60 * SEC, max_bytes=1 << 18)
    assert len(requests) > 4 and max(len(d) for d, _ in requests) < (1 << 18) + (1 << 14)
    assert sum(int(p.buckets.counts.sum()) for d, _ in requests for p in decode_metrics(d).points) == n


def test_a_silent_replica_is_dropped_after_the_timeout_and_counted():
    r = Replicas(timeout=30.0, wait=1e9, settle=0.0)
    svc = ("prod", "shop")
    r.report([Watermark("a", svc, 600, 1, 60), Watermark("b", svc, 120, 1, 60)], now=0.0)
    assert r.watermark(svc, now=1.0) == 120
    r.report([Watermark("a", svc, 900, 1, 60)], now=25.0)
    assert r.expire(now=29.0) == set() and r.watermark(svc, now=29.0) == 120
    assert r.expire(now=31.0) == {svc} and r.dropped == 1 and r.known == 1
    assert r.watermark(svc, now=31.0) == 900


def test_a_replica_with_another_window_length_is_refused_and_counted():
    stage = WindowStage(30 * 10**9, 0)
    stage.partial = True
    engine = Engine(CFG, clock=lambda: 0.0)
    data, n = partials([], {("prod", "shop"): (10**12, 1)}, "r0", stage.window_ns)[0]
    engine.ingest_metrics(decode_metrics(data))
    assert engine.windows.stats["tier_refused"] == 1 and engine.replicas.known == 0


def test_role_settings_are_checked_at_start():
    with pytest.raises(ConfigError, match="forward"):
        load_config(["--role", "aggregate"], environ={})
    with pytest.raises(ConfigError, match="only an aggregate replica forwards"):
        load_config(["--forward", "127.0.0.1:4317"], environ={})
    with pytest.raises(ConfigError, match="role"):
        load_config(["--role", "leader"], environ={})
    cfg = load_config(["--role", "aggregate", "--forward", "detect:4317", "--replica-id", "agg-0"], environ={})
    assert (cfg.role, cfg.forward, cfg.replica_name) == ("aggregate", "detect:4317", "agg-0")


def _around(a: str, b: str) -> tuple[str, str]:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[max(0, i - 150):i + 150], b[max(0, i - 150):i + 150]


def _settle(bf: BackflowProcess, spans: int):
    def settled():
        m = bf.metrics()
        return m if m["backflow_processed_spans_total"] == spans else None
    return bf.wait_for(settled, timeout=120, what=f"{spans} spans processed")


@pytest.mark.parametrize("detects, away", [(1, False), (2, False), (1, True)])
def test_three_aggregate_processes_and_detect_processes_publish_what_one_process_publishes(
        redis_server, redis_client, scenario, detects, away, tmp_path):
    """(``away``: the detect replica starts only after the aggregate replicas took every span
    and stopped, keeping their partials in their spools; started again, they send them.)"""
    enc = OtlpEncoder(scenario)
    everything, parts = [], [[] for _ in range(3)]
    per_service: dict[str, int] = {}
    for c in range(scenario.n_chunks):
        b = scenario.chunk(c)
        everything += enc.encode(b)
        names, counts = np.unique(np.array([loc.service for loc in b.locations])[b.loc], return_counts=True)
        for name, k in zip(names.tolist(), counts.tolist()):
            per_service[name] = per_service.get(name, 0) + k
        replica = _replica_of(b, 3)
        for i in range(3):
            parts[i] += enc.encode(batch_rows(b, np.flatnonzero(replica == i)))
    total = sum(count_spans(r) for r in everything)
    single, tiers = f"single{detects}{away}", f"tiers{detects}{away}"

    bf = BackflowProcess(redis_server.url, *FLAGS, prefix=single).start()
    try:
        send_lanes({"all": bf.grpc_target}, {"all": everything})
        _settle(bf, total)
    finally:
        assert bf.stop() == 0, bf.log

    # Detect replicas on one prefix; each aggregate replica sends each service's partials to one
    detect = [BackflowProcess(redis_server.url, *FLAGS, "--role", "detect", "--replica-wait", "600",
                              prefix=tiers) for _ in range(detects)]
    forward = ",".join(d.grpc_target for d in detect)

    def aggregate(i):
        return BackflowProcess(redis_server.url, *FLAGS, "--role", "aggregate", "--forward", forward,
                               "--replica-id", f"agg-{i}", "--spool-dir", str(tmp_path / f"agg-{i}"),
                               "--log-interval", "1", prefix="unused")
    aggregates = [aggregate(i) for i in range(3)]
    try:
        if away:
            for a in aggregates:
                a.start()
            send_lanes({f"agg-{i}": a.grpc_target for i, a in enumerate(aggregates)},
                       {f"agg-{i}": parts[i] for i in range(3)})
            for i, a in enumerate(aggregates):
                _settle(a, sum(count_spans(r) for r in parts[i]))
            assert [a.stop() for a in aggregates] == [0, 0, 0], [a.log for a in aggregates]
            assert all("the next start sends them first" in a.log for a in aggregates)
            assert all(any(p.stat().st_size for p in (tmp_path / f"agg-{i}").iterdir()) for i in range(3))
            parts = [[] for _ in range(3)]  # (nothing more to send: the spools hold it all)
            aggregates = [aggregate(i) for i in range(3)]
        for d in detect:
            d.start()
        for a in aggregates:
            a.start()
        for d in detect:
            d.wait_for(lambda: d.metrics()["backflow_tier_replicas"] == 3, timeout=30,
                       what="three aggregate replicas announced")
        send_lanes({f"agg-{i}": a.grpc_target for i, a in enumerate(aggregates)},
                   {f"agg-{i}": parts[i] for i in range(3)})
        for i, a in enumerate(aggregates):
            _settle(a, sum(count_spans(r) for r in parts[i]))
            a.wait_for(lambda: (m := a.metrics())["backflow_forward_pending_requests"] == 0 and m["backflow_forward_up"],
                       timeout=60, what="the partials taken by the detect replicas")
        assert [a.stop() for a in aggregates] == [0, 0, 0], [a.log for a in aggregates]
        assert all("data points of partials taken by the detect replicas" in a.log for a in aggregates)
        unused = next(line for line in aggregates[0].log.splitlines() if "an aggregate replica does not use" in line)
        assert "checkpoint_interval (--checkpoint-interval)" in unused and "redis_url (--redis-url)" in unused

        def all_processed():
            p = [d.metrics()["backflow_processed_spans_total"] for d in detect]
            return p if sum(p) == total else None
        processed = detect[0].wait_for(all_processed, timeout=120, what=f"{total} spans' partials processed")
        ring = HashRing([d.grpc_target for d in detect])  # (each service's partials to the ring's choice)
        assert processed == [sum(n for svc, n in per_service.items() if ring.backend_for(svc) == d.grpc_target)
                             for d in detect]
        assert all(d.metrics()["backflow_late_spans_total"] == 0 for d in detect)
    finally:
        for a in aggregates:
            a.stop()
        assert [d.stop() for d in detect] == [0] * detects, [d.log for d in detect]
    assert not redis_client.exists("unused:events"), "an aggregate replica wrote to Redis"

    def published(prefix):
        events = sorted(tuple(sorted(f.items())) for _, f in redis_client.xrange(f"{prefix}:events"))
        keys = redis_client.smembers(f"{prefix}:keys")
        return events, keys, {k: redis_client.hgetall(f"{prefix}:baseline:{k}") for k in keys}

    events1, keys1, baselines1 = published(single)
    events2, keys2, baselines2 = published(tiers)
    assert any(dict(e)["type"] == "latency_regression" for e in events1)
    if events2 != events1:  # (what differs, readably)
        only1, only2 = set(events1) - set(events2), set(events2) - set(events1)
        raise AssertionError(f"{len(events1)} vs {len(events2)} events; only in one process: "
                             f"{[dict(e)['summary'] for e in only1]}; only in tiers: {[dict(e)['summary'] for e in only2]}"
                             f"; fields that differ: {[_around(dict(a)[k], dict(b).get(k, '')) for a in only1 for b in only2 if dict(a)['summary'] == dict(b)['summary'] for k in dict(a) if dict(a)[k] != dict(b).get(k)]}")
    assert keys2 == keys1 and baselines2 == baselines1


def test_watermarks_of_services_beyond_max_services_hold_no_service():
    detect = Engine(Config.defaults(window=60.0, max_services=1), clock=lambda: 0.0)
    marks = {("prod", f"svc{i}"): (T0, 1) for i in range(3)}
    for data, _ in partials([], marks, "r0", 60 * SEC):
        detect.ingest_metrics(decode_metrics(data))
    assert len(detect.windows.services) == 1
