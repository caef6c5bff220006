"""The subscription index (PROTOCOL.md §5.1): matching costs O(matches), not O(subscriptions).

A subscription's subclass, type and obj_id are each a value or `*`; it matches an event when
each is `*` or equal to the event's. So an event can only be matched by the subscriptions
whose key is one of the eight combinations of (its value or `*`) over the three fields —
fewer when the event itself says `*`. The index is a dict per (service, class) from that
key to the subscribers holding it: a match is at most eight dict look-ups plus one step
per matching subscription, however many subscriptions the service holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

WILDCARD = "*"

S = TypeVar("S", bound=Hashable)
Key = tuple[str, str, str]  # subclass, type, obj_id


@dataclass(frozen=True, slots=True)
class Topic:
    """Where an event is published, or what a subscription asks for."""

    service: str
    class_: str
    subclass: str = WILDCARD
    type: str = WILDCARD
    obj_id: str = WILDCARD

    @property
    def key(self) -> Key:
        return (self.subclass, self.type, self.obj_id)

    @property
    def specificity(self) -> int:
        return sum(value != WILDCARD for value in self.key)


@dataclass(slots=True)
class Subscription:
    topic: Topic
    body: Any
    order: int  # creation order: the older wins a tie in specificity (§5.2)


class SubscriptionIndex(Generic[S]):
    def __init__(self) -> None:
        self._classes: dict[tuple[str, str], dict[Key, dict[S, Subscription]]] = {}
        self._order = itertools.count()

    def add(self, subscriber: S, topic: Topic, body: Any = None) -> Subscription:
        """Subscribe; the same topic again replaces the body and keeps the original order."""
        holders = self._classes.setdefault((topic.service, topic.class_), {}).setdefault(
            topic.key, {})
        existing = holders.get(subscriber)
        if existing is not None:
            existing.body = body
            return existing
        subscription = Subscription(topic, body, next(self._order))
        holders[subscriber] = subscription
        return subscription

    def remove(self, subscriber: S, topic: Topic) -> bool:
        by_key = self._classes.get((topic.service, topic.class_))
        holders = by_key.get(topic.key) if by_key is not None else None
        if holders is None or holders.pop(subscriber, None) is None:
            return False
        if not holders:
            assert by_key is not None
            del by_key[topic.key]
            if not by_key:
                del self._classes[(topic.service, topic.class_)]
        return True

    def holds(self, topic: Topic) -> bool:
        """Does anyone hold a subscription with exactly this key?"""
        by_key = self._classes.get((topic.service, topic.class_))
        return by_key is not None and topic.key in by_key

    def match(self, event: Topic) -> dict[S, Subscription]:
        """Each matching subscriber once, with its most specific (then oldest) subscription."""
        by_key = self._classes.get((event.service, event.class_))
        if not by_key:
            return {}
        chosen: dict[S, Subscription] = {}
        for key in _candidate_keys(event.key):  # most specific keys first
            holders = by_key.get(key)
            if not holders:
                continue
            for subscriber, subscription in holders.items():
                best = chosen.get(subscriber)
                if best is None or (best.topic.specificity == subscription.topic.specificity
                      and subscription.order < best.order):
                    chosen[subscriber] = subscription
        return chosen

    def in_service(self, service: str) -> list[tuple[S, Topic]]:
        """Every subscription to the events of `service`, with its subscriber."""
        return [(subscriber, subscription.topic)
                for (of_service, _), by_key in self._classes.items() if of_service == service
                for holders in by_key.values()
                for subscriber, subscription in holders.items()]

    def __len__(self) -> int:
        return sum(len(holders) for by_key in self._classes.values()
                   for holders in by_key.values())


# Which fields keep the event's value (True) or ask for `*`, most specific first.
_MASKS = sorted(itertools.product((True, False), repeat=3), key=lambda mask: -sum(mask))


def _candidate_keys(key: Key) -> Iterator[Key]:
    """The keys that can match an event key, in order of decreasing specificity."""
    subclass, type_, obj_id = key
    for keep_subclass, keep_type, keep_obj_id in _MASKS:
        if ((keep_subclass and subclass == WILDCARD) or (keep_type and type_ == WILDCARD)
                or (keep_obj_id and obj_id == WILDCARD)):
            continue  # the same key as with that field at `*`: seen once is enough
        yield (subclass if keep_subclass else WILDCARD, type_ if keep_type else WILDCARD,
               obj_id if keep_obj_id else WILDCARD)
