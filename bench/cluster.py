"""Section 7: clusters. Workers on one box, the cost of the NATS bus, and idle sessions.

Each measurement is made against its baseline in the same run, in interleaved rounds
(every other round in reverse order), and the ratio is taken within each round:

1. **Workers: round trips.** `core ping` by a plain user of service `bench` (an admin's
   answer would carry the cluster's state with 2 workers only), 50 connections x 32 in
   flight (section 1's pipelined scenario), on tcp, against a node of 1 worker and a node
   of 2; the connections on each worker counted from its open files. The load
   generator is bench/loadgen/loadgen.c (C, one thread, epoll), compiled here with `cc -O2`:
   on 2 cores, a node of 2 workers shares them with its load generator, and the ratio can
   only approach 2x when the load costs a small fraction of the server's CPU (a Python load
   generator costs about as much as a worker: the ratio then tops out near 1x).
2. **Workers: event fan-out.** One publisher, N subscribers (10,000) spread by the kernel
   over the workers (SO_REUSEPORT), each answering every event; one at a time and pipelined,
   against a node of 1 worker and a node of 2. The same C load generator, on tcp. The split
   over the workers is what the server says: each connection's admin `core ping` answer
   names the process that holds the session.
3. **The bus on a one-worker node.** The same node with `cluster` set to a NATS server of
   this section's (bus on) and without (bus off), no other process of the cluster: round
   trips (bench/loadgen.py's pipelined scenario on tcp and ws, the plain user of part 1),
   fan-out to 1,000 subscribers (bench/eventload.py's `fanout`), and publishes to 10
   receivers among 1,000 subscriptions with 32 publishes in flight (bench/eventload.py's
   `matching`). One node at a time, then (tcp round trips, fan-out one at a time,
   publishes) both nodes at once, side by side on one core: the work each node did per
   second of its CPU (with the NATS server's, for the bus on node), which a change of the
   machine's speed does not move.
4. **Idle sessions.** A node of several workers (8: a process holds at most 20,000 files
   here) and 100,000 logged-in WebSocket sessions from several load processes
   (bench/idleload.py), each from its own 127.0.0.x source address. Timed: connecting
   and logging in all of them; then a reconnect storm (all dropped at once, each
   reconnecting and logging in with its session id). Read: the workers' memory before and
   after; throughout, an admin's `core ping` to every worker, one at a time every 50 ms.

Pinning: a one-worker node runs on the server's core and its load generator on the other,
as in the other sections. A node of several workers needs both cores, so nothing is
pinned then: its load generator competes with it for the same two cores (the figures say
how much CPU each used). The NATS server of part 3 runs on the server's core: what it
costs counts against the node.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import psutil
from cpuwatch import Busy, machine_busy_seconds
from fanout import QUIET_SECONDS, FanoutTiming
from harness import LoadFailed, LoadProcess, LoadSession, RunContext, median_sample
from oslimits import pin
from report import markdown_table
from servers import (
    BENCH_DIR,
    HOST,
    NKSERVICE,
    ServerFailed,
    ServerProcess,
    free_port,
    nkservice_config,
)

MB = 1024 * 1024
BENCH_USER = "bench"  # its password is the same: the round trips log in to `bench` with it
START_TIMEOUT = 60.0  # launch to `node started` (a node of 8 workers starts them in turn)
SETTLE_SECONDS = 2.0
NATS_BINARY = Path(sys.executable).parent / "nats-server"
PER_LOADER = 12_500  # idle sessions per load process (its open files: 20,000 at most)
FIRST_SOURCE = 2  # the load processes connect from 127.0.0.2, 127.0.0.3, ...
PING_TARGET_MS = 1000.0
_OTHER_NOTE_PCT = 10.0  # other processes' CPU worth a note, in % of one core


@dataclass(frozen=True)
class ClusterTiming:
    rounds: int
    warmup: float  # round trips and publishes: warm-up and measured seconds
    duration: float
    fanout: FanoutTiming
    fanout_receivers: int  # part 2
    bus_receivers: int  # part 3's fan-out
    idle_sessions: int
    idle_workers: int
    idle_concurrency: int  # connects in progress at once, per load process
    idle_hold: float  # seconds the sessions stay idle between the two phases
    resume_window: float


FULL = ClusterTiming(rounds=5, warmup=1.0, duration=4.0,
                     fanout=FanoutTiming(rounds=5, publishes=20, warmup=2,
                                         pipelined_deliveries=100_000),
                     fanout_receivers=10_000, bus_receivers=1_000, idle_sessions=100_000,
                     idle_workers=8, idle_concurrency=100, idle_hold=5.0, resume_window=600.0)
QUICK = ClusterTiming(rounds=1, warmup=0.5, duration=1.5,
                      fanout=FanoutTiming(rounds=1, publishes=10, warmup=2,
                                          pipelined_deliveries=50_000),
                      fanout_receivers=1_000, bus_receivers=1_000, idle_sessions=5_000,
                      idle_workers=8, idle_concurrency=100, idle_hold=1.0, resume_window=600.0)


@dataclass(frozen=True)
class Node:
    """How a node under test runs."""

    label: str
    workers: int
    bus: bool = False  # one worker joined to the section's own NATS server
    resume_window: float = 0.0

    @property
    def pinned(self) -> bool:
        return self.workers == 1


ONE = Node("1 worker", 1)
TWO = Node("2 workers", 2)
BUS_OFF = Node("bus off", 1)
BUS_ON = Node("bus on", 1, bus=True)


# -- processes ---------------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class ClusterServer(ServerProcess):
    """nkservice as a node of `node.workers` processes (a supervisor, its workers and its
    embedded NATS server), or one process joined to `nats_url`, or one plain process."""

    def __init__(self, ctx: RunContext, node: Node, label: str, nats_url: str = "") -> None:
        super().__init__(NKSERVICE, ctx.server_cpus if node.pinned else None,
                         ctx.log_dir / f"nkservice-cluster-{label}.log")
        self.node = node
        self.nats_url = nats_url
        # The round trips' service: a plain user's `core ping` (an admin's would carry the
        # cluster's state, with workers or the bus only: not the same request).
        self.ports["bench"] = free_port()
        if node.workers == 1:
            # A service of its own for part 3's publishes, so that the fan-out subscribers
            # of the core service (class `bench`, any type) do not receive them.
            self.ports["pub"] = free_port()
        self._family: list[psutil.Process] = []
        self.base_files: dict[int, int] = {}

    def _command(self) -> list[str]:
        cluster = f'\ncluster = "{self.nats_url}"' if self.node.bus else ""
        resume = (f"resume_window = {self.node.resume_window:g}"
                  if self.node.resume_window else "")
        config = nkservice_config(
            Path(self._workdir.name), self.ports["ws"], self.ports["tcp"],
            node=f"workers = {self.node.workers}{cluster}", core=resume, more=f"""
[services.bench]
listen = ["ws://{HOST}:{self.ports["bench"]}/", "tcp://{HOST}:{self.ports["bench"]}"]
users = {{ {BENCH_USER} = "{BENCH_USER}" }}
ping_interval = 0
max_pending_requests = 100000
{self._pub_service()}""")
        return [sys.executable, "-m", "nkservice", "serve", "--config", str(config)]

    def _pub_service(self) -> str:
        if "pub" not in self.ports:
            return ""
        return f"""
