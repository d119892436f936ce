#!/usr/bin/env node
// A Node.js client of the mlsignal InferenceService, built at run time from protos/mlsignal/v1 with
// @grpc/proto-loader (no generated code).
//
//   node client.js --target 127.0.0.1:50052 --candles candles.json [--symbol BTC/USD] [--timeframe 1h]
//
// candles.json is an array of {open_time_ms, open, high, low, close, volume} objects (open_time_ms as a string or a
// number). The client sends one Predict over all candles, then a StreamPredict with one candle per message (each
// message waits for its answer, the way a live feed sends a candle when it closes), and prints one JSON object:
//
//   {"predict": {"model_id": ..., "predictions": [...]}, "stream": {"model_ids": [...], "predictions": [...]}}
//
// where each prediction is {open_time_ms (string), ready, in_sample, ml_up_prob, ml_down_prob, ml_range_prob} and the
// probabilities are null when the candle is not ready (JSON has no NaN).
//
// A failed call prints {"error": {"rpc", "code", "code_name", "details"}} and exits 1.
//
// Loader options, and why:
//   keepCase: true   keep the proto field names (open_time_ms). Without it proto-loader renames every field to
//                    camelCase (openTimeMs) and silently drops the snake_case keys of the objects it is given, so
//                    the server receives open_time_ms = 0 and refuses the candle.
//   longs: String    int64 fields (open_time_ms) arrive as decimal strings, never as a lossy or Long object; on the
//                    way out a string or a Number both work (millisecond times are far below 2^53).
//   enums: String    enum values arrive as their names (JOB_STATE_SUCCEEDED), not numbers.
//   defaults: true   fields at their proto3 default are present on received objects: ready=false, in_sample=false,
//                    and the message field `error` as null, instead of missing.
//   oneofs: true     a oneof's set member is named by a virtual field.
//   includeDirs      the repository's protos/ for mlsignal/v1, and protos/ next to this file for
//                    google/rpc/status.proto (imported by inference.proto). google/protobuf/*.proto
//                    (Timestamp, Any) are built into protobufjs.
//
// --no-keep-case loads the protos without keepCase, to show what goes wrong without it.
//
// Security: --token TOKEN (default: MLSIGNAL_AUTH_TOKEN) is sent as `authorization: Bearer <token>`, --ca-cert PEM
// (default: MLSIGNAL_TLS_CA) connects with TLS. Without TLS the token is only sent to a loopback target (localhost,
// 127.0.0.0/8, ::1) or a unix: socket; any other plaintext target with a token is refused before connecting, unless
// --insecure-token accepts sending it in clear text. The same rule as the Python client.

'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const HERE = __dirname;
const REPO = path.resolve(HERE, '..', '..');

function parseArgs(argv) {
  const args = {
    target: '',
    candles: '',
    symbol: 'BTC/USD',
    timeframe: '1h',
    protos: path.join(REPO, 'protos'),
    include: [path.join(HERE, 'protos')],
    keepCase: true,
    deadlineSeconds: 60,
    token: process.env.MLSIGNAL_AUTH_TOKEN || '',
    caCert: process.env.MLSIGNAL_TLS_CA || '',
    insecureToken: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    switch (flag) {
      case '--target': args.target = value(); break;
      case '--candles': args.candles = value(); break;
      case '--symbol': args.symbol = value(); break;
      case '--timeframe': args.timeframe = value(); break;
      case '--protos': args.protos = value(); break;
      case '--include': args.include.push(value()); break;
      case '--deadline': args.deadlineSeconds = Number(value()); break;
      case '--no-keep-case': args.keepCase = false; break;
      case '--token': args.token = value(); break;
      case '--ca-cert': args.caCert = value(); break;
      case '--insecure-token': args.insecureToken = true; break;
      default: throw new Error(`unknown argument ${flag}`);
    }
  }
  if (!args.target || !args.candles) {
    throw new Error('usage: node client.js --target HOST:PORT --candles FILE.json [--symbol S] [--timeframe TF]');
  }
  return args;
}

