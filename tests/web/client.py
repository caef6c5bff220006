"""A small HTTP/1.1 client over real sockets (h11), for the tests of the node's pages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


async def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                timeout: float = 5.0) -> Reply:
    """One request on a connection of its own."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            return await exchange(reader, writer, method, parts.path or "/",
                                  {"host": parts.netloc, **(headers or {})})
        finally:
            writer.close()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
                   target: str, headers: dict[str, str]) -> Reply:
    """Send one request on an open connection and read its answer."""
    conn = h11.Connection(h11.CLIENT)
    writer.write(conn.send(h11.Request(method=method, target=target,
                                       headers=list(headers.items()))) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    return await read_reply(conn, reader, head_only=method == "HEAD")


async def read_reply(conn: h11.Connection, reader: asyncio.StreamReader, *,
                     head_only: bool = False) -> Reply:
    status, got, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            got = {name.decode(): value.decode() for name, value in event.headers}
            if head_only:
                return Reply(status, got, b"")
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return Reply(status, got, body)
