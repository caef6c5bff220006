// wss:// with a certificate of a test CA (made by Python's trustme). Node trusts a CA given
// in NODE_EXTRA_CA_CERTS, read at start: the client runs in a node child given it.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { promisify } from "node:util";
import { after, before, test } from "node:test";
import { JS_DIR, PYTHON, startServer } from "../test-helpers/server.mjs";

const run = promisify(execFile);
let dir;
let server;

// The client's side, in the child: connect, subscribe, see an event, print what happened.
const CLIENT = `
import { NkClient } from ${JSON.stringify(pathToFileURL(path.join(JS_DIR, "nkservice.js")).href)};
const client = new NkClient(process.argv[1], { user: "alice", password: "pw1", reconnect: false });
try {
  const login = await client.connect();
  const event = new Promise((resolve) => client.subscribe({ class: "tls" }, resolve));
  await client.request("core", "send_event", { class: "tls", body: { secure: true } });
  console.log(JSON.stringify({ user: login.user, event: await event }));
} catch (error) {
  console.log(JSON.stringify({ error: error.code, message: error.message }));
}
await client.close();
`;

async function runClient(env) {
  const { stdout } = await run(process.execPath,
    ["--experimental-websocket", "--no-warnings", "--input-type=module", "-e", CLIENT, server.url("secure")],
    { env: { ...process.env, ...env }, timeout: 20_000 });
  return JSON.parse(stdout);
}

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), "nkservice-js-tls-"));
  await run(PYTHON, ["-c", `
import sys, trustme
ca = trustme.CA()
ca.cert_pem.write_to_path(sys.argv[1] + "/ca.pem")
ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(sys.argv[1] + "/server.pem")
`, dir]);
  server = await startServer({
    services: {
      secure: { wss: true, tls: { certfile: path.join(dir, "server.pem") }, users: { alice: "pw1" },
        permissions: { user: ["core.event.send"] } },
    },
  });
});

after(async () => {
  await server?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

test("the client works over wss:// when Node trusts the certificate's CA", async () => {
  assert.match(server.url("secure"), /^wss:/);
  const result = await runClient({ NODE_EXTRA_CA_CERTS: path.join(dir, "ca.pem") });
  assert.deepEqual(result, { user: "alice", event: { class: "tls", body: { secure: true } } });
});

test("an untrusted certificate fails connect() with connection_closed", async () => {
  const result = await runClient({ NODE_EXTRA_CA_CERTS: "" });
  assert.equal(result.error, "connection_closed");
  assert.match(result.message, /^Could not connect to wss:/);
});
