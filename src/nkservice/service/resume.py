"""Resuming a session (PROTOCOL.md §3.3): a session that ends while its service has a
`resume_window` is parked. The parked record keeps the session's subscriptions in the
index and buffers the events they match (the newest `resume_buffer`), until a login of the
same user with the same session id takes them over (a `Claim`), or the window passes.
"""

from __future__ import annotations

import asyncio
from collections import deque

from nkservice.events.index import Subscription, Topic
from nkservice.service.contracts import Caller


class ParkedSession:
    """A subscriber that keeps what it is sent."""

    __slots__ = ("buffer", "expiry", "home", "seed_form", "session_id", "subscriptions",
                 "user")

    def __init__(self, session: Caller, buffer_size: int) -> None:
        self.home = session.home
        self.user = session.user
        self.session_id = session.session_id
        self.seed_form = session.seed_form
        self.subscriptions: dict[Topic, Subscription] = {}
        self.buffer: deque[bytes] = deque(maxlen=buffer_size)
        self.expiry: asyncio.TimerHandle | None = None

    def deliver(self, data: bytes) -> None:
        self.buffer.append(data)

