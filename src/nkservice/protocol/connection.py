"""The state of one connection, with no I/O (PROTOCOL.md §1).

`Connection` is fed whole messages (`receive`) and clock ticks (`on_timer`); it writes bytes,
asks to be woken and asks to be closed through the `Wire` it is given, and hands requests
to its `RequestHandler`. It owns what the protocol itself fixes:

- the two pending tables: client requests the server still has to answer (a count, for
  `max_pending_requests`) and server requests waiting for the client's answer, keyed by the
  server's own integer tids, so a client tid can never collide with a server tid. Events,
  the bulk of server requests, are kept apart as bare deadlines: a fan-out to 10,000
  sessions would otherwise leave 10,000 objects for the garbage collector to walk;
- deadlines: `request_timeout` for each server request, moved to `ack_timeout` by every ack,
  the login deadline, and the ping timer after login. A missed deadline closes the
  connection. There is one wake-up time per connection, not a timer per request: adding a
  request only moves it earlier; acks and answers leave it, and a wake-up that finds
  nothing due just computes the next one;
- the bad-input rules of §1.4, and the slow-consumer rule of §5.2;
- saying why: every close it decides carries a `Goodbye`, the reason in words with the
  WebSocket close code and the last NDJSON line for tcp/tls (§1.3).

Tests drive it with a fake clock and a recording `Wire`; transports drive it with the
event loop's clock and a socket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.messages import (
    Ack,
    BadMessage,
    Request,
    Response,
    Tid,
    decode,
    encode_ack,
    encode_error,
    encode_ok,
    encode_request,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-connection settings of a service (PROTOCOL.md §11), in seconds and bytes."""

    request_timeout: float = 5.0
    ack_timeout: float = 180.0
    ping_interval: float = 60.0
    login_timeout: float = 30.0
    max_message_size: int = 1 << 20
    max_pending_requests: int = 1000
    max_bad_messages: int = 20
    max_queue: int = 1000  # messages produced but not yet handed to the socket…
    max_queue_bytes: int = 16 * 1024 * 1024  # …or their bytes: over either, a slow consumer
    max_unanswered_events: int = 10_000  # events written, their answers not yet received


class CloseCode(IntEnum):
    """Why the server ends a connection, as a WebSocket close code (RFC 6455 §7.4.1)."""

    normal = 1000  # a deadline missed, a session stopped or replaced
    going_away = 1001  # the node or the service is stopping
    policy = 1008  # a slow consumer, too many bad messages or failed logins
    too_large = 1009  # a message over max_message_size


@dataclass(frozen=True, slots=True)
class Goodbye:
    """What the peer is told when the server ends its connection (§1.3): WebSocket sends
    `code` and `reason` in its close frame; newline JSON writes `line` last."""

    code: CloseCode
    reason: str

    @property
    def line(self) -> bytes:
        return encode_error(None, ApiError(ErrorCode.connection_closed, self.reason))


class Wire(Protocol):
    """What a connection needs from its transport."""

    def send(self, data: bytes) -> None:
        """Write one message (the transport adds framing)."""

    def close(self, goodbye: Goodbye) -> None:
        """Flush what was sent, tell the peer why, then end the connection."""

    def wake_at(self, when: float) -> None:
        """Call `Connection.on_timer` at `when`, instead of any earlier-requested time."""

    def backlog(self) -> int:
        """Bytes sent but not yet handed to the network (the peer reads too slowly)."""


class Waiter(Protocol):
    """Whoever waits for the answer to a request the server sent."""

    def answered(self, response: Response) -> None: ...

    def acked(self) -> None: ...

    def failed(self, error: ApiError) -> None: ...


class RequestHandler(Protocol):
    def on_request(self, request: Request) -> None:
        """Handle a client request; answer it later with `reply`, `reply_error` (and `ack`)."""

    def on_closed(self) -> None:
        """The connection is gone, whichever side ended it."""


_OK_PREFIX = b'{"result":"ok","tid":'
_OK_END = len(_OK_PREFIX)
_OK_MAX = _OK_END + 20  # room for any tid the server hands out


class _Gone:
    """The handler of a connection that has ended: nothing reaches it any more."""

    def on_request(self, request: Request) -> None:
        pass

    def on_closed(self) -> None:
        pass


_GONE = _Gone()


class _Sent:
    __slots__ = ("deadline", "waiter")

    def __init__(self, deadline: float, waiter: Waiter | None) -> None:
        self.deadline = deadline
        self.waiter = waiter


