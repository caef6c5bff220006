"""The WebSocket transport against raw frames (RFC 6455, PROTOCOL.md §1.4, §2): closing
handshakes, reserved bits and opcodes, fragmentation, UTF-8, frames over the size limit.

Each test talks to a node's `demo` service with `tests.transport.rawws`, frames written by
hand; the Autobahn TestSuite case each one mirrors is named where there is one.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from nkservice.node import Node
from tests.conftest import NodeFactory, url_of
from tests.transport.rawws import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    Closed,
    Frame,
    RawClient,
    close_payload,
    frame_bytes,
)

PING_REQUEST = b'{"class":"core","cmd":"ping","tid":%d}'
TOO_LARGE = {"result": "error", "tid": None,
             "data": {"code": 100077, "error": "Message too large"}}

Connect = Callable[..., Awaitable[RawClient]]


@pytest.fixture(params=["ws", "wss"])
async def raw(request: pytest.FixtureRequest, make_node: NodeFactory,
              client_tls: ssl.SSLContext) -> AsyncIterator[Connect]:
    """Connect raw WebSocket clients to the `demo` service (its options as keywords; one node
    per set of options)."""
    scheme: str = request.param
    clients: list[RawClient] = []
    nodes: dict[str, Node] = {}

    async def connect(**options: Any) -> RawClient:
        key = json.dumps(options, sort_keys=True)
        if key not in nodes:
            nodes[key] = await make_node(demo=options)
        parts = urlsplit(url_of(nodes[key], "demo", scheme))
        assert parts.hostname is not None and parts.port is not None
        client = await RawClient.connect(parts.hostname, parts.port, parts.path or "/",
                                         ssl_context=client_tls if scheme == "wss" else None)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def answer(frame: Frame) -> dict[str, Any]:
    assert frame.opcode == TEXT and frame.fin, frame
    message = json.loads(frame.payload)
    assert isinstance(message, dict)
    return message


async def assert_failed(client: RawClient, code: int) -> Frame:
    """The server's next frame is a close with `code`, then the connection ends."""
    close = await client.recv_close()
    assert close.close_code == code, close
    assert await client.wait_disconnected() == b""
    return close


# -- closing handshake (Autobahn 7.x) ----------------------------------------------------------

async def test_close_without_a_code_is_answered_1000_not_0(raw: Connect) -> None:
    # 7.3.1. RFC 6455 §7.4: code 0 must never be sent; the answer was 88 02 00 00.
    client = await raw()
    await client.send_close()
    close = await client.recv_close()
    assert close.payload == b"\x03\xe8"
    assert await client.wait_disconnected() == b""


async def test_a_close_code_that_may_be_sent_is_echoed(raw: Connect) -> None:
    # 7.7.x
    for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000,
                 3999, 4000, 4999):
        client = await raw()
        await client.send_close(code, b"bye")
        assert (await client.recv_close()).close_code == code


async def test_a_close_code_nobody_may_send_is_answered_1002(raw: Connect) -> None:
    # 7.9.x, 7.13.x
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
        client = await raw()
        await client.send_close(code)
        close = await assert_failed(client, 1002)
        assert close.close_code == 1002, code


async def test_a_close_payload_of_one_byte_is_answered_1002(raw: Connect) -> None:
    # 7.3.2
    client = await raw()
    await client.send(CLOSE, b"\x03")
    await assert_failed(client, 1002)


