// nkservice.js: the JavaScript client of the nkservice External API (docs/protocol.md), over
// WebSocket, for browsers and Node 20+. One ES module, no dependencies.
//
// The shape of it: an `NkClient` holds at most one connection at a time (a `Link`). A link
// carries its own tid counter, our requests waiting for an answer on it, and the acks of the
// server requests our handlers are still working on; all of that dies with the link, since
// the server forgets it too. What outlives a link lives on the client: the login fields and
// session id (to log in again), the subscriptions (to replay them), the callback
// registrations, the handlers, and the requests waiting for a connection.

/** The error names and numbers of docs/protocol.md §14, with their texts. */
const ERRORS = {
  internal_error: [100002, "Internal error"],
  timeout: [100005, "Timeout"],
  not_implemented: [100006, "Not implemented"],
  service_not_found: [100020, "Service not found"],
  service_already_exists: [100021, "Service already exists"],
  unauthorized: [100030, "Unauthorized"],
  not_authenticated: [100031, "Not authenticated"],
  already_authenticated: [100032, "Already authenticated"],
  user_not_found: [100033, "User not found"],
  duplicated_session_id: [100034, "Duplicated session id"],
  invalid_session_id: [100035, "Invalid session id"],
  invalid_password: [100038, "Invalid password"],
  invalid_operation: [100040, "Invalid operation"],
  unknown_command: [100042, "Unknown command"],
  syntax_error: [100044, "Syntax error"],
  missing_field: [100045, "Missing field"],
  invalid_value: [100046, "Invalid value"],
  invalid_reply: [100047, "Invalid reply"],
  unknown_class: [100050, "Unknown class"],
  session_not_found: [100062, "Session not found"],
  invalid_json: [100072, "Invalid JSON"],
  invalid_message: [100076, "Invalid message"],
  message_too_large: [100077, "Message too large"],
  too_many_requests: [100078, "Too many requests"],
  service_unavailable: [100079, "Service unavailable"],
  too_many_subscriptions: [100080, "Too many subscriptions"],
  connection_closed: [100081, "Connection closed"],
};
const CODES = Object.freeze(Object.fromEntries(Object.entries(ERRORS).map(([k, [n]]) => [k, n])));
const NAMES = new Map(Object.entries(CODES).map(([name, number]) => [number, name]));

const OPEN = 1; // WebSocket.OPEN, without needing the class

/**
 * An error answer from the server, or a failure the client saw itself (`"timeout"`,
 * `"connection_closed"`, `"invalid_reply"`). Handlers throw one to answer an error.
 */
export class NkError extends Error {
  /**
   * @param {string | number} code an error name of §14 (`"unauthorized"`) or its number
   * @param {string} [message] the text; the protocol's text of the code by default
   * @param {unknown} [data] for an error answer, its data (`{code, error}`)
   */
  constructor(code, message, data) {
    const name = typeof code === "number" ? (NAMES.get(code) ?? `error_${code}`) : String(code);
    super(message ?? ERRORS[name]?.[1] ?? name);
    this.name = "NkError";
    /** @type {string} */
    this.code = name;
    /** @type {number | undefined} */
    this.number = typeof code === "number" ? code : CODES[name];
    this.data = data;
  }

  /** Every error name of §14 with its number. */
  static codes = CODES;

  /** The NkError of an error answer's data (`{code: <number>, error: <text>}`). */
  static fromAnswer(data) {
    const number = typeof data?.code === "number" ? data.code : CODES.internal_error;
    const text = typeof data?.error === "string" ? data.error : undefined;
    return new NkError(number, text, data);
  }

  /** What to put in an error answer's data. */
  toAnswer() {
    return { code: this.number ?? CODES.internal_error, error: this.message };
  }
}

/** A copy of `object` without its undefined fields (JSON would drop them, but keys matter). */
function defined(object) {
  return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== undefined));
}

const isObject = (value) => typeof value === "object" && value !== null && !Array.isArray(value);
const isTid = (tid) => typeof tid === "string" || Number.isInteger(tid);
const wild = (value) => (typeof value === "string" ? value : "*");

