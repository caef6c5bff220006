"""Section 2: server memory per idle WebSocket connection (per logged-in session for nkservice)."""

from __future__ import annotations

import select
import time
from dataclasses import dataclass
from typing import Any

import orjson
from harness import LoadFailed, LoadProcess, RunContext
from servers import ServerFailed, ServerProcess, ServerSpec

# Let the allocator and any deferred work (e.g. per-session timers) settle before reading RSS.
SETTLE_SECONDS = 1.0
CONNECT_CONCURRENCY = 200
# 10,000 connects at 200 at a time take a few seconds; this bounds a stuck server.
PHASE_TIMEOUT = 120.0


@dataclass
class MemoryRow:
    server: ServerSpec
    sessions: int
    rss_before: int = 0
    rss_after: int = 0
    connected: int = 0
    connect_seconds: float = 0.0
    dropped: int = 0
    failure: str | None = None

    @property
    def kb_per_session(self) -> float | None:
        # Still meaningful when some connects failed: it is divided by those that held.
        if not self.rss_after or not self.connected:
            return None
        return (self.rss_after - self.rss_before) / 1024 / self.connected


def run(ctx: RunContext, servers: list[ServerSpec], counts: list[int]) -> list[MemoryRow]:
    rows: list[MemoryRow] = []
    for spec in servers:
        for count in counts:
            row = MemoryRow(spec, count)
            rows.append(row)
            try:
                # A fresh server per count: memory freed by earlier connections may stay in
                # the process (allocator arenas) and would hide the next run's growth.
                with ctx.server(spec, f"memory-{count}") as server:
                    _measure(ctx, server, row)
            except (ServerFailed, LoadFailed) as exc:
                row.failure = str(exc)
    return rows


def _measure(ctx: RunContext, server: ServerProcess, row: MemoryRow) -> None:
    time.sleep(SETTLE_SECONDS)
    row.rss_before = server.rss_bytes()
    args = [
        "hold",
        "--transport=ws",
        f"--port={server.ports['ws']}",
        f"--conns={row.sessions}",
        f"--concurrency={CONNECT_CONCURRENCY}",
        f"--phase-timeout={PHASE_TIMEOUT}",
    ]
    if row.server.is_echo:
        args.append("--echo")
    load = ctx.start_load(args, f"{row.server.name}-memory-{row.sessions}")
    try:
        ready = _read_ready(load)
        row.connected = ready["ready"]
        row.connect_seconds = ready["connect_seconds"]
        if ready["failed"]:
            row.failure = (
                f"{ready['failed']} of {row.sessions} connections failed;"
                f" first: {ready['first_failure']}"
            )
        time.sleep(SETTLE_SECONDS)
        server.check_alive()
        row.rss_after = server.rss_bytes()
        out, _ = load.proc.communicate(b"close\n", timeout=30)
    except BaseException:
        load.abort()
        raise
    row.dropped = load.result(out)["dropped_while_held"]


def _read_ready(load: LoadProcess) -> dict[str, Any]:
    """Wait (bounded) for the load generator's line saying all connections are up."""
    stdout = load.proc.stdout
    assert stdout is not None
    readable, _, _ = select.select([stdout], [], [], PHASE_TIMEOUT + 30)
    line = stdout.readline() if readable else b""
    if not line:
        load.abort()
        raise load.failure()
    ready: dict[str, Any] = orjson.loads(line)
    return ready
