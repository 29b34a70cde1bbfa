// A consumer of Backflow's events in JavaScript, the example of docs/schema.md: reads the
// stream {prefix}:events with XREAD and decodes each entry as backflow.v1.Event, loading
// proto/backflow/v1/event.proto with protobufjs. Prints one JSON line per entry:
// {"stream_id": ..., "event": {proto field: value}, "detail": {the parsed detail}}.
//
//   node consume.js --redis-url redis://127.0.0.1:6379/0 --prefix backflow --count 2 --timeout-ms 20000
//
// Reads from the start of the stream (--from 0) until --count entries or --timeout-ms
// passes; a record that does not conform to the schema ends it with status 1, naming the
// field.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const protobuf = require('protobufjs');
const { createClient } = require('redis');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'backflow', 'v1', 'event.proto');

// The mapping rule: the proto field name is the Redis field name with "." as "_"; every
// value is a string; int64 and double fields are decimal strings; an `optional` number may
// be "" (not set); every field is there and no other. (The field's json_name option is the
// Redis name too; the check below holds the .proto to the rule.)
function eventDecoder() {
  const root = new protobuf.Root();
  root.loadSync(PROTO, { keepCase: true });
  const Event = root.lookupType('backflow.v1.Event');
  for (const f of Event.fieldsArray) {
    if (f.options.json_name.replace(/\./g, '_') !== f.name) throw new Error(`${f.name}: json_name breaks the rule`);
  }
  const INT = /^(0|-?[1-9][0-9]*)$/;
  const DOUBLE = /^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$/;

  return function decode(fields) {
    const object = {};
    for (const [name, value] of Object.entries(fields)) {
      const f = Event.fields[name.replace(/\./g, '_')];
      if (!f) throw new Error(`Event field '${name}': is not in the schema (unknown field)`);
      if (value === '' && f.options.proto3_optional) continue;
      if (f.type === 'int64' && !INT.test(value)) throw new Error(`Event field '${name}': '${value}' is not an integer`);
      if (f.type === 'double' && !(DOUBLE.test(value) && Number.isFinite(Number(value)))) {
        throw new Error(`Event field '${name}': '${value}' is not a finite decimal number`);
      }
      object[f.name] = f.type === 'double' ? Number(value) : value; // int64 stays a string: fromObject makes it a Long
    }
    for (const f of Event.fieldsArray) {
      if (!(f.options.json_name in fields)) throw new Error(`Event field '${f.options.json_name}': is missing`);
    }
    const problem = Event.verify(Event.fromObject(object));
    if (problem) throw new Error(`Event: ${problem}`);
    // Through the wire format and back, as a consumer that forwards events would.
    const message = Event.decode(Event.encode(Event.fromObject(object)).finish());
    return Event.toObject(message, { longs: String, defaults: true });
  };
}

async function main() {
  const { values: opt } = parseArgs({
    options: {
      'redis-url': { type: 'string', default: 'redis://localhost:6379/0' },
      prefix: { type: 'string', default: 'backflow' },
      from: { type: 'string', default: '0' },
      count: { type: 'string', default: '100' },
      'timeout-ms': { type: 'string', default: '10000' },
    },
  });
  const decode = eventDecoder();
  const client = createClient({ url: opt['redis-url'] });
  client.on('error', (err) => console.error(`redis: ${err.message}`));
  await client.connect();
  const key = `${opt.prefix}:events`;
  const deadline = Date.now() + Number(opt['timeout-ms']);
  let id = opt.from;
  let read = 0;
  try {
    while (read < Number(opt.count) && Date.now() < deadline) {
      const block = Math.max(1, Math.min(1000, deadline - Date.now()));
      const reply = await client.xRead({ key, id }, { COUNT: 100, BLOCK: block });
      for (const stream of reply || []) {
        for (const { id: streamId, message } of stream.messages) {
          const event = decode(message);
          const detail = JSON.parse(event.detail);
          if (detail === null || typeof detail !== 'object' || Array.isArray(detail)) {
            throw new Error(`Event field 'detail': is not a JSON object`);
          }
          console.log(JSON.stringify({ stream_id: streamId, event, detail }));
          id = streamId;
          read++;
        }
      }
    }
  } finally {
    await client.quit();
  }
  console.error(`read ${read} events from ${key}`);
}

main().catch((err) => { console.error(err.message); process.exit(1); });
