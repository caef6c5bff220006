"""Section 6: services created at run time, and a node with 1,000 of them.

Everything runs against a real `nkservice serve` process pinned to the server's core,
driven by this same file run as a load process (`python bench/services.py load --port P`,
pinned to the load generator's core): one tcp connection to the core service, logged in as
the global admin, that takes one JSON command a line on stdin and answers one JSON line.

- **Churn**: N services created over the API, each with one listener on
  `tcp://127.0.0.1:0` (the node binds a free port for each) and one static user, then
  stopped: first one request at a time, then `window` requests in flight (the node makes
  creates, updates and stops one at a time, so a window only queues them). Each create
  writes `<data_dir>/services/<name>.json` (a temporary file, fsync, rename, fsync of the
  directory) and each stop unlinks it (fsync of the directory). The same runs once with
  data_dir on the disk that holds the temporary directory and once on tmpfs (/dev/shm),
  where fsync returns at once: the difference between the two is the cost of the fsyncs.
- **A node with 1,000 services**: their definitions are written by creating them over the
  API on a node that is then stopped (SIGINT); the node is then started again on that
  data_dir, taking turns with a node whose data_dir is empty. **start s** runs from the
  launch of the process to the node's `node started` log line (every service listening;
  the timestamps of the log are in ms); **core s** to the core service's `listening on`
  line. After 1 s of settling, VmRSS (/proc/PID/status) is read with no client connected;
  only then does the load process check that list_services has every service and that
  every one of their ports accepts a connection. **KB/service** = (VmRSS with 1,000 -
  VmRSS with 0, medians over the rounds) / 1,000.
- **The store alone**: `FileServiceStore.save` and `delete` timed in the orchestrator
  process, on both filesystems, with the fsyncs and with os.fsync made a no-op.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import psutil
import uvloop
from harness import LoadFailed, LoadSession, RunContext, median_sample
from report import markdown_table
from servers import HOST, NKSERVICE, ServerFailed, ServerProcess

from nkservice.service.store import FileServiceStore

MB = 1024 * 1024
ADMIN = {"user": "admin", "password": "admin"}
SETTLE_SECONDS = 1.0
REQUEST_TIMEOUT = 120.0  # one answer (a window of 100 creates queues up to 100 of them)
COMMAND_TIMEOUT = 600.0  # one command of the load process (1,000 creates one at a time)
START_TIMEOUT = 180.0  # from launch to `node started`, 1,000 services
CONNECT_CONCURRENCY = 100  # connects at a time when checking every service's port
TMPFS = Path("/dev/shm")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass(frozen=True)
class ServicesTiming:
    churn_services: int  # created and stopped in each churn pass
    window: int  # requests in flight in the pipelined passes
    churn_rounds: int
    node_services: int  # the node that starts with this many stored services
    start_rounds: int  # starts of each node, taking turns
    store_saves: int  # saves (then deletes) per round of the store alone


@dataclass
class ChurnRow:
    place: str  # "disk" or "tmpfs"
    filesystem: str  # what data_dir was on, e.g. "ext4 on /dev/vda"
    operation: str  # "create" or "stop"
    window: int
    services: int
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per round
    failure: str | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        return median_sample(self.samples, "rate", self.failure)


@dataclass
class NodeRow:
    services: int
    how: str
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per start
    failure: str | None = None

    def median(self, key: str) -> float | None:
        values = [float(s[key]) for s in self.samples if s.get(key) is not None]
        return statistics.median(values) if values and not self.failure else None


# -- the server -----------------------------------------------------------------------------


class ServicesServer(ServerProcess):
    """nkservice with the bench's core service and a data_dir that outlives the process, so
    that a second process can start on what the first one stored."""

    def __init__(self, ctx: RunContext, label: str, data_dir: Path) -> None:
        super().__init__(NKSERVICE, ctx.server_cpus, ctx.log_dir / f"nkservice-{label}.log")
        self.data_dir = data_dir
        self.launched_at = 0.0  # time.time() just before the process is started

    def _command(self) -> list[str]:
        config = Path(self._workdir.name) / "nkservice.toml"
        # As servers.py, with the data_dir given: one worker (one process, one RSS),
        # no server pings, and a pipelined window is never refused.
        config.write_text(
            f"""[node]
