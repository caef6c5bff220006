"""picows behind one small door: the server protocol it is built from, and the RFC 6455 checks
it leaves out.

picows has no public way to serve a connection accepted elsewhere (on a shared tcp+ws port
the listener hands a connection over after sniffing its first bytes), so `server_protocol`
builds picows's internal `WSProtocol` the way `picows.ws_create_server` does. That call
depends on picows's private constructor: pyproject.toml pins picows to the versions it was
tested with, and tests/transport/test_picows_adapter.py checks it.

`GuardedProtocol` reads each frame header before picows parses it. picows parses one frame
ahead of the one it delivers, and answers a frame it dislikes with its own close frame, so
a close frame followed by another one in the same read was answered 1002 before the first
close reached the listener; a frame over the size limit was closed 1009 with no word. Here
picows is only given the bytes up to:

- a data frame over `max_frame_size`: its listener's `frame_too_large()` then says so
  (nkservice answers `message_too_large` first, PROTOCOL.md §1.4) — the frame is never read
  into memory;
- a frame with a reserved bit set (no extension is ever negotiated), a reserved opcode, an
  unmasked client frame, a fragmented or oversized control frame, or a length not in its
  shortest form: `fail(1002, reason)`, after the frames before it were handled;
- the end of the peer's first close frame: what follows is ignored (RFC 6455 §5.5.1).

The common frame (masked, no reserved bit, data opcode, length under 126 bytes) costs two
byte reads and two comparisons; the walk is per read, not per frame, once a frame's header
is behind (a large payload split over many reads costs nothing more).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from picows import WSCloseCode, WSListener, WSTransport, WSUpgradeRequest
from picows.picows import WSAutoPingStrategy, WSProtocol  # type: ignore[attr-defined]

ListenerFactory = Callable[[WSUpgradeRequest], "GuardedListener | None"]  # None → 404

HANDSHAKE_TIMEOUT = 5.0
# The read buffer grows on demand; a small start keeps idle connections cheap.
READ_BUFFER_INIT_SIZE = 1024
MAX_REASON = 123  # bytes of reason in a close frame (RFC 6455 §5.5: 125 with the code)

_HTTP, _FRAMES, _CLOSING, _STOPPED = range(4)  # GuardedProtocol._state
_INCOMPLETE, _STOP = -1, -2  # GuardedProtocol._header: no length yet / not for picows


def close_code_allowed(code: int) -> bool:
    """May a peer send this status code in a close frame (RFC 6455 §7.4)? 1004-1006 and 1015
    are reserved, 1016-2999 unassigned, 0-999 and ≥ 5000 not used."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_answer(payload_size: int, code: WSCloseCode | int) -> tuple[WSCloseCode, bytes]:
    """The close frame that answers a peer's close frame (whose reason picows already checked
    for UTF-8): its own code echoed, 1000 for a close without one (never code 0 on the wire),
    1002 for a code nobody may send."""
    if payload_size < 2:
        return WSCloseCode.OK, b""
    number: int = code.value if isinstance(code, WSCloseCode) else code
    if close_code_allowed(number):
        return WSCloseCode(number), b""  # picows's enum takes any value
    return WSCloseCode.PROTOCOL_ERROR, b"invalid close code %d" % number


def close_reason(reason: str) -> bytes:
    """`reason` as a close frame can carry it: UTF-8 cut to 123 bytes between characters."""
    data = reason.encode()
    if len(data) <= MAX_REASON:
        return data
    return data[:MAX_REASON].decode("utf-8", "ignore").encode()


class GuardedListener(WSListener):
    """A picows listener that `GuardedProtocol` can tell about frames it stopped."""

    def frame_too_large(self, transport: WSTransport) -> None:
        """A data frame over the size limit arrived (its payload is not read). Not called
        once a close frame was sent."""
        self.fail(transport, WSCloseCode.MESSAGE_TOO_BIG, "message too large")

    def fail(self, transport: WSTransport, code: WSCloseCode, reason: str) -> None:
        """Fail the WebSocket connection (RFC 6455 §7.1.7)."""
        if not transport.is_close_frame_sent:
            transport.send_close(code, close_reason(reason))
        transport.disconnect()


class _Detached(asyncio.BufferedProtocol):
    """In a finished TLS connection, the place of its WebSocket protocol (nothing comes)."""

    def get_buffer(self, sizehint: int) -> bytearray:
        return bytearray(1)

    def buffer_updated(self, nbytes: int) -> None:
        pass


