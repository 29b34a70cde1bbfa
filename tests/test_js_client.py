"""A consumer in another language (docs/schema.md): spans from the OpenTelemetry JS SDK go to
a real `backflow serve`, and a Node.js consumer reads {prefix}:events with XREAD and decodes
each entry per proto/backflow/v1, loading the .proto with protobufjs (tests/js/).

tests/js/node_modules comes from `make node-deps` (part of `make test`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from processor.pipeline.location import location_key
from processor.schema import Event, from_fields

JS = Path(__file__).resolve().parent / "js"
T0_MS = 1_700_000_000_000  # a window boundary for 10 s windows, in the past
FUNCTIONS = ["shop.cart.add_item", "shop.cart.apply_discount", "shop.checkout.pay"]


def node() -> str:
    path = shutil.which("node")
    if path is None or not (JS / "node_modules" / "protobufjs").is_dir():
        pytest.fail("needs Node.js and tests/js/node_modules: run `make node-deps`")
    return path


@pytest.mark.e2e
def test_a_node_consumer_decodes_the_first_seen_events_of_spans_from_the_js_sdk(backflow, redis_server,
                                                                                 redis_client):
    bf = backflow("--window", "10", "--allowed-lateness", "0", prefix="js")
    # Started first: it waits on XREAD BLOCK until the events arrive.
    consumer = subprocess.Popen([node(), "consume.js", "--redis-url", redis_server.url, "--prefix", "js",
                                 "--count", str(len(FUNCTIONS)), "--timeout-ms", "60000"],
                                cwd=JS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sent = subprocess.run([node(), "send-spans.js", "--target", bf.grpc_target, "--service", "shop-js",
                               "--version", "2.0.0", "--revision", "9f2c4e1", "--start-ms", str(T0_MS),
                               "--calls", "3", *FUNCTIONS], cwd=JS, capture_output=True, text=True, timeout=60, check=False)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout) == {"sent": 9}
        assert bf.stop() == 0  # SIGTERM: the window is closed and its first_seen events written
        out, err = consumer.communicate(timeout=90)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    assert consumer.returncode == 0, err
    assert f"read {len(FUNCTIONS)} events from js:events" in err
    lines = [json.loads(line) for line in out.splitlines()]
    events = {line["event"]["code_function_name"]: line for line in lines}
    assert sorted(events) == FUNCTIONS

    for n, function in enumerate(FUNCTIONS):
        line = events[function]
        e = line["event"]
        assert len(e["id"]) == 24 and e["summary"].startswith(f"{function} (")
        assert {k: v for k, v in e.items() if k not in ("id", "summary", "detail")} == {
            "type": "first_seen",
            "key": location_key("prod", "shop-js", function),
            "service_name": "shop-js",
            "deployment_environment_name": "prod",
            "code_function_name": function,
            "code_file_path": function.rsplit(".", 1)[0].replace(".", "/") + ".js",
            "code_line_number": str(10 + n),
            "otel_scope_name": "shop.js",  # the tracer's, kept beside code locations too
            "service_version": "2.0.0",
            "vcs_ref_head_revision": "9f2c4e1",
            "window_start": str(T0_MS),  # int64: a string in JSON, as proto3's JSON mapping writes it
            "window_end": str(T0_MS + 10_000),
            "severity": "info",
            "owners": "",
        }
        assert line["detail"]["count"] == 3 and line["detail"]["errors"] == 0

    # The Node consumer and the Python converter read every entry alike.
    py = {entry_id: MessageToDict(from_fields(Event, fields), preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True)
          for entry_id, fields in redis_client.xrange("js:events")}
    assert {line["stream_id"]: line["event"] for line in lines} == py


@pytest.mark.e2e
def test_the_node_consumer_refuses_an_entry_that_does_not_conform_naming_the_field(redis_server, redis_client):
    from tests.test_schema import event_record

    redis_client.xadd("bad:events", event_record())
    redis_client.xadd("bad:events", {**event_record(), "window.end": "soon"})
    p = subprocess.run([node(), "consume.js", "--redis-url", redis_server.url, "--prefix", "bad",
                        "--count", "2", "--timeout-ms", "5000"], cwd=JS, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 1
    assert len(p.stdout.splitlines()) == 1  # the good one
    assert "Event field 'window.end': 'soon' is not an integer" in p.stderr
    redis_client.xadd("unknown:events", {**event_record(), "colour": "red"})
    p = subprocess.run([node(), "consume.js", "--redis-url", redis_server.url, "--prefix", "unknown",
                        "--count", "1", "--timeout-ms", "5000"], cwd=JS, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 1 and "Event field 'colour': is not in the schema" in p.stderr


@pytest.mark.e2e
def test_auto_instrumented_http_spans_are_keyed_by_their_operation(backflow, redis_server, redis_client):
    """The JS HTTP instrumentation's spans carry no code attributes and are all named GET or
    POST: keyed by kind and method (and the peer, for a client), not by the span name."""
    redis_client.flushall()
    bf = backflow("--window", "1", "--allowed-lateness", "0")
    env = {"PATH": os.environ["PATH"], "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{bf.grpc_target}",
           "OTEL_SERVICE_NAME": "shop-node", "OTEL_RESOURCE_ATTRIBUTES": "service.version=3.1.0"}
    sent = subprocess.run([node(), "http-spans.js"], cwd=JS, env=env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    bf.wait_for(lambda: bf.metrics().get("backflow_processed_spans_total") == 20, what="20 spans processed")
    assert bf.stop() == 0
    first_seen = sorted(f["code.function.name"] for _, f in redis_client.xrange("backflow:events")
                        if f["type"] == "first_seen" and f["service.name"] == "shop-node")
    assert first_seen == ["http.client:GET localhost", "http.client:POST localhost", "http.server:GET",
                          "http.server:POST"]
