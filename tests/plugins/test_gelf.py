"""GELF output (PROTOCOL.md §8): the message, its datagrams on a real UDP socket, the sender's
failures, and the `GelfLog` link inside a service."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import random
import socket
import string
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from nkservice.plugins.gelf import (
    CHUNK_HEADER,
    CHUNK_MAGIC,
    CHUNK_SIZE,
    MAX_CHUNKS,
    GelfLog,
    GelfSender,
    TooManyChunks,
    additional_fields,
    chunks,
    datagrams,
    encode,
    gelf_message,
)
from tests.service.fakes import Client, FakeNode

WAIT = 5.0
LOGGER = "nkservice.plugins.gelf"


# -- a collector on a real socket --------------------------------------------------------------


class Collector(asyncio.DatagramProtocol):
    """A GELF UDP input on 127.0.0.1: keeps each datagram it receives."""

    def __init__(self) -> None:
        self.datagrams: asyncio.Queue[bytes] = asyncio.Queue()
        self.port = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.put_nowait(data)

    async def datagram(self) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.datagrams.get()

    async def message(self) -> tuple[dict[str, Any], list[bytes]]:
        """The next whole message, decoded, with the datagrams it came in."""
        first = await self.datagram()
        if not first.startswith(CHUNK_MAGIC):
            return decode(first), [first]
        received = [first]
        while len(received) < first[11]:  # the sequence count
            received.append(await self.datagram())
        (payload,) = reassemble(received).values()
        return decode(payload), received


def reassemble(received: list[bytes]) -> dict[bytes, bytes]:
    """Chunked GELF datagrams, grouped by message id and put in sequence order: each message
    id's payload. Checks each chunk's header against its group."""
    groups: dict[bytes, dict[int, bytes]] = {}
    counts: dict[bytes, int] = {}
    for datagram in received:
        assert datagram[:2] == b"\x1e\x0f"
        message_id, sequence, count = datagram[2:10], datagram[10], datagram[11]
        assert 0 <= sequence < count <= 128
        assert counts.setdefault(message_id, count) == count
        assert sequence not in groups.setdefault(message_id, {})
        groups[message_id][sequence] = datagram[12:]
    payloads = {}
    for message_id, parts in groups.items():
        assert sorted(parts) == list(range(counts[message_id])), "a chunk is missing"
        payloads[message_id] = b"".join(parts[sequence] for sequence in sorted(parts))
    return payloads


def decode(payload: bytes) -> dict[str, Any]:
    """A GELF payload as a receiver reads it: plain, zlib or gzip JSON."""
    if payload[:2] == b"\x1f\x8b":
        payload = gzip.decompress(payload)
    elif payload[:1] == b"\x78":
        payload = zlib.decompress(payload)
    message: dict[str, Any] = json.loads(payload)
    return message


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        Collector, local_addr=("127.0.0.1", 0))
    protocol.port = transport.get_extra_info("sockname")[1]
    yield protocol
    transport.close()


@pytest.fixture
async def sender(collector: Collector) -> AsyncIterator[GelfSender]:
    gelf = GelfSender("127.0.0.1", collector.port)
    await gelf.start()
    yield gelf
    gelf.close()


def free_udp_port() -> int:
    """A port nobody listens on (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def random_text(size: int, seed: int = 7) -> str:
    generator = random.Random(seed)
    return "".join(generator.choices(string.ascii_letters + string.digits + " \n", k=size))


def sample(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "source": "web-1", "message": "disk almost full", "level": 4,
        "full_message": "/var: 97%\n/home: 12%", "meta": {"disk": "/var", "used": 97},
        "user": "alice", "session_id": "s-1", "service": "demo", "timestamp": 1700000000.25}
    return gelf_message(**{**fields, **changes})


# -- the message -------------------------------------------------------------------------------


def test_the_message_of_a_log_request() -> None:
    assert sample() == {
        "version": "1.1", "host": "web-1", "short_message": "disk almost full",
        "full_message": "/var: 97%\n/home: 12%", "timestamp": 1700000000.25, "level": 4,
        "_disk": "/var", "_used": 97, "_user": "alice", "_session_id": "s-1",
        "_service": "demo"}


def test_the_defaults_and_what_gelf_receivers_would_drop() -> None:
    message = gelf_message(source=" ", message="", user="bob", session_id="s-2",
                           service="demo", timestamp=1700000000.123456)
    assert message == {"version": "1.1", "host": "demo", "short_message": "-",
                       "timestamp": 1700000000.123, "level": 6, "_user": "bob",
                       "_session_id": "s-2", "_service": "demo"}


def test_meta_keys_become_valid_additional_fields() -> None:
    fields = additional_fields({
        "ok.name-1_x": "kept", "with space": 1, "é": 2, "a/b": "rewritten", "a_b": "exact",
        "x y": "first", "x!y": "second", "": "empty", "id": "forbidden",
        "user": "mallory", "session_id": "forged", "service": "other",
        "none": None, "flag": True, "list": [1, "two"], "object": {"k": None}, "pi": 3.5})
    assert fields == {
        "_ok.name-1_x": "kept", "_with_space": 1, "__": 2, "_a_b": "exact", "_x_y": "first",
        "_flag": "true", "_list": '[1,"two"]', "_object": '{"k":null}', "_pi": 3.5}
    message = sample(meta={"user": "mallory", "service": "other"})
    assert (message["_user"], message["_service"]) == ("alice", "demo")


def test_a_small_message_is_one_plain_datagram() -> None:
    payload = encode(sample())
    assert len(payload) < CHUNK_SIZE
    assert datagrams(payload) == [payload]


def test_chunks_have_the_gelf_header_and_at_most_128_of_them_fit() -> None:
    room = 100 - CHUNK_HEADER
    payload = bytes(range(256)) * (room * MAX_CHUNKS // 256) + b"x" * (room * MAX_CHUNKS % 256)
    assert len(payload) == room * MAX_CHUNKS
    sent = chunks(payload, message_id=b"12345678", chunk_size=100)
    assert len(sent) == MAX_CHUNKS
    assert all(len(chunk) <= 100 for chunk in sent)
    assert sent[5][:12] == b"\x1e\x0f12345678\x05\x80"
    assert reassemble(sent) == {b"12345678": payload}
    with pytest.raises(TooManyChunks, match="129 chunks"):
        chunks(payload + b"!", message_id=b"12345678", chunk_size=100)


def test_a_large_message_is_compressed_and_an_incompressible_huge_one_is_refused() -> None:
    payload = encode(sample(full_message=random_text(100_000)))
    sent = datagrams(payload)
    assert 1 < len(sent) < len(payload) // (CHUNK_SIZE - CHUNK_HEADER)  # compression helped
    (joined,) = reassemble(sent).values()
    assert zlib.decompress(joined) == payload
    assert len(datagrams(payload, compress=False)) == -(-len(payload) // (CHUNK_SIZE - 12))
    noise = base64.b64encode(random.Random(1).randbytes(1_200_000)).decode()
    huge = encode(sample(full_message=noise))  # 1.6 MB, ~1.2 MB compressed: > 128 * 8180
    with pytest.raises(TooManyChunks):
        datagrams(huge)


# -- on the wire -------------------------------------------------------------------------------


async def test_a_small_message_arrives_whole(collector: Collector, sender: GelfSender) -> None:
    sender.send(sample())
    received = await collector.datagram()
    assert not received.startswith(CHUNK_MAGIC) and received.startswith(b"{")  # plain JSON
    message = json.loads(received)
    assert message == {
        "version": "1.1", "host": "web-1", "short_message": "disk almost full",
        "full_message": "/var: 97%\n/home: 12%", "timestamp": 1700000000.25, "level": 4,
        "_disk": "/var", "_used": 97, "_user": "alice", "_session_id": "s-1",
        "_service": "demo"}
    assert (sender.sent, sender.dropped) == (1, 0)


@pytest.mark.parametrize("compress", [True, False])
async def test_a_large_message_arrives_in_chunks(collector: Collector, compress: bool) -> None:
    sender = GelfSender("127.0.0.1", collector.port, compress=compress)
    await sender.start()
    try:
        text = random_text(100_000)
        sender.send(sample(full_message=text))
        message, received = await collector.message()
    finally:
        sender.close()
    assert message == sample(full_message=text)
    assert len(received) > 1 and all(len(datagram) <= CHUNK_SIZE for datagram in received)
    assert len({datagram[2:10] for datagram in received}) == 1  # one message id
    (payload,) = reassemble(received).values()
    assert payload.startswith(b"\x78") is compress  # zlib, or plain JSON


async def test_two_large_messages_at_once_are_told_apart(collector: Collector,
                                                          sender: GelfSender) -> None:
    texts = [random_text(60_000, seed) for seed in (1, 2)]
    for text in texts:
        sender.send(sample(full_message=text))
    received: list[bytes] = []
    while len(received) < 2 or len(reassemble_partial(received)) < 2:
        received.append(await collector.datagram())
    payloads = reassemble(received).values()
    assert sorted(decode(payload)["full_message"] for payload in payloads) == sorted(texts)


def reassemble_partial(received: list[bytes]) -> list[bytes]:
    """The message ids of which every chunk has arrived."""
    seen: dict[bytes, set[int]] = {}
    for datagram in received:
        seen.setdefault(datagram[2:10], set()).add(datagram[10])
    counts = {datagram[2:10]: datagram[11] for datagram in received}
    return [message_id for message_id, got in seen.items() if len(got) == counts[message_id]]


async def test_a_message_over_128_chunks_is_dropped_with_a_warning(
        collector: Collector, caplog: pytest.LogCaptureFixture) -> None:
    sender = GelfSender("127.0.0.1", collector.port, chunk_size=512, compress=False)
    await sender.start()
    try:
        with caplog.at_level(logging.WARNING, LOGGER):
            sender.send(sample(full_message=random_text(100_000)))  # ~200 chunks of 500
            sender.send(sample(message="after"))  # small: sent at once, before the big one
            sender.send(sample(message="last"))
            assert (await collector.message())[0]["short_message"] == "after"
            await eventually(lambda: sender.dropped == 1)
            sender.send(sample(message="after the drop"))
            assert (await collector.message())[0]["short_message"] == "last"
            assert (await collector.message())[0]["short_message"] == "after the drop"
    finally:
        sender.close()
    assert (sender.sent, sender.dropped) == (3, 1)
    (record,) = [record for record in caplog.records if record.name == LOGGER]
    text = record.getMessage()
    assert "dropped" in text and "GELF allows 128" in text and "'alice'" in text, text


async def test_an_unreachable_collector_never_raises_and_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    sender = GelfSender("127.0.0.1", free_udp_port())
    with caplog.at_level(logging.WARNING, LOGGER):
        await sender.start()
        for index in range(20):
            sender.send(sample(message=f"lost {index}"))
            sender.send(sample(full_message=random_text(20_000, index)))  # chunked
            await asyncio.sleep(0.005)
        await eventually(lambda: bool(caplog.records))  # "port unreachable" came back
        await asyncio.sleep(0.1)
    warnings = [record for record in caplog.records if record.name == LOGGER]
    assert len(warnings) == 1, [record.getMessage() for record in warnings]
    assert "127.0.0.1" in warnings[0].getMessage()
    sender.close()


async def test_an_unknown_host_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    sender = GelfSender("collector.invalid", 12201)  # RFC 6761: never resolves
    with caplog.at_level(logging.WARNING, LOGGER):
        await sender.start()
        for _ in range(5):
            sender.send(sample())
    sender.close()
    assert (sender.sent, sender.dropped) == (0, 5)
    warnings = [record.getMessage() for record in caplog.records if record.name == LOGGER]
    assert len(warnings) == 2  # when it failed, and at close how many more
    assert "collector.invalid" in warnings[0] and warnings[1].startswith("5 more")


async def test_sending_before_start_waits_for_the_endpoint(collector: Collector) -> None:
    sender = GelfSender("127.0.0.1", collector.port)
    try:
        sender.send(sample(message="one"))
        sender.send(sample(message="two"))
        assert (await collector.message())[0]["short_message"] == "one"
        assert (await collector.message())[0]["short_message"] == "two"
    finally:
        sender.close()


async def test_after_close_messages_are_dropped(collector: Collector) -> None:
    sender = GelfSender("127.0.0.1", collector.port)
    await sender.start()
    sender.close()
    sender.close()
    sender.send(sample())
    assert sender.dropped == 1
    await asyncio.sleep(0.05)
    assert collector.datagrams.empty()


async def test_closing_while_it_starts(collector: Collector) -> None:
    sender = GelfSender("127.0.0.1", collector.port)
    starting = asyncio.ensure_future(sender.start())
    await asyncio.sleep(0)  # start() now waits for the endpoint
    sender.close()
    await starting  # returns: it does not raise
    sender.send(sample())
    assert (sender.sent, sender.dropped) == (0, 1)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="chunk size"):
        GelfSender("127.0.0.1", 12201, chunk_size=12)
    with pytest.raises(ValueError, match="chunk size"):
        GelfSender("127.0.0.1", 12201, chunk_size=70_000)
    with pytest.raises(ValueError, match="port"):
        GelfSender("127.0.0.1", 0)


# -- the link inside a service -----------------------------------------------------------------

NOW = 1700000000.5


async def test_a_client_log_is_sent_as_gelf(collector: Collector, sender: GelfSender) -> None:
    service = FakeNode().add("demo", logic=[GelfLog(sender, clock=lambda: NOW)])
    client = Client(service)
    session_id = (await client.login("alice", "pw1"))["data"]["session_id"]
    answer = await client.request("log", {
        "source": "app", "message": "hello", "level": 3, "full_message": "more",
        "meta": {"device": "phone", "build": 42}})
    assert answer["result"] == "ok" and answer.get("data", {}) == {}
    assert (await collector.message())[0] == {
        "version": "1.1", "host": "app", "short_message": "hello", "full_message": "more",
        "timestamp": NOW, "level": 3, "_device": "phone", "_build": 42, "_user": "alice",
        "_session_id": session_id, "_service": "demo"}
    answer = await client.request("log", {"source": "app", "message": "again"},
                                  subclass="session")
    assert answer["result"] == "ok"
    message = (await collector.message())[0]
    assert (message["short_message"], message["level"]) == ("again", 6)
    assert "full_message" not in message
    assert (message["_user"], message["_session_id"]) == ("alice", session_id)


BAD_LOGS: list[dict[str, Any]] = [
    {"message": "no source"},
    {"source": "app"},
    {"source": 1, "message": "x"},
    {"source": "app", "message": ["x"]},
    {"source": "app", "message": "x", "level": 0},
    {"source": "app", "message": "x", "level": 8},
    {"source": "app", "message": "x", "level": "3"},
    {"source": "app", "message": "x", "level": True},
    {"source": "app", "message": "x", "level": 3.0},
    {"source": "app", "message": "x", "full_message": 5},
    {"source": "app", "message": "x", "meta": ["device"]},
]


@pytest.mark.parametrize("data", BAD_LOGS)
async def test_bad_fields_get_the_errors_of_the_base(collector: Collector, sender: GelfSender,
                                                     data: dict[str, Any]) -> None:
    node = FakeNode()
    with_gelf = Client(node.add("demo", logic=[GelfLog(sender)]))
    plain = Client(node.add("plain"))
    await with_gelf.login("alice", "pw1")
    await plain.login("alice", "pw1")
    answer = await with_gelf.request("log", data)
    assert answer["result"] == "error"
    assert answer["data"] == (await plain.request("log", data))["data"]
    await asyncio.sleep(0.05)
    assert collector.datagrams.empty() and sender.sent == 0


async def test_other_requests_go_down_the_chain(collector: Collector,
                                                sender: GelfSender) -> None:
    service = FakeNode().add("demo", logic=[GelfLog(sender)])
    client = Client(service)
    await client.login("alice", "pw1")
    assert (await client.request("ping"))["result"] == "ok"
    assert (await client.request("log", {"source": "a", "message": "b"}, class_="chat")
            )["data"]["code"] == 100050  # unknown_class: the base's answer
    assert (await client.request("log", {"source": "a", "message": "b"}, subclass="user")
            )["data"]["code"] == 100042  # `user`/`log` is no command
    assert sender.sent == 0
