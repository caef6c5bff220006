"""The newline-JSON transport over a socket pair: framing, the answers to one read written
together, the size limit, and the last line that says why the server closed."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.connection import Connection, Limits, Wire
from nkservice.protocol.messages import Request
from nkservice.transport.lines import LineProtocol


class Echo:
    """A request handler that answers every request with its own data; `bye` closes."""

    def __init__(self) -> None:
        self.conn: Connection | None = None

    def on_request(self, request: Request) -> None:
        assert self.conn is not None
        if request.cmd == "bye":
            self.conn.reply(request.tid)
            self.conn.close("as asked")
        elif request.cmd == "fail":
            self.conn.reply_error(request.tid, ApiError(ErrorCode.invalid_value, "x"))
        else:
            self.conn.reply(request.tid, request.data)

    def on_closed(self) -> None:
        pass


Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def peer() -> AsyncIterator[Pair]:
    """A `LineProtocol` on one end of a socket pair; a plain stream on the other."""
    server_sock, client_sock = socket.socketpair()
    loop = asyncio.get_running_loop()

    def accept(wire: Wire, clock: Callable[[], float], transport: str, host: str,
               port: int) -> Connection:
        echo = Echo()
        echo.conn = Connection(Limits(max_message_size=64, login_timeout=60), wire, clock,
                               echo)
        return echo.conn

    await loop.connect_accepted_socket(lambda: LineProtocol(accept, "tcp"), server_sock)
    reader, writer = await asyncio.open_connection(sock=client_sock)
    yield reader, writer
    writer.close()


async def lines(reader: asyncio.StreamReader, count: int) -> list[Any]:
    async with asyncio.timeout(5):
        return [json.loads(await reader.readline()) for _ in range(count)]


async def test_lines_split_anywhere_and_pipelined(peer: Pair) -> None:
    reader, writer = peer
    stream = b'{"class":"x","cmd":"a","tid":1,"data":1}\r\n\n  \n{"class":"x","cmd":"a","tid":2}\n'
    for n in range(0, len(stream), 7):  # bytes in small pieces, lines across them
        writer.write(stream[n:n + 7])
        await writer.drain()
    assert await lines(reader, 2) == [{"result": "ok", "tid": 1, "data": 1},
                                      {"result": "ok", "tid": 2}]


async def test_a_line_over_the_limit_is_answered_then_closed_with_a_reason(peer: Pair) -> None:
    reader, writer = peer
    writer.write(b'{"class":"x","cmd":"a","tid":1,"data":"' + b"y" * 100 + b'"}\n')
    assert await lines(reader, 2) == [
        {"result": "error", "tid": None, "data": {"code": 100077, "error": "Message too large"}},
        {"result": "error", "tid": None,
         "data": {"code": 100081, "error": "Connection closed: message too large"}}]
    assert await reader.read() == b""


async def test_a_close_by_the_server_ends_with_the_reason(peer: Pair) -> None:
    reader, writer = peer
    writer.write(b'{"class":"x","cmd":"fail","tid":1}\n{"class":"x","cmd":"bye","tid":2}\n')
    assert await lines(reader, 3) == [
        {"result": "error", "tid": 1, "data": {"code": 100046, "error": "Invalid value: x"}},
        {"result": "ok", "tid": 2},
        {"result": "error", "tid": None,
         "data": {"code": 100081, "error": "Connection closed: as asked"}}]
    assert await reader.read() == b""
