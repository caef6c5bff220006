// Type declarations of nkservice.js, the JavaScript client of the nkservice External API.
// The protocol is described in docs/protocol.md; section numbers (§) below refer to it.

/** The error names of the protocol (docs/protocol.md §14), plus any name a peer may send. */
export type NkErrorCode =
  | "internal_error" | "timeout" | "not_implemented" | "service_not_found"
  | "service_already_exists" | "unauthorized" | "not_authenticated" | "already_authenticated"
  | "user_not_found" | "duplicated_session_id" | "invalid_session_id" | "invalid_password"
  | "invalid_operation" | "unknown_command" | "syntax_error" | "missing_field" | "invalid_value"
  | "invalid_reply" | "unknown_class" | "session_not_found" | "invalid_json" | "invalid_message"
  | "message_too_large" | "too_many_requests" | "service_unavailable" | "too_many_subscriptions"
  | "connection_closed"
  | (string & {});

/**
 * An error answer, or a failure the client saw itself. The client's own failures use the same
 * names: `"timeout"` (no answer or ack in time), `"connection_closed"` (not connected, or the
 * connection ended before the answer), `"invalid_reply"` (a login answer without a session id).
 */
export class NkError extends Error {
  /**
   * @param code an error name (`"unauthorized"`) or number (`100030`)
   * @param message the text; defaults to the protocol's text of that code
   * @param data anything more to keep with the error
   */
  constructor(code: NkErrorCode | number, message?: string, data?: unknown);
  /** The error's name, e.g. `"unauthorized"` (or `"error_<number>"` for a number not in §14). */
  readonly code: NkErrorCode;
  /** The error's number, e.g. `100030`; undefined for a name the protocol does not list. */
  readonly number: number | undefined;
  /** For an error answer: its `data`, `{code: <number>, error: <text>}`. */
  readonly data: unknown;
  /** Every error name of §14 with its number. */
  static readonly codes: Readonly<Record<string, number>>;
  /** The NkError of an error answer's data (`{code: <number>, error: <text>}`). */
  static fromAnswer(data: unknown): NkError;
  /** The data of the error answer that says this error: `{code: number, error: message}`. */
  toAnswer(): { code: number; error: string };
}

