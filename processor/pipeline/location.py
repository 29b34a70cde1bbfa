"""Code location, environment and version of a span, from OpenTelemetry attributes.

New semantic-convention names come first, the older ones are the fallback, and span
attributes win over resource attributes:

- function: for a database client span (kind CLIENT), its query (``query_of``: the query
  is the location, with its baseline, and its caller is found in the call graph); else
  ``code.function.name``;
  else ``code.namespace`` + "." + ``code.function``; else ``code.function``; else, for a
  span without code attributes (auto-instrumented), its operation as the semantic
  conventions name it (``operation_of``); else ``span:<span name>`` (the scope name is kept
  beside it).
- file: ``code.file.path`` else ``code.filepath``; line: ``code.line.number`` else ``code.lineno``.
- environment: ``deployment.environment.name`` else ``deployment.environment``.
- version: ``service.version``; revision: ``vcs.ref.head.revision``.

A location is identified by (environment, service, function); its key is a stable hash.

>>> function_of({"code.namespace": "shop.cart", "code.function": "apply"}, {}, "POST /cart")
'shop.cart.apply'
>>> function_of({}, {}, "POST /cart")
'span:POST /cart'
>>> function_of({"http.request.method": "GET", "http.route": "/orders/{id}"}, {}, "GET", KIND_SERVER)
'http.server:GET /orders/{id}'
>>> location_key("prod", "shop", "shop.cart.apply")
'92a2a17955fa19a3'
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

# Only these span attributes are read on the hot path; everything else is skipped.
CODE_ATTRIBUTES = frozenset({
    "code.function.name", "code.namespace", "code.function",
    "code.file.path", "code.filepath", "code.line.number", "code.lineno",
})
# What names the operation of a span without code attributes (operation_of), and what tells
# a server's 4xx (not an error there, by the HTTP conventions) apart.
OPERATION_ATTRIBUTES = frozenset({
    "http.request.method", "http.method", "http.route", "url.template", "server.address", "net.peer.name",
    "rpc.system", "rpc.service", "rpc.method",
    "db.system.name", "db.system", "db.query.summary", "db.query.text", "db.statement",
    "db.operation.name", "db.operation", "db.collection.name",
    "messaging.operation.name", "messaging.destination.name",
    "http.response.status_code", "http.status_code",
})
SPAN_ATTRIBUTES = CODE_ATTRIBUTES | OPERATION_ATTRIBUTES
RESOURCE_ATTRIBUTES = frozenset({
    "service.name", "service.version", "vcs.ref.head.revision",
    "deployment.environment.name", "deployment.environment",
}) | SPAN_ATTRIBUTES

KIND_SERVER, KIND_CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind

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


def function_of(span_attrs: Mapping[str, Any], resource_attrs: Mapping[str, Any], span_name: str,
                kind: int = 0) -> str:
    return ((query_of(span_attrs) if kind == KIND_CLIENT else "") or _function(span_attrs)
            or _function(resource_attrs) or operation_of(span_attrs, kind) or SPAN_NAME_MARK + span_name)


def _get(attrs: Mapping[str, Any], *names: str) -> str:
    for name in names:
        v = attrs.get(name)
        if v:
            return str(v)
    return ""


def query_of(attrs: Mapping[str, Any]) -> str:
    """The query of a database call (a span with ``db.system.name``, or the older
    ``db.system``): ``db:<system> <what>``, where what is ``db.query.summary``; else
    ``db.query.text`` (or the older ``db.statement``) normalised (``normalize_query``);
    else ``db.operation.name`` (``db.operation``) and ``db.collection.name``. "" for a span
    that is no database call, or names no query.

    >>> query_of({"db.system.name": "postgresql", "db.query.summary": "SELECT orders"})
    'db:postgresql SELECT orders'
    >>> query_of({"db.system": "mysql", "db.statement": "SELECT * FROM t WHERE id IN (1, 2, 3)"})
    'db:mysql SELECT * FROM t WHERE id IN (?)'
    >>> query_of({"db.system.name": "redis", "db.operation.name": "GET"})
    'db:redis GET'
    """
    db = _get(attrs, "db.system.name", "db.system")
    if not db:
        return ""
    what = _get(attrs, "db.query.summary")
    if not what:
        text = _get(attrs, "db.query.text", "db.statement")
        what = normalize_query(text) if text else " ".join(
            x for x in (_get(attrs, "db.operation.name", "db.operation"), _get(attrs, "db.collection.name")) if x)
    return f"db:{db} {what}" if what else ""


_QUERY_CACHE: dict[str, str] = {}
_QUERY_CACHE_MAX = 1 << 14
_QUERY_CACHED_TEXT = 4096  # longer texts are normalised each time (the cache stays small in bytes)
MAX_QUERY = 256  # characters of a normalised query kept: a longer one is cut (it names a location)


def normalize_query(text: str) -> str:
    """A query's text with its literals as ``?``: comments dropped, strings and numbers
    replaced, an ``IN`` list and the rows of ``VALUES`` collapsed to one, whitespace folded;
    so that the same statement with other values is the same location (as the semantic
    conventions ask of ``db.query.text``'s sanitisation). At most ``MAX_QUERY`` characters
    are kept: a location's name must stay under ``max_attribute_length``, or its spans would
    be refused.

    >>> normalize_query("select *  from users -- who\\n where name = 'O''Brien' and age > 42")
    'select * from users where name = ? and age > ?'
    >>> normalize_query("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), ($1, :b)")
    'INSERT INTO t (a, b) VALUES (?, ?)'
    >>> normalize_query('SELECT "t1".x FROM t1 WHERE y IN (?, ?, 0x1F) /* tag */ LIMIT 10')
    'SELECT "t1".x FROM t1 WHERE y IN (?) LIMIT ?'
    """
    out = _QUERY_CACHE.get(text)
    if out is None:
        out = _COMMENTS.sub(" ", text)
        out = _LITERALS.sub("?", out)
        out = _PLACEHOLDERS.sub("?", out)
        out = _IN_LIST.sub(r"\1(?)", out)
        out = _ROW.sub(_one_row, out)
        out = _ROWS.sub(r"\1", out)
        out = " ".join(out.split())[:MAX_QUERY].rstrip()
        if len(text) <= _QUERY_CACHED_TEXT:
            if len(_QUERY_CACHE) >= _QUERY_CACHE_MAX:
                _QUERY_CACHE.clear()
            _QUERY_CACHE[text] = out
    return out


def _one_row(m) -> str:
    """A row of ``VALUES`` made only of ``?``: one ``?`` per column, spaces folded."""
    return "(" + ", ".join("?" for _ in m.group(1).split(",")) + ")"


_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
# string literals (doubled quotes inside), hex and decimal numbers not part of a name
_LITERALS = re.compile(r"'(?:[^']|'')*'|(?<![\w$.\"])(?:0[xX][0-9a-fA-F]+|[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w\"])")
_PLACEHOLDERS = re.compile(r"\$\d+|(?<![\w:]):[A-Za-z_]\w*|%s|%\(\w+\)s")
_IN_LIST = re.compile(r"(\bIN\s*)\(\s*\?(?:\s*,\s*\?)*\s*\)", re.I)
_ROW = re.compile(r"\(\s*(\?(?:\s*,\s*\?)*)\s*\)")
_ROWS = re.compile(r"(\(\?(?:, \?)*\))(?:\s*,\s*\(\?(?:, \?)*\))+")


def operation_of(attrs: Mapping[str, Any], kind: int) -> str:
    """The operation of a span, by the semantic conventions, for a span without code
    attributes; "" when none applies (the span name is used then). The first that applies:

    - HTTP server: ``http.server:<method> <http.route>`` (``http.server:<method>`` without a
      route);
    - HTTP client: ``http.client:<method> <url.template, else server.address>``
      (``http.client:<method>`` without either);
    - RPC: ``rpc.server:`` (a server span) or ``rpc.client:``, then
      ``<rpc.system> <rpc.service>/<rpc.method>``;
    - database: its query (``query_of``);
    - messaging: ``messaging:<messaging.operation.name> <messaging.destination.name>``.

    The older names are the fallback: ``http.method`` for ``http.request.method`` and
    ``net.peer.name`` for ``server.address``. (A database client span is keyed by its
    query before its code attributes: ``function_of``.)

    >>> operation_of({"http.method": "GET", "server.address": "api.acme.com"}, KIND_CLIENT)
    'http.client:GET api.acme.com'
    >>> operation_of({"http.request.method": "GET"}, KIND_SERVER)  # no route
    'http.server:GET'
    >>> operation_of({"http.request.method": "GET"}, 1)  # an internal span: its name
    ''
    """
    def get(*names: str) -> str:
        for name in names:
            v = attrs.get(name)
            if v:
                return str(v)
        return ""

    method = get("http.request.method", "http.method")
    if method and kind in (KIND_SERVER, KIND_CLIENT):
        side, target = (("server", get("http.route")) if kind == KIND_SERVER
                        else ("client", get("url.template", "server.address", "net.peer.name")))
        return f"http.{side}:{method} {target}" if target else f"http.{side}:{method}"
    system, rpc_method = get("rpc.system"), get("rpc.method")
    if system and rpc_method:
        service = get("rpc.service")
        side = "server" if kind == KIND_SERVER else "client"
        return f"rpc.{side}:{system} {service + '/' if service else ''}{rpc_method}"
    query = query_of(attrs)
    if query:
        return query
    operation, destination = get("messaging.operation.name"), get("messaging.destination.name")
    if operation and destination:
        return f"messaging:{operation} {destination}"
    return ""


def client_error_on_server(attrs: Mapping[str, Any], kind: int) -> bool:
    """A server span answering 4xx: by the HTTP conventions not an error of the server
    (its status must be left unset), so not counted as one even where an instrumentation
    sets it.

    >>> client_error_on_server({"http.response.status_code": 404}, KIND_SERVER)
    True
    >>> client_error_on_server({"http.response.status_code": 404}, KIND_CLIENT)
    False
    """
    if kind != KIND_SERVER:
        return False
    v = attrs.get("http.response.status_code")
    if v is None:
        v = attrs.get("http.status_code")
    return isinstance(v, int) and not isinstance(v, bool) and 400 <= v < 500


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
    scope: str = ""  # instrumentation scope name, shown on events (otel.scope.name)
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
