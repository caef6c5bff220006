"""Services created, updated and stopped at run time (issue 8; PROTOCOL.md §1.3, §5.4, §6,
§11), on a real `nkservice serve` process: the global admin drives it with raw JSON over
the core service, users log in with raw JSON over real sockets, restarts are a SIGTERM and
a new process on the same config file and data_dir."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import free_port
from tests.wire import Peer

ADMIN = {"user": "root", "password": "toor"}
BOUND = 20.0  # seconds: the most anything awaited from the node may take
STOPPED = "Connection closed: the service was stopped"


def listening_socket(port: int, *, reuse_address: bool) -> socket.socket:
    """A socket of our own listening on the port: it binds only if no one else listens
    there (with `reuse_address`, as servers bind: connections left in TIME_WAIT by a closed
    listener do not count)."""
    sock = socket.socket()
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


async def refuses(port: int) -> None:
    """Nothing listens on the port: a connection attempt is refused."""
    async with asyncio.timeout(BOUND):
        with pytest.raises(ConnectionRefusedError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()


class NodeProcess:
    """`nkservice serve --config FILE`, started and started again on one config file (and so
    one data_dir). Its stderr is read all the time it runs (a full pipe would block the
    node) into `log`, which holds the lines of the current run."""

    def __init__(self, config: Path, core_port: int) -> None:
        self.config = config
        self.core_url = f"tcp://127.0.0.1:{core_port}"
        self.log: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        self.log = []
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nkservice", "serve", "--config", str(self.config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read_log(self.process))
        await self.wait_for_log("node started")

    async def _read_log(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            async with self._changed:
                self.log.append(line.decode())
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()  # the end: wait_for_log waits no more

    def lines_with(self, text: str) -> list[str]:
        return [line for line in self.log if text in line]

    async def wait_for_log(self, text: str) -> str:
        """The first line of this run holding `text`, waiting for it while the node runs."""
        assert self._reader is not None
        reader = self._reader
        async with asyncio.timeout(BOUND), self._changed:
            await self._changed.wait_for(lambda: bool(self.lines_with(text)) or reader.done())
        if not self.lines_with(text):
            raise AssertionError(f"the node ended without logging {text!r}:\n"
                                 + "".join(self.log))
        return self.lines_with(text)[0]

    async def stop(self) -> int:
        """SIGTERM; the exit status once the process and its log have ended."""
        assert self.process is not None and self._reader is not None
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(BOUND):
            status = await self.process.wait()
            await self._reader
        return status

    async def restart(self) -> None:
        assert await self.stop() == 0, "".join(self.log)
        await self.start()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """The `tls` table of a definition: a certificate file and its key in another file."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "svc-cert.pem", tmp_path / "svc-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return {"certfile": str(certfile), "keyfile": str(keyfile)}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


StartNode = Callable[..., Awaitable[NodeProcess]]


@pytest.fixture
async def start_node(tmp_path: Path, data_dir: Path) -> AsyncIterator[StartNode]:
    """Start a node whose config file has the global admin, the core service on a tcp port
    and `services` (TOML appended as it is)."""
    nodes: list[NodeProcess] = []

    async def start(services: str = "") -> NodeProcess:
        config, core_port = tmp_path / "node.toml", free_port()
        config.write_text(f"""
[node]
data_dir = "{data_dir}"

[admin]
user = "{ADMIN['user']}"
password = "{ADMIN['password']}"

[core]
listen = ["tcp://127.0.0.1:{core_port}"]
ping_interval = 0
{services}""")
        node = NodeProcess(config, core_port)
        nodes.append(node)
        await node.start()
        return node

    yield start
    for node in nodes:
        await node.kill()


Connect = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def connect(client_tls: ssl.SSLContext) -> AsyncIterator[Connect]:
    """Open raw peers (tls and wss trust the test CA); all are closed at the end."""
    peers: list[Peer] = []

    async def open_peer(url: str) -> Peer:
        peer = Peer(url)
        async with asyncio.timeout(BOUND):
            await peer.connect(client_tls)
        peers.append(peer)
        return peer

    yield open_peer
    for peer in peers:
        await peer.close()


async def admin(connect: Connect, node: NodeProcess) -> Peer:
    """The global admin, logged in to the core service."""
    peer = await connect(node.core_url)
    await peer.login(ADMIN["user"], ADMIN["password"])
    return peer


