"""The `ws` and `wss` transports: one message per WebSocket frame (PROTOCOL.md §2), on picows.

picows parses frames in C and hands each one to a `WSListener`; `MessageListener` joins
fragmented messages, applies the size limit and the text UTF-8 rule of §1.4, answers close
frames, and passes whole messages to the `Connection`. Other HTTP requests get a plain 404.
Frame headers are checked before picows sees them (`picows_adapter.GuardedProtocol`): a frame
over the size limit gets the protocol's `message_too_large` answer without being read.

picows writes every frame it is given with its own system call. Frames are instead built
here and written together: the answers to the frames of one read at its end, and what is
sent outside a read (events, callback requests, answers that came later) at the end of the
turn of the event loop. A pipelining client costs one call per read, a fan-out one call per
receiver, not one per message. That needs every frame of a read to reach the listener
(`last_in_buffer` marks the end), so pings are answered here rather than by picows.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from collections.abc import Callable, Collection
from typing import cast

from multidict import CIMultiDict, CIMultiDictProxy
from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport, WSUpgradeRequest

from nkservice.protocol.connection import Connection, Goodbye
from nkservice.protocol.framing import FragmentAssembler, MessageTooLarge
from nkservice.transport.base import Accept, WakeUps, peer_address
from nkservice.transport.picows_adapter import (
    GuardedListener,
    close_answer,
    close_reason,
    server_protocol,
)

log = logging.getLogger(__name__)

PICOWS_LOGGER = "nkservice.transport.picows"
_TEXT, _BINARY, _CONTINUATION, _CLOSE, _PING = (
    WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.CLOSE, WSMsgType.PING)
# MessageListener._mode: whole messages expected / inside a fragmented message / closed
_MESSAGES, _FRAGMENTS, _DONE = range(3)
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
# In place of each connection's upgrade headers, once read (read-only, shared by all).
_NO_HEADERS = cast(CIMultiDict[str], CIMultiDictProxy(CIMultiDict[str]()))


def text_frame_header(size: int) -> bytes:
    """RFC 6455 §5.2: FIN + text opcode, no mask (server to client), then the length."""
    if size < 126:
        return bytes((0x81, size))
    if size < 1 << 16:
        return b"\x81\x7e" + size.to_bytes(2, "big")
    return b"\x81\x7f" + size.to_bytes(8, "big")


class MessageListener(GuardedListener):
    __slots__ = ("_accept", "_batch", "_conn", "_fragments", "_key", "_max_size", "_mode",
                 "_paused", "_scheme", "_utf8", "_wake_ups", "_ws")

    def __init__(self, accept: Accept, scheme: str) -> None:
        super().__init__()
        self._accept = accept
        self._scheme = scheme
        self._ws: WSTransport | None = None
        self._conn: Connection | None = None
        self._wake_ups: WakeUps | None = None
        self._key = 0
        self._fragments: FragmentAssembler | None = None  # made for the first fragmented message
        self._utf8: codecs.IncrementalDecoder | None = None  # checks fragmented text as it comes
        self._mode = _MESSAGES
        self._max_size = 0
        self._paused = False  # the socket's send buffer is over its high-water mark
        self._batch: list[bytes] | None = None  # frames to write together (see above)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        forget_headers(transport)
        wake_ups = self._wake_ups = WakeUps.of(asyncio.get_running_loop())
        self._key = wake_ups.new_key()
        host, port = peer_address(transport.underlying_transport)
        self._conn = self._accept(self, wake_ups.clock, self._scheme, host, port)
        self._max_size = self._conn.limits.max_message_size

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self._batch is None:
            self._batch = []
        try:
            if self._mode:
                self._unusual_frame(transport, frame)
            else:
                self._frame(transport, frame)
        finally:
            if frame.last_in_buffer:
                self._flush()

    def _frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is _TEXT or kind is _BINARY:
            if frame.fin:
                self._message(frame.get_payload_as_bytes(), kind is _TEXT)
            else:
                self._first_fragment(frame.get_payload_as_bytes(), kind is _TEXT)
        elif kind is _CONTINUATION:
            self.fail(transport, WSCloseCode.PROTOCOL_ERROR, "unexpected continuation frame")
        else:
            self._control(transport, frame, kind)

    def _unusual_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """A frame inside a fragmented message, or after the close."""
        if self._mode == _DONE:
            return
        kind = frame.msg_type
        if kind is _CONTINUATION:
            self._next_fragment(frame.get_payload_as_bytes(), frame.fin)
        elif kind is _TEXT or kind is _BINARY:
            self.fail(transport, WSCloseCode.PROTOCOL_ERROR,
                      "a new message inside a fragmented one")
        else:
            self._control(transport, frame, kind)

    def _control(self, transport: WSTransport, frame: WSFrame, kind: WSMsgType) -> None:
        if kind is _CLOSE:
            self._flush()
            self._mode = _DONE
            if not transport.is_close_frame_sent:
                transport.send_close(*close_answer(frame.payload_size, frame.get_close_code()))
            transport.disconnect()
            if self._conn is not None:
                self._conn.lost()  # nothing more may be sent after the close frame
        elif kind is _PING:
            self._flush()
            transport.send_pong(frame.get_payload_as_bytes())

    def _message(self, payload: bytes, is_text: bool) -> None:
        assert self._conn is not None
        if len(payload) > self._max_size:
            self._conn.message_too_large()
        elif is_text and not payload.isascii() and not _is_utf8(payload):
            assert self._ws is not None
            self.fail(self._ws, WSCloseCode.INVALID_TEXT, "invalid UTF-8 in a text frame")
        else:
            self._conn.receive(payload)

    def _first_fragment(self, payload: bytes, is_text: bool) -> None:
        assert self._conn is not None
        if self._fragments is None:
            self._fragments = FragmentAssembler(self._max_size)
        self._mode = _FRAGMENTS
        if is_text:
            if self._utf8 is None:
                self._utf8 = _Utf8Decoder()
            else:
                self._utf8.reset()
            if not self._utf8_ok(payload, False):
                return
        try:
            self._fragments.start(payload, is_text)
        except MessageTooLarge:
            self._conn.message_too_large()

    def _next_fragment(self, payload: bytes, fin: bool) -> None:
        assert self._conn is not None and self._fragments is not None
        fragments = self._fragments
        if fragments.is_text and not self._utf8_ok(payload, fin):
            return
        try:
            fragments.add(payload)
        except MessageTooLarge:
            self._conn.message_too_large()
            return
        if fin:
            self._mode = _MESSAGES
            self._message(fragments.finish(), False)  # its UTF-8 was checked piece by piece

    def _utf8_ok(self, payload: bytes, final: bool) -> bool:
        """Fail fast: a text message is closed 1007 at its first fragment that cannot be
        UTF-8, not once it is whole."""
        assert self._utf8 is not None
        try:
            self._utf8.decode(payload, final)
        except UnicodeDecodeError:
            assert self._ws is not None
            self.fail(self._ws, WSCloseCode.INVALID_TEXT, "invalid UTF-8 in a text message")
            return False
        return True

    def frame_too_large(self, transport: WSTransport) -> None:
        if self._conn is None or self._mode == _DONE:
            transport.disconnect()
        else:
            self._conn.message_too_large()  # the answer, then the close (1009)

    def fail(self, transport: WSTransport, code: WSCloseCode, reason: str) -> None:
        """A WebSocket protocol error: close with `code`; the connection is over at once."""
        self._close_transport(code, reason)
        if self._conn is not None:
            self._conn.lost()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        # Let go of the connection (it points back here: a cycle) and of the transport.
        self._mode = _DONE
        conn, self._conn = self._conn, None
        self._ws = self._batch = self._fragments = self._utf8 = None
        if self._wake_ups is not None:
            self._wake_ups.cancel(self._key)
        if conn is not None:
            conn.lost()

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self._ws is not None and not self._ws.is_close_frame_sent:
            self._ws.underlying_transport.write(b"".join(batch))

    def _close_transport(self, code: WSCloseCode, reason: str) -> None:
        assert self._ws is not None
        self._flush()
        self._mode = _DONE
        if not self._ws.is_close_frame_sent:
            self._ws.send_close(code, close_reason(reason))
        self._ws.disconnect()

    # -- Wire --------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        batch = self._batch
        if batch is None:  # outside a read: written at the end of this turn of the loop
            self._batch = batch = []
            assert self._wake_ups is not None
            self._wake_ups.call_soon(self._flush)
        batch += (text_frame_header(len(data)), data)

    def close(self, goodbye: Goodbye) -> None:
        if self._ws is not None:  # else gone already
            self._close_transport(WSCloseCode(goodbye.code), goodbye.reason)

    def backlog(self) -> int:
        # Asked for at every event sent: only look once the transport has said it is full.
        if not self._paused or self._ws is None:
            return 0
        size: int = self._ws.underlying_transport.get_write_buffer_size()
        return size

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def wake_at(self, when: float) -> None:
        if self._wake_ups is not None and self._ws is not None:  # not once disconnected
            self._wake_ups.wake_at(self._key, self, when)

    def on_timer(self) -> None:
        if self._conn is not None:
            self._conn.on_timer()


def forget_headers(transport: WSTransport) -> None:
    """Let go of the upgrade request's and response's headers once the handshake is done:
    nothing reads them afterwards, and each is a `CIMultiDict` the garbage collector walks,
    with every header's text, for as long as the connection lives."""
    for message in (transport.request, transport.response):
        if message is not None:
            message.headers = _NO_HEADERS


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def websocket_protocol_factory(accept: Accept, scheme: str, paths: Collection[str],
                               max_message_size: Callable[[], int], *,
                               listener: type[MessageListener] = MessageListener,
                               ) -> Callable[[], asyncio.BufferedProtocol]:
    """An asyncio protocol factory for a WebSocket listener serving `paths`. (`listener`:
    the conformance harness, bench/conformance/, puts an echo in the Connection's place.)"""
    wanted = {path.encode() for path in paths}

    def route(request: WSUpgradeRequest) -> MessageListener | None:
        path = request.path.split(b"?", 1)[0]
        return listener(accept, scheme) if path in wanted else None  # None → 404

    # An adapter, not the Logger itself: given a Logger, picows makes a child Logger for
    # every connection (a handful of objects the garbage collector walks, per session).
    server_log = logging.LoggerAdapter(logging.getLogger(PICOWS_LOGGER), {})

    def make() -> asyncio.BufferedProtocol:
        return server_protocol(route, max_message_size(), server_log)

    return make
