"""Section 4: does the cost of a publish grow with the number of subscriptions?

One nkservice server per count of subscriptions (1,000 and 100,000 in run.py), all running
at the same time. In each, MATCH_RECEIVERS sessions subscribe to bench/*/hit/* and the other
subscriptions are fillers spread over MATCH_FILLERS sessions, none of which matches the
published event (eventmsgs.filler_topic). One publisher per server keeps a window of
publishes in flight. The rounds alternate between the servers (every other round in reverse
order) and the ratio of each count to the smallest is taken within each round.

The section also times `SubscriptionIndex.match` in this (the orchestrator's) process with
the same subscriptions: the index's own cost, without the server around it.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import timeit
from dataclasses import dataclass, field
from typing import Any

from eventmsgs import HIT_EVENT, HIT_TOPIC, MATCH_FILLERS, MATCH_RECEIVERS, filler_topic, split
from harness import LoadFailed, LoadSession, RunContext, median_sample
from servers import NKSERVICE, ServerFailed

from nkservice.events.index import WILDCARD, SubscriptionIndex, Topic

SETUP_TIMEOUT = 180.0
SERVICE = "core"  # the bench config's only service: the admin's sessions live there


@dataclass(frozen=True)
class MatchingTiming:
    rounds: int
    warmup: float
    duration: float
    window: int


@dataclass
class MatchingRow:
    subscriptions: int
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per round
    setup: dict[str, Any] | None = None
    failure: str | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        return median_sample(self.samples, "pps", self.failure)


@dataclass
class MicroRow:
    subscriptions: int
    us_per_match: float
    matched: int


def run(ctx: RunContext, counts: list[int], timing: MatchingTiming) -> list[MatchingRow]:
    rows = [MatchingRow(count) for count in counts]
    with contextlib.ExitStack() as stack:
        sessions: dict[int, LoadSession] = {}
        for row in rows:
            try:
                server = stack.enter_context(ctx.server(NKSERVICE, f"matching-{row.subscriptions}"))
                args = [
                    "matching",
                    f"--port={server.ports['ws']}",
                    f"--subscriptions={row.subscriptions}",
                    f"--server-pid={server.pid}",
                ]
                session = stack.enter_context(
                    ctx.load_session(args, f"nkservice-matching-{row.subscriptions}")
                )
                row.setup = session.read(SETUP_TIMEOUT)
                if row.setup["failed"]:
                    raise LoadFailed(
                        f"{row.setup['failed']} sessions failed to connect or subscribe;"
                        f" first: {row.setup['first_failure']}"
                    )
                sessions[row.subscriptions] = session
                server.check_alive()
            except (ServerFailed, LoadFailed) as exc:
                row.failure = str(exc)
        command = {
            "op": "publish",
            "window": timing.window,
            "warmup": timing.warmup,
            "duration": timing.duration,
        }
        budget = timing.warmup + timing.duration + 60
        for round_no in range(timing.rounds):
            # Every other round in reverse order (ABBA): a drift favours neither count.
            for row in rows if round_no % 2 == 0 else rows[::-1]:
                if row.failure is not None:
                    continue
                try:
                    row.samples.append(sessions[row.subscriptions].command(command, budget))
                except LoadFailed as exc:
                    row.failure = str(exc)
    return rows


def ratio(rows: list[MatchingRow], row: MatchingRow) -> float | None:
    """Median over rounds of this row's publishes/s divided by the smallest count's."""
    base = min(rows, key=lambda r: r.subscriptions)
    if base.failure or row.failure or not base.samples or not row.samples:
        return None
    pairs = zip(row.samples, base.samples, strict=False)
    ratios: list[float] = [mine["pps"] / theirs["pps"] for mine, theirs in pairs]
    return statistics.median(ratios)


# -- the index alone -------------------------------------------------------------------------


def _topic(fields: dict[str, Any]) -> Topic:
    return Topic(
        SERVICE,
        fields["class"],
        fields.get("subclass", WILDCARD),
        fields.get("type", WILDCARD),
        fields.get("obj_id", WILDCARD),
    )


def _index(count: int) -> SubscriptionIndex[int]:
    """The section's subscriptions in an index of their own (integers stand for sessions)."""
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for receiver in range(MATCH_RECEIVERS):
        index.add(receiver, _topic(HIT_TOPIC))
    pieces = split(count - MATCH_RECEIVERS, MATCH_FILLERS)
    for session, piece in enumerate(pieces, MATCH_RECEIVERS):
        for i in piece:
            index.add(session, _topic(filler_topic(i)))
    return index


def micro(counts: list[int], *, runs: int = 20, seconds: float = 0.1) -> list[MicroRow]:
    """µs per `SubscriptionIndex.match` of the published event, for each count: the best of
    `runs` timings of about `seconds`, the counts taking turns (this VM's speed drifts)."""
    event = _topic(HIT_EVENT)
    indexes = [_index(count) for count in counts]
    timers = [timeit.Timer(functools.partial(index.match, event)) for index in indexes]
    number, took = timers[0].autorange()
    number = max(1, int(number * seconds / max(took, 1e-9)))
    best = [float("inf")] * len(counts)
    for _run in range(runs):
        for i, timer in enumerate(timers):
            best[i] = min(best[i], timer.timeit(number) / number)
    return [
        MicroRow(count, seconds_each * 1e6, len(index.match(event)))
        for count, seconds_each, index in zip(counts, best, indexes, strict=True)
    ]
