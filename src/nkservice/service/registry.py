"""The session registry (PROTOCOL.md §3.1, §3.3, §6): which sessions exist, and reaching them.

`SessionRegistry` is the seam the core commands use for every session they do not hold
themselves: claim an id at login (take over the same user's session, resume a parked one,
refuse another user's), find one, list a service's users and their sessions, stop one, send
one a request and await its answer. It is async because in a cluster the session may live
in another process. `LocalSessionRegistry` is the single-process implementation; it also
parks sessions for resuming (§3.3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.fanout import Events
from nkservice.events.index import Subscription
from nkservice.protocol.messages import Response
from nkservice.service.resume import Claim, ParkedSession
from nkservice.service.waiters import FutureWaiter

if TYPE_CHECKING:
    from nkservice.service.session import Session


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What `user`/`get` shows of a session (§6)."""

    session_id: str
    user: str
    remote: str
    transport: str
    meta: Any
    login_time: int

    def describe(self) -> dict[str, Any]:
        return {"remote": self.remote, "transport": self.transport, "meta": self.meta,
                "login_time": self.login_time}


class SessionRegistry(Protocol):
    async def claim(self, session: Session, user: str, session_id: str) -> Claim:
        """Register a session that logs in as `user` under `session_id` (§3.3): a live
        session of the same user is replaced, a parked one resumed (the claim carries what
        they leave to it); another user's id raises `duplicated_session_id`."""

    def ended(self, session: Session) -> None:
        """A session closed: forget it, or park it for resuming."""

    async def find(self, service: str, session_id: str) -> SessionInfo | None: ...

    async def users(self, service: str) -> dict[str, list[str]]:
        """Each user of the service with the ids of its live sessions."""

    async def sessions_of(self, service: str, user: str) -> dict[str, SessionInfo]: ...

    async def stop(self, service: str, session_id: str, reason: str) -> str:
        """Stop a session (just after the caller's answer is sent); returns its user."""

    async def request(self, service: str, session_id: str, class_: str, cmd: str, data: Any,
                      *, subclass: str | None, on_ack: Callable[[], None],
                      timeout: float | None) -> Response:
        """Send a session a request and return its answer; each ack calls `on_ack`."""

    def forget_service(self, service: str) -> None:
        """The service stopped: drop what it parked."""


@dataclass(slots=True)
class _Book:
    """One service's sessions."""

    sessions: dict[str, Session] = field(default_factory=dict)
    users: dict[str, dict[str, Session]] = field(default_factory=dict)
    parked: dict[str, ParkedSession] = field(default_factory=dict)


def _info(session: Session) -> SessionInfo:
    return SessionInfo(session.session_id, session.user, session.remote, session.transport,
                       session.meta, session.login_time)


class LocalSessionRegistry:
    def __init__(self, events: Events) -> None:
        self._events = events
        self._books: dict[str, _Book] = {}

    def _book(self, service: str) -> _Book:
        book = self._books.get(service)
        if book is None:
            book = self._books[service] = _Book()
        return book

    def _live(self, service: str, session_id: str) -> Session:
        found = self._book(service).sessions.get(session_id)
        if found is None:
            raise ApiError(ErrorCode.session_not_found)
        return found

    # -- logging in and out ----------------------------------------------------------------

    async def claim(self, session: Session, user: str, session_id: str) -> Claim:
        book = self._book(session.service.name)
        holder = book.sessions.get(session_id)
        if holder is not None:
            if holder.user != user:
                raise ApiError(ErrorCode.duplicated_session_id)
            inherited = list(holder.subscriptions.values())
            holder.stop("replaced by a new login with the same session id")
            claim = Claim(inherited)
        else:
            unparked = self._unpark(book, session_id)
            if unparked is not None and unparked[0].user == user:
                parked, subscriptions = unparked
                claim = Claim(subscriptions, list(parked.buffer), resumed=True)
            else:
                claim = Claim()
        book.sessions[session_id] = session
        book.users.setdefault(user, {})[session_id] = session
        return claim

    def ended(self, session: Session) -> None:
        """Forget it; park it when its service resumes sessions and its connection ended it
        (not the server: a stop, a replacement, a shutdown are final)."""
        book = self._book(session.service.name)
        if book.sessions.get(session.session_id) is session:
            del book.sessions[session.session_id]
            of_user = book.users[session.user]
            del of_user[session.session_id]
            if not of_user:
                del book.users[session.user]
        config = session.service.config
        if config.resume_window <= 0 or session.stopped:
            self._events.drop(session)
            return
        parked = ParkedSession(session, config.resume_buffer)
        self._events.move(session, parked)
        parked.expiry = asyncio.get_running_loop().call_later(
            config.resume_window, self._unpark, book, parked.session_id)
        book.parked[parked.session_id] = parked

    def _unpark(self, book: _Book, session_id: str
                ) -> tuple[ParkedSession, list[Subscription]] | None:
        """Take a parked session out (resumed, taken by another user, or expired): its
        subscriptions leave the index and are returned, for whoever resumes it."""
        parked = book.parked.pop(session_id, None)
        if parked is None:
            return None
        if parked.expiry is not None:
            parked.expiry.cancel()
        return parked, self._events.drop(parked)

    def forget_service(self, service: str) -> None:
        book = self._books.pop(service, None)
        if book is not None:
            for session_id in list(book.parked):
                self._unpark(book, session_id)

    # -- reaching sessions -----------------------------------------------------------------

    async def find(self, service: str, session_id: str) -> SessionInfo | None:
        found = self._book(service).sessions.get(session_id)
        return None if found is None else _info(found)

    async def users(self, service: str) -> dict[str, list[str]]:
        return {user: list(sessions) for user, sessions in self._book(service).users.items()}

    async def sessions_of(self, service: str, user: str) -> dict[str, SessionInfo]:
        sessions = self._book(service).users.get(user, {})
        return {session_id: _info(session) for session_id, session in sessions.items()}

    async def stop(self, service: str, session_id: str, reason: str) -> str:
        target = self._live(service, session_id)
        # After the caller's answer is written: the caller may be stopping itself.
        asyncio.get_running_loop().call_soon(target.stop, reason)
        return target.user

    async def request(self, service: str, session_id: str, class_: str, cmd: str, data: Any,
                      *, subclass: str | None, on_ack: Callable[[], None],
                      timeout: float | None) -> Response:
        target = self._live(service, session_id)
        waiter = FutureWaiter(on_ack=on_ack)
        target.conn.send_request(class_, cmd, data, subclass=subclass, waiter=waiter)
        return await waiter.response(within=timeout)
