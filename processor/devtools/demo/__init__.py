"""``backflow demo``: a shop instrumented with the OpenTelemetry SDK, and its rollout."""
