"""/metrics: what is counted, read back through the Prometheus text parser after known
traffic over real sockets; the numbers themselves (labels capped, merged over processes)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from time import perf_counter
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nkservice.metrics import (
    MAX_LABEL_SETS,
    OTHER,
    Metrics,
    Uncounted,
    disconnect_reason,
    merge,
    render,
)
from nkservice.node import Node
from nkservice.protocol.messages import Request
from nkservice.service.config import parse_node_config
from tests.web.client import fetch
from tests.web.test_pages import base
from tests.wire import Peer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, by name and labels."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(node: Node) -> Samples:
    reply = await fetch(base(node) + "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(reply.text)


# -- the numbers ----------------------------------------------------------------------------

def answered(metrics: Metrics, class_: str, cmd: str, result: str = "ok",
             received: float | None = None) -> bool:
    """A request through `metrics` as `Session` does it: stamped when `time_next` says so
    (`received`: when it arrived, else now); whether it was."""
    request = Request(class_, cmd, 1)
    timed = metrics.time_next
    if timed:
        metrics.stamp(request)
        if received is not None:
            request.received = received
    if result == "ok":
        metrics.ok(request)
    else:
        metrics.failed(request, result)
    return timed


async def test_requests_and_their_times() -> None:
    metrics = Metrics(sample_every=3600)  # the first request is timed, and no other here
    assert answered(metrics, "core", "ping", received=perf_counter() - 60)
    for _ in range(17):
        assert not answered(metrics, "core", "ping")
    answered(metrics, "chat", "post", "unauthorized")
    answered(metrics, "chat", "post", "unauthorized")
    samples = parse(render(metrics.snapshot()).decode())
    assert value(samples, "nkservice_requests_total", **{"class": "core", "cmd": "ping",
                                                         "result": "ok"}) == 18
    assert value(samples, "nkservice_requests_total", **{
        "class": "chat", "cmd": "post", "result": "unauthorized"}) == 2
    # The one timed: a minute old, over the last bucket.
    assert value(samples, "nkservice_request_duration_seconds_count") == 1
    assert value(samples, "nkservice_request_duration_seconds_bucket", le="10.0") == 0
    assert value(samples, "nkservice_request_duration_seconds_bucket", le="+Inf") == 1
    assert value(samples, "nkservice_request_duration_seconds_sum") >= 60


async def test_the_first_request_after_each_interval_is_timed() -> None:
    metrics = Metrics(sample_every=0.02)
    assert [answered(metrics, "core", "ping") for _ in range(3)] == [True, False, False]
    # The loop timer `stamp` started fires before this sleep (same delay, started later).
    await asyncio.sleep(0.02)
    assert metrics.time_next
    assert [answered(metrics, "core", "ping", "unauthorized") for _ in range(2)] == [True,
                                                                                    False]
    samples = parse(render(metrics.snapshot()).decode())
    assert value(samples, "nkservice_request_duration_seconds_count") == 2
    assert value(samples, "nkservice_request_duration_seconds_bucket", le="0.01") == 2


def test_uncounted_times_nothing() -> None:
    metrics = Uncounted()
    for _ in range(50):
        assert not answered(metrics, "core", "ping")
    snapshot = metrics.snapshot()
    assert snapshot["nkservice_requests"] == []
    assert snapshot["nkservice_request_duration_seconds"] == [[[0] * 17 + [0.0]]]


async def test_label_sets_are_capped() -> None:
    metrics = Metrics()
    for number in range(MAX_LABEL_SETS + 50):
        answered(metrics, "x", f"made-up-{number}", "unknown_command")
    for number in range(10):
        answered(metrics, "y", f"also-made-up-{number}")
    rows = metrics.snapshot()["nkservice_requests"]
    assert len(rows) == MAX_LABEL_SETS + 1
    assert [OTHER, OTHER, OTHER, 60] in rows
    for number in range(MAX_LABEL_SETS + 5):
        metrics.observe("nkservice_callback_duration_seconds", (f"kind{number}",), 0.001)
    assert len(metrics.snapshot()["nkservice_callback_duration_seconds"]) == MAX_LABEL_SETS + 1


async def test_snapshots_add_up() -> None:
    first, second = Metrics(lambda: [("nkservice_sessions", ("demo",), 2)]), Metrics()
    answered(first, "core", "ping")
    answered(second, "core", "ping")
    second.published("demo")
    second.delivered("demo", 7)
    second.observe("nkservice_callback_duration_seconds", ("login",), 0.002)
    total = parse(render(merge([first.snapshot(), second.snapshot(),
                                {"nkservice_from_a_newer_version": [[1]]}])).decode())
    assert value(total, "nkservice_requests_total",
                 **{"class": "core", "cmd": "ping", "result": "ok"}) == 2
    assert value(total, "nkservice_request_duration_seconds_count") == 2
    assert value(total, "nkservice_sessions", service="demo") == 2
    assert value(total, "nkservice_events_delivered_total", service="demo") == 7
    assert value(total, "nkservice_callback_duration_seconds_count", callback="login") == 1


@pytest.mark.parametrize(("end_reason", "label"), [
    (None, "client"), ("slow consumer", "slow_consumer"),
    ("request timeout", "request_timeout"), ("stopped by admin", "stopped_by_admin"),
    ("something new", "other")])
def test_disconnect_reasons(end_reason: str | None, label: str) -> None:
    assert disconnect_reason(end_reason) == label


# -- over real sockets ----------------------------------------------------------------------

LOGIN_SCRIPT = """
function login(req)
  if req.user == "lua" then return {authorized = true} end
  return nil