async def test_a_close_reason_that_is_not_utf8_is_answered_1007(raw: Connect) -> None:
    # 7.5.1
    client = await raw()
    await client.send_close(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80")
    await assert_failed(client, 1007)


async def test_a_second_close_frame_is_ignored(raw: Connect) -> None:
    # 7.1.2: both close frames in one write; picows alone answered the second with 1002.
    client = await raw()
    await client.write(frame_bytes(CLOSE, close_payload(1000)) + frame_bytes(CLOSE))
    frames, close = await client.recv_until_close()
    assert frames == [] and close.close_code == 1000
    assert await client.wait_disconnected() == b""


async def test_frames_after_the_close_frame_are_ignored(raw: Connect) -> None:
    # 7.1.3-7.1.5
    client = await raw()
    await client.write(frame_bytes(TEXT, PING_REQUEST % 1) + frame_bytes(CLOSE, close_payload(1000))
                       + frame_bytes(TEXT, PING_REQUEST % 2) + frame_bytes(PING, b"x"))
    frames, close = await client.recv_until_close()
    assert [answer(frame) for frame in frames] == [{"result": "ok", "tid": 1}]
    assert close.close_code == 1000
    assert await client.wait_disconnected() == b""


# -- reserved bits and opcodes (Autobahn 3.x, 4.x) ---------------------------------------------

async def test_reserved_bits_fail_the_connection_with_1002(raw: Connect) -> None:
    # 3.1-3.7: the frames before the bad one are still answered, nothing after it.
    for opcode, rsv in [(TEXT, rsv) for rsv in range(1, 8)] + [(BINARY, 4), (PING, 2)]:
        client = await raw()
        await client.write(frame_bytes(TEXT, PING_REQUEST % 1)
                           + frame_bytes(opcode, PING_REQUEST % 2, rsv=rsv)
                           + frame_bytes(TEXT, PING_REQUEST % 3))
        frames, close = await client.recv_until_close()
        assert [answer(frame) for frame in frames] == [{"result": "ok", "tid": 1}], rsv
        assert close.close_code == 1002
        assert await client.wait_disconnected() == b""


async def test_reserved_opcodes_fail_the_connection_with_1002(raw: Connect) -> None:
    # 4.1.x, 4.2.x
    for opcode in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF):
        client = await raw()
        await client.write(frame_bytes(TEXT, PING_REQUEST % 1) + frame_bytes(opcode, b"x"))
        frames, close = await client.recv_until_close()
        assert [answer(frame) for frame in frames] == [{"result": "ok", "tid": 1}], opcode
        assert close.close_code == 1002


async def test_an_unmasked_client_frame_fails_the_connection(raw: Connect) -> None:
    client = await raw()
    await client.send(TEXT, PING_REQUEST % 1, mask=False)
    await assert_failed(client, 1002)


async def test_fragmented_or_long_control_frames_fail_the_connection(raw: Connect) -> None:
    # 2.5, 5.1, 5.2
    for opcode in (PING, PONG, CLOSE):
        client = await raw()
        await client.send(opcode, b"x", fin=False)
        await assert_failed(client, 1002)
        client = await raw()
        await client.send(opcode, b"x" * 126)
        await assert_failed(client, 1002)


# -- fragmentation (Autobahn 5.x) --------------------------------------------------------------

async def test_a_new_message_inside_a_fragmented_one_fails_with_1002(raw: Connect) -> None:
    # 5.18: the second text frame used to start a new message.
    for second in (TEXT, BINARY):
        client = await raw()
        await client.send(TEXT, b'{"class":"core",', fin=False)
        await client.send(second, PING_REQUEST % 1)
        await assert_failed(client, 1002)


async def test_a_continuation_with_no_message_fails_with_1002(raw: Connect) -> None:
    # 5.9-5.14
    client = await raw()
    await client.send(CONTINUATION, PING_REQUEST % 1)
    await assert_failed(client, 1002)


async def test_control_frames_between_fragments(raw: Connect) -> None:
    # 5.6-5.8, 5.19-5.20
    client = await raw()
    await client.send(TEXT, b'{"class":"core",', fin=False)
    await client.send(PING, b"ping 1")
    await client.send(PONG, b"unsolicited")
    await client.send(CONTINUATION, b'"cmd":"ping",', fin=False)
    await client.send(PING, b"ping 2")
    await client.send(CONTINUATION, b'"tid":7}')
    frames = [await client.recv_frame() for _ in range(3)]
    assert frames[:2] == [Frame(PONG, b"ping 1"), Frame(PONG, b"ping 2")]
    assert answer(frames[2]) == {"result": "ok", "tid": 7}