// Whether every address of a gRPC target is on this machine: unix: sockets, localhost, 127.0.0.0/8 and ::1, also in
// the dns:///, ipv4: and ipv6: forms.
function isLocalTarget(target) {
  let t = target.trim();
  if (t.startsWith('unix:') || t.startsWith('unix-abstract:')) return true;
  let addresses;
  if (t.startsWith('ipv4:') || t.startsWith('ipv6:')) {
    addresses = t.slice(5).split(',');
  } else {
    if (t.startsWith('dns:')) {
      t = t.slice(4);
      if (t.startsWith('//')) t = t.slice(2).split('/').slice(1).join('/');
    }
    addresses = [t];
  }
  const loopback = (host) => {
    const h = host.toLowerCase().replace(/\.$/, '');
    if (h === 'localhost' || h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
    const m = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(h);
    return m !== null && Number(m[1]) === 127 && m.slice(2).every((x) => Number(x) <= 255);
  };
  return addresses.length > 0 && addresses.every((a) => {
    a = a.trim();
    let host;
    if (a.startsWith('[')) host = a.slice(1, a.indexOf(']'));
    else if ((a.match(/:/g) || []).length > 1) host = a;
    else host = a.split(':')[0];
    return loopback(host);
  });
}

// Channel credentials and per-call metadata for the security options; throws before anything connects when a token
// would travel in clear text to another machine.
function security(args) {
  const metadata = new grpc.Metadata();
  if (args.caCert) {
    let creds = grpc.credentials.createSsl(fs.readFileSync(args.caCert));
    if (args.token) {
      creds = grpc.credentials.combineChannelCredentials(creds, grpc.credentials.createFromMetadataGenerator(
        (_params, callback) => {
          const md = new grpc.Metadata();
          md.add('authorization', `Bearer ${args.token}`);
          callback(null, md);
        }));
    }
    return { credentials: creds, metadata };
  }
  if (args.token) {
    if (!isLocalTarget(args.target) && !args.insecureToken) {
      throw new Error(`refusing to send the bearer token in clear text to ${args.target}: use --ca-cert (TLS), or ` +
                      '--insecure-token to accept plaintext; without TLS a token is only sent to loopback or unix: ' +
                      'targets');
    }
    // plaintext: grpc-js attaches call credentials only to secure channels, so the token goes as call metadata
    metadata.add('authorization', `Bearer ${args.token}`);
  }
  return { credentials: grpc.credentials.createInsecure(), metadata };
}

function loadService(args) {
  const files = ['mlsignal/v1/common.proto', 'mlsignal/v1/inference.proto'];
  const definition = protoLoader.loadSync(files, {
    keepCase: args.keepCase,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [args.protos, ...args.include],
  });
  const pkg = grpc.loadPackageDefinition(definition);
  return pkg.mlsignal.v1.InferenceService;
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

// A candle as the proto-loader object for mlsignal.v1.Candle. open_time_ms goes out as a decimal string, the
// int64-safe form; the prices are plain numbers (double).
function toCandle(c) {
  return {
    open_time_ms: String(c.open_time_ms),
    open: c.open,
    high: c.high,
    low: c.low,
    close: c.close,
    volume: c.volume,
  };
}

function prediction(p) {
  // With keepCase off the fields are camelCase; read either so --no-keep-case can show the server's answer.
  const t = p.open_time_ms !== undefined ? p.open_time_ms : p.openTimeMs;
  const prob = (snake, camel) => {
    const v = p[snake] !== undefined ? p[snake] : p[camel];
    return p.ready && Number.isFinite(v) ? v : null;
  };
  return {
    open_time_ms: String(t),
    ready: p.ready,
    in_sample: p.in_sample !== undefined ? p.in_sample : p.inSample,
    ml_up_prob: prob('ml_up_prob', 'mlUpProb'),
    ml_down_prob: prob('ml_down_prob', 'mlDownProb'),
    ml_range_prob: prob('ml_range_prob', 'mlRangeProb'),
  };
}

class CallError extends Error {
  constructor(rpc, code, details) {
    super(`${rpc}: ${grpc.status[code] || code}: ${details}`);
    this.rpc = rpc;
    this.code = code;
    this.details = details;
  }
}

function predict(client, args, candles, metadata) {
  const request = { symbol: args.symbol, timeframe: args.timeframe, candles: candles.map(toCandle) };
  return new Promise((resolve, reject) => {
    client.Predict(request, metadata, { deadline: deadline(args.deadlineSeconds) }, (err, resp) => {
      if (err) {
        reject(new CallError('Predict', err.code, err.details));
        return;
      }
      resolve({ model_id: resp.model_id !== undefined ? resp.model_id : resp.modelId,
                predictions: resp.predictions.map(prediction) });
    });
  });
}

// One StreamPredict, one candle per message; each message is sent once the answer to the previous one arrived.
function stream(client, args, candles, metadata) {
  return new Promise((resolve, reject) => {
    const call = client.StreamPredict(metadata, { deadline: deadline(args.deadlineSeconds) });
    const out = { model_ids: [], predictions: [] };
    let next = 0;
    let settled = false;
    const fail = (error) => {
      if (!settled) {
        settled = true;
        call.cancel();
        reject(error);
      }
    };
    const send = () => {
      if (next === candles.length) {
        call.end();
        return;
      }
      // The first message names the market; later ones may leave it empty (the stream remembers it).
      const first = next === 0;
      call.write({ symbol: first ? args.symbol : '', timeframe: first ? args.timeframe : '',
                   candles: [toCandle(candles[next])] });
      next += 1;
    };
    call.on('data', (resp) => {
      if (resp.error) {  // a message the server refused; the stream itself stays open
        fail(new CallError('StreamPredict', resp.error.code, resp.error.message));
        return;
      }
      if (resp.predictions.length !== 1) {
        fail(new Error(`StreamPredict: ${resp.predictions.length} predictions for one candle`));
        return;
      }
      out.model_ids.push(resp.model_id);
      out.predictions.push(prediction(resp.predictions[0]));
      send();
    });
    call.on('error', (err) => fail(new CallError('StreamPredict', err.code, err.details)));
    call.on('end', () => {
      if (settled) return;
      settled = true;
      if (out.predictions.length !== candles.length) {
        reject(new Error(`StreamPredict: ${out.predictions.length} answers for ${candles.length} candles`));
      } else {
        resolve(out);
      }
    });
    send();
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const candles = JSON.parse(fs.readFileSync(args.candles, 'utf8'));
  if (!Array.isArray(candles) || candles.length === 0) throw new Error(`${args.candles}: expected a non-empty array`);
  const { credentials, metadata } = security(args);  // before any channel exists
  const InferenceService = loadService(args);
  const client = new InferenceService(args.target, credentials);
  try {
    const result = { predict: await predict(client, args, candles, metadata) };
    result.stream = await stream(client, args, candles, metadata);
    process.stdout.write(JSON.stringify(result) + '\n');
  } finally {
    client.close();
  }
}

main().catch((err) => {
  if (err instanceof CallError) {
    process.stdout.write(JSON.stringify({ error: { rpc: err.rpc, code: err.code, code_name: grpc.status[err.code],
                                                   details: err.details } }) + '\n');
  } else {
    process.stderr.write(`${err.stack || err}\n`);
  }
  process.exitCode = 1;
});
