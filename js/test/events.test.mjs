// Subscriptions, wildcards (§10.1), local dispatch to every matching handler, unsubscribing.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { NkClient } from "../nkservice.js";
import { deferred, next, startServer } from "../test-helpers/server.mjs";

let server;
const clients = [];

async function connected(service, user, password, options) {
  const client = new NkClient(server.url(service), { user, password, ...options });
  clients.push(client);
  await client.connect();
  return client;
}

before(async () => {
  server = await startServer({
    services: { demo: { users: { alice: "pw1" }, admin: { user: "boss", password: "pw" } } },
  });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await server?.stop();
});

/** Publish in the demo service, as its admin. */
const send = (boss, event) => boss.request("core", "send", event, { subclass: "event" });

test("every matching subscription's handler gets the event, whatever the wildcards", async () => {
  const alice = await connected("demo", "alice", "pw1");
  const boss = await connected("demo", "boss", "pw");
  const got = {};
  const filters = {
    all: { class: "chat" },
    room1: { class: "chat", subclass: "room1" },
    msgs: { class: "chat", type: "msg" }, // wildcard subclass, fixed type
    u1: { class: "chat", obj_id: "u1" },
    exact: { class: "chat", subclass: "room1", type: "msg", obj_id: "u1" },
    room1u1: { class: "chat", subclass: "room1", type: "*", obj_id: "u1" },
    other: { class: "other" },
  };
  const done = deferred();
  for (const [name, filter] of Object.entries(filters)) {
    got[name] = [];
    await alice.subscribe(filter, (event) => {
      got[name].push(event.body.n);
      if (name === "other" && event.body.n === "end") done.resolve();
    });
  }
  const everything = [];
  alice.on("event", (event) => everything.push(event));
  await send(boss, { class: "chat", subclass: "room1", type: "msg", obj_id: "u1", body: { n: 1 } });
  await send(boss, { class: "chat", subclass: "room2", type: "msg", obj_id: "u2", body: { n: 2 } });
  await send(boss, { class: "chat", subclass: "room1", type: "join", obj_id: "u1", body: { n: 3 } });
  await send(boss, { class: "chat", body: { n: 4 } }); // "*" in an event is no wildcard
  await send(boss, { class: "chat", subclass: "room2", obj_id: "u1", body: { n: 5 } });
  await send(boss, { class: "other", subclass: "x", body: { n: 6 } });
  await send(boss, { class: "unseen", body: { n: 7 } });
  await send(boss, { class: "other", body: { n: "end" } }); // events of one sender keep their order
  await done.promise;
  assert.deepEqual(got, {
    all: [1, 2, 3, 4, 5],
    room1: [1, 3],
    msgs: [1, 2],
    u1: [1, 3, 5],
    exact: [1],
    room1u1: [1, 3],
    other: [6, "end"],
  });
  // The server delivers each event once; the "event" listeners see each once too.
  assert.deepEqual(everything.map((event) => event.body.n), [1, 2, 3, 4, 5, 6, "end"]);
  assert.deepEqual(everything[0], { class: "chat", subclass: "room1", type: "msg", obj_id: "u1", body: { n: 1 } });
  assert.deepEqual(everything[3], { class: "chat", body: { n: 4 } });
});

test("the subscription's body is merged under the event's by the server", async () => {
  const alice = await connected("demo", "alice", "pw1");
  const boss = await connected("demo", "boss", "pw");
  const sub = await alice.subscribe({ class: "news", body: { source: "sub", lang: "en" } });
  assert.deepEqual(sub.filter, { class: "news", subclass: "*", type: "*", obj_id: "*", body: { source: "sub", lang: "en" } });
  const event = next(alice, "event");
  await send(boss, { class: "news", body: { lang: "fr", text: "bonjour" } });
  assert.deepEqual((await event).body, { source: "sub", lang: "fr", text: "bonjour" });
});

test("events of the automatic subscriptions reach the 'event' listeners", async () => {
  const alice = await connected("demo", "alice", "pw1");
  const boss = await connected("demo", "boss", "pw");
  const userEvent = next(alice, "event");
  await boss.request("core", "send_user_event", { user: "alice", type: "hello", body: { a: 1 } });
  assert.deepEqual(await userEvent, { class: "core", subclass: "user_event", type: "hello", obj_id: "alice", body: { a: 1 } });
  const sessionEvent = next(alice, "event");
  await boss.request("core", "send_event", { session_id: alice.sessionId }, { subclass: "session" });
  assert.deepEqual(await sessionEvent, { class: "core", subclass: "session_event", obj_id: alice.sessionId });
});

