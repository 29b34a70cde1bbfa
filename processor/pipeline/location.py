"""Code location, environment and version of a span, from OpenTelemetry attributes.

New semantic-convention names come first, the older ones are the fallback, and span
attributes win over resource attributes:

- function: ``code.function.name``; else ``code.namespace`` + "." + ``code.function``;
  else ``code.function``; else ``span:<span name>`` (the scope name is kept beside it).
- file: ``code.file.path`` else ``code.filepath``; line: ``code.line.number`` else ``code.lineno``.
- environment: ``deployment.environment.name`` else ``deployment.environment``.
- version: ``service.version``; revision: ``vcs.ref.head.revision``.

A location is identified by (environment, service, function); its key is a stable hash.

>>> function_of({"code.namespace": "shop.cart", "code.function": "apply"}, {}, "POST /cart")
'shop.cart.apply'
>>> function_of({}, {}, "POST /cart")
'span:POST /cart'
>>> location_key("prod", "shop", "shop.cart.apply")
'92a2a17955fa19a3'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

# Only these span attributes are read on the hot path; everything else is skipped.
CODE_ATTRIBUTES = frozenset({
    "code.function.name", "code.namespace", "code.function",
    "code.file.path", "code.filepath", "code.line.number", "code.lineno",
})
RESOURCE_ATTRIBUTES = frozenset({
    "service.name", "service.version", "vcs.ref.head.revision",
    "deployment.environment.name", "deployment.environment",
}) | CODE_ATTRIBUTES

SPAN_NAME_MARK = "span:"
UNKNOWN_SERVICE = "unknown_service"


def _function(attrs: Mapping[str, Any]) -> str:
    fn = attrs.get("code.function.name")
    if fn:
        return str(fn)
    ns, f = attrs.get("code.namespace"), attrs.get("code.function")
    if ns and f:
        return f"{ns}.{f}"
    return str(f) if f else ""


def function_of(span_attrs: Mapping[str, Any], resource_attrs: Mapping[str, Any], span_name: str) -> str:
    return _function(span_attrs) or _function(resource_attrs) or SPAN_NAME_MARK + span_name


def file_of(span_attrs: Mapping[str, Any], resource_attrs: Mapping[str, Any]) -> str:
    for attrs in (span_attrs, resource_attrs):
        v = attrs.get("code.file.path") or attrs.get("code.filepath")
        if v:
            return str(v)
    return ""


def line_of(span_attrs: Mapping[str, Any], resource_attrs: Mapping[str, Any]) -> str:
    for attrs in (span_attrs, resource_attrs):
        for name in ("code.line.number", "code.lineno"):
            v = attrs.get(name)
            if v not in (None, ""):
                return str(v)
    return ""


@dataclass(frozen=True)
class Resource:
    """What a span inherits from its resource: identity and version."""
    environment: str
    service: str
    version: str
    revision: str
    attrs: Mapping[str, Any]  # the resource's code.* attributes, for the fallback


def resource_of(attrs: Mapping[str, Any]) -> Resource:
    return Resource(
        environment=str(attrs.get("deployment.environment.name") or attrs.get("deployment.environment") or ""),
        service=str(attrs.get("service.name") or UNKNOWN_SERVICE),
        version=str(attrs.get("service.version") or ""),
        revision=str(attrs.get("vcs.ref.head.revision") or ""),
        attrs={k: v for k, v in attrs.items() if k in CODE_ATTRIBUTES},
    )


@dataclass(frozen=True, slots=True)
class Location:
    """One code location; ``key`` is its stable id across processes and restarts.

    Slots, and the key computed once at construction: a gateway holds one of these per code
    location, up to ``--max-locations`` of them (and looks them up by key).
    """
    environment: str
    service: str
    function: str
    file: str = ""
    line: str = ""
    scope: str = ""  # instrumentation scope, kept for span-name locations
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "key", location_key(self.environment, self.service, self.function))

    @property
    def identity(self) -> tuple[str, str, str]:
        """What identifies the location (and what ``key`` hashes)."""
        return (self.environment, self.service, self.function)


def location_key(environment: str, service: str, function: str) -> str:
    """16 hex digits of BLAKE2b over the identity; stable across processes and versions."""
    raw = "\x00".join((environment, service, function)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=8).hexdigest()
