"""Fixtures: a real NATS server per test (it starts in about 15 ms) and clients of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client

from nkservice.cluster.server import EmbeddedNats

log = logging.getLogger(__name__)


class Nats(Client):
    """A test's client: reconnects at once and keeps trying; says when it lost its server
    and when it reconnected."""

    disconnected: asyncio.Event
    reconnected: asyncio.Event


NatsFactory = Callable[[], Awaitable[Nats]]


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def connect_nats(nats_server: EmbeddedNats) -> AsyncIterator[NatsFactory]:
    """Open clients of the test's server; all are closed at the end of the test."""
    clients: list[Nats] = []

    async def connect() -> Nats:
        client = Nats()
        client.disconnected, client.reconnected = asyncio.Event(), asyncio.Event()

        async def disconnected() -> None:
            client.disconnected.set()

        async def reconnected() -> None:
            client.reconnected.set()

        async def quiet(error: Exception) -> None:  # a restart is expected; say it quietly
            log.debug("nats client: %r", error)

        await client.connect(
            nats_server.url,
            reconnect_time_wait=0.05,  # type: ignore[arg-type]  # typed int, slept as a float
            max_reconnect_attempts=-1, connect_timeout=2,
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=quiet,
        )
        clients.append(client)
        return client

    yield connect
    for client in clients:
        if not client.is_connected:
            # nats-py writes what it buffered while reconnecting to the old, closed transport
            # when closed; uvloop raises there, and the close stops half-way.
            client._pending, client._pending_data_size = [], 0
        await client.close()


@pytest.fixture
async def nc(connect_nats: NatsFactory) -> Nats:
    return await connect_nats()