end
"""


@pytest.fixture
async def node(tmp_path: Path) -> Any:
    config = parse_node_config({
        "node": {"data_dir": str(tmp_path / "data")},
        "admin": {"user": "admin", "password": "secret"},
        "core": {"listen": ["ws://127.0.0.1:0/", "tcp://127.0.0.1:0"], "ping_interval": 0},
        "services": {"demo": {"listen": ["ws://127.0.0.1:0/", "tcp://127.0.0.1:0"],
                              "users": {"alice": "pw", "bob": "pw"},
                              "admin": {"user": "app", "password": "pw"},
                              "ping_interval": 0, "request_timeout": 0.5,
                              "login_failure_delay": 0, "script_code": LOGIN_SCRIPT}},
    }, tmp_path)
    running = Node(config)
    await running.start()
    yield running
    await running.stop()


async def client(node: Node, transport: str, user: str = "alice") -> Peer:
    url = next(u for u in node.urls("demo") if u.startswith(f"{transport}://"))
    peer = await Peer(url).connect(None)
    await peer.login(user, "pw")
    return peer


async def test_requests_sessions_and_connections(node: Node,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = await client(node, "tcp"), await client(node, "ws", "bob")
    for _ in range(5):
        assert (await alice.request("core", "ping"))["result"] == "ok"
    assert (await bob.request("core", "no_such_command"))["result"] == "error"
    samples = await scrape(node)
    ping = {"class": "core", "cmd": "ping", "result": "ok"}
    assert value(samples, "nkservice_requests_total", **ping) == 5
    assert value(samples, "nkservice_requests_total", **{
        "class": "core", "cmd": "login", "result": "ok"}) == 2
    assert value(samples, "nkservice_requests_total", **{
        "class": "core", "cmd": "no_such_command", "result": "unknown_command"}) == 1
    # Timed: the first request (alice's login), then the first after each 10 ms: how many
    # depends on how fast this machine is.
    assert 1 <= value(samples, "nkservice_request_duration_seconds_count") <= 8
    assert value(samples, "nkservice_sessions", service="demo") == 2
    assert value(samples, "nkservice_connections", service="demo", transport="tcp") == 1
    assert value(samples, "nkservice_connections", service="demo", transport="ws") == 1
    assert value(samples, "nkservice_connections_accepted_total", service="demo",
                 transport="ws") == 1
    demo = node.services["demo"]
    all_closed, closed = asyncio.Event(), demo.closed

    def closed_and_told(caller: Any) -> None:
        closed(caller)
        if not demo.connections:
            all_closed.set()

    monkeypatch.setattr(demo, "closed", closed_and_told)
    await alice.close()
    await bob.close()
    async with asyncio.timeout(5):
        await all_closed.wait()
    samples = await scrape(node)
    assert value(samples, "nkservice_sessions", service="demo") == 0
    assert value(samples, "nkservice_disconnects_total", reason="client") == 2


async def test_events_published_and_delivered(node: Node) -> None:
    alice, bob = await client(node, "tcp"), await client(node, "ws", "bob")
    for peer in (alice, bob):
        assert (await peer.request("core", "subscribe", {"class": "chat"}))["result"] == "ok"
    app = await client(node, "tcp", "app")
    before = await scrape(node)
    sent = await app.request("core", "send_event", {"class": "chat", "type": "said"})
    assert sent["result"] == "ok"
    for peer in (alice, bob):
        event = await peer.recv()
        assert event["cmd"] == "event"
        await peer.send({"result": "ok", "tid": event["tid"]})
    after = await scrape(node)
    for name, grew in [("nkservice_events_published_total", 1),
                       ("nkservice_events_delivered_total", 2)]:
        assert value(after, name, service="demo") - value(before, name, service="demo") == grew
    for peer in (alice, bob, app):
        await peer.close()


async def test_a_missed_deadline_is_counted(node: Node) -> None:
    app = await client(node, "tcp", "app")  # the service admin: an app for callbacks
    assert (await app.request("core", "register_callback",
                              {"callback": "cmd", "class": "shop"}))["result"] == "ok"
    alice = await client(node, "ws")
    asked = asyncio.ensure_future(alice.request("shop", "buy"))
    callback = await app.recv()  # never answered: after request_timeout, the app is closed
    assert callback["data"]["request"]["cmd"] == "buy"
    assert (await asked)["result"] == "error"  # no other app: service_unavailable
    samples = await scrape(node)
    assert value(samples, "nkservice_disconnects_total", reason="request_timeout") == 1
    assert value(samples, "nkservice_callback_duration_seconds_count", callback="cmd") == 1
    assert value(samples, "nkservice_callback_duration_seconds_sum", callback="cmd") >= 0.5
    await alice.close()
    await app.close()


async def test_a_failover_is_counted(node: Node) -> None:
    silent, helpful = await client(node, "tcp", "app"), await client(node, "ws", "app")
    for app in (silent, helpful):
        assert (await app.request("core", "register_callback",
                                  {"callback": "cmd", "class": "shop"}))["result"] == "ok"
    alice, bob = await client(node, "tcp"), await client(node, "tcp", "bob")
    answers = [asyncio.ensure_future(alice.request("shop", "buy"))]
    await silent.recv()  # the first goes to the app registered first
    answers.append(asyncio.ensure_future(bob.request("shop", "buy")))

    async def answer_all(app: Peer) -> None:
        while True:
            request = await app.recv(timeout=10)
            await app.send({"result": "ok", "tid": request["tid"], "data": {"done": 1}})

    helping = asyncio.ensure_future(answer_all(helpful))
    results = await asyncio.gather(*answers)
    helping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await helping
    assert [result["result"] for result in results] == ["ok", "ok"]
    samples = await scrape(node)
    assert value(samples, "nkservice_callback_failovers_total", callback="cmd") == 1
    assert value(samples, "nkservice_callback_duration_seconds_count", callback="cmd") == 2
    for peer in (alice, bob, silent, helpful):
        await peer.close()


async def test_lua_time(node: Node) -> None:
    peer = await client(node, "tcp", "lua")  # logged in by the script
    samples = await scrape(node)
    assert value(samples, "nkservice_lua_seconds_total", service="demo") > 0
    await peer.close()
