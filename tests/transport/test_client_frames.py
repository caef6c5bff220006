"""The Python client's WebSocket transport (nkservice.client.transports) against a raw
server (tests.transport.rawws): how it answers close frames and frames it must refuse."""

from __future__ import annotations

import asyncio

import pytest

from nkservice.client.transports import Transport, open_transport
from tests.transport.rawws import (
    BINARY,
    CLOSE,
    CONTINUATION,
    TEXT,
    Frame,
    RawPeer,
    RawServer,
    frame_bytes,
)

WAIT = 5.0


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lost = asyncio.Event()

    def connection_made(self, transport: Transport) -> None:
        pass

    def message_received(self, data: bytes) -> None:
        self.messages.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def client_answer(*frames: bytes) -> tuple[Frame, Recorder]:
    """Connect the client to a raw server that writes `frames`; the client's answer (the
    first frame it sends back), and what the client's peer saw."""
    answers: asyncio.Queue[Frame] = asyncio.Queue()

    async def handler(peer: RawPeer) -> None:
        await peer.write(b"".join(frames))
        answers.put_nowait(await peer.recv_frame())
        await peer.wait_disconnected()

    recorder = Recorder()
    async with RawServer(handler) as server:
        await open_transport(f"ws://127.0.0.1:{server.port}/", recorder)
        async with asyncio.timeout(WAIT):
            answer = await answers.get()
            await recorder.lost.wait()
        assert server.errors == []
    return answer, recorder


def server_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    return frame_bytes(opcode, payload, fin=fin, rsv=rsv, mask=False)


async def test_a_close_without_a_code_is_answered_1000_not_0() -> None:
    answer, _ = await client_answer(server_frame(CLOSE))
    assert answer.opcode == CLOSE and answer.payload == b"\x03\xe8"


@pytest.mark.parametrize("code", [1000, 1001, 1011, 3000, 4999])
async def test_a_close_code_that_may_be_sent_is_echoed(code: int) -> None:
    answer, _ = await client_answer(server_frame(CLOSE, code.to_bytes(2, "big") + b"bye"))
    assert answer.close_code == code


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2000, 5000, 65535])
async def test_a_close_code_nobody_may_send_is_answered_1002(code: int) -> None:
    answer, _ = await client_answer(server_frame(CLOSE, code.to_bytes(2, "big")))
    assert answer.close_code == 1002


@pytest.mark.parametrize("rsv", [1, 2, 4])
async def test_reserved_bits_are_answered_1002(rsv: int) -> None:
    answer, recorder = await client_answer(server_frame(TEXT, b"{}", rsv=rsv))
    assert answer.close_code == 1002
    assert recorder.messages == []


async def test_a_new_message_inside_a_fragmented_one_is_answered_1002() -> None:
    answer, recorder = await client_answer(server_frame(TEXT, b'{"a":', fin=False),
                                           server_frame(BINARY, b"{}"))
    assert answer.close_code == 1002
    assert recorder.messages == []


async def test_a_continuation_with_no_message_is_answered_1002() -> None:
    answer, _ = await client_answer(server_frame(CONTINUATION, b"{}"))
    assert answer.close_code == 1002


async def test_fragments_are_joined_then_a_clean_close() -> None:
    answer, recorder = await client_answer(server_frame(TEXT, b'{"a":', fin=False),
                                           server_frame(CONTINUATION, b"1}"),
                                           server_frame(CLOSE, b"\x03\xe8"))
    assert recorder.messages == [b'{"a":1}']
    assert answer.close_code == 1000
