"""A tcp and a ws URL on one port (PROTOCOL.md §2): an HTTP request line is HTTP, anything else
is newline JSON with the answers of §1.4, however the first line is cut into reads.

The `demo` service of `make_node` listens on tcp and ws with port 0 each (tls and wss too):
they share one port, and every connection to it is sniffed.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import NodeFactory, url_of
from tests.transport.rawws import TEXT, RawClient

WAIT = 5.0
INVALID_JSON = {"result": "error", "tid": None, "data": {"code": 100072, "error": "Invalid JSON"}}
LOGIN = (b'{"class":"core","subclass":"user","cmd":"login","tid":1,'
         b'"data":{"user":"alice","password":"pw1"}}\n')


async def shared_port(make_node: NodeFactory, secure: bool = False) -> tuple[str, int]:
    node = await make_node(demo={})
    lines, websocket = ("tls", "wss") if secure else ("tcp", "ws")
    parts = urlsplit(url_of(node, "demo", lines))
    assert parts.hostname is not None and parts.port is not None
    assert urlsplit(url_of(node, "demo", websocket)).port == parts.port  # one socket, sniffed
    return parts.hostname, parts.port


async def open_stream(host: str, port: int, context: ssl.SSLContext | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, ssl=context)


async def send_in_pieces(writer: asyncio.StreamWriter, data: bytes, piece: int) -> None:
    for start in range(0, len(data), piece):
        writer.write(data[start:start + piece])
        await writer.drain()
        await asyncio.sleep(0.001)  # each piece its own read on the server


async def read_json_line(reader: asyncio.StreamReader) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        line = await reader.readline()
    message = json.loads(line)
    assert isinstance(message, dict), line
    return message


@pytest.mark.parametrize("first_line", [b"HELLO\n", b"Xyz {}\n", b"hello\n", b"GET\n",
                                        b"GET / HTTP/2.0\r\n", b"POST /x HTTP/1.1 extra\n"])
@pytest.mark.parametrize("secure", [False, True])
async def test_a_first_line_that_is_not_a_request_line_is_newline_json(
        make_node: NodeFactory, client_tls: ssl.SSLContext, first_line: bytes,
        secure: bool) -> None:
    host, port = await shared_port(make_node, secure)
    reader, writer = await open_stream(host, port, client_tls if secure else None)
    writer.write(first_line)
    assert await read_json_line(reader) == INVALID_JSON  # at once, not after a silence
    writer.write(LOGIN)  # the connection stays open (§1.4)
    login = await read_json_line(reader)
    assert login["result"] == "ok" and login["tid"] == 1
    writer.close()


async def test_a_first_line_cut_in_pieces_of_one_byte(make_node: NodeFactory) -> None:
    host, port = await shared_port(make_node)
    reader, writer = await open_stream(host, port)
    await send_in_pieces(writer, b"HELLO\n", 1)
    assert await read_json_line(reader) == INVALID_JSON
    writer.close()


async def test_a_json_login_in_one_byte_writes(make_node: NodeFactory) -> None:
    host, port = await shared_port(make_node)
    reader, writer = await open_stream(host, port)
    await send_in_pieces(writer, LOGIN, 1)
    login = await read_json_line(reader)
    assert login["result"] == "ok" and login["data"]["user"] == "alice"
    writer.close()


@pytest.mark.parametrize("piece", [1, 2, 5])
async def test_a_websocket_handshake_in_small_writes(make_node: NodeFactory, piece: int) -> None:
    host, port = await shared_port(make_node)
    client = await RawClient.open(host, port)
    try:
        await client.handshake("/", f"{host}:{port}", piece=piece)
        await client.send_text(LOGIN.strip())
        frame = await client.recv_frame()
        assert frame.opcode == TEXT and json.loads(frame.payload)["result"] == "ok"
    finally:
        client.close()


async def test_other_http_requests_get_a_404_in_small_writes(make_node: NodeFactory) -> None:
    host, port = await shared_port(make_node)
    reader, writer = await open_stream(host, port)
    await send_in_pieces(writer, b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n", 3)
    async with asyncio.timeout(WAIT):
        assert (await reader.readline()).startswith(b"HTTP/1.1 404")
    writer.close()


def test_the_decision_waits_only_while_a_request_line_is_possible() -> None:
    from nkservice.transport.listener import is_http

    assert is_http(b"GET / HTTP/1.1\r\n") is True
    assert is_http(b"OPTIONS * HTTP/1.0\n") is True
    for prefix in (b"G", b"GE", b"GET", b"GET ", b"GET /", b"GET / HTTP/1.", b"GET / HTTP/1.1\r",
                   b"HELLO", b"hello"):
        assert is_http(prefix) is None, prefix
    for start in (b"{", b" GET", b"GET  /", b"GET / HTTP/2", b"GET / HTTP/1.1 ", b"HELLO\n",
                  b"\n", b"x" * 9000):
        assert is_http(start) is False, start
