"""A node of several worker processes (`[node] workers = N`, or `nkservice serve --workers N`).

The process the operator starts is the supervisor. It serves nothing itself:

- it finds the cluster: the `node.cluster` URL, or else a NATS server of its own
  (`EmbeddedNats`, loopback only, its store in `<data_dir>/nats`) as the embedded default;
- it starts the workers, each `nkservice serve --worker N --cluster URL`: a whole node
  (`Node(config, worker=True)`) whose listening sockets share the node's ports with the
  other workers (`SO_REUSEPORT`: the kernel spreads new connections over them). Worker 1
  starts first, then the others together: a config that cannot start (a port in use, a
  TLS file missing) fails once, with the worker's own one-line reason;
- a worker says it is up by writing one line on a pipe the supervisor gave it
  (`--ready-fd`); once every worker has, the supervisor logs `node started: N workers`;
- a worker that exits is logged (its status or signal) and started again: at once, then
  after 1, 2, 4, 8, 10 s while it keeps dying within `QUICK_DEATH` seconds of its start.
  The other workers are not touched;
- SIGTERM or Ctrl-C: no more restarts, SIGTERM to every worker, SIGKILL to those still
  there after `STOP_TIMEOUT`, then the embedded NATS server stops; exit status 0.

Workers run in sessions of their own (a Ctrl-C in the terminal reaches the supervisor
only, which stops them in order) and Linux SIGTERMs them when the supervisor dies
(`PR_SET_PDEATHSIG`), so a supervisor that is killed leaves no worker holding the ports.
They write their log to the supervisor's stderr, each line naming the worker. Once a
worker serves, it applies the garbage collector's policy (`ready_signal`, gc_policy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from nkservice.cluster.server import EmbeddedNats, die_with_parent
from nkservice.errors import ConfigError, ServerError
from nkservice.gc_policy import apply_gc_policy
from nkservice.service.config import NodeConfig

log = logging.getLogger(__name__)

QUICK_DEATH = 5.0  # a worker that dies within this many seconds of its start backs off
MAX_BACKOFF = 10.0  # seconds, at most, before a worker that keeps dying is started again
SLOW_START = 10.0  # seconds between the notices that a worker is not ready yet
STOP_TIMEOUT = 10.0  # seconds the workers have to stop after SIGTERM, before SIGKILL
READY = b"ready\n"  # what a worker writes on its ready pipe once it serves

_PR_SET_PDEATHSIG = 1
T = TypeVar("T")


class StartFailure(Exception):
    """The node did not start. `said`: a worker already said why on stderr (its own
    one-line failure); the supervisor only exits with `status`."""

    def __init__(self, message: str, status: int = 1, *, said: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.said = said


class _Stopped(Exception):
    """SIGTERM or SIGINT came while the supervisor was starting."""


def check_workers(config: NodeConfig, workers: int) -> None:
    """What a node of `workers` processes cannot run with: a ConfigError naming the key."""
    if workers < 1:
        raise ConfigError("node.workers", f"must be 1 or more, not {workers}")
    if workers == 1:
        return
    for service in (config.core, *config.services.values()):
        for url in service.listen:
            if url.port == 0:
                raise ConfigError(
                    f"{service.table}.listen",
                    f"{url.scheme}://{url.host}:0 with {workers} workers: port 0 would give "
                    "each worker a port of its own; give a fixed port")
    if isinstance(config.http.metrics, tuple) and config.http.metrics[1] == 0:
        raise ConfigError("http.metrics", f"http://{config.http.metrics[0]}:0 with {workers} "
                          "workers: port 0 would give each worker a port of its own (and "
                          "a scrape one worker's share); give a fixed port")


def exit_description(code: int) -> str:
    """`exited with status 1`, `was killed by SIGKILL`."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def backoff(deaths: int) -> float:
    """Seconds to wait before starting a worker again after its `deaths`-th death in a row
    (each within QUICK_DEATH of its start, but the first): 0, 1, 2, 4, 8, 10, 10, ..."""
    if deaths <= 1:
        return 0.0
    return min(MAX_BACKOFF, 2.0 ** min(deaths - 2, 16))


