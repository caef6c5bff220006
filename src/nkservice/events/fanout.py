"""Subscribing and delivering in one process (PROTOCOL.md §5.1, §5.2).

`Events` keeps this process's subscription index and tells the bus which keys it holds.
`publish` hands an event to the bus; the bus calls `deliver` in every interested process
(here, at once), which matches it against the index and writes it to each subscriber.

The bytes of an event's `data` depend only on the variant a receiver needs — the
subscription body merged in, whether the `service` field is added (an event of another
namespace than the receiver's), whether `obj` is added (a seed-form receiver) — so they are
encoded once per variant and the same bytes go to every receiver of that variant. With the
local bus, delivery is synchronous, inside the sender's request: events from one sender
reach each receiver in the order they were sent.

A subscriber is anything with `deliver(bytes)` and the few attributes below: a live
session, one parked for resuming, a test double. This package knows nothing of sessions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Hashable
from typing import Any, Protocol

import orjson

from nkservice.events.bus import Bus
from nkservice.events.index import WILDCARD, Subscription, SubscriptionIndex, Topic


class Subscriber(Hashable, Protocol):
    @property
    def home(self) -> str:
        """The namespace (service) it lives in: events of another one carry `service`."""

    @property
    def seed_form(self) -> bool:
        """It wants the seed's `obj` beside `subclass`."""

    @property
    def subscriptions(self) -> dict[Topic, Subscription]: ...

    def deliver(self, data: bytes) -> None:
        """Send it one event, whose `data` is encoded already."""


def merge_bodies(subscription_body: Any, event_body: Any) -> Any:
    """§5.2: the subscription's object updated by the event's; else the event's, or the
    subscription's when the event has none."""
    if subscription_body is None:
        return event_body
    if event_body is None:
        return subscription_body
    if isinstance(subscription_body, dict) and isinstance(event_body, dict):
        return {**subscription_body, **event_body}
    return event_body


def encode_event(topic: Topic, body: Any, *, with_service: bool, with_obj: bool) -> bytes:
    data: dict[str, Any] = {"class": topic.class_}
    if topic.subclass != WILDCARD:
        data["subclass"] = topic.subclass
        if with_obj:
            data["obj"] = topic.subclass
    if topic.type != WILDCARD:
        data["type"] = topic.type
    if topic.obj_id != WILDCARD:
        data["obj_id"] = topic.obj_id
    if body is not None and body != {}:
        data["body"] = body
    if with_service:
        data["service"] = topic.service
    return orjson.dumps(data)


class EventCounts(Protocol):
    """Who counts events (the node's metrics)."""

    def published(self, service: str) -> None: ...

    def delivered(self, service: str, receivers: int) -> None: ...


class _Uncounted:
    def published(self, service: str) -> None:
        pass

    def delivered(self, service: str, receivers: int) -> None:
        pass


class Events:
    def __init__(self, bus: Bus, counts: EventCounts | None = None) -> None:
        self.index: SubscriptionIndex[Subscriber] = SubscriptionIndex()
        self.bus = bus
        self.counts = counts or _Uncounted()
        bus.on_event(self.deliver)

    def subscribe(self, subscriber: Subscriber, topic: Topic, body: Any = None
                  ) -> Awaitable[None] | None:
        """Subscribe; what the bus returns when the subscription becomes active only once
        the other processes know of it (await it before saying it is)."""
        first = not self.index.holds(topic)
        subscriber.subscriptions[topic] = self.index.add(subscriber, topic, body)
        return self.bus.add_interest(topic) if first else self.bus.activating(topic)

    def unsubscribe(self, subscriber: Subscriber, topic: Topic) -> bool:
        subscriber.subscriptions.pop(topic, None)
        removed = self.index.remove(subscriber, topic)
        if removed and not self.index.holds(topic):
            self.bus.remove_interest(topic)
        return removed

    def move(self, source: Subscriber, target: Subscriber) -> None:
        """Hand all of `source`'s subscriptions to `target`, in their order."""
        for subscription in list(source.subscriptions.values()):
            self.subscribe(target, subscription.topic, subscription.body)
        self.drop(source)

    def drop(self, subscriber: Subscriber) -> list[Subscription]:
        """Remove all of a subscriber's subscriptions (it has ended); returns them."""
        dropped = list(subscriber.subscriptions.values())
        for subscription in dropped:
            self.unsubscribe(subscriber, subscription.topic)
        return dropped

    def drop_service(self, service: str) -> None:
        """The service has stopped: every subscription to its events ends, whoever held it
        (the global admin may subscribe to any service's events)."""
        for subscriber, topic in self.index.in_service(service):
            self.unsubscribe(subscriber, topic)

    def publish(self, topic: Topic, body: Any = None) -> None:
        self.counts.published(topic.service)
        self.bus.publish(topic, body)

    def deliver(self, topic: Topic, body: Any) -> None:
        """Write an event to every matching local subscriber, once each."""
        matches = self.index.match(topic)
        if not matches:
            return
        self.counts.delivered(topic.service, len(matches))
        encoded: dict[tuple[int, bool, bool], bytes] = {}
        for subscriber, subscription in matches.items():
            sub_body = subscription.body
            variant = (0 if sub_body is None else id(sub_body),
                       subscriber.home != topic.service, subscriber.seed_form)
            data = encoded.get(variant)
            if data is None:
                data = encoded[variant] = encode_event(
                    topic, merge_bodies(sub_body, body), with_service=variant[1],
                    with_obj=variant[2])
            subscriber.deliver(data)
