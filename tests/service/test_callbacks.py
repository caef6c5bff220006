"""Callbacks to external apps on a fake wire (PROTOCOL.md §7): registration, the seed's
login callback, load balancing, failover and the fallbacks."""

from __future__ import annotations

import json
from typing import Any

from tests.service.fakes import Client, FakeNode, code_of


def send(client: Client, message: dict[str, Any]) -> None:
    client.conn.receive(json.dumps(message).encode())


async def apps_for(node: FakeNode, count: int, registration: dict[str, Any]) -> list[Client]:
    apps = []
    for _ in range(count):
        app = Client(node.services["core"])
        await app.login("admin", "secret")
        assert (await app.request("register_callback", registration))["result"] == "ok"
        apps.append(app)
    return apps


def setup() -> FakeNode:
    node = FakeNode()
    node.add("core")
    node.add("demo")
    return node


async def test_the_seeds_login_callback() -> None:
    node = setup()
    (app,) = await apps_for(node, 1, {"class": "demo", "callback": "login"})
    user = Client(node.services["demo"])
    send(user, {"class": "core", "cmd": "login", "tid": 1,
                "data": {"user": "zoe", "pass": "x", "meta": {"m": 1}}})
    asked = await app.wire.recv()
    assert (asked["class"], asked["subclass"], asked["cmd"]) == ("core", "callback",
                                                                "api_server_login")
    assert {k: asked["data"][k] for k in ("service", "user", "pass", "password", "meta")} == {
        "service": "demo", "user": "zoe", "pass": "x", "password": "x", "meta": {"m": 1}}
    send(app, {"result": "ok", "tid": asked["tid"],
               "data": {"authorized": "false", "reason": "Invalid password"}})
    refused = await user.wire.recv()
    assert refused["data"] == {"code": 100030, "error": "Unauthorized: Invalid password"}

    send(user, {"class": "core", "cmd": "login", "tid": 2, "data": {"user": "zoe", "pass": "y"}})
    asked = await app.wire.recv()
    send(app, {"result": "ok", "tid": asked["tid"],
               "data": {"authorized": True, "user": "zoe@corp", "meta": {"tier": 2}}})
    accepted = await user.wire.recv()
    assert accepted["result"] == "ok" and accepted["data"]["user"] == "zoe@corp"


async def test_fired_callbacks_are_shared_round_robin() -> None:
    node = setup()
    apps = await apps_for(node, 3, {"service": "demo", "callback": "cmd", "class": "chat"})
    alice = Client(node.services["demo"])
    await alice.login("alice", "pw1")
    for n in range(30):
        send(alice, {"class": "chat", "cmd": "say", "tid": n, "data": {"n": n}})
    for index, app in enumerate(apps):
        for _ in range(10):  # ten each, and nothing more (checked below)
            asked = await app.wire.recv()
            request = asked["data"]["request"]
            assert (request["class"], request["cmd"]) == ("chat", "say")
            send(app, {"result": "ok", "tid": asked["tid"], "data": {"by": index, **request}})
    replies = [await alice.wire.recv() for _ in range(30)]
    assert sorted(r["tid"] for r in replies) == list(range(30))
    assert all(r["data"]["data"] == {"n": r["tid"]} for r in replies)
    assert sorted(r["data"]["by"] for r in replies) == [0] * 10 + [1] * 10 + [2] * 10
    assert all(app.wire.inbox.empty() for app in apps)


async def test_a_dropped_app_hands_the_callback_over_then_the_fallback_applies() -> None:
    node = setup()
    first, second = await apps_for(node, 2, {"service": "demo", "callback": "cmd",
                                             "class": "chat"})
    alice = Client(node.services["demo"])
    await alice.login("alice", "pw1")
    send(alice, {"class": "chat", "cmd": "say", "tid": 1})
    await first.wire.recv()
    first.conn.lost()  # killed mid-callback: its registration ends too
    asked = await second.wire.recv()
    send(second, {"ack": asked["tid"]})
    assert await alice.wire.recv() == {"ack": 1}  # the app's ack reaches the user
    send(second, {"result": "error", "tid": asked["tid"],
                  "data": {"code": 4242, "error": "Room is full"}})
    assert (await alice.wire.recv())["data"] == {"code": 4242, "error": "Room is full"}
    listed = (await second.request("list_callbacks"))["data"]
    assert [(c["callback"], c["class"], c["service"]) for c in listed] == [("cmd", "chat",
                                                                           "demo")]
    second.conn.lost()
    assert code_of(await alice.request("say", class_="chat")) == 100050  # nobody: unknown
    assert (await alice.request("list_users"))["result"] == "error"  # core still answers


