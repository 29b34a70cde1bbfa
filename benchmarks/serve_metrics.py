"""Reading a running ``backflow serve`` from the benchmarks that start one: its /healthz
and the counters of its /metrics page."""

from __future__ import annotations

import urllib.request
from collections import defaultdict


def _page(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(port: int, name: str) -> float:
    """A metric's samples summed over all its labels."""
    total = 0.0
    for line in _page(port).splitlines():
        if line.startswith(name):
            head, _, value = line.rpartition(" ")
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


def metric_by(port: int, name: str, label: str) -> dict[str, float]:
    """A counter's values summed per value of one label."""
    out: dict[str, float] = defaultdict(float)
    for line in _page(port).splitlines():
        if line.startswith(name + "{"):
            head, _, value = line.rpartition(" ")
            labels = dict(kv.split("=", 1) for kv in head[len(name) + 1:-1].split(",") if "=" in kv)
            out[labels.get(label, "").strip('"')] += float(value)
    return dict(out)


def healthy(port: int) -> bool:
    """Whether /healthz answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
