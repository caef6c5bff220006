"""What a process counts for `/metrics`, and the Prometheus text a scrape gets.

The counting is plain Python numbers in dicts and lists: an ok answer costs one dict
look-up and an increment (the Prometheus client's own metric objects take a lock and a
label look-up per increment, several times what a pipelined request costs here;
bench/metrics.py measures what is left). Latency is sampled: the first request to arrive
after each `SAMPLE_EVERY` seconds is timed (`time_next`, set again by a loop timer), as a
clock read per request cost more than all the rest, and so did deciding per request
whether to time the next one. Prometheus's client renders the numbers at scrape time, from
a `Snapshot`: a plain, JSON-able copy, so the snapshots of a node's worker processes can be
gathered over the cluster and added up — one scrape sees the whole node.

Label values that clients choose (a request's class and command) are kept for the first
`MAX_LABEL_SETS` combinations of each metric; later ones count under `_other`, so a client
inventing command names cannot grow a process's memory or the scrape without end.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from nkservice.protocol.messages import Request

MAX_LABEL_SETS = 1000
OTHER = "_other"
SAMPLE_EVERY = 0.01  # seconds: at most about 100 requests a second are timed, per process

# Seconds. Answers of the core commands take microseconds; a callback app's, milliseconds.
REQUEST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CALLBACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)

# Why this side ended a connection (`Connection.end_reason`) → the `reason` label.
DISCONNECT_REASONS = {
    None: "client",
    "slow consumer": "slow_consumer",
    "request timeout": "request_timeout",
    "login timeout": "login_timeout",
    "too many unanswered events": "unanswered_events",
    "too many bad messages": "bad_messages",
    "message too large": "message_too_large",
    "too many failed logins": "failed_logins",
    "replaced by a new login with the same session id": "replaced",
    "the service was stopped": "service_stopped",
    "server shutting down": "shutdown",
}


def disconnect_reason(end_reason: str | None) -> str:
    """The `reason` label of a connection that ended (`Connection.end_reason`)."""
    label = DISCONNECT_REASONS.get(end_reason)
    if label is not None:
        return label
    return "stopped_by_admin" if end_reason and end_reason.startswith("stopped by ") else "other"


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


FAMILIES = {family.name: family for family in (
    Family("nkservice_connections", "gauge", "Open connections, logged in or not.",
           ("service", "transport")),
    Family("nkservice_sessions", "gauge", "Logged-in sessions.", ("service",)),
    Family("nkservice_connections_accepted", "counter", "Connections accepted.",
           ("service", "transport")),
    Family("nkservice_requests", "counter", "Client requests answered, by result (ok, or "
           "the error code).", ("class", "cmd", "result")),
    Family("nkservice_request_duration_seconds", "histogram", "Time from a client request's "
           "arrival to its answer, for a sample: the first request to arrive after each "
           f"{SAMPLE_EVERY * 1000:g} ms.", (), REQUEST_BUCKETS),
    Family("nkservice_events_published", "counter", "Events published.", ("service",)),
    Family("nkservice_events_delivered", "counter", "Events sent to subscribed sessions.",
           ("service",)),
    Family("nkservice_disconnects", "counter", "Connections ended, by who or what ended them.",
           ("reason",)),
    Family("nkservice_callback_duration_seconds", "histogram", "Time for an app to answer a "
           "callback (§7), by kind.", ("callback",), CALLBACK_BUCKETS),
    Family("nkservice_callback_failovers", "counter", "Callbacks given to another app after "
           "the first one dropped or missed its deadline.", ("callback",)),
    Family("nkservice_lua_seconds", "counter", "Time spent running Lua scripts.",
           ("service",)),
)}

Labels = tuple[str, ...]
# A histogram's value: the count of each bucket (not cumulative; the last one is +Inf),
# then the sum of what was observed.
Snapshot = dict[str, list[list[Any]]]  # family name → [[*labels, value], ...]


class Metrics:
    """One process's numbers. Gauges are read when a snapshot is taken (`gauges`)."""

    def __init__(self, gauges: Callable[[], Iterable[tuple[str, Labels, float]]] = tuple,
                 sample_every: float = SAMPLE_EVERY) -> None:
        self._gauges = gauges
        self._sample_every = sample_every
        # The next request to arrive is to be timed: `Session` calls `stamp` and this is
        # False until `sample_every` seconds later. The first request is timed.
        self.time_next = True
        self._values: dict[str, dict[Labels, Any]] = {name: {} for name in FAMILIES}
        # (class, cmd, result) → answers: the errors, and the ok answers `_cells` has no
        # place for (a command's second class, or past the label sets' limit)
        self._requests = self._values["nkservice_requests"]
        self._cells: dict[str, list[Any]] = {}  # cmd → [class, ok answers] (see `ok`)
        self._request_times = self._histogram("nkservice_request_duration_seconds", ())
        self._published = self._values["nkservice_events_published"]
        self._delivered = self._values["nkservice_events_delivered"]

    # -- counting (the hot paths first) ----------------------------------------------------

    def stamp(self, request: Request) -> None:
        """Time this request, from now to its answer; the next after `sample_every`."""
        self.time_next = False
        request.received = perf_counter()
        asyncio.get_running_loop().call_later(self._sample_every, self._sample_next)

    def _sample_next(self) -> None:
        self.time_next = True

    def ok(self, request: Request) -> None:
        """A client request answered ok. Counted in one look-up, by command (its str has
        its hash already: routing hashed it), in a cell that names the first class seen
        with it; the same command in another class counts as an error does."""
        try:
            cell = self._cells[request.cmd]
        except KeyError:
            self._first_ok(request)
        else:
            if cell[0] == request.class_:
                cell[1] += 1
            else:
                self._count(request, "ok")
        if request.received:
            self._time(request.received)

    def failed(self, request: Request, result: str) -> None:
        """A client request answered with an error (`result`: its name)."""
        self._count(request, result)
        if request.received:
            self._time(request.received)

    def _count(self, request: Request, result: str) -> None:
        """Count an answer under (class, cmd, result) (or `_other`)."""
        self._add(self._requests, (request.class_, request.cmd, result), 1,
                  taken=len(self._cells))

    def _first_ok(self, request: Request) -> None:
        """The first ok answer of a command: its cell, unless past the label sets' limit."""
        if len(self._requests) + len(self._cells) >= MAX_LABEL_SETS:
            self._count(request, "ok")
        else:
            self._cells[request.cmd] = [request.class_, 1]

    def _time(self, received: float) -> None:
        seconds = perf_counter() - received
        times = self._request_times
        times[0 if seconds <= REQUEST_BUCKETS[0]
              else bisect_left(REQUEST_BUCKETS, seconds)] += 1
        times[-1] += seconds

    def published(self, service: str) -> None:
        key = (service,)
        published = self._published
        if key in published:
            published[key] += 1
        else:
            self._add(published, key, 1)

    def delivered(self, service: str, receivers: int) -> None:
        key = (service,)
        delivered = self._delivered
        if key in delivered:
            delivered[key] += receivers
        else:
            self._add(delivered, key, receivers)

    def count(self, name: str, labels: Labels, amount: float = 1) -> None:
        """Add to a counter (the paths that are not hot)."""
        self._add(self._values[name], labels, amount)

    def observe(self, name: str, labels: Labels, seconds: float) -> None:
        """One observation of a histogram."""
        values = self._histogram(name, labels)
        values[bisect_left(FAMILIES[name].buckets, seconds)] += 1
        values[-1] += seconds

    def _histogram(self, name: str, labels: Labels) -> list[float]:
        family = self._values[name]
        values = family.get(labels)
        if values is None and len(family) >= MAX_LABEL_SETS:
            labels = (OTHER,) * len(labels)
            values = family.get(labels)
        if values is None:
            values = family[labels] = [0] * (len(FAMILIES[name].buckets) + 1) + [0.0]
        return values

    @staticmethod
    def _add(values: dict[Labels, Any], labels: Labels, amount: float, taken: int = 0
             ) -> None:
        """Add to a label set (`_other` past the limit; `taken`: the metric's label sets
        kept elsewhere)."""
        if labels not in values and len(values) + taken >= MAX_LABEL_SETS:
            labels = (OTHER,) * len(labels)
        values[labels] = values.get(labels, 0) + amount

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything counted so far and the gauges as they are now, as JSON-able lists."""
        snapshot: Snapshot = {
            name: [[*labels, list(value) if isinstance(value, list) else value]
                   for labels, value in values.items()]
            for name, values in self._values.items()}
        snapshot["nkservice_requests"] += [[class_, cmd, "ok", answered]
                                           for cmd, (class_, answered) in self._cells.items()]
        for name, labels, value in self._gauges():
            snapshot[name].append([*labels, value])
        return snapshot


class Uncounted(Metrics):
    """A node whose metrics nobody can read (`[http] metrics = ""`) counts nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.time_next = False  # and nothing sets it: `stamp` is never called

    def ok(self, request: Request) -> None:
        pass

    def failed(self, request: Request, result: str) -> None:
        pass

    def published(self, service: str) -> None:
        pass

    def delivered(self, service: str, receivers: int) -> None:
        pass

    def count(self, name: str, labels: Labels, amount: float = 1) -> None:
        pass

    def observe(self, name: str, labels: Labels, seconds: float) -> None:
        pass


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The snapshots of several processes as one: every value added up, label by label."""
    total: dict[str, dict[Labels, Any]] = {name: {} for name in FAMILIES}
    for snapshot in snapshots:
        for name, rows in snapshot.items():
            if name not in total:  # from a process of a newer version: not known here
                continue
            values = total[name]
            for row in rows:
                labels, value = tuple(row[:-1]), row[-1]
                if isinstance(value, list):
                    old = values.get(labels)
                    values[labels] = ([a + b for a, b in zip(old, value, strict=True)]
                                      if old is not None else list(value))
                else:
                    values[labels] = values.get(labels, 0) + value
    return {name: [[*labels, value] for labels, value in values.items()]
            for name, values in total.items()}


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition format (version 0.0.4) of a snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot))
    return generate_latest(registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Collector:
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for name, family in FAMILIES.items():
            rows = self._snapshot.get(name, [])
            metric: Metric
            if family.kind == "histogram":
                metric = HistogramMetricFamily(name, family.help, labels=family.labels)
                for row in rows:
                    *labels, values = row
                    buckets, running = [], 0
                    for bound, count in zip((*family.buckets, float("inf")), values,
                                            strict=False):
                        running += count
                        buckets.append((_bound(bound), running))
                    metric.add_metric(labels, buckets, values[-1])
            else:
                kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                metric = kind(name, family.help, labels=family.labels)
                for row in rows:
                    metric.add_metric(row[:-1], row[-1])
            yield metric


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
