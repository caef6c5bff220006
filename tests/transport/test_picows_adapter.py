"""nkservice.transport.picows_adapter on its own: the private picows constructor it calls still
works with the installed picows (a handshake and an echo through it, over a real socket), the
installed version is in the range pyproject.toml pins, and its RFC 6455 helpers."""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from picows import WSFrame, WSMsgType, WSTransport, WSUpgradeRequest

from nkservice.transport.picows_adapter import (
    MAX_REASON,
    GuardedListener,
    close_answer,
    close_code_allowed,
    close_reason,
    server_protocol,
)
from tests.transport.rawws import BINARY, TEXT, Frame, RawClient, frame_bytes

LIMIT = 1000


class Echo(GuardedListener):
    """Sends each data frame back as it came (the default `frame_too_large` and `fail`)."""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            transport.send(frame.msg_type, frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(*close_answer(frame.payload_size, frame.get_close_code()))
            transport.disconnect()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    def route(request: WSUpgradeRequest) -> Echo | None:
        return Echo() if request.path == b"/echo" else None

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: server_protocol(route, LIMIT, logging.getLogger("test.picows")), "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_handshake_and_echo_through_the_built_protocol(port: int) -> None:
    client = await RawClient.connect("127.0.0.1", port, "/echo")
    await client.send(TEXT, b"hello")
    await client.send(BINARY, b"\x00\xff" * 400)
    assert await client.recv_frame() == Frame(TEXT, b"hello")
    assert await client.recv_frame() == Frame(BINARY, b"\x00\xff" * 400)
    await client.send_close(1000)
    assert (await client.recv_close()).close_code == 1000
    assert await client.wait_disconnected() == b""


async def test_an_unknown_path_gets_a_404(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n" + frame_bytes(TEXT, b"x" * 5000))
    async with asyncio.timeout(5):
        assert (await reader.readline()).startswith(b"HTTP/1.1 404")
    writer.close()


async def test_by_default_a_frame_over_the_limit_is_closed_1009(port: int) -> None:
    client = await RawClient.connect("127.0.0.1", port, "/echo")
    await client.send(TEXT, b"x" * LIMIT)
    assert await client.recv_frame() == Frame(TEXT, b"x" * LIMIT)
    await client.send(TEXT, b"x" * (LIMIT + 1))
    frames, close = await client.recv_until_close()
    assert frames == [] and close.close_code == 1009


async def test_by_default_a_protocol_error_is_closed_1002_with_its_reason(port: int) -> None:
    client = await RawClient.connect("127.0.0.1", port, "/echo")
    await client.send(TEXT, b"x", rsv=4)
    close = await client.recv_close()
    assert close.close_code == 1002
    assert close.close_reason == b"reserved bits set with no extension negotiated"


def test_the_installed_picows_is_in_the_pinned_range() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pins = [Requirement(dependency) for dependency in pyproject["project"]["dependencies"]]
    pin = next(pin for pin in pins if pin.name == "picows")
    assert metadata.version("picows") in pin.specifier
    assert any(spec.operator == "<" for spec in pin.specifier), "picows must have an upper bound"


@pytest.mark.parametrize(("code", "allowed"), [
    (0, False), (999, False), (1000, True), (1003, True), (1004, False), (1005, False),
    (1006, False), (1007, True), (1014, True), (1015, False), (1016, False), (2999, False),
    (3000, True), (4999, True), (5000, False), (65535, False)])
def test_close_codes_a_peer_may_send(code: int, allowed: bool) -> None:
    assert close_code_allowed(code) is allowed
    answer, reason = close_answer(2, code)
    assert answer.value == (code if allowed else 1002)
    assert bool(reason) is not allowed


def test_a_close_without_a_code_is_answered_1000() -> None:
    answer, reason = close_answer(0, 0)
    assert (answer.value, reason) == (1000, b"")


def test_close_reasons_are_cut_between_characters() -> None:
    assert close_reason("bye") == b"bye"
    cut = close_reason("é" * 100)
    assert len(cut) <= MAX_REASON and cut.decode() == "é" * (MAX_REASON // 2)
