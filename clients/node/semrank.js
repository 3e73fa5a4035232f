// A Node.js client for semrank's RankingService (protos/semrank/ranking/v1/ranking_service.proto).
//
//   const { connect } = require("./semrank");
//   const client = connect("127.0.0.1:50051", { token: process.env.SEMRANK_TOKEN });
//   const ranked = await client.rank({ userId: "u1", candidates: [{ itemId: "sku-1" }, { itemId: "sku-2" }] });
//   const ack = await client.logEvents([{ userId: "u1", itemId: "sku-1", type: "EVENT_TYPE_CLICK" }]);
//   // ack.accepted + ack.duplicates events are stored; resend the same call after any failure.
//
// Errors are grpc-js ServiceErrors with `code` and `details`; `richError(err)` decodes semrank's
// google.rpc.Status trailer into { code, message, reason, metadata, fieldViolations }.
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const REPO_PROTOS = path.join(__dirname, "..", "..", "protos");
const LOCAL_PROTOS = path.join(__dirname, "protos");
const LOAD_OPTIONS = { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true };

const definition = protoLoader.loadSync(
  [path.join(REPO_PROTOS, "semrank/ranking/v1/ranking_service.proto"), path.join(LOCAL_PROTOS, "grpc/health/v1/health.proto")],
  { ...LOAD_OPTIONS, includeDirs: [REPO_PROTOS, LOCAL_PROTOS] },
);
const loaded = grpc.loadPackageDefinition(definition);
const RankingService = loaded.semrank.ranking.v1.RankingService;
const Health = loaded.grpc.health.v1.Health;

const rpcRoot = new protobuf.Root().loadSync(path.join(LOCAL_PROTOS, "google/rpc/status.proto"), { keepCase: true });
const Status = rpcRoot.lookupType("google.rpc.Status");
const DETAIL_TYPES = {
  "type.googleapis.com/google.rpc.ErrorInfo": rpcRoot.lookupType("google.rpc.ErrorInfo"),
  "type.googleapis.com/google.rpc.BadRequest": rpcRoot.lookupType("google.rpc.BadRequest"),
};

/** A google.protobuf.Timestamp for a Date (default: now). */
function timestamp(date = new Date()) {
  const ms = date.getTime();
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

/** Decode semrank's rich status from a failed call: { code, message, reason, domain, metadata, fieldViolations }. */
function richError(err) {
  const out = { code: err.code, message: err.details, reason: null, domain: null, metadata: {}, fieldViolations: [] };
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin");
  if (!raw || raw.length === 0) return out;
  const status = Status.decode(Buffer.isBuffer(raw[0]) ? raw[0] : Buffer.from(raw[0], "base64"));
  for (const any of status.details) {
    const type = DETAIL_TYPES[any.type_url];
    if (!type) continue;
    const detail = type.toObject(type.decode(any.value), { defaults: true });
    if (any.type_url.endsWith("ErrorInfo")) {
      Object.assign(out, { reason: detail.reason, domain: detail.domain, metadata: detail.metadata });
    } else {
      out.fieldViolations = detail.field_violations.map((v) => ({ field: v.field, description: v.description }));
    }
  }
  return out;
}

function unary(stub, method, request, options) {
  return new Promise((resolve, reject) => {
    stub[method](request, options.metadata, { deadline: Date.now() + options.timeoutMs }, (err, resp) =>
      err ? reject(err) : resolve(resp));
  });
}

/**
 * connect(address, { token, credentials, timeoutMs }) -> client with rank, logEvents, upsertItems,
 * getModelInfo, health, close. `token` is sent as "authorization: Bearer <token>"; `credentials`
 * defaults to plaintext (pass grpc.credentials.createSsl(ca) for TLS).
 */
function connect(address, { token = null, credentials = grpc.credentials.createInsecure(), timeoutMs = 10000 } = {}) {
  const stub = new RankingService(address, credentials);
  const health = new Health(address, credentials, { channelOverride: stub.getChannel() });
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  const options = { metadata, timeoutMs };

  return {
    /** Rank candidates for a user: { items: [{ itemId, score, rank }], modelVersion, degraded, ... }. */
    rank: (request) => unary(stub, "rank", request, options),

    /**
     * Log events, one stream, `perMessage` events a message. An event without `eventId` gets a random
     * one (make it when the event happens, and keep it for retries: the server stores each id once).
     * Resolves to { accepted, duplicates, rejected, rejections }.
     */
    logEvents(events, { perMessage = 500 } = {}) {
      const withIds = events.map((e) => ({ ts: timestamp(), ...e, eventId: e.eventId || crypto.randomUUID() }));
      return new Promise((resolve, reject) => {
        const call = stub.logEvents(metadata, { deadline: Date.now() + timeoutMs }, (err, resp) =>
          err ? reject(err) : resolve(resp));
        for (let k = 0; k < withIds.length; k += perMessage) call.write({ events: withIds.slice(k, k + perMessage) });
        call.end();
      });
    },

    /** Upsert items: [{ itemId, title, category, brand, price }] -> { accepted, rejected, rejections }. */
    upsertItems(items) {
      return new Promise((resolve, reject) => {
        const call = stub.upsertItems(metadata, { deadline: Date.now() + timeoutMs }, (err, resp) =>
          err ? reject(err) : resolve(resp));
        call.write({ items });
        call.end();
      });
    },

    getModelInfo: () => unary(stub, "getModelInfo", {}, options),

    /** The health status of `service` ("" overall, "semrank.readiness" for the dependencies). */
    health: (service = "") => unary(health, "check", { service }, options).then((r) => r.status),

    close() {
      stub.close();
    },
  };
}

module.exports = { connect, richError, timestamp, grpc };
