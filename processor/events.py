"""Events as CONTRACT.md publishes them on ``{prefix}:events``.

>>> from processor.pipeline.location import Location
>>> e = Event("first_seen", Location("prod", "shop", "shop.cart.apply", "cart.py", "12"),
...           ("shop", "1.4.3", "abc123"), 60_000_000_000, 120_000_000_000, "info",
...           "first call of shop.cart.apply in 1.4.3", {"count": 3})
>>> f = e.fields()
>>> f["type"], f["service.version"], f["window.start"], f["detail"], f["owners"]
('first_seen', '1.4.3', '60000', '{"count": 3}', '')
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from processor.pipeline.location import Location

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Event:
    type: str
    location: Location
    version: tuple[str, str, str]  # (service, service.version, vcs.ref.head.revision)
    window_start_ns: int
    window_end_ns: int
    severity: str
    summary: str
    detail: dict = field(default_factory=dict)
    # What tells apart events of one type, location and window (the exception type of a
    # new_exception, the type a resolved event resolves); "" where there is one at most.
    subject: str = ""

    @property
    def id(self) -> str:
        """Deterministic: the same location, type, window and subject always give the same id.

        >>> from processor.pipeline.location import Location
        >>> loc = Location("prod", "shop", "f")
        >>> a, b = (Event("new_exception", loc, ("shop", "1", ""), 0, 60, "warning", "", {}, t)
        ...         for t in ("KeyError", "TimeoutError"))
        >>> a.id != b.id, a.id == Event(**{**a.__dict__}).id
        (True, True)
        """
        raw = f"{self.location.key}\x00{self.type}\x00{self.window_start_ns}"
        if self.subject:
            raw += "\x00" + self.subject
        return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()

    def fields(self, owners: str = "") -> dict[str, str]:
        """The stream entry; ``owners`` (space-separated, from CODEOWNERS, see
        processor/owners.py) is added where the event is published, not by the detectors."""
        loc = self.location
        return {
            "id": self.id,
            "type": self.type,
            "key": loc.key,
            "service.name": loc.service,
            "deployment.environment.name": loc.environment,
            "code.function.name": loc.function,
            "code.file.path": loc.file,
            "code.line.number": loc.line,
            "otel.scope.name": loc.scope,
            "service.version": self.version[1],
            "vcs.ref.head.revision": self.version[2],
            "window.start": str(self.window_start_ns // 1_000_000),
            "window.end": str(self.window_end_ns // 1_000_000),
            "severity": self.severity,
            "summary": self.summary,
            "detail": json.dumps(self.detail, sort_keys=True, separators=(", ", ": ")),
            "owners": owners,
        }
