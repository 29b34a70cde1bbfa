"""The collector's loadbalancing exporter's choice of backend, redone in Python.

The exporter (opentelemetry-collector-contrib, exporter/loadbalancingexporter) puts each
backend at 100 points of a ring of 36,000 positions, point i at
crc32(backend + byte(i)) mod 36,000 (backends sorted by name; a position already taken
keeps its first backend), and sends a routing key (with ``routing_key: service``, the
resource's service.name) to the backend of the first point at or after
crc32(key) mod 36,000, wrapping around. Checked against the exporter's own test vectors
in tests/test_scale_out.py. An aggregate replica routes each service's partials to the
detect replica the gateway's collectors route that service's spans to (``--forward`` with
several addresses, processor/service.py).
"""

from __future__ import annotations

import bisect
import zlib

POSITIONS = 36_000
POINTS_PER_BACKEND = 100


def _position(data: bytes) -> int:
    return zlib.crc32(data) % POSITIONS


def backend_points(backend: str, points: int = POINTS_PER_BACKEND) -> list[int]:
    return [_position(backend.encode() + bytes([i])) for i in range(points)]


class HashRing:
    """The backends on the ring; ``backend_for(key)`` the one a key goes to."""

    def __init__(self, backends: list[str], points: int = POINTS_PER_BACKEND):
        owner: dict[int, str] = {}
        for backend in sorted(backends):
            for pos in backend_points(backend, points):
                owner.setdefault(pos, backend)
        self.positions = sorted(owner)
        self.backends = [owner[p] for p in self.positions]

    def backend_for(self, key: str | bytes) -> str:
        data = key.encode() if isinstance(key, str) else key
        i = bisect.bisect_left(self.positions, _position(data))
        return self.backends[i % len(self.positions)]
