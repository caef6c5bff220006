"""Section 5: what a callback to an external app, or a Lua hook, costs the server.

One nkservice server (pinned to its core like the others) with, besides the core service,
two services on tcp: `demo` (a static user) and `demo_lua` (the same user, and a Lua
script whose `cmd` answers every request at once). They are two services because a
script's `cmd` sees every request of a non-core class before any `cmd` callback app would.
Each measurement is a fresh load-generator process (bench/callbackload.py) on the load
generator's core, apps included; rows are visited in turn in each round, every other round
in reverse order, and each row is compared with its baseline within the same round:

- logins: connect + login + FIN + the server's close, in 50 concurrent loops, decided by
  the static `users` table (the baseline), or by an app registered for the `login`
  callback (1 app, then 4 apps);
- round trips, 50 sessions x 32 in flight: `core`/`ping` (the baseline); a request of class
  `bench` answered by an app registered for the `cmd` callback; the same request answered
  by the Lua script.

**server µs each** = the server's CPU time over the measured period / the logins or round
trips in it; **µs added** = that, minus the baseline's in the same round (median and range
over the rounds). With the server's core fully busy in both rows it is the throughput
difference, 1e6/rate - 1e6/baseline rate; as CPU time it also holds when the core is not.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import LoadFailed, RunContext, median_sample
from servers import HOST, NKSERVICE, ServerFailed, ServerProcess, free_port, nkservice_config

LUA_SCRIPT = 'function cmd(req) return {result="ok"} end'
LOGIN_CONCURRENCY = 50
CONNS, WINDOW = 50, 32


@dataclass(frozen=True)
class CallbackTiming:
    warmup: float
    duration: float
    rounds: int


@dataclass(frozen=True)
class Scenario:
    key: str
    measure: str  # "logins" or "round trips"
    label: str  # the table's "scenario" column
    via: str  # what decides or answers
    mode: str  # callbackload.py mode
    service: str  # the service the users connect to
    apps: int = 0
    request: str = "ping"
    baseline: str | None = None  # the key of the row it is compared with
    window: int = WINDOW  # requests in flight per connection


_LOGIN_LABEL = f"connect+login+close, {LOGIN_CONCURRENCY} loops"
_RT_LABEL = f"pipelined ({CONNS}x{WINDOW})"
_RT1_LABEL = f"one at a time ({CONNS}x1)"
SCENARIOS = (
    Scenario("login-static", "logins", _LOGIN_LABEL, "static users", "login", "demo"),
    Scenario("login-app1", "logins", _LOGIN_LABEL, "login callback, 1 app", "login", "demo",
             apps=1, baseline="login-static"),
    Scenario("login-app4", "logins", _LOGIN_LABEL, "login callback, 4 apps", "login", "demo",
             apps=4, baseline="login-static"),
    Scenario("rt-ping", "round trips", _RT_LABEL, "core ping", "roundtrip", "demo"),
    Scenario("rt-app", "round trips", _RT_LABEL, "cmd callback, 1 app", "roundtrip", "demo",
             apps=1, request="bench", baseline="rt-ping"),
    Scenario("rt-lua", "round trips", _RT_LABEL, "Lua cmd hook (empty)", "roundtrip",
             "demo_lua", request="bench", baseline="rt-ping"),
    # Two hops cost most where each request waits for its answer before the next one.
    Scenario("rt1-ping", "round trips", _RT1_LABEL, "core ping", "roundtrip", "demo",
             window=1),
    Scenario("rt1-app", "round trips", _RT1_LABEL, "cmd callback, 1 app", "roundtrip", "demo",
             apps=1, request="bench", baseline="rt1-ping", window=1),
)


@dataclass
class CallbackRow:
    scenario: Scenario
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per round
    failure: str | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        return median_sample(self.samples, "rate", self.failure)


class CallbackServer(ServerProcess):
    """nkservice with the bench config of servers.py plus the `demo` and `demo_lua` services
    (their tcp ports are in `ports`, so the start waits for them too)."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(NKSERVICE, ctx.server_cpus, ctx.log_dir / "nkservice-callbacks.log")
        self.ports["demo"] = free_port()
        self.ports["demo_lua"] = free_port()

    def _command(self) -> list[str]:
        workdir = Path(self._workdir.name)
        config = nkservice_config(workdir, self.ports["ws"], self.ports["tcp"])
        common = (
            'users = { bench = "bench" }\n'
            "ping_interval = 0\n"
            "max_pending_requests = 100000\n"
        )
        with config.open("a") as out:
            out.write(
                f'\n[services.demo]\nlisten = ["tcp://{HOST}:{self.ports["demo"]}"]\n{common}'
                f'\n[services.demo_lua]\nlisten = ["tcp://{HOST}:{self.ports["demo_lua"]}"]\n'
                f"{common}script_code = '{LUA_SCRIPT}'\n"
            )
        return [sys.executable, "-m", "nkservice", "serve", "--config", str(config)]


