// The nkservice dashboard: the global admin's view of a node, over the External API.
//
// It logs in on the core service's WebSocket, then keeps its picture of the node up to
// date with the lifecycle events (`core/service/*` in `core`, `core/session/start|stop`
// in every service) and a light `list_services` every second that corrects the counts
// (and reloads a service's sessions when its count and the table disagree).
//
// Everything shown is built with DOM calls and text nodes: event bodies and names come
// from clients, and none of them is ever read as HTML.

import { NkClient } from "./nkservice.js";
import { parseDefinition } from "./toml.js";

const REFRESH_MS = 1000; // list_services: keeps the counts right whatever events were missed
const MAX_EVENTS = 500; // entries kept in the event log
const MAX_SESSIONS_SHOWN = 1000; // rows of the sessions table

// ---------------------------------------------------------------------------------------
// Small helpers

const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// An NkError: "Service not found: chat (service_not_found, 100020)".
function describeError(error) {
  if (!error || !error.code) return String(error && error.message ? error.message : error);
  const code = error.number ? `${error.code}, ${error.number}` : error.code;
  return `${error.message} (${code})`;
}

// The service the dashboard logs in to. Its own events come without a `service` field, so
// the client matches them only against filters that leave `service` out.
const HOME = "core";

function inService(filter, service) {
  const { service: _named, ...keys } = filter;
  return service && service !== HOME ? { ...keys, service } : keys;
}

