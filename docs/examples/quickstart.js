// Backflow quickstart for Node.js (OpenTelemetry JS SDK 2.x): a span per call, keyed by
// the function's code location.
//
//   npm install @opentelemetry/api @opentelemetry/sdk-trace-base @opentelemetry/resources \
//     @opentelemetry/exporter-trace-otlp-grpc
//   export OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 OTEL_SERVICE_NAME=shop
//   export OTEL_RESOURCE_ATTRIBUTES=service.version=1.0.0,deployment.environment.name=prod
//   node quickstart.js
'use strict';

const { BasicTracerProvider, BatchSpanProcessor } = require('@opentelemetry/sdk-trace-base');
const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-grpc');
const { defaultResource, detectResources, envDetector } = require('@opentelemetry/resources');

// In SDK 2.x a provider built by hand reads neither OTEL_SERVICE_NAME nor
// OTEL_RESOURCE_ATTRIBUTES: detect them, or every span is service "unknown_service".
const resource = defaultResource().merge(detectResources({ detectors: [envDetector] }));
const exporter = new OTLPTraceExporter(); // the endpoint from OTEL_EXPORTER_OTLP_ENDPOINT
const provider = new BasicTracerProvider({ resource, spanProcessors: [new BatchSpanProcessor(exporter)] });
const tracer = provider.getTracer('shop');

// A span per call with code.function.name, code.file.path and code.line.number.
function traced(module, fn) {
  const line = Number((new Error().stack.split('\n')[2].match(/:(\d+):\d+\)?$/) || [])[1]) || undefined;
  const attributes = { 'code.function.name': `${module}.${fn.name}`, 'code.file.path': __filename };
  if (line) attributes['code.line.number'] = line;
  return function (...args) {
    return tracer.startActiveSpan(fn.name, { attributes }, (span) => {
      try { return fn.apply(this, args); } finally { span.end(); }
    });
  };
}

const applyDiscount = traced('shop.cart', function applyDiscount(total) { return total * 0.9; });
const checkout = traced('shop.cart', function checkout(total) { return applyDiscount(total) + 4.5; });

async function main() {
  for (let i = 0; i < 20; i++) checkout(10 * i);
  await provider.shutdown(); // sends what is left
}

main().catch((err) => { console.error(err); process.exit(1); });