async def ok(peer: Peer, cmd: str, data: dict[str, Any] | None = None,
             subclass: str | None = None) -> Any:
    """A core command that must succeed; its answer's data (None when it has none)."""
    response = await peer.request("core", cmd, data, subclass=subclass)
    assert response["result"] == "ok", response
    return response.get("data")


async def fails(peer: Peer, cmd: str, data: dict[str, Any]) -> dict[str, Any]:
    """A core command that must fail; its error data."""
    response = await peer.request("core", cmd, data)
    assert response["result"] == "error", response
    error: dict[str, Any] = response["data"]
    return error


async def listed(peer: Peer) -> dict[str, dict[str, Any]]:
    """`list_services` by name."""
    return {entry["name"]: entry for entry in await ok(peer, "list_services")}


def assert_cannot_listen(error: dict[str, Any], port: int) -> None:
    """The answer to a definition with a port in use: `invalid_value` naming `listen`."""
    assert error["code"] == 100046, error
    assert error["error"].startswith(f"Invalid value: listen: cannot listen on 127.0.0.1:{port}:"
                                     ), error


def definition(*listen: str, **keys: Any) -> dict[str, Any]:
    """A service definition (§11) on `listen`, with a user, an admin and no pings."""
    return {"listen": list(listen), "users": {"alice": "pw1"},
            "admin": {"user": "boss", "password": "pw"}, "ping_interval": 0, **keys}


async def user(connect: Connect, url: str, name: str = "alice", password: str = "pw1") -> Peer:
    """A peer logged in to the service at `url`."""
    peer = await connect(url)
    assert (await peer.login(name, password))["user"] == name
    return peer


async def login_error(connect: Connect, url: str, name: str, password: str) -> int:
    peer = await connect(url)
    response = await peer.request("core", "login", {"user": name, "password": password})
    assert response["result"] == "error", response
    code: int = response["data"]["code"]
    return code


# -- create, and log in over each transport --------------------------------------------------

@pytest.mark.parametrize("transport", ["tcp", "ws", "tls", "wss"])
async def test_a_created_service_takes_logins_over_each_transport(
        start_node: StartNode, connect: Connect, tls_files: dict[str, str],
        transport: str) -> None:
    node = await start_node()
    root = await admin(connect, node)
    plain, secure = free_port(), free_port()
    urls = {"tcp": f"tcp://127.0.0.1:{plain}", "ws": f"ws://127.0.0.1:{plain}/api",
            "tls": f"tls://127.0.0.1:{secure}", "wss": f"wss://127.0.0.1:{secure}/api"}
    created = await ok(root, "create_service",
                       {"name": "shop", **definition(*urls.values(), tls=tls_files)})
    assert created == {"name": "shop"}
    assert (await listed(root))["shop"] == {
        "name": "shop", "listen": list(urls.values()), "sessions": 0, "origin": "api"}
    alice = await user(connect, urls[transport])
    assert (await ok(alice, "ping")) in (None, {})
    assert (await listed(root))["shop"]["sessions"] == 1
    boss = await user(connect, urls[transport], "boss", "pw")
    assert set(await ok(boss, "list_users")) == {"alice", "boss"}


# -- update: listeners added and removed live ------------------------------------------------

async def test_update_adds_and_removes_listeners_and_keeps_the_sessions(
        start_node: StartNode, connect: Connect, tls_files: dict[str, str]) -> None:
    node = await start_node()
    root = await admin(connect, node)
    kept, removed, added = free_port(), free_port(), free_port()
    await ok(root, "create_service", {"name": "shop", **definition(
        f"tcp://127.0.0.1:{kept}", f"ws://127.0.0.1:{kept}/", f"tcp://127.0.0.1:{removed}",
        tls=tls_files)})
    alice = await user(connect, f"tcp://127.0.0.1:{kept}")
    boss = await user(connect, f"ws://127.0.0.1:{kept}/", "boss", "pw")
    gone = await user(connect, f"tcp://127.0.0.1:{removed}", "boss", "pw")

    new_listen = [f"tcp://127.0.0.1:{kept}", f"ws://127.0.0.1:{kept}/",
                  f"tls://127.0.0.1:{added}", f"wss://127.0.0.1:{added}/"]
    assert await ok(root, "update_service", {"name": "shop", "listen": new_listen}) == {
        "name": "shop"}

    await refuses(removed)
    assert (await listed(root))["shop"]["listen"] == new_listen
    for url in new_listen[2:]:
        await user(connect, url)
    # The sessions on the kept socket are still logged in and answer.
    assert (await ok(alice, "ping")) in (None, {})
    assert set(await ok(boss, "list_users")) == {"alice", "boss"}
    # Closing a listening socket leaves the connections it accepted alone (listeners.py).
    assert (await ok(gone, "ping")) in (None, {})