test("unsubscribe: the server is told when no other subscription has the same keys", async () => {
  const alice = await connected("demo", "alice", "pw1");
  const boss = await connected("demo", "boss", "pw");
  const first = [];
  const second = [];
  const a = await alice.subscribe({ class: "ticks", subclass: "s" }, (event) => first.push(event.body.n));
  const b = await alice.subscribe({ class: "ticks", subclass: "s" }, (event) => second.push(event.body.n));
  const ours = async () => (await alice.request("core", "get_subscriptions"))
    .filter((subscription) => subscription.class === "ticks");

  await a.unsubscribe();
  assert.equal(a.active, false);
  assert.equal(b.active, true);
  assert.equal((await ours()).length, 1); // b still needs it
  let event = next(alice, "event");
  await send(boss, { class: "ticks", subclass: "s", body: { n: 1 } });
  await event;
  assert.deepEqual([first, second], [[], [1]]);

  await b.unsubscribe();
  await b.unsubscribe(); // twice is harmless
  assert.deepEqual(await ours(), []);
  const catchAll = await alice.subscribe({ class: "ticks", subclass: "other" });
  event = next(alice, "event");
  await send(boss, { class: "ticks", subclass: "s", body: { n: 2 } });
  await send(boss, { class: "ticks", subclass: "other", body: { n: 3 } });
  assert.equal((await event).body.n, 3); // 2 was not delivered
  assert.deepEqual([first, second], [[], [1]]);
  await catchAll.unsubscribe();
});

test("a refused subscription rejects and leaves no handler behind", async () => {
  const alice = await connected("demo", "alice", "pw1");
  let called = false;
  await assert.rejects(alice.subscribe({ class: "core", subclass: "session" }, () => { called = true; }),
    { code: "unauthorized" });
  await assert.rejects(alice.subscribe({ class: "" }), { code: "invalid_value" });
  const boss = await connected("demo", "boss", "pw");
  const stop = await boss.subscribe({ class: "core", subclass: "session", type: "stop" });
  const stopped = next(boss, "event", (event) => event.subclass === "session");
  const other = await connected("demo", "alice", "pw1");
  await other.close();
  assert.equal((await stopped).obj_id, other.sessionId);
  await stop.unsubscribe();
  assert.equal(called, false);
});

test("a handler that throws or rejects is reported, and the others still run", async () => {
  const alice = await connected("demo", "alice", "pw1");
  const boss = await connected("demo", "boss", "pw");
  const errors = [];
  alice.on("error", (error) => errors.push(error.message));
  await alice.subscribe({ class: "bad" }, () => { throw new Error("sync"); });
  await alice.subscribe({ class: "bad" }, async () => { throw new Error("async"); });
  const good = deferred();
  await alice.subscribe({ class: "bad" }, (event) => good.resolve(event));
  await send(boss, { class: "bad" });
  await good.promise;
  assert.deepEqual(errors.sort(), ["async", "sync"]);
  assert.deepEqual(await alice.request("core", "ping"), {});
});

test("the global admin follows another service's events with `service`", async () => {
  const admin = await connected("core", "admin", "admin");
  const boss = await connected("demo", "boss", "pw");
  const got = deferred();
  await admin.subscribe({ class: "audit", service: "demo" }, got.resolve);
  await send(boss, { class: "audit", type: "login", body: { who: "x" } });
  assert.deepEqual(await got.promise, { class: "audit", type: "login", body: { who: "x" }, service: "demo" });
});

test("a subscription that names the session's own service matches once the client knows it", { timeout: 5000 }, async () => {
  const alice = await connected("demo", "alice", "pw1", { service: "demo" });
  const boss = await connected("demo", "boss", "pw");
  const got = deferred();
  await alice.subscribe({ class: "named", service: "demo" }, (event) => got.resolve(event));
  await send(boss, { class: "named", body: { n: 1 } });
  // Sent without `service` (the session's own): matched through the `service` option.
  assert.deepEqual(await got.promise, { class: "named", body: { n: 1 } });
});
