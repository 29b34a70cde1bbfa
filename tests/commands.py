"""Helpers for the tests of the consumer commands (tail, top, notify): events written to a
real Redis in the contract's format, and ``backflow <command>`` run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SHOP = {"service.name": "shop", "deployment.environment.name": "prod", "service.version": "2.0.0",
        "vcs.ref.head.revision": "", "otel.scope.name": "shop"}


def event_fields(type_: str, function: str, file: str = "", line: str = "1", *, key: str | None = None,
                 window_end_ms: int = 1_700_000_060_000, window_ms: int = 10_000, severity: str = "warning",
                 summary: str | None = None, owners: str = "", detail: dict | None = None,
                 **identity) -> dict[str, str]:
    """An event as CONTRACT.md publishes it (every field, empty where unknown)."""
    fields = {"id": f"{function}-{type_}-{window_end_ms}", "type": type_, "key": key or f"k-{function}",
              **SHOP, **identity, "code.function.name": function, "code.file.path": file,
              "code.line.number": line if file else "",
              "window.start": str(window_end_ms - window_ms), "window.end": str(window_end_ms),
              "severity": severity, "summary": summary or f"{type_} at {function}",
              "detail": json.dumps(detail or {}), "owners": owners}
    return fields


def add_events(client, events: list[dict[str, str]], prefix: str = "backflow") -> list[str]:
    return [client.xadd(f"{prefix}:events", e) for e in events]


def backflow_command(*args: str, env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """``backflow ARGS`` as the console script runs it, to completion."""
    return subprocess.run([sys.executable, "-m", "processor", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **kw)


def start_command(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``backflow ARGS`` left running (``follow`` modes); stdout line-buffered text."""
    return subprocess.Popen([sys.executable, "-m", "processor", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