async def test_bad_registrations() -> None:
    node = setup()
    (app,) = await apps_for(node, 1, {"class": "demo", "callback": "subscribe"})
    assert code_of(await app.request("register_callback", {"callback": "nope"})) == 100046
    missing_class = await app.request("register_callback", {"callback": "cmd",
                                                             "service": "demo"})
    assert missing_class["data"] == {"code": 100046, "error": "Invalid value: class"}
    assert code_of(await app.request("register_callback", {"callback": "login",
                                                           "class": "ghost"})) == 100020
    alice = Client(node.services["demo"])
    await alice.login("alice", "pw1")
    assert code_of(await alice.request("register_callback", {"callback": "login"})) == 100030


async def test_client_events_reach_event_callbacks_of_their_class_or_all() -> None:
    node = setup()
    (chat_only,) = await apps_for(node, 1, {"service": "demo", "callback": "event",
                                           "class": "chat"})
    (every_class,) = await apps_for(node, 1, {"service": "demo", "callback": "event"})
    alice = Client(node.services["demo"])
    await alice.login("alice", "pw1")
    assert (await alice.request("event", {"typing": True}, class_="chat"))["result"] == "ok"
    for app in (chat_only, every_class):
        told = await app.wire.recv()
        assert (told["cmd"], told["data"]["user"], told["data"]["event"]) == (
            "api_server_event", "alice", {"class": "chat", "subclass": None,
                                          "data": {"typing": True}})
        send(app, {"result": "ok", "tid": told["tid"]})
    await alice.request("event", {"x": 1}, class_="media")
    assert (await every_class.wire.recv())["data"]["event"]["class"] == "media"
    assert chat_only.wire.inbox.empty()


async def test_answers_of_the_wrong_shape_are_refusals() -> None:
    node = setup()
    (app,) = await apps_for(node, 1, {"class": "demo", "callback": "login"})
    for bad in ({"authorized": "yes"}, {"authorized": 1}, [True], "true", None):
        user = Client(node.services["demo"])
        send(user, {"class": "core", "cmd": "login", "tid": 1,
                    "data": {"user": "zoe", "password": "x"}})
        asked = await app.wire.recv()
        send(app, {"result": "ok", "tid": asked["tid"], "data": bad})
        assert code_of(await user.wire.recv()) == 100030, bad
    user = Client(node.services["demo"])
    send(user, {"class": "core", "cmd": "login", "tid": 1,
                "data": {"user": "zoe", "password": "x"}})
    asked = await app.wire.recv()
    send(app, {"result": "error", "tid": asked["tid"], "data": {"code": 1, "error": "down"}})
    assert code_of(await user.wire.recv()) == 100030


async def test_the_servers_own_limit_applies_to_a_callback_that_is_only_acked() -> None:
    node = FakeNode()
    node.add("core")
    node.add("demo", ack_timeout=0.2)
    (app,) = await apps_for(node, 1, {"service": "demo", "callback": "cmd", "class": "calc"})
    alice = Client(node.services["demo"])
    await alice.login("alice", "pw1")
    send(alice, {"class": "calc", "cmd": "slow", "tid": 9})
    asked = await app.wire.recv()
    send(app, {"ack": asked["tid"]})
    assert await alice.wire.recv() == {"ack": 9}
    assert (await alice.wire.recv())["data"] == {"code": 100005, "error": "Timeout"}


async def test_a_subscription_decided_after_the_session_ended_is_not_added() -> None:
    node = setup()
    (app,) = await apps_for(node, 1, {"class": "demo", "callback": "subscribe"})
    alice = Client(node.services["demo"])
    await alice.login("alice", "pw1")
    held = len(node.events.index)
    send(alice, {"class": "core", "cmd": "subscribe", "tid": 3, "data": {"class": "media"}})
    asked = await app.wire.recv()
    alice.conn.lost()
    send(app, {"result": "ok", "tid": asked["tid"], "data": {"authorized": True}})
    await app.request("ping")  # the answer above has been handled
    assert len(node.events.index) == held - 2  # its automatic ones went, nothing came back


async def test_a_session_id_an_app_chooses_is_checked() -> None:
    node = setup()
    (app,) = await apps_for(node, 1, {"class": "demo", "callback": "login"})
    user = Client(node.services["demo"])
    send(user, {"class": "core", "cmd": "login", "tid": 1, "data": {"user": "zoe"}})
    asked = await app.wire.recv()
    send(app, {"result": "ok", "tid": asked["tid"],
               "data": {"authorized": True, "session_id": "x" * 129}})
    assert code_of(await user.wire.recv()) == 100030


async def test_a_login_apps_acks_reach_the_user() -> None:
    node = setup()
    (app,) = await apps_for(node, 1, {"class": "demo", "callback": "login"})
    user = Client(node.services["demo"])
    send(user, {"class": "core", "cmd": "login", "tid": "L", "data": {"user": "zoe"}})
    asked = await app.wire.recv()
    send(app, {"ack": asked["tid"]})
    assert await user.wire.recv() == {"ack": "L"}
    send(app, {"result": "ok", "tid": asked["tid"], "data": {"authorized": True}})
    assert (await user.wire.recv())["result"] == "ok"
