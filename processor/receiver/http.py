"""OTLP/HTTP receiver: ``POST /v1/traces`` (and ``POST /v1/metrics``), binary protobuf or JSON.

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
body not received within the request timeout 408 (and the connection closed)
neither Content-Length nor chunked          411 (HTTP/1.x)
body over ``max_request_bytes``             413 (after inflating; a gzip bomb is inflated
                                            only up to the limit)
another Content-Type or Content-Encoding    415
pipeline full, or the server is stopping    503 with ``Retry-After`` (seconds) and a Status
                                            holding a RetryInfo
==========================================  ===============================================

Bodies of answers are encoded as the request was (``application/x-protobuf`` or
``application/json``); requests of another content type get JSON. The server is Hypercorn
(asyncio; HTTP/1.1 with keep-alive, and HTTP/2: over TLS by ALPN, in cleartext by prior
knowledge or ``Upgrade: h2c``) on one event-loop thread, with decoding on a small thread
pool, so that the loop keeps answering meanwhile. A silent or slow client costs a socket, not a thread: a connection is closed after
``IDLE_TIMEOUT_S`` without a request or its headers (or its TLS handshake), a body not
received within ``REQUEST_TIMEOUT_S`` gets 408, and connections beyond ``MAX_CONNECTIONS``
are closed at once and counted. TLS uses the same files as the gRPC port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import ssl
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.run import worker_serve  # (serve() without its own sockets)
from hypercorn.config import Config, Sockets

from processor.config import split_address
from processor.receiver import otlpjson
from processor.receiver.decode import MalformedRequest
from processor.receiver.intake import (
    OVERLOAD_RETRY_S,
    Intake,
    Overloaded,
    token_matches,
)

log = logging.getLogger("backflow.http")

PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"  # OTLP metrics (processor/receiver/metrics.py)
PROTOBUF, JSON = "application/x-protobuf", "application/json"
IDLE_TIMEOUT_S = 30.0  # a connection without a request (or its headers) this long is closed
REQUEST_TIMEOUT_S = 30.0  # a request whose body has not arrived this long after its headers: 408
MAX_CONNECTIONS = 512  # connections open at once; further ones are closed at once, counted
BACKLOG = 128
DECODE_THREADS = 4  # requests decoded at once, off the event loop
MAX_DRAIN_BYTES = 64 << 20  # most of a refused HTTP/2 body read (and dropped) before answering


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
              405: code_pb2.UNIMPLEMENTED, 408: code_pb2.DEADLINE_EXCEEDED, 411: code_pb2.INVALID_ARGUMENT, 413: code_pb2.RESOURCE_EXHAUSTED,
              415: code_pb2.INVALID_ARGUMENT, 500: code_pb2.INTERNAL, 503: code_pb2.UNAVAILABLE}


def _retry_later(delay_s: float, message: str, close: bool = False) -> _Refusal:
    info = error_details_pb2.RetryInfo(retry_delay=Duration(
        seconds=int(delay_s), nanos=int((delay_s % 1) * 1e9)))
    # Retry-After takes whole seconds.
    return _Refusal(503, message, close=close, headers={"Retry-After": str(max(1, math.ceil(delay_s)))},
                    details=(info,))


class _Headers:
    """A request's headers, by lower-case name (ASGI gives them as byte pairs)."""

    def __init__(self, raw):
        self._all: dict[str, list[str]] = {}
        for name, value in raw:
            self._all.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._all.get(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return self._all.get(name, [])


class _App:
    """The ASGI application behind the port: one coroutine per request."""

    def __init__(self, receiver: HttpReceiver):
        self.receiver = receiver

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        await _Request(self.receiver, scope, receive, send).handle()


class _Request:
    def __init__(self, receiver: HttpReceiver, scope, receive, send):
        self.receiver, self.scope, self.receive, self.send = receiver, scope, receive, send
        self.headers = _Headers(scope["headers"])
        self.http1 = scope["http_version"] in ("1.0", "1.1")
        self.body_read = False
        self.body_done = False  # the last of the body (or the sender's leaving) was received

    async def handle(self) -> None:
        receiver = self.receiver
        ctype = _media_type(self.headers.get("content-type"))
        as_json = ctype != PROTOBUF  # answers in the request's encoding; JSON for non-OTLP ones
        try:
            self._check_target()
            if receiver.token is not None and not token_matches(self.headers.get_all("authorization"),
                                                                receiver.token):
                # First of all: nothing of an unauthenticated request is looked at (its body is
                # only skipped, to keep the connection).
                receiver.intake.refuse_request("unauthenticated")
                raise _Refusal(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
            if ctype not in (PROTOBUF, JSON):
                raise _Refusal(415, f"Content-Type must be {PROTOBUF} or {JSON}, not {ctype!r}")
            encoding = (self.headers.get("content-encoding") or "").strip().lower()
            if encoding not in ("", "identity", "gzip", "deflate"):
                raise _Refusal(415, f"Content-Encoding must be gzip, deflate or none, not {encoding!r}")
            with receiver.request():
                try:
                    body = await self._read_body(receiver.max_request_bytes)
                except _Refusal as r:
                    if r.status == 413:
                        receiver.intake.refuse_request("too_large")
                    raise
                # On the pool, never on the loop: handing a batch over may block (a full pipe
                # to the main process with --workers), and the loop must keep answering.
                response = await asyncio.get_running_loop().run_in_executor(
                    receiver.executor, receiver.export, body, encoding, as_json, self.scope["path"] == METRICS_PATH)
            await self._answer(200, response, as_json)
        except _Refusal as r:
            await self._refuse(r, as_json)
        except ConnectionError:
            pass  # the sender left mid-body: nobody to answer
        except Exception:
            log.exception("OTLP/HTTP request failed")
            await self._answer(500, _status_body(code_pb2.INTERNAL, "internal error", ()), as_json, close=True)

    def _check_target(self) -> None:
        if self.scope["path"] not in (PATH, METRICS_PATH):
            raise _Refusal(404, f"not found: OTLP/HTTP traces go to POST {PATH}, metrics to POST {METRICS_PATH}")
        if self.scope["method"] != "POST":
            raise _Refusal(405, f"{self.scope['method']} not allowed: OTLP/HTTP goes to POST {self.scope['path']}",
                           headers={"Allow": "POST"})

    async def _read_body(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes, within the request timeout."""
        self.body_read = True
        length = self.headers.get("content-length")
        chunked = "chunked" in (self.headers.get("transfer-encoding") or "").lower()
        if self.http1 and length is None and not chunked:
            raise _Refusal(411, "Content-Length or chunked Transfer-Encoding required", close=True)
        if length is not None and int(length) > limit:  # (the HTTP parser checked that it is a number)
            raise _too_large(limit)
        return await self._receive_body(limit)

    async def _receive_body(self, limit: int, keep: bool = True) -> bytes:
        """The body's bytes (dropped as they come unless ``keep``), at most ``limit``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.receiver.request_timeout
        parts, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(self.receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                if keep:  # (a body skipped after a refusal was counted by that refusal)
                    self.receiver.intake.refuse_request("timeout")
                raise _Refusal(408, f"request body not received within {self.receiver.request_timeout:g} s",
                               close=True) from None
            if message["type"] == "http.disconnect":
                self.body_done = True
                raise ConnectionError("the sender left mid-body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            if keep:
                parts.append(chunk)
            if not message.get("more_body"):
                self.body_done = True
                return b"".join(parts)

    async def _refuse(self, r: _Refusal, as_json: bool) -> None:
        close = r.close
        if self.http1 and not close and not self.body_read:
            # Read and drop the body of a request refused before it was read, so that the
            # connection can carry the next one (the sender's pool keeps it).
            try:
                await self._receive_body(self.receiver.max_request_bytes, keep=False)
            except (_Refusal, ConnectionError):
                close = True
        elif not self.http1 and not self.body_done and r.status != 408:
            # HTTP/2: the rest of the body first (dropped). Data arriving for a stream already
            # answered breaks Hypercorn's connection, every other stream on it with it
            # (pgjones/hypercorn#329); a sender streams its body without waiting for the answer.
            declared = self.headers.get("content-length") or ""
            cap = min(max(4 * self.receiver.max_request_bytes, int(declared) if declared.isdigit() else 0),
                      MAX_DRAIN_BYTES)
            with contextlib.suppress(_Refusal, ConnectionError):
                await self._receive_body(cap, keep=False)
        await self._answer(r.status, _status_body(_GRPC_CODE.get(r.status, code_pb2.UNKNOWN), r.message, r.details),
                           as_json, r.headers, close)

    async def _answer(self, status: int, message: Message, as_json: bool, headers: dict | None = None,
                      close: bool = False) -> None:
        if as_json:
            body = json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()
        else:
            body = message.SerializeToString()
        out = [(b"content-type", (JSON if as_json else PROTOBUF).encode()),
               (b"content-length", str(len(body)).encode()), (b"server", b"Backflow")]
        out += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
        if close and self.http1:
            out.append((b"connection", b"close"))
        await self.send({"type": "http.response.start", "status": status, "headers": out})
        await self.send({"type": "http.response.body", "body": b"" if self.scope["method"] == "HEAD" else body})


def _bad_request(message: str) -> _Refusal:
    return _Refusal(400, message, details=(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="body", description=message)]),))


class _Listener(socket.socket):
    """The listening socket: counts the connections it hands out and closes at once those
    beyond the receiver's cap, so that silent clients cannot exhaust the process."""

    receiver: HttpReceiver

    def accept(self):
        fd, address = self._accept()
        conn = _Connection(self.family, self.type, self.proto, fileno=fd)
        receiver = self.receiver
        if receiver.connections >= receiver.max_connections:
            conn.close()
            receiver.intake.refuse_request("too_many_connections")
            raise ConnectionAbortedError  # (asyncio goes on accepting at the next readiness)
        receiver.connections += 1
        conn.receiver = receiver
        return conn, address


class _Connection(socket.socket):
    """A connection, counted until the peer closed it or it was closed here (Hypercorn keeps
    a connection's task until its keep-alive timeout even when the peer left)."""

    receiver: HttpReceiver | None = None

    def recv(self, *args):
        data = super().recv(*args)
        if not data:
            self._release()
        return data

    def recv_into(self, *args):
        n = super().recv_into(*args)
        if n == 0:
            self._release()
        return n

    def close(self):
        self._release()
        super().close()

    def _release(self) -> None:
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.connections -= 1


class _Config(Config):
    """Hypercorn's settings, with Backflow's TLS context (the gRPC port's files) instead of
    one made from file names."""

    def __init__(self, tls: ssl.SSLContext | None):
        super().__init__()
        self._tls = tls

    @property
    def ssl_enabled(self) -> bool:
        return self._tls is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._tls


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
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


class HttpReceiver:
    """``POST /v1/traces`` into ``intake``; see the module docstring for the answers.

    ``tls`` (from ``tls_context``) makes the port TLS-only; with ``auth_token`` a request
    without ``Authorization: Bearer <token>`` gets 401. ``reuse_port``: the receiver
    processes of one Backflow share the port (see receiver/workers.py). A connection is
    closed after ``idle_timeout`` without a request (or without its headers complete, or
    its TLS handshake done); a request whose body has not arrived within
    ``request_timeout`` gets 408; at most ``max_connections`` are open at once.
    """

    def __init__(self, address: str, max_request_bytes: int, intake: Intake, reuse_port: bool = False,
                 tls: ssl.SSLContext | None = None, auth_token: str | None = None,
                 idle_timeout: float = IDLE_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT_S):
        self.address = address
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.connections = 0  # open connections (counted on the event loop's thread only)
        self.max_request_bytes = max_request_bytes
        self.intake = intake
        self.tls = tls
        self.token = auth_token.encode() if auth_token else None
        self._reuse_port = reuse_port
        self.executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._config: _Config | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._in_flight = 0
        self._stopping = False

    def start(self) -> None:
        host, port = split_address(self.address)
        listener = _Listener(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))  # here, so that a busy port fails the start
            listener.listen(BACKLOG)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        listener.receiver = self
        config = self._config = _Config(self.tls)
        config.keep_alive_timeout = self.idle_timeout  # also bounds the wait for a request's headers
        config.read_timeout = self.idle_timeout
        config.ssl_handshake_timeout = self.idle_timeout
        config.backlog = BACKLOG
        config.include_server_header = False
        config.errorlog = logging.getLogger("backflow.http.server")
        config.accesslog = None
        if self.tls is not None:
            sockets = Sockets(secure_sockets=[listener], insecure_sockets=[], quic_sockets=[])
        else:
            sockets = Sockets(secure_sockets=[], insecure_sockets=[listener], quic_sockets=[])
        self.executor = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="otlp-http-decode")
        self._loop = asyncio.new_event_loop()
        self._shutdown = asyncio.Event()
        serving = worker_serve(ASGIWrapper(_App(self)), config, sockets=sockets, shutdown_trigger=self._shutdown.wait)
        self._thread = threading.Thread(target=self._run, args=(serving, listener), name="otlp-http", daemon=True)
        self._thread.start()
        log.info("OTLP/HTTP listening on %s (%s, %s)", self.address, "TLS" if self.tls else "plaintext",
                 "bearer token required" if self.token else "no token required")

    def _run(self, serving, listener: socket.socket) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(serving)
        except Exception:
            log.exception("the OTLP/HTTP server failed")
        finally:
            listener.close()
            self._loop.close()

    def stop(self, grace: float) -> None:
        """Stop taking requests; requests in flight get ``grace`` seconds to finish. Requests
        arriving meanwhile on open connections get 503 with Retry-After."""
        with self._lock:
            self._stopping = True
        if self._thread is not None and self._thread.is_alive():
            self._config.graceful_timeout = grace
            self._loop.call_soon_threadsafe(self._shutdown.set)
            self._thread.join(grace + 1.0)
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=grace)
        if self.executor is not None:
            self.executor.shutdown(wait=False)

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

    def export(self, body: bytes, encoding: str, as_json: bool, metrics: bool = False):
        """Inflate, convert (JSON) and take one request's body (on the decoding pool);
        ``metrics``: an ExportMetricsServiceRequest's (``POST /v1/metrics``)."""
        intake = self.intake
        try:
            try:
                data = inflate(body, encoding, self.max_request_bytes)
                if metrics and as_json:  # (no ids to convert in what Backflow reads: protobuf's JSON mapping)
                    intake.check_room(lambda: 0)
                    try:
                        data = json_format.Parse(data.decode("utf-8"), ExportMetricsServiceRequest(),
                                                 ignore_unknown_fields=True).SerializeToString()
                    except (ValueError, RecursionError, json_format.ParseError) as e:
                        raise MalformedRequest(f"not OTLP/JSON metrics: {e}") from None
                elif as_json:
                    # Converting JSON costs far more than decoding protobuf: not while full.
                    obj = otlpjson.parse(data)
                    intake.check_room(lambda: otlpjson.count_spans(obj))
                    data = otlpjson.encode(obj)
            except MalformedRequest:
                intake.refuse_request("malformed")  # (export counts those it finds itself)
                raise
            return intake.export_metrics(data) if metrics else intake.export(data)
        except MalformedRequest as e:
            raise _bad_request(str(e)) from None
        except Overloaded as e:
            raise _retry_later(e.delay_s, "Backflow is overloaded, retry later") from None
        except _Refusal as r:
            if r.status == 413:
                intake.refuse_request("too_large")
            raise