class Connection:
    __slots__ = (
        "_bad_messages",
        "_clock",
        "_end_error",
        "_events",
        "_last_backlog",
        "_login_deadline",
        "_next_ping",
        "_next_tid",
        "_queued",
        "_sent",
        "_unanswered",
        "_wake",
        "_wire",
        "closed",
        "end_reason",
        "handler",
        "limits",
    )

    def __init__(self, limits: Limits, wire: Wire, clock: Callable[[], float],
                 handler: RequestHandler) -> None:
        self.limits = limits
        self.handler = handler
        self.closed = False
        self.end_reason: str | None = None  # why this side ended it (None: the peer left)
        self._wire = wire
        self._clock = clock
        self._next_tid = 1
        self._sent: dict[int, _Sent] = {}
        # tid → (deadline, data) of each event written and not yet answered: the data is
        # what a resumed session gets again if this connection ends first.
        self._events: dict[int, tuple[float, bytes]] = {}
        self._unanswered = 0
        self._queued = 0  # messages sent since the transport's buffer last drained
        self._last_backlog = 0
        self._bad_messages = 0
        self._next_ping: float | None = None
        self._wake: float | None = None
        self._end_error = ErrorCode.session_not_found
        self._login_deadline: float | None = clock() + limits.login_timeout
        self._want_wake(self._login_deadline)

    # -- input ---------------------------------------------------------------------------

    def receive(self, raw: bytes) -> None:
        """One whole message from the peer (framing already removed)."""
        if self.closed:
            return
        if len(raw) > self.limits.max_message_size:
            self.message_too_large()
            return
        if len(raw) < _OK_MAX and raw.startswith(_OK_PREFIX) and raw.endswith(b"}"):
            # {"result":"ok","tid":N}, the answer to each event delivered: no JSON parsing.
            digits = raw[_OK_END:-1]
            if digits.isdigit() and (digits[0] != 0x30 or len(digits) == 1):  # JSON: no 007
                self._take_answer(int(digits), None)
                return
        try:
            message = decode(raw)
        except BadMessage as bad:
            self._bad_input(bad)
            return
        if type(message) is Request:
            if self._unanswered >= self.limits.max_pending_requests:
                self._wire.send(encode_error(message.tid, ApiError(ErrorCode.too_many_requests)))
                return
            self._unanswered += 1
            self.handler.on_request(message)
        elif type(message) is Response:
            if type(message.tid) is int:
                self._take_answer(message.tid, message)
            else:
                log.debug("ignoring a response to unknown tid %r", message.tid)
        else:
            assert type(message) is Ack
            tid = message.tid
            deadline = self._clock() + self.limits.ack_timeout
            if type(tid) is int and (event := self._events.get(tid)) is not None:
                self._events[tid] = (deadline, event[1])
                return
            sent = self._sent.get(tid) if type(tid) is int else None
            if sent is None:
                log.debug("ignoring an ack of unknown tid %r", tid)
                return
            sent.deadline = deadline
            if sent.waiter is not None:
                sent.waiter.acked()

    def _take_answer(self, tid: int, response: Response | None) -> None:
        """The answer to server request `tid`; None is the plain ok, read without decoding."""
        if self._events.pop(tid, None) is not None:
            if response is not None and not response.ok:  # some clients answer events so
                log.debug("error answer to event %d: %r", tid, response.data)
            return
        sent = self._sent.pop(tid, None)
        if sent is None:
            log.debug("ignoring a response to unknown tid %r", tid)
        elif sent.waiter is not None:
            sent.waiter.answered(response or Response(tid, True))

    def message_too_large(self) -> None:
        """The transport saw a message over the limit: answer, then close (§1.4)."""
        if not self.closed:
            self._wire.send(encode_error(None, ApiError(ErrorCode.message_too_large)))
            self.close("message too large", CloseCode.too_large)

    def _bad_input(self, bad: BadMessage) -> None:
        self._wire.send(encode_error(bad.tid, ApiError(bad.error)))
        self._bad_messages += 1
        if self._bad_messages > self.limits.max_bad_messages:
            self.close("too many bad messages", CloseCode.policy)

    # -- answering client requests ---------------------------------------------------------

    # Answers count in the outgoing queue too: a client that sends and never reads would
    # otherwise grow the server's buffers without end.

    def reply(self, tid: Tid, data: Any = None) -> None:
        self._request_done()
        if not self._blocked():
            self._wire.send(encode_ok(tid, data))

    def reply_error(self, tid: Tid, error: ApiError) -> None:
        self._request_done()
        if not self._blocked():
            self._wire.send(encode_error(tid, error))

    def ack(self, tid: Tid) -> None:
        if not self._blocked():
            self._wire.send(encode_ack(tid))

    def _request_done(self) -> None:
        if self._unanswered > 0:
            self._unanswered -= 1

    # -- requests to the client ------------------------------------------------------------

    def send_request(self, class_: str, cmd: str, data: Any = None, *,
                     subclass: str | None = None, waiter: Waiter | None = None) -> int:
        """Send a request the client must answer within `request_timeout` (or acks)."""
        if self._blocked():
            if waiter is not None:
                waiter.failed(ApiError(ErrorCode.session_not_found, "connection closed"))
            return 0
        tid = self._expect_answer(waiter)
        self._wire.send(encode_request(tid, class_, cmd, data, subclass))
        return tid

    def send_event(self, data: bytes) -> None:
        """Deliver an event (§5.2): a `core`/`event` request whose `data` is encoded already,
        once for all its receivers."""
        if self._blocked():
            return
        limits = self.limits
        if len(self._events) >= limits.max_unanswered_events:
            log.info("closing a connection with %d events unanswered", len(self._events))
            self.close("too many unanswered events", CloseCode.policy,
                       waiters_get=ErrorCode.timeout)
            return
        tid = self._next_tid
        self._next_tid += 1
        deadline = self._clock() + limits.request_timeout
        self._events[tid] = (deadline, data)
        self._want_wake(deadline)
        self._wire.send(b'{"class":"core","cmd":"event","tid":%d,"data":%b}' % (tid, data))

    def _blocked(self) -> bool:
        """Nothing more may be sent: closed, or a slow consumer (§5.2), closed here: its
        outgoing queue is over `max_queue` messages or `max_queue_bytes`. The transport
        reports bytes only once its buffer is over the high-water mark (it sends at once
        below that); from then on, what is sent counts as queued until the buffer is seen
        shrinking (the client reads)."""
        if self.closed:
            return True
        backlog = self._wire.backlog()
        if not backlog:
            self._queued = self._last_backlog = 0
            return False
        if backlog < self._last_backlog:
            self._queued = 0
        self._last_backlog = backlog
        self._queued += 1
        if self._queued <= self.limits.max_queue and backlog <= self.limits.max_queue_bytes:
            return False
        log.info("closing a slow consumer: %d messages, %d bytes not yet sent", self._queued,
                 backlog)
        self.close("slow consumer", CloseCode.policy)
        return True

    def _expect_answer(self, waiter: Waiter | None) -> int:
        """A new server tid, in the table of requests the client must answer in time."""
        tid = self._next_tid
        self._next_tid += 1
        deadline = self._clock() + self.limits.request_timeout
        self._sent[tid] = _Sent(deadline, waiter)
        self._want_wake(deadline)
        return tid

    # -- time --------------------------------------------------------------------------------

    def logged_in(self) -> None:
        """Stop the login deadline and start the pings (§1.3)."""
        self._login_deadline = None
        interval = self.limits.ping_interval
        if interval > 0:
            self._next_ping = self._clock() + interval
            self._want_wake(self._next_ping)

    def apply_limits(self, limits: Limits) -> None:
        """The service's settings changed: they apply from now on. What is already waiting
        keeps its deadline; a logged-in connection's next ping comes one new interval from
        now (or never, at 0)."""
        interval_changed = limits.ping_interval != self.limits.ping_interval
        self.limits = limits
        if interval_changed and self._login_deadline is None and not self.closed:
            interval = limits.ping_interval
            self._next_ping = self._clock() + interval if interval > 0 else None
            if self._next_ping is not None:
                self._want_wake(self._next_ping)

    def on_timer(self) -> None:
        self._wake = None
        if self.closed:
            return
        now = self._clock()
        if self._login_deadline is not None and now >= self._login_deadline:
            self.close("login timeout")
            return
        if self._next_ping is not None and now >= self._next_ping:
            interval = self.limits.ping_interval
            self._next_ping = now + interval
            self.send_request("core", "ping", {"time": interval})
        deadlines = [sent.deadline for sent in self._sent.values()]
        if self._events:
            deadlines.append(min(deadline for deadline, _ in self._events.values()))
        if deadlines and min(deadlines) <= now:
            self.close("request timeout", waiters_get=ErrorCode.timeout)
            return
        for when in (self._login_deadline, self._next_ping):
            if when is not None:
                deadlines.append(when)
        if deadlines:
            self._want_wake(min(deadlines))

    def _want_wake(self, when: float) -> None:
        if self._wake is None or when < self._wake:
            self._wake = when
            self._wire.wake_at(when)

    # -- the end -----------------------------------------------------------------------------

    def close(self, reason: str, code: CloseCode = CloseCode.normal, *,
              waiters_get: ErrorCode = ErrorCode.session_not_found) -> None:
        """End the connection from this side, telling the peer why; whatever waited on the
        client fails."""
        if not self.closed:
            self._end_error = waiters_get
            self.end_reason = reason
            self._wire.close(Goodbye(code, reason))
            self.lost()

    def unanswered_events(self) -> list[bytes]:
        """The data of the events written and not answered, oldest first: when the
        connection has ended, the client may never have seen them."""
        return [data for _, data in self._events.values()]

    def lost(self) -> None:
        """The transport is gone (or `close` was called): fail waiters, tell the handler."""
        if self.closed:
            return
        self.closed = True
        sent, self._sent = self._sent, {}
        for entry in sent.values():
            if entry.waiter is not None:
                entry.waiter.failed(ApiError(self._end_error, "connection closed"))
        # The handler (a Session) points back at this connection: let go of it, or the
        # pair is a reference cycle that only the garbage collector frees.
        handler, self.handler = self.handler, _GONE
        handler.on_closed()
