"""The client's two byte transports (PROTOCOL.md §2): newline JSON (tcp, tls) and WebSocket
(ws, wss, on picows).

Both report to a `Peer` the way asyncio protocols do — `connection_made`, then one
`message_received` per whole message, then `connection_lost` exactly once — and both offer
`send(bytes)` (framing is added here) and `close()`. The client never sees sockets or frames.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from typing import Protocol, cast
from urllib.parse import urlsplit

from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from nkservice.protocol.framing import FragmentAssembler, LineFramer, MessageTooLarge
from nkservice.transport.picows_adapter import close_answer

log = logging.getLogger(__name__)

SCHEMES = ("tcp", "tls", "ws", "wss")
DEFAULT_PORTS = {"tcp": 9010, "ws": 9010, "tls": 9011, "wss": 9011}
# Larger than the server's default limit (1 MiB): the client trusts its server more than the
# server trusts its clients, but a runaway stream must not eat all memory.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# After our close frame, how long the server gets to answer with its own before we drop the
# socket anyway (RFC 6455 §7.1.1: the server should be the one to close the TCP connection).
WS_CLOSE_TIMEOUT = 2.0


class Transport(Protocol):
    def send(self, data: bytes) -> None:
        """Write one message; the transport adds the framing."""

    def close(self) -> None:
        """Start a clean close; the peer's `connection_lost` follows once it is done."""


class Peer(Protocol):
    def connection_made(self, transport: Transport) -> None: ...

    def message_received(self, data: bytes) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


async def open_transport(url: str, peer: Peer, *,
                         ssl: ssl_module.SSLContext | None = None) -> Transport:
    """Connect to `url`; `peer.connection_made` has been called when this returns.

    `ssl` is used for tls and wss (the system's default trust store when None). Failures
    raise `OSError` (`ConnectionError` for a refused WebSocket handshake, `ssl.SSLError`
    for TLS), or `ValueError` for a URL of another scheme.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"unsupported URL {url!r}: expected tcp://, tls://, ws:// or wss:// "
                         "with a host")
    secure = scheme in ("tls", "wss")
    context = (ssl or ssl_module.create_default_context()) if secure else None
    if scheme in ("ws", "wss"):
        try:
            _, listener = await ws_connect(lambda: _WebSocketListener(peer), url,
                                           ssl_context=context, max_frame_size=MAX_MESSAGE_SIZE)
        except WSError as exc:  # e.g. a 404: callers handle one kind of connect failure
            raise ConnectionError(f"WebSocket handshake with {url} failed: {exc}") from exc
        if not isinstance(listener, _WebSocketListener):  # closed during the handshake
            raise ConnectionError(f"WebSocket handshake with {url} failed: the connection "
                                  "was closed")
        return listener
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: _LineProtocol(peer), parts.hostname, parts.port or DEFAULT_PORTS[scheme],
        ssl=context)
    return protocol


class _LineProtocol(asyncio.Protocol):
    """tcp and tls: one JSON message per `\\n`-terminated line."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._framer = LineFramer(MAX_MESSAGE_SIZE)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._peer.connection_made(self)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._framer.feed(data)
        except MessageTooLarge:
            log.warning("the server sent a line over %d bytes; closing", MAX_MESSAGE_SIZE)
            self.close()
            return
        for message in messages:
            self._peer.message_received(message)

    def eof_received(self) -> bool:
        return False  # the server is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._peer.connection_lost(exc)

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        if self._transport.is_closing():  # the peer is gone: nowhere to write (no warning)
            return
        self._transport.writelines((data, b"\n"))

    def close(self) -> None:
        assert self._transport is not None
        self._transport.close()


class _WebSocketListener(WSListener):
    """ws and wss: one JSON message per frame (fragmented messages are joined)."""

    def __init__(self, peer: Peer) -> None:
        super().__init__()
        self._peer = peer
        self._ws: WSTransport | None = None
        self._fragments = FragmentAssembler(MAX_MESSAGE_SIZE)
        self._close_timer: asyncio.TimerHandle | None = None
        self._closed_by: ConnectionError | None = None  # the server's close frame, if any

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        self._peer.connection_made(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        try:
            if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension is ever negotiated
                self._fail(transport, "reserved bits set")
            elif kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                if self._fragments.in_progress:
                    self._fail(transport, "a new message inside a fragmented one")
                elif frame.fin:
                    self._peer.message_received(frame.get_payload_as_bytes())
                else:
                    self._fragments.start(frame.get_payload_as_bytes(), kind is WSMsgType.TEXT)
            elif kind is WSMsgType.CONTINUATION:
                if not self._fragments.in_progress:
                    self._fail(transport, "unexpected continuation frame")
                    return
                self._fragments.add(frame.get_payload_as_bytes())
                if frame.fin:
                    self._peer.message_received(self._fragments.finish())
            elif kind is WSMsgType.CLOSE:
                reason = (frame.get_close_message() or b"").decode(errors="replace")
                self._closed_by = ConnectionError(
                    f"closed by the server ({frame.get_close_code().value}): "
                    f"{reason or 'no reason given'}")
                if not transport.is_close_frame_sent:
                    # The server's code echoed; 1000 when it gave none (code 0 may not be
                    # sent), 1002 for a code no endpoint may send (RFC 6455 §7.4).
                    transport.send_close(*close_answer(frame.payload_size,
                                                       frame.get_close_code()))
                transport.disconnect()
        except MessageTooLarge:
            log.warning("the server sent a message over %d bytes; closing", MAX_MESSAGE_SIZE)
            transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
            transport.disconnect()

    @staticmethod
    def _fail(transport: WSTransport, why: str) -> None:
        log.warning("WebSocket protocol error from the server: %s; closing", why)
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode.PROTOCOL_ERROR, why.encode())
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._peer.connection_lost(self._closed_by)

    def send(self, data: bytes) -> None:
        assert self._ws is not None
        if self._ws.is_disconnected or self._ws.underlying_transport.is_closing():
            return  # the peer is gone: writing would only log a warning per message
        self._ws.send(WSMsgType.TEXT, data)

    def close(self) -> None:
        ws = self._ws
        assert ws is not None
        if ws.is_disconnected or self._close_timer is not None:
            return
        ws.send_close(WSCloseCode.OK)
        self._close_timer = asyncio.get_running_loop().call_later(WS_CLOSE_TIMEOUT,
                                                                  ws.disconnect)
