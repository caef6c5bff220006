"""A raw RFC 6455 peer for tests, independent of picows and of nkservice: frames are built and
parsed here, byte by byte, over a plain asyncio protocol.

`RawClient` does the opening handshake, then sends whatever frame a test asks for — reserved
bits, reserved opcodes, fragments out of order, close frames of any payload, a length header
with no payload behind it — masked as a client must (or not, if asked), and reads the server's
frames with their close code and reason. `RawServer` is the other side: it accepts one
WebSocket client, writes unmasked server frames and reads the client's masked ones.

Bytes that arrived before the peer reset the connection stay readable (asyncio's
StreamReader would raise the reset first): a server that answers, then closes while the
client is still sending, resets the connection, and the test must still see the answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
TIMEOUT = 5.0
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Closed(Exception):
    """The connection ended before what was asked for arrived."""


@dataclass(frozen=True)
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0  # the three reserved bits, RSV1 = 4, RSV2 = 2, RSV3 = 1

    @property
    def close_code(self) -> int | None:
        """The status code of a close frame, None if it has none."""
        assert self.opcode == CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> bytes:
        assert self.opcode == CLOSE
        return self.payload[2:]


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key (RFC 6455 §5.3), done on one big integer."""
    if not payload:
        return payload
    size = len(payload)
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        size, "little")


def frame_bytes(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                mask: bool = True, length: int | None = None) -> bytes:
    """One frame. `length` overrides the length field (to announce more than is sent)."""
    size = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F])
    flag = 0x80 if mask else 0
    if size < 126:
        head.append(flag | size)
    elif size < 1 << 16:
        head.append(flag | 126)
        head += struct.pack("!H", size)
    else:
        head.append(flag | 127)
        head += struct.pack("!Q", size)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + mask_payload(payload, key)


def close_payload(code: int | None = None, reason: bytes = b"") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason


