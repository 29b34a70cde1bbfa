"""The conformance check of tests/conftest.py really runs: a test whose `backflow serve`
Redis holds a record that does not conform to proto/backflow/v1 fails at teardown, naming
the record and the field; one whose records conform passes and is counted.

The two probes below are collected only when BACKFLOW_SCHEMA_PROBE is set: the tests run
them in a pytest of their own and read its outcome."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_e2e import SEC, T0, send

ROOT = Path(__file__).resolve().parents[1]


def send_first_calls(target: str, functions: list[str]) -> None:
    """A few spans of each function in one 10 s window, through the SDK."""
    send(target, [(T0 + i * SEC, T0 + i * SEC + 5_000_000, {"code.function.name": f})
                  for f in functions for i in range(3)])

if os.environ.get("BACKFLOW_SCHEMA_PROBE"):
    def test_probe_serve_writes_conforming_records(backflow, redis_client):
        bf = backflow("--window", "10", "--allowed-lateness", "0", prefix="probe")
        send_first_calls(bf.grpc_target, ["shop.cart.add_item", "shop.cart.apply_discount"])
        assert bf.stop() == 0
        assert redis_client.xlen("probe:events") == 2

    def test_probe_a_bad_event_beside_what_serve_wrote(backflow, redis_client):
        bf = backflow("--window", "10", "--allowed-lateness", "0", prefix="probe")
        send_first_calls(bf.grpc_target, ["shop.cart.add_item"])
        assert bf.stop() == 0
        [(_, good)] = redis_client.xrange("probe:events")
        redis_client.xadd("probe:events", {**good, "window.end": "soon"})


def probe(name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           f"{__file__}::{name}"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "BACKFLOW_SCHEMA_PROBE": "1"})


@pytest.mark.e2e
def test_records_serve_wrote_are_read_and_counted():
    p = probe("test_probe_serve_writes_conforming_records")
    assert p.returncode == 0, p.stdout + p.stderr
    assert ("proto/backflow/v1 conformance: 2 events, 2 baselines, 2 version summaries, 0 call-graph "
            "hashes and 0 rollout verdicts checked after 1 tests that started backflow serve, 0 not conforming"
            ) in p.stdout


@pytest.mark.e2e
def test_a_record_that_does_not_conform_fails_the_test_naming_the_field():
    p = probe("test_probe_a_bad_event_beside_what_serve_wrote")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 passed, 1 error" in p.stdout
    assert "ERROR at teardown of test_probe_a_bad_event_beside_what_serve_wrote" in p.stdout
    assert "1 records in Redis do not conform to proto/backflow/v1" in p.stdout
    assert ("2 events, 1 baselines, 1 version summaries, 0 call-graph hashes and 0 rollout verdicts checked "
            "after 1 tests") in p.stdout
    assert "1 not conforming" in p.stdout
    assert "probe:events entry" in p.stdout and "Event field 'window.end': 'soon' is not an integer" in p.stdout
