"""Plain HTTP/1.1 on a WebSocket listener, or on a listener of its own (PROTOCOL.md §2): the
dashboard, `/metrics`, `/healthz`, `/readyz`.

h11 does the protocol (parsing, keep-alive, framing, what may follow what); this adapter only
moves bytes between it and the socket, and hands each whole request to a `Site`, which
answers it. Request bodies are not used by any page here: they are read and dropped, up to
`MAX_BODY` bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

import h11

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # request line and headers
MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 15.0  # seconds for a whole request to arrive (the first, or the next one)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str  # the path and query, as sent
    headers: dict[str, str]  # names in lower case
    listener_host: str  # the host the listening socket was asked to bind (not the peer's)
    websocket_path: str | None  # the WebSocket path of that listener, if it has one

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Site = Callable[[HttpRequest], Awaitable[HttpResponse]]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def text(status: int, message: str) -> HttpResponse:
    return HttpResponse(status, message.encode() + b"\n")


class HttpProtocol(asyncio.Protocol):
    """One HTTP connection: requests answered one after the other (pipelined ones wait)."""

    def __init__(self, site: Site, listener_host: str, websocket_path: str | None) -> None:
        self._site = site
        self._listener = (listener_host, websocket_path)
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._body = 0
        self._serving: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._wait_idle()

    def data_received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._next()

    def eof_received(self) -> bool:
        self._h11.receive_data(b"")
        self._next()
        return True  # h11 decides when to close (after an answer in progress)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._idle is not None:
            self._idle.cancel()
        if self._serving is not None:
            self._serving.cancel()

    def _next(self) -> None:
        """Read events until a whole request is in (then answer it) or more bytes are needed."""
        while self._serving is None and self._transport is not None:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as error:
                self._refuse(error.error_status_hint, str(error))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request, self._body = event, 0
            elif isinstance(event, h11.Data):
                self._body += len(event.data)
                if self._body > MAX_BODY:
                    self._refuse(413, "request body too large")
                    return
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                if self._idle is not None:  # the whole request came in time
                    self._idle.cancel()
                self._serving = asyncio.get_running_loop().create_task(
                    self._serve(self._request))
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    async def _serve(self, request: h11.Request) -> None:
        host, websocket_path = self._listener
        asked = HttpRequest(request.method.decode("ascii", "replace"),
                            request.target.decode("ascii", "replace"),
                            {name.decode("latin-1"): value.decode("latin-1")
                             for name, value in request.headers},
                            host, websocket_path)
        try:
            response = await self._site(asked)
        except Exception:
            log.exception("HTTP %s %s failed", asked.method, asked.target)
            response = text(500, "internal error")
        self._respond(response, head_only=asked.method == "HEAD")
        self._serving = None
        if self._transport is None:
            return
        if self._h11.our_state is h11.MUST_CLOSE:
            self._close()
            return
        self._h11.start_next_cycle()
        self._wait_idle()
        self._next()

    def _respond(self, response: HttpResponse, *, head_only: bool = False) -> None:
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body))),
                   ("cache-control", "no-store"), *response.headers]
        try:
            data = self._h11.send(h11.Response(status_code=response.status, headers=headers,
                                               reason=_reason(response.status)))
            if not head_only:
                data += self._h11.send(h11.Data(data=response.body)) or b""
            data += self._h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # the peer is past answering (it closed)
            self._close()
            return
        if self._transport is not None and data:
            self._transport.write(data)

    def _refuse(self, status: int, why: str) -> None:
        """Bad input from the peer: say so (if HTTP still allows it) and close."""
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._respond(text(status, why))
        self._close()

    def _wait_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._close)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


async def listen_http(site: Site, host: str, port: int, *, shared: bool = False
                      ) -> asyncio.Server:
    """A listener of plain HTTP only (`shared`: the node's workers bind it too)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: HttpProtocol(site, host, None), host, port,
                                    backlog=1024, reuse_port=shared or None)
