"""Backflow quickstart for Python: a span per call, keyed by the function's code location.

    pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc
    export OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 OTEL_SERVICE_NAME=shop
    export OTEL_RESOURCE_ATTRIBUTES=service.version=1.0.0,deployment.environment.name=prod
    python quickstart.py
"""
import functools
import inspect

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

# The resource comes from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, the endpoint from
# OTEL_EXPORTER_OTLP_ENDPOINT.
provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("shop")


def traced(fn):
    """A span per call with code.function.name, code.file.path and code.line.number."""
    code = fn.__code__
    module = fn.__module__ if fn.__module__ != "__main__" else inspect.getmodulename(code.co_filename)
    attributes = {"code.function.name": f"{module}.{fn.__qualname__}", "code.file.path": code.co_filename,
                  "code.line.number": code.co_firstlineno}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with tracer.start_as_current_span(fn.__qualname__, attributes=attributes):
            return fn(*args, **kwargs)
    return wrapper


@traced
def apply_discount(total: float) -> float:
    return total * 0.9


@traced
def checkout(total: float) -> float:
    return apply_discount(total) + 4.5


if __name__ == "__main__":
    for i in range(20):
        checkout(10.0 * i)
    provider.shutdown()  # sends what is left
