// Runs the client against a live semrank server and checks what a backend relies on:
//   SEMRANK_ADDRESS=127.0.0.1:50051 SEMRANK_ITEMS=sku-1,sku-2,sku-3 [SEMRANK_TOKEN=...] node check.js
// Prints one JSON line with what it saw; exits 1 on the first unmet expectation.
// tests/clients/test_node_client.py runs it in `make test` against a real server.
"use strict";

const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const { connect, richError, grpc } = require("./semrank");

async function main() {
  const address = process.env.SEMRANK_ADDRESS;
  const items = (process.env.SEMRANK_ITEMS || "").split(",").filter(Boolean);
  assert.ok(address && items.length >= 3, "set SEMRANK_ADDRESS and SEMRANK_ITEMS (at least 3 item ids)");
  const client = connect(address, { token: process.env.SEMRANK_TOKEN || null });
  const seen = {};
  try {
    seen.health = await client.health("");
    assert.equal(seen.health, "SERVING");

    const user = `node-user-${crypto.randomUUID()}`;
    const ranked = await client.rank({ userId: user, candidates: items.map((itemId) => ({ itemId })), explain: true });
    assert.deepEqual([...ranked.items.map((i) => i.itemId)].sort(), [...items].sort());
    assert.deepEqual(ranked.items.map((i) => i.rank), items.map((_, k) => k + 1));
    seen.modelVersion = ranked.modelVersion;

    // Events with ids: a retried call is stored once.
    const events = items.slice(0, 3).map((itemId, k) => ({
      eventId: `${user}-e${k}`, userId: user, itemId, type: k === 2 ? "EVENT_TYPE_PURCHASE" : "EVENT_TYPE_CLICK",
    }));
    const first = await client.logEvents(events);
    const retry = await client.logEvents(events);
    seen.logEvents = { first: { accepted: first.accepted, duplicates: first.duplicates },
                       retry: { accepted: retry.accepted, duplicates: retry.duplicates } };
    assert.equal(first.accepted, 3);
    assert.equal(retry.accepted, 0);
    assert.equal(retry.duplicates, 3);

    const after = await client.rank({ userId: user, candidates: items.map((itemId) => ({ itemId })) });
    assert.equal(after.items.length, items.length);

    // A bad request: INVALID_ARGUMENT with ErrorInfo and the BadRequest field violations decoded.
    try {
      await client.rank({ userId: "", candidates: [] });
      assert.fail("an empty Rank request was accepted");
    } catch (err) {
      if (err.code === undefined) throw err;
      const rich = richError(err);
      seen.invalid = rich;
      assert.equal(rich.code, grpc.status.INVALID_ARGUMENT);
      assert.equal(rich.reason, "INVALID_REQUEST");
      assert.equal(rich.domain, "semrank");
      assert.deepEqual(rich.fieldViolations.map((v) => v.field), ["user_id", "candidates"]);
    }
  } finally {
    client.close();
  }
  console.log(JSON.stringify(seen));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
