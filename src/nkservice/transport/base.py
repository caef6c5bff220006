"""What every transport adapter shares: the hand-over to the service and the wake-up timer.

A connection's objects must cost little while it lives and nothing once it ends:

- while it lives, every object it owns that the cyclic garbage collector tracks is walked
  by each full collection (100,000 idle sessions on a worker are hundreds of thousands of
  them). So the wake-ups of all the connections of a loop share one loop timer
  (`WakeUps`): a waiting connection costs an entry in a heap of (time, key) tuples, which
  the collector stops tracking (they hold only a float and an int), not a `TimerHandle`
  with its `UVTimer`, its copy of the context and a bound method of its own; and the
  connections share one `loop.time` and one `loop.call_soon` (a bound method made once);
- once it ends, the adapter lets go of its `Connection` (`connection_lost`): the
  connection points back at the adapter (its `Wire`), and the pair would otherwise be a
  reference cycle, which only the collector frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from typing import Protocol

from nkservice.protocol.connection import Connection, Wire

log = logging.getLogger(__name__)

# Connections woken in one turn of the loop at most; the others in the next turns, so that
# reads and writes go on in between when many deadlines fall at once.
WAKE_BATCH = 1000
_LOOP_ATTRIBUTE = "_nkservice_wake_ups"


class Wakeable(Protocol):
    def on_timer(self) -> None: ...


class Accept(Protocol):
    """Makes the `Connection` of a new peer (a service's `accept`)."""

    def __call__(self, wire: Wire, clock: Callable[[], float], transport: str, host: str,
                 port: int) -> Connection: ...


def peer_address(transport: asyncio.BaseTransport) -> tuple[str, int]:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return "unknown", 0


class WakeUps:
    """The wake-ups of every connection of one event loop, on one loop timer.

    Each connection has a key (`new_key`) and at most one wake-up time (`wake_at`, which
    replaces the one before; `cancel`). The heap keeps (time, key) entries; an entry whose
    time is no longer its key's is stale and skipped when its time comes. The loop timer
    is set for the earliest entry, and moved only when an earlier one arrives."""

    __slots__ = ("__weakref__", "_at", "_due", "_handle", "_heap", "_keys", "_loop", "_owners",
                 "call_soon", "clock")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Made once, handed to every connection (each `loop.time` is a new bound method).
        self.clock: Callable[[], float] = loop.time
        self.call_soon = loop.call_soon
        self._keys = itertools.count(1)
        self._heap: list[tuple[float, int]] = []
        self._due: dict[int, float] = {}  # key → its wake-up time
        self._owners: dict[int, Wakeable] = {}  # key → whom to wake
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the loop timer fires

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> WakeUps:
        """The loop's own, kept on the loop (it lives and dies with it)."""
        wake_ups: WakeUps | None = getattr(loop, _LOOP_ATTRIBUTE, None)
        if wake_ups is None:
            wake_ups = cls(loop)
            # A loop that takes no attributes: one per connection, then.
            with contextlib.suppress(AttributeError):
                setattr(loop, _LOOP_ATTRIBUTE, wake_ups)
        return wake_ups

    def new_key(self) -> int:
        return next(self._keys)

    def wake_at(self, key: int, owner: Wakeable, when: float) -> None:
        """Call `owner.on_timer()` at `when` (instead of any time asked for before)."""
        if self._due.get(key) == when:
            return
        self._due[key] = when
        self._owners[key] = owner
        heapq.heappush(self._heap, (when, key))
        if when < self._at:
            self._set_timer(when)

    def cancel(self, key: int) -> None:
        if self._due.pop(key, None) is not None:
            del self._owners[key]

    def pending(self) -> int:
        """Connections waiting for a wake-up (for tests)."""
        return len(self._due)

    def _set_timer(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._at = math.inf
        now = self._loop.time()
        heap, due, owners = self._heap, self._due, self._owners
        woken: list[Wakeable] = []
        while heap and heap[0][0] <= now and len(woken) < WAKE_BATCH:
            when, key = heapq.heappop(heap)
            if due.get(key) == when:
                del due[key]
                woken.append(owners.pop(key))
        for owner in woken:  # each may ask for its next wake-up at once
            try:
                owner.on_timer()
            except Exception:  # one connection's bug must not stop the others' deadlines
                log.exception("a connection's timer failed")
        while heap and due.get(heap[0][1]) != heap[0][0]:  # stale: nothing to wake for
            heapq.heappop(heap)
        if heap and heap[0][0] < self._at:
            self._set_timer(heap[0][0])
