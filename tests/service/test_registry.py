"""The in-process session registry on a fake wire (PROTOCOL.md §3.3, §6)."""

from __future__ import annotations

import asyncio

import pytest

from nkservice.errors import ApiError
from nkservice.service.registry import LocalSessionRegistry
from tests.service.fakes import Client, FakeNode


async def test_claiming_an_id_takes_over_replaces_or_refuses() -> None:
    node = FakeNode()
    service = node.add("demo")
    first = Client(service)
    await first.login("alice", "pw1", session_id="phone")
    assert (await first.request("subscribe", {"class": "media"}))["result"] == "ok"
    second = Client(service)
    assert (await second.login("alice", "pw1", session_id="phone"))["result"] == "ok"
    assert first.wire.goodbye is not None
    assert first.wire.goodbye.reason == "replaced by a new login with the same session id"
    subscriptions = (await second.request("get_subscriptions"))["data"]
    assert {s["class"] for s in subscriptions} == {"core", "media"}  # taken over
    bob = Client(service)
    refused = await bob.login("bob", "pw2", session_id="phone")
    assert refused["data"]["code"] == 100034
    assert await node.registry.users("demo") == {"alice": ["phone"]}


async def test_a_parked_session_resumes_with_what_it_missed() -> None:
    node = FakeNode()
    service = node.add("demo", resume_window=60, resume_buffer=2)
    alice = Client(service)
    await alice.login("alice", "pw1", session_id="tablet")
    await alice.request("subscribe", {"class": "media"})
    alice.conn.lost()  # the network went away: parked, not stopped
    registry = node.registry
    assert isinstance(registry, LocalSessionRegistry)
    assert registry.parked("demo") == ["tablet"]
    boss = Client(service)
    await boss.login("boss", "pw")
    for n in range(3):
        await boss.request("send_event", {"class": "media", "body": {"n": n}})
    again = Client(service)
    login = await again.login("alice", "pw1", session_id="tablet")
    assert login["data"]["resumed"] is True
    missed = [(await again.wire.recv())["data"]["body"]["n"] for _ in range(2)]
    assert missed == [1, 2]  # the newest resume_buffer ones, in order
    assert registry.parked("demo") == []


async def test_finding_listing_stopping_and_asking_sessions() -> None:
    node = FakeNode()
    service = node.add("demo")
    alice = Client(service)
    await alice.login("alice", "pw1", session_id="a1", meta={"device": "pc"})
    registry = node.registry
    found = await registry.find("demo", "a1")
    assert found is not None and (found.user, found.meta) == ("alice", {"device": "pc"})
    assert await registry.find("demo", "nope") is None
    assert list(await registry.sessions_of("demo", "alice")) == ["a1"]
    acks: list[int] = []
    answer = asyncio.create_task(registry.request(
        "demo", "a1", "chat", "join", {"r": 1}, subclass=None, on_ack=lambda: acks.append(1),
        timeout=5))
    forwarded = await alice.wire.recv()
    assert (forwarded["class"], forwarded["cmd"], forwarded["data"]) == ("chat", "join", {"r": 1})
    alice.conn.receive(b'{"ack":%d}' % forwarded["tid"])
    alice.conn.receive(b'{"result":"ok","tid":%d,"data":{"in":true}}' % forwarded["tid"])
    response = await answer
    assert response.data == {"in": True} and acks == [1]
    assert await registry.stop("demo", "a1", "enough") == "alice"
    with pytest.raises(ApiError, match="Session not found"):
        await registry.stop("demo", "nope", "enough")
