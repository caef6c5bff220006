"""The bus of a cluster: events between processes over NATS (DESIGN.md "Cluster").

An event is delivered to this process's own subscribers at once, in the publisher's call,
as with one process, then published on NATS for the others. A process subscribes on NATS
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
from nkservice.events.bus import Deliver
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

    def on_event(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def publish(self, topic: Topic, body: Any) -> None:
        assert self._deliver is not None, "the bus has no receiver yet"
        self._deliver(topic, body)
        self._sequence += 1
        try:
            self._link.publish(event_subject(topic), orjson.dumps(
                (self._origin, self._sequence, topic.service, topic.class_, topic.subclass,
                 topic.type, topic.obj_id, body)))
        except TooLarge as error:
            log.warning("an event of %s/%s too large for the other processes (%s): "
                        "delivered in this one only", topic.service, topic.class_, error)

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
        self._deliver(Topic(service, class_, subclass, type_, obj_id), body)
