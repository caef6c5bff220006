"""Resuming a session (PROTOCOL.md §3.3): a session that ends while its service has a
`resume_window` is parked. The parked record keeps the session's subscriptions in the
index and buffers the events they match (the newest `resume_buffer`), until a login of the
same user with the same session id takes them over (a `Claim`), or the window passes.

On a cluster the login may come to another process. The old one keeps the subscriptions
(of the parked session, or of the live one it replaces) and what they bring until the new
one holds them too; then it lets go and hands over what it kept. Both may have got the
events of the moment in between: `kept_then_new` leaves out the new process's copies,
known by their ids (one publisher's events reach every process in the order of their
numbers).
"""

from __future__ import annotations

import asyncio
from collections import deque

from nkservice.events.bus import Bus, HeldEvent
from nkservice.events.index import Subscription, Topic
from nkservice.service.contracts import Caller


class ParkedSession:
    """A subscriber that keeps what it is sent (the newest `buffer_size`)."""

    __slots__ = ("_bus", "buffer", "expiry", "home", "seed_form", "session_id",
                 "subscriptions", "user")

    def __init__(self, session: Caller, buffer_size: int, bus: Bus) -> None:
        self.home = session.home
        self.user = session.user
        self.session_id = session.session_id
        self.seed_form = session.seed_form
        self.subscriptions: dict[Topic, Subscription] = {}
        self.buffer: deque[HeldEvent] = deque(maxlen=buffer_size)
        self.expiry: asyncio.TimerHandle | None = None
        self._bus = bus

    def deliver(self, data: bytes) -> None:
        self.buffer.append((self._bus.delivering, data))


def kept_then_new(kept: list[HeldEvent], new: list[HeldEvent]) -> list[bytes]:
    """What the old process kept, then what came here that it did not have: of each
    publisher, the events numbered after the last one it kept."""
    last: dict[str, int] = {}
    for event_id, _ in kept:
        if event_id is not None and event_id[1] > last.get(event_id[0], 0):
            last[event_id[0]] = event_id[1]
    return [data for _, data in kept] + [
        data for event_id, data in new
        if event_id is None or event_id[1] > last.get(event_id[0], 0)]
