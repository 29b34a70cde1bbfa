// Sends spans to an OTLP/gRPC receiver with the OpenTelemetry JS SDK: a few calls of each
// function named on the command line, each span carrying code.function.name,
// code.file.path and code.line.number, in one resource with service.version. Times are
// explicit, so Backflow's event-time windows are known to the caller.
//
//   node send-spans.js --target 127.0.0.1:4317 --service shop-js --version 2.0.0 \
//     --revision 9f2c4e1 --start-ms 1700000000000 --calls 3 shop.cart.add_item shop.cart.checkout
'use strict';

const { parseArgs } = require('node:util');
const { BasicTracerProvider, BatchSpanProcessor } = require('@opentelemetry/sdk-trace-base');
const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-grpc');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const {
  ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION, ATTR_CODE_FUNCTION_NAME, ATTR_CODE_FILE_PATH, ATTR_CODE_LINE_NUMBER,
} = require('@opentelemetry/semantic-conventions');
const { ATTR_DEPLOYMENT_ENVIRONMENT_NAME, ATTR_VCS_REF_HEAD_REVISION } = require('@opentelemetry/semantic-conventions/incubating');

const { values: opt, positionals: functions } = parseArgs({
  allowPositionals: true,
  options: {
    target: { type: 'string' },
    service: { type: 'string', default: 'shop-js' },
    environment: { type: 'string', default: 'prod' },
    version: { type: 'string' },
    revision: { type: 'string', default: '' },
    'start-ms': { type: 'string' },
    calls: { type: 'string', default: '3' },
  },
});

function hrTime(ms) { // [seconds, nanoseconds], exact for whole milliseconds
  return [Math.floor(ms / 1000), (ms % 1000) * 1e6];
}

async function main() {
  const resource = resourceFromAttributes({
    [ATTR_SERVICE_NAME]: opt.service,
    [ATTR_SERVICE_VERSION]: opt.version,
    [ATTR_DEPLOYMENT_ENVIRONMENT_NAME]: opt.environment,
    ...(opt.revision ? { [ATTR_VCS_REF_HEAD_REVISION]: opt.revision } : {}),
  });
  const exporter = new OTLPTraceExporter({ url: `http://${opt.target}` });
  const provider = new BasicTracerProvider({ resource, spanProcessors: [new BatchSpanProcessor(exporter)] });
  const tracer = provider.getTracer('shop.js');
  const start = Number(opt['start-ms']);
  let sent = 0;
  functions.forEach((fn, f) => {
    const [module, name] = [fn.slice(0, fn.lastIndexOf('.')), fn.slice(fn.lastIndexOf('.') + 1)];
    for (let i = 0; i < Number(opt.calls); i++) {
      const begin = start + 1000 * i + 10 * f;
      const span = tracer.startSpan(name, {
        startTime: hrTime(begin),
        attributes: {
          [ATTR_CODE_FUNCTION_NAME]: fn,
          [ATTR_CODE_FILE_PATH]: `${module.replace(/\./g, '/')}.js`,
          [ATTR_CODE_LINE_NUMBER]: 10 + f,
        },
      });
      span.end(hrTime(begin + 5 + i));
      sent++;
    }
  });
  await provider.forceFlush();
  await provider.shutdown();
  console.log(JSON.stringify({ sent }));
}

main().catch((err) => { console.error(err); process.exit(1); });