def run(ctx: RunContext, timing: CallbackTiming) -> list[CallbackRow]:
    rows = [CallbackRow(scenario) for scenario in SCENARIOS]
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(CallbackServer(ctx))
        except ServerFailed as exc:
            for row in rows:
                row.failure = str(exc)
            return rows
        for round_no in range(timing.rounds):
            # Every other round in reverse order (ABBA): a drift favours no row.
            for row in rows if round_no % 2 == 0 else rows[::-1]:
                if row.failure is not None:
                    continue
                try:
                    row.samples.append(_measure(ctx, server, row.scenario, timing, round_no))
                except LoadFailed as exc:
                    row.failure = str(exc)
                try:
                    server.check_alive()  # a dead server fails every row, not just this one
                except ServerFailed as exc:
                    for other in rows:
                        other.failure = other.failure or str(exc)
    return rows


def _measure(ctx: RunContext, server: ServerProcess, scenario: Scenario,
             timing: CallbackTiming, round_no: int) -> dict[str, Any]:
    args = [
        scenario.mode,
        f"--port={server.ports[scenario.service]}",
        f"--core-port={server.ports['tcp']}",
        "--service=demo",
        f"--apps={scenario.apps}",
        f"--request={scenario.request}",
        f"--conns={LOGIN_CONCURRENCY if scenario.mode == 'login' else CONNS}",
        f"--window={scenario.window}",
        f"--warmup={timing.warmup}",
        f"--duration={timing.duration}",
        f"--server-pid={server.pid}",
        "--phase-timeout=30",
    ]
    load = ctx.start_load(args, f"callbacks-{scenario.key}-{round_no + 1}", "callbackload.py")
    timeout = timing.warmup + timing.duration + 90
    try:
        out, _ = load.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        load.abort()
        raise LoadFailed(f"load generator still running after {timeout:.0f} s; killed") from None
    return load.result(out)


def _paired(rows: list[CallbackRow], row: CallbackRow) -> list[tuple[float, float]]:
    """(this row's rate, its baseline's rate) per round."""
    base = next((r for r in rows if r.scenario.key == row.scenario.baseline), None)
    if base is None or base.failure or row.failure:
        return []
    return [(mine["rate"], theirs["rate"])
            for mine, theirs in zip(row.samples, base.samples, strict=False)]


def ratio(rows: list[CallbackRow], row: CallbackRow) -> float | None:
    """Median over rounds of this row's rate divided by its baseline's, same round."""
    pairs = _paired(rows, row)
    return statistics.median([mine / theirs for mine, theirs in pairs]) if pairs else None


def server_us(sample: dict[str, Any]) -> float | None:
    """The server's CPU time per login or request in that round, in µs."""
    cpu = sample.get("server_cpu_pct")
    if cpu is None or not sample["count"]:
        return None
    return float(cpu) / 100 * float(sample["seconds"]) * 1e6 / int(sample["count"])


def added_us(rows: list[CallbackRow], row: CallbackRow) -> tuple[float, float, float] | None:
    """The server CPU time added per login or request against the baseline, in µs: the
    median over rounds of (this row's server_us - the baseline's, same round), and the
    lowest and highest round. With the server's core fully busy in both rows this is
    1e6/rate - 1e6/baseline rate; measured as CPU time it also holds when it is not."""
    base = next((r for r in rows if r.scenario.key == row.scenario.baseline), None)
    if base is None or base.failure or row.failure:
        return None
    added = []
    for mine, theirs in zip(row.samples, base.samples, strict=False):
        mine_us, theirs_us = server_us(mine), server_us(theirs)
        if mine_us is not None and theirs_us is not None:
            added.append(mine_us - theirs_us)
    if not added:
        return None
    return statistics.median(added), min(added), max(added)


def in_flight(scenario: Scenario) -> int:
    """Logins or requests in progress at once."""
    return LOGIN_CONCURRENCY if scenario.mode == "login" else CONNS * scenario.window


def baseline_name(row: CallbackRow) -> str:
    for scenario in SCENARIOS:
        if scenario.key == row.scenario.baseline:
            return scenario.via
    return ""