function say(id, text, state = "info") {
  const node = $(id);
  node.textContent = text;
  node.dataset.state = state;
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

function compactJson(value) {
  return value === undefined ? "" : JSON.stringify(value);
}

function timeOf(ms) {
  if (!ms) return "";
  const at = new Date(ms);
  const two = (n) => String(n).padStart(2, "0");
  return `${at.getFullYear()}-${two(at.getMonth() + 1)}-${two(at.getDate())} `
    + `${two(at.getHours())}:${two(at.getMinutes())}:${two(at.getSeconds())}`;
}

// The WebSocket of the listener that served this page: the node puts its path in a meta.
function defaultUrl() {
  const meta = document.querySelector('meta[name="nkservice-websocket-path"]');
  let path = meta ? meta.content : "/";
  if (!path || path.startsWith("__")) path = "/"; // a copy served by something else
  if (!path.startsWith("/")) path = `/${path}`;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host || "127.0.0.1:9010"}${path}`;
}

// ---------------------------------------------------------------------------------------
// State

const state = {
  client: null,
  login: null, // the login answer: {session_id, user}
  services: new Map(), // name → {name, listen, sessions, origin}
  sessionWatch: new Map(), // service name → subscription handle of core/session/* there
  serviceWatch: null, // handle of core/service/* in core
  sessions: new Map(), // `${service} ${session_id}` → {service, user, session_id, ...}
  loadingSessions: new Set(), // services whose sessions are being reloaded
  refreshTimer: 0,
  refreshing: false,
  streams: [], // {filter, handle, label}
  paused: false,
  eventCount: 0,
  viewedSession: null, // {service, session_id, user}
  loaded: null, // the definition loaded into the editor's form: what "Update" compares with
};

const sessionKey = (service, id) => `${service} ${id}`;

// ---------------------------------------------------------------------------------------
// Login and connection

function showLoggedIn(loggedIn) {
  $("login-panel").hidden = loggedIn;
  $("app").hidden = !loggedIn;
  $("logout").hidden = !loggedIn;
}

function setConnection(text, stateName) {
  say("connection", text, stateName);
}

async function logIn(event) {
  event.preventDefault();
  const url = $("login-url").value.trim();
  const user = $("login-user").value;
  const password = $("login-password").value;
  $("login-error").hidden = true;
  $("login-submit").disabled = true;
  setConnection("Connecting…", "connecting");
  const client = new NkClient(url, { user, password, reconnect: true });
  try {
    state.login = await client.connect();
  } catch (error) {
    client.close().catch(() => {});
    setConnection("Not connected", "disconnected");
    $("login-error").textContent = `Cannot log in: ${describeError(error)}`;
    $("login-error").hidden = false;
    $("login-submit").disabled = false;
    return;
  }
  state.client = client;
  $("login-password").value = "";
  $("login-submit").disabled = false;
  let lost = "";
  client.on("disconnected", (info) => {
    lost = info && info.reason ? ` (${info.reason})` : "";
    if (state.client === client) setConnection(`Connection lost${lost}: reconnecting…`, "reconnecting");
  });
  client.on("reconnecting", (info) => {
    const attempt = info && info.attempt ? `, try ${info.attempt}` : "";
    if (state.client === client) {
      setConnection(`Connection lost${lost}: reconnecting${attempt}…`, "reconnecting");
    }
  });
  client.on("connected", (login) => {
    if (state.client !== client) return;
    if (login && login.session_id) state.login = login;
    setConnection(`Connected as ${state.login.user}`, "connected");
    reloadEverything();
  });
  client.on("closed", () => {
    if (state.client === client) loggedOut("The connection was closed.");
  });
  setConnection(`Connected as ${state.login.user}`, "connected");
  showLoggedIn(true);
  await start();
}

async function start() {
  const client = state.client;
  try {
    state.serviceWatch = await client.subscribe(
      { class: "core", subclass: "service" }, onServiceEvent);
  } catch (error) {
    say("services-status", `Cannot follow service events: ${describeError(error)}`, "error");
  }
  await reloadEverything();
  state.refreshTimer = setInterval(refreshServices, REFRESH_MS);
}

async function reloadEverything() {
  await refreshServices();
  await loadSessions([...state.services.keys()]);
}

function logOut() {
  const client = state.client;
  loggedOut("Logged out.");
  if (client) client.close().catch(() => {});
}

function loggedOut(why) {
  clearInterval(state.refreshTimer);
  state.client = null;
  state.serviceWatch = null;
  state.sessionWatch.clear();
  state.services.clear();
  state.sessions.clear();
  state.streams = [];
  state.viewedSession = null;
  state.loaded = null;
  renderServices();
  renderSessions();
  renderStreams();
  // Nothing of the last login stays on the page.
  $("event-log").replaceChildren();
  state.eventCount = 0;
  $("stream-count").textContent = "";
  $("subscriptions-table").hidden = true;
  $("subscriptions-table").tBodies[0].replaceChildren();
  $("subscriptions-of").textContent = "Choose “Subscriptions” on a session above.";
  $("subscriptions-refresh").disabled = true;
  $("console-result").textContent = "";
  for (const id of ["services-status", "sessions-status", "subscriptions-status",
    "stream-status", "console-state", "editor-status"]) say(id, "", "info");
  setConnection(why, "disconnected");
  showLoggedIn(false);
  $("login-password").focus();
}

// ---------------------------------------------------------------------------------------
// Services

async function refreshServices() {
  const client = state.client;
  // While reconnecting, requests would wait for the connection: the next tick will do.
  if (!client || state.refreshing || client.state === "reconnecting") return;
  state.refreshing = true;
  try {
    const list = await client.request("core", "list_services", {});
    if (client !== state.client) return;
    const names = new Set(list.map((service) => service.name));
    for (const name of state.services.keys()) if (!names.has(name)) serviceGone(name);
    for (const service of list) state.services.set(service.name, service);
    await watchSessions(list.map((service) => service.name));
    renderServices();
    checkCounts();
    say("services-status", "", "ok");
  } catch (error) {
    say("services-status", `Cannot list the services: ${describeError(error)}`, "error");
  } finally {
    state.refreshing = false;
  }
}

// A count that differs from the sessions we know of: reload that service's sessions.
function checkCounts() {
  const known = new Map();
  for (const session of state.sessions.values()) {
    known.set(session.service, (known.get(session.service) || 0) + 1);
  }
  const stale = [];
  for (const service of state.services.values()) {
    if ((known.get(service.name) || 0) !== service.sessions) stale.push(service.name);
  }
  for (const name of known.keys()) if (!state.services.has(name)) stale.push(name);
  if (stale.length) loadSessions(stale);
}

// Follow core/session/start|stop in each service (§5.4).
async function watchSessions(names) {
  const client = state.client;
  await Promise.all(names.filter((name) => !state.sessionWatch.has(name)).map(async (name) => {
    state.sessionWatch.set(name, null); // subscribing
    try {
      const handle = await client.subscribe(
        inService({ class: "core", subclass: "session" }, name),
        (event) => onSessionEvent(name, event));
      if (client !== state.client || !state.sessionWatch.has(name)) {
        handle.unsubscribe().catch(() => {});
      } else {
        state.sessionWatch.set(name, handle);
      }
    } catch (error) {
      state.sessionWatch.delete(name); // tried again at the next refresh
    }
  }));
}

function serviceGone(name) {
  state.services.delete(name);
  const handle = state.sessionWatch.get(name);
  state.sessionWatch.delete(name);
  // The server dropped the subscription with the service; this only tidies the client.
  if (handle) handle.unsubscribe().catch(() => {});
  for (const [key, session] of state.sessions) {
    if (session.service === name) state.sessions.delete(key);
  }
  renderSessions();
}

function onServiceEvent(event) {
  const name = event.obj_id;
  if (!name) return;
  const body = event.body || {};
  if (event.type === "stop") {
    serviceGone(name);
  } else if (event.type === "start" || event.type === "update") {
    const old = state.services.get(name);
    state.services.set(name, {
      name,
      listen: body.listen || (old ? old.listen : []),
      sessions: old ? old.sessions : 0,
      origin: body.origin || (old ? old.origin : ""),
    });
    if (event.type === "start") watchSessions([name]);
  }
  renderServices();
}

// Drawing is coalesced (a burst of logins draws once) and skipped when nothing shown has
// changed, so a refresh every second never takes the focus away from a button.
const drawn = { services: "", names: "", sessions: "" };
const toDraw = new Set();
let drawTimer = 0;

function schedule(what) {
  toDraw.add(what);
  if (drawTimer) return;
  drawTimer = setTimeout(() => {
    drawTimer = 0;
    if (toDraw.delete("services")) drawServices();
    if (toDraw.delete("sessions")) drawSessions();
  }, 20);
}

const renderServices = () => schedule("services");
const renderSessions = () => schedule("sessions");

function drawServices() {
  const services = [...state.services.values()]
    .sort((a, b) => (a.name === "core" ? -1 : b.name === "core" ? 1 : a.name.localeCompare(b.name)));
  const signature = JSON.stringify(services);
  if (signature !== drawn.services) {
    drawn.services = signature;
    drawServiceRows(services);
  }
  const names = [...state.services.keys()].sort();
  if (JSON.stringify(names) !== drawn.names) {
    drawn.names = JSON.stringify(names);
    const select = $("sessions-service");
    const chosen = select.value;
    select.replaceChildren(h("option", { value: "" }, "All services"),
      ...names.map((name) => h("option", { value: name }, name)));
    select.value = state.services.has(chosen) ? chosen : "";
    $("service-names").replaceChildren(...names.map((name) => h("option", { value: name })));
  }
}

function drawServiceRows(services) {
  const body = $("services-table").tBodies[0];
  const rows = services
    .map((service) => h("tr", { dataset: { service: service.name }, "data-testid": "service-row" },
      h("th", { scope: "row" }, service.name),
      h("td", {}, h("ul", { class: "plain" },
        (service.listen || []).map((url) => h("li", {}, h("code", {}, url))))),
      h("td", { class: "num", "data-testid": "session-count" }, String(service.sessions)),
      h("td", {}, service.origin || ""),
      h("td", { class: "actions" },
        h("button", { type: "button", onclick: () => showSessionsOf(service.name),
          "aria-label": `Sessions of ${service.name}` }, "Sessions"),
        service.name === "core" ? null :
          h("button", { type: "button", onclick: () => editService(service.name),
            "aria-label": `Edit ${service.name}` }, "Edit"))));
  body.replaceChildren(...rows);
}

function showSessionsOf(name) {
  $("sessions-service").value = name;
  renderSessions();
  $("sessions-panel").scrollIntoView({ behavior: "smooth", block: "start" });
}

// ---------------------------------------------------------------------------------------
// Sessions

function onSessionEvent(service, event) {
  const id = event.obj_id;
  if (!id) return;
  const key = sessionKey(service, id);
  const body = event.body || {};
  const known = state.services.get(service);
  if (event.type === "start") {
    if (!state.sessions.has(key)) {
      state.sessions.set(key, { service, session_id: id, user: body.user,
        transport: body.transport, remote: body.remote, login_time: Date.now() });
      if (known) known.sessions += 1;
    }
  } else if (event.type === "stop") {
    if (state.sessions.delete(key) && known) known.sessions = Math.max(0, known.sessions - 1);
    if (state.viewedSession && sessionKey(state.viewedSession.service,
      state.viewedSession.session_id) === key) {
      say("subscriptions-status", "This session has ended.", "info");
    }
  }
  renderServices();
  renderSessions();
}

// Reload the sessions of these services: list_users, then get_user for each user.
async function loadSessions(names) {
  const client = state.client;
  const todo = names.filter((name) => !state.loadingSessions.has(name));
  if (!client || todo.length === 0) return;
  for (const name of todo) state.loadingSessions.add(name);
  try {
    await Promise.all(todo.map(async (service) => {
      let found = [];
      try {
        const users = await client.request("core", "list_users", { service });
        const details = await Promise.all(Object.keys(users).map((user) =>
          client.request("core", "get_user", { user, service })
            .then((sessions) => [user, sessions])
            .catch(() => [user, {}])));
        for (const [user, sessions] of details) {
          for (const id of users[user]) {
            const detail = sessions[id] || {};
            found.push({ service, session_id: id, user, transport: detail.transport,
              remote: detail.remote, login_time: detail.login_time, meta: detail.meta });
          }
        }
      } catch (error) {
        if (error && error.code === "service_not_found") found = []; // it has gone
        else throw error;
      }
      if (client !== state.client) return;
      for (const [key, session] of state.sessions) {
        if (session.service === service) state.sessions.delete(key);
      }
      for (const session of found) {
        state.sessions.set(sessionKey(service, session.session_id), session);
      }
    }));
    say("sessions-status", "", "ok");
  } catch (error) {
    say("sessions-status", `Cannot list the sessions: ${describeError(error)}`, "error");
  } finally {
    for (const name of todo) state.loadingSessions.delete(name);
  }
  renderSessions();
}

function drawSessions() {
  const service = $("sessions-service").value;
  const user = $("sessions-user").value.trim().toLowerCase();
  const all = [...state.sessions.values()]
    .filter((s) => (!service || s.service === service)
      && (!user || String(s.user).toLowerCase().includes(user)))
    .sort((a, b) => a.service.localeCompare(b.service) || String(a.user).localeCompare(String(b.user))
      || (a.login_time || 0) - (b.login_time || 0));
  const shown = all.slice(0, MAX_SESSIONS_SHOWN);
  const own = state.login && state.login.session_id;
  const signature = JSON.stringify([own, all.length, shown]);
  if (signature === drawn.sessions) return;
  drawn.sessions = signature;
  const rows = shown.map((s) => {
    const self = s.service === "core" && s.session_id === own;
    return h("tr", { "data-testid": "session-row", dataset: { sessionId: s.session_id,
      service: s.service, user: s.user } },
      h("td", {}, s.service),
      h("td", {}, String(s.user ?? "")),
      h("td", {}, h("code", {}, s.session_id), self ? h("span", { class: "tag" }, " this dashboard") : null),
      h("td", {}, s.transport || ""),
      h("td", {}, h("code", {}, s.remote || "")),
      h("td", {}, timeOf(s.login_time)),
      h("td", { class: "actions" },
        h("button", { type: "button", onclick: () => showSubscriptions(s),
          "aria-label": `Subscriptions of session ${s.session_id}` }, "Subscriptions"),
        self ? null : h("button", { type: "button", class: "danger",
          onclick: () => stopSession(s),
          "aria-label": `Stop session ${s.session_id}` }, "Stop")));
  });
  $("sessions-table").tBodies[0].replaceChildren(...rows);
  const more = all.length > shown.length ? ` (the first ${shown.length} shown)` : "";
  $("sessions-summary").textContent =
    `${all.length} session${all.length === 1 ? "" : "s"}${more}`;
}

async function stopSession(session) {
  try {
    const answer = await state.client.request("core", "stop_session",
      { session_id: session.session_id, service: session.service });
    say("sessions-status",
      `Stopped session ${session.session_id} of ${answer.user ?? session.user}.`, "ok");
  } catch (error) {
    say("sessions-status", `Cannot stop ${session.session_id}: ${describeError(error)}`, "error");
  }
}

// ---------------------------------------------------------------------------------------
// A session's subscriptions (an admin may read any session's, with `session_id`)

async function showSubscriptions(session) {
  state.viewedSession = session;
  $("subscriptions-refresh").disabled = false;
  $("subscriptions-of").textContent =
    `Session ${session.session_id} of ${session.user} in ${session.service}`;
  await loadSubscriptions();
  $("subscriptions-panel").scrollIntoView({ behavior: "smooth", block: "start" });
}

async function loadSubscriptions() {
  const session = state.viewedSession;
  if (!session || !state.client) return;
  const table = $("subscriptions-table");
  try {
    const list = await state.client.request("core", "get_subscriptions",
      { session_id: session.session_id, service: session.service });
    const own = state.login.session_id;
    const ours = session.session_id !== own && list.some((s) =>
      s.subclass === "session_event" && s.obj_id === own);
    if (ours) {
      // A server that ignores `session_id` answers with the dashboard's own list.
      table.hidden = true;
      say("subscriptions-status",
        "This server cannot show another session's subscriptions.", "error");
      return;
    }
    table.tBodies[0].replaceChildren(...list.map((s) => h("tr", { "data-testid": "subscription-row" },
      h("td", {}, s.class), h("td", {}, s.subclass), h("td", {}, s.type),
      h("td", {}, h("code", {}, s.obj_id)), h("td", {}, s.service),
      h("td", {}, h("code", {}, isEmpty(s.body) ? "" : compactJson(s.body))))));
    table.hidden = false;
    say("subscriptions-status",
      `${list.length} subscription${list.length === 1 ? "" : "s"}.`, "ok");
  } catch (error) {
    table.hidden = true;
    say("subscriptions-status", `Cannot read the subscriptions: ${describeError(error)}`, "error");
  }
}

function isEmpty(body) {
  return body === undefined || body === null
    || (typeof body === "object" && !Array.isArray(body) && Object.keys(body).length === 0);
}

// ---------------------------------------------------------------------------------------
// Event stream

async function addStream(event) {
  event.preventDefault();
  const filter = {};
  for (const [field, id] of [["class", "stream-class"], ["subclass", "stream-subclass"],
    ["type", "stream-type"], ["obj_id", "stream-obj-id"], ["service", "stream-service"]]) {
    const value = $(id).value.trim();
    if (value) filter[field] = value;
  }
  if (!filter.class) {
    say("stream-status", "A class is needed.", "error");
    return;
  }
  const label = streamLabel(filter);
  if (state.streams.some((s) => s.label === label)) {
    say("stream-status", `Already subscribed to ${label}.`, "info");
    return;
  }
  const client = state.client;
  try {
    const handle = await client.subscribe(inService(filter, filter.service),
      (e) => onStreamEvent(e, filter));
    if (client !== state.client) return;
    state.streams.push({ filter, handle, label });
    renderStreams();
    say("stream-status", `Subscribed to ${label}.`, "ok");
  } catch (error) {
    say("stream-status", `Cannot subscribe to ${label}: ${describeError(error)}`, "error");
  }
}

function streamLabel(filter) {
  const path = ["class", "subclass", "type", "obj_id"].map((k) => filter[k] || "*").join("/");
  return `${path} in ${filter.service || "core"}`;
}

async function removeStream(stream) {
  state.streams = state.streams.filter((s) => s !== stream);
  renderStreams();
  try {
    await stream.handle.unsubscribe();
    say("stream-status", `Unsubscribed from ${stream.label}.`, "ok");
  } catch (error) {
    say("stream-status", `Cannot unsubscribe: ${describeError(error)}`, "error");
  }
}

function renderStreams() {
  $("stream-subscriptions").replaceChildren(...state.streams.map((stream) =>
    h("li", { "data-testid": "stream-subscription" },
      h("code", {}, stream.label),
      h("button", { type: "button", class: "small", onclick: () => removeStream(stream),
        "aria-label": `Unsubscribe from ${stream.label}` }, "×"))));
}

function onStreamEvent(event, filter) {
  if (state.paused) return;
  state.eventCount += 1;
  const service = event.service || HOME;
  const path = [event.class, event.subclass, event.type, event.obj_id]
    .map((part) => part ?? "*").join("/");
  const entry = h("li", { "data-testid": "event", dataset: { service, class: event.class,
    subclass: event.subclass ?? "*", type: event.type ?? "*", objId: event.obj_id ?? "*" } },
    h("time", {}, new Date().toLocaleTimeString()),
    h("span", { class: "service" }, service),
    h("code", { class: "path" }, path),
    h("code", { class: "body" }, isEmpty(event.body) ? "" : compactJson(event.body)));
  const log = $("event-log");
  log.prepend(entry);
  while (log.children.length > MAX_EVENTS) log.lastElementChild.remove();
  $("stream-count").textContent = `${state.eventCount} received`;
}

// ---------------------------------------------------------------------------------------
// Console

async function sendCommand(event) {
  event.preventDefault();
  const cls = $("console-class").value.trim();
  const subclass = $("console-subclass").value.trim();
  const cmd = $("console-cmd").value.trim();
  const result = $("console-result");
  let data;
  try {
    const text = $("console-data").value.trim();
    data = text === "" ? {} : JSON.parse(text);
  } catch (error) {
    say("console-state", `The data is not JSON: ${error.message}`, "error");
    result.dataset.state = "error";
    result.textContent = "";
    return;
  }
  const shown = [cls, subclass, cmd].filter(Boolean).join(" ");
  say("console-state", `Sending ${shown}…`, "info");
  const started = performance.now();
  try {
    const answer = await state.client.request(cls, cmd, data, subclass ? { subclass } : {});
    const ms = Math.round(performance.now() - started);
    say("console-state", `${shown}: ok in ${ms} ms`, "ok");
    result.dataset.state = "ok";
    result.textContent = answer === undefined ? "(no data)" : json(answer);
  } catch (error) {
    const ms = Math.round(performance.now() - started);
    say("console-state", `${shown}: error in ${ms} ms`, "error");
    result.dataset.state = "error";
    result.textContent = describeError(error);
  }
}

// ---------------------------------------------------------------------------------------
// Service editor

const NUMBER_FIELDS = [
  ["ping_interval", "service-ping-interval"],
  ["request_timeout", "service-request-timeout"],
  ["login_timeout", "service-login-timeout"],
  ["resume_window", "service-resume-window"],
];

function editorMode() {
  return $("editor-mode-text").checked ? "text" : "form";
}

function showEditorMode() {
  const text = editorMode() === "text";
  $("editor-fields").hidden = text;
  $("editor-text-fields").hidden = !text;
}

function lines(text) {
  return text.split("\n").map((line) => line.trim()).filter((line) => line && !line.startsWith("#"));
}

function pairs(text, field) {
  const out = {};
  for (const line of lines(text)) {
    const match = /^([^=:]+?)\s*[=:]\s*(.*)$/.exec(line);
    if (!match) throw new Error(`${field}: write each line as name = value`);
    out[match[1].trim()] = match[2].trim();
  }
  return out;
}

// The definition the form describes: every key that has a value.
function formDefinition() {
  const definition = {};
  const name = $("service-name").value.trim();
  if (name) definition.name = name;
  const listen = lines($("service-listen").value);
  if (listen.length) definition.listen = listen;
  const adminUser = $("service-admin-user").value.trim();
  const adminPassword = $("service-admin-password").value;
  if (adminPassword) {
    if (!adminUser) throw new Error("the service admin needs a user name");
    definition.admin = { user: adminUser, password: adminPassword };
  } else if (adminUser && !(state.loaded && state.loaded.name === name
    && state.loaded.adminUser === adminUser)) {
    throw new Error("the service admin needs a password");
  }
  const users = pairs($("service-users").value, "users");
  if (Object.keys(users).length) definition.users = users;
  const permissions = {};
  for (const [who, list] of Object.entries(pairs($("service-permissions").value, "permissions"))) {
    permissions[who] = list.split(/[\s,]+/).filter(Boolean);
  }
  if (Object.keys(permissions).length) definition.permissions = permissions;
  for (const [key, id] of NUMBER_FIELDS) {
    const raw = $(id).value.trim();
    if (raw !== "") {
      const number = Number(raw);
      if (!Number.isFinite(number)) throw new Error(`${key}: not a number`);
      definition[key] = number;
    }
  }
  const plugins = $("service-plugins").value.split(",").map((p) => p.trim()).filter(Boolean);
  if (plugins.length) definition.plugins = plugins;
  const script = $("service-script").value;
  if (script.trim()) definition.script_code = script;
  return definition;
}

function textDefinition() {
  const definition = parseDefinition($("service-text").value);
  if (typeof definition !== "object" || definition === null || Array.isArray(definition)) {
    throw new Error("the definition must be an object of keys");
  }
  const name = $("service-name").value.trim();
  if (definition.name === undefined && name) definition.name = name;
  return definition;
}

function editorDefinition() {
  const definition = editorMode() === "text" ? textDefinition() : formDefinition();
  if (!definition.name) throw new Error("a service needs a name");
  return definition;
}

async function createService(event) {
  event.preventDefault();
  let definition;
  try {
    definition = editorDefinition();
  } catch (error) {
    say("editor-status", `Cannot create: ${error.message}`, "error");
    return;
  }
  try {
    const answer = await state.client.request("core", "create_service", definition);
    say("editor-status", `Service ${answer.name} created.`, "ok");
    refreshServices();
  } catch (error) {
    say("editor-status", `Cannot create ${definition.name}: ${describeError(error)}`, "error");
  }
}

// In form mode, what changed since "Load" (or everything filled in, without a Load).
function changedKeys(definition) {
  const loaded = state.loaded;
  if (!loaded || loaded.name !== definition.name) return definition;
  const changes = { name: definition.name };
  for (const [key, value] of Object.entries(definition)) {
    if (key === "name") continue;
    if (JSON.stringify(value) !== JSON.stringify(loaded.form[key])) changes[key] = value;
  }
  return changes;
}

async function updateService() {
  let definition;
  try {
    definition = editorDefinition();
    if (editorMode() === "form") definition = changedKeys(definition);
  } catch (error) {
    say("editor-status", `Cannot update: ${error.message}`, "error");
    return;
  }
  if (Object.keys(definition).length === 1) {
    say("editor-status", "Nothing to change.", "info");
    return;
  }
  try {
    const answer = await state.client.request("core", "update_service", definition);
    const note = answer.note ? ` (${answer.note})` : "";
    say("editor-status", `Service ${answer.name} updated${note}.`, "ok");
    refreshServices();
    await loadService(definition.name, { quiet: true });
  } catch (error) {
    say("editor-status", `Cannot update ${definition.name}: ${describeError(error)}`, "error");
  }
}

function stopName() {
  if (editorMode() === "text") {
    try {
      const definition = textDefinition();
      if (definition.name) return String(definition.name);
    } catch {
      // fall back to the name field
    }
  }
  return $("service-name").value.trim();
}

function askStop() {
  const name = stopName();
  if (!name) {
    say("editor-status", "Give the name of the service to stop.", "error");
    return;
  }
  $("service-stop-confirm").textContent = `Really stop ${name}`;
  $("service-stop-confirm").dataset.name = name;
  showStopConfirm(true);
  say("editor-status", `Stopping ${name} closes all its sessions.`, "info");
  $("service-stop-confirm").focus();
}

function showStopConfirm(shown) {
  $("service-stop").hidden = shown;
  $("service-stop-confirm").hidden = !shown;
  $("service-stop-cancel").hidden = !shown;
}

async function stopService() {
  const name = $("service-stop-confirm").dataset.name;
  showStopConfirm(false);
  try {
    const answer = await state.client.request("core", "stop_service", { name });
    const note = answer && answer.note ? ` (${answer.note})` : "";
    say("editor-status", `Service ${name} stopped${note}.`, "ok");
    refreshServices();
  } catch (error) {
    say("editor-status", `Cannot stop ${name}: ${describeError(error)}`, "error");
  }
}

function editService(name) {
  $("service-name").value = name;
  loadService(name);
  $("editor-panel").scrollIntoView({ behavior: "smooth", block: "start" });
}

// Fill the form and the text from get_service (which leaves the secrets out).
async function loadService(name, { quiet = false } = {}) {
  if (!name) {
    say("editor-status", "Give the name of the service to load.", "error");
    return;
  }
  let definition;
  try {
    definition = await state.client.request("core", "get_service", { name });
  } catch (error) {
    say("editor-status", `Cannot load ${name}: ${describeError(error)}`, "error");
    return;
  }
  // The text is what may be sent back: `users` comes as names and `admin` without its
  // password, so both are left out (give them whole to change them).
  const { users: _users, admin: _admin, ...sendable } = definition;
  $("service-text").value = json(sendable);
  $("service-listen").value = (definition.listen || []).join("\n");
  const admin = definition.admin || null;
  $("service-admin-user").value = admin && admin.user ? admin.user : "";
  $("service-admin-password").value = "";
  const users = Array.isArray(definition.users) ? definition.users
    : Object.keys(definition.users || {});
  $("service-users").value = "";
  $("service-users").placeholder = users.length
    ? `now: ${users.join(", ")} (passwords hidden); type name = password lines to replace them`
    : "";
  $("service-permissions").value = Object.entries(definition.permissions || {})
    .map(([who, list]) => `${who} = ${list.join(", ")}`).join("\n");
  for (const [key, id] of NUMBER_FIELDS) {
    $(id).value = definition[key] === undefined ? "" : String(definition[key]);
  }
  $("service-plugins").value = (definition.plugins || []).join(", ");
  $("service-script").value = definition.script_code || "";
  // What the form now shows, to send only what changes from it.
  state.loaded = { name, adminUser: $("service-admin-user").value, form: null };
  state.loaded.form = formDefinition();
  if (!quiet) say("editor-status", `Loaded ${name}.`, "ok");
}

// ---------------------------------------------------------------------------------------
// Wiring

function init() {
  $("login-url").value = defaultUrl();
  $("login-form").addEventListener("submit", logIn);
  $("logout").addEventListener("click", logOut);
  $("sessions-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    const service = $("sessions-service").value;
    loadSessions(service ? [service] : [...state.services.keys()]);
  });
  $("sessions-service").addEventListener("change", renderSessions);
  $("sessions-user").addEventListener("input", renderSessions);
  $("subscriptions-refresh").addEventListener("click", loadSubscriptions);
  $("stream-form").addEventListener("submit", addStream);
  $("stream-pause").addEventListener("change", (event) => {
    state.paused = event.target.checked;
  });
  $("stream-clear").addEventListener("click", () => {
    $("event-log").replaceChildren();
    state.eventCount = 0;
    $("stream-count").textContent = "";
  });
  $("console-form").addEventListener("submit", sendCommand);
  for (const radio of document.querySelectorAll('input[name="editor-mode"]')) {
    radio.addEventListener("change", showEditorMode);
  }
  $("editor-form").addEventListener("submit", createService);
  $("service-update").addEventListener("click", updateService);
  $("service-load").addEventListener("click", () => loadService($("service-name").value.trim()));
  $("service-stop").addEventListener("click", askStop);
  $("service-stop-confirm").addEventListener("click", stopService);
  $("service-stop-cancel").addEventListener("click", () => {
    showStopConfirm(false);
    say("editor-status", "", "info");
  });
  showEditorMode();
  showLoggedIn(false);
  document.body.dataset.ready = "true";
  $(($("login-user").value ? "login-password" : "login-user")).focus();
}

init();
