// The client alone, against a scripted server (a fake WebSocket): what a real node never
// sends (bad answers must never throw out of the event loop), and timings made exact.
import assert from "node:assert/strict";
import { test } from "node:test";
import { NkClient, NkError } from "../nkservice.js";

/** A WebSocket whose peer is the test: it answers logins, and `push()` sends to the client. */
class FakeSocket {
  static last;
  readyState = 0;
  sent = [];

  constructor(url) {
    this.url = url;
    FakeSocket.last = this;
    setTimeout(() => {
      if (this.refused) { // a handshake that fails
        this.readyState = 3;
        this.onclose?.({ code: 1006, reason: "" });
        return;
      }
      this.readyState = 1;
      this.onopen?.({});
    });
  }

  send(data) {
    const message = JSON.parse(data);
    this.sent.push(message);
    if (message.cmd === "login") this.push({ result: "ok", tid: message.tid, data: { session_id: "s1", user: "u" } });
  }

  close(code = 1000, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code, reason }));
  }

  /** The server sends a message (an object is sent as JSON). */
  push(message) {
    this.onmessage?.({ data: typeof message === "string" || message instanceof ArrayBuffer ? message : JSON.stringify(message) });
  }

  /** Resolves with the next message the client sends that passes `test`. */
  async next(test) {
    for (;;) {
      const found = this.sent.find(test);
      if (found) return found;
      await new Promise((resolve) => setTimeout(resolve, 5)); // the client writes on its own time
    }
  }
}

async function connected(options = {}) {
  const client = new NkClient("ws://fake/", { WebSocket: FakeSocket, reconnect: false, ...options });
  await client.connect();
  return { client, socket: FakeSocket.last };
}

const wait = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

test("nothing the server sends throws; the unusable is reported; the connection stays", async () => {
  const { client, socket } = await connected();
  const reported = [];
  client.on("error", (error) => reported.push(error.code ?? error.message));
  const events = [];
  client.on("event", (event) => events.push(event));
  const uncaught = [];
  const onUncaught = (error) => uncaught.push(error);
  process.on("uncaughtException", onUncaught);
  try {
    const pending = client.request("x", "y");
    const pendingTid = socket.sent.at(-1).tid;
    for (const bad of ["not json", "[1, 2]", "null", "42", "{}", '"text"']) socket.push(bad);
    socket.push({ result: "ok", tid: 999 }); // a tid of nothing pending: ignored
    socket.push({ ack: 999 });
    socket.push({ ack: { nested: true } });
    socket.push({ result: "error", tid: null, data: { code: 100072, error: "Invalid JSON" } });
    socket.push({ result: "error", tid: null, data: "junk" });
    socket.push({ class: 1, cmd: "x", tid: 5 }); // a request of bad types: answered invalid_message
    socket.push({ class: "a", cmd: "b", tid: { no: 1 } }); // and without a usable tid: dropped
    socket.push({ class: "core", cmd: "event", tid: 6 }); // an event without data
    socket.push({ class: "core", cmd: "event", tid: 7, data: "not an object" });
    socket.push({ class: "core", cmd: "ping", tid: 8, data: { time: "soon" } });
    socket.push(new TextEncoder().encode(JSON.stringify({ class: "core", cmd: "ping", tid: 9 })).buffer);
    socket.push({ result: "error", tid: pendingTid, data: "not an error object" });
    const error = await pending.then(() => assert.fail(), (e) => e);
    assert.ok(error instanceof NkError);
    assert.equal(error.code, "internal_error"); // the best it can say
  } finally {
    process.off("uncaughtException", onUncaught);
  }
  assert.deepEqual(uncaught, []);
  assert.deepEqual(reported, ["invalid_json", "invalid_message", "invalid_message", "invalid_message",
    "invalid_message", "invalid_message", "invalid_json", "internal_error", "invalid_message"]);
  assert.deepEqual(events, [{}, "not an object"]);
  const answers = Object.fromEntries(socket.sent.filter((m) => "result" in m).map((m) => [m.tid, m]));
  assert.deepEqual(answers[5], { result: "error", tid: 5, data: { code: 100076, error: "Invalid message" } });
  assert.deepEqual([answers[6], answers[7], answers[8], answers[9]],
    [{ result: "ok", tid: 6 }, { result: "ok", tid: 7 }, { result: "ok", tid: 8 }, { result: "ok", tid: 9 }]);
  assert.equal(client.state, "connected");
  await client.close();
});