async def test_an_update_that_cannot_bind_changes_nothing(
        start_node: StartNode, connect: Connect) -> None:
    node = await start_node()
    root = await admin(connect, node)
    kept, removed, added, taken = free_port(), free_port(), free_port(), free_port()
    listen = [f"tcp://127.0.0.1:{kept}", f"tcp://127.0.0.1:{removed}"]
    await ok(root, "create_service", {"name": "shop", **definition(*listen)})
    alice = await user(connect, listen[0])
    with listening_socket(taken, reuse_address=False):
        error = await fails(root, "update_service", {"name": "shop", "listen": [
            listen[0], f"tcp://127.0.0.1:{added}", f"tcp://127.0.0.1:{taken}"],
            "users": {"alice": "new"}})
    assert_cannot_listen(error, taken)
    await refuses(added)  # bound before the failure, let go of
    assert (await listed(root))["shop"]["listen"] == listen
    for url in listen:
        await user(connect, url, "alice", "pw1")  # the old users, on both old ports
    assert (await ok(alice, "ping")) in (None, {})


# -- stop ------------------------------------------------------------------------------------

async def test_stop_tells_the_tcp_sessions_why_and_closes_them(
        start_node: StartNode, connect: Connect) -> None:
    node = await start_node()
    root = await admin(connect, node)
    port = free_port()
    await ok(root, "create_service", {"name": "shop", **definition(f"tcp://127.0.0.1:{port}")})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'{"class":"core","cmd":"login","tid":1,'
                 b'"data":{"user":"alice","password":"pw1"}}\n')
    async with asyncio.timeout(BOUND):
        assert json.loads(await reader.readline())["result"] == "ok"
    assert await ok(root, "stop_service", {"name": "shop"}) in (None, {})
    async with asyncio.timeout(BOUND):
        last, end = await reader.readline(), await reader.read()
    writer.close()
    assert json.loads(last) == {"result": "error", "tid": None,
                                "data": {"code": 100081, "error": STOPPED}}
    assert end == b""


async def test_stop_sends_websocket_sessions_a_close_frame_with_a_reason(
        start_node: StartNode, connect: Connect) -> None:
    node = await start_node()
    root = await admin(connect, node)
    port = free_port()
    await ok(root, "create_service", {"name": "shop", **definition(f"ws://127.0.0.1:{port}/")})
    async with asyncio.timeout(BOUND), ws_connect(f"ws://127.0.0.1:{port}/",
                                                  ping_interval=None) as ws:
        await ws.send('{"class":"core","cmd":"login","tid":1,'
                      '"data":{"user":"alice","password":"pw1"}}')
        assert json.loads(await ws.recv())["result"] == "ok"
        assert await ok(root, "stop_service", {"name": "shop"}) in (None, {})
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None, "no close frame from the server"
    assert closed.value.rcvd.code == 1001
    assert closed.value.rcvd.reason == STOPPED.removeprefix("Connection closed: ")


async def test_stop_frees_the_port_and_the_name(
        start_node: StartNode, connect: Connect, data_dir: Path) -> None:
    node = await start_node()
    root = await admin(connect, node)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    await ok(root, "create_service", {"name": "shop", **definition(url)})
    assert (data_dir / "services" / "shop.json").is_file()
    alice = await user(connect, url)
    await ok(root, "stop_service", {"name": "shop"})
    await alice.wait_closed()

    assert "shop" not in await listed(root)
    assert (await fails(root, "get_service", {"name": "shop"}))["code"] == 100020
    assert not (data_dir / "services" / "shop.json").exists()
    with listening_socket(port, reuse_address=True):  # nobody listens there any more
        pass
    await ok(root, "create_service", {"name": "shop", **definition(url, users={"bob": "b"})})
    await user(connect, url, "bob", "b")


