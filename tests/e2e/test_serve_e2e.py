"""The real `nkservice serve` process, driven with raw JSON over real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.wire import Peer


class Server:
    def __init__(self, process: asyncio.subprocess.Process, plain: int, secure: int) -> None:
        self.process = process
        self.plain = plain
        self.secure = secure
        self.log: list[str] = []

    async def wait_for_log(self, text: str) -> None:
        assert self.process.stderr is not None
        async with asyncio.timeout(20):
            while not any(text in line for line in self.log):
                line = await self.process.stderr.readline()
                if not line:
                    raise AssertionError("server exited:\n" + "".join(self.log))
                self.log.append(line.decode())

    async def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        async with asyncio.timeout(10):
            assert self.process.stderr is not None
            self.log.extend((await self.process.stderr.read()).decode().splitlines())
            return await self.process.wait()


@pytest.fixture
async def server(tmp_path: Path, cert_files: dict[str, str]) -> AsyncIterator[Server]:
    plain, secure = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(f"""
[admin]
user = "root"
password = "toor"

[core]
listen = ["tcp://127.0.0.1:{free_port()}"]

[services.demo]
listen = ["ws://127.0.0.1:{plain}/api", "tcp://127.0.0.1:{plain}",
          "wss://127.0.0.1:{secure}/api", "tls://127.0.0.1:{secure}"]
users = {{ alice = "pw1" }}
admin = {{ user = "demo-admin", password = "pw" }}
tls = {{ certfile = "{cert_files['certfile']}" }}
ping_interval = 0
""")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nkservice", "serve", "--config", str(config),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL)
    running = Server(process, plain, secure)
    await running.wait_for_log("node started")
    yield running
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_raw_lines_over_tcp(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.plain)
    lines = [
        b'{"class":"core","cmd":"login","tid":1,"data":{"user":"alice","pass":"pw1"}}',
        b'{"class":"core","cmd":"ping","tid":"two"}',
        b"this is not json",
        b'{"class":"core","subclass":"user","cmd":"list","tid":3}',
    ]
    writer.write(b"\r\n".join(lines) + b"\n")
    answers = [json.loads(await reader.readline()) for _ in lines]
    # The login is decided asynchronously; the bad line is answered as soon as it is read.
    assert answers[0] == {"result": "error", "tid": None,
                          "data": {"code": 100072, "error": "Invalid JSON"}}
    login, ping, listing = answers[1:]
    assert login["result"] == "ok" and login["tid"] == 1 and login["data"]["user"] == "alice"
    assert ping == {"result": "ok", "tid": "two"}
    assert listing == {"result": "error", "tid": 3,
                       "data": {"code": 100030, "error": "Unauthorized"}}
    writer.close()


async def test_websocket_on_the_same_port_and_http_404(server: Server) -> None:
    peer = await Peer(f"ws://127.0.0.1:{server.plain}/api").connect(None)
    await peer.send_raw(b'{\n  "class": "core",\n  "cmd": "login",\n  "tid": 1,\n'
                        b'  "data": {"user": "demo-admin", "password": "pw"}\n}')
    assert (await peer.recv())["result"] == "ok"
    users = await peer.request("core", "list_users")
    assert list(users["data"]) == ["demo-admin"]
    await peer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.plain)
    writer.write(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 404")
    writer.close()


async def test_tls_and_wss_on_one_port(server: Server, client_tls: ssl.SSLContext) -> None:
    for url in (f"tls://127.0.0.1:{server.secure}", f"wss://127.0.0.1:{server.secure}/api"):
        peer = await Peer(url).connect(client_tls)
        await peer.send_raw(b'{"class":"core","cmd":"login","tid":1,'
                            b'"data":{"user":"alice","password":"pw1"}}')
        login = await peer.recv()
        assert login["result"] == "ok", url
        assert login["data"]["user"] == "alice"
        await peer.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_clean_shutdown_closes_sessions_and_exits_0(server: Server, signum: int) -> None:
    peer = await Peer(f"ws://127.0.0.1:{server.plain}/api").connect(None)
    await peer.login("alice", "pw1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.plain)
    assert await server.stop(signum) == 0
    assert await peer.wait_closed() == 1001  # going away (§1.3)
    assert await reader.read() == b""
    writer.close()
    assert any("stopped" in line for line in server.log)


async def test_bad_config_is_refused_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[services.demo]\nlisten = ["tcp://127.0.0.1:0"]\npinginterval = 5\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nkservice", "serve", "--config", str(config),
        stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"services.demo.pinginterval" in stderr


async def nkservice_call(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nkservice", "call", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_nkservice_call(server: Server) -> None:
    ws, tcp = f"ws://127.0.0.1:{server.plain}/api", f"tcp://127.0.0.1:{server.plain}"
    assert await nkservice_call(ws, "core", "ping") == (0, "{}\n", "")
    status, out, _ = await nkservice_call(tcp, "core", "user", "list", "--user", "demo-admin",
                                          "--password", "pw")
    assert status == 0 and list(json.loads(out)) == ["demo-admin"]
    status, _, err = await nkservice_call(ws, "core", "get_user", "--data", '{"user":"zed"}',
                                          "--user", "demo-admin", "--password", "pw")
    assert status == 1 and json.loads(err) == {"code": 100033, "error": "User not found"}
    status, _, err = await nkservice_call(tcp, "core", "list_users", "--user", "alice",
                                          "--password", "wrong")
    assert status == 1 and json.loads(err)["code"] == 100038


@pytest.mark.parametrize("transport", ["tcp", "ws", "tls", "wss"])
async def test_the_seeds_login_callback_against_the_real_process(
        server: Server, client_tls: ssl.SSLContext, transport: str) -> None:
    """The seed's walk-through on a `nkservice serve` process: an app (here the service's
    admin) registers for the login callback; the next login is decided by its answer."""
    port = server.secure if transport in ("tls", "wss") else server.plain
    path = "/api" if transport in ("ws", "wss") else ""
    url = f"{transport}://127.0.0.1:{port}{path}"
    context = client_tls if transport in ("tls", "wss") else None
    app = await Peer(url).connect(context)
    await app.login("demo-admin", "pw")
    registered = await app.request("core", "register_callback",
                                   {"class": "demo", "callback": "login"})
    assert registered["result"] == "ok"
    for authorized, expected in (("false", "error"), (True, "ok")):
        user = await Peer(url).connect(context)
        await user.send({"class": "core", "cmd": "login", "tid": 1,
                         "data": {"user": "zoe", "pass": "pw"}})
        asked = await app.recv()
        assert asked["cmd"] == "api_server_login" and asked["data"]["pass"] == "pw"
        await app.send({"result": "ok", "tid": asked["tid"],
                        "data": {"authorized": authorized, "reason": "Invalid password"}})
        assert (await user.recv())["result"] == expected
        await user.close()
    await app.close()