class _Stream(asyncio.Protocol):
    """Bytes in a buffer, with end of stream and flow control; no exception hides data."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ended = False
        self.transport: asyncio.Transport | None = None
        self._changed = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._changed.set()

    def eof_received(self) -> bool:
        self.ended = True
        self._changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._changed.set()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def wait_writable(self) -> None:
        await self._can_write.wait()

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if self.ended:
                raise Closed(f"connection ended with {len(self.buffer)} of {size} bytes")
            self._changed.clear()
            await self._changed.wait()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_until(self, marker: bytes, limit: int = 65536) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            if self.ended or len(self.buffer) > limit:
                raise Closed(f"no {marker!r} in {bytes(self.buffer[:200])!r}")
            self._changed.clear()
            await self._changed.wait()
        return await self.read_exactly(end + len(marker))

    async def wait_ended(self) -> None:
        while not self.ended:
            self._changed.clear()
            await self._changed.wait()


class RawPeer:
    """What both ends share: writing raw bytes, reading frames."""

    def __init__(self, stream: _Stream, *, masks: bool) -> None:
        self._stream = stream
        self._masks = masks

    @property
    def transport(self) -> asyncio.Transport:
        assert self._stream.transport is not None
        return self._stream.transport

    async def write(self, data: bytes) -> None:
        """Raw bytes, as they are; waits while the socket's buffer is full."""
        if self._stream.ended:
            raise Closed("connection ended")
        self.transport.write(data)
        await self._stream.wait_writable()

    async def send(self, opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                   mask: bool | None = None, length: int | None = None) -> None:
        await self.write(frame_bytes(opcode, payload, fin=fin, rsv=rsv, length=length,
                                     mask=self._masks if mask is None else mask))

    async def send_text(self, text: str | bytes) -> None:
        await self.send(TEXT, text.encode() if isinstance(text, str) else text)

    async def send_close(self, code: int | None = None, reason: bytes = b"") -> None:
        await self.send(CLOSE, close_payload(code, reason))

    async def recv_frame(self, timeout: float = TIMEOUT) -> Frame:
        async with asyncio.timeout(timeout):
            read = self._stream.read_exactly
            b0, b1 = await read(2)
            size = b1 & 0x7F
            if size == 126:
                size = struct.unpack("!H", await read(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", await read(8))[0]
            key = await read(4) if b1 & 0x80 else None
            payload = await read(size)
        if key is not None:
            payload = mask_payload(payload, key)
        return Frame(b0 & 0x0F, payload, bool(b0 & 0x80), b0 >> 4 & 7)

    async def recv_until_close(self, timeout: float = TIMEOUT) -> tuple[list[Frame], Frame]:
        """The frames before the peer's close frame, and the close frame."""
        frames = []
        async with asyncio.timeout(timeout):
            while (frame := await self.recv_frame(timeout)).opcode != CLOSE:
                frames.append(frame)
        return frames, frame

    async def recv_close(self, timeout: float = TIMEOUT) -> Frame:
        """The peer's close frame; it must be the next frame."""
        frame = await self.recv_frame(timeout)
        assert frame.opcode == CLOSE, frame
        return frame

    async def wait_disconnected(self, timeout: float = TIMEOUT) -> bytes:
        """Wait for the end of the TCP connection; the bytes left unread."""
        async with asyncio.timeout(timeout):
            await self._stream.wait_ended()
        left = bytes(self._stream.buffer)
        self._stream.buffer.clear()
        return left

    def close(self) -> None:
        if self._stream.transport is not None:
            self._stream.transport.close()


class RawClient(RawPeer):
    """A WebSocket client made of bytes; `connect` does the opening handshake."""

    response_head: bytes = b""

    @classmethod
    async def connect(cls, host: str, port: int, path: str = "/", *,
                      ssl_context: ssl.SSLContext | None = None) -> RawClient:
        client = await cls.open(host, port, ssl_context=ssl_context)
        await client.handshake(path, f"{host}:{port}")
        return client

    @classmethod
    async def open(cls, host: str, port: int, *,
                   ssl_context: ssl.SSLContext | None = None) -> RawClient:
        """A TCP (or TLS) connection with no handshake yet."""
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_connection(_Stream, host, port, ssl=ssl_context)
        return cls(stream, masks=True)

    async def handshake(self, path: str, host: str, *, piece: int = 0) -> None:
        """The opening handshake; `piece`: write the request that many bytes at a time."""
        key = base64.b64encode(os.urandom(16))
        request = (b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                   b"Sec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), host.encode(), key))
        piece = piece or len(request)
        for start in range(0, len(request), piece):
            await self.write(request[start:start + piece])
            if piece < len(request):
                await asyncio.sleep(0.001)  # each piece its own read on the server
        async with asyncio.timeout(TIMEOUT):
            head = await self._stream.read_until(b"\r\n\r\n")
        self.response_head = head
        assert head.startswith(b"HTTP/1.1 101"), head
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        assert b"sec-websocket-accept: " + accept.lower() in head.lower(), head


class RawServer:
    """Accepts WebSocket clients on 127.0.0.1; each one is handed to `handler` after the
    opening handshake, as a `RawPeer` that writes unmasked frames."""

    def __init__(self, handler: Callable[[RawPeer], Awaitable[None]]) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.errors: list[BaseException] = []  # what the handlers raised

    async def __aenter__(self) -> RawServer:
        loop = asyncio.get_running_loop()

        def accepted() -> _Stream:
            stream = _Stream()
            task = loop.create_task(self._serve(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return stream

        self._server = await loop.create_server(accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, stream: _Stream) -> None:
        peer = RawPeer(stream, masks=False)
        async with asyncio.timeout(TIMEOUT):
            request = await stream.read_until(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        await peer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept)
        try:
            await self._handler(peer)
        except Exception as exc:
            self.errors.append(exc)
        finally:
            peer.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
