#!/usr/bin/env node
// An external app for nkservice, in JavaScript: it decides who logs in to a service and serves
// a class of commands of its own, over the same API as any client (callbacks, protocol §12).
//
//     node --experimental-websocket examples/auth_backend.mjs ws://127.0.0.1:9010/ --service demo
//
// (Node 22+ needs no flag.) It connects to the node's core service as the global administrator
// (user `admin`, password from --password or NKSERVICE_ADMIN_PASSWORD, default `admin`), then
// registers for:
// - the `login` callback of the service: users log in against ACCOUNTS below (the service's
//   own static users are asked only when no such app is connected);
// - the `cmd` callback of the class `notes`: `notes`/`add` keeps a note for the user,
//   `notes`/`list` returns the user's notes.
// Run several copies: each callback goes to one of them, in turn, and to another when one
// dies. The client reconnects by itself and registers again. Ctrl-C stops it.
import { realpathSync } from "node:fs";
import process from "node:process";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { NkClient, NkError } from "../nkservice.js";

const ACCOUNTS = { carol: "c4rol", dave: "d4ve" }; // a real app asks its own user store
const NOTES = new Map(); // user → [text]

/** The `api_server_login` callback: its answer decides the login. */
export function authorize(login) {
  if (!Object.hasOwn(ACCOUNTS, login.user) || ACCOUNTS[login.user] !== login.password) {
    return { authorized: false, reason: "Invalid password" };
  }
  return { authorized: true, meta: { checked_by: "auth_backend.mjs" } };
}

/** The `api_server_cmd` callback of the class `notes`: its answer is the user's answer. */
export function notes({ request, user }) {
  const list = NOTES.get(user) ?? [];
  if (request.cmd === "add") {
    const text = request.data?.text;
    if (typeof text !== "string") throw new NkError("missing_field", "Missing field: text");
    NOTES.set(user, [...list, text]);
    return { count: list.length + 1 };
  }
  if (request.cmd === "list") return { notes: list };
  throw new NkError("unknown_command", `Unknown command '${request.cmd}'`);
}

/** Connect, log in and register; resolves with the client once callbacks are served. */
export async function serve(url, { service = "demo", password = "admin" } = {}) {
  const client = new NkClient(url, { user: "admin", password });
  await client.connect();
  await client.registerCallback("login", { service }, authorize);
  await client.registerCallback("cmd", { service, class: "notes" }, notes);
  // After a drop the client logs in and registers again by itself, then says "connected".
  client.on("disconnected", ({ reason }) => {
    if (client.state === "reconnecting") console.error(`auth_backend: disconnected (${reason}); reconnecting`);
  });
  client.on("connected", () => console.error("auth_backend: reconnected, callbacks registered again"));
  return client;
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      service: { type: "string", default: "demo" },
      password: { type: "string", default: process.env.NKSERVICE_ADMIN_PASSWORD ?? "admin" },
    },
  });
  const url = positionals[0] ?? "ws://127.0.0.1:9010/";
  let client;
  try {
    client = await serve(url, values);
  } catch (error) {
    console.error(`auth_backend: ${error.message}`);
    process.exit(1);
  }
  console.log(`serving logins and the class 'notes' of service '${values.service}'`);
  const stop = () => client.close().then(() => process.exit(0));
  process.once("SIGINT", stop);
  process.once("SIGTERM", stop);
}

// Run as a program (not imported): compare real paths, since the loader resolves symlinks.
if (process.argv[1] && import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href) main();
