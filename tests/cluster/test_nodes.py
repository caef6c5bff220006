"""Nodes of a cluster: services created, updated and stopped on one run on all; NATS going
away and coming back; a node that joins late. In-process nodes joined over a real NATS
server, clients over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nkservice.cluster.bus import NatsBus
from nkservice.cluster.registry import ClusterRegistry
from nkservice.cluster.server import EmbeddedNats
from nkservice.events.index import Topic
from nkservice.node import UNTIL_RESTART, Node
from nkservice.service.config import parse_node_config
from tests.wire import Peer

Start = Callable[..., Awaitable[Node]]
WAIT = 20.0


@pytest.fixture
async def start_node(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Start]:
    """Start nodes of one cluster, each with the `demo` service on a port of its own."""
    nodes: list[Node] = []

    async def start(**demo: Any) -> Node:
        """`demo`: more keys of the `demo` service."""
        config = parse_node_config({
            "node": {"cluster": nats_server.url, "data_dir": str(tmp_path / f"d{len(nodes)}")},
            "admin": {"user": "admin", "password": "secret"},
            "core": {"listen": ["tcp://127.0.0.1:0"]},
            # A test client answers events one at a time, and what NATS kept for the time
            # it was away arrives at once: no slow-consumer limit should be what is tested.
            "services": {"demo": {"listen": ["tcp://127.0.0.1:0"], "ping_interval": 0,
                                  "max_queue": 1_000_000, "max_queue_bytes": 1 << 30,
                                  "max_unanswered_events": 1_000_000,
                                  "users": {"alice": "pw1", "bob": "pw2"},
                                  "admin": {"user": "boss", "password": "pw"}, **demo}},
        }, tmp_path)
        node = Node(config)
        await node.start()
        nodes.append(node)
        for each in nodes:
            assert each.cluster is not None
            async with asyncio.timeout(WAIT):
                await each.cluster.rpc.until_members(len(nodes) - 1)
        return node

    yield start
    for node in nodes:
        await node.stop()


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        with contextlib.suppress(Exception):
            await peer.close()


async def login(peers: list[Peer], node: Node, service: str, user: str,
                password: str) -> Peer:
    peer = await Peer(node.urls(service)[0]).connect(None)
    peers.append(peer)
    await peer.login(user, password)
    return peer


def ok(response: dict[str, Any]) -> Any:
    assert response["result"] == "ok", response
    return response.get("data")


async def next_event(peer: Peer) -> dict[str, Any]:
    event = await peer.recv(timeout=WAIT)
    assert event.get("cmd") == "event", event
    await peer.send({"result": "ok", "tid": event["tid"]})
    data: dict[str, Any] = event["data"]
    return data


async def until(node: Node, *, connected: bool) -> None:
    assert node.cluster is not None
    async with asyncio.timeout(WAIT):
        await node.cluster.until(connected=connected)


async def test_nats_restarted_under_load(
        start_node: Start, nats_server: EmbeddedNats, peers: list[Peer]) -> None:
    """No crash while NATS is away; local work goes on; the admin sees the degraded state;
    events flow between the processes again once it is back; stored services survive."""
    first, second = await start_node(), await start_node()
    admin = await login(peers, first, "core", "admin", "secret")
    ok(await admin.request("core", "create_service", {
        "name": "shop", "listen": ["tcp://127.0.0.1:0"], "users": {"carol": "pw3"}}))
    alice = await login(peers, first, "demo", "alice", "pw1")
    ok(await alice.request("core", "subscribe", {"class": "chat"}))
    sender = await login(peers, second, "demo", "boss", "pw")
    ok(await sender.request("core", "send_event", {"class": "chat", "body": {"n": 0}}))
    assert (await next_event(alice))["body"] == {"n": 0}

    async def load() -> None:  # the other process keeps publishing throughout
        n = 1
        while True:
            await sender.request("core", "send_event", {"class": "chat", "body": {"n": n}})
            n += 1

    loading = asyncio.create_task(load())
    try:
        await nats_server.stop()
        await until(first, connected=False)
        await until(second, connected=False)
        state = ok(await admin.request("core", "ping"))["cluster"]
        assert state["state"] == "degraded" and state["since"] > 0
        local = await login(peers, first, "demo", "boss", "pw")  # logins go on
        ok(await local.request("core", "send_event", {"class": "chat", "body": {"local": 1}}))
        while (await next_event(alice))["body"] != {"local": 1}:
            pass  # events published before NATS went away may still come first
        await nats_server.restart()
        await until(first, connected=True)
        await until(second, connected=True)
        again = await login(peers, second, "demo", "boss", "pw")  # (the load has `sender`)
        ok(await again.request("core", "send_event", {"class": "chat", "body": {"back": 1}}))
        while (await next_event(alice)).get("body") != {"back": 1}:
            pass  # the load's events: received in order, then this one
    finally:
        loading.cancel()
    assert ok(await admin.request("core", "ping"))["cluster"]["state"] == "connected"
    listing = ok(await admin.request("core", "list_services"))
    assert "shop" in {entry["name"] for entry in listing}
    carol = await login(peers, second, "shop", "carol", "pw3")  # the other process has it
    ok(await carol.request("core", "ping"))


async def test_a_node_joining_late_sees_every_created_service(
        start_node: Start, peers: list[Peer]) -> None:
    first = await start_node()
    admin = await login(peers, first, "core", "admin", "secret")
    for name in ("shop", "blog"):
        ok(await admin.request("core", "create_service", {
            "name": name, "listen": ["tcp://127.0.0.1:0"], "users": {"carol": "pw3"}}))
    ok(await admin.request("core", "update_service", {"name": "blog",
                                                       "users": {"dave": "pw4"}}))
    late = await start_node()
    assert {"shop", "blog"} <= set(late.services)
    await login(peers, late, "blog", "dave", "pw4")
    await login(peers, late, "shop", "carol", "pw3")


async def test_a_create_while_nats_is_away_is_refused_and_nothing_half_done(
        start_node: Start, nats_server: EmbeddedNats, peers: list[Peer]) -> None:
    node = await start_node()
    admin = await login(peers, node, "core", "admin", "secret")
    await nats_server.stop()
    await until(node, connected=False)
    refused = await admin.request("core", "create_service", {
        "name": "shop", "listen": ["tcp://127.0.0.1:0"]})
    assert refused["result"] == "error", refused
    assert "shop" not in node.services
    await nats_server.restart()
    await until(node, connected=True)
    ok(await admin.request("core", "create_service", {
        "name": "shop", "listen": ["tcp://127.0.0.1:0"]}))


async def converged(check: Callable[[], bool]) -> None:
    """Until another process has followed the store: it tells nobody when it has."""
    async with asyncio.timeout(WAIT):
        while not check():  # noqa: ASYNC110 (no event to await: see above)
            await asyncio.sleep(0.01)


async def test_services_follow_the_store_on_every_node(
        start_node: Start, peers: list[Peer]) -> None:
    first, second = await start_node(), await start_node()
    watcher = await login(peers, second, "core", "admin", "secret")
    ok(await watcher.request("core", "subscribe", {"class": "core", "subclass": "service"}))
    admin = await login(peers, first, "core", "admin", "secret")
    ok(await admin.request("core", "create_service", {
        "name": "shop", "listen": ["tcp://127.0.0.1:0"], "users": {"carol": "pw3"}}))
    started = await next_event(watcher)
    assert (started["type"], started["obj_id"]) == ("start", "shop")
    await converged(lambda: "shop" in second.services)
    await login(peers, second, "shop", "carol", "pw3")

    other = await login(peers, second, "core", "admin", "secret")
    refused = await other.request("core", "create_service", {"name": "shop"})
    assert refused["data"]["code"] == 100021, refused  # one name in the whole cluster
    ok(await other.request("core", "update_service", {"name": "shop",
                                                       "users": {"dave": "pw4"}}))
    assert (await next_event(watcher))["type"] == "update"  # once: by the process that did it
    await converged(lambda: "dave" in first.services["shop"].config.users)
    await login(peers, first, "shop", "dave", "pw4")

    ok(await admin.request("core", "stop_service", {"name": "shop"}))
    assert (await next_event(watcher))["type"] == "stop"
    await converged(lambda: "shop" not in second.services)
    ok(await watcher.request("core", "ping"))
    assert watcher.waiting == []  # each change said once, by the process that made it


async def test_a_service_of_the_config_file_changes_on_every_process(
        start_node: Start, peers: list[Peer]) -> None:
    """Every process reads the same config file: an update or a stop of one of its services
    is made on each, and answered once it is (so nothing here waits for it)."""
    first, second = await start_node(), await start_node()
    watcher = await login(peers, second, "core", "admin", "secret")
    ok(await watcher.request("core", "subscribe", {"class": "core", "subclass": "service"}))
    alice = await login(peers, second, "demo", "alice", "pw1")
    admin = await login(peers, first, "core", "admin", "secret")
    answer = ok(await admin.request("core", "update_service", {"name": "demo",
                                                                "users": {"carol": "pw3"}}))
    assert answer == {"name": "demo", "origin": "config", "note": UNTIL_RESTART}
    assert second.services["demo"].config.users.keys() == {"carol"}
    await login(peers, second, "demo", "carol", "pw3")
    refused = await Peer(second.urls("demo")[0]).connect(None)
    peers.append(refused)
    denied = await refused.request("core", "login", {"user": "bob", "password": "pw2"},
                                   subclass="user")
    assert denied["data"]["code"] == 100030, denied  # bob is not among the users any more
    assert (await next_event(watcher))["type"] == "update"

    answer = ok(await admin.request("core", "stop_service", {"name": "demo"}))
    assert answer == {"origin": "config", "note": UNTIL_RESTART}
    assert "demo" not in first.services and "demo" not in second.services
    assert (await alice.read_until_closed(WAIT))[0][-1]["data"] == {
        "code": 100081, "error": "Connection closed: the service was stopped"}
    assert (await next_event(watcher))["type"] == "stop"
    ok(await watcher.request("core", "ping"))
    assert watcher.waiting == []  # each change said once, by the process that made it


async def test_a_process_that_missed_a_change_of_the_config_file_is_named(
        start_node: Start, nats_server: EmbeddedNats, peers: list[Peer]) -> None:
    first, second = await start_node(), await start_node()
    admin = await login(peers, first, "core", "admin", "secret")
    await nats_server.stop()
    await until(first, connected=False)
    answer = ok(await admin.request("core", "update_service", {"name": "demo",
                                                                "users": {"carol": "pw3"}}))
    assert answer["note"] == (UNTIL_RESTART + "; 1 of the cluster's 1 other processes did "
                              "not make the change (their logs say why)")
    assert "carol" in first.services["demo"].config.users
    assert "carol" not in second.services["demo"].config.users
    await nats_server.restart()
    await until(first, connected=True)


Numbers = dict[int, list[int | str]]


async def two_senders(nodes: tuple[Node, Node], peers: list[Peer], count: int,
                      midway: Callable[[], Awaitable[Peer]]) -> tuple[Peer, Numbers]:
    """Two service admins, one on each node, send `count` `chat` events each (numbered),
    then "end"; `midway()` runs when a third of them are sent: the events the peer it
    returns got, by sender."""
    senders = [await login(peers, node, "demo", "boss", "pw") for node in nodes]
    third = asyncio.Event()

    async def send(sender: int) -> None:
        for n in [*range(count), "end"]:
            ok(await senders[sender].request("core", "send_event", {
                "class": "chat", "body": {"s": sender, "n": n}}))
            if n == count // 3:
                third.set()

    sending = [asyncio.create_task(send(sender)) for sender in (0, 1)]
    await third.wait()
    receiver = await midway()
    await asyncio.gather(*sending)
    got: Numbers = {0: [], 1: []}
    while not all(numbers[-1:] == ["end"] for numbers in got.values()):
        body = (await next_event(receiver))["body"]
        got[body["s"]].append(body["n"])
    return receiver, got


def every_one_once(got: Numbers, count: int) -> None:
    missed = {sender: sorted(set(range(count)) - set(numbers))
              for sender, numbers in got.items()}
    assert missed == {0: [], 1: []}
    assert got == {0: [*range(count), "end"], 1: [*range(count), "end"]}  # none twice


async def test_a_session_resumed_on_another_process_gets_every_event_once(
        start_node: Start, peers: list[Peer]) -> None:
    """Events keep coming while a session is resumed on another process: each reaches it
    once, in its sender's order (the old process keeps them until the new one holds the
    subscriptions; the new one leaves out what the old one had)."""
    first = await start_node(resume_window=30, resume_buffer=100_000)
    second = await start_node(resume_window=30, resume_buffer=100_000)
    alice = await Peer(first.urls("demo")[0]).connect(None)
    await alice.login("alice", "pw1", session_id="phone")
    ok(await alice.request("core", "subscribe", {"class": "chat"}))
    await alice.close()
    registry = first.registry
    assert isinstance(registry, ClusterRegistry)
    await converged(lambda: registry.local.parked("demo") == ["phone"])

    async def resume() -> Peer:
        again = await Peer(second.urls("demo")[0]).connect(None)
        peers.append(again)
        assert (await again.login("alice", "pw1", session_id="phone"))["resumed"] is True
        return again

    again, got = await two_senders((first, second), peers, 300, resume)
    every_one_once(got, 300)
    ok(await again.request("core", "ping"))
    assert again.waiting == []


async def test_a_session_taken_over_on_another_process_loses_no_event(
        start_node: Start, peers: list[Peer]) -> None:
    """The same for a live session replaced by a login on another process: what the old
    connection got, then what the new one gets, is every event once."""
    first, second = await start_node(), await start_node()
    old = await Peer(first.urls("demo")[0]).connect(None)
    peers.append(old)
    await old.login("alice", "pw1", session_id="phone")
    ok(await old.request("core", "subscribe", {"class": "chat"}))
    before: Numbers = {0: [], 1: []}

    async def take_over() -> Peer:
        new = await Peer(second.urls("demo")[0]).connect(None)
        peers.append(new)
        await new.login("alice", "pw1", session_id="phone")
        return new

    _, after = await two_senders((first, second), peers, 300, take_over)
    messages, _ = await old.read_until_closed(WAIT)
    for message in messages:
        if message.get("cmd") == "event":
            body = message["data"]["body"]
            before[body["s"]].append(body["n"])
    every_one_once({sender: before[sender] + after[sender] for sender in (0, 1)}, 300)


async def test_an_event_goes_to_nats_before_this_process_delivers_it(start_node: Start) -> None:
    """The other processes start on a fan-out while this one writes its own share: a loop
    turn's events are written to NATS, then delivered here."""
    node = await start_node()
    assert isinstance(node.bus, NatsBus) and node.cluster is not None
    client = node.cluster.link.client
    deliver = node.bus._deliver
    assert deliver is not None
    queued_at_delivery: list[int] = []
    all_delivered = asyncio.Event()

    def watched(topic: Topic, body: Any) -> None:
        queued_at_delivery.append(client._pending_data_size)
        deliver(topic, body)
        if len(queued_at_delivery) == 3:
            all_delivered.set()

    node.bus._deliver = watched
    for number in range(3):
        node.events.publish(Topic("demo", "chat", "*", "*", "*"), {"n": number})
    assert queued_at_delivery == []  # not yet: this turn's events are still being published
    assert client._pending_data_size > 0
    async with asyncio.timeout(WAIT):
        await all_delivered.wait()
    assert queued_at_delivery == [0, 0, 0]  # all three handed to NATS before the first one
