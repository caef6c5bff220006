"""One scrape sees the whole node: a real `nkservice serve` of 2 workers, traffic on both,
and the counts of one /metrics page add up to all of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_workers import (
    STARTED,
    Supervised,
    close_all,
    one_on_each,
    serve,
    write_config,
)
from tests.web.client import fetch
from tests.web.test_metrics import parse, value

PINGS = {0: 3, 1: 5}  # per worker


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Supervised]:
    port = free_port()
    config = write_config(tmp_path, f"tcp://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/",
                          workers=2)
    running = Supervised(await serve(config), port)
    try:
        await running.wait_for_log(STARTED)
        yield running
    finally:
        await running.close()


async def test_one_scrape_adds_up_both_workers(node: Supervised) -> None:
    peers = list((await one_on_each(node.port)).values())  # each pinged once to find it
    for number, peer in enumerate(peers):
        for _ in range(PINGS[number]):
            assert (await peer.request("core", "ping"))["result"] == "ok"
    # Whichever worker takes the scrape asks the other for its numbers.
    for _ in range(4):
        reply = await fetch(f"http://127.0.0.1:{node.port}/metrics")
        assert reply.status == 200
        samples = parse(reply.text)
        assert value(samples, "nkservice_sessions", service="core") == 2
        pings = value(samples, "nkservice_requests_total",
                      **{"class": "core", "cmd": "ping", "result": "ok"})
        # The ones sent here, the finding pings, and the closed finders' (each on a worker).
        assert pings >= sum(PINGS.values()) + 2
        logins = value(samples, "nkservice_requests_total",
                       **{"class": "core", "cmd": "login", "result": "ok"})
        assert pings - sum(PINGS.values()) == logins  # every connection pinged once
    await close_all(*peers)
