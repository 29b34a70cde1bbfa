"""Backflow: feedback from production back to the code.

Receives OpenTelemetry spans over OTLP, keys them by code location, aggregates them in
event-time windows and publishes baselines and events to Redis and Prometheus.
"""

__version__ = "0.1.0"
