"""The schema of what Backflow publishes to Redis: proto/backflow/v1 (docs/schema.md).

The message classes are generated from the .proto files and committed
(``backflow/v1/*_pb2.py``; ``python -m processor.schema.generate`` makes them again,
tests/test_schema.py fails when they are stale); ``redis_map`` converts a Redis record to
its message and back, strictly; ``conformance`` checks every record of a Redis.
"""

from processor.schema.backflow.v1.baseline_pb2 import Baseline
from processor.schema.backflow.v1.edges_pb2 import Callee, Caller, Edges
from processor.schema.backflow.v1.event_pb2 import Event
from processor.schema.backflow.v1.verdict_pb2 import Verdict
from processor.schema.backflow.v1.version_summary_pb2 import VersionSummaries, VersionSummary
from processor.schema.redis_map import (SchemaError, callers_from_hash, edges_from_hash, from_fields, to_fields,
                                        verdict_from_field, version_from_field, version_to_field, versions_from_hash,
                                        versions_to_hash)

__all__ = ["Baseline", "Callee", "Caller", "Edges", "Event", "callers_from_hash", "edges_from_hash", "SchemaError", "VersionSummaries", "VersionSummary", "from_fields",
           "to_fields", "Verdict", "verdict_from_field", "version_from_field", "version_to_field", "versions_from_hash", "versions_to_hash"]
