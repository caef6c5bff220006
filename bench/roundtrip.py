"""Section 1: request round trips, nkservice against bare echo servers of each transport.

All servers run at once (an idle server costs nothing) and the measurements are taken in
rounds that visit every (server, transport, scenario) in turn. Throughput on this kind of
machine drifts by tens of percent over minutes; interleaving puts the same drift into every
server's figures, and the ratio to the echo server is taken within each round.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from harness import LoadFailed, RunContext, median_sample
from servers import PICOWS_ECHO, TCP_ECHO, ServerFailed, ServerProcess, ServerSpec

# The echo server each transport's figures are divided by.
REFERENCE = {"tcp": TCP_ECHO, "ws": PICOWS_ECHO}


@dataclass(frozen=True)
class Scenario:
    name: str
    conns: int
    window: int


SCENARIOS = (
    Scenario("pipelined", conns=50, window=32),
    Scenario("one-at-a-time", conns=1, window=1),
)


@dataclass(frozen=True)
class Timing:
    warmup: float
    duration: float
    rounds: int


Server = TypeVar("Server")  # what the row measures: a ServerSpec here; section 8 a Node


@dataclass
class RoundtripRow(Generic[Server]):
    transport: str
    scenario: Scenario
    server: Server
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per round
    failure: str | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        return median_sample(self.samples, "rps", self.failure)


ServerRow = RoundtripRow[ServerSpec]  # section 1's rows: one server each


def run(ctx: RunContext, servers: list[ServerSpec], timing: Timing) -> list[ServerRow]:
    rows = [
        RoundtripRow(t, sc, spec) for spec in servers for t in spec.transports for sc in SCENARIOS
    ]
    with contextlib.ExitStack() as stack:
        running: dict[ServerSpec, ServerProcess] = {}
        for spec in servers:
            try:
                running[spec] = stack.enter_context(ctx.server(spec, "roundtrip"))
            except ServerFailed as exc:
                _fail_server(rows, spec, str(exc))
        for round_no in range(timing.rounds):
            for row in rows:
                if row.failure is not None:
                    continue
                try:
                    _measure(ctx, running[row.server], row, timing, round_no)
                except ServerFailed as exc:
                    _fail_server(rows, row.server, str(exc))
    return rows


def _fail_server(rows: list[ServerRow], spec: ServerSpec, why: str) -> None:
    for row in rows:
        if row.server == spec and row.failure is None:
            row.failure = why


def _measure(
    ctx: RunContext, server: ServerProcess, row: ServerRow, timing: Timing, round_no: int
) -> None:
    args = [
        "roundtrip",
        f"--transport={row.transport}",
        f"--port={server.ports[row.transport]}",
        f"--conns={row.scenario.conns}",
        f"--window={row.scenario.window}",
        f"--warmup={timing.warmup}",
        f"--duration={timing.duration}",
        f"--server-pid={server.pid}",
        "--phase-timeout=30",
    ]
    if row.server.is_echo:
        args.append("--echo")
    label = f"{row.server.name}-{row.transport}-{row.scenario.name}-{round_no + 1}"
    try:
        row.samples.append(ctx.run_load(args, label, timeout=timing.warmup + timing.duration + 60))
    except LoadFailed as exc:
        row.failure = str(exc)
    server.check_alive()  # a dead server fails all of its rows, not just this one


def ratio_to_reference(rows: list[ServerRow], row: ServerRow) -> float | None:
    """Median over rounds of this row's req/s divided by the reference echo's, same round."""
    ref_spec = REFERENCE[row.transport]
    for ref in rows:
        if (ref.server, ref.transport, ref.scenario) != (ref_spec, row.transport, row.scenario):
            continue
        if ref.failure or row.failure or not ref.samples or not row.samples:
            return None
        pairs = zip(row.samples, ref.samples, strict=False)
        ratios: list[float] = [mine["rps"] / theirs["rps"] for mine, theirs in pairs]
        return statistics.median(ratios)
    return None
