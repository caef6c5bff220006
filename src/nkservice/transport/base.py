"""What every transport adapter shares: the hand-over to the service and the wake-up timer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from nkservice.protocol.connection import Connection, Wire


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
    """One loop timer per connection, at the earliest time its `Connection` asked for."""

    __slots__ = ("_conn", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._conn: Connection | None = None

    def attach(self, conn: Connection) -> None:
        self._conn = conn

    def wake_at(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self._conn is not None:
            self._conn.on_timer()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