/** A WebSocket constructor as in browsers (and Node 22+, or Node 20 with --experimental-websocket). */
export interface WebSocketLike {
  readonly readyState: number;
  /** Set to "arraybuffer" by the client (the server sends text frames; binary is read too). */
  binaryType?: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  // Set by the client: open, message ({data}), close ({code, reason}), error.
  onopen: any;
  onmessage: any;
  onclose: any;
  onerror: any;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface NkClientOptions {
  /** The login's `user`. */
  user?: string;
  /** The login's `password`. */
  password?: string;
  /**
   * The name of the service the URL leads to. Events of the session's own service arrive
   * without a `service` field: knowing the name lets a subscription that names it
   * (`{service: "demo", ...}`) match them. Without it, leave `service` out of subscriptions
   * to the session's own service.
   */
  service?: string;
  /** The login's `meta` (any JSON), kept with the session. */
  meta?: unknown;
  /**
   * A chosen session id (§8), e.g. a stable device id. Without it the first login's id is
   * used. Every reconnect logs in with that id again, so the server takes the session over,
   * or resumes it when the service has `resume_window` set.
   */
  sessionId?: string;
  /** More fields merged into the login request's data. */
  login?: Record<string, unknown>;
  /** Reconnect after a lost connection (default true). */
  reconnect?: boolean;
  /** Reconnect delays in seconds: full-jitter exponential backoff (defaults 0.1 and 10). */
  backoff?: { initial?: number; max?: number };
  /** Seconds to wait for an answer or ack to a request (default 5). */
  requestTimeout?: number;
  /** Seconds an ack from the server extends a request's deadline by, at least (default 180). */
  ackTimeout?: number;
  /** Seconds before a still-running handler's request is acked, then every `ackEvery` (0.5, 60). */
  ackAfter?: number;
  ackEvery?: number;
  /** Seconds to open the WebSocket (default: `requestTimeout`). */
  connectTimeout?: number;
  /** The WebSocket constructor (default: `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
}

/** The data of a successful login answer. */
export interface LoginAnswer {
  session_id: string;
  user: string;
  /** true when the server resumed a parked session (§8): it kept the subscriptions. */
  resumed?: boolean;
  [field: string]: unknown;
}

/** An event as the server delivers it (§10.2): fields that are `"*"` are left out. */
export interface NkEvent {
  class: string;
  subclass?: string;
  type?: string;
  obj_id?: string;
  body?: unknown;
  /** Only when the event belongs to another service than the session's. */
  service?: string;
  /** The seed's alias of subclass (sessions logged in with the seed form). */
  obj?: string;
  [field: string]: unknown;
}

/** What to subscribe to (§10.1): `"*"` (the default) in a field matches any value. */
export interface SubscribeFilter {
  class: string;
  subclass?: string;
  /** The seed's name of `subclass`. */
  obj?: string;
  type?: string;
  obj_id?: string;
  /** Another service's events (global admin only); leave it out for the session's own. */
  service?: string;
  /** A body merged under the events' bodies by the server. */
  body?: unknown;
}

export type EventHandler = (event: NkEvent) => void | Promise<void>;

export interface Subscription {
  /** The subscription's keys, wildcards filled in. */
  readonly filter: Readonly<Required<Pick<SubscribeFilter, "class" | "subclass" | "type" | "obj_id">>> &
    Readonly<Pick<SubscribeFilter, "service" | "body">>;
  /** false once unsubscribed. */
  readonly active: boolean;
  /** Stop receiving; the server is told unless another subscription has the same keys. */
  unsubscribe(): Promise<void>;
}

/** A request the server sent us (a forwarded session command, a callback, a ping). */
export interface NkRequest {
  class: string;
  subclass?: string;
  cmd: string;
  tid: number | string;
  data: any;
}

/**
 * Answers one kind of server request: returns (or resolves with) the ok answer's data, or
 * throws an `NkError` to answer that error (anything else thrown answers `internal_error`).
 */
export type RequestHandler = (data: any, request: NkRequest) => unknown;

export type CallbackKind = "login" | "subscribe" | "cmd" | "event";

export type NkClientState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

export interface NkClientEvents {
  /** Logged in, at connect and after each reconnect. */
  connected: (login: LoginAnswer) => void;
  /** A connection ended; `reason` is what the server said in its close frame, if anything. */
  disconnected: (info: { code: number; reason: string }) => void;
  /** Waiting `delay` seconds before try number `attempt`; `error` is why the last one failed. */
  reconnecting: (info: { attempt: number; delay: number; error?: NkError }) => void;
  /** Done for good: `close()`, or a lost connection without `reconnect`. */
  closed: (info: { reason: string }) => void;
  /** Every event the server delivers, whether or not a subscription handler matched it. */
  event: (event: NkEvent) => void;
  /** A handler or listener threw, or the server sent something unusable (never thrown). */
  error: (error: unknown) => void;
}

export class NkClient {
  /**
   * @param url a ws:// or wss:// URL of a service, e.g. "ws://127.0.0.1:9010/"
   */
  constructor(url: string, options?: NkClientOptions);
  readonly url: string;
  /** The session id, once logged in (kept across reconnects). */
  readonly sessionId: string | undefined;
  /** The user the server logged us in as. */
  readonly user: string | undefined;
  readonly state: NkClientState;

  /**
   * Open the connection and log in; resolves with the login answer's data. Requests made
   * before the answer are written right behind the login. Rejects (and the client is
   * `"closed"`) when the first connection or login fails; `connect()` may be called again.
   */
  connect(): Promise<LoginAnswer>;

  /**
   * Send a request; resolves with the ok answer's data (`{}` when it has none), rejects with
   * an `NkError`. Before connect() and while (re)connecting, the request waits for the
   * connection (its timeout runs) and is written right behind the login.
   */
  request<T = any>(cls: string, cmd: string, data?: unknown,
                   options?: { subclass?: string; timeout?: number }): Promise<T>;

  /** Subscribe (§10); the handler gets every event matching the filter. Replayed after a fresh login. */
  subscribe(filter: SubscribeFilter, handler?: EventHandler): Promise<Subscription>;

  /**
   * Answer the server's `cls`/`cmd` requests (any subclass); `cmd` `"*"` matches any command
   * of the class. Returns a function that removes the handler. Without a handler the client
   * answers `unknown_command`; pings and events are answered ok by itself (a `core`/`ping`
   * handler may watch the pings).
   */
  handle(cls: string, cmd: string, handler: RequestHandler): () => void;

  /**
   * Register this connection for a service's callbacks (§12); registered again after every
   * reconnect. With `handler`, it also becomes the handler of `core`/`api_server_<kind>`.
   */
  registerCallback(kind: CallbackKind, options?: { class?: string; service?: string },
                   handler?: RequestHandler): Promise<void>;
  unregisterCallback(kind: CallbackKind, options?: { class?: string; service?: string }): Promise<void>;

  on<K extends keyof NkClientEvents>(name: K, listener: NkClientEvents[K]): this;
  off<K extends keyof NkClientEvents>(name: K, listener: NkClientEvents[K]): this;

  /** Close the connection (close frame 1000), stop reconnecting; pending requests reject. */
  close(): Promise<void>;
}
