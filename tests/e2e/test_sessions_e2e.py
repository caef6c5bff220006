"""Sessions, roles and the core commands of §6 (user, session, ping), on all four transports."""

from __future__ import annotations

from typing import Any

import pytest

from nkservice.node import Node
from tests.conftest import NodeFactory, PeerFactory
from tests.e2e.test_protocol_e2e import error_code
from tests.wire import Peer

pytestmark = pytest.mark.usefixtures("transport")


async def session(connect: PeerFactory, node: Node, transport: str, user: str, password: str,
                  service: str = "demo", **extra: Any) -> tuple[Peer, str]:
    peer = await connect(node, service, transport)
    session_id: str = (await peer.login(user, password, **extra))["session_id"]
    return peer, session_id


# -- session/cmd ----------------------------------------------------------------------------------

async def test_session_cmd_passes_the_answer_back(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    target, target_id = await session(connect, node, transport, "alice", "pw1")
    caller, _ = await session(connect, node, transport, "demo-admin", "pw")
    await caller.send({"class": "core", "subclass": "session", "cmd": "cmd", "tid": 1, "data": {
        "session_id": target_id, "class": "chat", "subclass": "room", "cmd": "join",
        "data": {"room": "r1"}}})
    forwarded = await target.recv()
    assert forwarded == {"class": "chat", "subclass": "room", "cmd": "join",
                         "tid": forwarded["tid"], "data": {"room": "r1"}}
    await target.send({"result": "ok", "tid": forwarded["tid"], "data": {"members": 3}})
    assert await caller.recv() == {"result": "ok", "tid": 1, "data": {"members": 3}}


async def test_session_cmd_passes_an_error_back(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    target, target_id = await session(connect, node, transport, "alice", "pw1")
    caller, _ = await session(connect, node, transport, "demo-admin", "pw")
    await caller.send({"class": "core", "cmd": "call_session", "tid": "x", "data": {
        "session_id": target_id, "class": "chat", "cmd": "join"}})
    forwarded = await target.recv()
    assert "data" not in forwarded and "subclass" not in forwarded
    await target.send({"result": "error", "tid": forwarded["tid"],
                       "data": {"code": 4242, "error": "Room is full"}})
    assert await caller.recv() == {"result": "error", "tid": "x",
                                   "data": {"code": 4242, "error": "Room is full"}}


async def test_session_cmd_with_its_own_timeout(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"request_timeout": 5})
    target, target_id = await session(connect, node, transport, "alice", "pw1")
    caller, _ = await session(connect, node, transport, "demo-admin", "pw")
    response = await caller.request("core", "session_cmd", {
        "session_id": target_id, "class": "chat", "cmd": "join", "timeout": 0.1})
    assert response["data"] == {"code": 100005, "error": "Timeout"}
    # The target missed nothing of its own deadline: it may still answer, and stays.
    forwarded = await target.recv()
    await target.send({"result": "ok", "tid": forwarded["tid"]})
    assert (await target.request("core", "ping"))["result"] == "ok"


async def test_session_cmd_to_an_unknown_session(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    caller, _ = await session(connect, node, transport, "demo-admin", "pw")
    response = await caller.request("core", "session_cmd", {
        "session_id": "nobody", "class": "chat", "cmd": "join"})
    assert response["data"] == {"code": 100062, "error": "Session not found"}
    missing = await caller.request("core", "session_cmd", {"session_id": "nobody"})
    assert missing["data"] == {"code": 100045, "error": "Missing field: class"}


async def test_session_cmd_target_disconnects(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    target, target_id = await session(connect, node, transport, "alice", "pw1")
    caller, _ = await session(connect, node, transport, "demo-admin", "pw")
    await caller.send({"class": "core", "cmd": "session_cmd", "tid": 1, "data": {
        "session_id": target_id, "class": "chat", "cmd": "join"}})
    await target.recv()
    await target.close()
    assert error_code(await caller.recv()) == 100062


# -- users and sessions -------------------------------------------------------------------------

async def test_list_and_get_users(make_node: NodeFactory, connect: PeerFactory,
                                  transport: str) -> None:
    node = await make_node(demo={})
    _, a1 = await session(connect, node, transport, "alice", "pw1", meta={"device": "phone"})
    _, a2 = await session(connect, node, transport, "alice", "pw1")
    _, b1 = await session(connect, node, transport, "bob", "pw2")
    admin, admin_id = await session(connect, node, transport, "demo-admin", "pw")
    for request in [("list_users", None), ("list", "user")]:
        users = (await admin.request("core", request[0], subclass=request[1]))["data"]
        assert {user: sorted(ids) for user, ids in users.items()} == {
            "alice": sorted([a1, a2]), "bob": [b1], "demo-admin": [admin_id]}
    alice = (await admin.request("core", "get_user", {"user": "alice"}))["data"]
    assert set(alice) == {a1, a2}
    assert alice[a1]["meta"] == {"device": "phone"}
    assert alice[a1]["transport"] == transport
    assert alice[a1]["remote"].startswith(f"{transport}:127.0.0.1:")
    assert isinstance(alice[a1]["login_time"], int)
    same = await admin.request("core", "get", {"user": "alice"}, subclass="user")
    assert set(same["data"]) == {a1, a2}
    nobody = await admin.request("core", "get_user", {"user": "zed"})
    assert nobody["data"] == {"code": 100033, "error": "User not found"}


async def test_a_closed_session_leaves_the_registry(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    alice, _ = await session(connect, node, transport, "alice", "pw1")
    admin, _ = await session(connect, node, transport, "demo-admin", "pw")
    await alice.close()
    # The close reaches the server asynchronously: ask until it is seen (bounded).
    for _ in range(100):
        users = (await admin.request("core", "list_users"))["data"]
        if "alice" not in users:
            break
    assert "alice" not in users


@pytest.mark.parametrize("spelling", [("stop_session", None), ("logout_session", None),
                                      ("stop", "session")])
async def test_stop_session(make_node: NodeFactory, connect: PeerFactory, transport: str,
                            spelling: tuple[str, str | None]) -> None:
    node = await make_node(demo={})
    alice, alice_id = await session(connect, node, transport, "alice", "pw1")
    admin, _ = await session(connect, node, transport, "demo-admin", "pw")
    cmd, subclass = spelling
    response = await admin.request("core", cmd, {"session_id": alice_id}, subclass=subclass)
    assert response["data"] == {"user": "alice"}
    await alice.wait_closed()
    again = await admin.request("core", cmd, {"session_id": alice_id}, subclass=subclass)
    assert again["data"] == {"code": 100062, "error": "Session not found"}


async def test_an_admin_may_stop_its_own_session(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    admin, admin_id = await session(connect, node, transport, "demo-admin", "pw")
    response = await admin.request("core", "stop_session", {"session_id": admin_id})
    assert response["data"] == {"user": "demo-admin"}
    await admin.wait_closed()


@pytest.mark.parametrize("spelling", [("log", None), ("log", "session")])
async def test_session_log(make_node: NodeFactory, connect: PeerFactory, transport: str,
                           spelling: tuple[str, str | None], caplog: pytest.LogCaptureFixture
                           ) -> None:
    node = await make_node(demo={})
    alice, _ = await session(connect, node, transport, "alice", "pw1")
    cmd, subclass = spelling
    response = await alice.request("core", cmd, {"source": "app", "message": "hello there",
                                                 "level": 4}, subclass=subclass)
    assert response == {"result": "ok", "tid": response["tid"]}
    assert any("hello there" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    bad = await alice.request("core", cmd, {"source": "app", "message": "x", "level": 9},
                              subclass=subclass)
    assert bad["data"] == {"code": 100046, "error": "Invalid value: level"}
    assert error_code(await alice.request("core", cmd, {"source": "app"},
                                          subclass=subclass)) == 100045


async def test_ping_in_both_spellings(make_node: NodeFactory, connect: PeerFactory,
                                      transport: str) -> None:
    node = await make_node(demo={})
    alice, _ = await session(connect, node, transport, "alice", "pw1")
    for subclass in (None, "core"):
        response = await alice.request("core", "ping", subclass=subclass)
        assert response == {"result": "ok", "tid": response["tid"]}


async def test_client_events_are_answered_ok(make_node: NodeFactory, connect: PeerFactory,
                                             transport: str) -> None:
    node = await make_node(demo={})
    alice, _ = await session(connect, node, transport, "alice", "pw1")
    for class_ in ("media", "core"):
        response = await alice.request(class_, "event", {"type": "stop", "body": {"a": 1}})
        assert response["result"] == "ok" and "data" not in response


# -- roles (§4) -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("cmd", "data"), [
    ("list_users", None), ("get_user", {"user": "bob"}), ("stop_session", {"session_id": "x"}),
    ("session_cmd", {"session_id": "x", "class": "a", "cmd": "b"}),
])
async def test_a_user_is_refused_admin_commands(
        make_node: NodeFactory, connect: PeerFactory, transport: str, cmd: str,
        data: dict[str, Any] | None) -> None:
    node = await make_node(demo={})
    alice, _ = await session(connect, node, transport, "alice", "pw1")
    response = await alice.request("core", cmd, data)
    assert response["data"] == {"code": 100030, "error": "Unauthorized"}


async def test_permissions_grant_a_user_commands(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"permissions": {"user": ["core.user.list"],
                                                 "bob": ["core.user.*"]}})
    alice, _ = await session(connect, node, transport, "alice", "pw1")
    bob, _ = await session(connect, node, transport, "bob", "pw2")
    assert (await alice.request("core", "list_users"))["result"] == "ok"
    assert error_code(await alice.request("core", "get_user", {"user": "bob"})) == 100030
    assert (await bob.request("core", "get_user", {"user": "alice"}))["result"] == "ok"
    assert error_code(await bob.request("core", "stop_session",
                                        {"session_id": "x"})) == 100030


async def test_a_service_admin_stays_in_its_service(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={}, other={"admin": {"user": "other-admin", "password": "o"}})
    _, other_id = await session(connect, node, transport, "alice", "pw1", service="other")
    admin, _ = await session(connect, node, transport, "demo-admin", "pw")
    for cmd, data in [("list_users", {"service": "other"}),
                      ("get_user", {"user": "alice", "service": "other"}),
                      ("stop_session", {"session_id": other_id, "service": "other"})]:
        response = await admin.request("core", cmd, data)
        assert response["data"] == {"code": 100030, "error": "Unauthorized"}, cmd
    # Its own service's registry does not hold the other service's sessions.
    assert error_code(await admin.request("core", "stop_session",
                                          {"session_id": other_id})) == 100062
    # And it cannot log in there.
    peer = await connect(node, "other", transport)
    refused = await peer.request("core", "login", {"user": "demo-admin", "password": "pw"})
    assert error_code(refused) == 100030


async def test_the_global_admin_acts_on_any_service(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={}, other={})
    _, other_id = await session(connect, node, transport, "bob", "pw2", service="other")
    admin, _ = await session(connect, node, transport, "admin", "secret", service="core")
    users = await admin.request("core", "list_users", {"service": "other"})
    assert users["data"] == {"bob": [other_id]}
    assert (await admin.request("core", "list_users"))["data"] == {"admin": [
        *(await node.registry.users("core"))["admin"]]}
    missing = await admin.request("core", "list_users", {"service": "nope"})
    assert missing["data"] == {"code": 100020, "error": "Service not found"}
    stopped = await admin.request("core", "stop_session", {"session_id": other_id,
                                                           "service": "other"})
    assert stopped["data"] == {"user": "bob"}
