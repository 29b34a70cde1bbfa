"""SARIF 2.1.0 for code-scanning views (GitHub code scanning, IDE SARIF viewers).

One rule per event type present, plus ``instrumented_never_seen``. Each event placed in the
checkout is a result: level from its severity (critical -> error, warning -> warning,
info -> note), its file relative to the repository (``uriBaseId`` ``SRCROOT``) and line,
and ``partialFingerprints`` from the event id, so that a viewer recognises the same event
across uploads. Events that could not be placed in the checkout are left out (a result
without a location cannot be shown beside code); the text report lists them.
tests/test_report.py validates the output against the official schema.
"""

from __future__ import annotations

from pathlib import Path

from processor import __version__
from processor.detect.registry import DESCRIPTIONS as EVENT_DESCRIPTIONS
from processor.report.findings import Report

SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
LEVELS = {"critical": "error", "warning": "warning", "info": "note"}
NEVER_SEEN = "instrumented_never_seen"
DESCRIPTIONS = {**EVENT_DESCRIPTIONS, NEVER_SEEN: "An instrumented function that production never reported."}


def _rule(rule_id: str, level: str) -> dict:
    return {"id": rule_id,
            "name": "".join(p.capitalize() for p in rule_id.split("_")),
            "shortDescription": {"text": DESCRIPTIONS.get(rule_id, f"Backflow event {rule_id}.")},
            "defaultConfiguration": {"level": level}}


def _location(path: str, line: int | None, name: str) -> dict:
    physical: dict = {"artifactLocation": {"uri": path, "uriBaseId": "SRCROOT"}}
    if line:
        physical["region"] = {"startLine": line}
    return {"physicalLocation": physical,
            "logicalLocations": [{"fullyQualifiedName": name, "kind": "function"}]}


def sarif_log(report: Report, repo: str) -> dict:
    rules: list[dict] = []
    index: dict[str, int] = {}

    def rule_index(rule_id: str, level: str) -> int:
        if rule_id not in index:
            index[rule_id] = len(rules)
            rules.append(_rule(rule_id, level))
        return index[rule_id]

    results: list[dict] = []
    for path, findings in report.by_file.items():
        for f in findings:
            for e in f.events:
                level = LEVELS.get(e.severity, "warning")
                w = e.where
                results.append({
                    "ruleId": e.type or "event",
                    "ruleIndex": rule_index(e.type or "event", level),
                    "level": level,
                    "message": {"text": e.summary or f"{e.type} at {w.function}"},
                    "locations": [_location(path, f.line, f.function.dotted if f.function else w.function)],
                    "partialFingerprints": {"backflowEventId/v1": e.id},
                    "properties": {
                        "service.name": w.service, "deployment.environment.name": w.environment,
                        "code.function.name": w.function, "service.version": e.version,
                        "vcs.ref.head.revision": e.revision, "window.start": e.window_start_ms,
                        "window.end": e.window_end_ms, "severity": e.severity, "detail": e.detail,
                    },
                })
    for fn in report.never_seen:
        results.append({
            "ruleId": NEVER_SEEN,
            "ruleIndex": rule_index(NEVER_SEEN, "note"),
            "level": "note",
            "message": {"text": f"{fn.dotted} is instrumented but production never reported it"},
            "locations": [_location(fn.path, fn.line, fn.dotted)],
            "partialFingerprints": {"backflowFunction/v1": fn.dotted},
        })
    return {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "Backflow", "version": __version__, "rules": rules}},
            "originalUriBaseIds": {"SRCROOT": {"uri": Path(repo).resolve().as_uri() + "/"}},
            "results": results,
        }],
    }
