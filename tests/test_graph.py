"""The call graph: spans joined to their parents' locations (processor/pipeline/graph.py),
its detectors (call_pattern, new_dependency) and the causes and impact it gives a latency
regression, driven through the engine with batches as the decoder makes them."""

import numpy as np
import pytest

from processor.config import Config
from processor.detect.registry import DetectorSettings
from processor.pipeline.engine import Engine
from processor.pipeline.graph import CallGraph
from processor.pipeline.location import Location
from processor.receiver.decode import Batch

U = np.uint64
SEC = 1_000_000_000
MS = 1_000_000


def spans(g: CallGraph, rows):
    """Add (trace, span, parent, loc, start, end, kind[, svc]) rows to ``g``."""
    cols = list(zip(*[(*r, 0) if len(r) == 7 else r for r in rows]))
    trace, span, parent, loc, start, end, kind, svc = cols
    g.add(np.array(trace, U), np.array(span, U), np.array(parent, U), np.array(loc), np.zeros(len(loc), int),
          np.array(svc), np.array(start), np.array(end), np.array(kind, np.uint8))


def test_children_sent_before_their_parent_in_another_request_are_joined_to_it():
    g = CallGraph(window_ns=100, wait_ns=5)
    spans(g, [(1, 11, 10, 1, 10, 20, 3), (1, 12, 10, 1, 30, 40, 3)])  # two queries, parent not here yet
    assert g.flush({0: 21}, {0: 0}) == 0 and g.waiting == 2  # recent: they wait
    spans(g, [(1, 10, 0, 0, 5, 50, 2)])                           # the parent, a SERVER span
    assert g.flush({0: 60}, {0: 0}) == 3 and g.waiting == 0
    fig = g.take(0, 0)
    assert (fig[0].calls, fig[0].children[1].calls, fig[0].children[1].ns) == (1, 2, 20)
    assert fig[0].self_ns == 45 - 20 and fig[1].entries == {0: [2, 20]}
    assert g.stats["orphans"] == 0 and g.stats["edges"] == 2


def test_a_parent_that_never_arrives_is_counted_and_its_child_kept_alone():
    g = CallGraph(window_ns=100, wait_ns=5)
    spans(g, [(1, 11, 99, 1, 10, 20, 3), (2, 21, 0, 0, 10, 30, 0)])
    g.flush({0: 99}, {0: 0})
    fig = g.take(0, 0)
    assert g.stats["orphans"] == 1 and fig[1].calls == 1 and not fig[1].entries and not fig[0].children


def test_self_time_merges_overlapping_children_and_clips_them_to_the_parent():
    g = CallGraph(window_ns=1000, wait_ns=0)
    spans(g, [(1, 1, 0, 0, 0, 100, 2),
              (1, 2, 1, 1, 10, 50, 3), (1, 3, 1, 1, 30, 70, 3),  # overlap: 10-70 covered
              (1, 4, 1, 2, 80, 90, 3), (1, 5, 1, 2, 95, 120, 3),  # the last runs past its parent's end
              (2, 6, 0, 0, 200, 300, 2), (2, 7, 6, 1, 200, 300, 3)])  # another trace: all covered
    g.flush({0: 10**6}, {0: 0})
    fig = g.take(0, 0)
    assert fig[0].ns == 200 and fig[0].child_ns == 60 + 10 + 5 + 100
    assert fig[0].children[2].ns == 10 + 25  # (an edge counts the child's whole time)


def test_entry_point_is_the_nearest_server_span_above():
    g = CallGraph(window_ns=1000, wait_ns=0)
    # root (frontend, client kind) -> server span of the service -> handler -> query
    spans(g, [(1, 1, 0, 0, 0, 100, 1), (1, 2, 1, 1, 5, 95, 2), (1, 3, 2, 2, 10, 90, 1), (1, 4, 3, 3, 20, 30, 3)])
    g.flush({0: 10**6}, {0: 0})
    fig = g.take(0, 0)
    assert fig[3].entries == {1: [1, 10]} and fig[2].entries == {1: [1, 80]}
    assert fig[1].entries == {0: [1, 90]}  # the SERVER span itself sits under the root