async def test_invalid_utf8_fails_at_the_bad_fragment(raw: Connect) -> None:
    # 6.4.1-6.4.4: the message is never finished; the close comes anyway.
    client = await raw()
    await client.send(TEXT, "κόσμε".encode(), fin=False)
    await client.send(CONTINUATION, b"\xed\xa0\x80", fin=False)  # a UTF-16 surrogate
    await assert_failed(client, 1007)


async def test_utf8_split_inside_a_character_across_fragments(raw: Connect) -> None:
    # 6.2.3, 6.2.4
    client = await raw()
    message = '{"class":"core","cmd":"ping","tid":"κόσμε"}'.encode()
    cut = message.index("ό".encode()) + 1
    await client.send(TEXT, message[:cut], fin=False)
    await client.send(CONTINUATION, message[cut:])
    assert answer(await client.recv_frame()) == {"result": "ok", "tid": "κόσμε"}


async def test_a_text_message_cut_inside_its_last_character_fails_with_1007(raw: Connect) -> None:
    client = await raw()
    await client.send(TEXT, b'"\xce', fin=False)
    await client.send(CONTINUATION, b"")
    await assert_failed(client, 1007)


# -- size limit (PROTOCOL.md §1.4) -------------------------------------------------------------

async def test_a_frame_just_over_the_limit_gets_message_too_large_then_1009(
        raw: Connect) -> None:
    client = await raw(max_message_size=1000)
    await client.send(TEXT, b"x" * 1001)
    frames, close = await client.recv_until_close()
    assert [answer(frame) for frame in frames] == [TOO_LARGE]
    assert close.close_code == 1009


async def test_a_frame_far_over_the_limit_gets_message_too_large_then_1009(
        raw: Connect) -> None:
    # picows used to cut frames over 2 x limit + 1024 with a bare 1009.
    client = await raw(max_message_size=1000)
    await client.send(BINARY, b"x" * 10_000)
    frames, close = await client.recv_until_close()
    assert [answer(frame) for frame in frames] == [TOO_LARGE]
    assert close.close_code == 1009


async def test_a_100_mb_frame_is_answered_from_its_header(raw: Connect) -> None:
    # The answer comes before the payload: it is never read into memory.
    client = await raw()
    await client.write(frame_bytes(TEXT, b"x" * 1000, length=100 * 1024 * 1024))
    frames, close = await client.recv_until_close()
    assert [answer(frame) for frame in frames] == [TOO_LARGE]
    assert close.close_code == 1009


async def test_a_100_mb_frame_sent_in_full_is_cut_off(raw: Connect) -> None:
    client = await raw()
    chunk = b"x" * (1 << 20)
    reading = asyncio.ensure_future(client.recv_until_close(timeout=20))
    try:
        await client.write(frame_bytes(TEXT, chunk, length=100 << 20))
        for _ in range(99):
            await client.write(chunk)
    except (Closed, ConnectionError):
        pass  # the server hung up while we were still sending
    frames, close = await reading
    assert [answer(frame) for frame in frames] == [TOO_LARGE]
    assert close.close_code == 1009


async def test_frames_before_a_frame_over_the_limit_are_answered(raw: Connect) -> None:
    client = await raw(max_message_size=1000)
    await client.write(frame_bytes(TEXT, PING_REQUEST % 1)
                       + frame_bytes(TEXT, b"x" * 70_000)  # a 64-bit length
                       + frame_bytes(TEXT, PING_REQUEST % 2))
    frames, close = await client.recv_until_close()
    assert [answer(frame) for frame in frames] == [{"result": "ok", "tid": 1}, TOO_LARGE]
    assert close.close_code == 1009


async def test_a_fragmented_message_over_the_limit(raw: Connect) -> None:
    client = await raw(max_message_size=1000)
    await client.send(TEXT, b"x" * 600, fin=False)
    await client.send(CONTINUATION, b"x" * 600)
    frames, close = await client.recv_until_close()
    assert [answer(frame) for frame in frames] == [TOO_LARGE]
    assert close.close_code == 1009


# -- the frame walk: lengths of every size, pipelined and cut anywhere -------------------------

