// A WebSocket that keeps what goes through it, for tests that look at the wire.

/**
 * `options.WebSocket` for an NkClient: `wire.sockets` are the sockets it opened, `wire.sent`
 * and `wire.received` the messages (parsed when JSON) in both directions, `wire.log` both in
 * order as `[">", message]` (sent) and `["<", message]` (received).
 */
export function recordingWebSocket() {
  const wire = { sockets: [], sent: [], received: [], log: [] };
  const parse = (text) => {
    try { return JSON.parse(text); } catch { return text; }
  };
  wire.WebSocket = class extends globalThis.WebSocket {
    constructor(url) {
      super(url);
      wire.sockets.push(this);
      this.addEventListener("message", (event) => {
        const message = parse(event.data);
        wire.received.push(message);
        wire.log.push(["<", message]);
      });
    }

    send(data) {
      wire.sent.push(parse(data));
      wire.log.push([">", parse(data)]);
      super.send(data);
    }
  };
  /** Send raw text on the newest socket, past the client. */
  wire.raw = (text) => globalThis.WebSocket.prototype.send.call(wire.sockets.at(-1), text);
  return wire;
}