# -- persistence -----------------------------------------------------------------------------

async def test_created_and_updated_services_come_back_after_a_restart(
        start_node: StartNode, connect: Connect) -> None:
    node = await start_node()
    root = await admin(connect, node)
    one, two, three = free_port(), free_port(), free_port()
    await ok(root, "create_service", {"name": "alpha", **definition(f"tcp://127.0.0.1:{one}")})
    await ok(root, "create_service", {"name": "beta", **definition(f"tcp://127.0.0.1:{two}")})
    await ok(root, "update_service", {"name": "beta", "listen": [f"ws://127.0.0.1:{three}/"],
                                      "users": {"bob": "new-pw"}})

    await node.restart()
    root = await admin(connect, node)
    services = await listed(root)
    assert services["alpha"] == {"name": "alpha", "listen": [f"tcp://127.0.0.1:{one}"],
                                 "sessions": 0, "origin": "api"}
    assert services["beta"] == {"name": "beta", "listen": [f"ws://127.0.0.1:{three}/"],
                                "sessions": 0, "origin": "api"}
    await user(connect, f"tcp://127.0.0.1:{one}")
    await user(connect, f"ws://127.0.0.1:{three}/", "bob", "new-pw")
    assert await login_error(connect, f"ws://127.0.0.1:{three}/", "alice", "pw1") == 100030
    await refuses(two)
    beta = await ok(root, "get_service", {"name": "beta"})
    assert beta["users"] == ["bob"] and beta["origin"] == "api"
    assert beta["admin"] == {"user": "boss"} and "new-pw" not in json.dumps(beta)


async def test_a_corrupt_and_a_half_written_file_neither_crash_the_node_nor_lose_a_service(
        start_node: StartNode, connect: Connect, data_dir: Path) -> None:
    node = await start_node()
    root = await admin(connect, node)
    port = free_port()
    await ok(root, "create_service", {"name": "good", **definition(f"tcp://127.0.0.1:{port}")})
    assert await node.stop() == 0
    stored = data_dir / "services"
    garbage = b'{"name": "bad", "listen": ["tcp://127.0.0.1:1"\x00\xff not json'
    (stored / "bad.json").write_bytes(garbage)
    # A save of `good` cut short by a crash: the temporary file, half-written, never renamed.
    (stored / "good.json.0badf00d.tmp").write_bytes(b'{"name": "good", "users": {"alice": "ne')

    await node.start()
    line = node.lines_with("set aside")
    assert len(line) == 1 and "WARNING" in line[0] and "bad.json" in line[0], node.log
    files = sorted(path.name for path in stored.iterdir())
    assert len(files) == 2 and files[1] == "good.json", files
    assert files[0].startswith("bad.json.corrupt-") and files[0] in line[0]
    assert (stored / files[0]).read_bytes() == garbage  # set aside, not lost
    root = await admin(connect, node)
    assert (await listed(root))["good"]["origin"] == "api"
    await user(connect, f"tcp://127.0.0.1:{port}", "alice", "pw1")  # the old definition


async def test_a_stored_service_that_cannot_listen_is_skipped_and_kept(
        start_node: StartNode, connect: Connect, data_dir: Path) -> None:
    node = await start_node()
    root = await admin(connect, node)
    blocked, fine = free_port(), free_port()
    await ok(root, "create_service", {"name": "first", **definition(f"tcp://127.0.0.1:{blocked}")})
    await ok(root, "create_service", {"name": "second", **definition(f"tcp://127.0.0.1:{fine}")})
    assert await node.stop() == 0

    with listening_socket(blocked, reuse_address=False):
        await node.start()
        root = await admin(connect, node)
        services = await listed(root)
    assert "first" not in services and services["second"]["origin"] == "api"
    line = node.lines_with("the service first,")
    assert len(line) == 1 and "ERROR" in line[0] and f"127.0.0.1:{blocked}" in line[0], node.log
    await user(connect, f"tcp://127.0.0.1:{fine}")
    assert (data_dir / "services" / "first.json").is_file()  # not lost: the next start may do


