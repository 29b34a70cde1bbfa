"""What production told Backflow, read back from Redis (see CONTRACT.md and docs):
``{prefix}:keys``, ``{prefix}:baseline:{key}``, ``{prefix}:events`` and the per-version
summaries ``{prefix}:versions:{key}`` (processor/sinks/versions.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import redis


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Where:
    """Identity and code position, as production reported them."""
    key: str
    service: str
    environment: str
    function: str
    file: str
    line: str

    @classmethod
    def of(cls, h: dict[str, str]) -> "Where":
        return cls(h.get("key", ""), h.get("service.name", ""), h.get("deployment.environment.name", ""),
                   h.get("code.function.name", ""), h.get("code.file.path", ""), h.get("code.line.number", ""))


@dataclass(frozen=True)
class BaselineRecord:
    where: Where
    version: str
    revision: str
    count: float
    rate_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float | None
    windows: int
    updated_ms: int

    @classmethod
    def of(cls, h: dict[str, str]) -> "BaselineRecord":
        return cls(Where.of(h), h.get("service.version", ""), h.get("vcs.ref.head.revision", ""),
                   _float(h.get("count")) or 0.0, _float(h.get("rate_per_s")), _float(h.get("p50_ms")),
                   _float(h.get("p99_ms")), _float(h.get("error_rate")),
                   int(_float(h.get("windows")) or 0), int(_float(h.get("updated")) or 0))


@dataclass(frozen=True)
class EventRecord:
    id: str
    type: str
    where: Where
    version: str
    revision: str
    window_start_ms: int
    window_end_ms: int
    severity: str
    summary: str
    detail: dict = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, stream_id: str, h: dict[str, str]) -> "EventRecord":
        try:
            detail = json.loads(h.get("detail") or "{}")
        except ValueError:
            detail = {}
        return cls(h.get("id") or stream_id, h.get("type", ""), Where.of(h), h.get("service.version", ""),
                   h.get("vcs.ref.head.revision", ""), int(_float(h.get("window.start")) or 0),
                   int(_float(h.get("window.end")) or 0), h.get("severity", ""), h.get("summary", ""),
                   detail if isinstance(detail, dict) else {})


@dataclass(frozen=True)
class VersionRecord:
    """One location's figures while one version served it (processor/sinks/versions.py)."""
    version: str
    revision: str
    calls: float
    errors: float
    windows: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    first_ms: int
    last_ms: int

    @property
    def rate_per_s(self) -> float | None:
        return self.calls / self.seconds if self.seconds else None

    @property
    def error_share(self) -> float | None:
        return self.errors / self.calls if self.calls else None


@dataclass
class Production:
    baselines: dict[str, BaselineRecord] = field(default_factory=dict)   # key -> latest baseline
    events: list[EventRecord] = field(default_factory=list)              # in stream order
    versions: dict[str, list[VersionRecord]] = field(default_factory=dict)  # key -> by first window
    # key -> its callees in its latest window with any ({prefix}:edges:{key}), the largest share first
    callees: dict[str, list[dict]] = field(default_factory=dict)

    def locations(self) -> dict[str, Where]:
        """Every location known from a baseline or an event, by key."""
        out = {k: b.where for k, b in self.baselines.items()}
        for e in self.events:
            if e.where.function:  # (a service's event, a rollout, is no code location)
                out.setdefault(e.where.key, e.where)
        return out

    def events_of(self, key: str) -> list[EventRecord]:
        return [e for e in self.events if e.where.key == key]


RECENT_MS = 86_400_000  # a version that ran within a day of the location's latest window
                        # still weighs in its baseline (serve's half-life is a day by default)


def blended(versions: list[VersionRecord], updated_ms: int, within_ms: int = RECENT_MS) -> list[VersionRecord]:
    """The versions a location's baseline blends, newest first: those that ran within
    ``within_ms`` of its latest window; empty when there is only one (the baseline is then
    that version's).

    >>> v = lambda name, first, last: VersionRecord(name, "", 10, 0, 1, 60, 20.0, 40.0, first, last)
    >>> [r.version for r in blended([v("1.0", 0, 500), v("2.0", 400, 1000)], 1000)]
    ['2.0', '1.0']
    >>> blended([v("1.0", 0, 500), v("2.0", 400, 1000)], 1000, within_ms=100)
    []
    """
    recent = [r for r in versions if r.last_ms >= updated_ms - within_ms]
    return sorted(recent, key=lambda r: (r.last_ms, r.first_ms), reverse=True) if len(recent) > 1 else []


def parse_version_field(name: str, value: str) -> VersionRecord | None:
    try:
        version, revision = json.loads(name)
        v = json.loads(value)
        return VersionRecord(str(version), str(revision), float(v["calls"]), float(v["errors"]),
                             int(v["windows"]), float(v["seconds"]), _float(v.get("p50_ms")),
                             _float(v.get("p99_ms")), int(v["first"]), int(v["last"]))
    except (ValueError, TypeError, KeyError):
        return None  # a field some other writer left: not ours to read


def parse_edges(fields: dict[str, str]) -> list[dict]:
    """The callees of an ``{prefix}:edges:{key}`` hash (proto/backflow/v1/edges.proto), the
    largest share of the caller's time first; what does not parse is left out."""
    out = []
    for name, value in fields.items():
        if len(name) == 16 and value.startswith("{"):
            try:
                c = json.loads(value)
                out.append({"key": name, "function": str(c["function"]), "calls_per_call": float(c["calls_per_call"]),
                            "ms_per_call": float(c["ms_per_call"]), "time_share": float(c["time_share"]),
                            "updated_ms": int(c["updated"])})
            except (ValueError, TypeError, KeyError):
                continue
    return sorted(out, key=lambda c: (-c["time_share"], c["function"]))


def read_production(client: redis.Redis, prefix: str, service: str | None = None,
                    environment: str | None = None, batch: int = 500) -> Production:
    """Baselines, events and version summaries, for one service/environment if given.

    ``client`` must decode responses (``decode_responses=True``)."""
    def wanted(w: Where) -> bool:
        return (service is None or w.service == service) and (environment is None or w.environment == environment)

    prod = Production()
    keys = sorted(client.smembers(f"{prefix}:keys"))
    for i in range(0, len(keys), batch):
        part = keys[i:i + batch]
        pipe = client.pipeline(transaction=False)
        for k in part:
            pipe.hgetall(f"{prefix}:baseline:{k}")
            pipe.hgetall(f"{prefix}:versions:{k}")
            pipe.hgetall(f"{prefix}:edges:{k}")
        replies = pipe.execute()
        for k, h, vers, edges in zip(part, replies[0::3], replies[1::3], replies[2::3]):
            if not h:
                continue
            h.setdefault("key", k)
            b = BaselineRecord.of(h)
            if not wanted(b.where):
                continue
            prod.baselines[k] = b
            recs = [r for r in (parse_version_field(n, v) for n, v in vers.items()) if r]
            if recs:
                prod.versions[k] = sorted(recs, key=lambda r: (r.first_ms, r.last_ms, r.version))
            callees = parse_edges(edges)
            if callees:
                prod.callees[k] = callees
    last = "-"
    while True:
        chunk = client.xrange(f"{prefix}:events", min=last, max="+", count=1000)
        if chunk and last != "-" and chunk[0][0] == last:
            chunk = chunk[1:]  # read already (unless trimmed meanwhile: then it is not there)
        if not chunk:
            break
        for sid, h in chunk:
            e = EventRecord.of(sid, h)
            if wanted(e.where):
                prod.events.append(e)
        last = chunk[-1][0]
    return prod