class _Worker:
    """One worker's slot: its number and its current process."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.process: asyncio.subprocess.Process | None = None
        self.ready: asyncio.Future[bool] | None = None
        self.started_at = 0.0
        self.deaths = 0  # in a row, each soon after its start

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


class Supervisor:
    """Runs a node as `workers` processes; `run()` returns the exit status."""

    def __init__(self, config: NodeConfig, *, workers: int, config_file: Path | None,
                 log_level: str) -> None:
        self.config = config
        self.config_file = config_file.resolve() if config_file is not None else None
        self.log_level = log_level
        self.workers = [_Worker(number) for number in range(1, workers + 1)]
        self.nats: EmbeddedNats | None = None
        self.url = config.cluster
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._nats_task: asyncio.Task[None] | None = None
        self._die_with_parent = die_with_parent()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop.set)
        try:
            await self._start()
            pids = ", ".join(str(worker.pid) for worker in self.workers)
            log.info("node started: %d workers (pids %s) on the cluster at %s; Ctrl-C or "
                     "SIGTERM stops it", len(self.workers), pids, self.url)
            self._tasks = [asyncio.create_task(self._supervise(worker))
                           for worker in self.workers]
            if self.nats is not None:
                self._nats_task = asyncio.create_task(self._supervise_nats(self.nats))
            await self._stop.wait()
            log.info("stopping: %d workers", len(self.workers))
        except _Stopped:
            log.info("stopping before the node started")
        finally:
            self._stop.set()
            await self._shutdown()
        log.info("stopped")
        return 0

    # -- start -----------------------------------------------------------------------------

    async def _start(self) -> None:
        if not self.url:
            self.nats = EmbeddedNats(self.config.data_dir / "nats")
            try:
                self.url = await self._unless_stopped(self.nats.start())
            except ServerError as exc:  # its last log lines were logged as it wrote them
                reason = str(exc).split("\n", 1)[0].removesuffix("; its last log lines:")
                raise StartFailure(reason) from None
        log.info("starting %d workers on the cluster at %s", len(self.workers), self.url)
        first, *others = self.workers
        for batch in ([first], others):  # a config that cannot start fails once
            for worker in batch:
                try:
                    await self._spawn(worker)
                except OSError as exc:
                    raise StartFailure(f"cannot run worker {worker.number}: "
                                       f"{exc.strerror or exc}") from None
            for worker in batch:
                assert worker.ready is not None and worker.process is not None
                if not await self._until_ready(worker, worker.ready):
                    code = await worker.process.wait()
                    said = code in (1, 2)  # the worker said why, in one line, as serve does
                    raise StartFailure(f"worker {worker.number} (pid {worker.pid}) "
                                       f"{exit_description(code)} before it was ready",
                                       code if said else 1, said=said)
                log.info("worker %d (pid %d) ready", worker.number, worker.pid)

    async def _until_ready(self, worker: _Worker, ready: asyncio.Future[bool]) -> bool:
        """Whether the worker got ready (False: it exited first); said every SLOW_START
        seconds while it takes long (a cluster URL nobody answers, a slow store)."""
        waited = 0.0
        while True:
            try:
                async with asyncio.timeout(SLOW_START):
                    return await self._unless_stopped(asyncio.shield(ready))
            except TimeoutError:
                waited += SLOW_START
                log.warning("worker %d (pid %d) is not ready after %g s; still waiting (does "
                            "the cluster at %s answer?)", worker.number, worker.pid, waited,
                            self.url)

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> T:
        """The result of `awaitable`, unless SIGTERM or SIGINT comes first (_Stopped)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise _Stopped

    async def _spawn(self, worker: _Worker) -> None:
        """Start the worker's process; `worker.ready` says True once it serves, False if it
        exits first."""
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        command = [sys.executable, "-m", "nkservice", "serve"]
        if self.config_file is not None:
            command += ["--config", str(self.config_file)]
        command += ["--worker", str(worker.number), "--cluster", self.url,
                    "--log-level", self.log_level, "--ready-fd", str(write_end)]
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, pass_fds=(write_end,),
                start_new_session=True, preexec_fn=self._die_with_parent)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the worker's now: EOF here once it is gone
        ready: asyncio.Future[bool] = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(read_end, len(READY))
            except OSError:
                data = b""
            loop.remove_reader(read_end)
            os.close(read_end)
            if not ready.done():
                ready.set_result(data == READY)

        loop.add_reader(read_end, readable)
        worker.process, worker.ready = process, ready
        worker.started_at = time.monotonic()

    # -- while it runs ---------------------------------------------------------------------

    async def _supervise(self, worker: _Worker) -> None:
        """Start the worker again each time it exits, until the node stops."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self.stopping:
                return
            lived = time.monotonic() - worker.started_at
            worker.deaths = worker.deaths + 1 if lived < QUICK_DEATH else 1
            delay = backoff(worker.deaths)
            later = (f" in {delay:g} s (it keeps dying soon after its start)" if delay
                     else "")
            log.warning("worker %d (pid %d) %s after %.1f s; starting it again%s",
                        worker.number, worker.pid, exit_description(code), lived, later)
            while True:
                if delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                if self.stopping:
                    return
                try:
                    await self._spawn(worker)
                    break
                except OSError as exc:
                    delay = max(1.0, min(MAX_BACKOFF, delay * 2))
                    log.error("worker %d: cannot run it (%s); trying again in %g s",
                              worker.number, exc.strerror or exc, delay)
            if self.stopping:  # stopped while it was being started: _shutdown missed it
                with contextlib.suppress(ProcessLookupError):
                    worker.process.terminate()
                continue
            assert worker.ready is not None
            if await worker.ready:
                log.info("worker %d is back (pid %d)", worker.number, worker.pid)

    async def _supervise_nats(self, nats: EmbeddedNats) -> None:
        """Start the embedded NATS server again (same port, same store) when it exits."""
        deaths = 0
        while True:
            started = time.monotonic()
            await nats.wait()  # it logs its own exit
            deaths = deaths + 1 if time.monotonic() - started < QUICK_DEATH else 1
            while True:
                delay = backoff(deaths)
                log.warning("starting the embedded NATS server again%s",
                            f" in {delay:g} s" if delay else "")
                await asyncio.sleep(delay)
                try:
                    await nats.restart()
                    break
                except ServerError as exc:
                    deaths += 1
                    log.error("%s", str(exc).split("\n", 1)[0])

    # -- stop ------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """SIGTERM to every worker, SIGKILL after STOP_TIMEOUT; then the embedded NATS."""
        running = [worker for worker in self.workers if worker.running]
        for worker in running:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(worker.process.wait()) for worker in self.workers
            if worker.process is not None]
        waits += self._tasks
        if waits:
            _, late = await asyncio.wait(waits, timeout=STOP_TIMEOUT)
            if late:
                for worker in self.workers:
                    if worker.running:
                        assert worker.process is not None
                        log.warning("worker %d (pid %d) did not stop within %g s: killing it",
                                    worker.number, worker.pid, STOP_TIMEOUT)
                        with contextlib.suppress(ProcessLookupError):
                            worker.process.kill()
                await asyncio.wait(late)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("supervising a worker failed: %r", task.exception())
        if self._nats_task is not None:
            self._nats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._nats_task
        if self.nats is not None:
            await self.nats.stop()


def ready_signal(fd: int | None) -> Callable[[], None]:
    """For a serving process (a worker, or a node of one process): the function to call
    once it serves, on its running loop. It applies the garbage collector's policy
    (`gc_policy.apply_gc_policy`: what start-up made is frozen, full collections walk only
    what came since the last one) and, for a worker, tells the supervisor (once)."""
    def signal_ready() -> None:
        apply_gc_policy()
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, READY)
            os.close(fd)

    return signal_ready
