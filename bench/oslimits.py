"""Process-level settings shared by the benchmark's processes (orchestrator, servers, load)."""

from __future__ import annotations

import os
import resource


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard limit and return it.

    The memory section holds 10,000 sockets in one process; the default soft limit
    (often 1024) would make connects fail with EMFILE long before that.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_plan() -> tuple[set[int] | None, set[int] | None]:
    """CPU sets for (server, load generator), or (None, None) when there is only one CPU.

    Pinning the two processes to different cores makes the figures repeatable: neither
    process can steal the other's core, and the scheduler cannot migrate them mid-run.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(pid, cpus)