data_dir = "{self.data_dir}"
workers = 1

[admin]
user = "{ADMIN["user"]}"
password = "{ADMIN["password"]}"

[core]
listen = ["ws://{HOST}:{self.ports["ws"]}/", "tcp://{HOST}:{self.ports["tcp"]}"]
ping_interval = 0
max_pending_requests = 100000
"""
        )
        self.launched_at = time.time()
        return [sys.executable, "-m", "nkservice", "serve", "--config", str(config)]

    def wait_started(self) -> dict[str, float]:
        """Seconds from the launch to the core's first `listening on` line and to
        `node started`, from the log's own timestamps."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            core = started = None
            for line in self.log_text().splitlines():
                if core is None and " service core listening on " in line:
                    core = _log_time(line)
                elif " node started" in line:
                    started = _log_time(line)
            if core is not None and started is not None:
                return {"core_s": core - self.launched_at, "start_s": started - self.launched_at}
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServerFailed(f"no `node started` in the log after {START_TIMEOUT:.0f} s"
                                   + self._log_tail())
            time.sleep(0.02)

    def vm_rss(self) -> int:
        """VmRSS of the server and its children, in bytes."""
        root = psutil.Process(self.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        root = psutil.Process(self.pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total


def _log_time(line: str) -> float:
    found = _LOG_TIME.match(line)
    if found is None:
        raise ServerFailed(f"a log line without a timestamp: {line[:200]}")
    return datetime.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def filesystem(path: Path) -> str:
    """The filesystem that holds `path`, e.g. `ext4 on /dev/vda`, from /proc/mounts."""
    best, found = "", "unknown filesystem"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, found = mount, f"{kind} on {device}"
    return found


def _stored(data_dir: Path) -> int:
    directory = data_dir / "services"
    return len(list(directory.glob("*.json"))) if directory.is_dir() else 0


# -- the orchestrator's side ----------------------------------------------------------------


def _load(ctx: RunContext, server: ServicesServer, label: str) -> LoadSession:
    load = LoadSession(ctx.start_load(["load", f"--port={server.ports['tcp']}"],
                                      label, "services.py"))
    load.read(30.0)  # connected and logged in
    return load


def run(ctx: RunContext, timing: ServicesTiming) -> tuple[list[ChurnRow], list[NodeRow]]:
    churn_rows: list[ChurnRow] = []
    places: list[tuple[str, Path | None]] = [("disk", None)]
    if TMPFS.is_dir():
        places.append(("tmpfs", TMPFS))
    for place, parent in places:
        churn_rows += _churn(ctx, timing, place, parent)
    return churn_rows, _nodes(ctx, timing)


def _churn(ctx: RunContext, timing: ServicesTiming, place: str,
           parent: Path | None) -> list[ChurnRow]:
    data_dir = Path(tempfile.mkdtemp(prefix="nkservice-bench-services-", dir=parent))
    fs = f"{filesystem(data_dir)} ({data_dir.parent})"
    rows = [ChurnRow(place, fs, operation, window, timing.churn_services)
            for window in (1, timing.window) for operation in ("create", "stop")]
    try:
        with ServicesServer(ctx, f"services-churn-{place}", data_dir) as server, \
                _load(ctx, server, f"services-churn-{place}") as load:
            for round_no in range(timing.churn_rounds):
                # Every other round the pipelined passes first: a drift favours neither.
                pairs = [rows[0:2], rows[2:4]]
                for create, stop in pairs if round_no % 2 == 0 else pairs[::-1]:
                    prefix = f"r{round_no}w{create.window}"
                    for row in (create, stop):
                        row.samples.append(_command(server, load, {
                            "op": row.operation, "prefix": prefix, "count": row.services,
                            "window": row.window}))
                        stored = _stored(data_dir)
                        expected = row.services if row.operation == "create" else 0
                        if stored != expected:
                            raise LoadFailed(f"{stored} definitions stored after the"
                                             f" {row.operation}s, {expected} expected")
    except (ServerFailed, LoadFailed) as exc:
        for row in rows:
            row.failure = row.failure or str(exc)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


def _command(server: ServicesServer, load: LoadSession, command: dict[str, Any]
             ) -> dict[str, Any]:
    """One command of the load process, with the server's CPU time over it."""
    cpu, wall = server.cpu_seconds(), time.monotonic()
    result = load.command(command, COMMAND_TIMEOUT)
    cpu, wall = server.cpu_seconds() - cpu, time.monotonic() - wall
    server.check_alive()
    result["server_cpu_pct"] = 100 * cpu / wall if wall > 0 else None
    if result["errors"]:
        raise LoadFailed(f"{result['errors']} of {result['count']} {command['op']}s answered"
                         f" with an error; first: {result['first_error']}")
    return result


def _nodes(ctx: RunContext, timing: ServicesTiming) -> list[NodeRow]:
    count = timing.node_services
    empty = NodeRow(0, "node start, empty data_dir")
    full = NodeRow(count, f"node start, {count:,} stored")
    by_api = NodeRow(count, "created over the API, same process")
    rows = [empty, full, by_api]
    stored_dir = Path(tempfile.mkdtemp(prefix="nkservice-bench-services-"))
    try:
        try:
            _populate(ctx, timing, stored_dir, by_api)
        except (ServerFailed, LoadFailed) as exc:
            for row in rows:
                row.failure = str(exc)
            return rows
        for round_no in range(timing.start_rounds):
            for row in (empty, full) if round_no % 2 == 0 else (full, empty):
                if row.failure:
                    continue
                data_dir = stored_dir if row is full else Path(
                    tempfile.mkdtemp(prefix="nkservice-bench-services-"))
                try:
                    row.samples.append(_start(ctx, row, data_dir, round_no))
                except (ServerFailed, LoadFailed) as exc:
                    row.failure = str(exc)
                finally:
                    if row is empty:
                        shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        shutil.rmtree(stored_dir, ignore_errors=True)
    return rows


def _populate(ctx: RunContext, timing: ServicesTiming, data_dir: Path, row: NodeRow) -> None:
    """Create the node's services over the API, then stop the node: they stay stored."""
    count = timing.node_services
    with ServicesServer(ctx, "services-populate", data_dir) as server, \
            _load(ctx, server, "services-populate") as load:
        server.wait_started()
        time.sleep(SETTLE_SECONDS)
        before = server.vm_rss()
        result = _command(server, load, {"op": "create", "prefix": "n", "count": count,
                                         "window": timing.window})
        time.sleep(SETTLE_SECONDS)
        after = server.vm_rss()
        row.samples.append({"rss_before": before, "rss": after, "rate": result["rate"],
                            "kb_per_service": (after - before) / 1024 / count})
    stored = _stored(data_dir)
    if stored != count:
        raise LoadFailed(f"{stored} definitions stored, {count} expected")


def _start(ctx: RunContext, row: NodeRow, data_dir: Path, round_no: int) -> dict[str, Any]:
    label = f"services-start-{row.services}-{round_no + 1}"
    with ServicesServer(ctx, label, data_dir) as server:
        sample: dict[str, Any] = dict(server.wait_started())
        time.sleep(SETTLE_SECONDS)
        sample["rss"] = server.vm_rss()  # before any client: the same for both nodes
        with _load(ctx, server, label) as load:
            check = load.command({"op": "check"}, COMMAND_TIMEOUT)
        server.check_alive()
    sample.update(check)
    if check["services"] != row.services + 1 or check["accepting"] != row.services:
        raise LoadFailed(f"list_services has {check['services']} services"
                         f" ({row.services + 1} expected), {check['accepting']} of their"
                         f" {check['ports']} ports accept; first failure:"
                         f" {check['first_failure']}")
    return sample


# -- the store alone, in this process --------------------------------------------------------


@dataclass
class StoreRow:
    filesystem: str
    fsync: bool  # False: os.fsync replaced by a no-op for the measurement
    operation: str  # "save" or "delete"
    count: int
    p50_us: float
    p99_us: float


def store_micro(count: int, rounds: int = 4) -> list[StoreRow]:
    """`FileServiceStore.save` and `delete` (what a create and a stop wait for), one at a
    time, in the orchestrator process (not pinned): on the disk of the temporary directory
    and on tmpfs, each with its fsyncs and with os.fsync made a no-op, so that the fsyncs'
    share is measured on the same disk. `rounds` rounds of `count` saves then deletes, the
    four set-ups taking turns (every other round in reverse order); the timings are pooled."""
    places: list[Path | None] = [None, TMPFS] if TMPFS.is_dir() else [None]
    setups = [(parent, fsync) for parent in places for fsync in (True, False)]
    timings: dict[tuple[Path | None, bool], tuple[list[float], list[float]]] = {
        setup: ([], []) for setup in setups}
    names: dict[Path | None, str] = {}
    for round_no in range(rounds):
        for parent, fsync in setups if round_no % 2 == 0 else setups[::-1]:
            directory = Path(tempfile.mkdtemp(prefix="nkservice-bench-store-", dir=parent))
            names[parent] = f"{filesystem(directory.parent)} ({directory.parent})"
            try:
                with contextlib.ExitStack() as stack:
                    if not fsync:
                        stack.enter_context(mock.patch("os.fsync", lambda fd: None))
                    saves, deletes = asyncio.run(_store_timings(directory / "services", count))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            timings[parent, fsync][0].extend(saves)
            timings[parent, fsync][1].extend(deletes)
    rows: list[StoreRow] = []
    for parent, fsync in setups:
        for operation, pooled in zip(("save", "delete"), timings[parent, fsync], strict=True):
            pooled.sort()
            rows.append(StoreRow(names[parent], fsync, operation, len(pooled),
                                 statistics.median(pooled) * 1e6,
                                 pooled[int(0.99 * (len(pooled) - 1))] * 1e6))
    return rows


async def _store_timings(directory: Path, count: int) -> tuple[list[float], list[float]]:
    store = FileServiceStore(directory)
    await store.load()  # makes the directory
    saves: list[float] = []
    deletes: list[float] = []
    for i in range(count):
        definition = {"name": f"m{i}", "listen": [f"tcp://{HOST}:0"], "users": {"u": "p"}}
        began = time.perf_counter()
        await store.save(f"m{i}", definition)
        saves.append(time.perf_counter() - began)
    for i in range(count):
        began = time.perf_counter()
        await store.delete(f"m{i}")
        deletes.append(time.perf_counter() - began)
    return saves, deletes


def store_table(rows: list[StoreRow]) -> str:
    header = ["data_dir on", "fsync", "operation", "times", "p50 µs", "p99 µs",
              "fsyncs' share of p50"]
    cells = []
    for row in rows:
        without = next((r for r in rows if not r.fsync and (r.filesystem, r.operation)
                        == (row.filesystem, row.operation)), None)
        share = (f"{row.p50_us - without.p50_us:+,.0f} µs" if row.fsync and without else "-")
        cells.append([row.filesystem, "yes" if row.fsync else "no-op", row.operation,
                      f"{row.count:,}", f"{row.p50_us:,.0f}", f"{row.p99_us:,.0f}", share])
    return markdown_table(header, cells)


# -- tables ---------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _first_line(text: str | None) -> str:
    return (text or "unknown").strip().splitlines()[0]


def churn_table(rows: list[ChurnRow]) -> str:
    header = ["data_dir on", "operation", "in flight", "services", "per second",
              "per second range", "p50 ms", "p99 ms", "p50 first / last 10% ms",
              "server CPU", "vs tmpfs", "notes"]
    cells = []
    for row in rows:
        first = [row.filesystem, row.operation, str(row.window), f"{row.services:,}"]
        res = row.result
        if res is None:
            cells.append([*first, *["-"] * 7, f"FAILED: {_first_line(row.failure)}"])
            continue
        rates = [sample["rate"] for sample in row.samples]
        # With a window, an answer's time is mostly its wait in the node's queue.
        tenths = (f"{res['first_tenth_p50_ms']:.2f} / {res['last_tenth_p50_ms']:.2f}"
                  if row.window == 1 else "-")
        tmpfs = next((r.result for r in rows if r.place == "tmpfs" and r.result
                      and (r.operation, r.window) == (row.operation, row.window)), None)
        notes = []
        if res["acks"]:
            notes.append(f"{res['acks']} acks")
        cells.append([
            *first,
            _num(res["rate"]),
            f"{_num(min(rates))}-{_num(max(rates))}",
            _num(res["p50_ms"], ".2f"),
            _num(res["p99_ms"], ".2f"),
            tenths,
            _num(res["server_cpu_pct"], ".0f") + "%",
            f"{res['rate'] / tmpfs['rate']:.2f}x" if tmpfs else "-",
            "; ".join(notes),
        ])
    return markdown_table(header, cells)


def node_table(rows: list[NodeRow]) -> str:
    header = ["services", "how", "start s", "start s range", "core s", "VmRSS MB",
              "RSS delta MB", "KB/service", "notes"]
    cells = []
    base = rows[0].median("rss") if rows else None
    for row in rows:
        first = [f"{row.services:,}", row.how]
        if row.failure or not row.samples:
            cells.append([*first, *["-"] * 6, f"FAILED: {_first_line(row.failure)}"])
            continue
        starts = [s["start_s"] for s in row.samples if "start_s" in s]
        rss = row.median("rss")
        if "rss_before" in row.samples[0]:  # created over the API: its own before and after
            before = row.samples[0]["rss_before"]
            delta: float | None = row.samples[0]["rss"] - before
            notes = [f"VmRSS before the creates: {before / MB:.1f} MB"]
        else:
            delta = rss - base if rss is not None and base is not None and row.services else None
            notes = []
            if row.services:
                notes.append(f"list_services: {row.samples[0]['services']:,};"
                             f" {row.samples[0]['accepting']:,} ports accept")
            if len(row.samples) > 1:
                notes.append(f"{len(row.samples)} starts")
        cells.append([
            *first,
            _num(row.median("start_s"), ".2f"),
            f"{min(starts):.2f}-{max(starts):.2f}" if starts else "-",
            _num(row.median("core_s"), ".2f"),
            _num(rss / MB if rss is not None else None, ".1f"),
            _num(delta / MB if delta is not None else None, ".1f"),
            _num(delta / 1024 / row.services if delta is not None and row.services else None,
                 ".1f"),
            "; ".join(notes),
        ])
    return markdown_table(header, cells)


# -- the load process (`python bench/services.py load --port P`) ----------------------------


class Admin:
    """One tcp connection to the core service, logged in as the global admin; requests by
    tid, any number in flight. Requests from the server are answered ok and acks counted."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_tid = 0
        self.acks = 0
        self._reading = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, port: int) -> Admin:
        # list_services with 1,000 services is a line of about 100 KB.
        reader, writer = await asyncio.open_connection(HOST, port, limit=16 * MB)
        admin = cls(reader, writer)
        answer = await admin.request("login", ADMIN)
        data = answer.get("data")
        if answer.get("result") != "ok" or not isinstance(data, dict) or "session_id" not in data:
            raise LoadFailed(f"login refused: {answer!r}")
        return admin

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                msg = orjson.loads(line)
                if "class" in msg and "cmd" in msg and "tid" in msg:
                    self._writer.write(orjson.dumps({"result": "ok", "tid": msg["tid"]}) + b"\n")
                elif "result" not in msg:
                    self.acks += 1
                else:
                    waiting = self._waiting.pop(msg.get("tid"), None)
                    if waiting is not None and not waiting.done():
                        waiting.set_result(msg)
        finally:
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(ConnectionError("the server closed the connection"))

    async def request(self, cmd: str, data: dict[str, Any]) -> dict[str, Any]:
        tid = self._next_tid
        self._next_tid += 1
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[tid] = answer
        self._writer.write(orjson.dumps({"class": "core", "cmd": cmd, "tid": tid, "data": data})
                           + b"\n")
        return await asyncio.wait_for(answer, REQUEST_TIMEOUT)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._reading.cancel()


async def _windowed(admin: Admin, requests: list[tuple[str, dict[str, Any]]],
                    window: int) -> dict[str, Any]:
    """Send the requests with `window` in flight (each answer sends the next one)."""
    latencies: list[float] = [0.0] * len(requests)  # in the order sent
    errors: list[dict[str, Any]] = []
    pending = iter(enumerate(requests))
    acks = admin.acks

    async def lane() -> None:
        for i, (cmd, data) in pending:  # the lanes share the iterator
            sent = time.perf_counter()
            answer = await admin.request(cmd, data)
            latencies[i] = time.perf_counter() - sent
            if answer.get("result") != "ok":
                errors.append(answer)

    began = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(window)))
    seconds = time.perf_counter() - began
    n = len(latencies)
    tenth = max(1, n // 10)
    ordered = sorted(latencies)
    return {
        "count": n,
        "seconds": seconds,
        "rate": n / seconds if seconds else 0.0,
        "p50_ms": _median_ms(latencies),
        "p99_ms": ordered[int(0.99 * (n - 1))] * 1e3 if n else None,
        "max_ms": ordered[-1] * 1e3 if n else None,
        # Does a create or stop cost more when the node has more services?
        "first_tenth_p50_ms": _median_ms(latencies[:tenth]),
        "last_tenth_p50_ms": _median_ms(latencies[-tenth:]),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "acks": admin.acks - acks,
    }


def _median_ms(latencies: list[float]) -> float | None:
    return statistics.median(latencies) * 1e3 if latencies else None


async def _check(admin: Admin) -> dict[str, Any]:
    """list_services, and a connect to every port it lists (besides the core's)."""
    answer = await admin.request("list_services", {})
    if answer.get("result") != "ok":
        raise LoadFailed(f"list_services answered {answer!r}")
    listing = answer["data"]
    ports = sorted({int(url.rsplit(":", 1)[1].split("/")[0])
                    for entry in listing if entry["name"] != "core" for url in entry["listen"]})
    failures: list[str] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def probe(port: int) -> None:
        async with gate:
            try:
                _reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
            except (OSError, TimeoutError) as exc:
                failures.append(f"port {port}: {exc!r}")
                return
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.gather(*(probe(port) for port in ports))
    return {"services": len(listing), "ports": len(ports), "accepting": len(ports) - len(failures),
            "first_failure": failures[0] if failures else None}


async def _serve_commands(port: int) -> None:
    admin = await Admin.connect(port)
    out = sys.stdout.buffer
    out.write(orjson.dumps({"ready": True}) + b"\n")
    out.flush()
    try:
        while line := await asyncio.to_thread(sys.stdin.buffer.readline):
            command = orjson.loads(line)
            op = command["op"]
            if op == "close":
                break
            try:
                if op in ("create", "stop"):
                    names = [f"{command['prefix']}_s{i:04d}" for i in range(command["count"])]
                    if op == "create":
                        requests = [("create_service", {"name": name,
                                                        "listen": [f"tcp://{HOST}:0"],
                                                        "users": {"u": "p"}})
                                    for name in names]
                    else:
                        requests = [("stop_service", {"name": name}) for name in names]
                    reply = await _windowed(admin, requests, command["window"])
                elif op == "check":
                    reply = await _check(admin)
                else:
                    reply = {"error": f"unknown op {op!r}"}
            except (LoadFailed, OSError, TimeoutError) as exc:
                reply = {"error": f"{op}: {exc!r}"}
            out.write(orjson.dumps(reply) + b"\n")
            out.flush()
    finally:
        await admin.close()


def _load_main() -> int:
    parser = argparse.ArgumentParser(description="the load process of bench/services.py")
    parser.add_argument("mode", choices=["load"])
    parser.add_argument("--port", type=int, required=True, help="the core service's tcp port")
    args = parser.parse_args()
    try:
        uvloop.run(_serve_commands(args.port))
    except (OSError, LoadFailed, TimeoutError) as exc:
        print(f"services load: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_load_main())
