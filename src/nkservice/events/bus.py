"""The bus: what carries a published event to every process that may hold a subscriber.

`Bus` is the seam the cluster plugs into. A publisher hands it an event; the bus calls the
`deliver` function of each process whose `Events` declared an interest matching it, and
that process's own index finishes the match. Interest is declared per subscription key
(service, class, subclass, type, obj_id, each possibly `*`), once per key however many
subscribers share it. `LocalBus` is the single-process case: interest is implied, every
event goes straight to the one local index.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nkservice.events.index import Topic

Deliver = Callable[[Topic, Any], None]
# Who published an event, and its number among that publisher's events: on a cluster, where
# one publisher's events reach every process in the order of their numbers.
EventId = tuple[str, int]
# An event as a subscriber was given it, with its id when a cluster's bus brought it.
HeldEvent = tuple[EventId | None, bytes]


class Bus(Protocol):
    @property
    def delivering(self) -> EventId | None:
        """While `deliver` runs: the id of the event it delivers (None on one process)."""

    def on_event(self, deliver: Deliver) -> None:
        """Where this process's share of the events goes (called once, at start)."""

    def publish(self, topic: Topic, body: Any) -> None:
        """Send an event to every process interested in it, this one included."""

    def add_interest(self, topic: Topic) -> Awaitable[None] | None:
        """This process now holds a subscription with this key (the first one). When the
        other processes learn of it later, an awaitable that is done once they have: the
        subscription is active from then on (§5.2)."""

    def activating(self, topic: Topic) -> Awaitable[None] | None:
        """What `add_interest` returned for this key, while it is not done yet: a second
        subscriber of the key is active no sooner than the first."""

    def remove_interest(self, topic: Topic) -> None:
        """This process no longer holds any subscription with this key."""


class LocalBus:
    """One process: publishing is delivering, and there is no one to tell of interest."""

    __slots__ = ("_deliver",)
    delivering = None

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    def on_event(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def publish(self, topic: Topic, body: Any) -> None:
        assert self._deliver is not None, "the bus has no receiver yet"
        self._deliver(topic, body)

    def add_interest(self, topic: Topic) -> None:
        return None

    def activating(self, topic: Topic) -> None:
        return None

    def remove_interest(self, topic: Topic) -> None:
        pass
