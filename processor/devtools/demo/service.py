"""The demo's service: the shop's functions called at a steady rate, every call a span made
by the real OpenTelemetry SDK (TracerProvider, BatchSpanProcessor, OTLP/gRPC exporter)
with the code attributes a code-level instrumentation sets.

Latency is simulated rather than spent: a call's span gets explicit start and end times
(end = now, start = now - the duration the function returned), so a few hundred calls a
second cost a few percent of a core instead of threads asleep in time.sleep.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

from processor.devtools.demo.shop import V1, V2, cart, payments, search

SHOP_ROOT = os.path.dirname(os.path.abspath(__file__))  # holds shop/

# What the demo writes as the shop's CODEOWNERS (paths relative to SHOP_ROOT).
CODEOWNERS = """\
*                   @demo/platform
/shop/cart.py       @demo/checkout
/shop/payments.py   @demo/payments
/shop/search.py     @demo/search
"""


@dataclass(frozen=True)
class Route:
    function: Callable
    per_second: float
    versions: tuple[str, ...] = (V1, V2)

    @property
    def name(self) -> str:  # shop.cart.apply_discount
        return self.function.__module__.removeprefix("processor.devtools.demo.") + "." + self.function.__name__

    @property
    def attributes(self) -> dict:
        code = self.function.__code__
        return {"code.function.name": self.name,
                "code.file.path": os.path.relpath(code.co_filename, SHOP_ROOT),
                "code.line.number": code.co_firstlineno}


ROUTES = (
    Route(cart.add_item, 40),
    Route(cart.apply_discount, 40),
    Route(payments.charge, 40),
    Route(payments.legacy_fraud_check, 40, versions=(V1,)),
    Route(payments.fraud_score, 40, versions=(V2,)),
    Route(search.search, 250),
)


class ShopService:
    """Calls the routes of one version at their rates on a thread, until ``stop()``;
    ``roll_out(version)`` replaces the running version (a new SDK provider, as a new
    process of the service would have)."""

    def __init__(self, endpoint: str, seed: int = 7, tick_s: float = 0.05):
        self.endpoint = endpoint
        self.rng = random.Random(seed)
        self.tick_s = tick_s
        self.version = V1
        self.provider = self._provider(V1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-shop", daemon=True)
        self.calls = 0

    def _provider(self, version: str):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({
            "service.name": "shop", "service.version": version, "deployment.environment.name": "demo"}))
        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=self.endpoint, insecure=True),
            schedule_delay_millis=200, max_queue_size=20_000, max_export_batch_size=2_000))
        return provider

    def start(self) -> "ShopService":
        self._thread.start()
        return self

    def roll_out(self, version: str) -> None:
        new = self._provider(version)
        with self._lock:
            old, self.provider, self.version = self.provider, new, version
        old.shutdown()  # flushes what the old version sent

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.provider.shutdown()

    def _run(self) -> None:
        from opentelemetry.trace import Status, StatusCode

        owed = {route: 0.0 for route in ROUTES}  # fractional calls carried to the next tick
        last = time.monotonic()
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            elapsed, last = now - last, now
            with self._lock:
                version, tracer = self.version, self.provider.get_tracer("shop")
            for route in ROUTES:
                if version not in route.versions:
                    continue
                owed[route] += route.per_second * elapsed
                calls, owed[route] = divmod(owed[route], 1.0)
                for _ in range(int(calls)):
                    end = time.time_ns()
                    error = None
                    try:
                        took_ms = route.function(version, self.rng)
                    except Exception as e:  # the span records it, as instrumentation does
                        error, took_ms = e, self.rng.lognormvariate(3.0, 0.3)
                    span = tracer.start_span(route.name, start_time=end - int(took_ms * 1e6),
                                             attributes=route.attributes)
                    if error is not None:
                        span.record_exception(error, timestamp=end)
                        span.set_status(Status(StatusCode.ERROR, str(error)))
                    span.end(end_time=end)
                    self.calls += 1
