"""What one process of a cluster shares with the others: its id, its NATS link, the way to
ask the others (`Rpc`), and whether NATS is there.

NATS away does not stop a process: its own sessions, events and commands go on, questions
to the others are answered from what it knows, and the link reconnects in the background.
That state is logged when it starts and ends, and shown to admins in `core/ping`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import time

from nkservice.cluster.link import NatsLink
from nkservice.cluster.rpc import Rpc

log = logging.getLogger(__name__)

STATE_EVERY = 0.5  # seconds an admin's ping may show an old membership count


def process_id() -> str:
    """Unique per process run, and a valid NATS subject token."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Cluster:
    def __init__(self, url: str) -> None:
        self.process = process_id()
        self.link = NatsLink(url, self.process, on_state=self._changed)
        self.rpc = Rpc(self.link, self.process)
        self.degraded_since: float | None = None
        self._state: dict[str, object] | None = None
        self._state_at = 0.0
        self._state_changed = asyncio.Event()

    async def start(self) -> None:
        await self.link.start()
        self.rpc.start()
        log.info("process %s joined the cluster at %s", self.process, self.link.url)

    async def stop(self) -> None:
        self.rpc.stop()
        await self.link.close()

    @property
    def state(self) -> dict[str, object]:
        """For admins' `core/ping`: this process, and whether NATS is there (worked out
        at most every `STATE_EVERY` seconds or on a change: pings may come by the
        thousand)."""
        now = time.monotonic()
        if self._state is None or now - self._state_at > STATE_EVERY:
            if self.degraded_since is None:
                self._state = {"process": self.process, "state": "connected",
                               "members": 1 + len(self.rpc.members())}
            else:
                self._state = {"process": self.process, "state": "degraded",
                               "since": round(time.time() - (now - self.degraded_since), 3)}
            self._state_at = now
        return self._state

    async def until(self, *, connected: bool) -> None:
        """Until NATS is there (or away): for tests and for whoever must wait for it."""
        while self.link.connected != connected:
            self._state_changed.clear()
            await self._state_changed.wait()

    def _changed(self, up: bool) -> None:
        self._state_changed.set()
        self._state = None
        if not up:
            self.rpc.lost_connection()
        if up:
            if self.degraded_since is not None:
                log.warning("cluster: NATS is back after %.1f s; working with the others "
                            "again", time.monotonic() - self.degraded_since)
            self.degraded_since = None
        elif self.degraded_since is None:
            self.degraded_since = time.monotonic()
            log.warning("cluster degraded: NATS is away; serving this process's own "
                        "sessions and events until it comes back")
