"""Checks that every record of a prefix in Redis conforms to proto/backflow/v1.

Reads ``{prefix}:events`` (every entry), each ``{prefix}:baseline:{key}`` hash, each field
of each ``{prefix}:versions:{key}`` hash and each ``{prefix}:edges:{key}`` and
``{prefix}:callers:{key}`` hash, and converts each with ``redis_map``; a record that
does not convert is a problem naming its Redis key, entry or field, and the field at fault.
Keys of another Redis type are not Backflow's records and are left alone. The tests run it
after every test that started ``backflow serve`` (tests/conftest.py); by hand:

    .venv/bin/python -m processor.schema.conformance --redis-url redis://localhost:6379/0 [--prefix backflow]

(exit status 1 when a record does not conform; without --prefix every prefix found).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field

import redis

from processor.sinks.connect import client_for
from processor.schema.backflow.v1.baseline_pb2 import Baseline
from processor.schema.backflow.v1.event_pb2 import Event
from processor.schema.redis_map import (SchemaError, callers_from_hash, edges_from_hash, from_fields,
                                        verdict_from_field, version_from_field)

_GLOB = re.compile(r"([*?\[\]\\])")


@dataclass
class Tally:
    """The records validated, by identity (so checking twice counts once), and the problems."""
    events: set = field(default_factory=set)     # (events key, entry id)
    baselines: set = field(default_factory=set)  # baseline hash keys
    versions: set = field(default_factory=set)   # (versions hash key, field name)
    edges: set = field(default_factory=set)      # edges and callers hash keys
    verdicts: set = field(default_factory=set)   # (verdicts hash key, field name)
    problems: list[str] = field(default_factory=list)

    def update(self, other: Tally) -> None:
        self.events |= other.events
        self.baselines |= other.baselines
        self.versions |= other.versions
        self.edges |= other.edges
        self.verdicts |= other.verdicts
        self.problems += [p for p in other.problems if p not in self.problems]

    def __str__(self) -> str:
        return (f"{len(self.events)} events, {len(self.baselines)} baselines, "
                f"{len(self.versions)} version summaries, {len(self.edges)} call-graph hashes and "
                f"{len(self.verdicts)} rollout verdicts")


def _s(value) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def escape_glob(prefix: str) -> str:
    """``prefix`` with the glob characters of a SCAN MATCH pattern escaped."""
    return _GLOB.sub(r"\\\1", prefix)


def check(client: redis.Redis, prefix: str, batch: int = 1000) -> Tally:
    """Every event, baseline and version summary of ``prefix``. ``client`` may decode
    responses or not; with bytes, text that is not UTF-8 is reported, not raised."""
    tally = Tally()
    events = f"{prefix}:events"
    if _s(client.type(events)) == "stream":
        start = "-"
        while True:
            entries = client.xrange(events, start, "+", count=batch)
            for entry_id, fields in entries:
                entry_id = _s(entry_id)
                tally.events.add((events, entry_id))
                try:
                    from_fields(Event, fields)
                except SchemaError as e:
                    tally.problems.append(f"{events} entry {entry_id}: {e}")
            if len(entries) < batch:
                break
            start = "(" + _s(entries[-1][0])
    head = f"{prefix}:baseline:"
    for key, fields in _hashes(client, escape_glob(head) + "*", batch):
        tally.baselines.add(key)
        try:
            b = from_fields(Baseline, fields)
        except SchemaError as e:
            tally.problems.append(f"{key}: {e}")
            continue
        if b.key != key[len(head):]:
            tally.problems.append(f"{key}: Baseline field 'key': {b.key!r} is not the key in the hash's name")
    # hashes of one JSON record per field: version summaries, rollouts' verdicts
    for kind, read, seen in (("versions", version_from_field, tally.versions),
                             ("verdicts", verdict_from_field, tally.verdicts)):
        for key, fields in _hashes(client, escape_glob(f"{prefix}:{kind}:") + "*", batch):
            for name, value in fields.items():
                seen.add((key, _s(name)))
                try:
                    read(name, value)
                except SchemaError as e:
                    tally.problems.append(f"{key}: {e}")
    for kind, read in (("edges", edges_from_hash), ("callers", None)):
        head = f"{prefix}:{kind}:"
        for key, fields in _hashes(client, escape_glob(head) + "*", batch):
            tally.edges.add(key)
            try:
                read(key[len(head):], fields) if read else callers_from_hash(fields)
            except SchemaError as e:
                tally.problems.append(f"{key}: {e}")
    return tally


def _hashes(client: redis.Redis, pattern: str, batch: int):
    """(key, fields) of every hash whose name matches, read ``batch`` at a time in a pipeline."""
    keys = [_s(k) for k in client.scan_iter(match=pattern, count=batch, _type="hash")]
    for i in range(0, len(keys), batch):
        pipe = client.pipeline(transaction=False)
        for key in keys[i:i + batch]:
            pipe.hgetall(key)
        # (an empty reply is a hash deleted since the scan: Redis keeps no empty hash)
        yield from ((k, f) for k, f in zip(keys[i:i + batch], pipe.execute()) if f)


def prefixes(client: redis.Redis, batch: int = 1000) -> set[str]:
    """Every prefix with an events stream, a baseline or a version summary in this Redis."""
    found = {_s(k)[:-len(":events")] for k in client.scan_iter(match="*:events", count=batch, _type="stream")}
    for kind in ("baseline", "versions"):
        for k in client.scan_iter(match=f"*:{kind}:*", count=batch, _type="hash"):
            found.add(_s(k).rpartition(f":{kind}:")[0])
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m processor.schema.conformance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default="redis://localhost:6379/0")
    ap.add_argument("--prefix", action="append", help="a prefix to check (repeatable); default: every one found")
    args = ap.parse_args(argv)
    client = client_for(args.redis_url)
    tally = Tally()
    for prefix in sorted(args.prefix or prefixes(client)):
        tally.update(check(client, prefix))
    for problem in tally.problems:
        print(problem)
    print(f"{tally} checked, {len(tally.problems)} not conforming to proto/backflow/v1")
    return 1 if tally.problems else 0


if __name__ == "__main__":
    sys.exit(main())
