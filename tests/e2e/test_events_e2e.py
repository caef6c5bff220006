"""Events and subscriptions (PROTOCOL.md §3.2, §5, §6), on tcp, tls, ws and wss."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nkservice.node import Node
from nkservice.service.registry import LocalSessionRegistry
from tests.conftest import NodeFactory, PeerFactory
from tests.e2e.test_protocol_e2e import error_code
from tests.wire import Peer

pytestmark = pytest.mark.usefixtures("transport")

MARK = {"class": "mark"}  # a last event: what arrives before it is all that arrived


async def user(connect: PeerFactory, node: Node, transport: str, name: str, password: str,
               service: str = "demo", **extra: Any) -> tuple[Peer, str]:
    peer = await connect(node, service, transport)
    session_id: str = (await peer.login(name, password, **extra))["session_id"]
    return peer, session_id


async def ok(peer: Peer, cmd: str, data: dict[str, Any] | None = None,
             subclass: str | None = None) -> Any:
    response = await peer.request("core", cmd, data, subclass=subclass)
    assert response["result"] == "ok", response
    return response.get("data")


async def next_event(peer: Peer) -> dict[str, Any]:
    """The next message must be an event: answer it (as the protocol requires), return it."""
    message = await peer.recv()
    assert message["class"] == "core" and message["cmd"] == "event", message
    assert isinstance(message["tid"], int)
    await peer.send({"result": "ok", "tid": message["tid"]})
    data: dict[str, Any] = message["data"]
    return data


async def events_until_mark(peer: Peer) -> list[dict[str, Any]]:
    got = []
    while (event := await next_event(peer)) != MARK:
        got.append(event)
    return got


async def watch_marks(*peers: Peer) -> None:
    for peer in peers:
        await ok(peer, "subscribe", MARK)


async def mark(publisher: Peer) -> None:
    await ok(publisher, "send_event", MARK)


@pytest.fixture
async def pair(make_node: NodeFactory, connect: PeerFactory, transport: str
               ) -> tuple[Node, Peer, Peer]:
    """A node, a subscriber (alice) and a publisher (the demo service admin)."""
    node = await make_node(demo={})
    alice, _ = await user(connect, node, transport, "alice", "pw1")
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    await watch_marks(alice)
    return node, alice, admin


# -- matching (§5.1) -----------------------------------------------------------------------------

SUBSCRIPTIONS = [  # (subclass, type, obj_id) of alice's subscriptions, `*` = left out
    ("session", "stop", "s1"), ("session", "*", "*"), ("*", "start", "*"), ("*", "*", "s2"),
    ("room", "*", "r1"), ("*", "join", "r2"), ("call", "ring", "*"),
]
EVENTS = [  # (subclass, type, obj_id) published, and whether alice must get it
    (("session", "stop", "s1"), True), (("session", "pause", "s9"), True),
    (("other", "start", "x"), True), (("other", "other", "s2"), True),
    (("room", "leave", "r1"), True), (("room", "join", "r2"), True),
    (("call", "ring", "c1"), True), (("call", "hangup", "c1"), False),
    (("room", "leave", "r2"), False), (("*", "stop", "*"), False),
    (("*", "*", "*"), False), (("*", "start", "*"), True), (("session", "*", "*"), True),
]


async def test_every_wildcard_combination(pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    for subclass, type_, obj_id in SUBSCRIPTIONS:
        await ok(alice, "subscribe", {"class": "media", "subclass": subclass, "type": type_,
                                      "obj_id": obj_id})
    for (subclass, type_, obj_id), _ in EVENTS:
        await ok(admin, "send_event", {"class": "media", "subclass": subclass, "type": type_,
                                       "obj_id": obj_id})
    await mark(admin)
    got = [(e.get("subclass", "*"), e.get("type", "*"), e.get("obj_id", "*"))
           for e in await events_until_mark(alice)]
    assert got == [key for key, expected in EVENTS if expected]


async def test_only_a_wildcard_subscription_gets_a_wildcard_event(
        pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    await ok(alice, "subscribe", {"class": "media", "type": "stop"})
    await ok(admin, "send_event", {"class": "media"})
    await ok(admin, "send_event", {"class": "media", "type": "stop"})
    await ok(admin, "send_event", {"class": "chat", "type": "stop"})
    await mark(admin)
    assert await events_until_mark(alice) == [{"class": "media", "type": "stop"}]


async def test_event_shape(pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    await ok(alice, "subscribe", {"class": "media"})
    await admin.send({"class": "core", "cmd": "send_event", "tid": 1, "data": {
        "class": "media", "subclass": "session", "type": "stop", "obj_id": "5179b729",
        "body": {"k": "v"}}})
    assert await admin.recv() == {"result": "ok", "tid": 1}
    message = await alice.recv()
    assert message == {"class": "core", "cmd": "event", "tid": message["tid"], "data": {
        "class": "media", "subclass": "session", "type": "stop", "obj_id": "5179b729",
        "body": {"k": "v"}}}
    await alice.send({"result": "ok", "tid": message["tid"]})
    await ok(admin, "send_event", {"class": "media", "body": {}})
    assert await next_event(alice) == {"class": "media"}


# -- delivery (§5.2) -----------------------------------------------------------------------------

@pytest.mark.parametrize(("subscription_body", "event_body", "delivered"), [
    ({"a": 1, "b": 1}, {"b": 2, "c": 2}, {"a": 1, "b": 2, "c": 2}),
    ({"a": 1}, None, {"a": 1}),
    (None, {"e": 1}, {"e": 1}),
    ({"a": 1}, [1, 2], [1, 2]),
    ("text", {"e": 1}, {"e": 1}),
    ([1], None, [1]),
])
async def test_body_merge(pair: tuple[Node, Peer, Peer], subscription_body: Any,
                          event_body: Any, delivered: Any) -> None:
    _, alice, admin = pair
    subscription: dict[str, Any] = {"class": "media"}
    if subscription_body is not None:
        subscription["body"] = subscription_body
    await ok(alice, "subscribe", subscription)
    event: dict[str, Any] = {"class": "media"}
    if event_body is not None:
        event["body"] = event_body
    await ok(admin, "send_event", event)
    assert (await next_event(alice))["body"] == delivered


async def test_one_delivery_with_the_most_specific_body(pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    await ok(alice, "subscribe", {"class": "media", "body": {"from": "any"}})
    await ok(alice, "subscribe", {"class": "media", "type": "stop", "obj_id": "1",
                                  "body": {"from": "specific"}})
    await ok(alice, "subscribe", {"class": "media", "subclass": "s", "body": {"from": "s"}})
    await ok(alice, "subscribe", {"class": "media", "type": "stop",
                                  "body": {"from": "typed"}})
    await ok(admin, "send_event", {"class": "media", "subclass": "s", "type": "stop",
                                   "obj_id": "1"})
    await ok(admin, "send_event", {"class": "media", "subclass": "s", "type": "stop"})
    await mark(admin)
    bodies = [e["body"] for e in await events_until_mark(alice)]
    # Two fields fixed beats one; between one-field subscriptions the older one wins.
    assert bodies == [{"from": "specific"}, {"from": "s"}]


async def test_resubscribing_replaces_the_body(pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    await ok(alice, "subscribe", {"class": "media", "body": {"v": 1}})
    await ok(alice, "subscribe", {"class": "media", "body": {"v": 2}})
    await ok(admin, "send_event", {"class": "media"})
    assert await next_event(alice) == {"class": "media", "body": {"v": 2}}
    subscriptions = await ok(alice, "get_subscriptions")
    assert sum(s["class"] == "media" for s in subscriptions) == 1


async def test_the_sender_gets_its_own_events_in_order(pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    await ok(admin, "subscribe", {"class": "chat"})
    await ok(alice, "subscribe", {"class": "chat"})
    for n in range(20):
        await admin.send({"class": "core", "cmd": "send_event", "tid": f"s{n}",
                          "data": {"class": "chat", "body": {"n": n}}})
    answers: list[str] = []
    events: list[int] = []
    while len(answers) < 20 or len(events) < 20:
        message = await admin.recv()
        if "result" in message:
            answers.append(message["tid"])
        else:
            await admin.send({"result": "ok", "tid": message["tid"]})
            events.append(message["data"]["body"]["n"])
    assert answers == [f"s{n}" for n in range(20)] and events == list(range(20))
    assert [(await next_event(alice))["body"]["n"] for _ in range(20)] == list(range(20))


async def test_an_error_answer_to_an_event_changes_nothing(
        pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    await ok(alice, "subscribe", {"class": "media"})
    await ok(admin, "send_event", {"class": "media", "type": "one"})
    first = await alice.recv()
    await alice.send({"result": "error", "tid": first["tid"],
                      "data": {"code": 100042, "error": "Unknown command 'event'"}})
    await ok(admin, "send_event", {"class": "media", "type": "two"})
    assert (await next_event(alice))["type"] == "two"


async def test_seed_names_and_the_obj_alias(make_node: NodeFactory, connect: PeerFactory,
                                            transport: str) -> None:
    node = await make_node(demo={})
    seed = await connect(node, "demo", transport)
    await seed.send({"class": "core", "cmd": "login", "tid": 1,
                     "data": {"user": "alice", "pass": "pw1"}})
    assert (await seed.recv())["result"] == "ok"
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    # The seed's subscribe example, with a tid.
    await seed.send({"class": "core", "cmd": "subscribe", "tid": 2, "data": {
        "class": "media", "obj": "session", "obj_id": "*", "type": "*"}})
    assert await seed.recv() == {"result": "ok", "tid": 2}
    await ok(admin, "send_event", {"class": "media", "obj": "session", "type": "start"},
             subclass="event")
    # A seed-form session also gets `obj`.
    assert await next_event(seed) == {"class": "media", "subclass": "session",
                                      "obj": "session", "type": "start"}
    await ok(admin, "send", {"class": "media", "subclass": "session"}, subclass="event")
    assert (await next_event(seed))["obj"] == "session"
    listed = await ok(seed, "get_subscriptions")
    assert {"class": "media", "subclass": "session", "type": "*", "obj_id": "*",
            "service": "demo", "body": {}} in listed
    assert await ok(seed, "unsubscribe", {"class": "media", "obj": "session"}) is None
    assert all(s["class"] != "media" for s in await ok(seed, "get_subscriptions",
                                                       subclass="event"))


async def test_unsubscribe_needs_the_exact_keys(pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    await ok(alice, "subscribe", {"class": "media", "type": "stop"})
    await ok(alice, "unsubscribe", {"class": "media"})  # not the same keys: ok, no effect
    await ok(admin, "send_event", {"class": "media", "type": "stop"})
    assert (await next_event(alice))["type"] == "stop"
    await ok(alice, "unsubscribe", {"class": "media", "type": "stop"}, subclass="event")
    await ok(admin, "send_event", {"class": "media", "type": "stop"})
    await mark(admin)
    assert await events_until_mark(alice) == []


async def test_subscription_field_errors(pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, _ = pair
    assert (await alice.request("core", "subscribe", {}))["data"] == {
        "code": 100045, "error": "Missing field: class"}
    assert (await alice.request("core", "subscribe", {"class": 1}))["data"] == {
        "code": 100044, "error": "Syntax error: class"}
    assert (await alice.request("core", "subscribe", {"class": "a", "type": ""}))["data"] == {
        "code": 100046, "error": "Invalid value: type"}


# -- automatic subscriptions, user and session events (§3.2) -------------------------------------

async def test_user_and_session_events(make_node: NodeFactory, connect: PeerFactory,
                                       transport: str) -> None:
    node = await make_node(demo={})
    phone, phone_id = await user(connect, node, transport, "alice", "pw1")
    laptop, _ = await user(connect, node, transport, "alice", "pw1")
    bob, _ = await user(connect, node, transport, "bob", "pw2")
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    await watch_marks(laptop, bob)
    await ok(admin, "send_user_event", {"user": "alice", "type": "note", "body": {"n": 1}})
    expected = {"class": "core", "subclass": "user_event", "type": "note", "obj_id": "alice",
                "body": {"n": 1}}
    assert await next_event(phone) == expected
    assert await next_event(laptop) == expected
    await ok(admin, "send_event", {"session_id": phone_id, "body": {"n": 2}},
             subclass="session")
    assert await next_event(phone) == {"class": "core", "subclass": "session_event",
                                       "obj_id": phone_id, "body": {"n": 2}}
    await mark(admin)
    assert await events_until_mark(laptop) == []
    assert await events_until_mark(bob) == []
    assert error_code(await admin.request("core", "send_user_event", {"type": "x"})) == 100045


async def test_automatic_subscriptions_are_listed_and_removable(
        pair: tuple[Node, Peer, Peer]) -> None:
    node, alice, admin = pair
    alice_id = (await node.registry.users("demo"))["alice"][0]
    listed = await ok(alice, "get_subscriptions")
    assert listed == [
        {"class": "core", "subclass": "user_event", "type": "*", "obj_id": "alice",
         "service": "demo", "body": {}},
        {"class": "core", "subclass": "session_event", "type": "*", "obj_id": alice_id,
         "service": "demo", "body": {}},
        {"class": "mark", "subclass": "*", "type": "*", "obj_id": "*", "service": "demo",
         "body": {}},
    ]
    await ok(alice, "unsubscribe", {"class": "core", "subclass": "user_event",
                                    "obj_id": "alice"})
    await ok(admin, "send_user_event", {"user": "alice"})
    await mark(admin)
    assert await events_until_mark(alice) == []
    # A user may take its own automatic subscription back, with a body.
    await ok(alice, "subscribe", {"class": "core", "subclass": "user_event",
                                  "obj_id": "alice", "body": {"again": True}})
    await ok(admin, "send_user_event", {"user": "alice"})
    assert (await next_event(alice))["body"] == {"again": True}


@pytest.mark.one_process
async def test_subscriptions_vanish_with_their_session(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    alice, alice_id = await user(connect, node, transport, "alice", "pw1")
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    await ok(alice, "subscribe", {"class": "media"})
    await ok(admin, "stop_session", {"session_id": alice_id})
    await alice.wait_closed()
    assert len(node.events.index) == 2  # the admin's automatic two, nothing of alice's


async def test_a_replacing_login_takes_the_subscriptions_over(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    first, _ = await user(connect, node, transport, "alice", "pw1", session_id="dev")
    await ok(first, "subscribe", {"class": "media", "body": {"kept": True}})
    second, _ = await user(connect, node, transport, "alice", "pw1", session_id="dev")
    await first.wait_closed()
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    await ok(admin, "send_event", {"class": "media"})
    assert await next_event(second) == {"class": "media", "body": {"kept": True}}


# -- roles (§4) ---------------------------------------------------------------------------------

async def test_users_may_not_publish_or_subscribe_to_core(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    alice, _ = await user(connect, node, transport, "alice", "pw1")
    for cmd, data in [("send_event", {"class": "media"}), ("send_user_event", {"user": "bob"}),
                      ("send_session_event", {"session_id": "x"}),
                      ("subscribe", {"class": "core", "subclass": "session"}),
                      ("subscribe", {"class": "core", "subclass": "user_event",
                                     "obj_id": "bob"})]:
        assert error_code(await alice.request("core", cmd, data)) == 100030, (cmd, data)


async def test_permissions_open_publishing_and_core_events(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"permissions": {"user": ["core.event.*"]}})
    alice, _ = await user(connect, node, transport, "alice", "pw1")
    await ok(alice, "subscribe", {"class": "core", "subclass": "session"})
    await ok(alice, "subscribe", {"class": "media"})
    await alice.send({"class": "core", "cmd": "send_event", "tid": "own",
                      "data": {"class": "media", "type": "mine"}})
    # The sender's own copy comes before the answer in one process; in a cluster, after it
    # (a process writes an event to NATS first, then to its own subscribers).
    first, second = await alice.recv(), await alice.recv()
    answer, event = (first, second) if "result" in first else (second, first)
    assert answer == {"result": "ok", "tid": "own"}
    assert event["cmd"] == "event" and event["data"]["type"] == "mine"
    await alice.send({"result": "ok", "tid": event["tid"]})
    assert error_code(await alice.request("core", "send_user_event", {"user": "x"})) == 100030


async def test_other_services_are_the_admins_alone(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={}, other={})
    alice, _ = await user(connect, node, transport, "alice", "pw1")
    demo_admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    for peer in (alice, demo_admin):
        for cmd in ("subscribe", "send_event", "unsubscribe"):
            response = await peer.request("core", cmd, {"class": "media", "service": "other"})
            assert error_code(response) == 100030, cmd
    bob, _ = await user(connect, node, transport, "bob", "pw2", service="other")
    await ok(bob, "subscribe", {"class": "media"})
    await watch_marks(bob)
    admin, _ = await user(connect, node, transport, "admin", "secret", service="core")
    await ok(admin, "subscribe", {"class": "media", "service": "other"})
    await ok(admin, "send_event", {"class": "media", "type": "x", "service": "other"})
    assert await next_event(bob) == {"class": "media", "type": "x"}
    assert await next_event(admin) == {"class": "media", "type": "x", "service": "other"}
    # The same event name in another service reaches nobody there.
    await ok(demo_admin, "send_event", {"class": "media", "type": "y"})
    await ok(admin, "send_event", {**MARK, "service": "other"})
    assert await events_until_mark(bob) == []


# -- lifecycle (§5.4) ---------------------------------------------------------------------------

async def test_session_start_and_stop_events(make_node: NodeFactory, connect: PeerFactory,
                                             transport: str) -> None:
    node = await make_node(demo={})
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    await ok(admin, "subscribe", {"class": "core", "subclass": "session"})
    alice, alice_id = await user(connect, node, transport, "alice", "pw1")
    start = await next_event(admin)
    assert start["type"] == "start" and start["obj_id"] == alice_id
    assert start["body"]["user"] == "alice" and start["body"]["transport"] == transport
    assert start["body"]["remote"].startswith(f"{transport}:127.0.0.1:")
    await alice.close()
    stop = await next_event(admin)
    assert (stop["type"], stop["obj_id"], stop["body"]) == ("stop", alice_id, start["body"])


# -- §5.3: client events are not published -----------------------------------------------------

async def test_client_events_are_not_published(pair: tuple[Node, Peer, Peer]) -> None:
    _, alice, admin = pair
    await ok(alice, "subscribe", {"class": "media"})  # a published event would reach her
    for class_ in ("media", "core"):
        response = await alice.request(class_, "event", {"class": "media", "type": "x"})
        assert response == {"result": "ok", "tid": response["tid"]}
    await mark(admin)
    assert await events_until_mark(alice) == []


# -- deadlines and slow consumers (§1.3, §5.2) -------------------------------------------------

async def test_an_unanswered_event_closes_the_subscriber(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"request_timeout": 0.2})
    alice, _ = await user(connect, node, transport, "alice", "pw1")
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    await ok(alice, "subscribe", {"class": "media"})
    await ok(admin, "send_event", {"class": "media"})
    assert (await alice.recv())["cmd"] == "event"  # read, never answered
    await alice.wait_closed()


async def test_a_consumer_that_answers_every_event_survives_a_burst(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    """§5.2: written-but-unanswered events are not the outgoing queue."""
    node = await make_node(demo={})
    reader, _ = await user(connect, node, transport, "alice", "pw1")
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    await ok(reader, "subscribe", {"class": "media"})
    count = 5000
    for n in range(count):  # back to back: no waiting for the answers
        await admin.send({"class": "core", "cmd": "send_event", "tid": n,
                          "data": {"class": "media", "body": {"n": n}}})
    for n in range(count):
        assert (await next_event(reader))["body"] == {"n": n}
    for _ in range(count):
        assert (await admin.recv())["result"] == "ok"
    assert "alice" in await ok(admin, "list_users")


async def test_a_consumer_that_stops_reading_is_cut_off_and_told_why(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    # The deadline of the unanswered events must not close it first on a loaded machine.
    node = await make_node(demo={"max_queue": 5, "request_timeout": 60})
    slow, _ = await user(connect, node, transport, "alice", "pw1")
    fast, _ = await user(connect, node, transport, "bob", "pw2")
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    for peer in (slow, fast):
        await ok(peer, "subscribe", {"class": "media"})
    body = {"pad": "x" * 16384}
    sent = 0
    while "alice" in await ok(admin, "list_users"):  # `slow` reads nothing meanwhile
        assert sent < 5000, "never cut off"
        await ok(admin, "send_event", {"class": "media", "body": {**body, "n": sent}})
        assert (await next_event(fast))["body"]["n"] == sent  # nobody else waits
        sent += 1
    messages, close_code = await slow.read_until_closed()
    events = [m for m in messages if m.get("cmd") == "event"]
    assert 0 < len(events) < sent
    if slow.is_websocket:
        assert close_code == 1008
    else:
        assert messages[-1] == {"result": "error", "tid": None, "data": {
            "code": 100081, "error": "Connection closed: slow consumer"}}


async def test_a_session_holds_at_most_max_subscriptions(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"max_subscriptions": 5})
    alice, _ = await user(connect, node, transport, "alice", "pw1")  # 2 automatic ones
    for n in range(3):
        await ok(alice, "subscribe", {"class": "media", "obj_id": str(n)})
    refused = await alice.request("core", "subscribe", {"class": "media", "obj_id": "3"})
    assert refused["data"] == {"code": 100080, "error": "Too many subscriptions"}
    await ok(alice, "subscribe", {"class": "media", "obj_id": "2", "body": {"b": 1}})  # same key
    assert len(await ok(alice, "get_subscriptions")) == 5
    await ok(alice, "unsubscribe", {"class": "media", "obj_id": "0"})
    await ok(alice, "subscribe", {"class": "media", "obj_id": "3"})


# -- resuming a session (§3.3) --------------------------------------------------------------------

def parked(node: Node, service: str) -> list[str]:
    assert isinstance(node.registry, LocalSessionRegistry)
    return node.registry.parked(service)


async def gone(admin: Peer, user_name: str) -> None:
    """Until the server has seen `user_name`'s connection close (bounded)."""
    for _ in range(200):
        if user_name not in await ok(admin, "list_users"):
            return
    raise AssertionError(f"{user_name} still listed")


