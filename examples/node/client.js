// A Node.js client of recsvc, built from the .proto alone, the way a platform
// team would: Recommend, SendFeedback, StreamFeedback with acks (resending what
// was not acked). Prints one JSON summary line; exits 1 if the contract fails.
//
//   npm ci && node client.js
//
// Environment: RECSVC_TARGET (default 127.0.0.1:50051), RECSVC_TOKEN (a bearer
// token, when the server runs with --auth-tokens), RECSVC_TLS_CA (a PEM CA:
// connect with TLS; the server runs with --tls-cert/--tls-key),
// RECSVC_USER (default "node-user-1"), RECSVC_PROTO (default: the repository's
// proto/recsvc/v1/recommender.proto).
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = process.env.RECSVC_PROTO ||
  path.join(__dirname, "..", "..", "proto", "recsvc", "v1", "recommender.proto");
const TARGET = process.env.RECSVC_TARGET || "127.0.0.1:50051";
const USER = process.env.RECSVC_USER || "node-user-1";

function loadService() {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names as in the .proto (user_id, not userId)
    longs: String,
    enums: String, // enums as their names ("CLICK"); a misspelt name arrives as 0
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).recsvc.v1.Recommender;
}

function credentials() {
  if (process.env.RECSVC_TLS_CA) {
    const tls = grpc.credentials.createSsl(fs.readFileSync(process.env.RECSVC_TLS_CA));
    if (!process.env.RECSVC_TOKEN) return tls;
    const token = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
      const metadata = new grpc.Metadata();
      metadata.add("authorization", `Bearer ${process.env.RECSVC_TOKEN}`);
      callback(null, metadata);
    });
    return grpc.credentials.combineChannelCredentials(tls, token);
  }
  return grpc.credentials.createInsecure();
}

// Plaintext channels cannot carry call credentials: send the token as metadata.
function metadata() {
  const md = new grpc.Metadata();
  if (process.env.RECSVC_TOKEN && !process.env.RECSVC_TLS_CA) {
    md.add("authorization", `Bearer ${process.env.RECSVC_TOKEN}`);
  }
  return md;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10_000);
    client[method](request, metadata(), { deadline }, (err, reply) =>
      err ? reject(err) : resolve(reply));
  });
}

// Streams events; resolves with the ids the server acked (durable) and the
// rejected ones. An error ends the stream: what was not acked must be resent.
function streamFeedback(client, events) {
  return new Promise((resolve, reject) => {
    const acked = new Set();
    const duplicates = [];
    const rejected = [];
    const call = client.StreamFeedback(metadata());
    call.on("data", (ack) => {
      for (const id of ack.event_ids) acked.add(id);
      duplicates.push(...ack.duplicate_event_ids);
      rejected.push(...ack.rejected.map((r) => ({ event_id: r.event_id, reason: r.reason })));
    });
    call.on("error", (err) => reject(Object.assign(err, { acked })));
    call.on("end", () => resolve({ acked, duplicates, rejected }));
    for (const event of events) call.write(event);
    call.end();
  });
}

function event(id, item, type) {
  return { event_id: id, user_id: USER, item_id: item, type };
}

async function main() {
  const Recommender = loadService();
  const client = new Recommender(TARGET, credentials());
  const run = crypto.randomBytes(6).toString("hex");

  const before = await unary(client, "Recommend", { user_id: USER, k: 5 });
  const items = before.items.map((i) => i.item_id);
  if (items.length === 0) throw new Error("Recommend returned no items");

  const sent = await unary(client, "SendFeedback", {
    events: [event(`node-${run}-0`, items[0], "PURCHASE")],
  });
  if (sent.accepted !== 1) throw new Error(`SendFeedback accepted ${sent.accepted}, not 1`);

  // a stream of clicks, one resent (a duplicate) and one with a misspelt type
  const clicks = items.map((item, i) => event(`node-${run}-${i + 1}`, item, "CLICK"));
  const stream = await streamFeedback(client, [
    ...clicks,
    clicks[0],
    event(`node-${run}-bad`, items[0], "CLIK"),
  ]);
  const missing = clicks.filter((e) => !stream.acked.has(e.event_id));
  if (missing.length) throw new Error(`not acked: ${missing.map((e) => e.event_id)}`);
  if (stream.rejected.length !== 1 || !/valid values/.test(stream.rejected[0].reason)) {
    throw new Error(`expected the misspelt event rejected: ${JSON.stringify(stream.rejected)}`);
  }

  const after = await unary(client, "Recommend", { user_id: USER, k: 5 });
  console.log(JSON.stringify({
    target: TARGET,
    recommended: items,
    scores: before.items.map((i) => i.score),
    sources: before.items.map((i) => i.source),
    send_feedback: sent,
    stream_acked: stream.acked.size,
    stream_duplicates: stream.duplicates,
    stream_rejected: stream.rejected,
    personalized_after: after.personalized,
    model_version: after.model_version,
  }));
  client.close();
}

main().catch((err) => {
  console.error(`recsvc node example failed: ${err.code !== undefined ? `${grpc.status[err.code]}: ` : ""}${err.details || err.message}`);
  process.exit(1);
});
