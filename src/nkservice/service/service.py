"""A service: its configuration, its logic chain and its connections (PROTOCOL.md §3, §4).

What a service shares with the rest of the node — the event bus, the session registry, the
other services — comes from its `Directory` (the node), so the same service runs unchanged
whether those are in-process or spread over a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from nkservice.metrics import disconnect_reason
from nkservice.protocol.connection import CloseCode, Connection, Wire
from nkservice.service.callbacks import CallbackLink
from nkservice.service.config import ServiceConfig
from nkservice.service.contracts import Caller, Directory
from nkservice.service.core_logic import CoreLogic
from nkservice.service.logic import Link, LogicChain
from nkservice.service.login import StaticUsersLogin, administrators
from nkservice.service.session import Session

log = logging.getLogger(__name__)


class Service:
    """A `ServiceContext` to its sessions, commands and links."""

    def __init__(self, config: ServiceConfig, directory: Directory,
                 logic: Sequence[Link] = ()) -> None:
        """`logic`: the links between the administrators and the callbacks (plugins, Lua),
        top first."""
        self.config = config
        self.name = config.name
        self.directory = directory
        self.events = directory.events
        self.registry = directory.registry
        self.logic = self._chain(config, logic)
        self.connections: set[Caller] = set()  # logged in or not, for shutdown
        self._tasks: set[asyncio.Task[None]] = set()

    def _chain(self, config: ServiceConfig, logic: Sequence[Link]) -> LogicChain:
        directory = self.directory
        is_core = config.name == "core"  # only the global administrator logs in there
        links = [*administrators(directory.admin, config.admin, is_core=is_core), *logic]
        if not is_core:
            links += [CallbackLink(config.name, directory.callbacks, directory.metrics),
                      StaticUsersLogin(config.users)]
        return LogicChain([*links, CoreLogic()])

    async def new_chain(self, config: ServiceConfig, logic: Sequence[Link]) -> LogicChain:
        """The chain of a new definition, started, for `reconfigure` (or to stop)."""
        chain = self._chain(config, logic)
        await chain.start()
        return chain

    def reconfigure(self, config: ServiceConfig, chain: LogicChain) -> None:
        """Take a new definition while running: the new chain decides every login and
        request from now on, and the connections take the new limits."""
        old, self.logic, self.config = self.logic, chain, config
        for caller in self.connections:
            caller.conn.apply_limits(config.limits)
        old.stop()

    def accept(self, wire: Wire, clock: Callable[[], float], transport: str, host: str,
               port: int) -> Connection:
        """A new connection on one of this service's listeners."""
        session = Session(self, wire, clock, transport, f"{transport}:{host}:{port}")
        self.connections.add(session)
        self.directory.metrics.count("nkservice_connections_accepted", (self.name, transport))
        return session.conn

    def closed(self, caller: Caller) -> None:
        self.connections.discard(caller)
        self.directory.metrics.count("nkservice_disconnects",
                                     (disconnect_reason(caller.conn.end_reason),))
        if caller.session_id:  # it had logged in
            self.directory.callbacks.drop(caller)
            self.registry.ended(caller)
            self.logic.session_stop(caller)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Before the first connection: the links take what they need."""
        await self.logic.start()

    def stop(self, reason: str) -> None:
        """Close every connection, telling it why; forget what was parked for resuming."""
        for session in list(self.connections):
            session.stop(reason, CloseCode.going_away)
        self.registry.forget_service(self.name)
        self.events.drop_service(self.name)
        self.directory.callbacks.forget_service(self.name)
        for task in list(self._tasks):
            task.cancel()
        self.logic.stop()