async def test_a_session_resumes_with_what_it_missed(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"resume_window": 30, "resume_buffer": 2})
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    first, _ = await user(connect, node, transport, "alice", "pw1", session_id="phone")
    await ok(first, "subscribe", {"class": "media", "body": {"kept": True}})
    await first.close()
    await gone(admin, "alice")
    for n in range(3):  # only the newest two are kept
        await ok(admin, "send_event", {"class": "media", "body": {"n": n}})
    again = await connect(node, "demo", transport)
    login = await again.login("alice", "pw1", session_id="phone")
    assert login["resumed"] is True
    assert [(await next_event(again))["body"] for _ in range(2)] == [
        {"kept": True, "n": 1}, {"kept": True, "n": 2}]
    await ok(admin, "send_event", {"class": "media", "body": {"n": 3}})
    assert (await next_event(again))["body"] == {"kept": True, "n": 3}
    assert [s["class"] for s in await ok(again, "get_subscriptions")] == [
        "core", "core", "media"]


async def test_events_written_but_not_answered_come_again_on_resume(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    """An event the connection took but the client never answered may never have reached
    it (a connection that drops loses what was on its way): a resume delivers it again."""
    node = await make_node(demo={"resume_window": 30})
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    first, _ = await user(connect, node, transport, "alice", "pw1", session_id="phone")
    await ok(first, "subscribe", {"class": "media"})
    for n in range(2):
        await ok(admin, "send_event", {"class": "media", "body": {"n": n}})
    unanswered = await first.recv()
    assert unanswered["data"]["body"] == {"n": 0}
    assert (await next_event(first))["body"] == {"n": 1}  # answered
    await first.close()
    await gone(admin, "alice")
    await ok(admin, "send_event", {"class": "media", "body": {"n": 2}})
    again = await connect(node, "demo", transport)
    assert (await again.login("alice", "pw1", session_id="phone"))["resumed"] is True
    assert [(await next_event(again))["body"] for _ in range(2)] == [{"n": 0}, {"n": 2}]


@pytest.mark.one_process
async def test_no_resume_for_another_user_or_after_the_window(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"resume_window": 30}, short={"resume_window": 0.05})
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    alice, _ = await user(connect, node, transport, "alice", "pw1", session_id="shared")
    await ok(alice, "subscribe", {"class": "media"})
    await alice.close()
    await gone(admin, "alice")
    bob = await connect(node, "demo", transport)
    login = await bob.login("bob", "pw2", session_id="shared")
    assert "resumed" not in login
    assert all(s["class"] == "core" for s in await ok(bob, "get_subscriptions"))

    short_admin, _ = await user(connect, node, transport, "demo-admin", "pw", service="short")
    carol, _ = await user(connect, node, transport, "carol", "pw3", service="short",
                          session_id="tablet")
    await ok(carol, "subscribe", {"class": "media"})
    await carol.close()
    await gone(short_admin, "carol")
    async with asyncio.timeout(5):  # the server's own 50 ms timer: nothing to await on
        while parked(node, "short"):  # noqa: ASYNC110 (time is what is tested)
            await asyncio.sleep(0.01)
    later = await connect(node, "short", transport)
    assert "resumed" not in await later.login("carol", "pw3", session_id="tablet")
    assert len(node.events.index) == 2 * 4  # the live sessions' automatic ones, nothing else


@pytest.mark.one_process
async def test_resume_is_off_by_default(make_node: NodeFactory, connect: PeerFactory,
                                        transport: str) -> None:
    node = await make_node(demo={})
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    alice, _ = await user(connect, node, transport, "alice", "pw1", session_id="phone")
    await ok(alice, "subscribe", {"class": "media"})
    await alice.close()
    await gone(admin, "alice")
    assert parked(node, "demo") == []
    again = await connect(node, "demo", transport)
    assert "resumed" not in await again.login("alice", "pw1", session_id="phone")


@pytest.mark.one_process
async def test_a_session_stopped_by_an_admin_does_not_resume(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"resume_window": 30})
    admin, _ = await user(connect, node, transport, "demo-admin", "pw")
    alice, alice_id = await user(connect, node, transport, "alice", "pw1", session_id="pc")
    await ok(alice, "subscribe", {"class": "media"})
    await ok(admin, "stop_session", {"session_id": alice_id})
    await alice.wait_closed()
    assert parked(node, "demo") == []
    again = await connect(node, "demo", transport)
    assert "resumed" not in await again.login("alice", "pw1", session_id="pc")
