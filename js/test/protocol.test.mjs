// Requests, answers, errors, acks, deadlines, pings and server requests against a real node.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { NkClient, NkError } from "../nkservice.js";
import { recordingWebSocket } from "../test-helpers/recording.mjs";
import { deferred, next, startServer } from "../test-helpers/server.mjs";

let server;
const clients = [];

/** A client that the file closes at the end. */
function client(service, options) {
  const made = new NkClient(server.url(service), options);
  clients.push(made);
  return made;
}
const admin = () => client("core", { user: "admin", password: "admin" });

before(async () => {
  server = await startServer({
    services: {
      demo: { users: { alice: "pw1", bob: "pw2" }, admin: { user: "boss", password: "pw" } },
      // Pings every 0.2 s, to be answered within 1 s: a client that did not answer them (or
      // the events) would be disconnected within 1.2 s.
      brisk: { users: { carol: "pw3" }, admin: { user: "boss", password: "pw" },
        ping_interval: 0.2, request_timeout: 1 },
      narrow: { users: { alice: "pw1" }, max_pending_requests: 1, max_bad_messages: 2 },
    },
  });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await server?.stop();
});

describe("requests and answers", () => {
  test("connect logs in and resolves with the login answer", async () => {
    const alice = client("demo", { user: "alice", password: "pw1", meta: { device: "test" } });
    assert.equal(alice.state, "idle");
    const connecting = alice.connect();
    assert.equal(alice.state, "connecting");
    const login = await connecting;
    assert.equal(alice.state, "connected");
    assert.equal(login.user, "alice");
    assert.match(login.session_id, /^[0-9a-f-]{36}$/);
    assert.equal(alice.sessionId, login.session_id);
    assert.equal(alice.user, "alice");
    const boss = client("demo", { user: "boss", password: "pw" });
    await boss.connect();
    const sessions = await boss.request("core", "get_user", { user: "alice" });
    assert.deepEqual(sessions[alice.sessionId].meta, { device: "test" });
  });

  test("requests made before the login answer are pipelined behind it, tids per connection", async () => {
    const wire = recordingWebSocket();
    const boss = client("demo", { user: "boss", password: "pw", WebSocket: wire.WebSocket });
    const early = boss.request("core", "ping"); // before connect(): waits for the socket
    const connecting = boss.connect();
    const users = boss.request("core", "list", {}, { subclass: "user" });
    const pinged = boss.request("core", "ping", undefined, { subclass: "core" });
    // All four went out before the login was answered: written in one go on open.
    await connecting;
    assert.deepEqual(await early, {});
    assert.equal(typeof await users, "object");
    assert.deepEqual(await pinged, {});
    assert.deepEqual(wire.sent.slice(0, 4).map((m) => [m.cmd, m.tid]),
      [["login", 1], ["ping", 2], ["list", 3], ["ping", 4]]);
    assert.equal(wire.sent[0].subclass, "user");
    const loginAnswer = wire.log.findIndex(([way, m]) => way === "<" && m.tid === 1);
    assert.deepEqual(wire.log.slice(0, loginAnswer).map(([way, m]) => [way, m.tid]),
      [[">", 1], [">", 2], [">", 3], [">", 4]]);
  });

  test("error answers reject with an NkError carrying the code", async () => {
    const alice = client("demo", { user: "alice", password: "pw1" });
    await alice.connect();
    const boss = client("demo", { user: "boss", password: "pw" });
    const cases = [
      [() => alice.request("nope", "x"), "unknown_class", 100050, "Unknown class 'nope'"],
      [() => alice.request("core", "nope"), "unknown_command", 100042, "Unknown command 'nope'"],
      [() => alice.request("core", "list_users"), "unauthorized", 100030],
      [() => boss.request("core", "get_user", {}), "missing_field", 100045, "Missing field: user"],
      [() => boss.request("core", "get_user", { user: 7 }), "syntax_error", 100044, "Syntax error: user"],
      [() => boss.request("core", "get_user", { user: "nobody" }), "user_not_found", 100033, "User not found"],
      [() => boss.request("core", "stop", { session_id: "x" }, { subclass: "session" }), "session_not_found", 100062],
    ];
    await boss.connect();
    for (const [request, code, number, text] of cases) {
      const error = await request().then(() => assert.fail(`${code} expected`), (e) => e);
      assert.ok(error instanceof NkError);
      assert.equal(error.code, code);
      assert.equal(error.number, number);
      assert.equal(error.data.code, number);
      if (text) assert.equal(error.message, text);
    }
  });

  test("a refused login rejects connect(), and what was pipelined behind it is refused too", async () => {
    const mallory = client("demo", { user: "alice", password: "wrong", reconnect: true });
    const pipelined = mallory.request("core", "list_users");
    const error = await mallory.connect().then(() => assert.fail("refused expected"), (e) => e);
    assert.equal(error.code, "invalid_password");
    assert.equal(mallory.state, "closed");
    const refused = await pipelined.then(() => assert.fail(), (e) => e);
    assert.ok(["not_authenticated", "unknown_command", "connection_closed"].includes(refused.code), refused.code);
    await assert.rejects(mallory.request("core", "ping"), { code: "connection_closed" });
    const unknown = client("demo", { user: "zed", password: "x" });
    await assert.rejects(unknown.connect(), { code: "unauthorized" });
    const badId = client("demo", { user: "alice", password: "pw1", sessionId: "" });
    await assert.rejects(badId.connect(), { code: "invalid_session_id" });
  });

  test("a closed client rejects requests with connection_closed", async () => {
    const alice = client("demo", { user: "alice", password: "pw1" });
    await alice.connect();
    const closed = next(alice, "closed");
    await alice.close();
    assert.deepEqual(await closed, { reason: "closed by the client" });
    assert.equal(alice.state, "closed");
    await assert.rejects(alice.request("core", "ping"), { name: "NkError", code: "connection_closed" });
  });
});

