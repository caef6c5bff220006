"""Sessions from a blocking client, for tests that count what the garbage collector finds.

The client runs in a thread (`asyncio.to_thread`): plain sockets, `ssl` for tls and wss,
WebSocket frames written and read here. Neither the thread nor these sockets leave
anything for the collector (tests/transport/test_cycles.py checks it), so whatever a
collection finds after them is the server's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

TIMEOUT = 10.0
_KEY = base64.b64encode(b"nkservice-tests!").decode()
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


@dataclass
class Client:
    """One connection of the blocking client."""

    url: str
    context: ssl.SSLContext | None = None
    sock: socket.socket | None = None
    _buffer: bytes = field(default=b"", repr=False)

    @property
    def websocket(self) -> bool:
        return urlsplit(self.url).scheme in ("ws", "wss")

    def connect(self) -> Client:
        parts = urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        sock = socket.create_connection((parts.hostname, parts.port), TIMEOUT)
        if parts.scheme in ("tls", "wss"):
            assert self.context is not None
            sock = self.context.wrap_socket(sock, server_hostname=parts.hostname)
        self.sock = sock
        if self.websocket:
            sock.sendall(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                         .encode())
            head = self._read_until(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
        return self

    def send(self, message: dict[str, Any]) -> None:
        assert self.sock is not None
        data = json.dumps(message).encode()
        if not self.websocket:
            self.sock.sendall(data + b"\n")
            return
        size = len(data)  # a masked text frame, the all-zero mask
        header = bytes((0x81, 0x80 | size)) if size < 126 else (
            bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big"))
        self.sock.sendall(header + b"\0\0\0\0" + data)

    def recv(self) -> dict[str, Any] | None:
        """The next message; None once the server closed (a close frame, or the end)."""
        if not self.websocket:
            line = self._read_until(b"\n")
            return json.loads(line) if line else None
        while True:
            header = self._read(2)
            if len(header) < 2:
                return None
            opcode, size = header[0] & 0x0F, header[1] & 0x7F
            if size == 126:
                size = int.from_bytes(self._read(2), "big")
            elif size == 127:
                size = int.from_bytes(self._read(8), "big")
            payload = self._read(size)
            if opcode == 0x8:
                return None
            if opcode in (0x1, 0x2):
                message: dict[str, Any] = json.loads(payload)
                return message

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request; its answer (server requests in between are skipped)."""
        self.send(message)
        while True:
            answer = self.recv()
            assert answer is not None, f"closed before the answer to {message}"
            if answer.get("tid") == message["tid"] and "result" in answer:
                return answer

    def login(self, user: str, password: str, session_id: str | None = None
              ) -> dict[str, Any]:
        data = {"user": user, "password": password}
        if session_id is not None:
            data["session_id"] = session_id
        answer = self.request({"class": "core", "cmd": "login", "tid": 1, "data": data})
        assert answer["result"] == "ok", answer
        result: dict[str, Any] = answer["data"]
        return result

    def wait_closed(self) -> None:
        """Until the server ends the connection."""
        while self.recv() is not None:
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def reset(self) -> None:
        """Drop the connection with a reset (no FIN, no TLS close_notify)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.close()

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                break
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            if not self._fill():
                data, self._buffer = self._buffer, b""
                return data
        data, _, self._buffer = self._buffer.partition(marker)
        return data

    def _fill(self) -> bool:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            data = b""
        self._buffer += data
        return bool(data)


def sessions(url: str, count: int, ending: str, *, user: str, password: str,
             context: ssl.SSLContext | None = None) -> list[Client]:
    """`count` sessions on `url`, one after the other: connect, log in, then `ending`:
    `close` (the client closes), `reset` (the client drops it), `replaced` (a second
    connection logs in with the same session id: the server closes the first; then the
    second is closed), `resumed` (dropped, then a new connection resumes it, then closed),
    `hold` (left open: returned)."""
    held = []
    for _ in range(count):
        client = Client(url, context).connect()
        session_id = client.login(user, password)["session_id"]
        if ending == "hold":
            held.append(client)
        elif ending == "close":
            client.close()
        elif ending == "reset":
            client.reset()
        elif ending in ("replaced", "resumed"):
            if ending == "resumed":
                client.reset()
            second = Client(url, context).connect()
            answer = second.login(user, password, session_id)
            assert answer["session_id"] == session_id, answer
            if ending == "replaced":
                client.wait_closed()
            second.close()
        else:
            raise ValueError(ending)
    return held
