// Auto-instrumented spans, as a Node.js service without code attributes sends them: the
// OpenTelemetry HTTP instrumentation on a small server and the client calling it (spans
// named GET and POST, server and client). Configured by the OTEL_ variables only.
//
//   OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 OTEL_SERVICE_NAME=shop-node node http-spans.js
'use strict';

const { NodeTracerProvider, BatchSpanProcessor } = require('@opentelemetry/sdk-trace-node');
const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-grpc');
const { defaultResource, detectResources, envDetector } = require('@opentelemetry/resources');
const { registerInstrumentations } = require('@opentelemetry/instrumentation');
const { HttpInstrumentation } = require('@opentelemetry/instrumentation-http');

const resource = defaultResource().merge(detectResources({ detectors: [envDetector] }));
const provider = new NodeTracerProvider({ resource, spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter())] });
provider.register();
registerInstrumentations({ instrumentations: [new HttpInstrumentation()] });

const http = require('node:http'); // after the instrumentation: it patches the module

function call(port, method, path) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: 'localhost', port, method, path }, (res) => { res.resume(); res.on('end', resolve); });
    req.on('error', reject);
    req.end(method === 'POST' ? '{}' : undefined);
  });
}

async function main() {
  const server = http.createServer((req, res) => { req.resume(); req.on('end', () => res.end('ok')); });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  for (let i = 0; i < 5; i++) {
    await call(port, 'GET', `/orders/${i}`);
    await call(port, 'POST', `/orders/${i}/pay`);
  }
  server.close();
  await provider.shutdown();
  console.log(JSON.stringify({ calls: 10 }));
}

main().catch((err) => { console.error(err); process.exit(1); });
