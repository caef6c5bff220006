// Test helpers: a real nkservice node in a child process, and a TCP proxy whose connections a
// test can cut (a network drop, which the server takes for a dropped session, §8).
import { spawn } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const JS_DIR = path.resolve(here, "..");
/** The server's command: $NKSERVICE_BIN, else the repository's virtualenv. */
export const NKSERVICE_BIN = process.env.NKSERVICE_BIN
  ?? path.resolve(JS_DIR, "../.venv/bin/nkservice");
/** The Python next to it (trustme makes the test certificates). */
export const PYTHON = path.join(path.dirname(NKSERVICE_BIN), "python");

/** A port nobody listens on right now. */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A TOML value (the few kinds a config needs). */
function tomlValue(value) {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  if (Array.isArray(value)) return `[${value.map(tomlValue).join(", ")}]`;
  return `{ ${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)} = ${tomlValue(v)}`).join(", ")} }`;
}

function table(name, keys) {
  return [`[${name}]`, ...Object.entries(keys).map(([k, v]) => `${k} = ${tomlValue(v)}`), ""].join("\n");
}

/** Resolves when something accepts TCP connections on the port (the child is up). */
async function waitForPort(port, child, output, deadline) {
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`nkservice exited (${child.exitCode}):\n${output.join("")}`);
    const up = await new Promise((resolve) => {
      const socket = net.connect(port, "127.0.0.1");
      socket.once("connect", () => { socket.destroy(); resolve(true); });
      socket.once("error", () => resolve(false));
    });
    if (up) return;
    await new Promise((resolve) => setTimeout(resolve, 50)); // poll again
  }
  throw new Error(`nkservice did not listen on ${port} in time:\n${output.join("")}`);
}

/**
 * Start a node: the core service on ws, and each of `services` (TOML keys as JS values) on a
 * ws URL of its own, or wss with `wss: true` (give it `tls`). `await server.stop()` at the end.
 */
export async function startServer({ services = {}, core = {} } = {}) {
  const dir = await mkdtemp(path.join(os.tmpdir(), "nkservice-js-"));
  const corePort = await freePort();
  const urls = { core: `ws://127.0.0.1:${corePort}/` };
  const ports = [corePort];
  let text = table("node", { data_dir: path.join(dir, "data") })
    + table("admin", { user: "admin", password: "admin" })
    + table("core", { ...core, listen: [urls.core] });
  for (const [name, { wss, ...keys }] of Object.entries(services)) {
    const port = await freePort();
    ports.push(port);
    urls[name] = `${wss ? "wss" : "ws"}://127.0.0.1:${port}/`;
    text += table(`services.${name}`, { ...keys, listen: [urls[name]] });
  }
  const config = path.join(dir, "nkservice.toml");
  await writeFile(config, text);
  const child = spawn(NKSERVICE_BIN, ["serve", "--config", config], { stdio: ["ignore", "pipe", "pipe"] });
  const output = [];
  child.stdout.on("data", (chunk) => output.push(chunk.toString()));
  child.stderr.on("data", (chunk) => output.push(chunk.toString()));
  const exited = new Promise((resolve) => child.once("exit", resolve));
  // A test file that fails before its stop() must still end, and take its node with it:
  // the child does not keep it alive, and is killed when it exits.
  child.unref();
  child.stdout.unref();
  child.stderr.unref();
  const orphaned = () => child.kill("SIGKILL");
  process.once("exit", orphaned);
  try {
    const deadline = Date.now() + 20_000;
    for (const port of ports) await waitForPort(port, child, output, deadline);
  } catch (error) {
    child.kill("SIGKILL");
    await rm(dir, { recursive: true, force: true });
    throw error;
  }
  return {
    dir,
    urls,
    output,
    /** The URL of a service ("core" for the admin API). */
    url: (name) => urls[name],
    async stop() {
      process.off("exit", orphaned);
      if (child.exitCode === null) {
        child.kill("SIGTERM");
        const killer = setTimeout(() => child.kill("SIGKILL"), 5000);
        await exited;
        clearTimeout(killer);
      }
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A TCP proxy to `target` (a ws:// URL): `proxy.url` is the same service through it.
 * `proxy.drop()` cuts every connection at once, as a network failure would; while
 * `proxy.refusing` is true new connections are cut at once; `proxy.freeze()` stops carrying
 * bytes on the open connections without closing them (a network gone silent).
 */
export async function startProxy(target) {
  const { hostname, port, pathname } = new URL(target);
  const pairs = new Set();
  const server = net.createServer((client) => {
    if (proxy.refusing) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    const pair = [client, upstream];
    pairs.add(pair);
    for (const socket of pair) {
      socket.on("error", () => {});
      socket.on("close", () => { pairs.delete(pair); client.destroy(); upstream.destroy(); });
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const proxy = {
    url: `ws://127.0.0.1:${server.address().port}${pathname}`,
    refusing: false,
    drop() {
      for (const pair of pairs) for (const socket of pair) socket.resetAndDestroy();
    },
    freeze() {
      for (const [client, upstream] of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
      }
    },
    close() {
      this.drop();
      return new Promise((resolve) => server.close(resolve));
    },
  };
  return proxy;
}

/** Resolves with the next value `emitter` (an NkClient) emits as `name`, when `test` holds. */
export function next(client, name, test = () => true) {
  return new Promise((resolve) => {
    const listener = (value) => {
      if (!test(value)) return;
      client.off(name, listener);
      resolve(value);
    };
    client.on(name, listener);
  });
}

/** A promise and its resolve, to await what a handler sees. */
export function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}