# -- lifecycle events ------------------------------------------------------------------------

async def next_event(peer: Peer) -> dict[str, Any]:
    """The next message must be an event: answer it (§1.3), return its data."""
    message = await peer.recv(BOUND)
    assert message["class"] == "core" and message["cmd"] == "event", message
    await peer.send({"result": "ok", "tid": message["tid"]})
    data: dict[str, Any] = message["data"]
    return data


async def test_an_admin_subscribed_to_core_service_sees_start_update_and_stop(
        start_node: StartNode, connect: Connect) -> None:
    node = await start_node()
    watcher, root = await admin(connect, node), await admin(connect, node)
    await ok(watcher, "subscribe", {"class": "core", "subclass": "service"})
    one, two = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"

    def event(kind: str, listen: list[str]) -> dict[str, Any]:
        return {"class": "core", "subclass": "service", "type": kind, "obj_id": "shop",
                "body": {"listen": listen, "origin": "api"}}

    # The subclass form of the commands (§9).
    await ok(root, "create", {"name": "shop", **definition(one)}, subclass="service")
    assert await next_event(watcher) == event("start", [one])
    await ok(root, "update", {"name": "shop", "listen": [two]}, subclass="service")
    assert await next_event(watcher) == event("update", [two])
    await ok(root, "stop", {"name": "shop"}, subclass="service")
    assert await next_event(watcher) == event("stop", [two])


# -- bad input ------------------------------------------------------------------------------

async def test_a_create_that_cannot_bind_names_listen_and_leaves_nothing(
        start_node: StartNode, connect: Connect, data_dir: Path) -> None:
    node = await start_node()
    root = await admin(connect, node)
    free, taken = free_port(), free_port()
    with listening_socket(taken, reuse_address=False):
        error = await fails(root, "create_service", {"name": "shop", **definition(
            f"tcp://127.0.0.1:{free}", f"tcp://127.0.0.1:{taken}")})
    assert_cannot_listen(error, taken)
    await refuses(free)  # bound before the failure, let go of
    assert "shop" not in await listed(root)
    assert (await fails(root, "get_service", {"name": "shop"}))["code"] == 100020
    assert not (data_dir / "services" / "shop.json").exists()
    await ok(root, "create_service", {"name": "shop", **definition(f"tcp://127.0.0.1:{free}")})
    await user(connect, f"tcp://127.0.0.1:{free}")


# -- services of the config file -------------------------------------------------------------

def config_service(port: int) -> str:
    return f"""
[services.fixed]
listen = ["tcp://127.0.0.1:{port}"]
users = {{ alice = "pw1" }}
ping_interval = 0
"""


async def test_an_update_of_a_config_service_lasts_until_the_restart(
        start_node: StartNode, connect: Connect, data_dir: Path) -> None:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    node = await start_node(config_service(port))
    root = await admin(connect, node)
    answer = await ok(root, "update_service", {"name": "fixed", "users": {"alice": "changed"}})
    assert answer["name"] == "fixed" and answer["origin"] == "config", answer
    assert "until the node restarts" in answer["note"]
    await user(connect, url, "alice", "changed")

    await node.restart()
    await user(connect, url, "alice", "pw1")
    assert await login_error(connect, url, "alice", "changed") == 100038
    root = await admin(connect, node)
    assert (await listed(root))["fixed"]["origin"] == "config"
    assert not (data_dir / "services" / "fixed.json").exists()


async def test_a_stop_of_a_config_service_lasts_until_the_restart(
        start_node: StartNode, connect: Connect) -> None:
    port = free_port()
    node = await start_node(config_service(port))
    root = await admin(connect, node)
    alice = await user(connect, f"tcp://127.0.0.1:{port}")
    answer = await ok(root, "stop_service", {"name": "fixed"})
    assert answer["origin"] == "config" and "until the node restarts" in answer["note"], answer
    assert await alice.read_until_closed(BOUND) == (
        [{"result": "error", "tid": None, "data": {"code": 100081, "error": STOPPED}}], None)
    await refuses(port)
    assert "fixed" not in await listed(root)

    await node.restart()
    await user(connect, f"tcp://127.0.0.1:{port}")
    root = await admin(connect, node)
    assert (await listed(root))["fixed"]["origin"] == "config"
