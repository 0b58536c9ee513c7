// Holds WatchAgents streams for scripts/bench.py's watch phase, in one Node.js process
// (@grpc/grpc-js): the benchmark's stand-in for 1,000 watchers on other machines. On a
// 2-core machine the holders share the CPU with the server they measure; grpc-js costs
// ~20 us of CPU a message where the Python holders (grpc.aio) cost ~45-60, which left the
// server's fan-out waiting on its own clients (docs/watch.md "Measured").
//
//   node holder.js <host:port> <streams> <channels> <metadata as JSON [[key, value], ...]>
//
// stdout: "ready" once every stream has its first message (the server's first heartbeat);
// then, after "stop" on stdin, one JSON line: {histogram: {bucket: deliveries},
// per_change: {agent_id: [deliveries, last arrival, change_time]}, counters: {...}} as the
// Python holders report it. Every change of every message is timed: from its change_time
// (stamped before its commit, on this machine's clock) to the message's arrival here.
'use strict';
const grpc = require('@grpc/grpc-js');
const { performance } = require('perf_hooks');
const readline = require('readline');

const WATCH = '/agentplatform.agent.v1.AgentService/WatchAgents';
const STEP = 0.0005; // seconds: the histogram's resolution (bench.py HISTOGRAM_STEP)
const [target, streamsArg, channelsArg, metadataArg] = process.argv.slice(2);
const streams = Number(streamsArg);
const channels = Number(channelsArg);
const metadata = new grpc.Metadata();
for (const [key, value] of JSON.parse(metadataArg)) metadata.add(key, value);

const histogram = new Map();
const perChange = new Map(); // agent id -> [deliveries, last arrival, change_time]
const counters = { messages: 0, parses: 0, opened: 0, ended: 0 };
const now = () => (performance.timeOrigin + performance.now()) / 1000;

// The protobuf wire format, as much of it as this needs: WatchAgentsResponse.changes (1),
// AgentChange.agent_id (3) and .change_time (4: Timestamp seconds 1, nanos 2).
function varint(buf, at) {
  let value = 0;
  let scale = 1;
  for (;;) {
    const byte = buf[at.pos++];
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return value;
    scale *= 128;
  }
}

function skip(buf, at, wire) {
  if (wire === 0) varint(buf, at);
  else if (wire === 1) at.pos += 8;
  else if (wire === 2) {
    const length = varint(buf, at); // before the sum: it moves at.pos
    at.pos += length;
  }
  else if (wire === 5) at.pos += 4;
  else throw new Error(`wire type ${wire}`);
}

function timestamp(buf, at, end) {
  let seconds = 0;
  let nanos = 0;
  while (at.pos < end) {
    const key = varint(buf, at);
    if (key === 0x08) seconds = varint(buf, at);
    else if (key === 0x10) nanos = varint(buf, at);
    else skip(buf, at, key & 7);
  }
  return seconds + nanos / 1e9;
}

function change(buf, at, end) {
  let agentId = '';
  let changeTime = 0;
  while (at.pos < end) {
    const key = varint(buf, at);
    if (key === 0x1a) {
      const length = varint(buf, at);
      agentId = buf.toString('utf8', at.pos, at.pos + length);
      at.pos += length;
    } else if (key === 0x22) {
      const length = varint(buf, at);
      changeTime = timestamp(buf, at, at.pos + length);
    } else skip(buf, at, key & 7);
  }
  return [agentId, changeTime];
}

function received(buf, arrival) {
  counters.parses++;
  const at = { pos: 0 };
  while (at.pos < buf.length) {
    const key = varint(buf, at);
    if (key !== 0x0a) {
      skip(buf, at, key & 7);
      continue;
    }
    const length = varint(buf, at);
    const end = at.pos + length;
    const [agentId, changeTime] = change(buf, at, end);
    at.pos = end;
    const bucket = Math.floor((arrival - changeTime) / STEP);
    histogram.set(bucket, (histogram.get(bucket) || 0) + 1);
    const seen = perChange.get(agentId);
    if (seen === undefined) perChange.set(agentId, [1, arrival, changeTime]);
    else {
      seen[0]++;
      if (arrival > seen[1]) seen[1] = arrival;
    }
  }
}

const identity = (x) => x;
const clients = [];
for (let n = 0; n < channels; n++) {
  clients.push(
    new grpc.Client(target, grpc.credentials.createInsecure(), {
      'grpc.use_local_subchannel_pool': 1, // a connection per client
      // As the typed client's watch channel (WATCH_CHANNEL_OPTIONS): a 16 KiB window.
      'grpc-node.flow_control_window': 16 * 1024,
      'grpc.max_receive_message_length': 4 * 1024 * 1024,
    }),
  );
}
const calls = [];
for (let n = 0; n < streams; n++) {
  const call = clients[n % channels].makeServerStreamRequest(
    WATCH, identity, identity, Buffer.alloc(0), metadata,
  );
  let first = true;
  call.on('data', (data) => {
    const arrival = now();
    if (first) {
      first = false;
      if (++counters.opened === streams) console.log('ready');
      return;
    }
    counters.messages++;
    received(data, arrival);
  });
  call.on('error', (error) => {
    if (error.code !== grpc.status.CANCELLED) counters.ended++;
  });
  calls.push(call);
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line !== 'stop') return;
  for (const call of calls) call.cancel();
  const report = {
    histogram: Object.fromEntries(histogram),
    per_change: Object.fromEntries(perChange),
    counters,
  };
  process.stdout.write(JSON.stringify(report) + '\n', () => process.exit(0));
});
