"""Listening sockets: one per host and port, serving newline JSON, WebSocket, or both.

When a `tcp` and a `ws` URL (or `tls` and `wss`) share a port, each new connection starts
with a `SniffingProtocol` that looks at its first bytes: an HTTP request line starts with
an upper-case method name, a JSON message never does. It then hands the connection over to
the protocol of that transport and replays the bytes it read.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Collection
from typing import cast

from nkservice.transport.base import Accept
from nkservice.transport.lines import LineProtocol
from nkservice.transport.websocket import websocket_protocol_factory

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class SniffingProtocol(asyncio.Protocol):
    __slots__ = ("_deadline", "_make_lines", "_make_websocket", "_silence_limit", "_transport")

    def __init__(self, make_lines: ProtocolFactory, make_websocket: ProtocolFactory,
                 silence_limit: float) -> None:
        self._make_lines = make_lines
        self._make_websocket = make_websocket
        self._silence_limit = silence_limit
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        # A peer that says nothing has not logged in either: same deadline.
        self._deadline = asyncio.get_running_loop().call_later(self._silence_limit,
                                                               transport.close)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None and self._deadline is not None
        self._deadline.cancel()
        is_http = data[:1].isalpha() and data[:1].isupper()
        protocol = (self._make_websocket if is_http else self._make_lines)()
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        _replay(protocol, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:  # gone before saying anything
            self._deadline.cancel()


def _replay(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)


async def listen(accept: Accept, host: str, port: int, *, lines: bool, websocket_paths:
                 Collection[str], tls: ssl.SSLContext | None, max_message_size: int,
                 login_timeout: float) -> asyncio.Server:
    """Listen on host:port for newline JSON (`lines`), WebSocket (`websocket_paths`), or both."""
    secure = tls is not None
    lines_scheme, websocket_scheme = ("tls", "wss") if secure else ("tcp", "ws")

    def make_lines() -> asyncio.BaseProtocol:
        return LineProtocol(accept, lines_scheme)

    # Frames a little over the message limit still reach us, so they get the protocol's
    # message_too_large answer; far larger ones are cut off by picows itself.
    make_websocket = websocket_protocol_factory(accept, websocket_scheme, websocket_paths,
                                                max_message_size * 2 + 1024)
    factory: ProtocolFactory
    if lines and websocket_paths:
        def factory() -> asyncio.BaseProtocol:
            return SniffingProtocol(make_lines, make_websocket, login_timeout)
    elif websocket_paths:
        factory = make_websocket
    else:
        factory = make_lines
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host, port, ssl=tls, backlog=4096)
