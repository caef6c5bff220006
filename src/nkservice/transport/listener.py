"""Listening sockets: one per host and port, serving newline JSON, WebSocket, or both.

When a `tcp` and a `ws` URL (or `tls` and `wss`) share a port, each new connection starts
with a `SniffingProtocol` that reads its first line (PROTOCOL.md §2): an HTTP request line,
`METHOD SP TARGET SP HTTP/1.x`, is HTTP (the WebSocket upgrade, or a 404); anything else is
newline JSON (`HELLO` too: it gets `invalid_json`). The first read may hold part of that line
only (`GE`): the decision waits for a newline, or for enough bytes to rule HTTP out (`{` does
at once), within `MAX_REQUEST_LINE` bytes and the silence deadline. The connection is then
handed over to the protocol of its transport, and the bytes read so far replayed.

A WebSocket listener that also serves pages (the core service's: the dashboard, metrics and
health, `http.py`) reads on to the end of the request's head: with `Upgrade: websocket` it is
the WebSocket's, otherwise a plain HTTP request for the `Site`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable, Collection
from typing import cast

from nkservice.protocol.connection import Limits
from nkservice.transport.base import Accept
from nkservice.transport.http import MAX_HEAD, HttpProtocol, Site
from nkservice.transport.lines import LineProtocol
from nkservice.transport.websocket import websocket_protocol_factory

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# Longer first lines are newline JSON (picows refuses HTTP requests over 16 KiB anyway).
MAX_REQUEST_LINE = 8192
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # RFC 9110 §5.6.2: what a method name is made of
REQUEST_LINE = re.compile(rb"%s+ [^ \r\n]+ HTTP/1\.[0-9]\r?" % _TOKEN)
# Every prefix of a request line (without its newline), and nothing else.
_REQUEST_LINE_START = re.compile(
    rb"%s+(?: [^ \r\n]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?)?" % _TOKEN)


_UPGRADE = re.compile(rb"\r\nupgrade:[ \t]*websocket", re.IGNORECASE)
_HEAD_END = b"\r\n\r\n"


def is_http(first_bytes: bytes) -> bool | None:
    """Do these first bytes of a connection start an HTTP request? None: cannot tell yet."""
    newline = first_bytes.find(b"\n")
    if newline >= 0:
        return REQUEST_LINE.fullmatch(first_bytes, 0, newline) is not None
    if len(first_bytes) < MAX_REQUEST_LINE and _REQUEST_LINE_START.fullmatch(first_bytes):
        return None
    return False


Choose = Callable[[bytes], ProtocolFactory | None]  # None: cannot tell yet


class SniffingProtocol(asyncio.Protocol):
    """The start of a connection, until `choose` can tell which protocol serves it."""

    __slots__ = ("_choose", "_deadline", "_read", "_silence_limit", "_transport")

    def __init__(self, choose: Choose, silence_limit: float) -> None:
        self._choose = choose
        self._silence_limit = silence_limit
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._read = b""  # what came before the decision

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        # A peer that says nothing (or not a whole first line) has not logged in either:
        # same deadline.
        self._deadline = asyncio.get_running_loop().call_later(self._silence_limit,
                                                               transport.close)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None and self._deadline is not None
        if self._read:
            data = self._read + data
        make = self._choose(data)
        if make is None:
            self._read = data
            return
        self._read = b""
        self._deadline.cancel()
        protocol = make()
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        _replay(protocol, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:  # gone before the decision
            self._deadline.cancel()


def chooser(make_lines: ProtocolFactory | None, make_websocket: ProtocolFactory,
            make_http: ProtocolFactory | None) -> Choose:
    """How a listener with more than one protocol tells a connection's apart."""

    def choose(data: bytes) -> ProtocolFactory | None:
        http = is_http(data)
        if http is None:
            return None
        if not http:  # without newline JSON here, picows answers 400
            return make_lines or make_websocket
        if make_http is None:
            return make_websocket
        end = data.find(_HEAD_END)
        if end < 0:  # a head too long for h11 goes to picows, which refuses it
            return None if len(data) < MAX_HEAD else make_websocket
        return make_websocket if _UPGRADE.search(data, 0, end) else make_http

    return choose


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
                 Collection[str], tls: ssl.SSLContext | None, limits: Callable[[], Limits],
                 shared: bool = False, site: Site | None = None) -> asyncio.Server:
    """Listen on host:port for newline JSON (`lines`), WebSocket (`websocket_paths`), or both.
    `limits()` is read for each new connection: the service's settings may change while
    the socket stays. `shared`: other processes (a node's workers) listen on the same port
    (SO_REUSEPORT: the kernel spreads the connections over them). `site`: plain HTTP
    requests to the WebSocket side are its to answer (else 404)."""
    secure = tls is not None
    lines_scheme, websocket_scheme = ("tls", "wss") if secure else ("tcp", "ws")

    def make_lines() -> asyncio.BaseProtocol:
        return LineProtocol(accept, lines_scheme)

    make_websocket = websocket_protocol_factory(accept, websocket_scheme, websocket_paths,
                                                lambda: limits().max_message_size)
    make_http: ProtocolFactory | None = None
    if site is not None and websocket_paths:
        page_site, websocket_path = site, min(websocket_paths)

        def make_http() -> asyncio.BaseProtocol:
            return HttpProtocol(page_site, host, websocket_path)

    factory: ProtocolFactory
    if websocket_paths and (lines or make_http is not None):
        choose = chooser(make_lines if lines else None, make_websocket, make_http)

        def factory() -> asyncio.BaseProtocol:
            return SniffingProtocol(choose, limits().login_timeout)
    elif websocket_paths:
        factory = make_websocket
    else:
        factory = make_lines
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host, port, ssl=tls, backlog=4096,
                                    reuse_port=shared or None)