def test_a_cycle_of_parent_links_ends_and_has_no_entry_point():
    g = CallGraph(window_ns=1000, wait_ns=0)
    spans(g, [(1, 1, 2, 0, 0, 10, 1), (1, 2, 1, 1, 0, 10, 1), (1, 3, 3, 2, 0, 10, 1)])
    g.flush({0: 10**6}, {0: 0})
    fig = g.take(0, 0)
    assert all(not f.entries for f in fig.values()) and fig[0].children[1].calls == 1


def test_a_trace_with_a_recent_span_waits_whole():
    g = CallGraph(window_ns=1000, wait_ns=10)
    spans(g, [(1, 1, 0, 0, 0, 100, 2), (1, 2, 1, 1, 10, 20, 3), (2, 3, 0, 0, 0, 30, 2)])
    assert g.flush({0: 105}, {0: 0}) == 1  # trace 2 is complete; trace 1's root ended 5 ago
    assert g.flush({0: 110}, {0: 0}) == 2


def test_a_trace_is_complete_by_the_latest_clock_of_its_services():
    g = CallGraph(window_ns=1000, wait_ns=10)
    # the caller's service (0) is at 500; the callee's (1) sent nothing since its span ended
    spans(g, [(1, 1, 0, 0, 0, 100, 2, 0), (1, 2, 1, 1, 10, 20, 2, 1)])
    assert g.flush({0: 500, 1: 20}, {0: 0, 1: 0}) == 2
    assert g.take(0, 0)[0].children[1].calls == 1


def test_the_bound_joins_the_oldest_even_when_their_trace_goes_on():
    g = CallGraph(window_ns=1000, wait_ns=10, max_spans=2)
    spans(g, [(1, 1, 0, 0, 0, 100, 2), (1, 2, 1, 1, 10, 20, 3), (1, 3, 1, 1, 30, 40, 3), (1, 4, 1, 1, 50, 995, 3)])
    joined = g.flush({0: 1000}, {0: 0})  # the trace has a recent span: only the bound joins some
    assert joined == 2 and g.waiting == 2 and g.stats["forced"] == 2
    assert g.flush({0: 1000}, {0: 0}) == 0 and g.stats["forced"] == 2  # (counted once)


def test_figures_for_a_closed_window_are_late_and_the_bound_forces_the_oldest_out():
    g = CallGraph(window_ns=100, wait_ns=5, max_spans=2)
    spans(g, [(1, 1, 0, 0, 10, 20, 2)])
    g.flush({0: 30}, {0: 100})  # its window closed already
    assert g.stats["late"] == 1 and g.take(0, 0) == {}
    spans(g, [(2, 2, 0, 0, 110, 120, 2), (3, 3, 0, 0, 111, 121, 2), (4, 4, 0, 0, 112, 122, 2)])
    g.flush({0: 123}, {0: 100})  # all recent, one too many: the oldest goes
    assert g.stats["forced"] == 1 and g.waiting == 2


# --- through the engine -------------------------------------------------------------------

SHOP = [Location("prod", "shop", f) for f in ("shop.api.get_order", "shop.orders.load", "shop.db.find_items",
                                              "shop.db.find_customer", "shop.cache.get")]
API, LOAD, ITEMS, CUSTOMER, CACHE = range(5)


def engine(**detectors) -> Engine:
    d = DetectorSettings({("", "warmup_windows"): 5, **{(k.split(".")[0], k.split(".")[1]): v
                                                        for k, v in detectors.items()}})
    return Engine(Config.defaults(window=10.0, allowed_lateness=2.0, call_graph_wait=1.0, detectors=d,
                                  baseline_half_life=600.0), known_keys=set())


