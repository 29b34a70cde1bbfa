"""backflow report: production baselines and events mapped onto a checkout (the fixture
repository tests/fixtures/shop_repo), SARIF checked against the official schema, never-seen
instrumented functions, and --since on a real git repository built from the fixture.

Redis is real: focused tests write the contract's keys with HSET/XADD; the end-to-end test
at the bottom feeds a real `backflow serve` with the OpenTelemetry SDK."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from processor.cli import main
from processor.pipeline.location import location_key
from processor.report.source import SourceIndex
from processor.sinks.versions import field_name

FIXTURE = Path(__file__).parent / "fixtures" / "shop_repo"
SCHEMA = Path(__file__).parent / "sarif" / "sarif-schema-2.1.0.json"
MIN = 60_000
T0_MS = 1_700_000_000_000


# --- writing what `backflow serve` writes (CONTRACT.md) ----------------------------------------

def put_baseline(r, function, file="", line="", service="shop", env="prod", version="1.0", revision="",
                 count=600, p50=20.0, p99=80.0, error_rate=0.005, prefix="backflow"):
    key = location_key(env, service, function)
    r.hset(f"{prefix}:baseline:{key}", mapping={
        "key": key, "service.name": service, "deployment.environment.name": env,
        "code.function.name": function, "code.file.path": file, "code.line.number": str(line),
        "otel.scope.name": "", "service.version": version, "vcs.ref.head.revision": revision,
        "count": str(count), "rate_per_s": str(count / 600), "p50_ms": str(p50), "p90_ms": str(p50 * 2),
        "p99_ms": str(p99), "p999_ms": str(p99 * 1.5), "error_rate": str(error_rate), "windows": "10",
        "updated": str(T0_MS + 10 * MIN)})
    r.sadd(f"{prefix}:keys", key)
    return key


def put_event(r, type_, function, severity, summary, file="", line="", service="shop", env="prod",
              version="1.0", revision="", window=0, detail=None, event_id=None, prefix="backflow"):
    key = location_key(env, service, function)
    r.xadd(f"{prefix}:events", {
        "id": event_id or f"{type_}-{key}-{window}", "type": type_, "key": key, "service.name": service,
        "deployment.environment.name": env, "code.function.name": function, "code.file.path": file,
        "code.line.number": str(line), "otel.scope.name": "", "service.version": version,
        "vcs.ref.head.revision": revision, "window.start": str(T0_MS + window * MIN),
        "window.end": str(T0_MS + (window + 1) * MIN), "severity": severity, "summary": summary,
        "detail": json.dumps(detail or {})})


def put_version(r, function, version, revision, calls, p50, p99, errors, first_window, windows,
                service="shop", env="prod", prefix="backflow"):
    """A {prefix}:versions:{key} record as processor/sinks/versions.py writes it."""
    key = location_key(env, service, function)
    r.hset(f"{prefix}:versions:{key}", field_name(version, revision), json.dumps({
        "calls": calls, "errors": errors, "windows": windows, "seconds": windows * 60,
        "p50_ms": p50, "p99_ms": p99, "first": T0_MS + first_window * MIN,
        "last": T0_MS + (first_window + windows) * MIN}))


def report(capsys, redis_server, *args):
    code = main(["report", "--redis-url", redis_server.url, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("BACKFLOW_REDIS_URL", raising=False)
    monkeypatch.delenv("BACKFLOW_PREFIX", raising=False)


# --- mapping onto the source tree ---------------------------------------------------------------

@pytest.fixture(scope="module")
def index():
    return SourceIndex.from_checkout(str(FIXTURE))


def test_absolute_production_paths_map_to_the_repository_file_by_longest_suffix(index):
    assert index.map_path("/app/shop/checkout.py") == "shop/checkout.py"
    assert index.map_path("shop/inventory.py") == "shop/inventory.py"
    assert index.map_path("/app/shop/billing.py") is None


def test_a_path_two_files_match_equally_well_maps_to_neither():
    idx = SourceIndex.from_sources({"a/util.py": "def f(): pass\n", "b/util.py": "def f(): pass\n"})
    assert idx.map_path("/srv/util.py") is None
    assert idx.map_path("/srv/b/util.py") == "b/util.py"


def test_qualified_names_resolve_to_methods_nested_classes_and_async_defs(index):
    for name in ("shop.checkout.Checkout.apply_discount", "checkout.Checkout.apply_discount",
                 "Checkout.apply_discount"):
        f = index.resolve(name)
        assert (f.path, f.line, f.qualname) == ("shop/checkout.py", 16, "Checkout.apply_discount"), name
    check = index.resolve("shop.checkout.Checkout.Rules.check")
    assert (check.line, check.is_async) == (23, True)
    assert index.resolve("inventory.reserve").path == "shop/inventory.py"
    assert index.resolve("billing.invoice") is None


def test_a_name_defined_in_two_modules_does_not_resolve_unless_qualified_enough():
    idx = SourceIndex.from_sources({"shop/a.py": "def run(): pass\n", "shop/b.py": "def run(): pass\n"})
    assert idx.resolve("run") is None
    assert idx.resolve("b.run").path == "shop/b.py"


def test_a_line_maps_to_the_innermost_enclosing_function():
    idx = SourceIndex.from_sources({"m.py": "def outer():\n    x = 1\n    def inner():\n        return x\n"
                                            "    return inner\n"})
    path, line, fn = idx.locate("whatever", "/app/m.py", "4")
    assert (path, line, fn.qualname) == ("m.py", 4, "outer.<locals>.inner")
    assert idx.locate("whatever", "/app/m.py", "5")[2].qualname == "outer"


def test_instrumented_functions_are_decorated_open_a_span_or_set_code_attributes(index):
    assert {f.dotted for f in index.instrumented()} == {
        "shop.checkout.Checkout.total", "shop.checkout.Checkout.apply_discount",
        "shop.checkout.Checkout.Rules.check", "shop.checkout.place_order",
        "shop.inventory.reserve", "shop.inventory.release", "shop.inventory.restock"}
    attrs_only = SourceIndex.from_sources({"m.py": "def f(span):\n    span.set_attribute('code.function.name', 'm.f')\n"
                                                   "def g():\n    def h():\n        with t.start_span('x'):\n"
                                                   "            pass\n"})
    assert [f.qualname for f in attrs_only.instrumented()] == ["f", "g.<locals>.h"]


def test_naming_the_attribute_is_not_instrumenting_and_tests_are_not_listed_as_never_seen():
    from processor.report.findings import build_report
    from processor.report.store import Production

    index = SourceIndex.from_sources({
        "app/parse.py": "def key_of(attrs):\n    return attrs.get('code.function.name')\n"
                        "FIELDS = ('code.function.name',)\n",
        "app/work.py": "def run(tracer):\n    with tracer.start_span('w', attributes={'code.function.name': 'run'}):\n"
                       "        pass\n"
                       "def spans(s):\n    s.set_attributes({'code.function.name': 'spans'})\n",
        "tests/test_work.py": "def test_run(tracer):\n    with tracer.start_as_current_span('t'):\n        pass\n",
    })
    assert [f.dotted for f in index.instrumented()] == ["app.work.run", "app.work.spans", "tests.test_work.test_run"]
    assert [f.dotted for f in build_report(index, Production()).never_seen] == ["app.work.run", "app.work.spans"]
    assert len(build_report(index, Production(), include_tests=True).never_seen) == 3


# --- the report --------------------------------------------------------------------------------

def _production(r):
    put_baseline(r, "shop.checkout.Checkout.apply_discount", "/app/shop/checkout.py", 18, p50=21.5, p99=95.0)
    put_event(r, "first_seen", "shop.checkout.Checkout.apply_discount", "info",
              "first call of shop.checkout.Checkout.apply_discount in 1.0", "/app/shop/checkout.py", 18)
    put_event(r, "latency_regression", "shop.checkout.Checkout.apply_discount", "critical",
              "p99 of shop.checkout.Checkout.apply_discount rose 2.1x (45 ms to 95 ms) in 1.0",
              "/app/shop/checkout.py", 18, window=40, event_id="evt-latency-1")
    put_baseline(r, "inventory.reserve", p50=3.0, p99=9.0, error_rate=0.02)       # a name only
    put_event(r, "new_exception", "inventory.reserve", "warning", "new exception ValueError at inventory.reserve",
              window=12)
    put_baseline(r, "span:checkout.total")                                       # no code attributes
    put_baseline(r, "billing.invoice", "/app/billing/invoice.py", 7)             # not in this checkout
    put_baseline(r, "shop.inventory.release", service="warehouse", env="staging")


def test_per_file_findings_show_figures_and_events_at_the_production_line(capsys, redis_server, redis_client):
    _production(redis_client)
    code, out, err = report(capsys, redis_server, "--repo", str(FIXTURE), "--service", "shop")
    assert code == 0, err
    lines = out.splitlines()
    at = lines.index("shop/checkout.py")
    assert lines[at + 1].split() == ["18", "shop.checkout.Checkout.apply_discount", "[prod/shop]"]
    assert "p50 21.5 ms  p99 95 ms  errors 0.50%" in lines[at + 2]
    assert lines[at + 3].strip().startswith("[info] first_seen in 1.0")
    assert lines[at + 4].strip() == ("[critical] latency_regression in 1.0 at 2023-11-14 22:53Z: p99 of "
                                     "shop.checkout.Checkout.apply_discount rose 2.1x (45 ms to 95 ms) in 1.0")
    inv = lines.index("shop/inventory.py")
    assert lines[inv + 1].split() == ["9", "shop.inventory.reserve", "(as", "inventory.reserve)", "[prod/shop]"]
    assert "errors 2.00%" in lines[inv + 2] and "[warning] new_exception" in lines[inv + 3]
    assert "Not found in this checkout (2):" in out
    assert "  billing.invoice  [prod/shop]  (/app/billing/invoice.py:7)" in lines
    assert "  span:checkout.total  [prod/shop]  (no code.file.path)" in lines
    assert "warehouse" not in out  # --service filter


def test_instrumented_functions_without_a_baseline_are_listed_as_never_seen(capsys, redis_server, redis_client):
    _production(redis_client)
    code, out, _ = report(capsys, redis_server, "--repo", str(FIXTURE), "--environment", "prod")
    assert code == 0
    tail = out[out.index("Instrumented functions never seen in production"):].splitlines()
    # Checkout.total is seen through its span name, reserve by name, apply_discount by file and
    # line; release only in staging, which --environment prod leaves out.
    assert tail == ["Instrumented functions never seen in production (4):",
                    "  shop/checkout.py:23  shop.checkout.Checkout.Rules.check",
                    "  shop/checkout.py:27  shop.checkout.place_order",
                    "  shop/inventory.py:17  shop.inventory.release",
                    "  shop/inventory.py:22  shop.inventory.restock"]
    _, everywhere, _ = report(capsys, redis_server, "--repo", str(FIXTURE))
    assert "shop.inventory.release" not in everywhere.split("never seen in production")[1]


def test_sarif_output_validates_against_the_sarif_2_1_0_schema(capsys, redis_server, redis_client, tmp_path):
    _production(redis_client)
    sarif = tmp_path / "backflow.sarif"
    code, out, _ = report(capsys, redis_server, "--repo", str(FIXTURE), "--service", "shop", "--sarif", str(sarif))
    assert code == 0 and "shop/checkout.py" in out
    doc = json.loads(sarif.read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(doc)

    run = doc["runs"][0]
    assert doc["version"] == "2.1.0" and run["tool"]["driver"]["name"] == "Backflow"
    rules = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert set(rules) == {"first_seen", "latency_regression", "new_exception", "instrumented_never_seen"}
    by_rule = {res["ruleId"]: res for res in run["results"] if res["ruleId"] != "instrumented_never_seen"}
    lat = by_rule["latency_regression"]
    assert lat["level"] == "error" and rules[lat["ruleIndex"]] == "latency_regression"
    assert lat["partialFingerprints"] == {"backflowEventId/v1": "evt-latency-1"}
    loc = lat["locations"][0]["physicalLocation"]
    assert loc == {"artifactLocation": {"uri": "shop/checkout.py", "uriBaseId": "SRCROOT"}, "region": {"startLine": 18}}
    assert by_rule["new_exception"]["level"] == "warning" and by_rule["first_seen"]["level"] == "note"
    assert by_rule["new_exception"]["locations"][0]["physicalLocation"]["region"] == {"startLine": 9}
    never = [res for res in run["results"] if res["ruleId"] == "instrumented_never_seen"]
    assert {res["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] for res in never} == {
        "shop.checkout.Checkout.Rules.check", "shop.checkout.place_order",
        "shop.inventory.release", "shop.inventory.restock"}
    assert all(res["level"] == "note" for res in never)
    assert run["originalUriBaseIds"]["SRCROOT"]["uri"] == FIXTURE.resolve().as_uri() + "/"


def test_a_sarif_document_that_breaks_the_schema_is_caught():
    schema = json.loads(SCHEMA.read_text())
    bad = {"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "Backflow"}},
                                         "results": [{"message": {"text": "x"}, "level": "fatal"}]}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validators.validator_for(schema)(schema).validate(bad)


# --- bad input ---------------------------------------------------------------------------------

def test_a_missing_repository_is_a_usage_error_with_exit_status_2(capsys, redis_server, tmp_path):
    code, out, err = report(capsys, redis_server, "--repo", str(tmp_path / "nope"))
    assert code == 2 and out == ""
    assert err == f"backflow report: --repo '{tmp_path / 'nope'}': no such directory\n"


def test_since_needs_a_git_checkout_and_a_known_revision(capsys, redis_server, tmp_path):
    code, _, err = report(capsys, redis_server, "--repo", str(tmp_path), "--since", "HEAD~1")
    assert code == 2 and "needs a git checkout" in err
    repo = _git_repo(tmp_path / "repo")
    code, _, err = report(capsys, redis_server, "--repo", str(repo), "--since", "no-such-tag")
    assert code == 2 and err.strip() == f"backflow report: --since no-such-tag: unknown revision 'no-such-tag' in {repo}"
    code, _, err = report(capsys, redis_server, "--repo", str(repo), "--since=--output=/tmp/x")
    assert code == 2 and "not a revision" in err


def test_a_bad_redis_url_is_a_usage_error_and_an_unreachable_redis_exit_1(capsys, redis_server):
    code, _, err = report(capsys, redis_server, "--repo", str(FIXTURE), "--redis-url", "http://x")
    assert code == 2 and err.startswith("backflow report: invalid redis_url: scheme must be")
    from processor.devtools.redis_server import free_port
    code, _, err = report(capsys, redis_server, "--repo", str(FIXTURE), "--redis-url",
                          f"redis://127.0.0.1:{free_port()}/0")
    assert code == 1 and "cannot read Redis at redis://127.0.0.1" in err


def test_redis_url_and_prefix_come_from_the_environment_like_serve(capsys, redis_server, redis_client, monkeypatch):
    put_baseline(redis_client, "inventory.reserve", prefix="bf2")
    monkeypatch.setenv("BACKFLOW_REDIS_URL", redis_server.url)
    monkeypatch.setenv("BACKFLOW_PREFIX", "bf2")
    assert main(["report", "--repo", str(FIXTURE)]) == 0
    assert "shop.inventory.reserve (as inventory.reserve)" in capsys.readouterr().out


# --- --since on a real git repository ----------------------------------------------------------

def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _git_repo(path: Path) -> Path:
    """The fixture as version 1.0 (tag v1.0), then 1.1 changing functions (tag v1.1)."""
    shutil.copytree(FIXTURE, path)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "add", ".")
    _git(path, "commit", "-q", "-m", "1.0")
    _git(path, "tag", "v1.0")
    checkout = path / "shop" / "checkout.py"
    text = checkout.read_text()
    text = text.replace("price * (100 - percent) / 100", "round_price(price * (100 - percent) / 100)")
    text = text.replace("def round_price(price):\n    return round(price, 2)\n",
                        "def round_price(price):\n    return round(price, 2)\n\n\n"
                        "@tracer.start_as_current_span(\"checkout.gift_wrap\")\ndef gift_wrap(order):\n"
                        "    return {**order, \"wrapped\": True}\n")
    checkout.write_text(text)
    inventory = path / "shop" / "inventory.py"
    text = inventory.read_text()
    start = text.index("def restock")
    inventory.write_text(text[:start].rstrip() + "\n")  # restock deleted
    _git(path, "commit", "-q", "-am", "1.1")
    _git(path, "tag", "v1.1")
    return path


def test_since_lists_changed_functions_with_figures_before_and_after_their_version(capsys, redis_server,
                                                                                  redis_client, tmp_path):
    repo = _git_repo(tmp_path / "repo")
    v10, v11 = _git(repo, "rev-parse", "v1.0"), _git(repo, "rev-parse", "v1.1")
    fn = "shop.checkout.Checkout.apply_discount"
    put_baseline(redis_client, fn, "/app/shop/checkout.py", 18, version="1.1", revision=v11)
    put_version(redis_client, fn, "1.0", v10, calls=6000, p50=20.0, p99=45.0, errors=6, first_window=0, windows=100)
    put_version(redis_client, fn, "1.1", v11, calls=3000, p50=21.0, p99=95.0, errors=60, first_window=100, windows=50)
    put_event(redis_client, "latency_regression", fn, "critical", "p99 of apply_discount rose 2.1x in 1.1",
              "/app/shop/checkout.py", 18, version="1.1", revision=v11, window=103)
    put_event(redis_client, "first_seen", fn, "info", "first call of apply_discount in 1.0",
              "/app/shop/checkout.py", 18, version="1.0", revision=v10, window=0)
    # gift_wrap arrives with 1.1; restock stops being called (its last version is 1.0)
    put_baseline(redis_client, "shop.checkout.gift_wrap", version="1.1", revision=v11)
    put_version(redis_client, "shop.checkout.gift_wrap", "1.1", v11, calls=50, p50=2.0, p99=4.0, errors=0,
                first_window=100, windows=50)
    put_baseline(redis_client, "shop.inventory.restock", version="1.0", revision=v10)
    put_version(redis_client, "shop.inventory.restock", "1.0", v10, calls=300, p50=5.0, p99=7.0, errors=3,
                first_window=0, windows=100)

    code, out, err = report(capsys, redis_server, "--repo", str(repo), "--since", "v1.0")
    assert code == 0, err
    since = out[out.index("Functions changed since v1.0"):].splitlines()
    assert since[0] == "Functions changed since v1.0 (3):"
    block = "\n".join(since)
    assert (f"  shop/checkout.py:16  shop.checkout.Checkout.apply_discount  modified in {v11[:12]}  [prod/shop]\n"
            f"      shipped in 1.1 ({v11[:12]})\n"
            "      before 1.0: 6000 calls, 1/s, p50 20 ms, p99 45 ms, errors 0.10% "
            "(100 windows, 2023-11-14 22:13Z to 2023-11-14 23:53Z)\n"
            "      after  1.1: 3000 calls, 1/s, p50 21 ms, p99 95 ms, errors 2.00% "
            "(50 windows, 2023-11-14 23:53Z to 2023-11-15 00:43Z)\n"
            "      event (after) [critical] latency_regression in 1.1 at 2023-11-14 23:56Z: "
            "p99 of apply_discount rose 2.1x in 1.1\n") in block
    assert "      event (before) [info] first_seen in 1.0" in block
    gift = block[block.index("shop.checkout.gift_wrap  added"):]
    assert "shipped in 1.1" in gift and "before -  (the function is new)" in gift and "after  1.1: 50 calls" in gift
    restock = block[block.index("shop.inventory.restock  deleted"):]
    assert "before 1.0: 300 calls" in restock and "after  -" in restock
    assert "(not called since 1.1 shipped)" in restock



# --- end to end: spans through a real `backflow serve`, then `backflow report` -------------------

@pytest.mark.e2e
def test_report_on_what_a_real_server_learnt_from_sdk_spans(backflow, redis_server, redis_client, tmp_path):
    from tests.test_e2e import SEC, send

    repo = _git_repo(tmp_path / "repo")
    v10, v11 = _git(repo, "rev-parse", "v1.0"), _git(repo, "rev-parse", "v1.1")
    bf = backflow("--window", "10", "--allowed-lateness", "0")
    t0 = 1_700_000_000 * SEC
    discount = {"code.function.name": "shop.checkout.Checkout.apply_discount",
                "code.file.path": "/app/shop/checkout.py", "code.line.number": 18}

    def spans(first_window, windows, ms, every_error=0):
        out = []
        for w in range(first_window, first_window + windows):
            for j in range(50):
                end = t0 + w * 10 * SEC + (j + 1) * SEC // 10
                out.append((end - ms * 1_000_000, end, discount, bool(every_error) and j % every_error == 0))
                if j % 10 == 0:  # no code attributes: the location is the span name
                    out.append((end - 3_000_000, end, {}, False, None, "inventory.reserve"))
        return out

    resource = {"service.name": "shop", "deployment.environment.name": "prod"}
    send(bf.grpc_target, spans(0, 3, 20), {**resource, "service.version": "1.0", "vcs.ref.head.revision": v10})
    send(bf.grpc_target, spans(3, 3, 40, every_error=10),
         {**resource, "service.version": "1.1", "vcs.ref.head.revision": v11})
    assert bf.stop() == 0  # SIGTERM: every window closed and written

    sarif = tmp_path / "report.sarif"
    p = subprocess.run([sys.executable, "-m", "processor", "report", "--repo", str(repo), "--since", "v1.0",
                        "--sarif", str(sarif)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "BACKFLOW_REDIS_URL": redis_server.url, "BACKFLOW_PREFIX": "backflow"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    at = lines.index("shop/checkout.py")
    assert lines[at + 1].split() == ["18", "shop.checkout.Checkout.apply_discount", "[prod/shop]"]
    # the baseline mixes both versions: labelled as a blend, each version's own figures below
    assert "300 calls, decayed, in 6 windows, blend of 1.1, 1.0)" in lines[at + 2]
    assert lines[at + 3].split()[:2] == ["1.1:", "5/s"] and lines[at + 4].split()[0] == "1.0:"
    assert lines[at + 5].strip().startswith("[info] first_seen in 1.0")
    assert "  span:inventory.reserve  [prod/shop]  (no code.file.path, 1 event)" in lines
    never = p.stdout[p.stdout.index("never seen in production"):]
    assert "shop.inventory.reserve" not in never  # seen through its span name
    assert "shop.checkout.gift_wrap" in never and "shop.inventory.release" in never

    block = p.stdout[p.stdout.index("shop.checkout.Checkout.apply_discount  modified"):].splitlines()
    assert block[1].strip() == f"shipped in 1.1 ({v11[:12]})"
    assert block[2].startswith("      before 1.0: 150 calls, 5/s, p50 20") and "errors 0.00% (3 windows" in block[2]
    assert block[3].startswith("      after  1.1: 150 calls, 5/s, p50 40") and "errors 10.00% (3 windows" in block[3]

    doc = json.loads(sarif.read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(doc)
    first = [r for r in doc["runs"][0]["results"] if r["ruleId"] == "first_seen"]
    assert first[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "shop/checkout.py"
