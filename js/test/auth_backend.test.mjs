// examples/auth_backend.mjs, run as its own process, answers a service's logins and a class
// of commands (§12); without it the service's static users take over.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";
import { after, before, test } from "node:test";
import { NkClient } from "../nkservice.js";
import { JS_DIR, startServer } from "../test-helpers/server.mjs";

let server;
let backend;
const clients = [];

/** Start the example; resolves once it says it serves (its callbacks are registered). */
function startBackend() {
  const child = spawn(process.execPath, ["--experimental-websocket", "--no-warnings",
    path.join(JS_DIR, "examples/auth_backend.mjs"), server.url("core"), "--service", "demo"],
  { stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  const ready = new Promise((resolve, reject) => {
    child.stdout.on("data", (chunk) => {
      output += chunk;
      if (output.includes("serving logins")) resolve(output);
    });
    child.stderr.on("data", (chunk) => { output += chunk; });
    child.once("exit", (code) => reject(new Error(`auth_backend exited (${code}):\n${output}`)));
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  process.once("exit", () => child.kill("SIGKILL")); // it would reconnect forever otherwise
  return { child, ready, exited };
}

async function login(user, password) {
  const client = new NkClient(server.url("demo"), { user, password, reconnect: false });
  clients.push(client);
  await client.connect();
  return client;
}

before(async () => {
  server = await startServer({
    services: { demo: { users: { alice: "pw1" }, admin: { user: "boss", password: "pw" } } },
  });
  backend = startBackend();
  await backend.ready;
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  if (backend.child.exitCode === null) backend.child.kill("SIGKILL");
  await server?.stop();
});

test("a user logs in through the Node auth backend", async () => {
  const carol = await login("carol", "c4rol");
  assert.equal(carol.user, "carol");
  const boss = await login("boss", "pw");
  const sessions = await boss.request("core", "get_user", { user: "carol" });
  assert.deepEqual(sessions[carol.sessionId].meta, { checked_by: "auth_backend.mjs" });
  // The backend decides: a wrong password, and a static user it does not know, are refused.
  await assert.rejects(login("carol", "wrong"), { code: "unauthorized", message: "Unauthorized: Invalid password" });
  await assert.rejects(login("alice", "pw1"), { code: "unauthorized" });
});

test("the backend's class of commands answers users, errors included", async () => {
  const dave = await login("dave", "d4ve");
  assert.deepEqual(await dave.request("notes", "add", { text: "buy milk" }), { count: 1 });
  assert.deepEqual(await dave.request("notes", "add", { text: "call carol" }), { count: 2 });
  assert.deepEqual(await dave.request("notes", "list"), { notes: ["buy milk", "call carol"] });
  await assert.rejects(dave.request("notes", "add", {}), { code: "missing_field", message: "Missing field: text" });
  await assert.rejects(dave.request("notes", "burn"), { code: "unknown_command" });
});

test("without the backend, the service's static users log in again", async () => {
  const boss = await login("boss", "pw");
  backend.child.kill("SIGTERM"); // it closes its client, then exits
  assert.equal(await backend.exited, 0);
  // Its registrations went with its connection: nobody answers the class now.
  const alice = await login("alice", "pw1");
  assert.equal(alice.user, "alice");
  await assert.rejects(alice.request("notes", "list"), { code: "unknown_class" });
  assert.deepEqual(await boss.request("core", "list_callbacks"), []);
});
