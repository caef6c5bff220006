"""A finished connection is freed by reference counting alone: the cyclic garbage collector
finds nothing after it (on a worker with 100,000 sessions, each full collection walks every
live object, and what only the collector frees waits for the next full one).

Counted with the collector off: N connections or sessions are opened and ended (the client
closes, the client drops it, the server closes it), then one collection with
`gc.DEBUG_SAVEALL` lists what it would have freed. The client is `tests.transport.blocking`
in a thread, which leaves nothing of its own (checked first).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import ssl
from collections.abc import Callable, Iterator

import pytest

from nkservice.protocol.connection import Connection, Limits, Wire
from nkservice.protocol.messages import Request
from nkservice.transport.listener import listen
from tests.conftest import NodeFactory, url_of
from tests.transport.blocking import Client, sessions

COUNT = 12  # connections per test, each ending shared out in turn
ENDINGS = ("close", "reset", "server")
WAIT = 10.0


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The collector off (nothing freed behind the test's back), and back on after."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def garbage() -> collections.Counter[str]:
    """What a full collection finds unreachable now, by type; then it is freed."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}"
                                    for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    gc.collect()  # kept by DEBUG_SAVEALL, cycles are still cycles: free them now
    return found


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not check():  # noqa: ASYNC110 (no event to await)
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the transports' own last callbacks (connection_lost, ...)


async def test_the_blocking_client_leaves_nothing(collector_off: None) -> None:
    """The client of these tests, against a plain echo server: nothing to collect."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await asyncio.sleep(0)
    garbage()

    def talk() -> None:
        for _ in range(COUNT):
            client = Client(f"tcp://127.0.0.1:{port}").connect()
            client.send({"tid": 1})
            assert client.recv() == {"tid": 1}
            client.close()

    await asyncio.to_thread(talk)
    server.close()
    await server.wait_closed()
    # asyncio's stream server makes a cycle per connection of its own (StreamReaderProtocol):
    # only what the client could have left is looked for.
    assert not {k for k in garbage() if k.startswith(("socket.", "ssl.", "threading."))}


class Answers:
    """A request handler that lets go of its connection once it is closed (the cycle between
    the two is not the transport's business): answers every request with its data; `bye`
    makes the server close."""

    def __init__(self, closed: list[int]) -> None:
        self.conn: Connection | None = None
        self.closed = closed

    def on_request(self, request: Request) -> None:
        assert self.conn is not None
        self.conn.reply(request.tid, request.data)
        if request.cmd == "bye":
            self.conn.close("as asked")

    def on_closed(self) -> None:
        self.conn = None
        self.closed.append(1)


@pytest.mark.parametrize("shared", [False, True], ids=["own port", "shared port"])
@pytest.mark.parametrize("transport", ["tcp", "tls", "ws", "wss"])
async def test_a_finished_connection_leaves_no_cycle(
        transport: str, shared: bool, cert_files: dict[str, str],
        client_tls: ssl.SSLContext, collector_off: None) -> None:
    """The transport's side: its adapter, picows, uvloop's transport (and TLS)."""
    closed: list[int] = []

    def accept(wire: Wire, clock: Callable[[], float], transport: str, host: str,
               port: int) -> Connection:
        handler = Answers(closed)
        conn = Connection(Limits(), wire, clock, handler)
        handler.conn = conn
        return conn

    secure = transport in ("tls", "wss")
    tls = None
    if secure:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert_files["certfile"])
    websocket = transport in ("ws", "wss")
    server = await listen(accept, "127.0.0.1", 0, lines=shared or not websocket,
                          websocket_paths=["/"] if shared or websocket else [], tls=tls,
                          limits=Limits)
    port = server.sockets[0].getsockname()[1]
    url = f"{transport}://127.0.0.1:{port}/"
    garbage()  # the listener's own start

    def run() -> None:
        for number in range(COUNT):
            client = Client(url, client_tls).connect()
            assert client.request({"class": "x", "cmd": "hi", "tid": 1, "data": number})[
                "data"] == number
            ending = ENDINGS[number % len(ENDINGS)]
            if ending == "close":
                client.close()
            elif ending == "reset":
                client.reset()
            else:
                client.request({"class": "x", "cmd": "bye", "tid": 2})
                client.wait_closed()

    try:
        await asyncio.to_thread(run)
        await until(lambda: len(closed) == COUNT)
        assert garbage() == collections.Counter()
    finally:
        server.close()


@pytest.mark.parametrize("ending", ["close", "reset", "replaced", "resumed"])
@pytest.mark.parametrize("transport", ["tcp", "tls", "ws", "wss"])
async def test_a_finished_session_leaves_no_cycle(
        transport: str, ending: str, make_node: NodeFactory, client_tls: ssl.SSLContext,
        collector_off: None) -> None:
    """The whole session: logged in on a node (resumable: it is parked when it ends), then
    ended by the client, replaced by a new login with its id, or resumed."""
    node = await make_node(demo={"resume_window": 30})
    url = url_of(node, "demo", transport)
    service = node.services["demo"]
    await asyncio.to_thread(sessions, url, 2, ending, user="alice", password="pw1",
                            context=client_tls)  # the first of everything, made once
    await until(lambda: not service.connections)
    garbage()
    await asyncio.to_thread(sessions, url, COUNT, ending, user="alice", password="pw1",
                            context=client_tls)
    await until(lambda: not service.connections)
    assert garbage() == collections.Counter()
