"""A node of 2 workers: the real `nkservice serve` supervisor, its worker processes and its
embedded NATS server, driven with raw JSON over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Collection
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the dev dependencies
import pytest

from nkservice.node import UNTIL_RESTART
from nkservice.workers import MAX_BACKOFF, backoff
from tests.conftest import free_port
from tests.wire import Peer

ADMIN = ("root", "toor")
STARTED = "node started: 2 workers"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
TRIES = 40  # connections, at most, to find both workers (each lands on one at random)


class Supervised:
    """A running `nkservice serve` supervisor; its stderr (and its workers') read as it
    comes, so the pipe never fills."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.log: list[str] = []
        self._eof = False
        self._news = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log.append(line.decode())
            self._news.set()
        self._eof = True  # every process that held the pipe is gone
        self._news.set()

    async def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """The first log line matching `pattern`, once there."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.log:
                    if found := re.search(pattern, line):
                        return found
                if self._eof:
                    raise AssertionError(f"no {pattern!r} in the log:\n{''.join(self.log)}")
                self._news.clear()
                await self._news.wait()

    async def stop(self, signum: int, timeout: float = 20) -> int:
        """Send `signum`; the exit status, and the log read to its end (all holders of the
        stderr pipe, the workers too, gone)."""
        self.process.send_signal(signum)
        async with asyncio.timeout(timeout):
            status = await self.process.wait()
            await self._reader
        return status

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(20):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def write_config(tmp_path: Path, *listen: str, workers: int | None, more: str = "") -> Path:
    """A node's config file: the core service on `listen`; `more`: TOML appended."""
    config = tmp_path / "node.toml"
    node = f"\nworkers = {workers}" if workers is not None else ""
    urls = ", ".join(f'"{url}"' for url in listen)
    config.write_text(f"""
[node]
data_dir = "{tmp_path / 'data'}"{node}

[admin]
user = "{ADMIN[0]}"
password = "{ADMIN[1]}"

[core]
listen = [{urls}]
ping_interval = 0
{more}""")
    return config


async def serve(config: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nkservice", "serve", "--config", str(config), *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Supervised]:
    """2 workers from `[node] workers = 2`, sharing the core service's port."""
    port = free_port()
    config = write_config(tmp_path, f"tcp://127.0.0.1:{port}", workers=2)
    running = Supervised(await serve(config), port)
    try:
        await running.wait_for_log(STARTED)
        yield running
    finally:
        await running.close()


async def admin(port: int) -> tuple[Peer, str]:
    """A logged-in admin client, and the cluster process (worker) that serves it."""
    peer = await Peer(f"tcp://127.0.0.1:{port}").connect(None)
    await peer.login(*ADMIN)
    return peer, await process_of(peer)


async def process_of(peer: Peer) -> str:
    """What an admin's `core ping` says: the cluster process that answered it."""
    answer = await peer.request("core", "ping")
    assert answer["result"] == "ok", answer
    cluster = answer["data"]["cluster"]
    assert cluster["state"] == "connected", cluster
    process: str = cluster["process"]
    return process


def pid_of(process: str) -> int:
    """`<host>-<pid>-<hex>` → pid."""
    return int(process.rsplit("-", 2)[1])


async def one_on_each(port: int, *, besides: Collection[str] = (), count: int = 2
                      ) -> dict[str, Peer]:
    """Admin clients, one on each of `count` workers not in `besides`: connect until the
    pings have shown them all (SO_REUSEPORT spreads connections by a hash of the source
    port, so a few connections do); the others are closed."""
    found: dict[str, Peer] = {}
    for _ in range(TRIES):
        peer, process = await admin(port)
        if process in found or process in besides:
            await peer.close()
        else:
            found[process] = peer
            if len(found) == count:
                return found
    raise AssertionError(f"{TRIES} connections reached only {sorted(found)} (and {besides})")


async def next_event(peer: Peer) -> dict[str, object]:
    """The next message must be an event: answer it, return its data."""
    message = await peer.recv()
    assert message["class"] == "core" and message["cmd"] == "event", message
    await peer.send({"result": "ok", "tid": message["tid"]})
    data: dict[str, object] = message["data"]
    return data


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def port_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:port (connections left in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
        return True


async def close_all(*peers: Peer) -> None:
    for peer in peers:
        await peer.close()


async def test_two_workers_serve_one_port_and_share_events(node: Supervised) -> None:
    peers = await one_on_each(node.port)
    (first, subscriber), (second, publisher) = peers.items()
    assert first != second and pid_of(first) != pid_of(second)
    subscribed = await subscriber.request("core", "subscribe",
                                          {"class": "chat", "obj_id": "room1"})
    assert subscribed["result"] == "ok", subscribed
    event = {"class": "chat", "type": "message", "obj_id": "room1", "body": {"text": "hi"}}
    sent = await publisher.request("core", "send_event", event)
    assert sent["result"] == "ok", sent
    assert await next_event(subscriber) == event
    await close_all(*peers.values())


async def test_a_change_to_a_service_of_the_config_file_is_made_by_both_workers(
        tmp_path: Path) -> None:
    port, demo = free_port(), free_port()
    config = write_config(tmp_path, f"tcp://127.0.0.1:{port}", workers=2, more=f"""
[services.demo]
listen = ["tcp://127.0.0.1:{demo}"]
users = {{ alice = "pw" }}
""")
    node = Supervised(await serve(config), port)
    try:
        await node.wait_for_log(STARTED)
        peers = await one_on_each(port)
        (_, asked), (_, other) = peers.items()
        updated = await asked.request("core", "update_service",
                                      {"name": "demo", "users": {"carol": "pw"}})
        assert updated["result"] == "ok" and updated["data"]["note"] == UNTIL_RESTART, updated
        for peer in peers.values():  # answered once both had made it
            got = await peer.request("core", "get_service", {"name": "demo"})
            assert got["data"]["users"] == ["carol"], got
        stopped = await other.request("core", "stop_service", {"name": "demo"})
        assert stopped["result"] == "ok" and stopped["data"]["note"] == UNTIL_RESTART, stopped
        for peer in peers.values():
            listed = await peer.request("core", "list_services")
            assert [s["name"] for s in listed["data"]] == ["core"], listed
        await close_all(*peers.values())
    finally:
        await node.close()


async def test_a_killed_worker_is_started_again_and_the_other_keeps_serving(
        node: Supervised) -> None:
    peers = await one_on_each(node.port)
    (victim, dead_peer), (survivor, live_peer) = peers.items()
    os.kill(pid_of(victim), signal.SIGKILL)
    died = await node.wait_for_log(rf"worker (\d+) \(pid {pid_of(victim)}\) was killed by "
                                   "SIGKILL")
    assert await dead_peer.wait_closed() is None  # its connection went with it
    await dead_peer.close()
    assert await process_of(live_peer) == survivor  # the other is untouched
    await node.wait_for_log(rf"worker {died[1]} is back \(pid \d+\)")
    newcomer = await one_on_each(node.port, besides={victim, survivor}, count=1)
    (process, peer), = newcomer.items()
    assert gone(pid_of(victim))
    assert pid_of(process) != pid_of(victim)
    # A client of the dead worker connects again and logs in, wherever it lands.
    again, where = await admin(node.port)
    assert where in (process, survivor)
    assert await process_of(live_peer) == survivor
    await close_all(peer, again, live_peer)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_to_the_supervisor_stops_everything(node: Supervised,
                                                           signum: int) -> None:
    peers = await one_on_each(node.port)
    workers = [pid_of(process) for process in peers]
    nats = await node.wait_for_log(r"embedded NATS server \(pid (\d+)\) ready on "
                                   r"nats://127\.0\.0\.1:(\d+)")
    nats_pid, nats_port = int(nats[1]), int(nats[2])
    assert await node.stop(signum) == 0
    for peer in peers.values():
        assert await peer.wait_closed() is None  # closed by its worker as it stopped
        await peer.close()
    assert all(gone(pid) for pid in [*workers, nats_pid])
    assert port_free(node.port) and port_free(nats_port)
    assert "nkservice.workers: stopped" in node.log[-1]
    assert not any("Traceback" in line for line in node.log)


async def test_a_killed_supervisor_takes_its_workers_and_nats_with_it(
        node: Supervised) -> None:
    """No worker is left holding the port when the supervisor dies (PR_SET_PDEATHSIG)."""
    peers = await one_on_each(node.port)
    nats = await node.wait_for_log(r"embedded NATS server \(pid (\d+)\) ready")
    pids = [pid_of(process) for process in peers] + [int(nats[1])]
    assert await node.stop(signal.SIGKILL) == -signal.SIGKILL  # and the workers' pipe closed
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            processes.append(psutil.Process(pid))
    _, alive = await asyncio.to_thread(psutil.wait_procs, processes, timeout=10)
    assert not [process for process in alive if not gone(process.pid)]
    assert port_free(node.port)
    await close_all(*peers.values())


def test_backoff_doubles_up_to_10_s() -> None:
    assert [backoff(deaths) for deaths in range(1, 9)] == [0, 1, 2, 4, 8, 10, 10, 10]
    assert backoff(1000) == MAX_BACKOFF


@pytest.mark.parametrize("workers", ["config", "option"])
async def test_port_0_with_workers_is_refused_naming_the_key(tmp_path: Path,
                                                             workers: str) -> None:
    config = write_config(tmp_path, "tcp://127.0.0.1:0",
                          workers=2 if workers == "config" else None)
    process = await serve(config, *(["--workers", "2"] if workers == "option" else []))
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("nkservice serve: bad config: core.listen: "), lines
    assert "port 0" in lines[0]
    assert not (tmp_path / "data" / "nats").exists()  # refused before anything started


async def test_a_metrics_port_0_with_workers_is_refused_naming_the_key(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, f"tcp://127.0.0.1:{free_port()}", workers=2,
                          more='[http]\nmetrics = "http://127.0.0.1:0"\n')
    process = await serve(config)
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert stderr.decode().splitlines() == [
        "nkservice serve: bad config: http.metrics: http://127.0.0.1:0 with 2 workers: port "
        "0 would give each worker a port of its own (and a scrape one worker's share); give "
        "a fixed port"]


async def test_a_worker_that_cannot_start_fails_the_start_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, f"tcp://127.0.0.1:{port}", workers=2)
    with socket.socket() as taken:  # another program holds the port (no SO_REUSEPORT)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        process = await serve(config)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 1
    lines = stderr.decode().splitlines()
    said = [line for line in lines if not LOG_LINE.match(line)]  # all but the log
    assert said == [f"nkservice serve: cannot start: 127.0.0.1:{port} is already in use by "
                    f"another process: find it with `ss -ltnp 'sport = :{port}'` or "
                    f"`lsof -i :{port}`, stop it, or listen on other ports with --config "
                    "FILE"], lines
    assert not any("worker 2" in line for line in lines)  # worker 1 failed: no other tried
    nats = next(re.search(r"embedded NATS server \(pid (\d+)\)", line) for line in lines
                if "embedded NATS server" in line)
    assert nats is not None and gone(int(nats[1]))