/**
 * Does a subscription match a delivered event (§10.1)? The server leaves out fields that are
 * `"*"`, and names the service only when it is not the session's own (`home`, when known:
 * then a filter may name it too).
 */
function matches(filter, event, home) {
  return event.class === filter.class
    && (event.service ?? home) === (filter.service ?? home)
    && [["subclass", wild(event.subclass ?? event.obj)], ["type", wild(event.type)],
      ["obj_id", wild(event.obj_id)]]
      .every(([field, value]) => filter[field] === "*" || filter[field] === value);
}

const keyOf = (filter) =>
  JSON.stringify([filter.service ?? null, filter.class, filter.subclass, filter.type, filter.obj_id]);

/** One WebSocket connection and what dies with it. */
class Link {
  constructor(ws) {
    this.ws = ws;
    this.nextTid = 1; // tids are counted per connection
    this.pending = new Map(); // our requests written here: tid → entry
    this.acking = new Set(); // timers acking the server requests our handlers work on
    this.loginSent = false; // requests written after the login are pipelined behind it
    this.loggedIn = false;
    this.closed = false;
    this.reason = undefined; // why it ended
    this.watchdog = undefined; // fires when the server's pings stop
    this.gone = new Promise((resolve) => { this.ended = resolve; });
  }

  /** Write one message; false when the socket cannot take it. */
  write(message) {
    if (this.closed || this.ws.readyState !== OPEN) return false;
    this.ws.send(JSON.stringify(message)); // may throw on data JSON cannot carry: callers catch
    return true;
  }
}

/**
 * A client of one nkservice service over ws:// or wss://.
 *
 * ```js
 * const client = new NkClient("ws://127.0.0.1:9010/", { user: "admin", password: "admin" });
 * await client.connect();
 * const services = await client.request("core", "list_services");
 * ```
 */
export class NkClient {
  #options;
  #WebSocket;
  #state = "idle";
  #link = undefined;
  #queue = []; // requests waiting for a connection to be written on
  #subscriptions = new Set();
  #registrations = new Map(); // key → registration data, made again on every new connection
  #handlers = new Map(); // "class\0cmd" → handler
  #listeners = new Map(); // event name → Set of listeners
  #sessionId;
  #user = undefined;
  #lastLogin = undefined;
  #connecting = undefined; // the promise of a connect() under way
  #closing = false;
  #wakeUp = undefined; // ends a reconnect's wait early, for close()

