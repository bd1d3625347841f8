#!/usr/bin/env node
// A domsnap controller in Node.js, straight from the .proto: what a
// controller of many hosts needs from one agent.
//
//   node domsnap.js [ADDR] list
//   node domsnap.js [ADDR] create DOMAIN [NAME] [--request-id ID]
//   node domsnap.js [ADDR] watch OPERATION-ID
//   node domsnap.js [ADDR] snapshot DOMAIN SNAPSHOT
//   node domsnap.js [ADDR] token
//   node domsnap.js [ADDR] events [--since TOKEN] [--domain DOMAIN] [--count N]
//
// `create` streams a snapshot's progress; the same --request-id again (after
// a dropped connection, or an agent restart) answers the first operation
// instead of starting another. `watch` re-attaches to an operation. `events`
// follows the agent's change feed from a token (`token` prints the current
// one), one line per event with the event's own token to resume from.
//
// ADDR is unix:/path/to.sock (default: $DOMSNAP_HOST, else the agent's
// default socket) or HOST:PORT. TCP wants mutual TLS: set DOMSNAP_CA,
// DOMSNAP_CERT and DOMSNAP_KEY to PEM files, as for the domsnap CLI. The
// channel pings the agent every 10 s (DOMSNAP_KEEPALIVE_MS), so that a
// silent stream is known alive, as controllers behind NATs do.
//
// A failed call prints one line on stderr: the message, the status code, and
// the error's reason and metadata (google.rpc.ErrorInfo, decoded from the
// status details the agent sends), e.g.
//   domsnap.js: unix:/run/domsnap/domsnapd.sock: ... (NOT_FOUND) reason=SNAPSHOT_NOT_FOUND domain=web
// Exit status: 0 on success, 1 if a call or the operation failed.
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPO_PROTO = path.resolve(__dirname, '..', '..', 'proto');
// The googleapis files domsnap.proto imports (google/rpc, google/api), shipped
// beside it; google/protobuf/*.proto come with protobufjs.
const GOOGLEAPIS = path.join(REPO_PROTO, 'googleapis');
const KEEPALIVE_MS = Number(process.env.DOMSNAP_KEEPALIVE_MS || 10000);