describe("bad input (§5) keeps the connection", () => {
  test("bytes that are not JSON are answered invalid_json; the connection stays", async () => {
    const wire = recordingWebSocket();
    const alice = client("demo", { user: "alice", password: "pw1", WebSocket: wire.WebSocket });
    await alice.connect();
    const reported = next(alice, "error");
    wire.raw("this is not json");
    const error = await reported;
    assert.ok(error instanceof NkError);
    assert.equal(error.code, "invalid_json");
    assert.deepEqual(wire.received.at(-1), { result: "error", tid: null, data: { code: 100072, error: "Invalid JSON" } });

    const again = next(alice, "error");
    wire.raw("[1, 2, 3]");
    assert.equal((await again).code, "invalid_message");
    // A reply to nothing pending, with a tid: the client ignores it.
    wire.raw(JSON.stringify({ tid: 999 }));
    assert.deepEqual(await alice.request("core", "ping"), {});
    assert.equal(alice.state, "connected");
    assert.equal(wire.sockets.length, 1);
  });
});

describe("limits (§5)", () => {
  test("too many requests waiting: too_many_requests, and the others go on", async () => {
    const app = client("core", { user: "admin", password: "admin" });
    const release = deferred();
    await app.connect();
    await app.registerCallback("cmd", { service: "narrow", class: "hold" }, () => release.promise);
    const alice = client("narrow", { user: "alice", password: "pw1" });
    await alice.connect();
    const held = alice.request("hold", "a");
    await assert.rejects(alice.request("hold", "b"), { code: "too_many_requests", number: 100078 });
    release.resolve({ released: true });
    assert.deepEqual(await held, { released: true });
    await app.unregisterCallback("cmd", { service: "narrow", class: "hold" });
  });

  test("too many bad messages: the server closes, says why, and the client comes back", async () => {
    const wire = recordingWebSocket();
    const alice = client("narrow", { user: "alice", password: "pw1", WebSocket: wire.WebSocket,
      backoff: { initial: 0.01, max: 0.05 } });
    alice.on("error", () => {}); // the invalid_json answers
    await alice.connect();
    const disconnected = next(alice, "disconnected");
    const back = next(alice, "connected");
    for (let i = 0; i < 3; i++) wire.raw("garbage");
    assert.deepEqual(await disconnected, { code: 1008, reason: "too many bad messages" });
    const login = await back;
    assert.equal(login.session_id, alice.sessionId);
    assert.equal(wire.sockets.length, 2);
    assert.deepEqual(await alice.request("core", "ping"), {});
  });
});

describe("deadlines and acks (§3)", () => {
  test("acks from the other side keep a request alive past its timeout", async () => {
    const bob = client("demo", { user: "bob", password: "pw2", ackAfter: 0.02 });
    bob.handle("work", "slow", async (data) => {
      await new Promise((resolve) => setTimeout(resolve, 1000)); // the work itself
      return { done: data.n };
    });
    await bob.connect();
    const wire = recordingWebSocket();
    const boss = client("demo", { user: "boss", password: "pw", WebSocket: wire.WebSocket });
    await boss.connect();
    // 0.5 s pass long before the answer: the acks passed on move the deadline.
    const reply = await boss.request("core", "cmd", { session_id: bob.sessionId, class: "work", cmd: "slow",
      data: { n: 7 } }, { subclass: "session", timeout: 0.5 });
    assert.deepEqual(reply, { done: 7 });
    const tid = wire.sent.at(-1).tid;
    assert.ok(wire.received.some((m) => m.ack === tid), "the server passed an ack on");
  });

  test("a request without answer or ack rejects with timeout", async () => {
    const dave = client("demo", { user: "bob", password: "pw2", ackAfter: 60 }); // never acks
    const release = deferred();
    dave.handle("work", "*", () => release.promise);
    await dave.connect();
    const boss = client("demo", { user: "boss", password: "pw" });
    await boss.connect();
    const started = Date.now();
    const error = await boss.request("core", "cmd", { session_id: dave.sessionId, class: "work", cmd: "stuck" },
      { subclass: "session", timeout: 0.3 }).then(() => assert.fail("timeout expected"), (e) => e);
    assert.equal(error.code, "timeout");
    assert.equal(error.number, 100005);
    assert.match(error.message, /core\/cmd within 0.3 s/);
    assert.ok(Date.now() - started >= 290);
    release.resolve({}); // answered in time for the server (request_timeout 5 s): dave stays
    assert.deepEqual(await dave.request("core", "ping"), {});
  });
});

