"""Rollouts (processor/detect/rollout.py): milestones, verdicts, the verdict hash, the
gauges and ``backflow verdict``, with spans from the OpenTelemetry SDK through a real
``backflow serve``, and the tracker's own rules in-process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from processor.detect.rollout import FAIL, INCONCLUSIVE, PASS, Rollouts, RolloutSettings
from processor.events import Event
from processor.pipeline.location import Location
from processor.pipeline.sketch import LogSketch
from processor.pipeline.window import ClosedWindow, LocationWindow, VersionFigures
from processor.report import trend

SEC, MS = 1_000_000_000, 1_000_000
WINDOW_S = 10
T0 = 1_700_000_000 * SEC


# --- in-process: the tracker's rules ---------------------------------------------------------

OLD, NEW = ("shop", "1.0", ""), ("shop", "1.1", "")
LOCS = [Location("prod", "shop", f"shop.f{i}") for i in range(3)]


def _window(i: int, calls: dict, slow: float = 1.0, errors: float = 0.0, seed: int = 0) -> ClosedWindow:
    """Window i of the service: ``calls`` per version at each location; the new version's
    first location ``slow`` times slower, and ``errors`` of its calls failed."""
    lws = []
    rng = np.random.default_rng([seed, i])
    for k, loc in enumerate(LOCS):
        vs = []
        for v, n in calls.items():
            if n:
                f = slow if (v == NEW and k == 0) else 1.0
                sk = LogSketch.from_values(rng.lognormal(np.log(5e6 * f), 0.3, n))
                vs.append(VersionFigures(v, n, int(n * errors) if v == NEW else 0, sk))
        if vs:
            sk = vs[0].sketch
            for v in vs[1:]:
                sk = sk.merge(v.sketch)
            lws.append(LocationWindow(k, loc, sum(v.count for v in vs), sum(v.errors for v in vs), sk, vs))
    return ClosedWindow("shop", i * 60 * SEC, (i + 1) * 60 * SEC, lws, "prod")


def _run(plan, settings=None, slow=1.0, errors=0.0, events=None):
    """Feed windows of (old calls, new calls); the events per window, and the tracker."""
    r = Rollouts(settings or RolloutSettings(), ("latency_regression",))
    first = {OLD: 60 * SEC}
    out = []
    for i, (o, n) in enumerate(plan):
        if n and NEW not in first:
            first[NEW] = (i + 1) * 60 * SEC
        got = r.window(_window(i, {OLD: o, NEW: n}, slow, errors), first, (events or {}).get(i, []), set())
        out.append([(e.detail["milestone"], e.detail["verdict"]) for e in got])
    return out, r


def test_a_clean_canary_passes_once_it_has_the_calls_and_completes_when_the_old_version_is_gone():
    plan = [(1000, 0)] * 2 + [(990, 10)] * 2 + [(900, 100)] * 3 + [(0, 1000)] * 6
    out, r = _run(plan)
    told = [m for w in out for m in w]
    assert told == [("first_calls", INCONCLUSIVE), ("share_10", INCONCLUSIVE), ("share_100", PASS),
                    ("previous_gone", PASS)]
    (state,) = r.services[("prod", "shop")].rollouts
    assert state.state == "complete" and r.services[("prod", "shop")].current == NEW


def test_a_slower_function_fails_the_rollout_over_the_same_windows_and_says_where():
    plan = [(1000, 0)] * 2 + [(900, 100)] * 4
    out, r = _run(plan, slow=1.6)
    told = [m for w in out for m in w]
    assert told[0] == ("first_calls", INCONCLUSIVE) and ("failed", FAIL) in told
    (state,) = r.services[("prod", "shop")].rollouts
    assert state.verdict == FAIL and any("p50 of shop.f0 1.6x in 1.1" in x for x in state.reasons)
    assert not any("shop.f1" in x for x in state.reasons)


def test_a_higher_error_share_fails_it_and_a_tiny_one_does_not():
    plan = [(1000, 0)] * 2 + [(900, 100)] * 5
    _, bad = _run(plan, errors=0.05)
    assert bad.services[("prod", "shop")].rollouts[0].verdict == FAIL
    assert "error share 5.00% in 1.1 against 0.00%" in bad.services[("prod", "shop")].rollouts[0].reasons[0]
    _, fine = _run(plan, errors=0.001)  # (0 errors in 100 calls a window: under error_increase)
    assert fine.services[("prod", "shop")].rollouts[0].verdict == PASS


def test_a_regression_attributed_to_the_version_fails_it_until_resolved():
    loc = LOCS[1]
    opened = Event("latency_regression", loc, NEW, 0, 0, "warning", "p50 of shop.f1 rose 1.4x in 1.1", {})
    resolved = Event("resolved", loc, OLD, 0, 0, "info", "recovered", {"resolves": "latency_regression"},
                     subject="latency_regression")
    other = Event("latency_regression", LOCS[2], OLD, 0, 0, "warning", "old version's", {})
    plan = [(1000, 0)] * 2 + [(900, 100)] * 5
    out, r = _run(plan, events={3: [opened, other], 5: [resolved]})
    assert out[3] == [("failed", FAIL)]
    state = r.services[("prod", "shop")].rollouts[0]
    assert state.verdict == PASS and state.regressions == {}


def test_too_few_calls_stay_inconclusive_saying_what_is_missing():
    out, r = _run([(1000, 0)] * 2 + [(999, 1)] * 4)
    state = r.services[("prod", "shop")].rollouts[0]
    assert state.verdict == INCONCLUSIVE and state.missing == ["500 calls of 1.1 (has 12)"]
    assert [m for w in out for m in w] == [("first_calls", INCONCLUSIVE)]


def test_a_rollback_ends_the_rollout_and_a_second_try_is_a_new_rollout():
    plan = [(1000, 0)] * 2 + [(900, 100)] * 2 + [(1000, 0)] * 5 + [(900, 100)]
    out, r = _run(plan)
    assert out[8] == [("rolled_back", INCONCLUSIVE)]
    assert out[9] == [("first_calls", INCONCLUSIVE)]
    first, second = r.services[("prod", "shop")].rollouts
    assert first.state == "rolled_back" and second.state == "active"
    assert r.services[("prod", "shop")].current == OLD


def test_the_state_survives_a_checkpoint_round_trip():
    import msgpack

    _, r = _run([(1000, 0)] * 2 + [(900, 100)] * 3, slow=1.6)
    blob = msgpack.packb(r.freeze(("prod", "shop")), use_bin_type=True)
    again = Rollouts(RolloutSettings())
    again.thaw(("prod", "shop"), msgpack.unpackb(blob, use_list=False, raw=False))
    a, b = r.services[("prod", "shop")].rollouts[0], again.services[("prod", "shop")].rollouts[0]
    assert a == b and again._watched_rows(b) == r._watched_rows(a)
    with pytest.raises(ValueError, match="rollout"):
        again.thaw(("prod", "other"), {"current": None, "rollouts": [{"version": "x"}]})


def _feed(plan, settings=None, events=None):
    """Windows of calls per version ("1.0": n, ...): the rollout events per window, the tracker."""
    r = Rollouts(settings or RolloutSettings(), ("latency_regression",))
    first, out = {}, []
    for i, calls in enumerate(plan):
        vs = {("shop", v, ""): n for v, n in calls.items()}
        for v, n in vs.items():
            if n:
                first.setdefault(v, (i + 1) * 60 * SEC)
        got = r.window(_window_of(i, vs), first, (events or {}).get(i, []), set())
        out.append([(e.version[1], e.detail["milestone"], e.detail["previous"]["version"]) for e in got])
    return out, r


def _window_of(i: int, calls: dict) -> ClosedWindow:
    vs = [VersionFigures(v, n, 0, LogSketch.from_values(np.full(n, 5e6))) for v, n in calls.items() if n]
    lw = LocationWindow(0, LOCS[0], sum(v.count for v in vs), 0, vs[0].sketch, vs)
    return ClosedWindow("shop", i * 60 * SEC, (i + 1) * 60 * SEC, [lw], "prod")


def test_a_third_version_during_a_rollout_is_compared_with_the_one_serving_most_and_each_ends_right():
    plan = ([{"1.0": 1000}, {"1.0": 900, "1.1": 100}, {"1.0": 400, "1.1": 500, "1.2": 100}]
            + [{"1.1": 800, "1.2": 200}] * 5)
    out, r = _feed(plan)
    assert ("1.2", "first_calls", "1.1") in out[2]  # (1.1 serves more than 1.0 in that window)
    assert ("1.1", "previous_gone", "1.0") in out[7]
    state = r.services[("prod", "shop")]
    assert state.current == ("shop", "1.1", "") and [x.version[1] for x in state.active()] == ["1.2"]
    # a canary gone while the version it was compared with serves most: rolled back to it;
    # gone while a third one took over: superseded
    out, r = _feed([{"1.0": 1000}, {"1.0": 900, "1.1": 100}] + [{"1.0": 900, "1.2": 100}] * 5)
    assert ("1.1", "rolled_back", "1.0") in out[-1]
    out, r = _feed([{"1.0": 1000}, {"1.0": 900, "1.1": 100}, {"1.0": 300, "1.1": 100, "1.2": 600}]
                   + [{"1.0": 300, "1.2": 700}] * 5)
    assert ("1.1", "superseded", "1.0") in out[-1]


def test_stray_calls_of_a_rolled_back_version_start_nothing_and_a_redeploy_does():
    base = [{"1.0": 1000}, {"1.0": 900, "1.1": 100}] + [{"1.0": 1000}] * 5
    out, r = _feed(base + [{"1.0": 1000, "1.1": 3}] * 3)  # 0.3%: a stray call, not a re-deploy
    assert [m for w in out[7:] for m in w] == []
    out, r = _feed(base + [{"1.0": 900, "1.1": 100}])
    assert out[-1] == [("1.1", "first_calls", "1.0")]
    assert [x.state for x in r.services[("prod", "shop")].rollouts] == ["rolled_back", "active"]


def test_one_shot_events_are_listed_not_held_open_and_dropped_rollouts_leave_the_hash():
    loc = LOCS[0]
    shots = [Event("new_exception", loc, NEW, 0, 0, "warning", "KeyError", {}, "KeyError"),
             Event("new_dependency", loc, NEW, 0, 0, "warning", "calls db", {"callee": "db.find"})]
    r = Rollouts(RolloutSettings(), ("latency_regression",))
    first = {OLD: 60 * SEC, NEW: 120 * SEC}
    r.window(_window(0, {OLD: 1000, NEW: 0}), first, [], set())
    r.window(_window(1, {OLD: 900, NEW: 100}), first, shots, set())
    (state,) = r.services[("prod", "shop")].rollouts
    assert state.regressions == {} and state.new_exceptions == [["shop.f0", "KeyError"]]
    assert state.new_dependencies == [["shop.f0", "db.find"]]
    # beyond the ended rollouts kept, the oldest ones' fields are deleted from the hash
    out, r = _feed([{"1.0": 1000}] + [w for k in range(5) for w in
                                      [{"1.0": 900, f"2.{k}": 100}] + [{"1.0": 1000}] * 5])
    deleted = [v["version"] for v in r.take_published() if v.get("deleted")]
    assert deleted == ["2.0", "2.1"]


def test_fail_on_names_regression_types_only():
    from processor.config import ConfigError
    from processor.detect.registry import parse_rollout_settings

    assert parse_rollout_settings({"fail_on": ["latency_regression"]}).fail_on == ("latency_regression",)
    with pytest.raises(ConfigError, match="rollouts.fail_on.*first_seen not among"):
        parse_rollout_settings({"fail_on": ["first_seen"]})
    with pytest.raises(ConfigError, match="rollouts.milestones"):
        parse_rollout_settings({"milestones": [0.1, 2]})


# --- a real `backflow serve`, spans from the OpenTelemetry SDK ----------------------------

def _traffic(target: str, service: str, plan: list[dict], slow: dict | None = None, first_window: int = 0) -> None:
    """Requests of ``service`` per window: ``plan[i]`` maps a version to its requests in
    window i; each request is a SERVER span (shop.api.get) calling a query
    (shop.db.find); ``slow[version]`` multiplies the query's time."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    rng = np.random.default_rng(len(service))
    providers = {}
    for v in sorted({v for w in plan for v in w}):
        p = TracerProvider(resource=Resource.create({
            "service.name": service, "service.version": v, "deployment.environment.name": "prod"}))
        p.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=target, insecure=True),
                                                max_export_batch_size=500, max_queue_size=100_000))
        providers[v] = p
    for w, versions in enumerate(plan, start=first_window):
        n = sum(versions.values())
        order = [v for v, k in sorted(versions.items()) for _ in range(k)]
        for r, v in enumerate(order):
            tracer = providers[v].get_tracer(service)
            start = T0 + w * WINDOW_S * SEC + int(r * (WINDOW_S - 1) * SEC / max(n, 1))
            query_ns = int(rng.lognormal(np.log(4 * MS * (slow or {}).get(v, 1.0)), 0.2))
            server = tracer.start_span("GET /items", start_time=start, kind=trace.SpanKind.SERVER,
                                       attributes={"code.function.name": f"{service}.api.get"})
            with trace.use_span(server, end_on_exit=False):
                q = tracer.start_span("SELECT", start_time=start + MS, kind=trace.SpanKind.CLIENT,
                                      attributes={"code.function.name": f"{service}.db.find"})
                q.end(end_time=start + MS + query_ns)
            server.end(end_time=start + 2 * MS + query_ns)
        for p in providers.values():  # (window by window: event time moves on in order)
            assert p.force_flush(30_000)
    for p in providers.values():
        p.shutdown()


