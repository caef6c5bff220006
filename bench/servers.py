"""Starting, watching and stopping the servers under test, each in its own process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil
from oslimits import pin

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class ServerFailed(Exception):
    """The server under test did not start or died; the message says why."""


@dataclass(frozen=True)
class ServerSpec:
    """A server the benchmark can run: its name, and which ports serve which transport."""

    name: str
    transports: tuple[str, ...]

    @property
    def is_echo(self) -> bool:
        return self.name != NKSERVICE.name


TCP_ECHO = ServerSpec("asyncio-echo", ("tcp",))
PICOWS_ECHO = ServerSpec("picows-echo", ("ws",))
WEBSOCKETS_ECHO = ServerSpec("websockets-echo", ("ws",))
NKSERVICE = ServerSpec("nkservice", ("tcp", "ws"))
ALL_SERVERS = (TCP_ECHO, PICOWS_ECHO, WEBSOCKETS_ECHO, NKSERVICE)
# The ceiling of the event fan-out (not an echo server: only the fan-out section runs it).
PICOWS_FANOUT = ServerSpec("picows-fanout", ("ws",))
_ECHO_KIND = {
    TCP_ECHO: "tcp",
    PICOWS_ECHO: "picows",
    WEBSOCKETS_ECHO: "websockets",
    PICOWS_FANOUT: "fanout",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def nkservice_config(workdir: Path, ws_port: int, tcp_port: int, *, node: str = "",
                     core: str = "", more: str = "") -> Path:
    """The bench's nkservice config: the global admin `admin`/`admin`, the core service on
    `ws_port` and `tcp_port`; `node` and `core`: more lines of those tables (`workers = 1`
    unless `node` says), `more`: more tables."""
    path = workdir / "nkservice.toml"
    # ping_interval = 0: no server pings during the run (the client would answer them
    # anyway). max_pending_requests: 50 x 32 pipelined requests must never be refused.
    # workers = 1: one server process, so that it uses one core and its RSS is one figure.
    path.write_text(
        f"""[node]
data_dir = "{workdir / "data"}"
{node or "workers = 1"}

[admin]
user = "admin"
password = "admin"

[core]
listen = ["ws://{HOST}:{ws_port}/", "tcp://{HOST}:{tcp_port}"]
ping_interval = 0
max_pending_requests = 100000
{core}
{more}"""
    )
    return path


class ServerProcess:
    """One running server. Use as a context manager: it is always stopped on exit."""

    def __init__(self, spec: ServerSpec, cpus: set[int] | None, log_path: Path) -> None:
        self.spec = spec
        self._cpus = cpus
        # The data dir goes away with the run; the log is kept for the report.
        self._workdir = tempfile.TemporaryDirectory(prefix=f"bench-{spec.name}-")
        self.log_path = log_path
        self.ports = {transport: free_port() for transport in spec.transports}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _command(self) -> list[str]:
        if self.spec.is_echo:
            (port,) = self.ports.values()
            return [
                sys.executable,
                str(BENCH_DIR / "echo_servers.py"),
                _ECHO_KIND[self.spec],
                str(port),
            ]
        config = nkservice_config(Path(self._workdir.name), self.ports["ws"], self.ports["tcp"])
        return [sys.executable, "-m", "nkservice", "serve", "--config", str(config)]

    def __enter__(self) -> ServerProcess:
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        pin(self._proc.pid, self._cpus)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for port in self.ports.values():
            while not _accepts(port):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise ServerFailed(
                        f"{self.spec.name}: port {port} not accepting after {READY_TIMEOUT} s"
                        + self._log_tail()
                    )
                time.sleep(0.05)

    def check_alive(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise ServerFailed(f"{self.spec.name} exited with status {code}{self._log_tail()}")

    def stop(self) -> None:
        """SIGINT (a graceful stop), then SIGKILL if it does not end within STOP_TIMEOUT."""
        if self._proc is None or self._proc.poll() is not None:
            self._workdir.cleanup()
            return
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(
                f"warning: {self.spec.name} ignored SIGINT for {STOP_TIMEOUT} s; killing it",
                file=sys.stderr,
            )
            self._proc.kill()
            self._proc.wait(STOP_TIMEOUT)
        self._workdir.cleanup()

    def rss_bytes(self) -> int:
        """Resident memory of the server and any worker processes it started."""
        root = psutil.Process(self.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _log_tail(self, lines: int = 20) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return (
            ("\n--- server log (last lines) ---\n" + "\n".join(tail))
            if tail
            else " (server log is empty)"
        )


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False
