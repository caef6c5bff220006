"""nkservice benchmark: request round trips, memory per session, event fan-out,
subscription matching (against bare servers built on the same libraries), what callbacks
to external apps and Lua hooks cost, services created at run time, and clusters (workers,
the NATS bus, 100,000 idle sessions), and what counting metrics costs a round trip.

    .venv/bin/python bench/run.py [--quick]
                                  [--only roundtrip|memory|fanout|matching|callbacks|services
                                          |cluster|metrics ...]
                                  [--cluster-part workers|bus|idle ...]
                                  [--metrics-baseline REF]
                                  [--server NAME ...]

Every server runs in its own process and the load generator in another, each pinned to its
own core; this process only orchestrates. Results are printed as Markdown tables; server and
load-generator logs are kept in a temporary directory named at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import callbacks
import cluster
import fanout
import matching
import memory
import metrics
import orjson
import psutil
import report
import roundtrip
import services
from harness import RunContext
from oslimits import cpu_plan, raise_nofile_limit
from servers import (
    ALL_SERVERS,
    NKSERVICE,
    PICOWS_ECHO,
    PICOWS_FANOUT,
    WEBSOCKETS_ECHO,
    ServerSpec,
)

SECTIONS = ("roundtrip", "memory", "fanout", "matching", "callbacks", "services", "cluster",
            "metrics")
CLUSTER_PARTS = ("workers", "bus", "idle")
FULL_TIMING = roundtrip.Timing(warmup=1.0, duration=4.0, rounds=5)
QUICK_TIMING = roundtrip.Timing(warmup=0.5, duration=1.5, rounds=1)
FULL_COUNTS = [1000, 10000]
QUICK_COUNTS = [1000]
# The memory section is about WebSocket sessions; the tcp echo has no place there.
MEMORY_SERVERS = (PICOWS_ECHO, WEBSOCKETS_ECHO, NKSERVICE)
FANOUT_SERVERS = (PICOWS_FANOUT, NKSERVICE)  # the ceiling first in each round
FULL_FANOUT = fanout.FanoutTiming(rounds=5, publishes=20, warmup=2, pipelined_deliveries=100_000)
QUICK_FANOUT = fanout.FanoutTiming(rounds=1, publishes=10, warmup=2, pipelined_deliveries=50_000)
MATCHING_COUNTS = [1_000, 100_000]
FULL_MATCHING = matching.MatchingTiming(rounds=5, warmup=1.0, duration=3.0, window=32)
QUICK_MATCHING = matching.MatchingTiming(rounds=1, warmup=0.5, duration=1.5, window=32)
FULL_CALLBACKS = callbacks.CallbackTiming(warmup=1.0, duration=4.0, rounds=5)
QUICK_CALLBACKS = callbacks.CallbackTiming(warmup=0.5, duration=1.5, rounds=1)
FULL_SERVICES = services.ServicesTiming(churn_services=1000, window=100, churn_rounds=5,
                                        node_services=1000, start_rounds=5, store_saves=250)
QUICK_SERVICES = services.ServicesTiming(churn_services=200, window=100, churn_rounds=1,
                                         node_services=1000, start_rounds=1, store_saves=50)
_LOG_PROBLEM = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|Exception")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (under a minute)")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run this section (repeatable)"
    )
    parser.add_argument(
        "--cluster-part", action="append", choices=CLUSTER_PARTS,
        help="cluster section: run only this part (repeatable): workers (1 against 2), bus"
        " (on and off), idle (the idle sessions and the reconnect storm)",
    )
    parser.add_argument(
        "--metrics-baseline", metavar="REF", default="",
        help="metrics section: also run the code of this git ref (a temporary worktree),"
        " e.g. 58a93d7, the last commit before metrics",
    )
    parser.add_argument(
        "--server",
        action="append",
        choices=[spec.name for spec in (*ALL_SERVERS, PICOWS_FANOUT)],
        help="run only these servers (repeatable); ratios need the echo servers",
    )
    return parser.parse_args()


def _versions() -> str:
    names = ("uvloop", "picows", "websockets", "orjson", "nkservice")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _print_header(ctx: RunContext, nofile: int) -> None:
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    cpu_model = platform.processor() or platform.machine()
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    ram_gib = psutil.virtual_memory().total / 2**30
    system = f"{platform.system()} {platform.release()}"
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model}), {ram_gib:.0f} GiB RAM, {system}")
    print(f"python: {platform.python_version()}; {_versions()}")
    pinning = (
        f"server on CPU {sorted(ctx.server_cpus)}, load generator on CPU {sorted(ctx.load_cpus)}"
        if ctx.server_cpus and ctx.load_cpus
        else "no pinning (one CPU)"
    )
    print(f"pinning: {pinning}; open files limit: {nofile}")
    print(f"logs: {ctx.log_dir}")
    print(flush=True)


def _print_failures(failures: list[tuple[str, str]]) -> None:
    """Each distinct reason once, with what it failed (a dead server fails all its rows)."""
    by_reason: dict[str, list[str]] = {}
    for what, why in failures:
        by_reason.setdefault(why, []).append(what)
    for why, whats in by_reason.items():
        print(f"\nFAILED {', '.join(whats)}:\n{why}")


def _log_problems(log_dir: Path) -> list[str]:
    """Server logs that contain errors or tracebacks: worth a look even if the figures came out."""
    found = []
    for path in sorted(log_dir.glob("*.log")):
        hits = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if _LOG_PROBLEM.search(line)
        ]
        if hits:
            found.append(f"{path.name}: {len(hits)} error lines, first: {hits[0].strip()[:200]}")
    return found


def _fanout_section(
    ctx: RunContext, chosen: list[ServerSpec], *, quick: bool
) -> list[fanout.FanoutRow]:
    servers = [s for s in FANOUT_SERVERS if s in chosen]
    counts = QUICK_COUNTS if quick else FULL_COUNTS
    timing = QUICK_FANOUT if quick else FULL_FANOUT
    title = (
        f"median of {timing.rounds} interleaved rounds; vs ceiling: vs {PICOWS_FANOUT.name}"
        " in the same round"
    )
    print(f"## Event fan-out to N WebSocket subscribers ({title})\n", flush=True)
    rows = fanout.run(ctx, servers, counts, timing)
    print(report.fanout_table(rows), flush=True)
    _print_failures(
        [
            (f"{r.server.name} fanout {r.receivers} {r.scenario}", r.failure)
            for r in rows
            if r.failure
        ]
    )
    print()
    return rows


def _matching_section(
    ctx: RunContext, *, quick: bool
) -> tuple[list[matching.MatchingRow], list[matching.MicroRow]]:
    timing = QUICK_MATCHING if quick else FULL_MATCHING
    title = (
        f"nkservice, median of {timing.rounds} interleaved rounds,"
        f" each {timing.warmup:g} s warm-up + {timing.duration:g} s measured,"
        f" {timing.window} publishes in flight"
    )
    print(f"## Subscription matching: publishes/s by number of subscriptions ({title})\n")
    rows = matching.run(ctx, MATCHING_COUNTS, timing)
    print(report.matching_table(rows), flush=True)
    _print_failures(
        [(f"nkservice matching {r.subscriptions}", r.failure) for r in rows if r.failure]
    )
    print("\n`SubscriptionIndex.match` alone, in the orchestrator process (not pinned),")
    print("same subscriptions, best of 20 timings of 0.1 s, the counts taking turns:\n")
    micro_rows = matching.micro(MATCHING_COUNTS)
    print(report.micro_table(micro_rows), flush=True)
    print()
    return rows, micro_rows


def _callbacks_section(ctx: RunContext, *, quick: bool) -> list[callbacks.CallbackRow]:
    timing = QUICK_CALLBACKS if quick else FULL_CALLBACKS
    title = (
        f"nkservice on tcp, median of {timing.rounds} interleaved rounds,"
        f" each {timing.warmup:g} s warm-up + {timing.duration:g} s measured;"
        " vs: the row's baseline in the same round"
    )
    print(f"## Callbacks and Lua: logins and round trips through an app or a script ({title})\n",
          flush=True)
    rows = callbacks.run(ctx, timing)
    print(report.callbacks_table(rows), flush=True)
    _print_failures(
        [(f"nkservice callbacks {r.scenario.via}", r.failure) for r in rows if r.failure]
    )
    print()
    return rows


def _services_section(
    ctx: RunContext, *, quick: bool
) -> tuple[list[services.ChurnRow], list[services.NodeRow], list[services.StoreRow]]:
    timing = QUICK_SERVICES if quick else FULL_SERVICES
    churn_title = (
        f"nkservice, one admin connection on tcp, each service one listener on port 0;"
        f" median of {timing.churn_rounds} rounds"
    )
    print(f"## Services created and stopped over the API ({churn_title})\n", flush=True)
    churn_rows, node_rows = services.run(ctx, timing)
    print(services.churn_table(churn_rows), flush=True)
    _print_failures(
        [
            (f"nkservice {r.operation} {r.window} on {r.place}", r.failure)
            for r in churn_rows
            if r.failure
        ]
    )
    node_title = (
        f"each one tcp listener; start: launch to `node started`, median of"
        f" {timing.start_rounds} starts; VmRSS after {services.SETTLE_SECONDS:g} s of settling"
    )
    print(f"\n## A node with {timing.node_services:,} services ({node_title})\n")
    print(services.node_table(node_rows), flush=True)
    _print_failures([(f"nkservice node {r.how}", r.failure) for r in node_rows if r.failure])
    print("\n`FileServiceStore.save` / `delete` alone, in the orchestrator process (not pinned),")
    print("one at a time, with its fsyncs and with os.fsync made a no-op, the set-ups taking")
    print("turns:\n")
    store_rows = services.store_micro(timing.store_saves)
    print(services.store_table(store_rows), flush=True)
    print()
    return churn_rows, node_rows, store_rows


def _cluster_section(
    ctx: RunContext, *, quick: bool, parts: tuple[str, ...]
) -> cluster.ClusterResults:
    timing = cluster.QUICK if quick else cluster.FULL
    results = cluster.ClusterResults()
    rows_parts = {
        "workers": (
            "Workers: round trips and fan-out, 1 worker against 2 (median of"
            f" {timing.rounds} interleaved rounds; round trips each {timing.warmup:g} s warm-up"
            f" + {timing.duration:g} s measured; 1 worker pinned (load generator on the other"
            " core), 2 workers and their load generator unpinned)",
            cluster.run_workers, cluster.workers_table),
        "bus": (
            "The cluster bus on a one-worker node, on and off (one worker on CPU 0 with the"
            " NATS server, load generator on CPU 1; median of"
            f" {timing.rounds} interleaved rounds)",
            cluster.run_bus, cluster.bus_table),
    }
    for part, (heading, run_part, table) in rows_parts.items():
        if part in parts:
            print(f"## {heading}\n", flush=True)
            results.rows += run_part(ctx, timing)
            print(table([r for r in results.rows if r.part == part]), flush=True)
            print()
    if "idle" in parts:
        title = (
            f"{timing.idle_sessions:,} sessions, {timing.idle_workers} workers, nothing pinned;"
            f" admin `core ping` to every worker every 50 ms"
        )
        print(f"## Idle WebSocket sessions on one node, and a reconnect storm ({title})\n",
              flush=True)
        results.idle = cluster.run_idle(ctx, timing)
        print(cluster.idle_table(results.idle), flush=True)
        print()
        print(cluster.memory_table(results.idle), flush=True)
        print(f"\n(the idle part took {results.idle.wall_seconds:.0f} s)\n")
    print("### Cluster targets\n")
    print(cluster.targets_table(results), flush=True)
    _print_failures(cluster.failures(results))
    print()
    return results


def _metrics_section(ctx: RunContext, *, quick: bool, ref: str) -> metrics.MetricsResults:
    timing = metrics.QUICK if quick else metrics.FULL
    title = (
        f"nkservice, metrics on against off{f' and the code at {ref}' if ref else ''};"
        f" median of {timing.rounds} rounds, the order reversed every other round, each"
        f" {timing.warmup:g} s warm-up + {timing.duration:g} s measured; vs off: the ratio"
        " in the same round, median (range)"
    )
    print(f"## What metrics cost a round trip ({title})\n", flush=True)
    results = metrics.run(ctx, timing, ref)
    print(metrics.table(results), flush=True)
    print()
    print(metrics.counted_lines(results))
    print()
    print(metrics.targets(results))
    print()
    print(metrics.verdict(results), flush=True)
    _print_failures(metrics.failures(results))
    print()
    return results


def main() -> int:
    args = _parse_args()
    nofile = raise_nofile_limit()  # inherited by the servers and the load generator
    server_cpus, load_cpus = cpu_plan()
    ctx = RunContext(Path(tempfile.mkdtemp(prefix="nkservice-bench-")), server_cpus, load_cpus)
    chosen: list[ServerSpec] = [
        s for s in (*ALL_SERVERS, PICOWS_FANOUT) if not args.server or s.name in args.server
    ]
    sections = args.only or list(SECTIONS)
    _print_header(ctx, nofile)
    failed = False
    rows: list[roundtrip.ServerRow] = []
    mem_rows: list[memory.MemoryRow] = []
    fan_rows: list[fanout.FanoutRow] = []
    match_rows: list[matching.MatchingRow] = []
    micro_rows: list[matching.MicroRow] = []
    callback_rows: list[callbacks.CallbackRow] = []
    churn_rows: list[services.ChurnRow] = []
    node_rows: list[services.NodeRow] = []
    store_rows: list[services.StoreRow] = []
    cluster_results = cluster.ClusterResults()
    metrics_results = metrics.MetricsResults()

    if "roundtrip" in sections:
        timing = QUICK_TIMING if args.quick else FULL_TIMING
        title = (
            f"median of {timing.rounds} interleaved rounds,"
            f" each {timing.warmup:g} s warm-up + {timing.duration:g} s measured"
        )
        print(f"## Request round trips ({title})\n", flush=True)
        rows = roundtrip.run(ctx, [s for s in chosen if s in ALL_SERVERS], timing)
        print(report.roundtrip_table(rows), flush=True)
        failures = [
            (f"{r.server.name} {r.transport} {r.scenario.name}", r.failure)
            for r in rows
            if r.failure
        ]
        _print_failures(failures)
        failed |= bool(failures)
        print()

    if "memory" in sections:
        servers = [s for s in chosen if s in MEMORY_SERVERS]
        counts = QUICK_COUNTS if args.quick else FULL_COUNTS
        title = f"RSS read after {memory.SETTLE_SECONDS:g} s of settling"
        print(f"## Memory per idle WebSocket connection ({title})\n", flush=True)
        mem_rows = memory.run(ctx, servers, counts)
        print(report.memory_table(mem_rows), flush=True)
        mem_failures = [
            (f"{r.server.name} memory {r.sessions}", r.failure) for r in mem_rows if r.failure
        ]
        _print_failures(mem_failures)
        failed |= bool(mem_failures)
        print()

    if "fanout" in sections:
        fan_rows = _fanout_section(ctx, chosen, quick=args.quick)
        failed |= any(r.failure for r in fan_rows)

    if "matching" in sections and NKSERVICE in chosen:
        match_rows, micro_rows = _matching_section(ctx, quick=args.quick)
        failed |= any(r.failure for r in match_rows)

    if "callbacks" in sections and NKSERVICE in chosen:
        callback_rows = _callbacks_section(ctx, quick=args.quick)
        failed |= any(r.failure for r in callback_rows)

    if "services" in sections and NKSERVICE in chosen:
        churn_rows, node_rows, store_rows = _services_section(ctx, quick=args.quick)
        failed |= any(r.failure for r in (*churn_rows, *node_rows))

    if "cluster" in sections and NKSERVICE in chosen:
        parts = tuple(args.cluster_part or CLUSTER_PARTS)
        cluster_results = _cluster_section(ctx, quick=args.quick, parts=parts)
        failed |= bool(cluster.failures(cluster_results))

    if "metrics" in sections and NKSERVICE in chosen:
        metrics_results = _metrics_section(ctx, quick=args.quick, ref=args.metrics_baseline)
        failed |= bool(metrics.failures(metrics_results))

    # Every sample of every round, for a closer look than the medians in the tables.
    results = {
        "roundtrip": rows,
        "memory": mem_rows,
        "fanout": fan_rows,
        "matching": match_rows,
        "match_micro": micro_rows,
        "callbacks": callback_rows,
        "services_churn": churn_rows,
        "services_node": node_rows,
        "services_store": store_rows,
        "cluster": cluster_results,
        "metrics": metrics_results,
    }
    (ctx.log_dir / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    problems = _log_problems(ctx.log_dir)
    if problems:
        print("## Errors found in logs\n")
        print("\n".join(f"- {p}" for p in problems))
    print(f"\nlogs and raw results kept in {ctx.log_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
