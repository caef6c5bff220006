"""A raw protocol peer for tests: JSON objects over tcp, tls, ws or wss, no nkservice code.

It speaks the wire format directly (asyncio streams for tcp/tls, the `websockets` library
for ws/wss — a different WebSocket implementation than the server's), so the tests check
the bytes the server really sends and accepts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

RECV_TIMEOUT = 5.0


class Closed(Exception):
    """The server ended the connection."""


class Peer:
    def __init__(self, url: str) -> None:
        self.url = url
        self.scheme = urlsplit(url).scheme
        self._ws: ClientConnection | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tids = itertools.count(1000)
        # Server requests (events, pings) that arrived while `request` waited for its
        # answer: `recv` returns them first, in order.
        self._inbox: collections.deque[dict[str, Any]] = collections.deque()

    @property
    def is_websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    async def connect(self, context: ssl.SSLContext | None) -> Peer:
        secure = self.scheme in ("tls", "wss")
        if self.is_websocket:
            self._ws = await connect(self.url, ssl=context if secure else None, max_size=None,
                                     ping_interval=None)
        else:
            parts = urlsplit(self.url)
            self._reader, self._writer = await asyncio.open_connection(
                parts.hostname, parts.port, ssl=context if secure else None,
                limit=16 * 1024 * 1024)
        return self

    async def send_raw(self, data: bytes, *, text: bool = True) -> None:
        """One message: a line on tcp/tls, a text (or binary) frame on ws/wss."""
        if self._ws is not None:
            await self._ws.send(data, text=text)
        else:
            assert self._writer is not None
            self._writer.write(data + b"\n")
            await self._writer.drain()

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message).encode())

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        if self._inbox:
            return self._inbox.popleft()
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            if self._ws is not None:
                try:
                    raw: str | bytes = await self._ws.recv()
                except ConnectionClosed as exc:
                    raise Closed from exc
            else:
                assert self._reader is not None
                raw = await self._reader.readline()
                if not raw:
                    raise Closed
        message = json.loads(raw)
        assert isinstance(message, dict), raw
        return message

    async def request(self, class_: str, cmd: str, data: Any = None, *,
                      subclass: str | None = None) -> dict[str, Any]:
        """Send a request and return the response to it; server requests that come first
        wait in the inbox for `recv`."""
        tid = next(self._tids)
        message: dict[str, Any] = {"class": class_, "cmd": cmd, "tid": tid}
        if subclass is not None:
            message["subclass"] = subclass
        if data is not None:
            message["data"] = data
        await self.send(message)
        while "cmd" in (response := await self._read(RECV_TIMEOUT)):
            self._inbox.append(response)
        assert response.get("tid") == tid, response
        return response

    @property
    def waiting(self) -> list[dict[str, Any]]:
        """Server requests that arrived while `request` waited, not yet taken by `recv`."""
        return list(self._inbox)

    async def login(self, user: str, password: str, **extra: Any) -> dict[str, Any]:
        response = await self.request("core", "login", {"user": user, "password": password,
                                                         **extra}, subclass="user")
        assert response["result"] == "ok", response
        data: dict[str, Any] = response["data"]
        return data

    def peer_certificate(self) -> dict[str, Any]:
        """The server's certificate, as `ssl.SSLSocket.getpeercert()` gives it."""
        carrier: Any = self._ws.transport if self._ws is not None else self._writer
        assert carrier is not None
        certificate = carrier.get_extra_info("ssl_object").getpeercert()
        assert isinstance(certificate, dict)
        return certificate

    async def send_fragments(self, parts: list[str]) -> None:
        """One WebSocket text message split over several frames."""
        assert self._ws is not None
        await self._ws.send(iter(parts))

    async def websocket_ping(self) -> None:
        """A WebSocket-level ping; returns when its pong arrives."""
        assert self._ws is not None
        pong = await self._ws.ping(b"are you there")
        async with asyncio.timeout(RECV_TIMEOUT):
            await pong

    async def wait_closed(self, timeout: float = RECV_TIMEOUT) -> int | None:
        """Read until the server closes; the WebSocket close code (None on tcp/tls)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await self.recv(timeout)
                except Closed:
                    break
        if self._ws is not None:
            return self._ws.close_code
        return None

    async def read_until_closed(self, timeout: float = RECV_TIMEOUT
                                ) -> tuple[list[dict[str, Any]], int | None]:
        """Every message left until the server closes, and the WebSocket close code."""
        messages = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    messages.append(await self.recv(timeout))
                except Closed:
                    break
        return messages, self._ws.close_code if self._ws is not None else None

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        elif self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await self._writer.wait_closed()
