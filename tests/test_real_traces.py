"""benchmarks/real_traces.py on a tiny synthetic batch in the published format (CSV + label.json).

The real data (TraStrainer's OnlineBoutique traces) stay outside the repository; these tests
write a batch of the same shape, two services and one injected 5x slowdown, so that the
loading, the rules of what the spans show, the naive rule, the replay through a real
``backflow serve`` and the scoring run in CI.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from benchmarks import real_traces as rt

T_START = 1_661_140_800          # 2022-08-22 04:00:00 UTC
FAULT_AT = T_START + 360         # six minutes of normal traffic first
FAULT_S = 180
END = FAULT_AT + FAULT_S + 120
RATE = 30                         # traces per second
FRONTEND_POD = "frontend-579b9bff58-t2dbm"
BACKEND_POD = "cartservice-579f59597d-wc2lz"


def write_batch(root: str, slowdown: float = 5.0) -> str:
    """A batch folder: trace/HH_MM_trace.csv per minute of trace start, and label.json."""
    batch = os.path.join(root, "batch1")
    os.makedirs(os.path.join(batch, "trace"))
    rng = np.random.default_rng(7)
    n = (END - T_START) * RATE
    starts = T_START * rt.S + np.sort(rng.integers(0, (END - T_START) * rt.S, n))
    backend_ms = rng.lognormal(np.log(4.0), 0.25, n)
    in_fault = (starts >= FAULT_AT * rt.S) & (starts < (FAULT_AT + FAULT_S) * rt.S)
    backend_ms[in_fault] *= slowdown
    frontend_ms = backend_ms + rng.lognormal(np.log(1.5), 0.2, n)
    files: dict[str, list] = {}
    for i in range(n):
        st = int(starts[i])
        fe_end = st + int(frontend_ms[i] * 1e6)
        be_start = st + 200_000
        be_end = be_start + int(backend_ms[i] * 1e6)
        trace, root_id, child_id = f"{i + 1:032x}", f"{2 * i + 1:016x}", f"{2 * i + 2:016x}"
        minute = (st // rt.S) // 60
        name = f"{(minute // 60) % 24:02d}_{minute % 60:02d}_trace.csv"
        files.setdefault(name, []).extend([
            [trace, root_id, "root", FRONTEND_POD, "hipstershop.Frontend/Recv.", st, fe_end,
             (fe_end - st) // 1000],
            [trace, child_id, root_id, BACKEND_POD, "hipstershop.CartService/GetCart", be_start,
             be_end, (be_end - be_start) // 1000],
        ])
    for name, rows in files.items():
        with open(os.path.join(batch, "trace", name), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["TraceID", "SpanID", "ParentID", "PodName", "OperationName",
                        "StartTimeUnixNano", "EndTimeUnixNano", "Duration"])
            w.writerows(rows)
    label = {"04": [{"inject_time": "2022-08-22 04:06:00", "inject_timestamp": str(FAULT_AT),
                     "inject_pod": BACKEND_POD, "inject_type": "cpu_contention"}]}
    with open(os.path.join(batch, "label.json"), "w", encoding="utf-8") as f:
        json.dump(label, f)
    return batch


def test_rules_on_the_synthetic_batch(tmp_path):
    """Loading, callers, the shown rule and the naive rule, without a server."""
    batch = write_batch(str(tmp_path))
    tr = rt.load_traces(batch)
    assert len(tr) == 2 * (END - T_START) * RATE and tr.duplicates == 0
    assert tr.services == ["frontend", "cartservice"]
    assert bool(np.all(np.diff(tr.end) >= 0))
    assert rt.callers_of(tr) == {"frontend": set(), "cartservice": {"frontend"}}
    (fault,) = rt.load_labels(os.path.join(batch, "label.json"), "batch1")
    assert (fault.service, fault.t0_ns, fault.label_disagree_s) == ("cartservice", FAULT_AT * rt.S, 0)
    related = {"cartservice", "frontend"}
    sh = rt.shown(tr, fault, related, FAULT_S * rt.S)
    assert sh["shown"] and 4 < sh["max_p50_ratio"] < 6
    wt = rt.window_table(tr, 10 * rt.S)
    events, firing = rt.naive_events(tr, wt, 10 * rt.S)
    res = rt.score([fault], {fault.name: related}, {fault.name: sh}, events,
                   rt.location_hours(wt, 10 * rt.S), FAULT_S * rt.S, 120 * rt.S, kinds=("naive",))
    (row,) = res["faults"]
    assert row["found"] and 0 < row["delay_s"] <= 10
    # One event per location (a run of firing windows), until the slow windows fill the history.
    assert sorted(e["service"] for e in events) == ["cartservice", "frontend"]
    assert 2 <= firing <= 2 * rt.NAIVE_HISTORY and res["false_events"] == []


def test_label_times_that_disagree_take_the_earlier(tmp_path):
    path = tmp_path / "label.json"
    path.write_text(json.dumps({"03": [
        {"inject_time": "2022-08-22 03:53:10", "inject_timestamp": "1661140434",
         "inject_pod": "frontend-579b9bff58-t2dbm", "inject_type": "cpu_contention"},
        {"inject_time": "2022-08-22 07:10:43", "inject_timestamp": "1661152183",
         "inject_pod": "recommendationservice-6cfdd55578-gfj6q", "inject_type": "cpu_consumed"}]}))
    a, b = rt.load_labels(str(path), "b")
    assert a.t0_ns == 1661140390 * rt.S and a.label_disagree_s == 44
    assert b.t0_ns == 1661152183 * rt.S and b.label_disagree_s == -60
    assert (a.service, b.service) == ("frontend", "recommendationservice")


@pytest.mark.e2e
def test_a_slowdown_replayed_through_serve_is_found_and_scored(tmp_path):
    write_batch(str(tmp_path / "data"))
    out = tmp_path / "out.json"
    assert rt.main(["--data", str(tmp_path / "data"), "--runs", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (fault,) = doc["faults"]
    assert fault["shown"]["shown"] and fault["related"] == ["cartservice", "frontend"]
    (replay,) = doc["replays"][0]["batches"]
    assert replay["exit_status"] == 0 and replay["late"] == 0
    assert replay["processed"] == replay["spans"] == 2 * (END - T_START) * RATE
    (bf,) = doc["scores"][0]["backflow"]
    assert bf["found"], doc["events"]
    assert bf["event"]["service"] in ("cartservice", "frontend")
    assert bf["event"]["type"] == "latency_regression" and 0 < bf["delay_s"] <= 60
    (naive,) = doc["scores"][0]["naive"]
    assert naive["found"] and 0 < naive["delay_s"] <= 10
    assert doc["naive"]["shown"] == {"n": 1, "found": 1, "recall": 1.0,
                                     "median_delay_s": naive["delay_s"]}
    assert doc["backflow_runs"][0]["shown"]["found"] == 1
    assert doc["location_hours"] > 0 and doc["deterministic"]