test("an ack moves a request's deadline to the ack timeout", async () => {
  const { client, socket } = await connected({ ackTimeout: 0.3 });
  const reply = client.request("slow", "work", {}, { timeout: 0.1 });
  const { tid } = socket.sent.at(-1);
  await wait(60);
  socket.push({ ack: tid }); // at 60 ms: now due at 360 ms
  await wait(150); // past the first deadline
  socket.push({ result: "ok", tid, data: { done: true } });
  assert.deepEqual(await reply, { done: true });

  const late = client.request("slow", "work", {}, { timeout: 0.05 });
  socket.push({ ack: socket.sent.at(-1).tid });
  await assert.rejects(late, { code: "timeout", message: "No answer to slow/work within 0.3 s" });
  await client.close();
});

test("a slow handler's request is acked until it is answered", async () => {
  const { client, socket } = await connected({ ackAfter: 0.02, ackEvery: 0.03 });
  client.handle("app", "slow", () => wait(100).then(() => ({ slept: 100 })));
  socket.push({ class: "app", subclass: "x", cmd: "slow", tid: 3 });
  const answer = await socket.next((m) => m.tid === 3 && m.result);
  assert.deepEqual(answer, { result: "ok", tid: 3, data: { slept: 100 } });
  const acks = socket.sent.filter((m) => m.ack === 3).length;
  assert.ok(acks >= 2, `${acks} acks`);
  await wait(80);
  assert.equal(socket.sent.filter((m) => m.ack === 3).length, acks); // none after the answer
  await client.close();
});

test("a handler's answer that JSON cannot carry is answered internal_error", async () => {
  const { client, socket } = await connected();
  client.on("error", () => {});
  client.handle("app", "big", () => ({ n: 10n }));
  socket.push({ class: "app", cmd: "big", tid: 4 });
  assert.deepEqual(await socket.next((m) => m.tid === 4),
    { result: "error", tid: 4, data: { code: 100002, error: "Internal error" } });
  await assert.rejects(client.request("x", "y", { n: 1n }), TypeError);
  await client.close();
});

test("reconnect delays are full jitter: random, under a doubling ceiling", async () => {
  let opened = 0;
  class Refused extends FakeSocket {
    constructor(url) {
      super(url);
      this.refused = ++opened > 1; // the first connects, the others are refused
    }
  }
  const client = new NkClient("ws://fake/", { WebSocket: Refused, backoff: { initial: 0.001, max: 0.008 } });
  await client.connect();
  const delays = [];
  const enough = new Promise((resolve) => client.on("reconnecting", ({ attempt, delay }) => {
    delays.push([attempt, delay]);
    if (attempt === 8) resolve();
  }));
  FakeSocket.last.close(1006);
  await enough;
  await client.close();
  for (const [attempt, delay] of delays) {
    assert.ok(delay >= 0 && delay <= Math.min(0.008, 0.001 * 2 ** (attempt - 1)), `${attempt}: ${delay}`);
  }
  assert.equal(new Set(delays.map(([, delay]) => delay)).size, delays.length);
  assert.equal(client.state, "closed");
});

test("NkError: names and numbers of §14", () => {
  const byNumber = new NkError(100030);
  assert.equal(byNumber.code, "unauthorized");
  assert.equal(byNumber.message, "Unauthorized");
  const byName = new NkError("missing_field", "Missing field: x");
  assert.equal(byName.number, 100045);
  assert.deepEqual(byName.toAnswer(), { code: 100045, error: "Missing field: x" });
  const unknown = new NkError(4242, "custom");
  assert.equal(unknown.code, "error_4242");
  assert.deepEqual(unknown.toAnswer(), { code: 4242, error: "custom" });
  assert.equal(new NkError("my_own").toAnswer().code, 100002);
  assert.equal(NkError.codes.connection_closed, 100081);
  assert.ok(byName instanceof Error);
});

test("without any WebSocket, connect() says how to get one", async () => {
  const saved = Object.getOwnPropertyDescriptor(globalThis, "WebSocket");
  Object.defineProperty(globalThis, "WebSocket", { value: undefined, configurable: true, writable: true });
  try {
    const client = new NkClient("ws://127.0.0.1:1/");
    await assert.rejects(client.connect(), /--experimental-websocket/);
    assert.equal(client.state, "closed");
  } finally {
    if (saved) Object.defineProperty(globalThis, "WebSocket", saved);
    else delete globalThis.WebSocket;
  }
});

test("requests wait for connect(); close() before it rejects them", async () => {
  const client = new NkClient("ws://fake/", { WebSocket: FakeSocket });
  const closed = new Promise((resolve) => client.on("closed", resolve));
  const waiting = client.request("core", "ping");
  await client.close();
  await assert.rejects(waiting, { code: "connection_closed", message: "Connection closed: closed by the client" });
  assert.deepEqual(await closed, { reason: "closed by the client" });
  assert.equal(client.state, "closed");
});
