"""nkservice.client against the real server, in-process over real sockets on all four
transports, plus a scripted tcp server for what the server never sends (events, stray
answers, bad bytes) or what needs exact control of timing (acks, drops)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from nkservice.client import ApiError, Client, ErrorCode, call
from nkservice.node import Node

NodeFactory = Callable[..., Awaitable[Node]]
WAIT = 5.0  # upper bound for things that are expected to happen much sooner


def url_of(node: Node, transport: str) -> str:
    return next(u for u in node.urls("demo") if u.startswith(f"{transport}://"))


@pytest.fixture
async def node(make_node: NodeFactory) -> Node:
    return await make_node(demo={})


async def admin_of(make_client: Callable[..., Client], node: Node) -> Client:
    admin = make_client(url_of(node, "tcp"))
    await admin.connect()
    await admin.login("demo-admin", "pw")
    return admin


# -- requests and login ----------------------------------------------------------------------

async def test_login_and_requests(node: Node, transport: str,
                                  make_client: Callable[..., Client]) -> None:
    async with make_client(url_of(node, transport)) as client:
        reply = await client.login("alice", "pw1", meta={"device": "phone"})
        assert reply["user"] == "alice"
        assert client.session_id == reply["session_id"]
        assert await client.request("core", "ping", subclass="core") is None
        assert await client.request("core", "ping") is None  # seed form
        with pytest.raises(ApiError) as refused:
            await client.request("core", "nope")
        assert refused.value.code == ErrorCode.unknown_command.code
        assert refused.value.text == "Unknown command 'nope'"
    assert client.closed.is_set()
    with pytest.raises(ConnectionError):
        await client.request("core", "ping")


async def test_wrong_password_then_right_one(node: Node, transport: str,
                                             make_client: Callable[..., Client]) -> None:
    async with make_client(url_of(node, transport)) as client:
        with pytest.raises(ApiError) as refused:
            await client.login("alice", "wrong")
        assert refused.value.code == 100038
        assert (await client.login("alice", "pw1", session_id="device-1"))["session_id"] \
            == "device-1"


async def test_call_helper(node: Node, client_tls: ssl.SSLContext) -> None:
    url = url_of(node, "wss")
    assert await asyncio.to_thread(call, url, "core", "ping", subclass="core", user="alice",
                                   password="pw1", ssl=client_tls) is None
    with pytest.raises(ApiError) as refused:
        await asyncio.to_thread(call, url, "core", "ping", user="alice", password="bad",
                                ssl=client_tls)
    assert refused.value.code == 100038


async def test_connect_failures(node: Node, make_client: Callable[..., Client]) -> None:
    client = make_client("tcp://127.0.0.1:9")
    with pytest.raises(ConnectionError):
        await client.request("core", "ping")
    with pytest.raises(OSError):
        await client.connect()
    with pytest.raises(ConnectionError, match="handshake"):
        await make_client(url_of(node, "ws") + "nope").connect()
    with pytest.raises(ssl.SSLError):
        await Client(url_of(node, "tls"), ssl=ssl.create_default_context()).connect()
    with pytest.raises(ValueError, match="unsupported URL"):
        await make_client("http://127.0.0.1:1/").connect()


# -- the server's requests -------------------------------------------------------------------

async def test_answers_server_pings(make_node: NodeFactory, transport: str,
                                    make_client: Callable[..., Client]) -> None:
    node = await make_node(demo={"ping_interval": 0.2, "request_timeout": 0.5})
    url = url_of(node, transport)
    pings: asyncio.Queue[Any] = asyncio.Queue()
    async with make_client(url) as watched, make_client(url) as builtin, \
            make_client(url, ack_after=60) as mute:
        watched.on_request("core", "ping", pings.put_nowait)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        mute.on_request("core", "ping", lambda data: never)
        await builtin.login("alice", "pw1")
        await watched.login("alice", "pw1")
        await mute.login("bob", "pw2")
        # `mute` never answers its first ping: the server must drop it half a second later.
        # `builtin` logged in first, so its own deadlines passed before that moment.
        await asyncio.wait_for(mute.wait_closed(), WAIT)
        for _ in range(3):
            assert await asyncio.wait_for(pings.get(), WAIT) == {"time": 0.2}
        assert builtin.connected and watched.connected
        assert await builtin.request("core", "ping") is None


async def test_request_handlers(node: Node, transport: str,
                                make_client: Callable[..., Client]) -> None:
    async def slow(data: Any) -> Any:
        await asyncio.sleep(0.01)
        return {"slow": data}

    def broken(data: Any) -> Any:
        raise RuntimeError("bug")

    def refuse(data: Any) -> Any:
        raise ApiError(ErrorCode.user_not_found)

    async with make_client(url_of(node, transport)) as bob:
        bob.on_request("app", "echo", lambda data: data)
        bob.on_request("app", "slow", slow)
        bob.on_request("app", "broken", broken)
        bob.on_request("app", "refuse", refuse)
        bob.on_request("app", "unjson", lambda data: {1, 2})
        await bob.login("bob", "pw2")
        admin = await admin_of(make_client, node)
        try:
            async def forward(cmd: str, data: Any = None) -> Any:
                return await admin.request("core", "cmd", {
                    "session_id": bob.session_id, "class": "app", "cmd": cmd, "data": data,
                }, subclass="session")

            assert await forward("echo", {"x": [1, 2]}) == {"x": [1, 2]}
            assert await forward("slow", {"y": 1}) == {"slow": {"y": 1}}
            assert await forward("echo") is None  # missing data is {}; an empty reply omits it
            for cmd, error in [("broken", ErrorCode.internal_error),
                               ("unjson", ErrorCode.internal_error),
                               ("refuse", ErrorCode.user_not_found),
                               ("nope", ErrorCode.unknown_command)]:
                with pytest.raises(ApiError) as refused:
                    await forward(cmd)
                assert refused.value.code == error.code
            assert refused.value.text == "Unknown command 'nope'"
            assert await forward("event", {"any": "class"}) is None  # events are always ok
        finally:
            await admin.close()


async def test_slow_handler_is_acked(make_node: NodeFactory, transport: str,
                                     make_client: Callable[..., Client]) -> None:
    # Without acks the server drops bob after 0.3 s, and the admin's own request times out
    # after 0.2 s: both survive only if bob's acks reach the server and are passed on.
    node = await make_node(demo={"request_timeout": 0.3})

    async def slow(data: Any) -> str:
        await asyncio.sleep(0.5)  # the slow work itself
        return "done"

    async with make_client(url_of(node, transport), ack_after=0.05, ack_every=0.1) as bob:
        bob.on_request("app", "slow", slow)
        await bob.login("bob", "pw2")
        admin = await admin_of(make_client, node)
        try:
            reply = await admin.request("core", "cmd", {
                "session_id": bob.session_id, "class": "app", "cmd": "slow",
            }, subclass="session", timeout=0.2)
            assert reply == "done"
            assert bob.connected
        finally:
            await admin.close()


# -- drops and reconnects ------------------------------------------------------------------

async def test_reconnects_and_logs_in_again(node: Node, transport: str,
                                            make_client: Callable[..., Client]) -> None:
    reconnected: asyncio.Queue[None] = asyncio.Queue()

    async def hook() -> None:
        reconnected.put_nowait(None)

    async with make_client(url_of(node, transport), reconnect=True, backoff_min=0.01,
                           backoff_max=0.05, on_reconnect=hook) as client:
        await client.login("alice", "pw1", meta={"device": "phone"})
        session_id = client.session_id
        admin = await admin_of(make_client, node)
        try:
            for _ in range(2):
                assert await admin.request("core", "stop", {"session_id": session_id},
                                           subclass="session") == {"user": "alice"}
                await asyncio.wait_for(reconnected.get(), WAIT)
                assert client.connected and not client.closed.is_set()
                assert client.session_id == session_id
                sessions = await admin.request("core", "get", {"user": "alice"},
                                               subclass="user")
                assert list(sessions) == [session_id]
                assert sessions[session_id]["meta"] == {"device": "phone"}
                assert await client.request("core", "ping") is None
        finally:
            await admin.close()
    assert client.closed.is_set() and not client.connected


async def test_drop_without_reconnect_closes(node: Node, transport: str,
                                             make_client: Callable[..., Client]) -> None:
    async with make_client(url_of(node, transport)) as client:
        await client.login("alice", "pw1")
        admin = await admin_of(make_client, node)
        try:
            await admin.request("core", "stop_session", {"session_id": client.session_id})
        finally:
            await admin.close()
        await asyncio.wait_for(client.wait_closed(), WAIT)
        with pytest.raises(ConnectionError):
            await client.request("core", "ping")


# -- a scripted server ------------------------------------------------------------------------

class Scripted:
    """One tcp connection accepted by `ScriptedServer`: read and write JSON lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> Any:
        line = await asyncio.wait_for(self.reader.readline(), WAIT)
        assert line, "the client closed the connection"
        return json.loads(line)

    def send(self, message: Any) -> None:
        self.writer.write(message if isinstance(message, bytes) else
                          json.dumps(message).encode() + b"\n")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, asyncio.Queue[Scripted]]]:
    accepted: asyncio.Queue[Scripted] = asyncio.Queue()
    opened: list[Scripted] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Scripted(reader, writer)
        opened.append(peer)
        accepted.put_nowait(peer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"tcp://127.0.0.1:{port}", accepted
    server.close()
    for peer in opened:
        await peer.close()
    await server.wait_closed()


async def test_events(scripted: tuple[str, asyncio.Queue[Scripted]]) -> None:
    url, accepted = scripted
    seen: list[Any] = []
    async with Client(url) as client:
        client.on_event(seen.append)
        stream = client.events()
        server = await accepted.get()
        event = {"class": "media", "subclass": "session", "type": "stop", "obj_id": "5179b729",
                 "body": {"k": "v"}}
        server.send({"class": "core", "cmd": "event", "tid": 17, "data": event})
        server.send({"class": "core", "cmd": "event", "tid": 18, "data": {"class": "chat"}})
        assert await server.recv() == {"result": "ok", "tid": 17}
        assert await server.recv() == {"result": "ok", "tid": 18}
        assert await anext(stream) == event
        assert await anext(stream) == {"class": "chat"}
        assert seen == [event, {"class": "chat"}]
        # other classes' events are answered ok too, but are not `core` events
        server.send({"class": "media", "cmd": "event", "tid": 19, "data": {"x": 1}})
        assert await server.recv() == {"result": "ok", "tid": 19}
        assert seen == [event, {"class": "chat"}]
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_ignores_strays_and_bad_bytes(scripted: tuple[str, asyncio.Queue[Scripted]],
                                            caplog: pytest.LogCaptureFixture) -> None:
    url, accepted = scripted
    async with Client(url) as client:
        server = await accepted.get()
        request = asyncio.ensure_future(client.request("core", "ping"))
        assert (await server.recv())["tid"] == 1
        server.send(b"{not json\n\xff\xfe\n[1, 2]\n")
        server.send({"result": "ok", "tid": 999})
        server.send({"ack": 999})
        server.send({"result": "ok", "tid": "1"})  # our tids are integers: not ours
        server.send({"class": "core", "cmd": "ping", "tid": 5})
        assert await server.recv() == {"result": "ok", "tid": 5}
        assert not request.done()
        server.send({"result": "ok", "tid": 1, "data": {"late": True}})
        assert await request == {"late": True}
    assert caplog.text.count("ignoring a bad message") == 3


async def test_acks_extend_our_deadline(scripted: tuple[str, asyncio.Queue[Scripted]]) -> None:
    url, accepted = scripted
    async with Client(url, request_timeout=0.2) as client:
        server = await accepted.get()
        request = asyncio.ensure_future(client.request("app", "slow", {"n": 1}))
        assert await server.recv() == {"class": "app", "cmd": "slow", "tid": 1,
                                       "data": {"n": 1}}
        server.send({"ack": 1})
        await asyncio.sleep(0.4)  # past the 0.2 s timeout: only the ack keeps it alive
        assert not request.done()
        server.send({"result": "error", "tid": 1, "data": {"code": 100079,
                                                           "error": "Service unavailable"}})
        with pytest.raises(ApiError) as refused:
            await request
        assert refused.value.code == 100079

        with pytest.raises(TimeoutError):
            await client.request("app", "slow", timeout=0.05)
        assert client.connected


async def test_acks_a_slow_handler_until_done(
        scripted: tuple[str, asyncio.Queue[Scripted]]) -> None:
    url, accepted = scripted
    release = asyncio.Event()

    async def slow(data: Any) -> Any:
        await release.wait()
        return {"got": data}

    async with Client(url, ack_after=0.02, ack_every=0.02) as client:
        client.on_request("app", "slow", slow)
        server = await accepted.get()
        server.send({"class": "app", "cmd": "slow", "tid": "t1", "data": [1]})
        for _ in range(3):
            assert await server.recv() == {"ack": "t1"}
        release.set()
        message = await server.recv()
        while message == {"ack": "t1"}:
            message = await server.recv()
        assert message == {"result": "ok", "tid": "t1", "data": {"got": [1]}}


async def test_drop_fails_pending_requests(
        scripted: tuple[str, asyncio.Queue[Scripted]]) -> None:
    url, accepted = scripted
    started: asyncio.Event = asyncio.Event()

    async def forever(data: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    async with Client(url, ack_after=60) as client:
        client.on_request("app", "forever", forever)
        server = await accepted.get()
        request = asyncio.ensure_future(client.request("core", "ping"))
        await server.recv()
        server.send({"class": "app", "cmd": "forever", "tid": 1})
        await started.wait()
        await server.close()
        with pytest.raises(ConnectionError):
            await request
        await asyncio.wait_for(client.wait_closed(), WAIT)


async def test_reconnect_retries_with_backoff(
        scripted: tuple[str, asyncio.Queue[Scripted]]) -> None:
    # The scripted server refuses the first login again: the client drops that connection and
    # tries a new one, which it logs into with the same session id.
    url, accepted = scripted
    reconnected = asyncio.Event()
    client = Client(url, reconnect=True, backoff_min=0.01, backoff_max=0.02,
                    on_reconnect=reconnected.set)
    async with client:
        first = await accepted.get()
        login = asyncio.ensure_future(client.login("alice", "pw1"))
        assert (await first.recv())["data"] == {"user": "alice", "password": "pw1"}
        first.send({"result": "ok", "tid": 1, "data": {"session_id": "s1", "user": "alice"}})
        await login
        await first.close()

        second = await accepted.get()
        request = await second.recv()
        assert request["data"] == {"user": "alice", "password": "pw1", "session_id": "s1"}
        second.send({"result": "error", "tid": request["tid"],
                     "data": {"code": 100079, "error": "Service unavailable"}})

        third = await accepted.get()
        request = await third.recv()
        assert request["data"]["session_id"] == "s1"
        assert not reconnected.is_set()
        third.send({"result": "ok", "tid": request["tid"],
                    "data": {"session_id": "s1", "user": "alice"}})
        await asyncio.wait_for(reconnected.wait(), WAIT)
        assert client.connected
