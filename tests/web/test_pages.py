"""The plain HTTP side of the core service's WebSocket listener (PROTOCOL.md §2): the dashboard
files, /metrics, /healthz, /readyz and who may read them — against an in-process node over
real sockets, next to the WebSocket and newline JSON on the same port."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import pytest

from nkservice.node import Node
from nkservice.service.config import parse_node_config
from nkservice.site import WEB, WEBSOCKET_PATH
from nkservice.transport.http import MAX_BODY
from tests.conftest import free_port
from tests.web.client import exchange, fetch, read_reply
from tests.wire import Peer


async def start_node(tmp_path: Path, *, core_listen: list[str] | None = None,
                     http: dict[str, Any] | None = None) -> Node:
    config = parse_node_config({
        "node": {"data_dir": str(tmp_path / "data")},
        "admin": {"user": "admin", "password": "secret"},
        "core": {"listen": core_listen or ["ws://127.0.0.1:0/", "tcp://127.0.0.1:0"],
                 "ping_interval": 0},
        "services": {"demo": {"listen": ["ws://127.0.0.1:0/"], "users": {"alice": "pw"},
                              "ping_interval": 0}},
        "http": http or {},
    }, tmp_path)
    node = Node(config)
    await node.start()
    return node


@pytest.fixture
async def node(tmp_path: Path) -> Any:
    running = await start_node(tmp_path)
    yield running
    await running.stop()


def base(node: Node, service: str = "core") -> str:
    url = urlsplit(next(u for u in node.urls(service) if u.startswith("ws://")))
    return f"http://{url.netloc}"


async def test_the_dashboard_is_served_at_the_root(node: Node) -> None:
    page = await fetch(base(node) + "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.body == (WEB / "index.html").read_bytes().replace(WEBSOCKET_PATH, b"/")
    assert WEBSOCKET_PATH not in page.body
    for path, kind in [("/dashboard/dashboard.js", "text/javascript"),
                       ("/dashboard/dashboard.css", "text/css"),
                       ("/nkservice.js", "text/javascript"),
                       ("/dashboard/nkservice.js", "text/javascript")]:
        reply = await fetch(base(node) + path)
        assert reply.status == 200, path
        assert reply.headers["content-type"].startswith(kind), path
        name = path.rsplit("/", 1)[1]
        assert reply.body == (WEB / name).read_bytes()


async def test_the_page_names_the_listeners_websocket_path(tmp_path: Path) -> None:
    node = await start_node(tmp_path, core_listen=["ws://127.0.0.1:0/api"])
    try:
        page = await fetch(base(node) + "/")
        assert page.body == (WEB / "index.html").read_bytes().replace(WEBSOCKET_PATH, b"/api")
        assert (await fetch(base(node) + "/api")).body == page.body
    finally:
        await node.stop()


@pytest.mark.parametrize("path", ["/nothing", "/dashboard/../node.py", "/dashboard/%2e%2e/x",
                                  "/dashboard/.hidden.js", "/dashboard/missing.js",
                                  "/dashboard/site.py", "/dashboard/README"])
async def test_anything_else_is_404(node: Node, path: str) -> None:
    reply = await fetch(base(node) + path)
    assert reply.status == 404
    assert reply.text == "not found\n"


async def test_only_get_and_head(node: Node) -> None:
    post = await fetch(base(node) + "/", method="POST")
    assert post.status == 405
    assert post.headers["allow"] == "GET, HEAD"
    head = await fetch(base(node) + "/healthz", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 0


async def test_websocket_and_newline_json_still_share_the_port(node: Node) -> None:
    assert (await fetch(base(node) + "/")).status == 200
    for scheme in ("ws", "tcp"):
        url = next(u for u in node.urls("core") if u.startswith(scheme))
        peer = await Peer(url).connect(None)
        try:
            assert (await peer.login("admin", "secret"))["user"] == "admin"
            assert (await peer.request("core", "ping"))["result"] == "ok"
        finally:
            await peer.close()


async def test_kept_alive_and_pipelined(node: Node) -> None:
    host, port = base(node).removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        first = await exchange(reader, writer, "GET", "/healthz", {"host": "x"})
        second = await exchange(reader, writer, "GET", "/readyz", {"host": "x"})
        assert (first.status, second.status) == (200, 200)
        assert json.loads(second.body)["ready"] is True
        # Two requests in one write: two answers, in order.
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
                     b"GET /nothing HTTP/1.1\r\nhost: x\r\n\r\n")
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/healthz", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        assert (await read_reply(conn, reader)).status == 200
        conn.start_next_cycle()
        conn.send(h11.Request(method="GET", target="/nothing", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        assert (await read_reply(conn, reader)).status == 404
    finally:
        writer.close()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1)
     + b"x" * (MAX_BODY + 1), 413),
])
async def test_bad_requests_get_an_answer_and_the_node_goes_on(
        node: Node, request_bytes: bytes, status: int) -> None:
    host, port = base(node).removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request_bytes)
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer
    finally:
        writer.close()
    assert (await fetch(base(node) + "/healthz")).status == 200


async def test_a_service_listener_serves_no_pages(node: Node) -> None:
    for path in ("/metrics", "/healthz", "/nkservice.js"):
        reply = await fetch(base(node, "demo") + path)
        assert reply.status == 404, path


async def test_health_and_readiness(node: Node) -> None:
    health = await fetch(base(node) + "/healthz")
    assert health.headers["content-type"] == "application/json"
    body = json.loads(health.body)
    assert body["status"] == "ok" and body["uptime"] >= 0
    ready = json.loads((await fetch(base(node) + "/readyz")).body)
    assert ready == {"ready": True, "cluster": None,
                     "services": {name: node.urls(name) for name in ("core", "demo")}}


async def test_dashboard_and_metrics_can_be_switched_off(tmp_path: Path) -> None:
    node = await start_node(tmp_path, http={"dashboard": False, "metrics": ""})
    try:
        for path in ("/metrics", "/healthz", "/nkservice.js"):
            assert (await fetch(base(node) + path)).status == 404, path
        # The WebSocket's own path, without an upgrade: picows says what is missing.
        assert (await fetch(base(node) + "/")).status == 400
    finally:
        await node.stop()


async def test_metrics_on_a_listener_of_their_own(tmp_path: Path) -> None:
    node = await start_node(tmp_path, http={"metrics": "http://127.0.0.1:0"})
    try:
        port = node.operations_port()
        assert port is not None
        own = f"http://127.0.0.1:{port}"
        assert (await fetch(own + "/metrics")).status == 200
        assert (await fetch(own + "/readyz")).status == 200
        assert (await fetch(own + "/")).status == 404  # the dashboard stays on the core's
        assert (await fetch(base(node) + "/")).status == 200
        assert (await fetch(base(node) + "/metrics")).status == 404
    finally:
        await node.stop()


async def test_a_taken_metrics_port_is_a_config_error(tmp_path: Path) -> None:
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    config = parse_node_config({"node": {"data_dir": str(tmp_path / "d")},
                                "core": {"listen": ["ws://127.0.0.1:0/"]},
                                "http": {"metrics": f"http://127.0.0.1:{port}"}}, tmp_path)
    node = Node(config)
    try:
        with pytest.raises(Exception, match=r"http\.metrics: cannot listen on 127\.0\.0\.1"):
            await node.start()
    finally:
        holder.close()


async def test_not_on_other_addresses_unless_public(tmp_path: Path) -> None:
    port = free_port()
    node = await start_node(tmp_path, core_listen=[f"ws://0.0.0.0:{port}/"])
    try:
        reply = await fetch(f"http://127.0.0.1:{port}/metrics")
        assert reply.status == 403
        assert "[http] public = true" in reply.text
        assert (await fetch(f"http://127.0.0.1:{port}/")).status == 200  # the page is not
    finally:
        await node.stop()
    node = await start_node(tmp_path, core_listen=[f"ws://0.0.0.0:{port}/"],
                            http={"public": True})
    try:
        assert (await fetch(f"http://127.0.0.1:{port}/metrics")).status == 200
    finally:
        await node.stop()


async def test_a_token_is_asked_for(tmp_path: Path) -> None:
    node = await start_node(tmp_path, http={"token": "s3cret"})
    try:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            reply = await fetch(base(node) + "/metrics", headers=headers)
            assert reply.status == 401, headers
            assert reply.headers["www-authenticate"] == "Bearer"
        good = {"authorization": "Bearer s3cret"}
        for path in ("/metrics", "/healthz", "/readyz"):
            assert (await fetch(base(node) + path, headers=good)).status == 200
    finally:
        await node.stop()


@pytest.mark.parametrize(("http", "key"), [
    ({"metrics": "ftp://x:1"}, "http.metrics"), ({"metrics": "http://x"}, "http.metrics"),
    ({"public": "yes"}, "http.public"), ({"colour": 1}, "http.colour"),
])
def test_bad_http_keys(tmp_path: Path, http: dict[str, Any], key: str) -> None:
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        parse_node_config({"http": http}, tmp_path)


async def test_a_request_that_never_ends_is_cut(node: Node,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nkservice.transport.http.IDLE_TIMEOUT", 0.2)
    host, port = base(node).removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed, with no answer
    finally:
        writer.close()