def _rollout_events(redis_client, service: str) -> list[tuple[str, str, dict]]:
    import os
    if os.environ.get("PEEK"):
        for _, f in redis_client.xrange("backflow:events"):
            if f["service.name"] == service and f["type"] != "first_seen":
                print("PEEK", f["type"], f["window.end"], f["service.version"], f["summary"])
    out = []
    for _, f in redis_client.xrange("backflow:events"):
        if f["type"] == "rollout" and f["service.name"] == service:
            d = json.loads(f["detail"])
            out.append((d["milestone"], f["service.version"], d))
    return out


def _verdict(redis_client, service: str, version: str) -> dict:
    return json.loads(redis_client.hget(f"backflow:verdicts:prod:{service}", json.dumps([version, ""])))


@pytest.mark.e2e
def test_sdk_rollouts_through_serve_fail_pass_stay_inconclusive_and_roll_back(backflow, redis_client, redis_server,
                                                                             tmp_path):
    from tests.commands import backflow_command

    config = tmp_path / "backflow.yaml"
    config.write_text("rollouts:\n  min_calls: 20\n  min_windows: 1\n")
    bf = backflow("--window", str(WINDOW_S), "--allowed-lateness", "1", "--warmup-windows", "4",
                  "--config", str(config), "--trend-period", "600", "--trend-points", "60")  # (10 s buckets)
    base = [{"1.0": 300}] * 8
    # `verdict --wait` started before the canary: it returns once the fail is written
    waiter = subprocess.Popen([sys.executable, "-m", "processor", "verdict", "--service", "bad", "--version", "1.1",
                               "--environment", "prod", "--wait", "120s", "--interval", "0.2", "--redis-url",
                               redis_server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    canary = [{"1.0": 297, "1.1": 3}] * 2 + [{"1.0": 270, "1.1": 30}] * 3 + [{"1.1": 300}] * 6
    _traffic(bf.grpc_target, "bad", base + canary, slow={"1.1": 3.0})
    t_sent = time.monotonic()
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 1, out + err
    assert time.monotonic() - t_sent < 60 and out.startswith("bad 1.1 in prod: FAIL")
    _traffic(bf.grpc_target, "clean", base + [{"1.0": 270, "1.1": 30}, {"1.0": 150, "1.1": 150}]
             + [{"1.1": 300}] * 6)
    _traffic(bf.grpc_target, "few", base + [{"1.0": 299, "1.1": 1}] * 4)
    _traffic(bf.grpc_target, "back", base + [{"1.0": 270, "1.1": 30}] * 2 + [{"1.0": 300}] * 6)
    # the gauges a progressive delivery tool reads (deploy/argo-rollouts, deploy/flagger)
    gauge = 'backflow_version_{}{{environment="prod",service="{}",version="1.1"}}'.format
    bf.wait_for(lambda: (redis_client.hget("backflow:verdicts:prod:back", '["1.1", ""]') or "").find(
        '"rolled_back"') > 0, what="the rollback")
    m = bf.metrics()
    assert [m[gauge("verdict", s)] for s in ("clean", "bad", "few")] == [0, 2, 1]
    assert m[gauge("share", "clean")] == 1.0 and 0 < m[gauge("share", "few")] < 0.01
    assert gauge("verdict", "back") not in m  # (rolled back: it must not gate a retry)
    assert bf.stop(signal.SIGTERM) == 0

    bad = _rollout_events(redis_client, "bad")
    assert [m for m, _, _ in bad][:2] == ["first_calls", "share_10"] and all(v == "1.1" for _, v, _ in bad)
    assert bad[0][2]["verdict"] == INCONCLUSIVE
    ten = bad[1][2]
    assert ten["verdict"] == FAIL and any("bad.db.find" in r for r in ten["reasons"]), ten["reasons"]
    assert any(g["function"] == "bad.db.find" and g["type"] == "latency_regression" for g in ten["regressions"])
    assert [m for m, _, _ in bad][2:] == ["share_100", "previous_gone"]
    assert _verdict(redis_client, "bad", "1.1")["state"] == "complete"

    clean = _rollout_events(redis_client, "clean")
    assert [(m, d["verdict"]) for m, _, d in clean] == [
        ("first_calls", PASS), ("share_50", PASS), ("share_100", PASS), ("previous_gone", PASS)]
    assert {x["function"] for x in clean[-1][2]["entry_points"]} == {"clean.api.get"}

    few = _rollout_events(redis_client, "few")
    assert [(m, d["verdict"]) for m, _, d in few] == [("first_calls", INCONCLUSIVE)]
    assert _verdict(redis_client, "few", "1.1")["missing"] == ["20 calls of 1.1 (has 8)"]

    back = _rollout_events(redis_client, "back")
    assert [m for m, _, _ in back] == ["first_calls", "rolled_back"]
    assert _verdict(redis_client, "back", "1.1")["state"] == "rolled_back"

    # `report` reads the rollout events, and makes no code location of them
    from processor.report.store import read_production

    prod = read_production(redis_client, "backflow")
    assert any(e.type == "rollout" for e in prod.events)
    assert all(w.function for w in prod.locations().values())

    # `backflow verdict`: exit 0 pass, 1 fail, 3 inconclusive (or never seen), --json
    for service, code in (("clean", 0), ("bad", 1), ("few", 3)):
        p = backflow_command("verdict", "--service", service, "--version", "1.1", "--redis-url", redis_server.url)
        assert p.returncode == code, p.stdout + p.stderr
    p = backflow_command("verdict", "--service", "few", "--version", "1.1", "--json", "--redis-url", redis_server.url)
    assert json.loads(p.stdout)["missing"] == ["20 calls of 1.1 (has 8)"]
    p = backflow_command("verdict", "--service", "clean", "--version", "9.9", "--redis-url", redis_server.url)
    assert p.returncode == 3 and "no rollout of it seen yet" in p.stdout
    p = backflow_command("verdict", "--service", "clean", "--version", "1.1", "--wait", "soon",
                         "--redis-url", redis_server.url)
    assert p.returncode == 2 and "--wait" in p.stderr

    # `notify` with Slack's Web API: the rollout is a thread, its version's events reply in it
    from tests.test_notify import Webhook

    api = Webhook(slack_api=True)
    try:
        p = backflow_command("notify", "--redis-url", redis_server.url, "--slack-channel", "C0", "--slack-api",
                             api.url.rsplit("/services", 1)[0], "--no-follow", "--start", "all", "--service", "bad",
                             "--rate-per-minute", "6000", "--burst", "100",
                             env={"BACKFLOW_NOTIFY_SLACK_TOKEN": "xoxb-test"})
    finally:
        api.close()
    assert p.returncode == 0, p.stderr
    posts = [b for _, b in api.posts]
    kinds = [b["text"].split()[1] for b in posts]
    root = kinds.index("rollout")
    assert all(b.get("thread_ts") is None for b in posts[:root + 1])  # 1.0's first_seen events, then the root
    ts = f"{root + 1}.000100"
    replies = [(k, b.get("thread_ts")) for k, b in zip(kinds[root + 1:], posts[root + 1:])]
    assert ("latency_regression", ts) in replies and replies.count(("rollout", ts)) == 3
    # a rollout's message shows its locations' trends; `top --detail` a location's, per version
    shown = json.dumps(posts[root]["blocks"], ensure_ascii=False)
    assert "`bad.db.find`" in shown and "trend p50 " in shown
    p = backflow_command("top", "--once", "--detail", "bad.db.find", "--redis-url", redis_server.url)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    versions = {line.split()[0]: line.split()[2] for line in lines if line.strip().startswith(("1.0 ", "1.1 "))}
    assert set(versions) == {"1.0", "1.1"} and all(set(s) <= set(trend.BARS) for s in versions.values())
    everything = next(line for line in lines if line.strip().startswith("all versions")).split()
    spark = everything[3]  # the query 3x slower in 1.1: the last buckets are the highest bars
    assert spark[-1] == trend.BARS[-1] and spark[0] == trend.BARS[0]
    assert all(b.get("thread_ts") == ts for b in posts[root + 1:] if "bad@1.1" in b["text"])
    assert any("bad@1.1" in b["text"] and b["text"].split()[1] != "rollout" for b in posts[root + 1:])


def test_every_rollout_held_can_be_published_again(redis_server):
    """What the pipeline hands the sink when Redis comes back without its data."""
    import redis as redis_lib

    from processor.sinks.redis_streams import RedisSink

    _, r = _feed([{"1.0": 1000}, {"1.0": 900, "1.1": 100}] + [{"1.0": 1000}] * 5 + [{"1.0": 900, "1.2": 100}])
    states = r.states()
    assert [(s["environment"], s["service"], s["version"], s["state"]) for s in states] == [
        ("prod", "shop", "1.1", "rolled_back"), ("prod", "shop", "1.2", "active")]
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    sink = RedisSink(client, "t", 1000, 100)
    sink.start()
    try:
        sink.submit([], [], verdicts=states)
        assert sink.flush(10)
    finally:
        sink.stop(2)
    written = client.hgetall("t:verdicts:prod:shop")
    assert {json.loads(v)["version"] for v in written.values()} == {"1.1", "1.2"}
