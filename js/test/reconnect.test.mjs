// Lost connections: pending requests, reconnecting with the same session id, resuming (§8),
// subscriptions and callback registrations made again.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { NkClient } from "../nkservice.js";
import { recordingWebSocket } from "../test-helpers/recording.mjs";
import { deferred, next, startProxy, startServer } from "../test-helpers/server.mjs";

let server;
const closers = [];
const fast = { initial: 0.02, max: 0.1 }; // backoff for tests: seconds

before(async () => {
  const boss = { user: "boss", password: "pw" };
  server = await startServer({
    services: {
      parking: { users: { alice: "pw1" }, admin: boss, resume_window: 10 },
      plain: { users: { alice: "pw1", bob: "pw2" }, admin: boss, max_message_size: 4096 },
      pinging: { users: { alice: "pw1" }, ping_interval: 0.2, request_timeout: 2 },
    },
  });
});

after(async () => {
  for (const close of closers.reverse()) await close();
  await server?.stop();
});

function client(url, options) {
  const made = new NkClient(url, { backoff: fast, ...options });
  closers.push(() => made.close());
  return made;
}

async function proxyTo(service) {
  const proxy = await startProxy(server.url(service));
  closers.push(() => proxy.close());
  return proxy;
}

/** The service admin of `service`, connected directly (never through a proxy). */
async function boss(service) {
  const made = client(server.url(service), { user: "boss", password: "pw" });
  await made.connect();
  return made;
}

test("a dropped session is resumed: same id, subscriptions kept, missed events first", async () => {
  const proxy = await proxyTo("parking");
  const wire = recordingWebSocket();
  const alice = client(proxy.url, { user: "alice", password: "pw1", WebSocket: wire.WebSocket });
  const first = await alice.connect();
  assert.equal(first.resumed, undefined);
  const got = [];
  const firstEvent = deferred();
  const third = deferred();
  await alice.subscribe({ class: "chat", subclass: "room" }, (event) => {
    got.push(event.body.n);
    if (event.body.n === 1) firstEvent.resolve();
    if (event.body.n === 3) third.resolve();
  });
  const admin = await boss("parking");
  await admin.subscribe({ class: "core", subclass: "session", type: "stop" });
  const parked = next(admin, "event", (event) => event.obj_id === alice.sessionId);
  const send = (n) => admin.request("core", "send_event", { class: "chat", subclass: "room", body: { n } });
  await send(1);
  await firstEvent.promise;
  // The event's answer is in the server's hands once a later request is answered: an event
  // still unanswered when the connection drops comes again on resume (at least once).
  await alice.request("core", "ping");

  const seen = [];
  for (const name of ["disconnected", "reconnecting", "connected"]) alice.on(name, (info) => seen.push([name, info]));
  const disconnected = next(alice, "disconnected");
  proxy.refusing = true; // the network stays down for a while
  proxy.drop();
  await parked; // the server saw the session end (and parked it)
  await disconnected;
  assert.equal(alice.state, "reconnecting");
  await send(2);
  await send(3);
  const failed = next(alice, "reconnecting", (info) => info.error !== undefined);
  assert.equal((await failed).error.code, "connection_closed"); // tries go on while refused
  const back = next(alice, "connected");
  proxy.refusing = false;
  const login = await back;
  assert.equal(login.resumed, true);
  assert.equal(login.session_id, first.session_id);
  assert.equal(alice.sessionId, first.session_id);
  assert.equal(alice.state, "connected");
  await third.promise;
  assert.deepEqual(got, [1, 2, 3]);

  assert.equal(seen[0][0], "disconnected");
  assert.equal(seen[0][1].code, 1006);
  assert.ok(seen.filter(([name]) => name === "reconnecting").every(([, info], i) =>
    info.attempt === i + 1 && info.delay >= 0 && info.delay <= fast.max));
  // Resumed: the server kept the subscriptions, the client did not make them again.
  const logins = wire.sent.filter((m) => m.cmd === "login");
  assert.equal(logins.length, 2); // the refused tries sent nothing
  assert.ok(logins.slice(1).every((m) => m.data.session_id === first.session_id));
  const lastLogin = wire.sent.lastIndexOf(logins.at(-1));
  assert.deepEqual(wire.sent.slice(lastLogin + 1).filter((m) => m.cmd === "subscribe"), []);
  const subscriptions = await alice.request("core", "get_subscriptions");
  assert.equal(subscriptions.filter((s) => s.class === "chat").length, 1);
});

test("after a fresh login the subscriptions are made again, with their bodies", async () => {
  const wire = recordingWebSocket();
  const alice = client(server.url("plain"), { user: "alice", password: "pw1", WebSocket: wire.WebSocket });
  await alice.connect();
  const sessionId = alice.sessionId;
  const got = deferred();
  await alice.subscribe({ class: "news", type: "flash", body: { from: "sub" } }, got.resolve);
  await alice.subscribe({ class: "news", type: "flash", body: { from: "newer" } }); // same keys
  await alice.subscribe({ class: "weather" });

  const admin = await boss("plain");
  const disconnected = next(alice, "disconnected");
  const reconnected = next(alice, "connected");
  await admin.request("core", "stop_session", { session_id: sessionId });
  assert.deepEqual(await disconnected, { code: 1000, reason: "stopped by boss" });
  const login = await reconnected;
  assert.equal(login.resumed, undefined); // no resume_window: a fresh session, the same id
  assert.equal(login.session_id, sessionId);

  const replayed = wire.sent.slice(wire.sent.findLastIndex((m) => m.cmd === "login"))
    .filter((m) => m.cmd === "subscribe").map((m) => m.data);
  assert.deepEqual(replayed, [
    { class: "news", subclass: "*", type: "flash", obj_id: "*", body: { from: "newer" } },
    { class: "weather", subclass: "*", type: "*", obj_id: "*" },
  ]);
  await admin.request("core", "send_event", { class: "news", type: "flash", body: { text: "x" } });
  assert.deepEqual((await got.promise).body, { from: "newer", text: "x" });
});

