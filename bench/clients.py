"""Load-generating client connections for tcp (NDJSON) and ws (picows).

The request logic lives in `Session`, which knows nothing about sockets; `TcpClient` and
`WsClient` only move bytes. The client is written to be cheap per message (callbacks, no
per-request futures or tasks, orjson), so that it is not what limits the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
import picows

# Bound on each step of closing a connection when the run ends.
CLOSE_TIMEOUT = 2.0
PING = b'{"class":"core","cmd":"ping","tid":%d}'
LOGIN_TID = 0


def login_message(user: str = "admin", password: str = "admin") -> bytes:
    return orjson.dumps(
        {
            "class": "core",
            "cmd": "login",
            "tid": LOGIN_TID,
            "data": {"user": user, "password": password},
        }
    )


LOGIN = login_message()  # the global admin's


def masked_text_header(size: int) -> bytes:
    """The header of a client (masked) text frame of `size` bytes, without the key."""
    if size < 126:
        return bytes((0x81, 0x80 | size))
    if size < 1 << 16:
        return bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    return bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big")


class LoginError(Exception):
    pass


class Session:
    """One connection's request logic: login, a window of pings in flight, counters.

    `echo` means the peer is a bare echo server: there is no login and every message that
    comes back is the reply to one of our requests (it is our own ping, so it looks like a
    request and must not be answered as one).
    """

    def __init__(self, send: Callable[[list[bytes]], None], *, echo: bool,
                 login: bytes = LOGIN) -> None:
        self._send = send
        self._echo = echo
        self._login = login
        self._next_tid = 1
        self.running = False
        self.replies = 0
        self.in_flight = 0
        self.errors = 0
        self.server_requests = 0
        self.closed = False
        self.ended = asyncio.Event()
        self.idle = asyncio.Event()
        # Set only for one-request-at-a-time runs; see record_latency().
        self.latencies_ns: list[int] | None = None
        self._sent_ns = 0
        self.login: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def start_login(self) -> None:
        self._send([self._login])

    def start(self, window: int) -> None:
        """Put `window` pings in flight; each reply then sends the next one."""
        self.running = True
        self._send([self._next_ping() for _ in range(window)])

    def record_latency(self, latencies_ns: list[int]) -> None:
        # Latency is only meaningful with a single request in flight: one send timestamp
        # per connection is then enough, and the client pays no per-request bookkeeping.
        self.latencies_ns = latencies_ns

    def _next_ping(self) -> bytes:
        tid = self._next_tid
        self._next_tid = tid + 1
        self.in_flight += 1
        self._sent_ns = time.perf_counter_ns()
        return PING % tid

    def on_message(self, raw: bytes | memoryview) -> bytes | None:
        """Account for one incoming message; return what to send in answer, if anything."""
        msg = orjson.loads(raw)
        if not self._echo:
            if "cmd" in msg and "class" in msg and "tid" in msg:
                # A request from the server (e.g. its keepalive ping): answer, don't count.
                self.server_requests += 1
                return orjson.dumps({"result": "ok", "tid": msg["tid"]})
            if msg.get("tid") == LOGIN_TID and not self.login.done():
                self._login_answered(msg)
                return None
            if "result" not in msg:
                return None  # an ack: it frees no slot in the window
        self.in_flight -= 1
        if self._echo or msg["result"] == "ok":
            self.replies += 1
        else:
            self.errors += 1
        if self.latencies_ns is not None:
            self.latencies_ns.append(time.perf_counter_ns() - self._sent_ns)
        if self.running:
            return self._next_ping()
        if not self.in_flight:
            self.idle.set()
        return None

    async def stop(self) -> None:
        """Send no more requests; wait (bounded) for those in flight to be answered.

        Closing with requests in flight would make servers log write errors, and their
        logs are read for real problems afterwards.
        """
        self.running = False
        self.latencies_ns = None
        if not self.in_flight:
            self.idle.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), CLOSE_TIMEOUT)

    def _login_answered(self, msg: dict[str, Any]) -> None:
        data = msg.get("data") or {}
        if msg.get("result") == "ok" and isinstance(data, dict) and "session_id" in data:
            self.login.set_result(data)
        else:
            self.login.set_exception(LoginError(f"login refused: {msg!r}"))

    def connection_lost(self) -> None:
        self.closed = True
        self.ended.set()
        if not self.login.done():
            self.login.set_exception(LoginError("connection closed before the login answer"))


class TcpClient(asyncio.Protocol):
    def __init__(self, *, echo: bool, login: bytes = LOGIN) -> None:
        self._transport: asyncio.WriteTransport | None = None
        self._pending = b""
        self.session = Session(self._write, echo=echo, login=login)

    def _write(self, messages: list[bytes]) -> None:
        assert self._transport is not None
        self._transport.write(b"\n".join(messages) + b"\n")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        lines = (self._pending + data).split(b"\n") if self._pending else data.split(b"\n")
        self._pending = lines.pop()  # the incomplete tail; b"" when data ended with "\n"
        on_message = self.session.on_message
        out = [answer for line in lines if line.strip() and (answer := on_message(line))]
        if out:
            # One write for everything this chunk calls for: the client must stay cheaper
            # than the servers it measures.
            self._write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost()

    async def aclose(self) -> None:
        if self._transport is None or self.session.closed:
            return
        await self.session.stop()
        self._transport.close()  # FIN after the pending writes
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.session.ended.wait(), CLOSE_TIMEOUT)
        if not self.session.closed:
            self._transport.abort()


class MaskedFrames:
    """Client-to-server text frames (RFC 6455 §5.2), masked with this connection's key.

    The load client builds its frames itself because picows's `send` makes one send()
    system call per frame, which made the client, not the server, the bottleneck; built
    here, all the answers to one read go out in a single write.
    """

    __slots__ = ("_key", "_masks")

    def __init__(self) -> None:
        self._key = os.urandom(4)
        self._masks: dict[int, int] = {}  # payload length -> the key repeated to it, as int

    def text(self, payload: bytes) -> bytes:
        size = len(payload)
        header = masked_text_header(size)
        mask = self._masks.get(size)
        if mask is None:
            mask = self._masks[size] = int.from_bytes((self._key * (size // 4 + 1))[:size], "big")
        return header + self._key + (int.from_bytes(payload, "big") ^ mask).to_bytes(size, "big")


class WsClient(picows.WSListener):
    def __init__(self, *, echo: bool, login: bytes = LOGIN) -> None:
        self._transport: picows.WSTransport | None = None
        self._frames = MaskedFrames()
        self._out: list[bytes] = []  # frames to write once the current read is processed
        self.session = Session(self._write, echo=echo, login=login)

    def _write(self, messages: list[bytes]) -> None:
        assert self._transport is not None
        text = self._frames.text
        self._transport.underlying_transport.write(b"".join([text(m) for m in messages]))

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self._transport = transport

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == picows.WSMsgType.TEXT or msg_type == picows.WSMsgType.BINARY:
            answer = self.session.on_message(frame.get_payload_as_memoryview())
            if answer is not None:
                self._out.append(answer)
        elif msg_type == picows.WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.last_in_buffer and self._out:
            self._write(self._out)
            self._out = []

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.session.connection_lost()

    async def aclose(self) -> None:
        """The closing handshake, so that servers see a normal close and log no error."""
        transport = self._transport
        if transport is None or self.session.closed:
            return
        await self.session.stop()
        transport.send_close(picows.WSCloseCode.OK)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(transport.wait_disconnected(), CLOSE_TIMEOUT)
        transport.disconnect(graceful=False)


Client = TcpClient | WsClient

# A small read buffer keeps 10,000 idle client connections cheap; it grows on demand.
_WS_READ_BUFFER = 4096


async def connect(transport: str, host: str, port: int, *, echo: bool,
                  login: bytes = LOGIN) -> Client:
    """Open one connection and, unless `echo`, log in (with `login`); raises on failure."""
    client: Client
    if transport == "tcp":
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            lambda: TcpClient(echo=echo, login=login), host, port)
    else:
        _, listener = await picows.ws_connect(
            lambda: WsClient(echo=echo, login=login),
            f"ws://{host}:{port}/",
            read_buffer_init_size=_WS_READ_BUFFER,
            # Measured: uvloop's own transport is cheaper for this client than aiofastnet.
            use_aiofastnet=False,
        )
        assert isinstance(listener, WsClient)
        client = listener
    if not echo:
        client.session.start_login()
        try:
            await client.session.login
        except BaseException:
            await client.aclose()
            raise
    return client
