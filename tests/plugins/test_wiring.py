"""Plugins and scripts named in a node's configuration, over real sockets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from nkservice.errors import ConfigError
from nkservice.node import Node
from nkservice.service.config import parse_node_config
from tests.conftest import NodeFactory, PeerFactory

SCRIPT = """
function login(req)
  if req.user == "guest" then return {authorized = true, meta = {via = "lua"}} end
end

function cmd(req)
  if req.class == "calc" then return {result = "ok", data = {sum = req.data.a + req.data.b}} end
end
"""


async def test_a_script_and_the_gelf_plugin_from_the_config(
        make_node: NodeFactory, connect: PeerFactory) -> None:
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Collector(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.put_nowait(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Collector, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        node = await make_node(demo={"script_code": SCRIPT, "plugins": ["gelf"],
                                     "gelf": {"host": "127.0.0.1", "port": port}})
        guest = await connect(node, "demo", "tcp")
        assert (await guest.login("guest", "anything"))["user"] == "guest"
        answer = await guest.request("calc", "add", {"a": 2, "b": 3})
        assert answer["data"] == {"sum": 5}
        logged = await guest.request("core", "log", {"source": "app", "message": "hi"})
        assert logged["result"] == "ok"
        async with asyncio.timeout(5):
            message = json.loads(await received.get())
        assert (message["short_message"], message["_user"], message["_service"]) == (
            "hi", "guest", "demo")
    finally:
        transport.close()


@pytest.mark.parametrize(("service", "message"), [
    ({"script_code": "x = = 1"}, r"services\.demo\.script_code: line 1"),
    ({"script": "missing.lua"}, r"services\.demo\.script: cannot read"),
    ({"plugins": ["gelf"]}, r"services\.demo\.gelf\.host: the gelf plugin needs"),
    ({"plugins": ["nope"]}, r"services\.demo\.plugins: no built-in plugin 'nope'"),
])
async def test_a_service_whose_logic_does_not_load_does_not_start(
        tmp_path: Path, service: dict[str, Any], message: str) -> None:
    config = parse_node_config({"core": {"listen": []}, "services": {"demo": service}},
                               tmp_path)
    node = Node(config)
    with pytest.raises(ConfigError, match=message):
        await node.start()
