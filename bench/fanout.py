"""Section 3: one send_event delivered to N subscribed WebSocket sessions, against a ceiling.

For each N, nkservice and the ceiling server (echo_servers.py fanout: a bare picows server
that writes one pre-encoded event frame to every subscriber per publish) run at the same
time, each with its own load-generator process holding N subscribers and one publisher.
Measurements alternate between the two in rounds (every other round in reverse order), and
the ratio is taken within each round, as in section 1. Two scenarios per round:

- one at a time: P publishes, each sent once all N subscribers had the previous one;
- pipelined: K publishes in one write, timed from that write to the last delivery.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from harness import LoadFailed, LoadSession, RunContext, median_sample
from servers import NKSERVICE, PICOWS_FANOUT, ServerFailed, ServerSpec

REFERENCE = PICOWS_FANOUT
# nkservice arms one deadline timer per subscriber with events unanswered; it fires up to
# request_timeout (5 s) after the last event. Waiting that long before the next measurement
# keeps those 10,000 timer callbacks out of the ceiling's figures.
QUIET_SECONDS = 5.5
SETUP_TIMEOUT = 180.0


@dataclass(frozen=True)
class FanoutTiming:
    rounds: int
    publishes: int  # one-at-a-time publishes per round (plus `warmup` not counted)
    warmup: int
    pipelined_deliveries: int  # K = this / N publishes back to back

    def events(self, receivers: int) -> int:
        return max(1, self.pipelined_deliveries // receivers)


@dataclass
class FanoutRow:
    receivers: int
    scenario: str  # "one-at-a-time" or "pipelined"
    server: ServerSpec
    label: str  # the scenario as the table shows it
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per round
    failure: str | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        return median_sample(self.samples, "dps", self.failure)


def run(
    ctx: RunContext, servers: list[ServerSpec], counts: list[int], timing: FanoutTiming
) -> list[FanoutRow]:
    rows: list[FanoutRow] = []
    for receivers in counts:
        rows += _run_count(ctx, servers, receivers, timing)
    return rows


def _run_count(
    ctx: RunContext, servers: list[ServerSpec], receivers: int, timing: FanoutTiming
) -> list[FanoutRow]:
    events = timing.events(receivers)
    labels = {
        "one-at-a-time": f"one at a time ({timing.publishes} publishes)",
        "pipelined": f"pipelined ({events} back to back)",
    }
    groups = {
        spec: [FanoutRow(receivers, name, spec, label) for name, label in labels.items()]
        for spec in servers
    }
    with contextlib.ExitStack() as stack:
        sessions: dict[ServerSpec, LoadSession] = {}
        servers_up = {}
        for spec, group in groups.items():
            try:
                server = stack.enter_context(ctx.server(spec, f"fanout-{receivers}"))
                args = [
                    "fanout",
                    f"--port={server.ports['ws']}",
                    f"--receivers={receivers}",
                    f"--server-pid={server.pid}",
                ]
                if spec.is_echo:
                    args.append("--bare")
                session = stack.enter_context(
                    ctx.load_session(args, f"{spec.name}-fanout-{receivers}")
                )
                ready = session.read(SETUP_TIMEOUT)
                if ready["failed"]:
                    raise LoadFailed(
                        f"{ready['failed']} of {receivers} subscribers failed to connect or"
                        f" subscribe; first: {ready['first_failure']}"
                    )
                sessions[spec], servers_up[spec] = session, server
            except (ServerFailed, LoadFailed) as exc:
                _fail(group, str(exc))
        # Every other round in reverse order (ABBA), so that a steady drift of the machine's
        # speed does not favour whichever server goes first.
        turns = [
            spec
            for round_no in range(timing.rounds)
            for spec in (list(groups) if round_no % 2 == 0 else list(groups)[::-1])
        ]
        for turn, spec in enumerate(turns):
            group = groups[spec]
            if spec not in sessions or group[0].failure:
                continue
            try:
                _measure(sessions[spec], group, timing, events)
                servers_up[spec].check_alive()
            except (ServerFailed, LoadFailed) as exc:
                _fail(group, str(exc))
            following = turns[turn + 1] if turn + 1 < len(turns) else None
            if spec == NKSERVICE and following not in (None, NKSERVICE):
                time.sleep(QUIET_SECONDS)
    return [row for group in groups.values() for row in group]


def _measure(
    session: LoadSession, group: list[FanoutRow], timing: FanoutTiming, events: int
) -> None:
    one, piped = group
    budget = 30.0 + 20.0 * (timing.publishes + timing.warmup)
    one.samples.append(
        session.command(
            {"op": "sequential", "publishes": timing.publishes, "warmup": timing.warmup}, budget
        )
    )
    piped.samples.append(session.command({"op": "pipelined", "events": events}, 60.0))


def _fail(group: list[FanoutRow], why: str) -> None:
    for row in group:
        if row.failure is None:
            row.failure = why


def ratio_to_reference(rows: list[FanoutRow], row: FanoutRow) -> float | None:
    """Median over rounds of this row's deliveries/s divided by the ceiling's, same round."""
    for ref in rows:
        if (ref.server, ref.receivers, ref.scenario) != (REFERENCE, row.receivers, row.scenario):
            continue
        if ref.failure or row.failure or not ref.samples or not row.samples:
            return None
        pairs = zip(row.samples, ref.samples, strict=False)
        ratios: list[float] = [mine["dps"] / theirs["dps"] for mine, theirs in pairs]
        return statistics.median(ratios)
    return None