_DETACHED = _Detached()
_get_buffer = WSProtocol.get_buffer
_buffer_updated = WSProtocol.buffer_updated


def _not_a_stream_protocol(data: bytes) -> None:
    raise RuntimeError("GuardedProtocol is a buffered protocol: data_received is never called")


class GuardedProtocol(WSProtocol):  # type: ignore[misc]  # picows has no stubs for it
    """picows's server protocol, given only the bytes that are safe for it (see the module's
    docstring). Construct it with `server_protocol`."""

    __slots__ = ("_fast_b1", "_head", "_limit", "_problem", "_skip", "_state", "_tail")

    # Never called (uvloop and asyncio call get_buffer and buffer_updated), but looked up:
    # handed over by the sniffer of a shared port (`transport.set_protocol`), uvloop keeps
    # the `data_received` of the protocol before unless the new one has one, and so the
    # sniffer with its transport (a cycle) and its timer, for as long as the connection
    # lasts. A plain function, so that looking it up makes no bound method either.
    data_received = staticmethod(_not_a_stream_protocol)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # the listener's on_ws_disconnected
        transport = self.transport
        if transport is not None and transport.is_secure:
            # uvloop's SSLProtocol keeps this protocol's get_buffer and buffer_updated (bound
            # methods) once the connection is lost, and picows's transport keeps the TLS
            # transport (its `underlying_transport`), which keeps the SSLProtocol: a cycle
            # that only the garbage collector would free. It gets a stand-in instead.
            transport.underlying_transport.set_protocol(_DETACHED)

    def _guard(self, max_frame_size: int) -> None:
        self._limit = max_frame_size
        # A header byte 2 up to this one is the common frame: masked, length < 126 and
        # within the limit.
        self._fast_b1 = 0x80 + min(125, max_frame_size)
        self._state = _HTTP
        self._tail = b""  # the last bytes of the HTTP request seen so far (for its end)
        self._head = b""  # a frame header cut by the end of a read
        self._skip = 0  # payload bytes of the current frame still to come
        self._problem: tuple[WSCloseCode, str] | None = None

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state == _FRAMES:
            skip = self._skip
            if skip >= nbytes:  # more of a payload whose header came before
                self._skip = skip - nbytes
                _buffer_updated(self, nbytes)
                return
            passed = self._frames(_get_buffer(self, -1), skip, nbytes)
        elif state == _HTTP:
            passed = self._request(nbytes)
        elif state == _CLOSING:  # the rest of the peer's close frame, then nothing
            passed = min(self._skip, nbytes)
            self._skip -= passed
            if not self._skip:
                self._state = _STOPPED
        else:
            return  # after the peer's close or a failure: ignored
        if passed:
            _buffer_updated(self, passed)
        if self._problem is not None:
            self._stopped()

    def _request(self, nbytes: int) -> int:
        """Before the upgrade: pass the HTTP request on, and walk the frames after its end."""
        view = _get_buffer(self, -1)
        data = self._tail + bytes(view[:nbytes])
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self._tail = data[-3:]
            return nbytes
        self._tail = b""
        self._state = _FRAMES
        start = end + 4 - (len(data) - nbytes)  # where the first frame starts in the view
        return self._frames(view, start, nbytes)

    def _frames(self, view: Any, pos: int, end: int) -> int:
        """Walk the frame headers in view[pos:end], pos being where one starts. Returns how
        many bytes of view[:end] picows may parse."""
        if self._head:
            pos = self._cut_header(view, end)
            if pos < 0:
                return 0 if pos == _STOP else end
            if self._state != _FRAMES:
                return self._close_at(pos, end)
        fast_b1 = self._fast_b1
        last = end - 1  # a header needs 2 bytes: one starting here is cut
        while pos < last:
            b1 = view[pos + 1]
            if view[pos] & 0x7F > 2 or not 0x80 <= b1 <= fast_b1:
                after = self._header(view, pos, end)
                if after < 0:
                    if after == _STOP:
                        return pos
                    self._head = bytes(view[pos:end])
                    return end
                if self._state != _FRAMES:
                    return self._close_at(after, end)
                pos = after
            else:
                pos += b1 - 122  # 2 header bytes, 4 of mask, b1 - 0x80 of payload
        if pos == last:
            self._head = bytes(view[pos:end])
        else:
            self._skip = pos - end
        return end

    def _cut_header(self, view: Any, end: int) -> int:
        """The header that began in the previous read: where its frame ends in this view,
        or _INCOMPLETE / _STOP."""
        head = self._head
        data = head + bytes(view[:min(end, 14)])
        after = self._header(data, 0, len(data))
        if after == _INCOMPLETE:
            self._head = data
            return _INCOMPLETE
        self._head = b""
        if after == _STOP:
            return _STOP
        return after - len(head)

    def _close_at(self, after: int, end: int) -> int:
        """The peer's close frame ends at `after`: picows gets it, and nothing after it."""
        if after > end:
            self._skip = after - end
            return end
        self._state = _STOPPED
        return after

    def _header(self, buf: Any, pos: int, end: int) -> int:
        """Check the frame header at buf[pos:end] (two bytes at least): the position after
        its frame, _INCOMPLETE if the length has not all come, or _STOP (`_problem` says
        why). A close frame sets the state to _CLOSING."""
        if end - pos < 2:
            return _INCOMPLETE
        b0 = buf[pos]
        b1 = buf[pos + 1]
        size = b1 & 0x7F
        header = 2
        if size == 126:
            if end - pos < 4:
                return _INCOMPLETE
            size = buf[pos + 2] << 8 | buf[pos + 3]
            header = 4
            if size < 126:
                return self._protocol_error("a 16-bit length under 126")
        elif size == 127:
            if end - pos < 10:
                return _INCOMPLETE
            size = int.from_bytes(bytes(buf[pos + 2:pos + 10]), "big")
            header = 10
            if size < 1 << 16 or size >> 63:
                return self._protocol_error("a 64-bit length under 65536 or over 2^63")
        if not b1 & 0x80:
            return self._protocol_error("an unmasked frame from the client")
        if b0 & 0x70:
            return self._protocol_error("reserved bits set with no extension negotiated")
        opcode = b0 & 0x0F
        if opcode < 3:
            if size > self._limit:
                self._problem = (WSCloseCode.MESSAGE_TOO_BIG, "")
                return _STOP
        elif opcode < 8 or opcode > 10:
            return self._protocol_error(f"reserved opcode {opcode:#x}")
        elif not b0 & 0x80 or size > 125:
            return self._protocol_error("a fragmented control frame or one over 125 bytes")
        elif opcode == 8:
            self._state = _CLOSING
        end_of_frame: int = pos + header + 4 + size
        return end_of_frame

    def _protocol_error(self, what: str) -> int:
        self._problem = (WSCloseCode.PROTOCOL_ERROR, what)
        return _STOP

    def _stopped(self) -> None:
        """picows has had the frames before the bad one: now fail the connection."""
        assert self._problem is not None
        code, reason = self._problem
        self._problem = None
        self._state = _STOPPED
        listener = self.listener
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if isinstance(listener, GuardedListener):
            if code == WSCloseCode.MESSAGE_TOO_BIG and not transport.is_close_frame_sent:
                listener.frame_too_large(transport)
            else:
                listener.fail(transport, code, reason)
        else:  # the upgrade was refused (404): picows is closing the connection already
            transport.disconnect()


def server_protocol(route: ListenerFactory, max_frame_size: int,
                    logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
                    ) -> asyncio.BufferedProtocol:
    """A server-side protocol for one connection: `route` picks the listener of an upgrade
    request (None: 404); data frames over `max_frame_size` go to `frame_too_large`.

    WebSocket-level pings are neither sent nor answered by picows (the listener answers them,
    so that its writes stay in order), and an exception in a listener closes the connection
    with 1011."""
    protocol: GuardedProtocol = GuardedProtocol(
        None,  # host and port: a client's
        None,  # path: a client's
        False,  # is_client_side
        route,
        logger,
        True,  # disconnect_on_exception
        HANDSHAKE_TIMEOUT,
        False, 20.0, 20.0, WSAutoPingStrategy.PING_WHEN_IDLE,  # auto-ping: off
        False,  # enable_auto_pong
        max_frame_size,  # picows's own limit: never reached, frames are checked before it
        None,  # extra response headers
        READ_BUFFER_INIT_SIZE,
    )
    protocol._guard(max_frame_size)
    return protocol
