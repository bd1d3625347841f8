#!/usr/bin/env node
// A domsnap client in Node.js, straight from the .proto: lists the agent's
// domains and, given a domain, takes a snapshot of it and prints the
// operation's progress as the agent streams it.
//
//   node domsnap.js [ADDR] [DOMAIN [SNAPSHOT-NAME]]
//
// ADDR is unix:/path/to.sock (default: $DOMSNAP_HOST, else the agent's
// default socket) or HOST:PORT. TCP wants mutual TLS: set DOMSNAP_CA,
// DOMSNAP_CERT and DOMSNAP_KEY to PEM files, as for the domsnap CLI.
// Exit status: 0 on success, 1 if a call or the operation failed.
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO_PROTO = path.resolve(__dirname, '..', '..', 'proto');

function loadApi() {
  const definition = protoLoader.loadSync('domsnap/v1/domsnap.proto', {
    // domsnap.proto and the googleapis files it imports (proto/googleapis/);
    // google/protobuf/*.proto come with protobufjs.
    includeDirs: [REPO_PROTO, path.join(REPO_PROTO, 'googleapis')],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).domsnap.v1;
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

function listDomains(agent) {
  return new Promise((resolve, reject) => {
    agent.ListDomains({}, { deadline: deadline(30) }, (err, response) => (err ? reject(err) : resolve(response.domains)));
  });
}

function createSnapshot(agent, domain, name) {
  return new Promise((resolve, reject) => {
    const call = agent.CreateSnapshot({ request_id: crypto.randomUUID(), domain_name: domain, name: name || '' });
    let finished = null;
    call.on('data', (event) => {
      if (event.event === 'started') {
        console.log(`started operation ${event.started.id} (${event.started.kind} on ${event.started.domain})`);
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
    // A failed operation also ends the call with its status: the finished event said it already.
    call.on('error', (err) => (finished ? resolve(finished) : reject(err)));
    call.on('end', () => (finished ? resolve(finished) : reject(new Error('stream ended before the operation did'))));
  });
}

async function main(argv) {
  const args = argv.slice(2);
  const address = args[0] && /^(unix:|[^/]+:\d+$|\[)/.test(args[0]) ? args.shift()
    : process.env.DOMSNAP_HOST || 'unix:/run/domsnap/domsnapd.sock';
  const [domain, name] = args;
  const api = loadApi();
  const agent = new api.SnapshotAgent(address, credentials(address));
  try {
    for (const d of await listDomains(agent)) {
      const state = d.state.replace('DOMAIN_STATE_', '').toLowerCase();
      console.log(`domain ${d.name} id=${d.domid} state=${state} memory=${d.memory_mib}MiB vcpus=${d.vcpus}`);
    }
    if (domain) {
      const op = await createSnapshot(agent, domain, name);
      return op.state === 'OPERATION_STATE_SUCCEEDED' ? 0 : 1;
    }
    return 0;
  } catch (err) {
    console.error(`domsnap.js: ${address}: ${err.details || err.message} (${grpc.status[err.code] || 'error'})`);
    return 1;
  } finally {
    agent.close();
  }
}

main(process.argv).then((code) => { process.exitCode = code; });