describe("server requests (§3, §12)", () => {
  test("handlers answer forwarded commands; '*' matches any command; errors pass through", async () => {
    const alice = client("demo", { user: "alice", password: "pw1" });
    const seen = [];
    alice.handle("app", "echo", (data, request) => {
      seen.push(request);
      return { echo: data };
    });
    alice.handle("other", "*", (data, request) => ({ cmd: request.cmd }));
    alice.handle("app", "fail", () => { throw new NkError("invalid_value", "Invalid value: x"); });
    alice.handle("app", "crash", () => { throw new Error("a bug"); });
    const reported = [];
    alice.on("error", (error) => reported.push(error));
    await alice.connect();
    const boss = client("demo", { user: "boss", password: "pw" });
    await boss.connect();
    const forward = (cls, cmd, data) =>
      boss.request("core", "session_cmd", { session_id: alice.sessionId, class: cls, cmd, data });

    assert.deepEqual(await forward("app", "echo", { x: 1 }), { echo: { x: 1 } });
    assert.equal(seen[0].class, "app");
    assert.equal(seen[0].cmd, "echo");
    assert.equal(typeof seen[0].tid, "number");
    assert.deepEqual(await forward("other", "anything"), { cmd: "anything" });
    await assert.rejects(forward("app", "fail"), { code: "invalid_value", message: "Invalid value: x" });
    await assert.rejects(forward("app", "crash"), { code: "internal_error" });
    assert.equal(reported[0].message, "a bug");
    // No handler: the client answers unknown_command, and stays connected.
    await assert.rejects(forward("app", "nothing"), { code: "unknown_command", message: "Unknown command 'nothing'" });
    await assert.rejects(forward("nobody", "handles"), { code: "unknown_command" });
    assert.equal(alice.state, "connected");
  });

  test("handle() returns a remover", async () => {
    const alice = client("demo", { user: "alice", password: "pw1" });
    const remove = alice.handle("app", "once", () => ({ ok: 1 }));
    await alice.connect();
    const boss = client("demo", { user: "boss", password: "pw" });
    await boss.connect();
    const forward = () => boss.request("core", "session_cmd", { session_id: alice.sessionId, class: "app", cmd: "once" });
    assert.deepEqual(await forward(), { ok: 1 });
    remove();
    await assert.rejects(forward(), { code: "unknown_command" });
  });

  test("server pings are answered: the session outlives many ping deadlines", async () => {
    const wire = recordingWebSocket();
    const carol = client("brisk", { user: "carol", password: "pw3", WebSocket: wire.WebSocket });
    let disconnected = false;
    carol.on("disconnected", () => { disconnected = true; });
    const pings = [];
    const enough = deferred();
    carol.handle("core", "ping", (data, request) => { // a handler may watch the pings
      pings.push(request.tid);
      if (pings.length === 8) enough.resolve();
    });
    await carol.connect();
    await enough.promise; // 8 pings of 0.2 s, each with 1 s to be answered: past a deadline
    for (const tid of pings.slice(0, 7)) {
      assert.ok(wire.sent.some((m) => m.tid === tid && m.result === "ok"), `ping ${tid} answered`);
    }
    assert.equal(wire.received.find((m) => m.cmd === "ping").data.time, 0.2);
    assert.equal(disconnected, false);
    assert.deepEqual(await carol.request("core", "ping"), {});
  });

  test("events are answered: a subscriber of a busy class keeps its session", async () => {
    const wire = recordingWebSocket();
    const carol = client("brisk", { user: "carol", password: "pw3", WebSocket: wire.WebSocket });
    let disconnected = false;
    carol.on("disconnected", () => { disconnected = true; });
    await carol.connect();
    const got = [];
    const all = deferred();
    await carol.subscribe({ class: "feed" }, (event) => {
      got.push(event.body.n);
      if (got.length === 200) all.resolve();
    });
    const boss = client("brisk", { user: "boss", password: "pw" });
    await boss.connect();
    await Promise.all(Array.from({ length: 200 }, (_, n) =>
      boss.request("core", "send_event", { class: "feed", type: "tick", body: { n } })));
    await all.promise;
    assert.deepEqual(got, Array.from({ length: 200 }, (_, n) => n));
    const eventTids = wire.received.filter((m) => m.cmd === "event").map((m) => m.tid);
    const answered = new Set(wire.sent.filter((m) => m.result === "ok").map((m) => m.tid));
    assert.ok(eventTids.every((tid) => answered.has(tid)), "every event answered");
    // Past the server's deadline (1 s) for the last of them: still there.
    let pings = 0;
    const later = deferred();
    carol.handle("core", "ping", () => { if (++pings === 6) later.resolve(); });
    await later.promise;
    assert.equal(disconnected, false);
    assert.deepEqual(await carol.request("core", "ping"), {});
  });
});
