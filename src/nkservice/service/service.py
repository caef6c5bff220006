"""A service: its configuration, its live sessions and its hook points (PROTOCOL.md §3, §4)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.bus import EventBus
from nkservice.events.index import Subscription, Topic
from nkservice.protocol.connection import CloseCode, Connection, Wire
from nkservice.protocol.messages import Request
from nkservice.service.config import Credentials, ServiceConfig
from nkservice.service.login import LoginStep, login_chain
from nkservice.service.resume import Claim, ParkedSession
from nkservice.service.session import Session

log = logging.getLogger(__name__)


class Directory(Protocol):
    """What a service needs from its node: the global admin and the other services."""

    @property
    def admin(self) -> Credentials: ...

    @property
    def events(self) -> EventBus: ...

    def find_service(self, name: str) -> Service | None: ...


class Service:
    def __init__(self, config: ServiceConfig, directory: Directory,
                 login_logic: list[LoginStep] | None = None) -> None:
        self.config = config
        self.name = config.name
        self.directory = directory
        self.events = directory.events
        self.login_chain = login_chain(directory.admin, config.admin, config.users,
                                       login_logic or [], is_core=config.name == "core")
        self.sessions: dict[str, Session] = {}
        self.users: dict[str, dict[str, Session]] = {}
        self.connections: set[Session] = set()  # logged in or not, for shutdown
        self.parked: dict[str, ParkedSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def accept(self, wire: Wire, clock: Callable[[], float], transport: str, host: str,
               port: int) -> Connection:
        """A new connection on one of this service's listeners."""
        session = Session(self, wire, clock, transport, f"{transport}:{host}:{port}")
        self.connections.add(session)
        return session.conn

    # -- the registry ----------------------------------------------------------------------

    def claim_session_id(self, session_id: str, user: str) -> Claim:
        """Make room for a session id chosen at login (§3.3), or refuse it. A live session of
        the same user is replaced, a parked one resumed: the new session takes over their
        subscriptions (and the events a parked one kept)."""
        holder = self.sessions.get(session_id)
        if holder is not None:
            if holder.user != user:
                raise ApiError(ErrorCode.duplicated_session_id)
            inherited = list(holder.subscriptions.values())
            holder.stop("replaced by a new login with the same session id")
            return Claim(inherited)
        unparked = self._unpark(session_id)
        if unparked is None or unparked[0].user != user:
            return Claim()
        parked, subscriptions = unparked
        return Claim(subscriptions, list(parked.buffer), resumed=True)

    def session_ended(self, session: Session) -> None:
        """A logged-in session closed: park it for resuming (when its connection ended it,
        not the server: a stop, a replacement, a shutdown), or drop its subscriptions."""
        window = self.config.resume_window
        if window <= 0 or session.stopped:
            self.events.drop(session)
            return
        parked = ParkedSession(session, self.config.resume_buffer)
        self.events.move(session, parked)
        parked.expiry = asyncio.get_running_loop().call_later(window, self._unpark,
                                                              parked.session_id)
        self.parked[parked.session_id] = parked

    def _unpark(self, session_id: str) -> tuple[ParkedSession, list[Subscription]] | None:
        """Take a parked session out (resumed, taken by another user, or expired): its
        subscriptions leave the index and are returned, for whoever resumes it."""
        parked = self.parked.pop(session_id, None)
        if parked is None:
            return None
        if parked.expiry is not None:
            parked.expiry.cancel()
        return parked, self.events.drop(parked)

    def add(self, session: Session) -> None:
        self.sessions[session.session_id] = session
        self.users.setdefault(session.user, {})[session.session_id] = session

    def closed(self, session: Session) -> None:
        self.connections.discard(session)
        if self.sessions.get(session.session_id) is not session:
            return
        del self.sessions[session.session_id]
        of_user = self.users[session.user]
        del of_user[session.session_id]
        if not of_user:
            del self.users[session.user]

    def session(self, session_id: str) -> Session:
        found = self.sessions.get(session_id)
        if found is None:
            raise ApiError(ErrorCode.session_not_found)
        return found

    # -- hook points -----------------------------------------------------------------------

    def client_event(self, session: Session, request: Request) -> None:
        """A client event (§5.3): the service's event logic (plugins, callbacks) plugs in here."""
        log.debug("client event %s from %s", request.class_, session.session_id)

    def authorize_subscription(self, session: Session, topic: Topic) -> None:
        """The service's subscribe logic (plugins, Lua, the `subscribe` callback) plugs in
        here; it raises `ApiError(unauthorized)` to refuse. Everything is allowed for now."""

    def handle_class(self, session: Session, request: Request) -> Any:
        """A request of a non-core class: plugins, scripts and `cmd` callbacks plug in here."""
        raise ApiError(ErrorCode.unknown_class, request.class_)

    # -- housekeeping ----------------------------------------------------------------------

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self, reason: str) -> None:
        for session in list(self.connections):
            session.stop(reason, CloseCode.going_away)
        for session_id in list(self.parked):
            self._unpark(session_id)
        for task in list(self._tasks):
            task.cancel()
