"""The `nkservice` command line, run for real: `main([...])` in-process where no server is
needed, else a child process against an in-process node, or on a pseudo-terminal where a
prompt is the point. The rule under test: no traceback ever reaches a user; a failure is one
line on stderr and a non-zero exit status (130 after Ctrl-C)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nkservice.cli import main
from nkservice.client import Client
from nkservice.node import Node
from nkservice.service.passwords import check_password
from tests.conftest import free_port, url_of
from tests.wire import Peer

NodeFactory = Callable[..., Awaitable[Node]]
WAIT = 30.0  # upper bound for what should happen much sooner (CI machines can be slow)

# The real `main`, with Ctrl-C delivered as KeyboardInterrupt even when the test runner was
# started with SIGINT ignored (a background job of a script): children inherit that.
RUN_CLI = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "from nkservice.cli import main; sys.exit(main(sys.argv[1:]))")
# The same on a pseudo-terminal that becomes the child's controlling terminal, so that
# typing ^C there sends SIGINT as a real terminal does.
RUN_ON_TTY = ("import fcntl, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); " + RUN_CLI)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`main(args)` in-process: status, stdout, stderr (argparse's exits included)."""
    try:
        status = main(list(args))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


async def run_cli(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    """The command in a child process (needed when a node runs in this event loop)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_CLI, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.contextmanager
def silent_server(greeting: bytes = b"") -> Iterator[int]:
    """A tcp server that accepts, says `greeting`, reads, and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                connection, _ = listener.accept()
                connection.sendall(greeting)
                accepted.append(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


class Terminal:
    """The command on a pseudo-terminal: read what it prints, type at its prompts."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen([sys.executable, "-c", RUN_ON_TTY, *args],
                                        stdin=slave, stdout=slave, stderr=slave,
                                        start_new_session=True)
        os.close(slave)
        self.output = b""

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: the child is gone
            return False
        self.output += chunk
        return bool(chunk)

    def expect(self, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while text.encode() not in self.output:
            assert time.monotonic() < deadline, self.output
            if not self._read(0.1):
                raise AssertionError(f"ended before {text!r}: {self.output!r}")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def finish(self) -> tuple[int, str]:
        try:
            status = self.process.wait(WAIT)
            while self._read(0.2):
                pass
        finally:
            self.close()
        return status, self.output.decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            self.process.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    """Start commands on pseudo-terminals; whatever is left is ended after the test."""
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(*args))
        return started[-1]

    yield start
    for each in started:
        each.close()


# -- usage: no server needed ----------------------------------------------------------------

def test_help_shows_the_examples_whole(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "--help")
    assert status == 0
    lines = out.splitlines()
    index = next(i for i, line in enumerate(lines) if "nkservice listen ws://" in line)
    assert lines[index].endswith("--user admin --password admin \\")
    assert lines[index + 1].strip().startswith("--subscribe core/session")


@pytest.mark.parametrize("command", ["call", "listen"])
@pytest.mark.parametrize(("url", "says"), [
    ("127.0.0.1:9010", "it needs a scheme, e.g. tcp://127.0.0.1:9010"),
    ("http://127.0.0.1:9010/", "start with ws://, not http://"),
    ("https://127.0.0.1:9011/", "start with wss://, not https://"),
    ("tcp://127.0.0.1:99999", "out of range"),
    ("tcp://127.0.0.1:port", "Port could not be cast"),
    ("ws://[::1/", "Invalid IPv6 URL"),
    ("tcp://", "no host"),
    ("udp://127.0.0.1:9010", "the scheme must be tcp, tls, ws or wss"),
    ("tcp://127.0.0.1:0", "port 0"),
])
def test_a_bad_url_is_one_line(capsys: pytest.CaptureFixture[str], command: str, url: str,
                               says: str) -> None:
    args = ["core", "ping"] if command == "call" else ["--subscribe", "chat", "--user", "a",
                                                       "--password", "b"]
    status, out, err = cli(capsys, command, url, *args)
    assert status == 2 and out == ""
    line = one_line(err)
    assert line.startswith(f"nkservice {command}: bad URL {url!r}: ")
    assert says in line


@pytest.mark.parametrize(("args", "says"), [
    ([], "give a command: serve, call, listen, services or hash-password"),
    (["call"], "the following arguments are required"),
    (["call", "tcp://127.0.0.1:9", "core"], "give CLASS CMD or CLASS SUBCLASS CMD"),
    (["call", "tcp://127.0.0.1:9", "a", "b", "c", "d"], "give CLASS CMD"),
    (["call", "tcp://127.0.0.1:9", "core", "ping", "--data", "{x"], "--data is not JSON"),
    (["call", "tcp://127.0.0.1:9", "core", "ping", "--timeout", "0"], "more than 0 seconds"),
    (["call", "tcp://127.0.0.1:9", "core", "ping", "--timeout", "soon"], "not a number"),
    (["call", "tcp://127.0.0.1:9", "core", "user", "list", "--password", "x"],
     "--password needs --user"),
    (["listen", "tcp://127.0.0.1:9"], "required: --subscribe"),
    (["listen", "tcp://127.0.0.1:9", "--subscribe", "a/b/c/d/e", "--user", "a"],
     "bad --subscribe 'a/b/c/d/e'"),
    (["listen", "tcp://127.0.0.1:9", "--subscribe", "/x", "--user", "a"], "bad --subscribe"),
    (["tls://127.0.0.1:9"], "invalid choice"),
    (["call", "tls://127.0.0.1:9", "core", "ping", "--cafile", "/no/such/ca.pem"],
     "cannot use --cafile /no/such/ca.pem: No such file or directory"),
])
def test_a_usage_mistake_is_one_line(capsys: pytest.CaptureFixture[str], no_terminal: None,
                                     args: list[str], says: str) -> None:
    status, out, err = cli(capsys, *args)
    assert status == 2 and out == ""
    assert says in one_line(err)


def test_without_a_terminal_a_login_needs_the_options(
        capsys: pytest.CaptureFixture[str], no_terminal: None) -> None:
    status, _, err = cli(capsys, "call", "tcp://127.0.0.1:9", "core", "user", "list")
    assert status == 2
    assert one_line(err) == ("nkservice call: core user list needs a login: give --user USER "
                             "--password PASSWORD (there is no terminal to ask on)")
    status, _, err = cli(capsys, "listen", "tcp://127.0.0.1:9", "--subscribe", "chat",
                         "--user", "alice")
    assert status == 2
    assert one_line(err) == ("nkservice listen: no password for alice: give --password "
                             "PASSWORD (there is no terminal to ask on)")


def test_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    status, out, err = cli(capsys, "call", url, "core", "ping")
    assert status == 1 and out == ""
    assert one_line(err) == (f"nkservice call: cannot connect to {url}: connection refused; "
                             "is the server running on that host and port? (`nkservice "
                             "serve` starts one)")


def test_a_timeout_says_what_timed_out(capsys: pytest.CaptureFixture[str]) -> None:
    with silent_server() as port:
        url = f"tcp://127.0.0.1:{port}"
        status, _, err = cli(capsys, "call", url, "core", "ping", "--timeout", "0.3")
        assert status == 1
        assert one_line(err).startswith(f"nkservice call: no answer to core ping from {url} "
                                        "within 0.3 s: ")
        status, _, err = cli(capsys, "call", url, "core", "user", "list", "--user", "a",
                             "--password", "b", "--timeout", "0.3")
        assert status == 1
        assert one_line(err).startswith(f"nkservice call: no answer to the login from {url} "
                                        "within 0.3 s: ")


def test_the_client_library_logs_stay_off_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    # Lines that are not messages make the client log warnings: not the user's business.
    with silent_server(b"not json\n[1, 2]\n") as port:
        status, _, err = cli(capsys, "call", f"tcp://127.0.0.1:{port}", "core", "ping",
                             "--timeout", "0.3")
    assert status == 1
    assert "no answer to core ping" in one_line(err)


def test_hash_password_from_stdin(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    status, out, err = cli(capsys, "hash-password")
    assert status == 0 and err == ""
    assert check_password("s3cret", out.strip())
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    status, out, err = cli(capsys, "hash-password")
    assert status == 2 and out == ""
    assert one_line(err).startswith("nkservice hash-password: no password: ")


# -- prompts on a terminal: Ctrl-C and end of input -----------------------------------------

@pytest.mark.parametrize(("args", "prompt"), [
    (["call", "tcp://127.0.0.1:9", "core", "user", "list", "--user", "admin"],
     "password for admin: "),
    (["call", "tcp://127.0.0.1:9", "core", "user", "list"], "user: "),
    (["listen", "tcp://127.0.0.1:9", "--subscribe", "chat", "--user", "admin"],
     "password for admin: "),
    (["hash-password"], "password: "),
])
def test_ctrl_c_at_a_prompt_exits_130_quietly(terminal: Callable[..., Terminal],
                                              args: list[str], prompt: str) -> None:
    command = terminal(*args)
    command.expect(prompt)
    command.type("\x03")  # what the Ctrl-C key sends
    status, output = command.finish()
    assert status == 130
    assert "Traceback" not in output and "Error" not in output
    assert output.replace("^C", "").strip() == prompt.strip()


@pytest.mark.parametrize(("args", "prompt", "instead"), [
    (["call", "tcp://127.0.0.1:9", "core", "user", "list", "--user", "admin"],
     "password for admin: ", "give --password"),
    (["call", "tcp://127.0.0.1:9", "core", "user", "list"], "user: ", "give --user"),
    (["hash-password"], "password: ", "give the password as the argument"),
])
def test_end_of_input_at_a_prompt_is_one_line(terminal: Callable[..., Terminal],
                                              args: list[str], prompt: str,
                                              instead: str) -> None:
    command = terminal(*args)
    command.expect(prompt)
    command.type("\x04")  # Ctrl-D: end of input
    status, output = command.finish()
    assert status == 1
    assert output.splitlines()[1:] == [
        f"nkservice {args[0]}: end of input at the prompt: type the answer, or {instead}"]


async def test_user_and_password_are_asked_for_on_a_terminal(
        make_node: NodeFactory, terminal: Callable[..., Terminal]) -> None:
    node = await make_node(demo={})
    url = url_of(node, "demo", "ws")

    def session() -> tuple[int, str]:
        command = terminal("call", url, "core", "user", "list")
        command.expect("user: ")
        command.type("demo-admin\n")
        command.expect("password for demo-admin: ")
        command.type("pw\n")
        return command.finish()

    status, output = await asyncio.to_thread(session)
    assert status == 0, output
    assert '"demo-admin": [' in output
    assert "pw\n" not in output  # not echoed


# -- against a node ---------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_ping_needs_no_login(make_node: NodeFactory, transport: str) -> None:
    node = await make_node(demo={})
    url = url_of(node, "demo", transport)
    assert await run_cli("call", url, "core", "ping") == (0, "{}\n", "")
    assert await run_cli("call", url, "core", "core", "ping") == (0, "{}\n", "")


async def test_login_and_error_answers(make_node: NodeFactory) -> None:
    node = await make_node(demo={})
    url = url_of(node, "demo", "tcp")
    status, out, err = await run_cli("call", url, "core", "user", "list", "--user",
                                     "demo-admin", "--password", "pw")
    assert (status, err) == (0, "") and list(json.loads(out)) == ["demo-admin"]
    status, out, err = await run_cli("call", url, "core", "user", "get", "--data",
                                     '{"user": "nobody"}', "--user", "demo-admin",
                                     "--password", "pw")
    assert (status, out) == (1, "")
    assert json.loads(one_line(err)) == {"code": 100033, "error": "User not found"}
    status, out, err = await run_cli("call", url, "core", "user", "list", "--user", "alice",
                                     "--password", "wrong")
    assert (status, out) == (1, "")
    assert json.loads(one_line(err)) == {"code": 100038, "error": "Invalid password"}


@pytest.mark.parametrize("transport", ["tls", "wss"])
async def test_tls_trust(make_node: NodeFactory, cert_files: dict[str, str],
                         transport: str) -> None:
    node = await make_node(demo={})
    url = url_of(node, "demo", transport)
    status, out, err = await run_cli("call", url, "core", "ping")
    assert (status, out) == (1, "")
    assert one_line(err).startswith(f"nkservice call: the TLS certificate of {url} is not "
                                    "trusted (")
    assert one_line(err).endswith("give --cafile CA_FILE, or --insecure for a test server")
    assert await run_cli("call", url, "core", "ping", "--cafile",
                         cert_files["cafile"]) == (0, "{}\n", "")
    assert await run_cli("call", url, "core", "ping", "--insecure") == (0, "{}\n", "")


async def test_the_wrong_scheme_for_a_port(make_node: NodeFactory) -> None:
    node = await make_node(demo={})
    plain = url_of(node, "demo", "tcp").removeprefix("tcp://")
    secure = url_of(node, "demo", "tls").removeprefix("tls://")
    expected = {
        f"tls://{plain}": "TLS handshake with",
        f"wss://{plain}/": "TLS handshake with",
        f"tcp://{secure}": "closed the connection before answering the login",
        f"ws://{secure}/": "handshake",
        f"ws://{plain}/elsewhere": "check the URL's path",
    }
    for url, says in expected.items():
        status, out, err = await run_cli("call", url, "core", "user", "list", "--user", "a",
                                         "--password", "b", "--timeout", "5")
        assert (status, out) == (1, ""), url
        assert says in one_line(err), url


async def test_a_server_that_closes_says_why(make_node: NodeFactory,
                                             connect: Callable[..., Awaitable[Peer]]) -> None:
    node = await make_node(demo={})
    alice = await connect(node, "demo", "tcp")
    session_id = (await alice.login("alice", "pw1"))["session_id"]
    url = url_of(node, "demo", "tcp")
    call = asyncio.create_task(run_cli(
        "call", url, "core", "session", "cmd", "--user", "demo-admin", "--password", "pw",
        "--data", json.dumps({"session_id": session_id, "class": "chat", "cmd": "hello"})))
    forwarded = await alice.recv(WAIT)  # the call waits for alice's answer: stop the node
    assert forwarded["cmd"] == "hello"
    await node.stop()
    status, out, err = await call
    assert (status, out) == (1, "")
    assert one_line(err) == (f"nkservice call: {url} closed the connection before answering "
                             "core session cmd (Connection closed: server shutting down)")


async def test_ctrl_c_during_a_call_exits_130_quietly() -> None:
    received = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        received.set()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_CLI, "call", f"tcp://127.0.0.1:{port}", "core", "ping",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(received.wait(), WAIT)
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            out, err = await process.communicate()
        assert (process.returncode, out, err) == (130, b"", b"")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        server.close()


# -- listen -------------------------------------------------------------------------------------

async def read_line(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    async with asyncio.timeout(WAIT):
        line = await stream.readline()
    assert line, "the command ended"
    return line.decode().rstrip("\n")


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_listen_says_when_it_loses_and_regains_the_connection(
        make_node: NodeFactory, transport: str) -> None:
    node = await make_node(demo={})
    url = url_of(node, "demo", transport)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_CLI, "listen", url, "--user", "alice", "--password", "pw1",
        "--subscribe", "chat", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    admin = Client(url_of(node, "demo", "tcp"))
    try:
        assert await read_line(process.stderr) == (f"nkservice listen: listening on {url} as "
                                                   "alice; Ctrl-C stops")
        await admin.connect()
        await admin.login("demo-admin", "pw")
        sessions: dict[str, Any] = await admin.request("core", "get", {"user": "alice"}, "user")
        (session_id,) = sessions
        await admin.request("core", "stop", {"session_id": session_id}, "session")
        lost = await read_line(process.stderr)
        assert lost.startswith(f"nkservice listen: connection to {url} lost (")
        assert lost.endswith("); reconnecting")
        if transport == "tcp":  # the last line said why (a WebSocket says it in its close frame)
            assert "(Connection closed: stopped by demo-admin)" in lost
        assert await read_line(process.stderr) == (f"nkservice listen: reconnected to {url}, "
                                                   "subscribed again")
        await admin.send_event("chat", "room", body={"text": "hi"})
        assert json.loads(await read_line(process.stdout)) == {
            "class": "chat", "subclass": "room", "body": {"text": "hi"}}
        process.send_signal(signal.SIGINT)  # the way to stop listening: status 0
        async with asyncio.timeout(WAIT):
            rest, err = await process.communicate()
        assert (process.returncode, rest, err) == (0, b"", b"")
    finally:
        await admin.close()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_listen_refused_subscription_is_one_line(make_node: NodeFactory) -> None:
    node = await make_node(demo={})
    url = url_of(node, "demo", "ws")
    status, out, err = await run_cli("listen", url, "--user", "alice", "--password", "pw1",
                                     "--subscribe", "core/session")
    assert (status, out) == (1, "")
    assert json.loads(one_line(err)) == {"code": 100030, "error": "Unauthorized"}


# -- serve --------------------------------------------------------------------------------------

async def test_serve_on_a_port_in_use_says_how_to_find_the_holder(
        make_node: NodeFactory, tmp_path: Path) -> None:
    node = await make_node()
    taken = url_of(node, "core", "tcp").removeprefix("tcp://")
    port = taken.rsplit(":", 1)[1]
    config = tmp_path / "node.toml"
    config.write_text(f'[admin]\npassword = "pw"\n[core]\nlisten = ["tcp://{taken}"]\n')
    status, _, err = await run_cli("serve", "--config", str(config))
    assert status == 1
    assert one_line(err) == (
        f"nkservice serve: cannot start: {taken} is already in use by another process: find "
        f"it with `ss -ltnp 'sport = :{port}'` or `lsof -i :{port}`, stop it, or listen on "
        "other ports with --config FILE")


@pytest.mark.parametrize(("config", "says"), [
    ('[core]\npinginterval = 5\n', "core.pinginterval: unknown key"),  # found reading it
    ('[admin]\npassword = "pw"\n[core]\nlisten = ["tls://127.0.0.1:0"]\n',
     "tls.certfile"),  # found starting
])
async def test_serve_with_a_bad_config_is_one_line(tmp_path: Path, config: str,
                                                   says: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(config)
    status, _, err = await run_cli("serve", "--config", str(path))
    assert status == 2
    line = one_line(err)
    assert line.startswith("nkservice serve: bad config: ") and says in line
