"""The `service` commands of §6 against an in-process node over real sockets: who may run
them, the errors that name the key, and what create, update and stop change while the node
runs. (The real process, its restart and its store: test_services_e2e.py.)"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from nkservice.node import Node
from tests.conftest import ALL_URLS, NodeFactory, PeerFactory
from tests.e2e.test_protocol_e2e import error_code
from tests.wire import Peer

SERVICE_COMMANDS = [("create_service", {"name": "x"}), ("update_service", {"name": "demo"}),
                    ("stop_service", {"name": "demo"}), ("list_services", None),
                    ("get_service", {"name": "demo"})]


@pytest.fixture
async def peers(client_tls: ssl.SSLContext) -> AsyncIterator[list[Peer]]:
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        await peer.close()


async def open_peer(peers: list[Peer], url: str, client_tls: ssl.SSLContext) -> Peer:
    peer = await Peer(url).connect(client_tls)
    peers.append(peer)
    return peer


async def admin(connect: PeerFactory, node: Node, transport: str = "tcp") -> Peer:
    peer = await connect(node, "core", transport)
    await peer.login("admin", "secret")
    return peer


def ok(response: dict[str, Any]) -> Any:
    assert response["result"] == "ok", response
    return response.get("data")


def error(response: dict[str, Any], code: int, *texts: str) -> None:
    assert error_code(response) == code, response
    for text in texts:
        assert text in response["data"]["error"], response


def url_in(node: Node, service: str, scheme: str) -> str:
    return next(u for u in node.urls(service) if u.startswith(f"{scheme}://"))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def names(peer: Peer) -> set[str]:
    return {entry["name"] for entry in ok(await peer.request("core", "list_services"))}


def refused(url: str) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port_of(url))) != 0


# -- who may -------------------------------------------------------------------------------

async def test_every_service_command_is_the_global_admins(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    node = await make_node(demo={})
    for user, password in (("alice", "pw1"), ("demo-admin", "pw")):
        peer = await connect(node, "demo", "tcp")
        await peer.login(user, password)
        for cmd, data in SERVICE_COMMANDS:
            error(await peer.request("core", cmd, data), 100030)
            subclass_form = cmd.split("_")[0] if cmd != "list_services" else "list"
            error(await peer.request("core", subclass_form, data, subclass="service"), 100030)
    boss = await admin(connect, node)
    assert await names(boss) == {"core", "demo"}


# -- create: names and definitions ----------------------------------------------------------

@pytest.mark.parametrize(("data", "code", "text"), [
    ({}, 100045, "Missing field: name"),
    ({"name": 5}, 100044, "Syntax error: name"),
    ({"name": "core"}, 100046, "Invalid value: name"),
    ({"name": "a.b"}, 100046, "Invalid value: name"),
    ({"name": "a b"}, 100046, "Invalid value: name"),
    ({"name": "demo"}, 100021, "config file"),
    ({"name": "x", "bogus": 1}, 100044, "Syntax error: bogus: unknown key"),
    ({"name": "x", "users": {"a": 1}}, 100044, "Syntax error: users.a"),
    ({"name": "x", "listen": "tcp://127.0.0.1:0"}, 100044, "Syntax error: listen"),
    ({"name": "x", "ping_interval": -1}, 100046, "Invalid value: ping_interval"),
    ({"name": "x", "ping_interval": "5"}, 100044, "Syntax error: ping_interval"),
    ({"name": "x", "listen": ["http://127.0.0.1:0"]}, 100046, "Invalid value: listen"),
    ({"name": "x", "script_code": "x = = 1"}, 100046, "Invalid value: script_code: line 1"),
    ({"name": "x", "plugins": ["nope"]}, 100046, "Invalid value: plugins"),
    ({"name": "x", "tls": {"certfile": "/no/such.pem"}}, 100046, "Invalid value: tls.certfile"),
    ({"name": "x", "listen": ["tls://127.0.0.1:0"]}, 100046, "Invalid value: tls.certfile"),
    ({"name": "x", "listen": ["tcp://127.0.0.1:0"], "tls": {"certfile": __file__}},
     None, None),  # a plain service does not read its certificate
])
async def test_create_refuses_what_it_cannot_use_naming_the_key(
        make_node: NodeFactory, connect: PeerFactory, data: dict[str, Any], code: int | None,
        text: str | None) -> None:
    node = await make_node(demo={})
    boss = await admin(connect, node)
    answer = await boss.request("core", "create_service", data)
    if code is None:
        assert ok(answer) == {"name": "x"}
        return
    assert text is not None
    error(answer, code, text)
    assert await names(boss) == {"core", "demo"}


async def test_create_then_log_in_on_each_transport(
        make_node: NodeFactory, connect: PeerFactory, peers: list[Peer],
        client_tls: ssl.SSLContext, cert_files: dict[str, str]) -> None:
    node = await make_node()
    boss = await admin(connect, node)
    created = await boss.request("core", "create_service", {
        "name": "chat", "listen": ALL_URLS, "tls": {"certfile": cert_files["certfile"]},
        "users": {"alice": "pw1"}})
    assert ok(created) == {"name": "chat"}
    error(await boss.request("core", "create_service", {"name": "chat"}), 100021)
    for scheme in ("tcp", "tls", "ws", "wss"):
        peer = await open_peer(peers, url_in(node, "chat", scheme), client_tls)
        assert (await peer.login("alice", "pw1"))["user"] == "alice"
    listing = ok(await boss.request("core", "list_services"))
    chat = next(entry for entry in listing if entry["name"] == "chat")
    assert chat == {"name": "chat", "listen": node.urls("chat"), "sessions": 4,
                    "origin": "api"}


async def test_a_port_in_use_is_refused_and_leaves_nothing_behind(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    node = await make_node(demo={})
    boss = await admin(connect, node)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        answer = await boss.request("core", "create_service", {
            "name": "x", "listen": ["ws://127.0.0.1:0/", f"tcp://127.0.0.1:{taken}"]})
        error(answer, 100046, "Invalid value: listen: cannot listen on", str(taken))
        assert await names(boss) == {"core", "demo"}
        demo_port = port_of(url_in(node, "demo", "tcp"))
        answer = await boss.request("core", "create_service", {
            "name": "x", "listen": [f"tcp://127.0.0.1:{demo_port}"]})
        error(answer, 100046, "services demo and x both listen")
    assert ok(await boss.request("core", "create_service", {
        "name": "x", "listen": [f"tcp://127.0.0.1:{taken}"]})) == {"name": "x"}


# -- get and list ---------------------------------------------------------------------------

async def test_get_shows_the_definition_without_its_secrets(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    node = await make_node()
    boss = await admin(connect, node)
    ok(await boss.request("core", "create_service", {
        "name": "x", "listen": ["tcp://127.0.0.1:0"], "admin": {"user": "x-admin",
                                                                "password": "hunter2"},
        "users": {"alice": "scrypt$secret-hash"}, "ping_interval": 7}))
    definition = ok(await boss.request("core", "get_service", {"name": "x"}))
    assert "hunter2" not in str(definition) and "secret-hash" not in str(definition)
    assert definition["admin"] == {"user": "x-admin"}
    assert definition["users"] == ["alice"]
    assert definition["ping_interval"] == 7
    assert definition["listen"] == ["tcp://127.0.0.1:0"]
    assert definition["origin"] == "api"
    error(await boss.request("core", "get_service", {"name": "nope"}), 100020)
    core = ok(await boss.request("core", "get", {"name": "core"}, subclass="service"))
    assert core["origin"] == "config"


# -- update -------------------------------------------------------------------------------

async def test_update_swaps_listeners_and_keeps_the_sessions_of_the_kept_one(
        make_node: NodeFactory, connect: PeerFactory, peers: list[Peer],
        client_tls: ssl.SSLContext) -> None:
    node = await make_node()
    boss = await admin(connect, node)
    ok(await boss.request("core", "create_service", {
        "name": "x", "listen": ["tcp://127.0.0.1:0", "wss://127.0.0.1:0/"],
        "tls": node.services["core"].config.source["tls"], "users": {"alice": "pw1"}}))
    kept, removed = url_in(node, "x", "tcp"), url_in(node, "x", "wss")
    staying = await open_peer(peers, kept, client_tls)
    await staying.login("alice", "pw1")
    answer = await boss.request("core", "update_service", {
        "name": "x", "listen": [kept, "ws://127.0.0.1:0/"]})
    assert ok(answer) == {"name": "x"}
    assert refused(removed)
    newcomer = await open_peer(peers, url_in(node, "x", "ws"), client_tls)
    await newcomer.login("alice", "pw1")
    ok(await staying.request("core", "ping"))  # still logged in, on the same connection
    assert url_in(node, "x", "tcp") == kept


async def test_new_users_and_limits_apply_at_once(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    node = await make_node(demo={"ping_interval": 0})
    boss = await admin(connect, node)
    alice = await connect(node, "demo", "tcp")
    await alice.login("alice", "pw1")
    answer = await boss.request("core", "update_service", {
        "name": "demo", "users": {"alice": "new"}, "ping_interval": 0.05})
    assert ok(answer) == {"name": "demo", "origin": "config", "note": answer["data"]["note"]}
    assert "until the node restarts" in answer["data"]["note"]
    ping = await alice.recv()  # the existing session gets the new ping interval
    assert (ping["class"], ping["cmd"]) == ("core", "ping")
    await alice.send({"result": "ok", "tid": ping["tid"]})
    again = await connect(node, "demo", "tcp")
    error(await again.request("core", "login", {"user": "alice", "password": "pw1"},
                              subclass="user"), 100038)
    await again.login("alice", "new")
    # a key set to null goes back to its default
    ok(await boss.request("core", "update_service", {"name": "demo", "ping_interval": None}))
    assert node.services["demo"].config.limits.ping_interval == 60


async def test_an_update_that_fails_changes_nothing(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    node = await make_node(demo={})
    boss = await admin(connect, node)
    before = node.urls("demo")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        attempts: list[tuple[dict[str, Any], str]] = [
            ({"users": {"alice": "new"}, "script_code": "error('no')"}, "script_code"),
            ({"users": {"alice": "new"}, "listen": [f"tcp://127.0.0.1:{taken}"]}, "listen"),
            ({"users": {"alice": "new"}, "tls": {"certfile": __file__}}, "tls"),
        ]
        for changes, text in attempts:
            answer = await boss.request("core", "update_service", {"name": "demo", **changes})
            error(answer, 100046, f"Invalid value: {text}")
            assert node.urls("demo") == before
            alice = await connect(node, "demo", "ws")
            await alice.login("alice", "pw1")  # the old password, on the old listeners
    error(await boss.request("core", "update_service", {"name": "nope"}), 100020)
    error(await boss.request("core", "update_service", {"name": "core"}), 100046)


async def test_an_update_with_tls_reads_the_certificate_again(
        make_node: NodeFactory, connect: PeerFactory, peers: list[Peer], tmp_path: Path,
        ca: trustme.CA, client_tls: ssl.SSLContext) -> None:
    node = await make_node()
    boss = await admin(connect, node)
    pem = tmp_path / "x.pem"
    ca.issue_cert("127.0.0.1", common_name="first").private_key_and_cert_chain_pem \
        .write_to_path(str(pem))
    ok(await boss.request("core", "create_service", {
        "name": "x", "listen": ["tls://127.0.0.1:0"], "tls": {"certfile": str(pem)},
        "users": {"alice": "pw1"}}))
    url = url_in(node, "x", "tls")
    before = await open_peer(peers, url, client_tls)
    await before.login("alice", "pw1")
    ca.issue_cert("127.0.0.1", common_name="second").private_key_and_cert_chain_pem \
        .write_to_path(str(pem))
    ok(await boss.request("core", "update_service", {"name": "x",
                                                      "tls": {"certfile": str(pem)}}))
    after = await open_peer(peers, url_in(node, "x", "tls"), client_tls)
    await after.login("alice", "pw1")
    assert _common_name(after) == "second"
    ok(await before.request("core", "ping"))


def _common_name(peer: Peer) -> str:
    certificate = peer.peer_certificate()
    subject = dict(item[0] for item in certificate["subject"])
    return str(subject["commonName"])


# -- stop -----------------------------------------------------------------------------------

async def test_stop_tells_the_sessions_why_and_frees_the_name_and_port(
        make_node: NodeFactory, connect: PeerFactory, peers: list[Peer], transport: str,
        client_tls: ssl.SSLContext, cert_files: dict[str, str]) -> None:
    node = await make_node()
    boss = await admin(connect, node)
    definition = {"name": "x", "listen": ALL_URLS, "tls": {"certfile": cert_files["certfile"]},
                  "users": {"alice": "pw1"}}
    ok(await boss.request("core", "create_service", definition))
    url = url_in(node, "x", transport)
    alice = await open_peer(peers, url, client_tls)
    await alice.login("alice", "pw1")
    assert ok(await boss.request("core", "stop_service", {"name": "x"})) in (None, {})
    messages, close_code = await alice.read_until_closed()
    if transport in ("ws", "wss"):
        assert close_code == 1001
    else:
        assert messages[-1]["data"] == {"code": 100081,
                                        "error": "Connection closed: the service was stopped"}
    assert refused(url)
    assert await names(boss) == {"core"}
    error(await boss.request("core", "stop_service", {"name": "x"}), 100020)
    pinned = {**definition, "listen": [f"{transport}://127.0.0.1:{port_of(url)}"
                                       + ("/" if transport.startswith("ws") else "")]}
    assert ok(await boss.request("core", "create_service", pinned)) == {"name": "x"}


async def test_stop_drops_the_services_callbacks_and_subscriptions(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    node = await make_node()
    boss = await admin(connect, node)
    ok(await boss.request("core", "create_service", {"name": "x",
                                                      "listen": ["tcp://127.0.0.1:0"]}))
    ok(await boss.request("core", "register_callback", {"callback": "login", "class": "x"}))
    ok(await boss.request("core", "subscribe", {"class": "chat", "service": "x"}))
    ok(await boss.request("core", "stop_service", {"name": "x"}))
    assert ok(await boss.request("core", "list_callbacks")) == []
    subscriptions = ok(await boss.request("core", "get_subscriptions"))
    assert all(entry["service"] == "core" for entry in subscriptions), subscriptions
    error(await boss.request("core", "send_event", {"class": "chat", "service": "x"}), 100020)


async def test_a_service_of_the_config_file_stops_until_the_restart(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    node = await make_node(demo={})
    boss = await admin(connect, node)
    answer = ok(await boss.request("core", "stop_service", {"name": "demo"}))
    assert answer["origin"] == "config" and "until the node restarts" in answer["note"]
    error(await boss.request("core", "create_service", {"name": "demo"}), 100021,
          "config file")
    error(await boss.request("core", "stop_service", {"name": "core"}), 100046)


# -- the admin's `service` field, lifecycle events, the store ------------------------------

async def test_the_admin_acts_on_a_created_service(
        make_node: NodeFactory, connect: PeerFactory, peers: list[Peer],
        client_tls: ssl.SSLContext) -> None:
    node = await make_node()
    boss = await admin(connect, node)
    ok(await boss.request("core", "create_service", {
        "name": "x", "listen": ["tcp://127.0.0.1:0"], "users": {"alice": "pw1"}}))
    alice = await open_peer(peers, url_in(node, "x", "tcp"), client_tls)
    session_id = (await alice.login("alice", "pw1"))["session_id"]
    ok(await alice.request("core", "subscribe", {"class": "news"}))  # not for users:
    ok(await boss.request("core", "send_event", {"class": "news", "body": {"n": 1},
                                                 "service": "x"}))
    assert ok(await boss.request("core", "list_users", {"service": "x"})) == {
        "alice": [session_id]}
    ok(await boss.request("core", "register_callback", {"callback": "cmd", "class": "chat",
                                                        "service": "x"}))
    assert ok(await boss.request("core", "list_callbacks", {"service": "x"})) == [
        {"callback": "cmd", "class": "chat", "service": "x",
         "session_id": ok(await boss.request("core", "list_users"))["admin"][0]}]
    ok(await boss.request("core", "stop_session", {"session_id": session_id, "service": "x"}))
    messages, _ = await alice.read_until_closed()
    assert messages[0]["data"] == {"class": "news", "body": {"n": 1}}


async def test_lifecycle_events_reach_an_admin_subscribed_to_core_service(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    node = await make_node()
    boss = await admin(connect, node)
    ok(await boss.request("core", "subscribe", {"class": "core", "subclass": "service"}))
    ok(await boss.request("core", "create_service", {"name": "x",
                                                      "listen": ["tcp://127.0.0.1:0"]}))
    ok(await boss.request("core", "update_service", {"name": "x", "ping_interval": 5}))
    ok(await boss.request("core", "stop_service", {"name": "x"}))
    seen = []
    for _ in range(3):
        event = await boss.recv()
        await boss.send({"result": "ok", "tid": event["tid"]})
        seen.append((event["data"]["type"], event["data"]["obj_id"],
                     event["data"]["body"]["origin"]))
    assert seen == [("start", "x", "api"), ("update", "x", "api"), ("stop", "x", "api")]


async def test_created_services_come_back_when_the_node_starts_again(
        make_node: NodeFactory, connect: PeerFactory, peers: list[Peer],
        client_tls: ssl.SSLContext) -> None:
    first = await make_node()
    boss = await admin(connect, first)
    for name in ("x", "y", "gone"):
        ok(await boss.request("core", "create_service", {
            "name": name, "listen": ["tcp://127.0.0.1:0"], "users": {"alice": "pw1"}}))
    ok(await boss.request("core", "update_service", {"name": "y", "users": {"alice": "new"}}))
    ok(await boss.request("core", "stop_service", {"name": "gone"}))
    await first.stop()
    second = Node(first.config)
    await second.start()
    try:
        assert set(second.services) == {"core", "x", "y"}
        alice = await open_peer(peers, url_in(second, "y", "tcp"), client_tls)
        await alice.login("alice", "new")
    finally:
        await second.stop()