function loadApi() {
  const definition = protoLoader.loadSync('domsnap/v1/domsnap.proto', {
    includeDirs: [REPO_PROTO, GOOGLEAPIS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).domsnap.v1;
}

// The rich error model: a google.rpc.Status in the trailer
// grpc-status-details-bin, whose details are Any (ErrorInfo, PreconditionFailure, ...).
const errorTypes = (() => {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    const own = path.join(GOOGLEAPIS, target);
    return fs.existsSync(own) ? own : protobuf.util.path.resolve(origin, target);
  };
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return root;
})();

function errorDetails(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return [];
  const status = errorTypes.lookupType('google.rpc.Status').decode(raw);
  return status.details.map((any) => {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = errorTypes.lookupType(name);
    return { type: name, value: type.toObject(type.decode(any.value), { defaults: true }) };
  });
}

function describe(err) {
  const parts = [`${err.details || err.message} (${grpc.status[err.code] || 'error'})`];
  for (const { type, value } of errorDetails(err)) {
    if (type === 'google.rpc.ErrorInfo') {
      parts.push(`reason=${value.reason}`);
      for (const key of Object.keys(value.metadata).sort()) parts.push(`${key}=${value.metadata[key]}`);
    } else if (type === 'google.rpc.PreconditionFailure') {
      for (const v of value.violations) parts.push(`violation=${v.type}:${v.subject}`);
    }
  }
  return parts.join(' ');
}

function credentials(address) {
  if (address.startsWith('unix:')) {
    // The agent knows who we are from the kernel (SO_PEERCRED).
    return grpc.credentials.createInsecure();
  }
  const read = (name) => (process.env[name] ? fs.readFileSync(process.env[name]) : null);
  return grpc.credentials.createSsl(read('DOMSNAP_CA'), read('DOMSNAP_KEY'), read('DOMSNAP_CERT'));
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(agent, method, request) {
  return new Promise((resolve, reject) => {
    agent[method](request, { deadline: deadline(30) }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// An operation's stream (CreateSnapshot, WatchOperation) printed to its end:
// `started` first, `progress`, then `finished`; a failed operation also ends
// the call with its status, which the finished event said already.
function follow(call) {
  return new Promise((resolve, reject) => {
    let finished = null;
    call.on('data', (event) => {
      if (event.event === 'started') {
        const op = event.started;
        console.log(`started operation ${op.id} (${op.kind} on ${op.domain}, ${op.state})`);
      } else if (event.event === 'progress') {
        const p = event.progress;
        const phase = p.phase.replace('PHASE_', '').toLowerCase();
        console.log(`progress ${phase} ${p.percent.toFixed(1)}%${p.message ? ` ${p.message}` : ''}`);
      } else if (event.event === 'finished') {
        finished = event.finished;
        const s = finished.result || {};
        const outcome = finished.state.replace('OPERATION_STATE_', '').toLowerCase();
        if (finished.state === 'OPERATION_STATE_SUCCEEDED') {
          console.log(`finished ${outcome}: snapshot ${s.name} of ${s.domain} in ${s.path}` +
            ` (guest paused ${(Number(s.downtime.seconds) * 1000 + s.downtime.nanos / 1e6).toFixed(0)} ms)`);
        } else {
          console.log(`finished ${outcome}: ${finished.error ? finished.error.message : ''}`);
        }
      }
    });
    call.on('error', (err) => (finished ? resolve(finished) : reject(err)));
    call.on('end', () => (finished ? resolve(finished) : reject(new Error('stream ended before the operation did'))));
  });
}

// The change feed: each event with its token; after `count` events, done.
function events(agent, { since = '', domain = '', count = 0 }) {
  return new Promise((resolve, reject) => {
    const call = agent.WatchEvents(domain ? { since, domain_name: domain } : { since });
    let seen = 0;
    console.log(`watching from ${since || 'now'}`);
    call.on('data', (ev) => {
      const what = ev.kind.replace('EVENT_KIND_', '').toLowerCase();
      const state = ev.operation_state === 'OPERATION_STATE_UNSPECIFIED' ? ''
        : ` ${ev.operation_state.replace('OPERATION_STATE_', '').toLowerCase()}`;
      const op = ev.operation_id ? ` operation=${ev.operation_id}${state}` : '';
      console.log(`event ${ev.token} ${what} domain=${ev.domain}${ev.snapshot ? ` snapshot=${ev.snapshot}` : ''}${op}`);
      seen += 1;
      if (count && seen >= count) {
        call.cancel();
        resolve();
      }
    });
    call.on('error', (err) => (err.code === grpc.status.CANCELLED && count && seen >= count ? resolve() : reject(err)));
    call.on('end', () => reject(new Error('the change feed ended')));
  });
}

function option(args, name, fallback) {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const [, value] = args.splice(i, 2);
  return value;
}

async function run(agent, command, args) {
  switch (command) {
    case 'list':
      for (const d of (await unary(agent, 'ListDomains', {})).domains) {
        const state = d.state.replace('DOMAIN_STATE_', '').toLowerCase();
        console.log(`domain ${d.name} id=${d.domid} state=${state} memory=${d.memory_mib}MiB vcpus=${d.vcpus}`);
      }
      return 0;
    case 'create': {
      const requestId = option(args, '--request-id', crypto.randomUUID());
      const [domain, name = ''] = args;
      const op = await follow(agent.CreateSnapshot({ request_id: requestId, domain_name: domain, name }));
      return op.state === 'OPERATION_STATE_SUCCEEDED' ? 0 : 1;
    }
    case 'watch': {
      const op = await follow(agent.WatchOperation({ operation_id: args[0] }));
      return op.state === 'OPERATION_STATE_SUCCEEDED' ? 0 : 1;
    }
    case 'snapshot': {
      const s = await unary(agent, 'GetSnapshot', { domain_name: args[0], snapshot_name: args[1] });
      console.log(`snapshot ${s.name} of ${s.domain} in ${s.path}`);
      return 0;
    }
    case 'token':
      console.log((await unary(agent, 'GetAgentInfo', {})).event_token);
      return 0;
    case 'events':
      await events(agent, {
        since: option(args, '--since', ''), domain: option(args, '--domain', ''),
        count: Number(option(args, '--count', '0')),
      });
      return 0;
    default:
      throw new Error(`unknown command ${command} (list, create, watch, snapshot, token, events)`);
  }
}

async function main(argv) {
  const args = argv.slice(2);
  const address = args[0] && /^(unix:|[^/]+:\d+$|\[)/.test(args[0]) ? args.shift()
    : process.env.DOMSNAP_HOST || 'unix:/run/domsnap/domsnapd.sock';
  const command = args.shift() || 'list';
  const api = loadApi();
  const agent = new api.SnapshotAgent(address, credentials(address), {
    'grpc.keepalive_time_ms': KEEPALIVE_MS,
    'grpc.keepalive_timeout_ms': 5000,
    'grpc.keepalive_permit_without_calls': 1,
  });
  try {
    return await run(agent, command, args);
  } catch (err) {
    console.error(`domsnap.js: ${address}: ${err.code !== undefined ? describe(err) : err.message}`);
    return 1;
  } finally {
    agent.close();
  }
}

main(process.argv).then((code) => { process.exitCode = code; });
