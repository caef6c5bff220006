"""The load generator of the event sections, run as its own process (one core) by bench/run.py.

    python bench/eventload.py fanout --port P --receivers N [--bare] --server-pid PID
    python bench/eventload.py matching --port P --subscriptions S --server-pid PID

Both set up their connections (log in, subscribe), print one JSON line saying how that
went, then run the commands that the orchestrator writes on stdin, one JSON object a line,
and answer each with one JSON line ({"error": ...} when it failed):

- fanout: N subscribers of class `bench` and one publisher (not subscribed).
  {"op": "sequential", "publishes": P, "warmup": W}: publish one event at a time, each once
  all N subscribers got the previous one (and the publisher its ok);
  {"op": "pipelined", "events": K}: K publishes in one write, timed to the last delivery.
  `--bare`: the peer is the ceiling server (echo_servers.py fanout): no login, no subscribe,
  the publisher connects to /pub.
- matching: RECEIVERS subscribers of `bench/*/hit/*`, the remaining subscriptions spread
  over FILLERS sessions (eventmsgs.filler_topic, none matching), one publisher.
  {"op": "publish", "window": 32, "warmup": 1, "duration": 3}: a window of publishes in flight
  (each ok sends the next) for the duration.
- {"op": "close"} (or EOF) ends the process.

Every phase has a deadline; the process always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable
from typing import Any

import orjson
import uvloop
from cpuwatch import Period
from eventclients import EventClient, Tally, open_client
from eventmsgs import (
    FANOUT_TOPIC,
    HIT_TOPIC,
    MATCH_FILLERS,
    MATCH_RECEIVERS,
    PAD,
    PUBLISH,
    PUBLISH_HIT,
    SUBSCRIBE,
    filler_topic,
    split,
)
from oslimits import raise_nofile_limit

CONNECT_CONCURRENCY = 200
# The longest the orchestrator may leave us waiting for a command (it measures the other
# servers in between); then the process ends by itself.
COMMAND_WAIT = 300.0


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.flush()


async def _open_all(jobs: list[Awaitable[EventClient]], phase_timeout: float) -> tuple[
    list[EventClient], list[str]
]:
    """Run the connects, at most CONNECT_CONCURRENCY at a time; failures are collected.

    The cap keeps the listener's accept backlog from overflowing (overflow shows up as 1 s+
    SYN retransmits, not as errors)."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    clients: list[EventClient] = []
    failures: list[str] = []

    async def one(job: Awaitable[EventClient]) -> None:
        async with gate:
            try:
                clients.append(await job)
            except Exception as exc:  # counted and reported, not fatal here
                failures.append(f"{type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(one(job)) for job in jobs]
    _done, pending = await asyncio.wait(tasks, timeout=phase_timeout)
    for task in pending:
        task.cancel()
    if pending:
        failures.append(f"{len(pending)} connections still pending after {phase_timeout} s")
    return clients, failures


def _subscribe_requests(topics: list[dict[str, Any]]) -> list[bytes]:
    return [SUBSCRIBE % (tid, orjson.dumps(topic)) for tid, topic in enumerate(topics, 1)]


class Load:
    """The connections of one run and what every command reports besides its figures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tally = Tally()
        self.receivers: list[EventClient] = []
        self.others: list[EventClient] = []  # fillers
        self.publisher: EventClient | None = None
        self.seq = 0
        self.expected_events = 0

    def connect(self, path: str, subscribe: list[bytes]) -> Awaitable[EventClient]:
        args = self.args
        return open_client(
            args.port,
            self.tally,
            path=path,
            login=not args.bare,
            subscribe=[] if args.bare else subscribe,
            timeout=args.connect_timeout,
        )

    def health(self) -> dict[str, Any]:
        """Counters that should all be zero (and events as expected) after a command."""
        everyone = [*self.receivers, *self.others]
        pub = self.publisher
        return {
            "disconnected": sum(c.closed for c in everyone) + (pub is not None and pub.closed),
            "error_answers": pub.errors if pub is not None else 0,
            "first_error": pub.first_error if pub is not None else None,
            "server_requests": sum(c.server_requests for c in everyone),
            "unexpected_events": self.tally.count - self.expected_events,
        }

    def publish_message(self, template: bytes) -> bytes:
        assert self.publisher is not None
        self.seq += 1
        return template % (self.seq, self.seq, PAD)

    async def aclose(self) -> None:
        everyone = [*self.receivers, *self.others]
        if self.publisher is not None:
            everyone.append(self.publisher)
        await asyncio.gather(*(c.aclose() for c in everyone))


# -- fan-out -------------------------------------------------------------------------------


async def fanout_setup(load: Load) -> dict[str, Any]:
    args = load.args
    subscribe = _subscribe_requests([FANOUT_TOPIC])
    jobs = [load.connect("/", subscribe) for _ in range(args.receivers)]
    load.receivers, failures = await _open_all(jobs, args.phase_timeout)
    if not failures:
        # The ceiling server tells its publisher by the path; nkservice serves only "/".
        publisher_path = "/pub" if args.bare else "/"
        load.publisher, pub_failures = await _single(load.connect(publisher_path, []))
        failures += pub_failures
    return {"receivers": len(load.receivers), "failed": len(failures),
            "first_failure": failures[0] if failures else None}


async def _single(job: Awaitable[EventClient]) -> tuple[EventClient | None, list[str]]:
    try:
        return await job, []
    except Exception as exc:
        return None, [f"publisher: {type(exc).__name__}: {exc}"]


async def _publish_and_wait(load: Load, messages: list[bytes], timeout: float) -> int:
    """Send the publishes in one write; ns from the write to the last delivery."""
    publisher = load.publisher
    assert publisher is not None
    deliveries = len(load.receivers) * len(messages)
    load.expected_events += deliveries
    delivered = load.tally.expect(deliveries)
    t0 = time.perf_counter_ns()
    publisher.request(messages)
    try:
        await asyncio.wait_for(delivered, timeout)
    except TimeoutError:
        missing = load.tally.target - load.tally.count
        raise RuntimeError(
            f"{missing} of {deliveries} deliveries missing after {timeout} s") from None
    await publisher.wait_idle(timeout)
    return load.tally.reached_ns - t0


async def sequential(load: Load, publishes: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        await _publish_and_wait(load, [load.publish_message(PUBLISH)], load.args.op_timeout)
    period = Period(load.args.server_pid)
    t0 = time.perf_counter()
    times_ns = [
        await _publish_and_wait(load, [load.publish_message(PUBLISH)], load.args.op_timeout)
        for _ in range(publishes)
    ]
    elapsed = time.perf_counter() - t0
    figures = period.finish()
    deliveries = publishes * len(load.receivers)
    return {
        "deliveries": deliveries,
        "seconds": elapsed,
        "dps": deliveries / elapsed,
        "last_p50_ms": statistics.median(times_ns) / 1e6,
        "last_max_ms": max(times_ns) / 1e6,
        **figures,
        **load.health(),
    }


async def pipelined(load: Load, events: int) -> dict[str, Any]:
    period = Period(load.args.server_pid)
    messages = [load.publish_message(PUBLISH) for _ in range(events)]
    to_last = await _publish_and_wait(load, messages, load.args.op_timeout)
    figures = period.finish()
    deliveries = events * len(load.receivers)
    return {
        "deliveries": deliveries,
        "seconds": to_last / 1e9,
        "dps": deliveries / (to_last / 1e9),
        "last_p50_ms": to_last / 1e6,
        "last_max_ms": to_last / 1e6,
        **figures,
        **load.health(),
    }


# -- matching --------------------------------------------------------------------------------


async def matching_setup(load: Load) -> dict[str, Any]:
    args = load.args
    t0 = time.perf_counter()
    hit = _subscribe_requests([HIT_TOPIC])
    jobs = [load.connect("/", hit) for _ in range(MATCH_RECEIVERS)]
    load.receivers, failures = await _open_all(jobs, args.phase_timeout)
    fillers = split(args.subscriptions - MATCH_RECEIVERS, MATCH_FILLERS)
    jobs = [
        load.connect("/", _subscribe_requests([filler_topic(i) for i in piece]))
        for piece in fillers
    ]
    load.others, more_failures = await _open_all(jobs, args.phase_timeout)
    failures += more_failures
    if not failures:
        load.publisher, pub_failures = await _single(load.connect("/", []))
        failures += pub_failures
    return {"receivers": len(load.receivers), "fillers": len(load.others),
            "subscriptions": args.subscriptions, "setup_seconds": time.perf_counter() - t0,
            "failed": len(failures), "first_failure": failures[0] if failures else None}


async def publish_window(load: Load, window: int, warmup: float, duration: float) -> dict[str, Any]:
    publisher = load.publisher
    assert publisher is not None
    running = True

    def following() -> bytes | None:
        return load.publish_message(PUBLISH_HIT) if running else None

    publisher.on_answer = following
    ok0 = publisher.ok
    publisher.request([load.publish_message(PUBLISH_HIT) for _ in range(window)])
    await asyncio.sleep(warmup)
    period = Period(load.args.server_pid)
    ok1, events1 = publisher.ok, load.tally.count
    t0 = time.perf_counter()
    await asyncio.sleep(duration)
    ok2, events2 = publisher.ok, load.tally.count
    elapsed = time.perf_counter() - t0
    figures = period.finish()
    running = False
    await publisher.wait_idle(load.args.op_timeout)
    publisher.on_answer = None
    # Each publish reaches every receiver; wait (bounded) until the last ones arrived.
    load.expected_events += (publisher.ok - ok0) * len(load.receivers)
    if load.tally.count < load.expected_events:
        waiter = load.tally.expect(load.expected_events - load.tally.count)
        # Not there in time: reported as negative unexpected_events.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, load.args.op_timeout)
    return {
        "publishes": ok2 - ok1,
        "seconds": elapsed,
        "pps": (ok2 - ok1) / elapsed,
        "dps": (events2 - events1) / elapsed,
        **figures,
        **load.health(),
    }


# -- the command loop --------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> None:
    load = Load(args)
    setup = fanout_setup if args.mode == "fanout" else matching_setup
    t0 = time.perf_counter()
    ready = await setup(load)
    ready["setup_seconds"] = time.perf_counter() - t0
    _emit(ready)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), COMMAND_WAIT)
            except TimeoutError:
                break
            command = orjson.loads(line) if line.strip() else {"op": "close"}
            if command["op"] == "close":
                break
            try:
                _emit(await _command(load, command))
            except Exception as exc:  # reported to the orchestrator, which fails the row
                _emit({"error": f"{type(exc).__name__}: {exc}", **load.health()})
    finally:
        await load.aclose()
    _emit({"closed": True, **load.health()})


async def _command(load: Load, command: dict[str, Any]) -> dict[str, Any]:
    op = command["op"]
    if op == "sequential":
        return await sequential(load, command["publishes"], command["warmup"])
    if op == "pipelined":
        return await pipelined(load, command["events"])
    if op == "publish":
        return await publish_window(
            load, command["window"], command["warmup"], command["duration"])
    raise ValueError(f"unknown op {op!r}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["fanout", "matching"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--receivers", type=int, default=1000, help="fanout: subscribers")
    parser.add_argument("--subscriptions", type=int, default=1000, help="matching: in total")
    parser.add_argument("--bare", action="store_true", help="the peer is the ceiling server")
    parser.add_argument("--server-pid", type=int, default=0, help="report its CPU use")
    parser.add_argument(
        "--connect-timeout", type=float, default=30.0, help="per connection, subscribing included"
    )
    parser.add_argument("--phase-timeout", type=float, default=120.0, help="bound on setting up")
    parser.add_argument("--op-timeout", type=float, default=20.0, help="bound on each wait")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    raise_nofile_limit()
    uvloop.run(_run(args))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
