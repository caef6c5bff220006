"""The load generator, run as its own process (one core) by bench/run.py.

    python bench/loadgen.py roundtrip --transport ws --port P --conns 50 --window 32 ...
    python bench/loadgen.py hold --transport ws --port P --conns 10000 ...

`roundtrip` connects, logs in, keeps `window` pings in flight per connection for a warm-up
and then a measured period, and prints one JSON object with the figures.
`hold` opens `conns` idle (logged-in) connections, prints one JSON line once they are all
up, and keeps them open until it reads a line (or EOF) on stdin, so that the orchestrator
can measure the server's memory in between.
Every phase has a deadline; the process always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from typing import Any

import orjson
import uvloop
from clients import Client, connect, login_message
from cpuwatch import CoreWatch, own_cpu_seconds, tree_cpu_seconds
from oslimits import raise_nofile_limit

HOST = "127.0.0.1"


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.flush()


async def _connect_many(args: argparse.Namespace) -> tuple[list[Client], list[str]]:
    """Open `args.conns` connections, at most `args.concurrency` at a time.

    The cap keeps the listener's accept/SYN backlog from overflowing (overflow shows up as
    1 s+ SYN retransmits, not as errors). Failures are collected, not raised.
    """
    gate = asyncio.Semaphore(args.concurrency)
    clients: list[Client] = []
    failures: list[str] = []
    login = login_message(args.user, args.password)

    async def one() -> None:
        async with gate:
            try:
                clients.append(
                    await asyncio.wait_for(
                        connect(args.transport, HOST, args.port, echo=args.echo, login=login),
                        args.connect_timeout,
                    )
                )
            except Exception as exc:  # any failure is counted and reported, not fatal here
                failures.append(f"{type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(one()) for _ in range(args.conns)]
    _done, pending = await asyncio.wait(tasks, timeout=args.phase_timeout)
    for task in pending:
        task.cancel()
    if pending:
        failures.append(f"{len(pending)} connections still pending after {args.phase_timeout} s")
    return clients, failures


async def roundtrip(args: argparse.Namespace) -> dict[str, Any]:
    clients, failures = await _connect_many(args)
    if failures:
        await _close_all(clients)
        raise SystemExit(
            f"loadgen: {len(failures)} of {args.conns} connections failed; first: {failures[0]}"
        )
    sessions = [client.session for client in clients]
    latencies: list[int] = []
    for session in sessions:
        session.start(args.window)
    await asyncio.sleep(args.warmup)

    if args.window == 1:
        for session in sessions:
            session.record_latency(latencies)
    replies0 = sum(s.replies for s in sessions)
    errors0 = sum(s.errors for s in sessions)
    server_cpu0 = tree_cpu_seconds(args.server_pid) if args.server_pid else 0.0
    cores = CoreWatch(args.server_pid)
    own_cpu0 = own_cpu_seconds()
    t0 = time.perf_counter()

    await asyncio.sleep(args.duration)

    elapsed = time.perf_counter() - t0
    replies = sum(s.replies for s in sessions) - replies0
    errors = sum(s.errors for s in sessions) - errors0
    server_cpu = (tree_cpu_seconds(args.server_pid) - server_cpu0) if args.server_pid else None
    machine = cores.finish()
    own_cpu = own_cpu_seconds() - own_cpu0
    dropped = sum(s.closed for s in sessions)
    for session in sessions:
        session.latencies_ns = None  # the measured period is over
    await _close_all(clients)
    latencies.sort()
    return {
        "requests": replies,
        "errors": errors,
        "seconds": elapsed,
        "rps": replies / elapsed,
        "p50_us": _percentile(latencies, 0.50) / 1000 if latencies else None,
        "p99_us": _percentile(latencies, 0.99) / 1000 if latencies else None,
        "server_cpu_pct": 100 * server_cpu / elapsed if server_cpu is not None else None,
        "client_cpu_pct": 100 * own_cpu / elapsed,
        **machine,
        "server_requests": sum(s.server_requests for s in sessions),
        "disconnected": dropped,
    }


async def _close_all(clients: list[Client]) -> None:
    await asyncio.gather(*(client.aclose() for client in clients))


def _percentile(sorted_values: list[int], q: float) -> float:
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


async def hold(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    clients, failures = await _connect_many(args)
    _emit(
        {
            "ready": len(clients),
            "failed": len(failures),
            "first_failure": failures[0] if failures else None,
            "connect_seconds": time.perf_counter() - t0,
        }
    )
    loop = asyncio.get_running_loop()
    # The orchestrator writes a line (or closes our stdin) once it has measured.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.phase_timeout)
    dropped = sum(client.session.closed for client in clients)
    await _close_all(clients)
    return {"dropped_while_held": dropped}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["roundtrip", "hold"])
    parser.add_argument("--transport", choices=["tcp", "ws"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--echo", action="store_true", help="the peer is a bare echo server (no login)"
    )
    parser.add_argument("--user", default="admin", help="who logs in (the global admin)")
    parser.add_argument("--password", default="admin")
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--window", type=int, default=32, help="requests in flight per connection")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=200, help="connects in progress at once")
    parser.add_argument(
        "--connect-timeout", type=float, default=10.0, help="per connection, login included"
    )
    parser.add_argument(
        "--phase-timeout", type=float, default=120.0, help="bound on connecting and on holding"
    )
    parser.add_argument(
        "--server-pid", type=int, default=0, help="report this process tree's CPU use"
    )
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    raise_nofile_limit()
    result = uvloop.run(roundtrip(args) if args.mode == "roundtrip" else hold(args))
    _emit(result)
    # Exit at once: in `hold` mode an executor thread may still be blocked reading stdin,
    # and a normal interpreter exit would wait for it.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