def requests(rng, w: int, n: int, version: str, queries: int, query_ms: float, customer: bool = False,
             trace0: int = 0) -> Batch:
    """``n`` requests in window ``w``: GET order (SERVER) -> orders.load -> ``queries`` item
    queries of ``query_ms`` each (one after another), [-> a customer query], then a cache read."""
    rows = []  # (trace, span, parent, loc, start, end, kind)
    for r in range(n):
        t = trace0 + w * 100_000 + r + 1
        start = 1_700_000_000 * SEC + w * 10 * SEC + int(rng.uniform(0, 6 * SEC))
        at = start + 2 * MS
        load_start = at
        children = []
        for _ in range(queries):
            d = int(rng.lognormal(np.log(query_ms * MS), 0.2))
            children.append((ITEMS, at, at + d))
            at += d
        if customer:
            children.append((CUSTOMER, at, at + 3 * MS))
            at += 3 * MS
        children.append((CACHE, at, at + MS // 2))
        at += MS // 2 + int(rng.lognormal(np.log(2 * MS), 0.2))  # own work
        load = (t, 2, 1, LOAD, load_start, at, 1)
        rows += [(t, 1, 0, API, start, at + MS, 2), load]
        rows += [(t, 10 + k, 2, loc, s, e, 3) for k, (loc, s, e) in enumerate(children)]
    rows.sort(key=lambda x: x[5])  # as they end: children first
    trace, span, parent, loc, start, end, kind = (np.array(c) for c in zip(*rows))
    n = len(rows)
    tid = np.zeros((n, 16), np.uint8)
    tid[:, :8] = trace.astype(">u8").view(np.uint8).reshape(n, 8)
    tid[:, 15] = 1
    return Batch(SHOP, [("shop", version, "")], loc.astype(np.int32), np.zeros(n, np.int32), start, end,
                 np.zeros(n, bool), tid, span_id=span.astype(U), parent_id=parent.astype(U),
                 kind=kind.astype(np.uint8))


def run(eng, windows, n=40, **change):
    """Windows of requests; ``change``: from window ``at`` on, version 2 with other settings."""
    rng = np.random.default_rng(3)
    at = change.pop("at", None)
    out = []
    for w in range(windows):
        kw = dict(queries=1, query_ms=4.0)
        version = "1"
        if at is not None and w >= at:
            kw.update(change)
            version = "2"
        for e in eng.ingest(requests(rng, w, n, version, **kw)):
            out += e.events
    for r in eng.flush_all():
        out += r.events
    return out


def test_an_n_plus_one_in_a_new_version_is_reported_on_the_caller_with_its_callee():
    events = run(engine(), 20, at=12, queries=25)
    pattern = [e for e in events if e.type == "call_pattern_regression"]
    assert len(pattern) == 1
    e = pattern[0]
    assert e.location.function == "shop.orders.load" and e.version[1] == "2"
    assert e.detail["callee"] == "shop.db.find_items" and e.detail["calls_per_call"] == pytest.approx(25)
    assert e.detail["baseline_calls_per_call"] == pytest.approx(1) and e.window_start_ns // (10 * SEC) % 1000 >= 12


def test_a_slower_child_under_an_unchanged_pattern_is_the_cause_and_its_entry_point_the_impact():
    events = run(engine(), 20, at=12, query_ms=20.0)
    assert not [e for e in events if e.type in ("call_pattern_regression", "new_dependency")]
    slow = [e for e in events if e.type == "latency_regression" and e.location.function == "shop.orders.load"]
    assert slow, [e.summary for e in events]
    top = slow[0].detail["causes"][0]
    assert top["callee"] == "shop.db.find_items" and top["share"] > 0.9 and top["mean_ratio"] > 3
    # the truth: 16 ms more per call of the caller, and per call of the entry point above it
    added = sum(c["added_ms"] for c in slow[0].detail["causes"])
    assert added == pytest.approx(16, rel=0.2)
    impact = slow[0].detail["impact"][0]
    assert impact["entry"] == "shop.api.get_order" and impact["added_ms"] == pytest.approx(16, rel=0.2)
    assert impact["relative"] == pytest.approx(16 / (2 + 4 + 0.5 + 2 + 1), rel=0.25)


def test_a_new_query_in_a_new_version_is_a_new_dependency():
    events = run(engine(), 16, at=10, customer=True)
    new = [e for e in events if e.type == "new_dependency"]
    assert [(e.location.function, e.detail["callee"], e.version[1], e.severity) for e in new] == [
        ("shop.orders.load", "shop.db.find_customer", "2", "warning")]


def test_steady_traffic_raises_no_call_graph_event():
    events = run(engine(), 30)
    assert not [e for e in events if e.type in ("call_pattern_regression", "new_dependency")]
    assert not [e for e in events if "causes" in e.detail]


def test_the_call_graph_can_be_turned_off():
    eng = Engine(Config.defaults(window=10.0, allowed_lateness=2.0, call_graph_wait=0.0), known_keys=set())
    assert eng.windows.graph is None
    rng = np.random.default_rng(1)
    results = eng.ingest(requests(rng, 0, 5, "1", 1, 4.0)) + eng.flush_all()
    assert results and all(r.window.graph == {} for r in results)


# --- a real `backflow serve`, spans from the OpenTelemetry SDK ----------------------------

def _sdk_requests(target, version, windows, per_call, first_window=0, requests_per_window=30):
    """A handler calling a query ``per_call`` times per request, nested as the SDK nests
    them (the current span is the parent), exported in batches: children before parents."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({
        "service.name": "shop", "service.version": version, "deployment.environment.name": "prod"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=target, insecure=True),
                                                   max_export_batch_size=200, max_queue_size=100_000))
    tracer = provider.get_tracer("shop")
    t0 = 1_700_000_000 * SEC
    for w in range(first_window, first_window + windows):
        for r in range(requests_per_window):
            start = t0 + w * 10 * SEC + r * 250 * MS
            server = tracer.start_span("GET /orders", start_time=start, kind=trace.SpanKind.SERVER,
                                       attributes={"code.function.name": "shop.api.get_orders"})
            with trace.use_span(server, end_on_exit=False):
                handler = tracer.start_span("load", start_time=start + MS,
                                            attributes={"code.function.name": "shop.orders.load"})
                with trace.use_span(handler, end_on_exit=False):
                    at = start + 2 * MS
                    for _ in range(per_call):
                        q = tracer.start_span("SELECT", start_time=at, kind=trace.SpanKind.CLIENT,
                                              attributes={"code.function.name": "shop.db.find_items"})
                        q.end(end_time=at + 3 * MS)
                        at += 3 * MS
                handler.end(end_time=at + MS)
            server.end(end_time=at + 2 * MS)
    assert provider.force_flush(30_000)
    provider.shutdown()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sdk_nested_spans_through_serve_give_edges_and_an_n_plus_one_event(backflow, redis_client, redis_server,
                                                                          workers):
    """With --workers 2 a trace's requests go to either receiver process: the join, on the
    pipeline, sees them all."""
    import json
    import signal

    from processor.pipeline.location import location_key

    bf = backflow("--window", "10", "--allowed-lateness", "2", "--call-graph-wait", "1",
                  "--warmup-windows", "4", "--workers", workers)
    _sdk_requests(bf.grpc_target, "1.0", windows=6, per_call=1)
    _sdk_requests(bf.grpc_target, "1.1", windows=2, per_call=12, first_window=6)
    # (every span but the last windows' is joined by now: their traces are complete)
    m = bf.wait_for(lambda: (m := bf.metrics()).get('backflow_graph_spans_total{outcome="joined"}', 0) >= 6 * 30 * 3
                    and m, what="joined spans")
    assert m['backflow_graph_spans_total{outcome="orphan"}'] == 0
    assert m['backflow_graph_spans_total{outcome="late"}'] == 0
    assert bf.stop(signal.SIGTERM) == 0
    load, query, api = (location_key("prod", "shop", f) for f in
                        ("shop.orders.load", "shop.db.find_items", "shop.api.get_orders"))
    edges = redis_client.hgetall(f"backflow:edges:{load}")
    assert edges["function"] == "shop.orders.load" and set(edges) >= {query, "calls", "self_ms_per_call"}
    child = json.loads(edges[query])
    assert child["function"] == "shop.db.find_items" and child["calls_per_call"] == 12
    assert child["versions"] == {"1.1": 12} and child["ms_per_call"] == pytest.approx(36, rel=0.02)
    assert float(edges["self_ms_per_call"]) == pytest.approx(2, rel=0.02)
    assert json.loads(redis_client.hget(f"backflow:callers:{query}", load))["function"] == "shop.orders.load"
    assert json.loads(redis_client.hgetall(f"backflow:edges:{api}")[load])["calls_per_call"] == 1
    events = [f for _, f in redis_client.xrange("backflow:events")]
    pattern = [e for e in events if e["type"] == "call_pattern_regression"]
    assert [(e["key"], e["service.version"], json.loads(e["detail"])["callee"]) for e in pattern] == [
        (load, "1.1", "shop.db.find_items")]
    # `report` reads the callees of each function, and prints them under its figures
    from processor.report.findings import callee_lines
    from processor.report.store import read_production

    callees = read_production(redis_client, "backflow").callees[load]
    assert [c["function"] for c in callees] == ["shop.db.find_items"]
    assert callee_lines(callees)[0].startswith("calls shop.db.find_items: 12 per call, 36 ms per call")
    # `top --calls`: the location's callees and callers
    from tests.commands import backflow_command

    p = backflow_command("top", "--once", "--calls", "shop.orders.load", "--redis-url", redis_server.url)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    callee = next(line for line in lines if line.endswith("shop.db.find_items")).split()
    assert callee[:2] == ["12", "36"] and float(callee[2].rstrip("%")) > 85
    assert "of which its own code 2 ms" in p.stdout
    assert lines[lines.index("called by:") + 2].split() == ["1", "95.0%", "shop.api.get_orders"]  # 38 of 40 ms


def test_the_edges_and_callers_hashes_conform_to_the_schema_and_a_bad_one_is_named():
    from processor.pipeline.graph import Child, LocationGraph
    from processor.schema import SchemaError, callers_from_hash, edges_from_hash
    from processor.sinks.redis_streams import edge_commands

    load, query = SHOP[LOAD], SHOP[ITEMS]
    v1, v2 = ("shop", "1", ""), ("shop", "2", "")
    g = LocationGraph(10, 50 * MS, 30 * MS, {v1: 4, v2: 6}, {query: Child(25, 30 * MS, {v1: 4, v2: 21})})
    (delete, gone), (_, edges_key, *pairs), (_, callers_key, caller, value) = edge_commands("bf", load, g, 20 * SEC)
    assert (delete, gone) == ("DEL", edges_key)  # (the caller's latest window only)
    fields = dict(zip(pairs[::2], pairs[1::2]))
    assert (edges_key, callers_key) == (f"bf:edges:{load.key}", f"bf:callers:{query.key}")
    msg = edges_from_hash(load.key, fields)
    assert (msg.calls, msg.self_ms_per_call, msg.updated) == (10, 2.0, 20_000)
    (callee,) = msg.callees
    assert (callee.key, callee.calls_per_call, dict(callee.versions)) == (query.key, 2.5, {"1": 1.0, "2": 3.5})
    assert callers_from_hash({caller: value})[0].time_share == pytest.approx(0.6)
    with pytest.raises(SchemaError, match="Callee field .cpc.: in [0-9a-f]{16} is not in the schema"):
        edges_from_hash(load.key, {**fields, query.key: fields[query.key].replace('"calls_per_call"', '"cpc"')})
    with pytest.raises(SchemaError, match="self_ms_per_call"):
        edges_from_hash(load.key, {k: v for k, v in fields.items() if k != "self_ms_per_call"})