test("a request pending on a lost connection rejects with connection_closed", async () => {
  const app = client(server.url("core"), { user: "admin", password: "admin", ackAfter: 60 });
  const release = deferred();
  const called = deferred();
  await app.connect();
  await app.registerCallback("cmd", { service: "plain", class: "slow" }, (data) => {
    called.resolve(data);
    return release.promise;
  });
  const alice = client(server.url("plain"), { user: "alice", password: "pw1" });
  await alice.connect();
  const pending = alice.request("slow", "work", {}, { timeout: 10 });
  await called.promise;
  const admin = await boss("plain");
  await admin.request("core", "stop_session", { session_id: alice.sessionId });
  const error = await pending.then(() => assert.fail("connection_closed expected"), (e) => e);
  assert.equal(error.code, "connection_closed");
  assert.equal(error.message, "Connection closed: stopped by boss");
  release.resolve({});
  await next(alice, "connected");
});

test("a message the server finds too large ends the connection; the client says why and comes back", async () => {
  const alice = client(server.url("plain"), { user: "alice", password: "pw1" });
  await alice.connect();
  const errors = [];
  alice.on("error", (error) => errors.push(error));
  const back = next(alice, "connected");
  const error = await alice.request("core", "ping", { pad: "x".repeat(10_000) }).then(() => assert.fail(), (e) => e);
  assert.equal(error.code, "connection_closed");
  assert.equal(error.message, "Connection closed: message too large");
  assert.equal(errors[0]?.code, "message_too_large"); // the server's answer, tid null
  await back;
  assert.deepEqual(await alice.request("core", "ping"), {});
});

test("callback registrations are made again after a reconnect", async () => {
  const proxy = await proxyTo("core");
  const app = client(proxy.url, { user: "admin", password: "admin" });
  await app.connect();
  await app.registerCallback("cmd", { service: "plain", class: "echo" }, ({ request }) => ({ again: request.data }));
  const alice = client(server.url("plain"), { user: "alice", password: "pw1" });
  await alice.connect();
  assert.deepEqual(await alice.request("echo", "x", { n: 1 }), { again: { n: 1 } });
  const back = next(app, "connected");
  proxy.drop();
  await back;
  const admin = await boss("plain");
  const registrations = await admin.request("core", "list_callbacks");
  assert.deepEqual(registrations.filter((r) => r.class === "echo").map((r) => r.session_id), [app.sessionId]);
  assert.deepEqual(await alice.request("echo", "x", { n: 2 }), { again: { n: 2 } });
  await app.unregisterCallback("cmd", { service: "plain", class: "echo" });
  await assert.rejects(alice.request("echo", "x"), { code: "unknown_class" });
});

test("a client replaced by a login with its session id does not fight back", async () => {
  const first = client(server.url("plain"), { user: "bob", password: "pw2", sessionId: "bobs-phone" });
  await first.connect();
  assert.equal(first.sessionId, "bobs-phone");
  const closed = next(first, "closed");
  const second = client(server.url("plain"), { user: "bob", password: "pw2", sessionId: "bobs-phone" });
  await second.connect();
  assert.deepEqual(await closed, { reason: "replaced by a new login with the same session id" });
  assert.equal(first.state, "closed");
  assert.equal(second.state, "connected");
  const thief = client(server.url("plain"), { user: "alice", password: "pw1", sessionId: "bobs-phone" });
  await assert.rejects(thief.connect(), { code: "duplicated_session_id" });
});

test("without reconnect, a lost connection closes the client", async () => {
  const proxy = await proxyTo("plain");
  const alice = client(proxy.url, { user: "alice", password: "pw1", reconnect: false });
  await alice.connect();
  const closed = next(alice, "closed");
  proxy.drop();
  assert.equal((await closed).reason, "connection lost");
  assert.equal(alice.state, "closed");
  await assert.rejects(alice.request("core", "ping"), { code: "connection_closed" });
});

test("close() while reconnecting stops for good; requests waiting for the connection reject", async () => {
  const proxy = await proxyTo("plain");
  const alice = client(proxy.url, { user: "alice", password: "pw1", backoff: { initial: 0.05, max: 0.05 } });
  await alice.connect();
  proxy.refusing = true;
  const retrying = next(alice, "reconnecting", (info) => info.attempt === 2);
  proxy.drop();
  await retrying;
  const waiting = alice.request("core", "ping", undefined, { timeout: 30 });
  const closed = next(alice, "closed");
  await alice.close();
  await closed;
  await assert.rejects(waiting, { code: "connection_closed" });
  assert.equal(alice.state, "closed");
});

test("a connection gone silent is noticed by the missing pings, then made again", async () => {
  const proxy = await proxyTo("pinging");
  const alice = client(proxy.url, { user: "alice", password: "pw1", requestTimeout: 0.3 });
  await alice.connect();
  const pinged = deferred();
  alice.handle("core", "ping", () => pinged.resolve());
  await pinged.promise; // the watch starts with the first ping
  const disconnected = next(alice, "disconnected");
  const back = next(alice, "connected");
  proxy.freeze();
  assert.deepEqual(await disconnected, { code: 1006, reason: "no ping from the server for 0.7 s" });
  await back;
  assert.deepEqual(await alice.request("core", "ping"), {});
});