  /**
   * @param {string} url a ws:// or wss:// URL of a service, e.g. "ws://127.0.0.1:9010/"
   * @param {import("./nkservice.js").NkClientOptions} [options] see nkservice.d.ts
   */
  constructor(url, options = {}) {
    this.url = url;
    this.#options = {
      reconnect: true,
      requestTimeout: 5,
      ackTimeout: 180,
      ackAfter: 0.5,
      ackEvery: 60,
      ...options,
      backoff: { initial: 0.1, max: 10, ...options.backoff },
    };
    this.#WebSocket = options.WebSocket;
    this.#sessionId = options.sessionId;
  }

  /** The session id, once logged in; kept for the reconnects. */
  get sessionId() { return this.#sessionId; }
  /** The user the server logged us in as. */
  get user() { return this.#user; }
  /** "idle" | "connecting" | "connected" | "reconnecting" | "closed" */
  get state() { return this.#state; }

  // -- life ----------------------------------------------------------------------------------

  /**
   * Open the connection and log in; resolves with the login answer's data. Requests made
   * before the answer are pipelined behind the login. A first failure rejects and leaves the
   * client "closed" (connect() may be called again); later drops reconnect by themselves.
   * @returns {Promise<import("./nkservice.js").LoginAnswer>}
   */
  connect() {
    if (this.#connecting) return this.#connecting;
    if (this.#state === "connected" || this.#state === "reconnecting") {
      return Promise.resolve(this.#lastLogin);
    }
    this.#closing = false;
    this.#state = "connecting";
    this.#connecting = this.#establish().then(
      (answer) => {
        this.#connecting = undefined;
        this.#connected(answer);
        return answer;
      },
      (error) => {
        this.#connecting = undefined;
        this.#finish(error.message);
        throw error;
      });
    return this.#connecting;
  }

  /** Close the connection (close frame 1000) and stop reconnecting; what waits rejects. */
  async close() {
    if (this.#state === "closed") return;
    if (this.#state === "idle") { // never connected: only requests waiting for connect()
      this.#finish("closed by the client");
      return;
    }
    this.#closing = true;
    this.#wakeUp?.();
    // Closing is for good: nothing is replayed if connect() is called again.
    for (const sub of this.#subscriptions) sub.active = false;
    this.#subscriptions.clear();
    this.#registrations.clear();
    const link = this.#link;
    if (link && !link.closed) {
      link.reason = "closed by the client";
      try { link.ws.close(1000); } catch { /* already closing */ }
      // A dead network never completes the closing handshake: do not wait for it forever.
      const bound = setTimeout(() => this.#lost(link, 1000, "closed by the client"), 2000);
      await link.gone;
      clearTimeout(bound);
    }
    this.#finish("closed by the client");
  }

  #connected(answer) {
    this.#state = "connected";
    this.#emit("connected", answer);
  }

  /** Done for good: whatever still waits for a connection will not get one. */
  #finish(reason) {
    if (this.#state === "closed") return;
    this.#state = "closed";
    for (const entry of this.#queue.splice(0)) {
      this.#settle(entry, new NkError("connection_closed", `Connection closed: ${reason}`));
    }
    this.#emit("closed", { reason });
  }

  /**
   * Open a link, log in on it, and make it the session we had: subscriptions replayed after a
   * fresh login (a resumed session kept them, §8), callbacks registered again. Resolves with
   * the login answer; rejects with an NkError when the link or the login fails.
   */
  async #establish() {
    const WebSocket = this.#WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass options.WebSocket, or run Node 22+ "
        + "(Node 20: node --experimental-websocket)");
    }
    const ws = new WebSocket(this.url);
    const link = new Link(ws);
    this.#link = link;
    ws.binaryType = "arraybuffer";
    const opened = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new NkError("timeout", `Could not connect to ${this.url} within `
          + `${this.#connectTimeout} s`));
        this.#lost(link, 1006, "connect timeout");
        try { ws.close(); } catch { /* not open yet */ }
      }, this.#connectTimeout * 1000);
      const failed = (code, reason) => {
        clearTimeout(timer);
        reject(new NkError("connection_closed", `Could not connect to ${this.url}: ${reason}`));
        this.#lost(link, code, reason);
      };
      ws.onopen = () => { clearTimeout(timer); resolve(); };
      ws.onclose = (event) => failed(event.code, event.reason || `close code ${event.code}`);
      // Node 20's WebSocket may report a failed handshake with an error and never a close.
      ws.onerror = () => failed(1006, "network error");
    });
    ws.onmessage = (event) => this.#received(link, event.data);
    await opened;
    ws.onclose = (event) => this.#lost(link, event.code, event.reason);
    ws.onerror = () => {}; // once open, a close event follows every error, and says more

    const fields = defined({
      user: this.#options.user,
      password: this.#options.password,
      meta: this.#options.meta,
      session_id: this.#sessionId,
      ...this.#options.login,
    });
    const login = this.#call(link, "core", "login", fields, "user");
    link.loginSent = true;
    this.#flush(link);
    let answer;
    try {
      answer = await login;
    } catch (error) {
      try { ws.close(1000); } catch { /* gone already */ }
      throw error;
    }
    if (!isObject(answer) || typeof answer.session_id !== "string") {
      ws.close(1000);
      throw new NkError("invalid_reply", "The login answer has no session_id", answer);
    }
    link.loggedIn = true;
    this.#sessionId = answer.session_id; // every reconnect takes this session over (§8)
    this.#user = typeof answer.user === "string" ? answer.user : this.#options.user;
    this.#lastLogin = answer;

    const again = [];
    if (answer.resumed !== true) {
      const latest = new Map(); // one subscribe per key, with the newest body
      for (const sub of this.#subscriptions) latest.set(keyOf(sub.filter), sub.filter);
      for (const filter of latest.values()) again.push(this.#call(link, "core", "subscribe", filter, "event"));
    }
    for (const registration of this.#registrations.values()) {
      again.push(this.#call(link, "core", "register", registration, "callback"));
    }
    for (const outcome of await Promise.allSettled(again)) {
      if (outcome.status === "rejected") this.#report(outcome.reason);
    }
    if (link.closed) throw new NkError("connection_closed", `Connection closed: ${link.reason}`);
    return answer;
  }

  get #connectTimeout() {
    return this.#options.connectTimeout ?? this.#options.requestTimeout;
  }

  /** A link ended (once per link): fail what it carried, then reconnect or finish. */
  #lost(link, code, reason) {
    if (link.closed) return;
    link.closed = true;
    link.reason ??= reason || (code === 1006 ? "connection lost" : `close code ${code}`);
    clearTimeout(link.watchdog);
    for (const timer of link.acking) clearInterval(timer);
    const error = new NkError("connection_closed", `Connection closed: ${link.reason}`);
    for (const entry of link.pending.values()) this.#settle(entry, error);
    link.pending.clear();
    link.ended();
    if (link !== this.#link || !link.loggedIn || this.#state !== "connected") {
      return; // a connect under way sees it fails by itself
    }
    // Someone else logged in with our session id: reconnecting would throw them out in turn.
    const replaced = link.reason.startsWith("replaced by");
    const again = this.#options.reconnect && !replaced && !this.#closing;
    if (again) this.#state = "reconnecting"; // as the "disconnected" listeners should see it
    this.#emit("disconnected", { code, reason: link.reason });
    if (again) this.#reconnect();
    else if (!this.#closing) this.#finish(link.reason);
  }

  /** Try again and again, with full-jitter exponential backoff, until logged in or closed. */
  async #reconnect() {
    this.#state = "reconnecting";
    const { initial, max } = this.#options.backoff;
    let error;
    for (let attempt = 1; !this.#closing; attempt++) {
      // Full jitter: the clients of a restarted server spread over the whole window.
      const delay = Math.random() * Math.min(max, initial * 2 ** (attempt - 1));
      this.#emit("reconnecting", defined({ attempt, delay, error }));
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, delay * 1000);
        this.#wakeUp = () => { clearTimeout(timer); resolve(); };
      });
      this.#wakeUp = undefined;
      if (this.#closing) return;
      try {
        const answer = await this.#establish();
        if (this.#closing) return;
        this.#connected(answer);
        return;
      } catch (failure) {
        error = failure instanceof NkError ? failure : new NkError("internal_error", String(failure));
      }
    }
  }

  // -- our requests --------------------------------------------------------------------------

  /**
   * Send a request; resolves with the ok answer's data (`{}` when it has none), rejects with
   * an NkError: the server's error, `timeout` (no answer or ack within `timeout` seconds),
   * or `connection_closed`. Before connect() and while (re)connecting, the request waits
   * for the connection (its timeout runs meanwhile) and is written right behind the login.
   * @param {string} cls
   * @param {string} cmd
   * @param {unknown} [data]
   * @param {{subclass?: string, timeout?: number}} [options]
   */
  request(cls, cmd, data, { subclass, timeout } = {}) {
    if (this.#state === "closed" || this.#closing) {
      return Promise.reject(new NkError("connection_closed", "The client is closed"));
    }
    const link = this.#link;
    if (link?.loginSent && !link.closed) return this.#call(link, cls, cmd, data, subclass, timeout);
    return new Promise((resolve, reject) => {
      const entry = this.#entry(cls, cmd, data, subclass, timeout, resolve, reject);
      this.#queue.push(entry);
    });
  }

  #entry(cls, cmd, data, subclass, timeout, resolve, reject) {
    const entry = { cls, cmd, data, subclass, timeout: timeout ?? this.#options.requestTimeout,
      resolve, reject, link: undefined, tid: undefined, timer: undefined };
    this.#arm(entry, entry.timeout);
    return entry;
  }

  /** (Re)start a request's deadline. */
  #arm(entry, seconds) {
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      this.#settle(entry, new NkError("timeout",
        `No answer to ${entry.cls}/${entry.cmd} within ${seconds} s`));
    }, seconds * 1000);
  }

  /** Write a request on a link now. */
  #call(link, cls, cmd, data, subclass, timeout) {
    return new Promise((resolve, reject) => {
      this.#write(link, this.#entry(cls, cmd, data, subclass, timeout, resolve, reject));
    });
  }

  #write(link, entry) {
    const tid = link.nextTid++;
    entry.link = link;
    entry.tid = tid;
    link.pending.set(tid, entry);
    const message = defined({ class: entry.cls, subclass: entry.subclass, cmd: entry.cmd, tid,
      data: entry.data });
    try {
      if (!link.write(message)) {
        this.#settle(entry, new NkError("connection_closed",
          `Connection closed: ${link.reason ?? "the connection is closing"}`));
      }
    } catch (error) { // data that JSON cannot carry (a BigInt, a cycle)
      this.#settle(entry, error);
    }
  }

  /** Write what waited for a connection, behind the login. */
  #flush(link) {
    for (const entry of this.#queue.splice(0)) this.#write(link, entry);
  }

  /** Resolve or reject a request once, and forget it wherever it waited. */
  #settle(entry, error, data) {
    if (entry.settled) return;
    entry.settled = true;
    clearTimeout(entry.timer);
    entry.link?.pending.delete(entry.tid);
    const queued = this.#queue.indexOf(entry);
    if (queued >= 0) this.#queue.splice(queued, 1);
    if (error) entry.reject(error); else entry.resolve(data);
  }

  // -- events ----------------------------------------------------------------------------------

  /**
   * Subscribe to events (§10). The handler gets each delivered event that matches the filter
   * (`"*"`, the default, matches any value). Replayed after a reconnect that was not resumed.
   * @param {import("./nkservice.js").SubscribeFilter} filter
   * @param {(event: object) => void} [handler]
   * @returns {Promise<import("./nkservice.js").Subscription>}
   */
  async subscribe(filter, handler) {
    const keys = defined({
      class: filter.class,
      subclass: filter.subclass ?? filter.obj ?? "*",
      type: filter.type ?? "*",
      obj_id: filter.obj_id ?? "*",
      service: filter.service,
      body: filter.body,
    });
    const subscriptions = this.#subscriptions;
    const client = this;
    const sub = {
      filter: Object.freeze(keys),
      handler,
      active: true,
      async unsubscribe() {
        if (!sub.active) return;
        sub.active = false;
        subscriptions.delete(sub);
        const key = keyOf(keys);
        if ([...subscriptions].some((other) => keyOf(other.filter) === key)) return;
        if (client.#state === "closed" || client.#state === "idle") return;
        const { body: _, ...unkeyed } = keys;
        await client.request("core", "unsubscribe", unkeyed, { subclass: "event" });
      },
    };
    // Listening before the answer: no event can be lost between the answer and our return.
    subscriptions.add(sub);
    try {
      await this.request("core", "subscribe", keys, { subclass: "event" });
    } catch (error) {
      sub.active = false;
      subscriptions.delete(sub);
      throw error;
    }
    return {
      get filter() { return sub.filter; },
      get active() { return sub.active; },
      unsubscribe: sub.unsubscribe,
    };
  }

  #deliver(event) {
    if (isObject(event) && typeof event.class === "string") {
      for (const sub of [...this.#subscriptions]) {
        if (sub.handler && matches(sub.filter, event, this.#options.service)) {
          this.#guard(() => sub.handler(event));
        }
      }
    }
    this.#emit("event", event);
  }

  // -- the server's requests -------------------------------------------------------------------

  /**
   * Answer the server's `cls`/`cmd` requests, whatever their subclass (`cmd` "*": any command
   * of the class). The handler returns (or resolves with) the answer's data, or throws an
   * NkError to answer it; a slow one gets the request acked. Returns a remover.
   * @param {string} cls
   * @param {string} cmd
   * @param {(data: any, request: object) => unknown} handler
   * @returns {() => void}
   */
  handle(cls, cmd, handler) {
    const key = `${cls}\0${cmd}`;
    this.#handlers.set(key, handler);
    return () => {
      if (this.#handlers.get(key) === handler) this.#handlers.delete(key);
    };
  }

  /**
   * Register this connection for a service's callbacks (§12): `login`, `subscribe`, `cmd`
   * (with `class`) or `event`. Registered again on every new connection. With a handler, it
   * also answers the callback requests (`core`/`api_server_<kind>`).
   * @param {"login" | "subscribe" | "cmd" | "event"} kind
   * @param {{class?: string, service?: string}} [options]
   * @param {(data: any, request: object) => unknown} [handler]
   */
  async registerCallback(kind, options = {}, handler) {
    const registration = defined({ callback: kind, class: options.class, service: options.service });
    if (handler) this.handle("core", `api_server_${kind}`, handler);
    await this.request("core", "register", registration, { subclass: "callback" });
    this.#registrations.set(JSON.stringify(registration), registration);
  }

  /** Undo a `registerCallback` with the same kind and options. */
  async unregisterCallback(kind, options = {}) {
    const registration = defined({ callback: kind, class: options.class, service: options.service });
    this.#registrations.delete(JSON.stringify(registration));
    await this.request("core", "unregister", registration, { subclass: "callback" });
  }

  /** Answer one request of the server. */
  #serve(link, request) {
    const { class: cls, cmd, tid } = request;
    const data = request.data ?? {};
    if (cls === "core" && cmd === "event") {
      this.#answer(link, tid); // answered first: the server's deadline is not our handlers'
      this.#deliver(data);
      return;
    }
    if (cls === "core" && cmd === "ping") this.#watch(link, data.time);
    const handler = this.#handlers.get(`${cls}\0${cmd}`) ?? this.#handlers.get(`${cls}\0*`);
    if (!handler) {
      if (cls === "core" && cmd === "ping") this.#answer(link, tid);
      else this.#answer(link, tid, undefined, new NkError("unknown_command", `Unknown command '${cmd}'`));
      return;
    }
    let result;
    try {
      result = handler(data, { class: cls, subclass: request.subclass, cmd, tid, data });
    } catch (error) {
      this.#answer(link, tid, undefined, this.#asError(error, request));
      return;
    }
    if (typeof result?.then !== "function") {
      this.#answer(link, tid, result);
      return;
    }
    // A slow handler: ack, so the server waits ack_timeout rather than request_timeout (§3).
    const { ackAfter, ackEvery } = this.#options;
    let timer = setTimeout(() => {
      link.acking.delete(timer);
      timer = setInterval(() => link.write({ ack: tid }), ackEvery * 1000);
      link.acking.add(timer);
      link.write({ ack: tid });
    }, ackAfter * 1000);
    link.acking.add(timer);
    const done = () => { clearTimeout(timer); clearInterval(timer); link.acking.delete(timer); };
    result.then(
      (reply) => { done(); this.#answer(link, tid, reply); },
      (error) => { done(); this.#answer(link, tid, undefined, this.#asError(error, request)); });
  }

  #asError(error, request) {
    if (error instanceof NkError) return error;
    this.#report(error);
    return new NkError("internal_error", `Internal error in the handler of ${request.class}/${request.cmd}`);
  }

  /** Answer a server request, unless its connection is gone (the server forgot it then). */
  #answer(link, tid, data, error) {
    const message = error
      ? { result: "error", tid, data: error.toAnswer() }
      : defined({ result: "ok", tid, data: data ?? undefined });
    try {
      link.write(message);
    } catch (failure) { // the handler's data could not be made JSON
      this.#report(failure);
      link.write({ result: "error", tid, data: new NkError("internal_error").toAnswer() });
    }
  }

  /**
   * The server pings every `time` seconds after login. If the pings stop for two intervals
   * and a bit, the network is gone even if the socket does not know yet (browsers give no
   * other way to tell): end the link, and reconnect.
   */
  #watch(link, interval) {
    clearTimeout(link.watchdog);
    if (typeof interval !== "number" || !(interval > 0)) return;
    const limit = interval * 2 + this.#options.requestTimeout;
    link.watchdog = setTimeout(() => {
      try { link.ws.close(1000); } catch { /* gone already */ }
      this.#lost(link, 1006, `no ping from the server for ${limit} s`);
    }, limit * 1000);
  }

  // -- input -----------------------------------------------------------------------------------

  /** One message from the server. Nothing it sends may throw out of here. */
  #received(link, raw) {
    if (link.closed) return;
    let message;
    try {
      const text = typeof raw === "string" ? raw : new TextDecoder().decode(raw);
      message = JSON.parse(text);
    } catch {
      this.#report(new NkError("invalid_json", `The server sent something that is not JSON: ${String(raw).slice(0, 200)}`));
      return;
    }
    try {
      this.#dispatch(link, message);
    } catch (error) {
      this.#report(error);
    }
  }

  #dispatch(link, message) {
    if (!isObject(message)) {
      this.#report(new NkError("invalid_message", "The server sent JSON that is not an object"));
    } else if ("class" in message && "cmd" in message && "tid" in message) {
      const { class: cls, cmd, subclass, tid } = message;
      if (typeof cls === "string" && typeof cmd === "string" && isTid(tid)
          && (subclass === undefined || typeof subclass === "string")) {
        this.#serve(link, message);
      } else if (isTid(tid)) {
        this.#answer(link, tid, undefined, new NkError("invalid_message"));
      } else {
        this.#report(new NkError("invalid_message", "The server sent a request without a usable tid"));
      }
    } else if ("result" in message && "tid" in message) {
      this.#answered(link, message);
    } else if ("ack" in message) {
      const entry = link.pending.get(message.ack);
      // An ack says "still working": the server's own limit is its ack_timeout (§3).
      if (entry) this.#arm(entry, Math.max(this.#options.ackTimeout, entry.timeout));
    } else {
      this.#report(new NkError("invalid_message", "The server sent a message of no known kind"));
    }
  }

  #answered(link, message) {
    const { result, tid, data } = message;
    if (tid === null) {
      // About no request of ours (§5): e.g. bytes of ours it could not read. The error is
      // all there is to say.
      this.#report(result === "error" ? NkError.fromAnswer(data)
        : new NkError("invalid_message", "The server answered with tid null"));
      return;
    }
    const entry = link.pending.get(tid);
    if (!entry) return; // already timed out, or never ours: nothing waits for it
    if (result === "ok") this.#settle(entry, undefined, data ?? {});
    else this.#settle(entry, NkError.fromAnswer(data));
  }

  // -- listeners -------------------------------------------------------------------------------

  /**
   * Listen to "connected", "disconnected", "reconnecting", "closed", "event" or "error".
   * @param {string} name
   * @param {(...args: any[]) => void} listener
   */
  on(name, listener) {
    if (!this.#listeners.has(name)) this.#listeners.set(name, new Set());
    this.#listeners.get(name).add(listener);
    return this;
  }

  /** Stop listening. */
  off(name, listener) {
    this.#listeners.get(name)?.delete(listener);
    return this;
  }

  #emit(name, value) {
    for (const listener of [...(this.#listeners.get(name) ?? [])]) this.#guard(() => listener(value));
  }

  /** Run a handler or listener; what it throws (or rejects with) is reported, never thrown. */
  #guard(run) {
    try {
      const result = run();
      if (typeof result?.then === "function") result.then(undefined, (error) => this.#report(error));
    } catch (error) {
      this.#report(error);
    }
  }

  /** Something went wrong that nobody awaits: tell the "error" listeners, or the console. */
  #report(error) {
    const listeners = [...(this.#listeners.get("error") ?? [])];
    if (listeners.length === 0) {
      console.warn("nkservice:", error);
      return;
    }
    for (const listener of listeners) {
      try { listener(error); } catch (failure) { console.error("nkservice: an error listener failed:", failure); }
    }
  }
}
