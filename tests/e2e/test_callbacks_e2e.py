"""Callbacks to external apps over the wire (PROTOCOL.md §7), on tcp, tls, ws and wss: the
apps are raw peers logged in as the global admin on the core service, as in the seed."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from nkservice.node import Node
from tests.conftest import TRANSPORTS, NodeFactory, PeerFactory
from tests.e2e.test_protocol_e2e import error_code
from tests.wire import Peer

pytestmark = pytest.mark.usefixtures("transport")


async def app(connect: PeerFactory, node: Node, transport: str,
              *registrations: dict[str, Any]) -> Peer:
    peer = await connect(node, "core", transport)
    await peer.login("admin", "secret")
    for registration in registrations:
        answer = await peer.request("core", "register_callback", registration)
        assert answer["result"] == "ok", answer
    return peer


async def callback(peer: Peer, name: str) -> dict[str, Any]:
    """The next message must be a callback request named `name`."""
    message = await peer.recv()
    assert (message["class"], message.get("subclass"), message["cmd"]) == (
        "core", "callback", name), message
    return message


async def answer(peer: Peer, request: dict[str, Any], data: Any) -> None:
    await peer.send({"result": "ok", "tid": request["tid"], "data": data})


async def test_logins_decided_by_an_app_in_the_seeds_shapes(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    backend = await app(connect, node, transport, {"class": "demo", "callback": "login"})
    for authorized in ("false", False):
        user = await connect(node, "demo", transport)
        await user.send({"class": "core", "cmd": "login", "tid": 1,
                         "data": {"user": "zoe", "pass": "guess"}})
        asked = await callback(backend, "api_server_login")
        assert (asked["data"]["user"], asked["data"]["pass"], asked["data"]["password"],
                asked["data"]["service"]) == ("zoe", "guess", "guess", "demo")
        await answer(backend, asked, {"authorized": authorized, "reason": "Invalid password"})
        assert (await user.recv())["data"] == {"code": 100030,
                                               "error": "Unauthorized: Invalid password"}
    for authorized in ("true", True):
        user = await connect(node, "demo", transport)
        await user.send({"class": "core", "cmd": "login", "tid": 1,
                         "data": {"user": "zoe", "pass": "right"}})
        asked = await callback(backend, "api_server_login")
        await answer(backend, asked, {"authorized": authorized, "user": "zoe@example.com",
                                      "meta": {"plan": "gold"}})
        login = await user.recv()
        assert login["result"] == "ok" and login["data"]["user"] == "zoe@example.com"
    admin = await connect(node, "demo", transport)
    await admin.login("demo-admin", "pw")  # the service admin is above the callback
    users = await admin.request("core", "get_user", {"user": "zoe@example.com"})
    assert [s["meta"] for s in users["data"].values()] == [{"plan": "gold"}] * 2


async def test_a_subscription_refused_by_an_app(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    backend = await app(connect, node, transport,
                        {"service": "demo", "callback": "subscribe"})
    user = await connect(node, "demo", transport)
    await user.login("alice", "pw1")  # automatic subscriptions ask nobody
    await user.send({"class": "core", "cmd": "subscribe", "tid": 5,
                     "data": {"class": "media", "obj_id": "room9"}})
    asked = await callback(backend, "api_server_subscribe")
    assert asked["data"]["subscription"] == {"class": "media", "subclass": "*", "type": "*",
                                             "obj_id": "room9"}
    await answer(backend, asked, {"authorized": False, "reason": "not your room"})
    assert (await user.recv())["data"] == {"code": 100030,
                                           "error": "Unauthorized: not your room"}


async def test_commands_answered_by_an_app_errors_included(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    backend = await app(connect, node, transport,
                        {"service": "demo", "callback": "cmd", "class": "shop"})
    user = await connect(node, "demo", transport)
    await user.login("alice", "pw1")
    await user.send({"class": "shop", "subclass": "cart", "cmd": "add", "tid": "t1",
                     "data": {"sku": 7}})
    asked = await callback(backend, "api_server_cmd")
    assert asked["data"]["request"] == {"class": "shop", "subclass": "cart", "cmd": "add",
                                        "data": {"sku": 7}}
    assert asked["data"]["user"] == "alice"
    await answer(backend, asked, {"items": 1})
    assert await user.recv() == {"result": "ok", "tid": "t1", "data": {"items": 1}}
    await user.send({"class": "shop", "cmd": "pay", "tid": "t2"})
    asked = await callback(backend, "api_server_cmd")
    await backend.send({"result": "error", "tid": asked["tid"],
                        "data": {"code": 4402, "error": "Payment required"}})
    assert await user.recv() == {"result": "error", "tid": "t2",
                                 "data": {"code": 4402, "error": "Payment required"}}


async def test_three_apps_share_the_callbacks_evenly(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    registration = {"service": "demo", "callback": "cmd", "class": "calc"}
    apps = [await app(connect, node, transport, registration) for _ in range(3)]
    user = await connect(node, "demo", transport)
    await user.login("alice", "pw1")
    served: Counter[int] = Counter()

    async def serve(index: int, peer: Peer) -> None:
        while True:
            asked = await callback(peer, "api_server_cmd")
            served[index] += 1
            await answer(peer, asked, {"n": asked["data"]["request"]["data"]["n"]})

    servers = [asyncio.create_task(serve(i, peer)) for i, peer in enumerate(apps)]
    for n in range(300):
        await user.send({"class": "calc", "cmd": "echo", "tid": n, "data": {"n": n}})
    answers = [await user.recv() for _ in range(300)]
    for server in servers:
        server.cancel()
    assert sorted(a["data"]["n"] for a in answers) == list(range(300))
    assert all(abs(count - 100) <= 1 for count in served.values()), served


@pytest.mark.one_process  # "nobody left" at once: elsewhere, a moment later
async def test_a_killed_app_hands_over_then_the_fallbacks_apply(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    registrations = ({"service": "demo", "callback": "cmd", "class": "calc"},
                     {"class": "demo", "callback": "login"})
    first = await app(connect, node, transport, *registrations)
    second = await app(connect, node, transport, *registrations)
    user = await connect(node, "demo", transport)
    await user.send({"class": "core", "cmd": "login", "tid": 0,
                     "data": {"user": "alice", "password": "pw1"}})
    await answer(first, await callback(first, "api_server_login"), {"authorized": True})
    assert (await user.recv())["result"] == "ok"
    await user.send({"class": "calc", "cmd": "echo", "tid": 1})
    await callback(first, "api_server_cmd")  # each kind has its own turn: the first app's…
    await first.close()  # …and it dies before answering
    asked = await callback(second, "api_server_cmd")
    await answer(second, asked, {"by": "second"})
    assert await user.recv() == {"result": "ok", "tid": 1, "data": {"by": "second"}}
    await second.close()  # nobody left: the registrations went with the connections
    assert error_code(await user.request("calc", "echo")) == 100050
    again = await connect(node, "demo", transport)
    assert (await again.login("bob", "pw2"))["user"] == "bob"  # login: the next step


async def test_an_app_registered_for_nothing_else_changes_nothing(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    backend = await app(connect, node, transport,
                        {"service": "demo", "callback": "cmd", "class": "calc"})
    listed = await backend.request("core", "list_callbacks")
    assert [(c["callback"], c["class"], c["service"]) for c in listed["data"]] == [
        ("cmd", "calc", "demo")]
    user = await connect(node, "demo", transport)
    await user.login("alice", "pw1")
    await user.send({"class": "calc", "cmd": "echo", "tid": 1})
    asked = await callback(backend, "api_server_cmd")
    await answer(backend, asked, {})
    await answer(backend, asked, {"twice": True})  # a second answer: ignored
    await backend.send({"result": "ok", "tid": 99999})  # an unknown tid: ignored
    assert await user.recv() == {"result": "ok", "tid": 1}
    assert (await backend.request("core", "ping"))["result"] == "ok"


@pytest.mark.one_process  # four apps take exactly one request each: one turn counter
@pytest.mark.parametrize("transport", ["tcp"])  # one test drives all four at once
async def test_an_app_that_acks_and_answers_ten_seconds_later(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    """request_timeout is 1 s here: only the acks keep the callback alive."""
    node = await make_node(demo={})

    async def on(kind: str) -> None:
        backend = await app(connect, node, kind,
                            {"service": "demo", "callback": "cmd", "class": "slow"})
        user = await connect(node, "demo", kind)
        await user.login("alice", "pw1")
        await user.send({"class": "slow", "cmd": "work", "tid": "w"})
        asked = await callback(backend, "api_server_cmd")
        for _ in range(10):
            await backend.send({"ack": asked["tid"]})
            assert await user.recv(timeout=5) == {"ack": "w"}
            await asyncio.sleep(1)  # the app's own work, paced by the test
        await answer(backend, asked, {"done": True})
        assert await user.recv() == {"result": "ok", "tid": "w", "data": {"done": True}}

    async with asyncio.timeout(40):
        await asyncio.gather(*(on(kind) for kind in TRANSPORTS))


async def test_an_app_that_misses_its_deadline_is_closed_and_another_answers(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    """Service admins register for their own service; its request_timeout is 1 s here."""
    node = await make_node(demo={})
    apps = []
    for _ in range(2):
        peer = await connect(node, "demo", transport)
        await peer.login("demo-admin", "pw")
        await peer.request("core", "register_callback", {"callback": "cmd", "class": "calc"})
        apps.append(peer)
    silent, helpful = apps
    user = await connect(node, "demo", transport)
    await user.login("alice", "pw1")
    await user.send({"class": "calc", "cmd": "echo", "tid": 1})
    await callback(silent, "api_server_cmd")  # …and says nothing
    asked = await callback(helpful, "api_server_cmd")
    await answer(helpful, asked, {"by": "helpful"})
    assert await user.recv() == {"result": "ok", "tid": 1, "data": {"by": "helpful"}}
    await silent.wait_closed()  # closed for its missed deadline