def request(tid: int, pad: int) -> bytes:
    return json.dumps({"class": "core", "cmd": "ping", "tid": tid, "data": {"pad": "p" * pad}},
                      separators=(",", ":")).encode()


def pipelined_requests(pads: tuple[int, ...], count: int) -> tuple[bytes, list[dict[str, Any]]]:
    """`count` ping requests padded in turn by `pads` (7-bit, 16-bit and 64-bit lengths),
    some as fragmented messages with a ping inside, as one byte string, and the answers."""
    data = b""
    expected: list[dict[str, Any]] = []
    for tid in range(count):
        message = request(tid, pads[tid % len(pads)])
        if tid % 7 == 3:
            data += frame_bytes(TEXT, message[:10], fin=False) + frame_bytes(PING, b"p")
            data += frame_bytes(CONTINUATION, message[10:])
            expected.append({"pong": b"p"})
        else:
            data += frame_bytes(TEXT if tid % 2 else BINARY, message)
        expected.append({"result": "ok", "tid": tid})
    return data, expected


async def read_answers(client: RawClient, count: int) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    while len(answers) < count:
        frame = await client.recv_frame()
        answers.append({"pong": frame.payload} if frame.opcode == PONG else answer(frame))
    return answers


async def test_pipelined_frames_of_every_length_in_one_write(raw: Connect) -> None:
    client = await raw()
    data, expected = pipelined_requests((0, 120, 130, 1000, 70_000), 40)
    await client.write(data)
    assert await read_answers(client, len(expected)) == expected


@pytest.mark.parametrize("piece", [1, 5, 13])
async def test_pipelined_frames_in_small_writes(raw: Connect, piece: int) -> None:
    client = await raw()
    data, expected = pipelined_requests((0, 60, 130), 15)
    for start in range(0, len(data), piece):
        await client.write(data[start:start + piece])
        await asyncio.sleep(0)
    assert await read_answers(client, len(expected)) == expected


async def test_frame_headers_cut_at_every_byte(make_node: NodeFactory) -> None:
    """Each header length (7, 16, 64 bits) cut at each of its bytes, over two reads; the
    close frame too."""
    node = await make_node(demo={"max_message_size": 100_000})
    parts = urlsplit(url_of(node, "demo", "ws"))
    assert parts.hostname is not None and parts.port is not None
    frames = [frame_bytes(TEXT, request(1, 0)), frame_bytes(BINARY, request(2, 200)),
              frame_bytes(TEXT, request(3, 70_000)), frame_bytes(CLOSE, close_payload(1000))]
    for index, frame in enumerate(frames):
        before = b"".join(frames[:index])
        after = b"".join(frames[index + 1:])
        for cut in range(1, min(15, len(frame))):
            client = await RawClient.connect(parts.hostname, parts.port)
            try:
                await client.write(before + frame[:cut])
                await asyncio.sleep(0.002)
                await client.write(frame[cut:] + after)
                answers, close = await client.recv_until_close()
                assert [answer(a) for a in answers] == [
                    {"result": "ok", "tid": tid} for tid in (1, 2, 3)], (index, cut)
                assert close.close_code == 1000, (index, cut)
            finally:
                client.close()


async def test_frames_in_the_same_write_as_the_handshake(make_node: NodeFactory) -> None:
    node: Node = await make_node(demo={})
    parts = urlsplit(url_of(node, "demo", "ws"))
    assert parts.hostname is not None and parts.port is not None
    client = await RawClient.open(parts.hostname, parts.port)
    try:
        handshake = asyncio.ensure_future(client.handshake("/", f"{parts.hostname}:{parts.port}"))
        await asyncio.sleep(0)  # the request is written: frames follow in the same segment
        await client.write(frame_bytes(TEXT, PING_REQUEST % 1) + frame_bytes(CLOSE, b"\x03\xe8"))
        await handshake
        frames, close = await client.recv_until_close()
        assert [answer(frame) for frame in frames] == [{"result": "ok", "tid": 1}]
        assert close.close_code == 1000
    finally:
        client.close()
