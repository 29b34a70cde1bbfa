"""OTLP/HTTP receiver: ``POST /v1/traces``, binary protobuf or JSON.

The body, once inflated, goes to the same ``Intake`` as OTLP/gRPC requests: a protobuf body
as it is, a JSON body after conversion to protobuf bytes (processor/receiver/otlpjson.py). So both
transports decode, refuse, count and hand over spans with one piece of code, and the answers
differ only in how they are said:

==========================================  ===============================================
request                                     answer
==========================================  ===============================================
taken (maybe partly: OTLP partial success)  200, ExportTraceServiceResponse
not OTLP (protobuf, JSON, gzip)             400, google.rpc.Status with a BadRequest
no valid bearer token (``auth_token``)      401, ``WWW-Authenticate: Bearer``
another path / another method               404 / 405 (``Allow: POST``)
neither Content-Length nor chunked          411
body over ``max_request_bytes``             413 (after inflating; a gzip bomb is inflated
                                            only up to the limit)
another Content-Type or Content-Encoding    415
pipeline full, or the server is stopping    503 with ``Retry-After`` (seconds) and a Status
                                            holding a RetryInfo
==========================================  ===============================================

Bodies of answers are encoded as the request was (``application/x-protobuf`` or
``application/json``); requests of another content type get JSON. The server is the
standard library's threading HTTP/1.1 server (a thread per connection, connections kept
alive between requests, closed after ``IDLE_TIMEOUT_S`` without one), optionally behind TLS
with the same files as the gRPC port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import socket
import socketserver
import ssl
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from processor.config import split_address
from processor.receiver.decode import MalformedRequest
from processor.receiver.intake import OVERLOAD_RETRY_S, Intake, Overloaded, token_matches
from processor.receiver import otlpjson

log = logging.getLogger("backflow.http")

PATH = "/v1/traces"
PROTOBUF, JSON = "application/x-protobuf", "application/json"
IDLE_TIMEOUT_S = 30.0  # a connection without a request (or a request without progress) this long is closed
MAX_CONNECTIONS = 512  # connections served at once; further ones are closed at once, counted

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _Refusal(Exception):
    """An HTTP error answer: status, message, extra headers; ``close``: the connection
    cannot carry another request (a body read in part, or the server stopping). A body not
    read at all is skipped when small enough, so that the connection stays usable."""

    def __init__(self, status: int, message: str, close: bool = False, headers: dict | None = None,
                 details: tuple[Message, ...] = ()):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close
        self.headers = headers or {}
        self.details = details


def _too_large(limit: int) -> _Refusal:
    return _Refusal(413, f"request body larger than {limit} bytes (--max-request-bytes), "
                         "after decompression", close=True)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body after its Content-Encoding (``gzip``, ``deflate`` or none), at most ``limit``
    bytes of it: inflating stops there, so a bomb costs no more than the limit.

    >>> import gzip; inflate(gzip.compress(b"ab") + gzip.compress(b"c"), "gzip", 3)
    b'abc'
    """
    if encoding in ("", "identity"):
        return body
    gzipped = encoding == "gzip"
    out, size, rest = [], 0, body
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if gzipped else zlib.MAX_WBITS)
        try:
            chunk = d.decompress(rest, limit + 1 - size)
        except zlib.error as e:
            raise MalformedRequest(f"corrupt {encoding} body: {e}") from None
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        out.append(chunk)
        if not d.eof:
            raise MalformedRequest(f"{encoding} body cut short")
        rest = d.unused_data
        if not rest.strip(b"\0"):  # gzip allows zero padding after the last member
            return b"".join(out)
        if not gzipped:
            raise MalformedRequest("data after the deflate stream")


def _media_type(value: str | None) -> str:
    return (value or "").partition(";")[0].strip().lower()


def _status_body(code: int, message: str, details: tuple[Message, ...]) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=message)
    for d in details:
        status.details.add().Pack(d)
    return status


_GRPC_CODE = {400: code_pb2.INVALID_ARGUMENT, 401: code_pb2.UNAUTHENTICATED, 404: code_pb2.NOT_FOUND,
              405: code_pb2.UNIMPLEMENTED, 411: code_pb2.INVALID_ARGUMENT, 413: code_pb2.RESOURCE_EXHAUSTED,
              415: code_pb2.INVALID_ARGUMENT, 500: code_pb2.INTERNAL, 503: code_pb2.UNAVAILABLE}


