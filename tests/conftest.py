"""Fixtures: TLS certificates, an in-process node on ephemeral ports, raw peers."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from nkservice.cluster.server import EmbeddedNats
from nkservice.node import Node
from nkservice.service.config import parse_node_config
from tests.wire import Peer

TRANSPORTS = ["tcp", "tls", "ws", "wss"]


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


EPHEMERAL = _ephemeral_ports()


_GIVEN: set[int] = set()  # by `free_port`: two calls in a row must not get the same port


def free_port() -> int:
    """A port nobody listens on, for a server process to bind, below the ephemeral range:
    the tests' own outgoing connections (and `bind(0)`) take ports from that range, and
    one of them could take a port chosen there before the server binds it. Never the same
    one twice in a run (a test asks for several before it binds any)."""
    while True:
        port = random.randrange(10000 if EPHEMERAL.start > 11000 else 1024, EPHEMERAL.start)
        if port in _GIVEN:
            continue
        _GIVEN.add(port)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
ALL_URLS = ["tcp://127.0.0.1:0", "ws://127.0.0.1:0/", "tls://127.0.0.1:0", "wss://127.0.0.1:0/"]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem = directory / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    return {"certfile": str(pem), "cafile": str(ca_pem)}


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def service(cert_files: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """A service on all four transports with quick test timeouts; pings off by default."""
    return {
        "listen": ALL_URLS,
        "tls": {"certfile": cert_files["certfile"]},
        "admin": {"user": "demo-admin", "password": "pw"},
        "users": {"alice": "pw1", "bob": "pw2", "carol": "pw3"},
        "ping_interval": 0,
        "request_timeout": 1.0,
        "login_failure_delay": 0.01,
        **overrides,
    }


NodeFactory = Callable[..., Awaitable[Node]]

# The suites that run three times: on one process; on two nodes joined over a NATS server,
# each on ports of its own; on a node of two workers sharing its ports (SO_REUSEPORT). The
# clients of each test take turns between the two processes (PROTOCOL.md: a cluster
# behaves as one process).
CLUSTER_SUITES = {"tests.e2e.test_protocol_e2e", "tests.e2e.test_events_e2e",
                  "tests.e2e.test_sessions_e2e", "tests.e2e.test_callbacks_e2e"}
# Each node's processes, for `url_of` to take turns (one process: itself).
PROCESSES: dict[Node, list[Node]] = {}
_TURNS: dict[Node, int] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "make_node" in metafunc.fixturenames and metafunc.module.__name__ in CLUSTER_SUITES:
        metafunc.parametrize("topology", ["one", "cluster", "workers"], indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that relies on what only one process promises (its insides, one turn counter
    for the apps, a registration gone at once everywhere) runs on one only."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (item.get_closest_marker("one_process") and callspec is not None
                and callspec.params.get("topology", "one") != "one"):
            item.add_marker(pytest.mark.skip(reason="relies on one process"))


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    value: str = getattr(request, "param", "one")
    return value


@pytest.fixture
async def make_node(cert_files: dict[str, str], tmp_path: Path,
                    topology: str) -> AsyncIterator[NodeFactory]:
    """Start a node whose services are given as {name: overrides of `service()`}; in the
    `cluster` and `workers` topologies, two processes joined over a NATS server of the
    test's own (the node returned is the first; `connect` takes turns between them)."""
    nodes: list[Node] = []
    nats: EmbeddedNats | None = None

    async def start(**services: dict[str, Any]) -> Node:
        nonlocal nats
        cluster = ""
        if topology != "one":
            if nats is None:
                nats = EmbeddedNats(tmp_path / "nats")
                await nats.start()
            cluster = nats.url
        # Workers share numbered ports; other nodes take any free ones.
        listen = {name: _numbered_urls() if topology == "workers" else ALL_URLS
                  for name in ("core", *services)}
        processes = []
        for number in range(2 if cluster else 1):
            config = parse_node_config({
                "node": {"data_dir": str(tmp_path / f"data{number}"), "cluster": cluster},
                "admin": {"user": "admin", "password": "secret"},
                "core": {"listen": listen["core"], "ping_interval": 0,
                         "tls": {"certfile": cert_files["certfile"]}},
                "services": {name: service(cert_files, listen=listen[name], **over)
                             for name, over in services.items()},
            }, tmp_path)
            node = Node(config, worker=topology == "workers")
            await node.start()
            nodes.append(node)
            processes.append(node)
        if cluster:
            await _joined(processes)
        PROCESSES[processes[0]] = processes
        return processes[0]

    yield start
    for node in nodes:
        await node.stop()
        PROCESSES.pop(node, None)
        _TURNS.pop(node, None)
    if nats is not None:
        await nats.stop()


def _numbered_urls() -> list[str]:
    plain, secure = free_port(), free_port()
    return [f"tcp://127.0.0.1:{plain}", f"ws://127.0.0.1:{plain}/",
            f"tls://127.0.0.1:{secure}", f"wss://127.0.0.1:{secure}/"]


async def _joined(processes: list[Node]) -> None:
    """Until each process knows the others (their first heartbeats)."""
    async with asyncio.timeout(10):
        for node in processes:
            assert node.cluster is not None
            await node.cluster.rpc.until_members(len(processes) - 1)


def url_of(node: Node, service_name: str, transport: str) -> str:
    """The URL of a service: on a cluster, of each of its processes in turn."""
    return next(u for u in next_process(node).urls(service_name)
                if u.startswith(f"{transport}://"))


def next_process(node: Node) -> Node:
    """The process whose turn it is to take a client (one process: itself)."""
    processes = PROCESSES.get(node, [node])
    turn = _TURNS.get(node, 0)
    _TURNS[node] = turn + 1
    return processes[turn % len(processes)]


async def open_on(target: Node, service_name: str, transport: str,
                  context: ssl.SSLContext) -> Peer:
    """A peer of `target`. Workers share their ports and the kernel picks one for each
    connection: connect until `target` has it (it answers a ping, so it is its by then)."""
    url = next(u for u in target.urls(service_name) if u.startswith(f"{transport}://"))
    if not target.worker:
        return await Peer(url).connect(context)
    for _ in range(64):
        before = set(target.services[service_name].connections)
        peer = await Peer(url).connect(context)
        assert (await peer.request("core", "ping"))["result"] == "ok"
        if set(target.services[service_name].connections) - before:
            return peer
        await peer.close()
    raise AssertionError(f"64 connections, none to {target.cluster_state()}")


PeerFactory = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def connect(client_tls: ssl.SSLContext) -> AsyncIterator[PeerFactory]:
    """Open raw peers; all are closed at the end of the test."""
    peers: list[Peer] = []

    async def open_peer(node: Node, service_name: str, transport: str) -> Peer:
        peer = await open_on(next_process(node), service_name, transport, client_tls)
        peers.append(peer)
        return peer

    yield open_peer
    for peer in peers:
        await peer.close()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The server runs on uvloop in production; run the tests on it too."""
    return {"uvloop": uvloop.new_event_loop}