[services.pub]
listen = ["ws://{HOST}:{self.ports["pub"]}/"]
ping_interval = 0
max_pending_requests = 100000
"""

    def __enter__(self) -> ClusterServer:
        super().__enter__()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while " node started" not in self.log_text():
                self.check_alive()
                if time.monotonic() > deadline:
                    raise ServerFailed(f"no `node started` after {START_TIMEOUT:g} s"
                                       + self._log_tail())
                time.sleep(0.05)
            root = psutil.Process(self.pid)
            self._family = [root, *root.children(recursive=True)]
            self.base_files = {p.pid: open_files(p.pid) for p in self.workers()}
        except BaseException:
            self.stop()
            raise
        return self

    def workers(self) -> list[psutil.Process]:
        root = psutil.Process(self.pid)
        if self.node.workers == 1:
            return [root]
        found = []
        for child in root.children():
            with contextlib.suppress(psutil.Error):
                command = child.cmdline()
                if "--worker" in command:
                    found.append((int(command[command.index("--worker") + 1]), child))
        return [child for _, child in sorted(found, key=lambda pair: pair[0])]

    def nats(self) -> psutil.Process | None:
        for child in psutil.Process(self.pid).children():
            with contextlib.suppress(psutil.Error):
                if child.name().startswith("nats-server"):
                    return child
        return None

    def family_pids(self) -> list[int]:
        """The node's processes as they were once it had started: supervisor, workers, NATS."""
        return [proc.pid for proc in self._family]

    def split(self, processes: dict[str, int]) -> list[int]:
        """Connections per worker, in the workers' order, from the load generator's count by
        the `process` that each connection's `core ping` answer named (`host-PID-random`;
        "single": a node without a cluster). A process that is no worker of ours comes last."""
        by_pid = {proc.pid: number for number, proc in enumerate(self.workers())}
        counts = [0] * len(by_pid)
        strays = []
        for name, count in processes.items():
            parts = name.rsplit("-", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if name == "single" and len(counts) == 1:
                counts[0] += count
            elif pid in by_pid:
                counts[by_pid[pid]] += count
            else:
                strays.append(count)
        return counts + strays

    def embedded_nats_url(self) -> str | None:
        """The URL of the node's NATS server, from the supervisor's `node started` line."""
        found = re.search(r"node started: .* on the cluster at (\S+?);", self.log_text())
        return found.group(1) if found else None

    def connections(self) -> list[int]:
        """Open files of each worker beyond those it had when the node had started."""
        return [open_files(p.pid) - self.base_files.get(p.pid, 0) for p in self.workers()]

    def stop(self) -> None:
        super().stop()
        for proc in self._family:  # a worker or NATS server left behind: ours to end
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()


class NatsServer:
    """A NATS server (JetStream on: a node with a cluster keeps its services there) on the
    server's core, with its monitoring port for the message counts."""

    def __init__(self, ctx: RunContext) -> None:
        self.port = free_port()
        self.monitor_port = free_port()
        self.url = f"nats://{HOST}:{self.port}"
        self.log_path = ctx.log_dir / "nats-server-cluster-bus.log"
        self._store = tempfile.TemporaryDirectory(prefix="bench-nats-")
        self._cpus = ctx.server_cpus
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NatsServer:
        cpus = self._cpus
        env = {**os.environ, "GOMAXPROCS": str(len(cpus) if cpus else os.cpu_count() or 1)}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(NATS_BINARY), "-a", HOST, "-p", str(self.port), "-m",
                 str(self.monitor_port), "-js", "-sd", self._store.name, "-n", "bench-nats"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.varz()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise ServerFailed("the NATS server did not start; see "
                                       f"{self.log_path}") from None
                time.sleep(0.05)

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._store.cleanup()

    def varz(self) -> dict[str, Any]:
        url = f"http://{HOST}:{self.monitor_port}/varz"
        with urllib.request.urlopen(url, timeout=5) as answer:
            found: dict[str, Any] = orjson.loads(answer.read())
            return found

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class NatsTap:
    """Counts every message that crosses a NATS server, by subject (its first 3 tokens): a
    plain NATS client subscribed to `>` (raw protocol, a thread of the orchestrator). Used
    on the embedded NATS server of a node of several workers, which has no monitoring port.
    It adds a receiver to each message, nothing else: the workers publish what they
    publish whether it is there or not."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("nats://").split(",")[0].rsplit(":", 1)
        self._sock = socket.create_connection((host, int(port)), timeout=5)
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.error: str | None = None
        self._sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"bench-tap"}'
                           b"\r\nSUB > 1\r\nPING\r\n")
        self._thread = threading.Thread(target=self._read, name="nats-tap", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        try:
            while chunk := self._sock.recv(1 << 16):
                buf += chunk
                while (end := buf.find(b"\r\n")) >= 0:
                    line = buf[:end]
                    if line.startswith((b"MSG ", b"HMSG ")):
                        fields = line.split()
                        size = int(fields[-1])
                        if len(buf) < end + 2 + size + 2:
                            break  # the payload is not all here yet
                        subject = ".".join(fields[1].decode().split(".")[:3])
                        with self._lock:
                            self.counts[subject] = self.counts.get(subject, 0) + 1
                        buf = buf[end + 2 + size + 2:]
                        continue
                    if line == b"PING":
                        self._sock.sendall(b"PONG\r\n")
                    elif line.startswith(b"-ERR"):
                        self.error = line.decode(errors="replace")
                    buf = buf[end + 2:]
        except OSError as exc:
            self.error = self.error or str(exc)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    @staticmethod
    def since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {subject: count - before.get(subject, 0) for subject, count in after.items()
                if count > before.get(subject, 0)}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


# -- CPU over a period ---------------------------------------------------------------------------


# -- rows ----------------------------------------------------------------------------------------


@dataclass
class ClusterRow:
    part: str  # "workers" or "bus"
    measure: str  # "round trips", "fan-out", "publishes"
    scenario: str
    node: Node
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per round
    failure: str | None = None
    split: list[int] | None = None  # connections per worker (fan-out: the subscribers)
    publisher: str | None = None  # fan-out: the process that holds the publisher's session

    @property
    def result(self) -> dict[str, Any] | None:
        return median_sample(self.samples, "rate", self.failure)

    def key(self) -> tuple[str, str, str]:
        return self.part, self.measure, self.scenario


def ratio(rows: list[ClusterRow], row: ClusterRow, baseline: Node) -> float | None:
    """Median over rounds of the row's rate divided by its baseline's in the same round."""
    for base in rows:
        if base.key() != row.key() or base.node != baseline:
            continue
        if base.failure or row.failure or not base.samples or not row.samples:
            return None
        pairs = zip(row.samples, base.samples, strict=False)
        return float(statistics.median(mine["rate"] / theirs["rate"] for mine, theirs in pairs))
    return None


@dataclass
class IdleResult:
    sessions: int
    workers: int
    loaders: int
    concurrency: int
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    pings: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)  # per process
    counts: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    failure: str | None = None


@dataclass
class ClusterResults:
    rows: list[ClusterRow] = field(default_factory=list)
    idle: IdleResult | None = None


# -- parts 1 and 2: one worker against two -------------------------------------------------------


def _load_ctx(ctx: RunContext, node: Node) -> RunContext:
    """The load generator's core: the other one when the node is pinned, else none."""
    return ctx if node.pinned else RunContext(ctx.log_dir, None, None)


def _roundtrip_args(server: ClusterServer, transport: str, timing: ClusterTiming) -> list[str]:
    """bench/loadgen.py's pipelined round trips (50x32) as the plain user of `bench`."""
    return ["roundtrip", f"--transport={transport}", f"--port={server.ports['bench']}",
            f"--user={BENCH_USER}", f"--password={BENCH_USER}", "--conns=50", "--window=32",
            f"--warmup={timing.warmup}", f"--duration={timing.duration}",
            f"--server-pid={server.pid}", "--phase-timeout=30"]


def _roundtrip(ctx: RunContext, server: ClusterServer, transport: str, timing: ClusterTiming,
               label: str, nats: NatsServer | None = None) -> dict[str, Any]:
    """One run of bench/loadgen.py's pipelined round trips, with the CPU of everyone and
    (while it runs) how its 50 connections are spread over the workers."""
    args = _roundtrip_args(server, transport, timing)
    pids = {"server": server.pid}
    if nats is not None:
        pids["nats"] = nats.pid
    varz0 = nats.varz() if nats is not None else None
    already = server.connections()  # the fan-out's subscribers may be connected too
    busy = Busy(pids)
    load = _load_ctx(ctx, server.node).start_load(args, label)
    split, out = _split_and_wait(load, server, already, timing, 60)
    sample = load.result(out)
    sample.update(busy.finish())
    sample["rate"] = sample["rps"]
    sample["split"] = split
    if nats is not None and varz0 is not None:
        sample.update(_nats_counts(varz0, nats.varz(), sample["requests"]))
    server.check_alive()
    return sample


def _split_and_wait(load: LoadProcess, server: ClusterServer, already: list[int],
                    timing: ClusterTiming, spare: float) -> tuple[list[int], bytes]:
    """The round-trip load's connections on each worker (its open files beyond `already`,
    counted half-way through the warm-up, once they are all logged in), and its output once
    it ends (within `spare` seconds of its own measuring time)."""
    try:
        time.sleep(min(0.5 + timing.warmup / 2, timing.warmup + timing.duration))
        split = [now - before
                 for now, before in zip(server.connections(), already, strict=True)]
        out, _ = load.proc.communicate(timeout=timing.warmup + timing.duration + spare)
    except subprocess.TimeoutExpired:
        load.abort()
        raise LoadFailed("load generator still running after its deadline; killed") from None
    except BaseException:
        load.abort()
        raise
    return split, out


def _nats_counts(before: dict[str, Any], after: dict[str, Any], per: float) -> dict[str, Any]:
    msgs_in = int(after["in_msgs"]) - int(before["in_msgs"])
    msgs_out = int(after["out_msgs"]) - int(before["out_msgs"])
    return {"nats_in": msgs_in, "nats_out": msgs_out,
            "nats_in_per": msgs_in / per if per else None,
            "nats_out_per": msgs_out / per if per else None}


def _event_command(session: DrivenLoad, server: ClusterServer, command: dict[str, Any],
                   timeout: float, rate: str, nats: NatsServer | None = None,
                   per: str | None = None) -> dict[str, Any]:
    pids = {"server": server.pid, "load": session.pid}
    if nats is not None:
        pids["nats"] = nats.pid
    varz0 = nats.varz() if nats is not None else None
    busy = Busy(pids)
    sample = session.command(command, timeout)
    figures = busy.finish()
    sample["other_cpu_pct"] = figures["other_cpu_pct"]
    sample["machine_cpu_pct"] = figures["machine_cpu_pct"]
    if "nats_cpu_pct" in figures:
        sample["nats_cpu_pct"] = figures["nats_cpu_pct"]
    sample["rate"] = sample[rate]
    if nats is not None and varz0 is not None and per is not None:
        count = float(sample[per])
        if command["op"] == "publish":  # NATS counts the warm-up's publishes too
            count *= (command["warmup"] + command["duration"]) / command["duration"]
        sample.update(_nats_counts(varz0, nats.varz(), count))
    server.check_alive()
    return sample


class DrivenLoad(LoadSession):
    """A LoadSession that can also be written to without waiting for the answer (to start
    several load processes at once) and names its process."""

    def __init__(self, load: LoadProcess) -> None:
        super().__init__(load)
        self.pid = load.proc.pid

    def __enter__(self) -> DrivenLoad:
        return self

    def send(self, command: dict[str, Any]) -> None:
        proc = self._load.proc
        assert proc.stdin is not None
        if proc.poll() is not None:
            raise self._load.failure()
        proc.stdin.write(orjson.dumps(command) + b"\n")
        proc.stdin.flush()


def _event_session(ctx: RunContext, server: ClusterServer, args: list[str], label: str,
                   setup_timeout: float) -> DrivenLoad:
    load = _load_ctx(ctx, server.node).start_load(
        [*args, f"--server-pid={server.pid}"], label, "eventload.py")
    session = DrivenLoad(load)
    try:
        ready = session.read(setup_timeout)
    except BaseException:
        session.close()
        raise
    if ready["failed"]:
        session.close()
        raise LoadFailed(f"{ready['failed']} connections failed to connect or subscribe;"
                         f" first: {ready['first_failure']}")
    return session


def _orders(rounds: int, pair: tuple[Node, Node]) -> list[tuple[Node, Node]]:
    """ABBA: every other round in reverse order, so that a steady drift of the machine's
    speed favours neither."""
    return [pair if round_no % 2 == 0 else (pair[1], pair[0]) for round_no in range(rounds)]


def _fail(rows: list[ClusterRow], node: Node, why: str, part: str) -> None:
    for row in rows:
        if row.node == node and row.part == part and row.failure is None:
            row.failure = why


# The C load generator of parts 1 and 2: built here, at run time, when its source is newer.
LOADGEN_SOURCE = BENCH_DIR / "loadgen" / "loadgen.c"
LOADGEN_BINARY = BENCH_DIR / "loadgen" / "build" / "loadgen"  # build/ is git-ignored
CC_COMMAND = ["cc", "-O2", "-Wall", "-Wextra"]
RTT_CONNS, RTT_WINDOW = 50, 32
SIDE_BY_SIDE = "side by side, per CPU second"  # the bus part's measure of both nodes at once
FANOUT_SETUP = 600.0  # seconds to connect, log in and subscribe 10,000 (a busy box is slow)


def loadgen_binary() -> Path:
    """bench/loadgen/loadgen.c compiled (again only when the source is newer than the binary)."""
    binary = LOADGEN_BINARY
    if binary.exists() and binary.stat().st_mtime >= LOADGEN_SOURCE.stat().st_mtime:
        return binary
    binary.parent.mkdir(exist_ok=True)
    building = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    try:
        built = subprocess.run([*CC_COMMAND, "-o", str(building), str(LOADGEN_SOURCE)],
                               capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoadFailed(f"cannot compile {LOADGEN_SOURCE}: {exc}") from None
    if built.returncode != 0:
        building.unlink(missing_ok=True)
        raise LoadFailed(f"cc failed on {LOADGEN_SOURCE}: {built.stderr.strip()[-400:]}")
    if built.stderr.strip():  # it is meant to compile without a warning
        print(f"cc warnings on {LOADGEN_SOURCE}:\n{built.stderr.strip()}", file=sys.stderr)
    building.replace(binary)
    return binary


class CLoad(LoadProcess):
    """A running bench/loadgen/build/loadgen: JSON lines on stdout, diagnostics in a log."""

    def __init__(self, args: list[str], log_path: Path, cpus: set[int] | None) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen([str(loadgen_binary()), *args], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log)
        pin(self.proc.pid, cpus)


class CFanout(LoadSession):
    """The C load generator in `fanout` mode: its commands are words on a line
    (`sequential P W`, `pipelined K`, `close`), each answered with one JSON line."""

    def __init__(self, load: CLoad) -> None:
        super().__init__(load)
        self.pid = load.proc.pid
        self.ready: dict[str, Any] = {}  # its first line: subscribers set up, their split

    def __enter__(self) -> CFanout:
        return self

    def run(self, line: str, timeout: float) -> dict[str, Any]:
        proc = self._load.proc
        assert proc.stdin is not None
        if proc.poll() is not None:
            raise self._load.failure()
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise self._load.failure() from None
        return self.read(timeout)

    def close(self, timeout: float = 60.0) -> None:
        proc = self._load.proc
        if proc.poll() is None:
            try:
                proc.communicate(b"close\n", timeout=timeout)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self._load.abort()
        log = self._load.log_path
        if log.exists() and not log.stat().st_size:
            log.unlink()


def _load_cpus(ctx: RunContext, node: Node) -> set[int] | None:
    return ctx.load_cpus if node.pinned else None


def _pids_arg(server: ClusterServer) -> list[str]:
    return ["--pids", ",".join(str(pid) for pid in server.family_pids())]


def _with_node_cpu(sample: dict[str, Any], server: ClusterServer) -> dict[str, Any]:
    """Add what the C load generator measured per process of the node: each worker's CPU
    and the embedded NATS server's (in % of one core), and the client's share of the CPU
    used by the client and the node together."""
    per_pid = {int(pid): pct for pid, pct in sample.get("pid_cpu_pct", {}).items()}
    sample["worker_cpu_pct"] = [per_pid.get(proc.pid, 0.0) for proc in server.workers()]
    nats = server.nats() if server.node.workers > 1 else None
    sample["nats_cpu_pct"] = per_pid.get(nats.pid, 0.0) if nats is not None else None
    used = sample["client_cpu_pct"] + sample["server_cpu_pct"]
    sample["client_share_pct"] = 100 * sample["client_cpu_pct"] / used if used else None
    return sample


def _tapped(sample: dict[str, Any], tap: NatsTap | None, before: dict[str, int],
            started: float, per: float) -> None:
    """What crossed the node's NATS server while the load ran (the whole run: set-up and
    warm-up included), and its count per request (or per publish)."""
    if tap is None:
        return
    crossed = NatsTap.since(before, tap.snapshot())
    sample["nats_subjects"] = crossed
    sample["nats_msgs"] = sum(crossed.values())
    sample["nats_seconds"] = time.perf_counter() - started
    sample["nats_per"] = sample["nats_msgs"] / per if per else None


def _c_roundtrip(ctx: RunContext, server: ClusterServer, timing: ClusterTiming,
                 label: str, tap: NatsTap | None) -> dict[str, Any]:
    """One run of the C load generator's round trips (a fresh process: connect, log in,
    warm up, measure), with the CPU of the node's processes over the measured period."""
    before, started = (tap.snapshot() if tap else {}), time.perf_counter()
    args = ["rtt", "--port", str(server.ports["bench"]), "--user", BENCH_USER, "--password",
            BENCH_USER, "--conns", str(RTT_CONNS), "--window", str(RTT_WINDOW),
            "--warmup", f"{timing.warmup:g}", "--duration", f"{timing.duration:g}",
            "--setup-timeout", "30", *_pids_arg(server)]
    already = server.connections()
    load = CLoad(args, ctx.log_dir / f"loadgen-{label}.log", _load_cpus(ctx, server.node))
    split, out = _split_and_wait(load, server, already, timing, 60)
    sample = load.result(out)
    sample["rate"] = sample["rps"]
    sample["split"] = split
    # per request of the whole run (its measured requests / measured seconds x run time)
    _tapped(sample, tap, before, started,
            sample["rps"] * (timing.warmup + timing.duration))
    server.check_alive()
    return _with_node_cpu(sample, server)


def _c_fanout(ctx: RunContext, server: ClusterServer, receivers: int, label: str) -> CFanout:
    """The fan-out's subscribers and publisher, set up; they wait for commands (an hour at
    most between two: the round trips, and waiting for a quiet machine, come in between)."""
    load = CLoad(["fanout", "--port", str(server.ports["tcp"]), "--subscribers",
                  str(receivers), "--setup-timeout", f"{FANOUT_SETUP:g}", "--command-wait",
                  "3600", *_pids_arg(server)],
                 ctx.log_dir / f"loadgen-{label}.log", _load_cpus(ctx, server.node))
    session = CFanout(load)
    try:
        ready = session.read(FANOUT_SETUP + 60)
    except BaseException:
        session.close()
        raise
    if ready["failed"] or ready["receivers"] != receivers:
        session.close()
        raise LoadFailed(f"{ready['failed']} of {receivers} subscribers failed to connect,"
                         f" log in or subscribe; first: {ready['first_failure']}")
    session.ready = ready
    return session


def _c_event_command(session: CFanout, server: ClusterServer, line: str, timeout: float,
                     tap: NatsTap | None, publishes: int) -> dict[str, Any]:
    before, started = (tap.snapshot() if tap else {}), time.perf_counter()
    sample = session.run(line, timeout)
    _tapped(sample, tap, before, started, publishes)
    sample["rate"] = sample["dps"]
    server.check_alive()
    return _with_node_cpu(sample, server)


# Other work on the machine (this box is shared) distorts a 2-core measurement: each one of
# parts 1 and 2 waits for a quiet machine first, and is made again when, during it, other
# processes used more than RETRY_OTHER_PCT of a core.
QUIET_BUSY_PCT = 10.0  # quiet: the whole machine busy less than this (% of one core) ...
QUIET_WINDOW = 2.0  # ... over this many seconds
QUIET_WAIT = 120.0  # the longest wait for quiet; then it measures anyway
RETRY_OTHER_PCT = 15.0
RETRIES = 2


def wait_quiet(limit: float = QUIET_WAIT) -> float:
    """Wait until the machine is quiet (or `limit` seconds); the seconds waited beyond the
    first look."""
    start = time.monotonic()
    while True:
        busy0, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(QUIET_WINDOW)
        busy = 100 * (machine_busy_seconds() - busy0) / (time.monotonic() - t0)
        waited = time.monotonic() - start
        if busy < QUIET_BUSY_PCT or waited >= limit:
            return max(0.0, waited - QUIET_WINDOW)


def _clean(measure: Callable[[], dict[str, Any]], settle: float = 0.0) -> dict[str, Any]:
    """`measure()` once the machine is quiet, again (at most RETRIES times, `settle` seconds
    later) when other processes took more than RETRY_OTHER_PCT of a core meanwhile. The
    sample says how long it waited and how many measurements it threw away."""
    waited, dropped = 0.0, list[int]()
    while True:
        waited += wait_quiet()
        sample = measure()
        if sample.get("other_cpu_pct", 0.0) <= RETRY_OTHER_PCT or len(dropped) >= RETRIES:
            sample["quiet_wait_s"] = waited
            sample["dropped_other_pct"] = dropped
            return sample
        dropped.append(round(sample["other_cpu_pct"]))
        time.sleep(settle)


def run_workers(ctx: RunContext, timing: ClusterTiming) -> list[ClusterRow]:
    """Parts 1 and 2: round trips and fan-out, 1 worker against 2, with the C load generator."""
    fan = timing.fanout
    events = fan.events(timing.fanout_receivers)
    scenarios = [("round trips", f"tcp pipelined ({RTT_CONNS}x{RTT_WINDOW})"),
                 ("fan-out", f"{timing.fanout_receivers:,} subscribers, one at a time"),
                 ("fan-out", f"{timing.fanout_receivers:,} subscribers, pipelined ({events})")]
    rows = {(node, scenario): ClusterRow("workers", measure, scenario, node)
            for node in (ONE, TWO) for measure, scenario in scenarios}
    all_rows = list(rows.values())
    try:
        loadgen_binary()
    except LoadFailed as exc:
        for row in all_rows:
            row.failure = str(exc)
        return all_rows
    with contextlib.ExitStack() as stack:
        servers: dict[Node, ClusterServer] = {}
        sessions: dict[Node, CFanout] = {}
        taps: dict[Node, NatsTap] = {}
        for node in (ONE, TWO):
            try:
                servers[node] = stack.enter_context(
                    ClusterServer(ctx, node, f"workers-{node.workers}"))
                url = servers[node].embedded_nats_url() if node.workers > 1 else None
                if url is not None:
                    try:
                        taps[node] = NatsTap(url)
                        stack.callback(taps[node].close)
                    except OSError as exc:  # the figures go on without the NATS counts
                        print(f"cannot watch NATS at {url}: {exc}", file=sys.stderr)
                session = stack.enter_context(_c_fanout(
                    ctx, servers[node], timing.fanout_receivers,
                    f"cluster-fanout-{node.workers}w"))
                sessions[node] = session
                split = servers[node].split(session.ready["processes"])
                publisher = servers[node].split({session.ready["publisher_process"]: 1})
                for row in rows.values():
                    if row.node == node and row.measure == "fan-out":
                        row.split = split
                        row.publisher = (f"worker {publisher.index(1) + 1}"
                                         if node.workers > 1 and 1 in publisher else None)
            except (ServerFailed, LoadFailed) as exc:
                _fail(all_rows, node, str(exc), "workers")
        for round_no, order in enumerate(_orders(timing.rounds, (ONE, TWO))):
            for node in order:
                row = rows[(node, scenarios[0][1])]
                if row.failure or node not in servers:
                    continue
                try:
                    label = f"cluster-{node.workers}w-tcp-{round_no + 1}"
                    row.samples.append(_clean(partial(
                        _c_roundtrip, ctx, servers[node], timing, label, taps.get(node))))
                except (ServerFailed, LoadFailed) as exc:
                    row.failure = str(exc)
            for turn, node in enumerate(order):
                one, piped = (rows[(node, scenarios[1][1])], rows[(node, scenarios[2][1])])
                if one.failure or node not in sessions:
                    continue
                try:
                    budget = 30.0 + 20.0 * (fan.publishes + fan.warmup)
                    one.samples.append(_clean(partial(
                        _c_event_command, sessions[node], servers[node],
                        f"sequential {fan.publishes} {fan.warmup}", budget, taps.get(node),
                        fan.publishes + fan.warmup), QUIET_SECONDS))
                    time.sleep(QUIET_SECONDS)
                    piped.samples.append(_clean(partial(
                        _c_event_command, sessions[node], servers[node], f"pipelined {events}",
                        60.0, taps.get(node), events), QUIET_SECONDS))
                except (ServerFailed, LoadFailed) as exc:
                    one.failure = piped.failure = str(exc)
                if turn == 0 or round_no + 1 < timing.rounds:
                    time.sleep(QUIET_SECONDS)  # the deadline timers of the events it sent
    return all_rows


# -- part 3: the bus on and off ------------------------------------------------------------------


def run_bus(ctx: RunContext, timing: ClusterTiming) -> list[ClusterRow]:
    fan = timing.fanout
    receivers = timing.bus_receivers
    events = fan.events(receivers)
    scenarios = [("round trips", "tcp pipelined (50x32)"), ("round trips", "ws pipelined (50x32)"),
                 ("fan-out", f"{receivers:,} subscribers, one at a time"),
                 ("fan-out", f"{receivers:,} subscribers, pipelined ({events})"),
                 ("publishes", "10 receivers of 1,000 subscriptions, 32 in flight")]
    scenarios += [(SIDE_BY_SIDE, f"{measure}, {scenario}") for measure, scenario in
                  (scenarios[0], scenarios[2], scenarios[4])]
    rows = {(node, scenario): ClusterRow("bus", measure, scenario, node)
            for node in (BUS_OFF, BUS_ON) for measure, scenario in scenarios}
    all_rows = list(rows.values())
    with contextlib.ExitStack() as stack:
        try:
            nats = stack.enter_context(NatsServer(ctx))
        except ServerFailed as exc:
            for row in all_rows:
                row.failure = str(exc)
            return all_rows
        servers: dict[Node, ClusterServer] = {}
        fanouts: dict[Node, DrivenLoad] = {}
        publishers: dict[Node, DrivenLoad] = {}
        for node in (BUS_OFF, BUS_ON):
            try:
                server = servers[node] = stack.enter_context(
                    ClusterServer(ctx, node, node.label.replace(" ", "-"), nats.url))
                port = f"--port={server.ports['ws']}"
                fanouts[node] = stack.enter_context(_event_session(
                    ctx, server, ["fanout", port, f"--receivers={receivers}"],
                    f"cluster-{node.label.replace(' ', '-')}-fanout", 120.0))
                publishers[node] = stack.enter_context(_event_session(
                    ctx, server, ["matching", f"--port={server.ports['pub']}",
                                  "--subscriptions=1000"],
                    f"cluster-{node.label.replace(' ', '-')}-publish", 120.0))
            except (ServerFailed, LoadFailed) as exc:
                _fail(all_rows, node, str(exc), "bus")
        for round_no, order in enumerate(_orders(timing.rounds, (BUS_OFF, BUS_ON))):
            for node in order:
                if node not in publishers:
                    continue
                on = nats if node.bus else None
                row = rows[(node, scenarios[0][1])]
                try:
                    for transport, (_, scenario) in zip(("tcp", "ws"), scenarios, strict=False):
                        row = rows[(node, scenario)]
                        row.samples.append(_roundtrip(
                            ctx, servers[node], transport, timing,
                            f"cluster-{node.label.replace(' ', '-')}-{transport}-{round_no + 1}",
                            on))
                    row = rows[(node, scenarios[4][1])]
                    row.samples.append(_event_command(
                        publishers[node], servers[node],
                        {"op": "publish", "window": 32, "warmup": timing.warmup,
                         "duration": timing.duration}, 120.0, "pps", on, "publishes"))
                    row = rows[(node, scenarios[2][1])]
                    row.samples.append(_event_command(
                        fanouts[node], servers[node],
                        {"op": "sequential", "publishes": fan.publishes, "warmup": fan.warmup},
                        30.0 + 20.0 * (fan.publishes + fan.warmup), "dps", on, "deliveries"))
                    row = rows[(node, scenarios[3][1])]
                    row.samples.append(_event_command(
                        fanouts[node], servers[node], {"op": "pipelined", "events": events},
                        60.0, "dps", on, "deliveries"))
                except (ServerFailed, LoadFailed) as exc:
                    row.failure = str(exc)
                time.sleep(1.0)  # the deadline timers of 1,000 events: a few ms of work
            if len(publishers) == 2:
                side = {node: [rows[(node, scenario)] for _, scenario in scenarios[5:]]
                        for node in (BUS_OFF, BUS_ON)}
                _bus_side_by_side(ctx, servers, fanouts, publishers, nats, timing, side,
                                  round_no)
    return all_rows


def _bus_side_by_side(ctx: RunContext, servers: dict[Node, ClusterServer],
                      fanouts: dict[Node, DrivenLoad], publishers: dict[Node, DrivenLoad],
                      nats: NatsServer, timing: ClusterTiming,
                      rows: dict[Node, list[ClusterRow]], round_no: int) -> None:
    """Round trips, fan-out one at a time and publishes against both nodes at the same
    time: they share CPU 0 (with the NATS server), their loads CPU 1, so a change of the
    machine's speed falls on both alike. Each sample's `rate`: what its node did per
    second of its CPU (the bus on node's with the NATS server's CPU of the same time)."""
    fan = timing.fanout
    nodes = (BUS_OFF, BUS_ON)

    def roundtrips() -> dict[Node, dict[str, Any]]:
        loads = {node: _load_ctx(ctx, node).start_load(
            _roundtrip_args(servers[node], "tcp", timing),
            f"cluster-side-{node.label.replace(' ', '-')}-{round_no + 1}") for node in nodes}
        samples = {}
        for node, load in loads.items():
            try:
                out, _ = load.proc.communicate(timeout=timing.warmup + timing.duration + 60)
            except BaseException:
                for other in loads.values():
                    other.abort()
                raise
            samples[node] = load.result(out)
        return samples

    def commands(sessions: dict[Node, DrivenLoad], command: dict[str, Any],
                 timeout: float) -> dict[Node, dict[str, Any]]:
        samples: dict[Node, dict[str, Any]] = {}
        failures: list[BaseException] = []

        def one(node: Node) -> None:
            try:
                samples[node] = sessions[node].command(command, timeout)
            except BaseException as exc:  # raised in this thread's caller below
                failures.append(exc)

        threads = [threading.Thread(target=one, args=(node,)) for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return samples

    measures: list[tuple[Callable[[], dict[Node, dict[str, Any]]], str]] = [
        (roundtrips, "requests"),
        (partial(commands, fanouts, {"op": "sequential", "publishes": fan.publishes,
                                     "warmup": fan.warmup},
                 30.0 + 20.0 * (fan.publishes + fan.warmup)), "deliveries"),
        (partial(commands, publishers, {"op": "publish", "window": 32,
                                        "warmup": timing.warmup,
                                        "duration": timing.duration}, 120.0), "publishes"),
    ]
    for index, (measure, unit) in enumerate(measures):
        try:
            busy = Busy({"nats": nats.pid, **{f"node{number}": servers[node].pid
                                              for number, node in enumerate(nodes)},
                         **{f"load{number}": load.pid for number, load in
                            enumerate([*fanouts.values(), *publishers.values()])}})
            samples = measure()
            figures = busy.finish()
            for node, sample in samples.items():
                nats_cpu = figures["nats_cpu_pct"] if node.bus else 0.0
                cpu_seconds = (sample["server_cpu_pct"] + nats_cpu) / 100 * sample["seconds"]
                sample["units"] = sample[unit]
                sample["server_us"] = 1e6 * cpu_seconds / sample[unit]
                sample["rate"] = sample[unit] / cpu_seconds  # per CPU second
                sample["nats_cpu_pct"] = nats_cpu if node.bus else None
                sample["other_cpu_pct"] = figures["other_cpu_pct"]
                servers[node].check_alive()
                rows[node][index].samples.append(sample)
        except (ServerFailed, LoadFailed) as exc:
            for node in nodes:
                rows[node][index].failure = str(exc)
        time.sleep(1.0)  # the deadline timers of the events sent


# -- part 4: idle sessions -----------------------------------------------------------------------


def run_idle(ctx: RunContext, timing: ClusterTiming) -> IdleResult:
    sessions = timing.idle_sessions
    loaders = max(1, math.ceil(sessions / PER_LOADER))
    shares = [sessions // loaders + (i < sessions % loaders) for i in range(loaders)]
    result = IdleResult(sessions, timing.idle_workers, loaders, timing.idle_concurrency)
    node = Node(f"{timing.idle_workers} workers", timing.idle_workers,
                resume_window=timing.resume_window)
    free = RunContext(ctx.log_dir, None, None)  # nothing pinned: every core is the node's
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(ClusterServer(ctx, node, "idle"))
            time.sleep(SETTLE_SECONDS)
            workers = server.workers()
            nats = server.nats()
            before = {p.pid: vm_rss(p.pid) for p in workers}
            nats_before = vm_rss(nats.pid) if nats else 0
            pinger = stack.enter_context(DrivenLoad(free.start_load(
                ["admin", f"--port={server.ports['tcp']}", f"--workers={len(workers)}"],
                "cluster-idle-admin", "idleload.py")))
            covered = pinger.read(60.0)
            result.counts["admin_processes"] = len(covered["processes"])
            loads = []
            for number, share in enumerate(shares):
                load = stack.enter_context(DrivenLoad(free.start_load(
                    ["idle", f"--port={server.ports['ws']}",
                     f"--source=127.0.0.{FIRST_SOURCE + number}", f"--conns={share}",
                     f"--concurrency={timing.idle_concurrency}", "--phase-timeout=900"],
                    f"cluster-idle-{number + 1}", "idleload.py")))
                load.read(30.0)
                loads.append(load)
            pids = {"server": server.pid, **{f"load{i}": ld.pid for i, ld in enumerate(loads)}}
            pinger.command({"op": "mark", "phase": "connect"}, 10.0)

            connect = _idle_phase(loads, {"op": "connect"}, pids)
            result.phases["connect"] = connect
            result.pings["connect"] = pinger.command({"op": "mark", "phase": "idle"}, 10.0)
            time.sleep(SETTLE_SECONDS + timing.idle_hold)
            server.check_alive()
            split = server.connections()
            after = {p.pid: vm_rss(p.pid) for p in workers}
            nats_after = vm_rss(nats.pid) if nats else 0
            held = [ld.command({"op": "count"}, 30.0) for ld in loads]
            result.counts["open_after_connect"] = sum(h["open"] for h in held)
            result.counts["dropped_while_idle"] = sum(h["dropped"] for h in held)
            result.pings["idle"] = pinger.command({"op": "mark", "phase": "storm"}, 10.0)

            storm = _idle_phase(loads, {"op": "storm"}, pids)
            result.phases["storm"] = storm
            result.pings["storm"] = pinger.command({"op": "mark", "phase": "after"}, 10.0)
            time.sleep(SETTLE_SECONDS)
            server.check_alive()
            split_storm = server.connections()
            after_storm = {p.pid: vm_rss(p.pid) for p in workers}
            held = [ld.command({"op": "count"}, 30.0) for ld in loads]
            result.counts["open_after_storm"] = sum(h["open"] for h in held)
            result.counts["dropped_after_storm"] = sum(h["dropped"] for h in held)
            result.counts["server_requests"] = sum(h["server_requests"] for h in held)
            result.pings["after"] = pinger.command({"op": "mark", "phase": "end"}, 10.0)
            for number, proc in enumerate(workers):
                result.memory.append({
                    "process": f"worker {number + 1}", "pid": proc.pid,
                    "sessions": split[number], "rss_before": before[proc.pid],
                    "rss_after": after[proc.pid], "sessions_after_storm": split_storm[number],
                    "rss_after_storm": after_storm[proc.pid],
                    "gc": gc_policy_lines(server.log_text(), proc.pid)})
            if nats is not None:
                result.memory.append({
                    "process": "NATS server", "pid": nats.pid, "sessions": None,
                    "rss_before": nats_before, "rss_after": nats_after,
                    "sessions_after_storm": None, "rss_after_storm": vm_rss(nats.pid)})
        except (ServerFailed, LoadFailed) as exc:
            result.failure = str(exc)
    result.wall_seconds = time.perf_counter() - t_start
    return result


_GC_START = re.compile(r"garbage collector: (\d+) objects frozen after start-up")
_GC_AUDIT = re.compile(r"garbage collector audit: (\d+) objects walked, (\d+) freed, "
                       r"(\d+) frozen, (\d+) ms")


def gc_policy_lines(log: str, pid: int) -> dict[str, Any]:
    """What a worker's log says of its garbage collector policy (src/nkservice/gc_policy.py):
    the objects frozen once it served, and its audits (count, longest, objects freed)."""
    frozen, audits = None, []
    for line in log.splitlines():
        if f" pid {pid}]" not in line:
            continue
        if (found := _GC_START.search(line)) is not None:
            frozen = int(found[1])
        elif (found := _GC_AUDIT.search(line)) is not None:
            audits.append((int(found[4]), int(found[2])))
    return {"frozen_at_start": frozen, "audits": len(audits),
            "audit_max_ms": max((ms for ms, _ in audits), default=None),
            "audit_freed": sum(freed for _, freed in audits)}


def _idle_phase(loads: list[DrivenLoad], command: dict[str, Any], pids: dict[str, int]
                ) -> dict[str, Any]:
    """Send `command` to every load process at once; their answers, merged."""
    busy = Busy(pids)
    started = time.time()
    for load in loads:
        load.send(command)
    answers = [load.read(900.0) for load in loads]
    figures = busy.finish()
    ended = max(a["ended_at"] for a in answers)
    merged: dict[str, Any] = {
        "sessions": sum(a["sessions"] for a in answers),
        "failed": sum(a["failed"] for a in answers),
        "first_failure": next((a["first_failure"] for a in answers if a["first_failure"]),
                              None),
        "retries": sum(a["retries"] for a in answers),
        "resumed": sum(a["resumed"] for a in answers),
        "other_id": sum(a["other_id"] for a in answers),
        "seconds": ended - started,
        "p50_ms": statistics.median(a["p50_ms"] for a in answers if a["p50_ms"] is not None)
        if any(a["p50_ms"] is not None for a in answers) else None,
        "p99_ms": max((a["p99_ms"] for a in answers if a["p99_ms"] is not None), default=None),
        "max_ms": max((a["max_ms"] for a in answers if a["max_ms"] is not None), default=None),
        "server_cpu_pct": figures["server_cpu_pct"],
        "load_cpu_pct": sum(v for k, v in figures.items()
                            if k.startswith("load") and k.endswith("_cpu_pct")),
        "other_cpu_pct": figures["other_cpu_pct"],
        "per_loader": answers,
    }
    merged["rate"] = merged["sessions"] / merged["seconds"] if merged["seconds"] else None
    return merged


# -- the whole section ---------------------------------------------------------------------------


def run(ctx: RunContext, *, quick: bool, parts: tuple[str, ...] = ("workers", "bus", "idle")
        ) -> ClusterResults:
    timing = QUICK if quick else FULL
    results = ClusterResults()
    if "workers" in parts:
        results.rows += run_workers(ctx, timing)
    if "bus" in parts:
        results.rows += run_bus(ctx, timing)
    if "idle" in parts:
        results.idle = run_idle(ctx, timing)
    return results


# -- tables --------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _first_line(text: str | None) -> str:
    return (text or "unknown").strip().splitlines()[0]


def _notes(res: dict[str, Any]) -> str:
    notes = []
    other = res.get("other_cpu_pct")
    if other is not None and other > _OTHER_NOTE_PCT:
        notes.append(f"other processes {other:.0f}%")
    if res.get("steal_pct") and res["steal_pct"] > 2:
        notes.append(f"VM steal {res['steal_pct']:.0f}%")
    for key, what in (("errors", "error answers"), ("error_answers", "error answers"),
                      ("disconnected", "connections dropped"),
                      ("server_requests", "server requests answered"),
                      ("unexpected", "lines not understood")):
        if res.get(key):
            notes.append(f"{res[key]} {what}")
    if res.get("unexpected_events"):
        notes.append(f"{res['unexpected_events']:+d} events vs expected")
    return "; ".join(notes)


def _split(split: list[int] | None) -> str:
    if not split or len(split) < 2:
        return "-"
    return " + ".join(f"{n:,}" for n in split)


def _pcts(values: list[float] | None) -> str:
    if not values or len(values) < 2:
        return "-"
    return " + ".join(f"{v:.0f}%" for v in values)


def _latency(res: dict[str, Any], measure: str) -> str:
    if measure == "round trips":
        if res.get("p50_us") is None or res["p50_us"] < 0:
            return "-"
        return f"{res['p50_us'] / 1000:.1f} / {res['p99_us'] / 1000:.1f}"
    return f"{res['last_p50_ms']:.1f} / {res['last_max_ms']:.1f}"


WORKERS_PREAMBLE = (
    "Load generator: bench/loadgen/loadgen.c (C, one thread, epoll; tcp), the same for both"
    " nodes. **client CPU**: its CPU time over the measured period in % of one core;"
    " **client share**: that time / (its time + the node's). **latency**: round trips p50 /"
    " p99 of each request; fan-out: p50 / max from a publish to its last delivery."
    " **per worker**: round trips: the load's connections on each worker (its open files);"
    " fan-out: the subscribers by the process that each one's `core ping` answer named."
    " **NATS msgs (each)**: messages through the node's NATS"
    " server during the whole run (a subscriber to `>`), and per request (per publish)."
)


def workers_table(rows: list[ClusterRow]) -> str:
    header = ["measure", "scenario", "node", "per second", "range", "vs 1 worker",
              "latency ms", "server CPU", "per worker", "worker CPU", "NATS CPU",
              "NATS msgs (each)", "client CPU", "client share", "other CPU", "notes"]
    cells = []
    for row in rows:
        first = [row.measure, row.scenario, row.node.label]
        res = row.result
        if res is None:
            cells.append([*first, *["-"] * 12, f"FAILED: {_first_line(row.failure)}"])
            continue
        rates = [s["rate"] for s in row.samples]
        found = ratio(rows, row, ONE)
        split = row.split if row.split is not None else res.get("split")
        nats = res.get("nats_cpu_pct")
        msgs = "-"
        if res.get("nats_msgs") is not None:
            msgs = f"{res['nats_msgs']:,} ({_num(res.get('nats_per'), '.3f')})"
        notes = [note for note in (_notes(res), row.publisher and f"publisher on {row.publisher}")
                 if note]
        dropped = [d for sample in row.samples for d in sample.get("dropped_other_pct", [])]
        if dropped:
            notes.append(f"{len(dropped)} measurement(s) made again (other processes "
                         f"{', '.join(f'{d}%' for d in dropped)})")
        cells.append([
            *first, _num(res["rate"]), f"{_num(min(rates))}-{_num(max(rates))}",
            f"{found:.2f}x" if found is not None else "-", _latency(res, row.measure),
            _num(res.get("server_cpu_pct"), ".0f") + "%", _split(split),
            _pcts(res.get("worker_cpu_pct")), "-" if nats is None else f"{nats:.1f}%", msgs,
            _num(res.get("client_cpu_pct"), ".0f") + "%",
            _num(res.get("client_share_pct"), ".0f") + "%",
            _num(res.get("other_cpu_pct"), ".0f") + "%", "; ".join(notes)])
    return WORKERS_PREAMBLE + "\n\n" + markdown_table(header, cells)


BUS_PREAMBLE = (
    "One node at a time: each measure against the bus off node, then the bus on node (every"
    " other round in reverse order). **side by side, per CPU second**: the same load against"
    " both nodes at the same time, the nodes (and the NATS server) sharing CPU 0, the loads"
    " CPU 1; **per second** is then the requests, deliveries or publishes per second of the"
    " node's CPU (the bus on node's with the NATS server's of the same seconds), so a change"
    " of the machine's speed falls on both alike."
)


def bus_table(rows: list[ClusterRow]) -> str:
    header = ["measure", "scenario", "bus", "per second", "range", "vs bus off",
              "server CPU", "NATS CPU", "client CPU", "NATS msgs in / out each", "notes"]
    cells = []
    for row in rows:
        first = [row.measure, row.scenario, row.node.label]
        res = row.result
        if res is None:
            cells.append([*first, *["-"] * 7, f"FAILED: {_first_line(row.failure)}"])
            continue
        rates = [s["rate"] for s in row.samples]
        found = ratio(rows, row, BUS_OFF)
        msgs = "-"
        if res.get("nats_in_per") is not None:
            msgs = f"{res['nats_in_per']:.2f} / {res['nats_out_per']:.2f}"
        cells.append([
            *first, _num(res["rate"]), f"{_num(min(rates))}-{_num(max(rates))}",
            f"{found:.2f}x" if found is not None else "-",
            _num(res.get("server_cpu_pct"), ".0f") + "%",
            _num(res.get("nats_cpu_pct"), ".0f") + "%" if res.get("nats_cpu_pct") is not None
            else "-",
            _num(res.get("client_cpu_pct"), ".0f") + "%", msgs, _notes(res)])
    return BUS_PREAMBLE + "\n\n" + markdown_table(header, cells)


def idle_table(idle: IdleResult) -> str:
    header = ["phase", "sessions", "seconds", "per second", "login p50 / p99 / max ms",
              "retries", "failed", "resumed", "admin ping p50 / p99 / max ms",
              "late pings (> 1 s)",
              "server CPU", "load CPU", "notes"]
    cells = []
    for name, label in (("connect", "connect + log in"),
                        ("storm", "reconnect storm (all dropped, log in with session_id)")):
        phase = idle.phases.get(name)
        pings = idle.pings.get(name, {})
        if phase is None:
            cells.append([label, *["-"] * 11, f"FAILED: {_first_line(idle.failure)}"
                          if idle.failure else "not run"])
            continue
        notes = []
        if phase["first_failure"]:
            notes.append(f"first failure: {phase['first_failure'][:120]}")
        if phase["other_id"]:
            notes.append(f"{phase['other_id']} answered with another session id")
        if phase.get("other_cpu_pct", 0) > _OTHER_NOTE_PCT:
            notes.append(f"other processes {phase['other_cpu_pct']:.0f}%")
        cells.append([
            label, f"{phase['sessions']:,}", _num(phase["seconds"], ".1f"),
            _num(phase["rate"]),
            f"{_num(phase['p50_ms'])} / {_num(phase['p99_ms'])} / {_num(phase['max_ms'])}",
            f"{phase['retries']:,}", f"{phase['failed']:,}",
            f"{phase['resumed']:,}" if name == "storm" else "-",
            f"{_num(pings.get('p50_ms'), '.1f')} / {_num(pings.get('p99_ms'))} / "
            f"{_num(pings.get('max_ms'))}",
            f"{pings.get('late', 0)} of {pings.get('pings', 0):,}",
            _num(phase["server_cpu_pct"], ".0f") + "%", _num(phase["load_cpu_pct"], ".0f") + "%",
            "; ".join(notes)])
    idle_pings = idle.pings.get("idle")
    if idle_pings:
        cells.append([f"idle ({SETTLE_SECONDS:g} s settle + hold)", "-", "-", "-", "-", "-",
                      "-", "-", f"{_num(idle_pings.get('p50_ms'), '.1f')} / "
                      f"{_num(idle_pings.get('p99_ms'))} / {_num(idle_pings.get('max_ms'))}",
                      f"{idle_pings.get('late', 0)} of {idle_pings.get('pings', 0):,}", "-",
                      "-", f"{idle.counts.get('dropped_while_idle', 0)} dropped while idle"])
    return markdown_table(header, cells)


def memory_table(idle: IdleResult) -> str:
    header = ["process", "sessions", "RSS before MB", "RSS with sessions MB", "delta MB",
              "KB/session", "sessions after storm", "RSS after storm MB",
              "GC: frozen at start / audits (longest ms, freed)"]
    cells = []
    total_sessions = total_delta = 0
    for entry in idle.memory:
        delta = entry["rss_after"] - entry["rss_before"]
        sessions = entry["sessions"]
        if sessions is not None:
            total_sessions += sessions
            total_delta += delta
        per = delta / 1024 / sessions if sessions else None
        cells.append([
            entry["process"], f"{sessions:,}" if sessions is not None else "-",
            _num(entry["rss_before"] / MB, ".1f"), _num(entry["rss_after"] / MB, ".1f"),
            _num(delta / MB, ".1f"), _num(per, ".1f"),
            f"{entry['sessions_after_storm']:,}"
            if entry["sessions_after_storm"] is not None else "-",
            _num(entry["rss_after_storm"] / MB, ".1f"), _gc_cell(entry.get("gc"))])
    if total_sessions:
        cells.append(["all workers", f"{total_sessions:,}", "-", "-",
                      _num(total_delta / MB, ".1f"),
                      _num(total_delta / 1024 / total_sessions, ".1f"), "-", "-", "-"])
    return markdown_table(header, cells)


def _gc_cell(gc: dict[str, Any] | None) -> str:
    if not gc or gc["frozen_at_start"] is None:
        return "-"
    audits = gc["audits"]
    more = f" ({_num(gc['audit_max_ms'])} ms, {gc['audit_freed']:,} freed)" if audits else ""
    return f"{gc['frozen_at_start']:,} / {audits}{more}"


def kb_per_session(idle: IdleResult) -> float | None:
    workers = [e for e in idle.memory if e["sessions"] is not None]
    sessions = int(sum(e["sessions"] for e in workers))
    if not sessions:
        return None
    return float(sum(e["rss_after"] - e["rss_before"] for e in workers)) / 1024 / sessions


def targets_table(results: ClusterResults) -> str:
    header = ["target (issue)", "result (this run)", "status"]
    cells = []
    rows = results.rows

    def find(part: str, measure: str, node: Node, baseline: Node) -> list[tuple[str, float]]:
        return [(row.scenario, found) for row in rows
                if row.part == part and row.measure == measure and row.node == node
                and (found := ratio(rows, row, baseline)) is not None]

    def status(values: list[float], ok: Any) -> str:
        if not values:
            return "not measured"
        return "met" if all(ok(v) for v in values) else "not met"

    trips = find("workers", "round trips", TWO, ONE)
    if trips:
        cells.append(["round trips: 2 workers ≥ 1.6x one worker",
                      "; ".join(f"{s}: **{r:.2f}x**" for s, r in trips),
                      status([r for _, r in trips], lambda r: r >= 1.6)])
    fans = find("workers", "fan-out", TWO, ONE)
    if fans:
        cells.append(["fan-out to subscribers spread over both workers: ≥ 1.4x",
                      "; ".join(f"{s}: **{r:.2f}x**" for s, r in fans),
                      status([r for _, r in fans], lambda r: r >= 1.4)])
    bus = [(row.scenario if row.measure == SIDE_BY_SIDE else f"{row.measure}, {row.scenario}",
            row.measure == SIDE_BY_SIDE, found) for row in rows
           if row.part == "bus" and row.node == BUS_ON
           and (found := ratio(rows, row, BUS_OFF)) is not None]
    if bus:
        # The verdict is the side-by-side figures': one node at a time, the machine's speed
        # moves the ratios by tens of percent (round trips, which the bus does not touch,
        # included).
        side = [(scenario, r) for scenario, together, r in bus if together]
        alone = [(scenario, r) for scenario, together, r in bus if not together]
        cells.append(["bus on, no other process interested: ≤ 10 % lower than bus off",
                      "side by side, work per CPU second: "
                      + "; ".join(f"{s}: **{r:.2f}x**" for s, r in side)
                      + ". One node at a time, throughput: "
                      + "; ".join(f"{s}: {r:.2f}x" for s, r in alone),
                      status([r for _, r in side], lambda r: r >= 0.9)])
    idle = results.idle
    if idle is not None and idle.phases.get("connect"):
        connect = idle.phases["connect"]
        cells.append([f"{idle.sessions:,} idle logged-in WebSocket sessions on one node",
                      f"{connect['sessions']:,} logged in ({idle.workers} workers, "
                      f"{idle.loaders} load processes), in {connect['seconds']:.1f} s",
                      "met" if connect["sessions"] == idle.sessions
                      and not connect["failed"] else "not met"])
        per = kb_per_session(idle)
        cells.append(["memory per session ≤ 15 KB (the workers' RSS growth / sessions)",
                      f"**{_num(per, '.1f')} KB**",
                      "met" if per is not None and per <= 15 else "not met"])
        pings = [float(p["max_ms"]) for p in idle.pings.values() if p.get("max_ms") is not None]
        storm = idle.phases.get("storm")
        if storm is not None:
            worst = idle.pings.get("storm", {}).get("max_ms")
            cells.append(["reconnect storm: all reconnect with their session ids",
                          f"{storm['sessions']:,} of {idle.sessions:,} in "
                          f"{storm['seconds']:.1f} s, {storm['resumed']:,} resumed",
                          "met" if storm["sessions"] == idle.sessions else "not met"])
            cells.append(["admin's `core ping` answered within 1 s throughout",
                          f"worst {_num(max(pings) if pings else None)} ms (storm: "
                          f"{_num(worst)} ms), {sum(p.get('late', 0) for p in idle.pings.values())}"
                          " pings later than 1 s",
                          "met" if pings and max(pings) <= PING_TARGET_MS else "not met"])
    return markdown_table(header, cells)


def failures(results: ClusterResults) -> list[tuple[str, str]]:
    found = [(f"cluster {r.part} {r.measure} {r.scenario} {r.node.label}", r.failure)
             for r in results.rows if r.failure]
    if results.idle is not None and results.idle.failure:
        found.append(("cluster idle sessions", results.idle.failure))
    return found


def _main() -> None:
    """`python bench/cluster.py` prints the help of bench/run.py's cluster section."""
    print(__doc__)
    print(f"run it with: {sys.executable} {BENCH_DIR / 'run.py'} --only cluster [--quick]")


if __name__ == "__main__":
    _main()