def _retry_later(delay_s: float, message: str, close: bool = False) -> _Refusal:
    info = error_details_pb2.RetryInfo(retry_delay=Duration(
        seconds=int(delay_s), nanos=int((delay_s % 1) * 1e9)))
    # Retry-After takes whole seconds.
    return _Refusal(503, message, close=close, headers={"Retry-After": str(max(1, math.ceil(delay_s)))},
                    details=(info,))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: exporters reuse their connections
    timeout = IDLE_TIMEOUT_S
    server: "_Server"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        receiver = self.server.receiver
        ctype = _media_type(self.headers.get("Content-Type"))
        as_json = ctype != PROTOBUF  # answers in the request's encoding; JSON for non-OTLP ones
        self._body_read = False
        try:
            self._check_target(post=True)
            if receiver.token is not None and not token_matches(
                    self.headers.get_all("Authorization", []), receiver.token):
                # First of all: nothing of an unauthenticated request is looked at (its body is
                # only skipped, to keep the connection).
                receiver.intake.refuse_request("unauthenticated")
                raise _Refusal(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
            if ctype not in (PROTOBUF, JSON):
                raise _Refusal(415, f"Content-Type must be {PROTOBUF} or {JSON}, not {ctype!r}")
            encoding = self.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in ("", "identity", "gzip", "deflate"):
                raise _Refusal(415, f"Content-Encoding must be gzip, deflate or none, not {encoding!r}")
            with receiver.request():
                response = self._export(receiver, encoding, as_json)
            self._answer(200, response, as_json)
        except _Refusal as r:
            self._refuse(r, as_json)
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the sender stalled or left mid-body: nobody to answer
        except Exception:
            log.exception("OTLP/HTTP request failed")
            self.close_connection = True
            self._answer(500, _status_body(code_pb2.INTERNAL, "internal error", ()), as_json)

    def _export(self, receiver: "HttpReceiver", encoding: str, as_json: bool):
        intake = receiver.intake
        try:
            try:
                data = inflate(self._read_body(receiver.max_request_bytes), encoding, receiver.max_request_bytes)
                if as_json:
                    # Converting JSON costs far more than decoding protobuf: not while full.
                    obj = otlpjson.parse(data)
                    intake.check_room(lambda: otlpjson.count_spans(obj))
                    data = otlpjson.encode(obj)
            except MalformedRequest:
                intake.refuse_request("malformed")  # (export counts those it finds itself)
                raise
            return intake.export(data)
        except MalformedRequest as e:
            raise _bad_request(str(e)) from None
        except Overloaded as e:
            raise _retry_later(e.delay_s, "Backflow is overloaded, retry later") from None
        except _Refusal as r:
            if r.status == 413:
                intake.refuse_request("too_large")
            raise

    def _read_body(self, limit: int) -> bytes:
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length = self.headers.get("Content-Length")
        if length is None:
            raise _Refusal(411, "Content-Length or chunked Transfer-Encoding required", close=True)
        if not length.strip().isdigit():
            raise _Refusal(400, f"bad Content-Length {length[:40]!r}", close=True)
        n = int(length)
        if n > limit:
            raise _too_large(limit)
        body = self.rfile.read(n)
        if len(body) < n:
            raise ConnectionError("connection closed mid-body")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        parts, size = [], 0
        while True:
            line = self.rfile.readline(1024)
            m = _CHUNK_SIZE.match(line.strip())
            if not line.endswith(b"\n") or m is None:
                raise _Refusal(400, "bad chunk in the chunked body", close=True)
            n = int(m.group(), 16)
            if n == 0:
                break
            size += n
            if size > limit:
                raise _too_large(limit)
            chunk = self.rfile.read(n)
            if len(chunk) < n or self.rfile.readline(3).strip():
                raise _Refusal(400, "bad chunk in the chunked body", close=True)
            parts.append(chunk)
        for _ in range(100):  # trailers, ignored
            if self.rfile.readline(8192).strip() == b"":
                return b"".join(parts)
        raise _Refusal(400, "too many trailers", close=True)

    def _check_target(self, post: bool = False) -> None:
        if urlsplit(self.path).path != PATH:
            raise _Refusal(404, f"not found: OTLP/HTTP traces go to POST {PATH}")
        if not post:
            raise _Refusal(405, f"{self.command} not allowed: OTLP/HTTP traces go to POST {PATH}",
                           headers={"Allow": "POST"})

    def _not_post(self):
        self._body_read = False
        try:
            self._check_target()
        except _Refusal as r:
            self._refuse(r, _media_type(self.headers.get("Content-Type")) != PROTOBUF)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_post  # noqa: N815

    def _refuse(self, r: _Refusal, as_json: bool) -> None:
        if r.close or not (self._body_read or self._skip_body()):
            self.close_connection = True
        self._answer(r.status, _status_body(_GRPC_CODE.get(r.status, code_pb2.UNKNOWN), r.message, r.details),
                     as_json, r.headers)

    def _skip_body(self) -> bool:
        """Read and drop the body of a request refused before it was read, if it is no larger
        than a request may be, so that the connection can carry the next one (the sender's
        pool keeps it); False when the connection must be closed instead."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return False
        length = (self.headers.get("Content-Length") or "0").strip()
        if not length.isdigit() or int(length) > self.server.receiver.max_request_bytes:
            return False
        left = int(length)
        while left:
            data = self.rfile.read(min(left, 1 << 16))
            if not data:
                return False
            left -= len(data)
        return True

    def _answer(self, status: int, message: Message, as_json: bool, headers: dict | None = None) -> None:
        if as_json:
            body = json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()
        else:
            body = message.SerializeToString()
        self.send_response(status)
        self.send_header("Content-Type", JSON if as_json else PROTOBUF)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def version_string(self) -> str:
        return "Backflow"

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


def _bad_request(message: str) -> _Refusal:
    return _Refusal(400, message, details=(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="body", description=message)]),))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections are not waited for at stop
    request_queue_size = 128
    receiver: "HttpReceiver"

    def server_bind(self):
        # Not HTTPServer's: it looks up the host's fully qualified name, which nothing here uses.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        # A thread per connection: capped, so that silent clients cannot exhaust the process.
        receiver = self.receiver
        with receiver._lock:
            full = receiver._connections >= receiver.max_connections
            if not full:
                receiver._connections += 1
        if full:
            receiver.intake.refuse_request("too_many_connections")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.receiver._lock:
                self.receiver._connections -= 1

    def finish_request(self, request, client_address):
        # The TLS handshake happens here, on the connection's own thread: a slow or silent
        # client must not hold up the accepting thread, nor this one for longer than the
        # idle timeout.
        context = self.receiver.tls
        request.settimeout(self.receiver.idle_timeout)
        if context is not None:
            try:
                request = context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address, e)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        log.debug("OTLP/HTTP connection from %s failed", client_address, exc_info=True)


def tls_context(cert: str | None, key: str | None, client_ca: str | None = None) -> ssl.SSLContext | None:
    """A server TLS context from the same PEM files as the gRPC port, or None for plaintext.
    With ``client_ca`` clients must present a certificate it signed."""
    if cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


class HttpReceiver:
    """``POST /v1/traces`` into ``intake``; see the module docstring for the answers.

    ``tls`` (from ``tls_context``) makes the port TLS-only; with ``auth_token`` a request
    without ``Authorization: Bearer <token>`` gets 401. ``reuse_port``: the receiver
    processes of one Backflow share the port (see receiver/workers.py).
    """

    def __init__(self, address: str, max_request_bytes: int, intake: Intake, reuse_port: bool = False,
                 tls: ssl.SSLContext | None = None, auth_token: str | None = None,
                 idle_timeout: float = IDLE_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS):
        self.address = address
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._connections = 0  # connections being served (each on a thread)
        self.max_request_bytes = max_request_bytes
        self.intake = intake
        self.tls = tls
        self.token = auth_token.encode() if auth_token else None
        self._reuse_port = reuse_port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._in_flight = 0
        self._stopping = False

    def start(self) -> None:
        host, port = split_address(self.address)

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            allow_reuse_port = self._reuse_port

        class Handler(_Handler):
            timeout = self.idle_timeout

        self._server = Server((host, port), Handler)
        self._server.receiver = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http", daemon=True)
        self._thread.start()
        log.info("OTLP/HTTP listening on %s (%s, %s)", self.address, "TLS" if self.tls else "plaintext",
                 "bearer token required" if self.token else "no token required")

    def stop(self, grace: float) -> None:
        """Stop taking requests; requests in flight get ``grace`` seconds to finish. Requests
        arriving meanwhile on open connections get 503 with Retry-After."""
        with self._lock:
            self._stopping = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=grace)

    @contextlib.contextmanager
    def request(self):
        """Around the taking of one request: refused once ``stop`` began, waited for by it."""
        with self._lock:
            if self._stopping:
                raise _retry_later(OVERLOAD_RETRY_S, "Backflow is stopping, retry later", close=True)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()
