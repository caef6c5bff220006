"""Subscribing and publishing on one node (PROTOCOL.md §5.1, §5.2).

`publish` matches an event once against the index, then writes it to every matching
session. The bytes of the event's `data` depend only on the variant a receiver needs — the
subscription body merged in, whether the `service` field is added (another service's
event), whether `obj` is added (a seed-form login) — so they are encoded once per variant
and the same bytes go to every receiver of that variant; only the tid differs per
receiver. Delivery is synchronous, inside the sender's request: events from one sender
reach each receiver in the order they were sent.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from nkservice.events.index import WILDCARD, Subscription, SubscriptionIndex, Topic


class Named(Protocol):
    @property
    def name(self) -> str: ...


class EventSink(Protocol):
    def send_event(self, data: bytes) -> None: ...


class Subscriber(Protocol):
    """What the bus needs of a subscriber: a live session, or one parked for resuming."""

    @property
    def service(self) -> Named: ...

    @property
    def seed_form(self) -> bool: ...

    @property
    def conn(self) -> EventSink: ...

    @property
    def subscriptions(self) -> dict[Topic, Subscription]: ...

    def __hash__(self) -> int: ...


def automatic_topics(service: str, user: str, session_id: str) -> tuple[Topic, Topic]:
    """What every session is subscribed to from its login (§3.2)."""
    return (Topic(service, "core", "user_event", WILDCARD, user),
            Topic(service, "core", "session_event", WILDCARD, session_id))


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


class EventBus:
    def __init__(self) -> None:
        self.index: SubscriptionIndex[Subscriber] = SubscriptionIndex()

    def subscribe(self, session: Subscriber, topic: Topic, body: Any = None) -> None:
        session.subscriptions[topic] = self.index.add(session, topic, body)

    def unsubscribe(self, session: Subscriber, topic: Topic) -> bool:
        session.subscriptions.pop(topic, None)
        return self.index.remove(session, topic)

    def move(self, source: Subscriber, target: Subscriber) -> None:
        """Hand all of `source`'s subscriptions to `target`, in their order."""
        for subscription in self.drop(source):
            self.subscribe(target, subscription.topic, subscription.body)

    def drop(self, session: Subscriber) -> list[Subscription]:
        """Remove all of a session's subscriptions (it has ended); returns them."""
        dropped = list(session.subscriptions.values())
        for topic in session.subscriptions:
            self.index.remove(session, topic)
        session.subscriptions.clear()
        return dropped

    def publish(self, topic: Topic, body: Any = None) -> int:
        """Deliver an event to every matching session, once each; how many received it."""
        matches = self.index.match(topic)
        encoded: dict[tuple[int, bool, bool], bytes] = {}
        for session, subscription in matches.items():
            sub_body = subscription.body
            variant = (0 if sub_body is None else id(sub_body),
                       session.service.name != topic.service, session.seed_form)
            data = encoded.get(variant)
            if data is None:
                data = encoded[variant] = encode_event(
                    topic, merge_bodies(sub_body, body), with_service=variant[1],
                    with_obj=variant[2])
            session.conn.send_event(data)
        return len(matches)
