"""Production mapped onto the checkout: findings per file, what could not be placed, and the
instrumented functions production never reported."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from processor.report.source import SPAN_MARK, Function, SourceIndex, is_test_path
from processor.report.store import BaselineRecord, EventRecord, Production, VersionRecord, Where, blended


@dataclass
class Finding:
    """One production location: where it is in the checkout (if found) and what it did."""
    where: Where
    path: str | None
    line: int | None
    function: Function | None
    baseline: BaselineRecord | None
    events: list[EventRecord] = field(default_factory=list)
    versions: list[VersionRecord] = field(default_factory=list)  # its version summaries
    callees: list[dict] = field(default_factory=list)  # what it calls (the call graph), largest share first


@dataclass
class Report:
    by_file: dict[str, list[Finding]]
    unmapped: list[Finding]
    never_seen: list[Function]

    @property
    def findings(self) -> list[Finding]:
        return [f for fs in self.by_file.values() for f in fs] + self.unmapped


def build_report(index: SourceIndex, prod: Production, include_tests: bool = False) -> Report:
    by_file: dict[str, list[Finding]] = {}
    unmapped: list[Finding] = []
    events_by_key: dict[str, list[EventRecord]] = {}
    for e in prod.events:
        events_by_key.setdefault(e.where.key, []).append(e)
    seen: set[tuple[str, str]] = set()
    span_names: set[str] = set()
    for key, where in sorted(prod.locations().items(), key=lambda kv: (kv[1].service, kv[1].function)):
        path, line, fn = index.locate(where.function, where.file, where.line)
        finding = Finding(where, path, line, fn, prod.baselines.get(key), events_by_key.get(key, []),
                          prod.versions.get(key, []), prod.callees.get(key, []))
        if where.function.startswith(SPAN_MARK):
            span_names.add(where.function[len(SPAN_MARK):])
        if fn is not None:
            seen.add((fn.path, fn.qualname))
        (by_file.setdefault(path, []) if path else unmapped).append(finding)
    for fs in by_file.values():
        fs.sort(key=lambda f: (f.line or 0, f.where.function, f.where.service, f.where.environment))
    never = [f for f in index.instrumented()
             if (f.path, f.qualname) not in seen and not span_names.intersection(f.span_names)
             and (include_tests or not is_test_path(f.path))]
    return Report(dict(sorted(by_file.items())), unmapped, never)


# --- text for a person -----------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g} ms"


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}/s"


def when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) + "Z" if ms else "-"


def figures(b: BaselineRecord | None, versions: list[VersionRecord] = ()) -> list[str]:
    """The baseline's figures, labelled with its version, or as a blend with a line per
    version when it mixes several (the version summaries have each one's own)."""
    if b is None:
        return ["no baseline"]
    mix = blended(list(versions), b.updated_ms)
    label = "blend of " + ", ".join(v.version or "-" for v in mix) if mix else b.version or "-"
    lines = [f"{_rate(b.rate_per_s)}  p50 {_ms(b.p50_ms)}  p99 {_ms(b.p99_ms)}  errors {_share(b.error_rate)}  "
             f"({b.count:.0f} calls, decayed, in {b.windows} windows, {label})"]
    for v in mix:
        lines.append(f"  {v.version or '-'}: {_rate(v.rate_per_s)}  p50 {_ms(v.p50_ms)}  p99 {_ms(v.p99_ms)}  "
                     f"errors {_share(v.error_share)}  ({v.calls:.0f} calls since {when(v.first_ms)})")
    return lines


def callee_lines(callees: list[dict], most: int = 5) -> list[str]:
    """What a function calls, per call of it, as the call graph saw it in its latest window
    with callees: the largest shares of its time first."""
    lines = [f"calls {c['function']}: {c['calls_per_call']:.3g} per call, {c['ms_per_call']:.3g} ms per call "
             f"({c['time_share']:.0%} of its time)" for c in callees[:most]]
    if len(callees) > most:
        lines.append(f"and {len(callees) - most} more callees")
    return lines


def event_line(e: EventRecord) -> str:
    return f"[{e.severity or '-'}] {e.type} in {e.version or '-'} at {when(e.window_start_ms)}: {e.summary}"


def identity(w: Where) -> str:
    return f"{w.environment or '-'}/{w.service}"


def render_text(report: Report) -> str:
    out: list[str] = []
    for path, findings in report.by_file.items():
        out.append(path)
        for f in findings:
            name = f.function.dotted if f.function else f.where.function
            shown = name if name == f.where.function else f"{name} (as {f.where.function})"
            out.append(f"  {f.line if f.line is not None else '?':>5}  {shown}  [{identity(f.where)}]")
            out += [f"         {x}" for x in figures(f.baseline, f.versions)]
            out += [f"         {x}" for x in callee_lines(f.callees)]
            for e in f.events:
                out.append(f"         {event_line(e)}")
        out.append("")
    if report.unmapped:
        out.append(f"Not found in this checkout ({len(report.unmapped)}):")
        for f in report.unmapped:
            where = f"{f.where.file}:{f.where.line}" if f.where.file else "no code.file.path"
            n = len(f.events)
            events = f", {n} event{'s' if n > 1 else ''}" if n else ""
            out.append(f"  {f.where.function}  [{identity(f.where)}]  ({where}{events})")
        out.append("")
    out.append(f"Instrumented functions never seen in production ({len(report.never_seen)}):")
    for fn in report.never_seen:
        out.append(f"  {fn.path}:{fn.line}  {fn.dotted}")
    return "\n".join(out) + "\n"
