"""CPU accounting for a measured period, shared by the load generators.

The figures: the CPU time the server process tree and the load generator itself used, as a
share of one core, and (CoreWatch) what the server's core and the whole machine did; for
the sections that run several processes of their own (Busy), what everyone else used.
"""

from __future__ import annotations

import resource
import time

import psutil


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (a server may run worker processes)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class CoreWatch:
    """What the server's core and the machine did over the measured period.

    The server's own CPU time misses work the kernel does for it elsewhere (network softirqs
    handed to ksoftirqd) and time the hypervisor takes from the VM (steal). Idle time on the
    server's core is the direct sign that the server was not the limit in that sample.
    """

    def __init__(self, server_pid: int) -> None:
        cores = psutil.Process(server_pid).cpu_affinity() if server_pid else []
        self._core = cores[0] if len(cores) == 1 else None
        self._start = psutil.cpu_times(percpu=True)

    def finish(self) -> dict[str, float | None]:
        end = psutil.cpu_times(percpu=True)
        steal = sum(e.steal - s.steal for s, e in zip(self._start, end, strict=True))
        total = sum(sum(e) - sum(s) for s, e in zip(self._start, end, strict=True))
        idle = None
        if self._core is not None:
            s, e = self._start[self._core], end[self._core]
            idle = 100 * ((e.idle + e.iowait) - (s.idle + s.iowait)) / (sum(e) - sum(s))
        return {"server_core_idle_pct": idle, "steal_pct": 100 * steal / total}


class Period:
    """Everything the tables report about CPU use over one measured period."""

    def __init__(self, server_pid: int) -> None:
        self._server_pid = server_pid
        self._server_cpu0 = tree_cpu_seconds(server_pid) if server_pid else 0.0
        self._cores = CoreWatch(server_pid)
        self._own_cpu0 = own_cpu_seconds()
        self._t0 = time.perf_counter()

    def finish(self) -> dict[str, float | None]:
        elapsed = time.perf_counter() - self._t0
        server_cpu = (
            tree_cpu_seconds(self._server_pid) - self._server_cpu0 if self._server_pid else None
        )
        own_cpu = own_cpu_seconds() - self._own_cpu0
        return {
            "server_cpu_pct": 100 * server_cpu / elapsed if server_cpu is not None else None,
            "client_cpu_pct": 100 * own_cpu / elapsed,
            **self._cores.finish(),
        }


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system)


def _waited_children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree(pid: int) -> float:
    try:
        return tree_cpu_seconds(pid)
    except psutil.Error:
        return 0.0


class Busy:
    """The CPU used over a period by the given process trees and, from the machine's
    total, by every other process (other work on the machine: others run tests on it, and
    that disturbs the figures). Load processes that end within the period count through
    RUSAGE_CHILDREN."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._t0 = time.perf_counter()
        self._machine0 = machine_busy_seconds()
        self._trees0 = {name: _tree(pid) for name, pid in pids.items()}
        self._children0 = _waited_children_cpu()
        self._own0 = own_cpu_seconds()

    def finish(self) -> dict[str, float]:
        """`<name>_cpu_pct` for each tree, `other_cpu_pct`, `machine_cpu_pct`: % of a core."""
        elapsed = time.perf_counter() - self._t0
        trees = {name: _tree(pid) - self._trees0[name] for name, pid in self._pids.items()}
        ours = (sum(trees.values()) + _waited_children_cpu() - self._children0
                + own_cpu_seconds() - self._own0)
        machine = machine_busy_seconds() - self._machine0
        figures = {f"{name}_cpu_pct": 100 * cpu / elapsed for name, cpu in trees.items()}
        figures["other_cpu_pct"] = max(0.0, 100 * (machine - ours) / elapsed)
        figures["machine_cpu_pct"] = 100 * machine / elapsed
        return figures
