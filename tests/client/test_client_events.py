"""The client's event API against the real server, on all four transports; `nkservice listen`."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nkservice.client import ApiError, Client
from nkservice.node import Node
from tests.client.test_client import NodeFactory, admin_of, url_of

WAIT = 5.0


async def test_subscribe_receive_unsubscribe(make_node: NodeFactory, transport: str,
                                             make_client: Callable[..., Client]) -> None:
    node = await make_node(demo={})
    admin = await admin_of(make_client, node)
    async with make_client(url_of(node, transport)) as alice:
        events = alice.events()
        seen: list[Any] = []
        alice.on_event(seen.append)
        await alice.login("alice", "pw1")
        await alice.subscribe("media", type="stop", body={"from": "sub"})
        await admin.send_event("media", "session", "stop", "s1", body={"k": "v"})
        expected = {"class": "media", "subclass": "session", "type": "stop", "obj_id": "s1",
                    "body": {"from": "sub", "k": "v"}}
        async with asyncio.timeout(WAIT):
            assert await anext(events) == expected
        assert seen == [expected]
        await alice.unsubscribe("media", type="stop")
        await alice.subscribe("mark")
        await admin.send_event("media", type="stop")
        await admin.send_event("mark")
        async with asyncio.timeout(WAIT):
            assert await anext(events) == {"class": "mark"}
        with pytest.raises(ApiError) as refused:
            await alice.send_event("media")
        assert refused.value.code == 100030
    await admin.close()


async def test_subscriptions_come_back_after_a_reconnect(
        make_node: NodeFactory, make_client: Callable[..., Client]) -> None:
    node = await make_node(demo={})
    admin = await admin_of(make_client, node)
    reconnected = asyncio.Event()
    async with make_client(url_of(node, "ws"), reconnect=True, backoff_min=0.01,
                           backoff_max=0.05, on_reconnect=reconnected.set) as alice:
        events = alice.events()
        await alice.login("alice", "pw1")
        await alice.subscribe("chat", body={"n": 0})
        await admin.request("core", "stop_session", {"session_id": alice.session_id})
        async with asyncio.timeout(WAIT):
            await reconnected.wait()
        await admin.send_event("chat")
        async with asyncio.timeout(WAIT):
            assert await anext(events) == {"class": "chat", "body": {"n": 0}}
    await admin.close()


async def test_nkservice_listen(make_node: NodeFactory, make_client: Callable[..., Client],
                                tmp_path: Path, cert_files: dict[str, str]) -> None:
    node: Node = await make_node(demo={})
    admin = await admin_of(make_client, node)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nkservice", "listen", url_of(node, "wss"), "--user", "alice",
        "--password", "pw1", "--subscribe", "media/session", "--subscribe", "chat",
        "--cafile", cert_files["cafile"], stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    try:
        # Publish until the listener has subscribed and prints (its start takes a moment).
        async with asyncio.timeout(20):
            while True:
                await admin.send_event("media", "session", "start", body={"n": 1})
                try:
                    line = await asyncio.wait_for(process.stdout.readline(), 0.2)
                    break
                except TimeoutError:
                    continue
        assert json.loads(line) == {"class": "media", "subclass": "session", "type": "start",
                                    "body": {"n": 1}}
        await admin.send_event("chat", obj_id="room1")
        async with asyncio.timeout(WAIT):
            while (event := json.loads(await process.stdout.readline()))["class"] != "chat":
                pass
        assert event == {"class": "chat", "obj_id": "room1"}
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0
        await admin.close()
