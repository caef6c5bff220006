"""The bus of a cluster: events between processes over NATS (DESIGN.md "Cluster").

An event goes to NATS first, for the other processes, then to this process's own
subscribers: at the end of the loop's turn, once that turn's messages are written to NATS in
one go. So the other processes work on a fan-out while this one writes its share, where
writing ours first would hold theirs back by as long (a pipelined burst of events to
thousands of subscribers: the whole burst). Events from one sender still reach each
receiver in order: every event takes this path. A process subscribes on NATS
to one subject per distinct subscription key its sessions hold (reference-counted by
`Events`: the first subscriber of a key adds the interest, the last one removes it), so an
event crosses the network only to the processes that may want it.

An event can match several subscription keys of one process, and NATS then brings it once
per key. Each event carries its publisher's id and a sequence number: a process delivers
an event once, the first time it sees it. NATS keeps one publisher's messages in order for
each receiver, so "a number higher than the last one seen from that publisher" is the test,
and events from one sender to one receiver stay in order (§5.2).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from functools import partial
from typing import Any

import orjson

from nkservice.cluster.link import NatsLink, TooLarge
from nkservice.cluster.subjects import event_subject, interest_subject
from nkservice.events.bus import Deliver, EventId
from nkservice.events.index import Topic

log = logging.getLogger(__name__)


class NatsBus:
    """Implements `events.bus.Bus` for one process of a cluster."""

    def __init__(self, link: NatsLink, origin: str) -> None:
        self._link = link
        self._origin = origin  # unique per process run
        self._deliver: Deliver | None = None
        self._interest: dict[Topic, int] = {}  # key → NATS subscription id
        self._activating: dict[Topic, asyncio.Future[None]] = {}  # until NATS has them
        self._sequence = 0
        self._last_seen: dict[str, int] = {}  # publisher → highest sequence delivered
        self._ours: list[tuple[Topic, Any, int]] = []  # published this turn, for ours
        self.delivering: EventId | None = None

    def on_event(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def publish(self, topic: Topic, body: Any) -> None:
        assert self._deliver is not None, "the bus has no receiver yet"
        self._sequence += 1
        try:
            self._link.publish(event_subject(topic), orjson.dumps(
                (self._origin, self._sequence, topic.service, topic.class_, topic.subclass,
                 topic.type, topic.obj_id, body)))
        except TooLarge as error:
            log.warning("an event of %s/%s too large for the other processes (%s): "
                        "delivered in this one only", topic.service, topic.class_, error)
        if not self._ours:
            asyncio.get_running_loop().call_soon(self._deliver_ours)
        self._ours.append((topic, body, self._sequence))

    def _deliver_ours(self) -> None:
        ours, self._ours = self._ours, []
        try:
            self._link.write_now()  # the others' copies first: they start on them meanwhile
        except Exception:  # NATS's trouble must not keep this process's subscribers waiting
            log.exception("writing the events of this turn to NATS failed")
        assert self._deliver is not None
        for topic, body, sequence in ours:
            self.delivering = (self._origin, sequence)
            try:
                self._deliver(topic, body)
            except Exception:  # one event's failure must not cost the others theirs
                log.exception("delivering an event of %s/%s failed", topic.service,
                              topic.class_)
        self.delivering = None

    def add_interest(self, topic: Topic) -> Awaitable[None] | None:
        if topic not in self._interest:
            self._interest[topic] = self._link.subscribe(interest_subject(topic), self._received)
        confirmed = self._link.confirm()
        if confirmed is not None:
            self._activating[topic] = confirmed
            confirmed.add_done_callback(partial(self._active, topic))
        return confirmed

    def _active(self, topic: Topic, confirmed: asyncio.Future[None]) -> None:
        if self._activating.get(topic) is confirmed:
            del self._activating[topic]

    def activating(self, topic: Topic) -> Awaitable[None] | None:
        return self._activating.get(topic)

    def remove_interest(self, topic: Topic) -> None:
        sid = self._interest.pop(topic, None)
        if sid is not None:
            self._link.unsubscribe(sid)

    def _received(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        origin, sequence, service, class_, subclass, type_, obj_id, body = orjson.loads(data)
        if sequence <= self._last_seen.get(origin, 0):
            return  # delivered already, through another matching key
        self._last_seen[origin] = sequence
        assert self._deliver is not None
        self.delivering = (origin, sequence)
        try:
            self._deliver(Topic(service, class_, subclass, type_, obj_id), body)
        finally:
            self.delivering = None
