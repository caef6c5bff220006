"""The session registry of one process (PROTOCOL.md §3.1, §3.3, §6).

`LocalSessionRegistry` is the single-process `SessionRegistry` (see `contracts.py`): the
sessions of every service by id and by user, and the sessions parked for resuming (§3.3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.bus import HeldEvent
from nkservice.events.fanout import Events
from nkservice.protocol.messages import Response
from nkservice.service.contracts import Caller, Claim, SessionInfo, subscriptions_of
from nkservice.service.resume import ParkedSession
from nkservice.service.waiters import FutureWaiter

# Events a live session taken over by another process keeps for it, at least, while that
# process takes its subscriptions (milliseconds, normally).
HANDOVER_BUFFER = 1000


@dataclass(slots=True)
class _Book:
    """One service's sessions."""

    sessions: dict[str, Caller] = field(default_factory=dict)
    users: dict[str, dict[str, Caller]] = field(default_factory=dict)
    parked: dict[str, ParkedSession] = field(default_factory=dict)


def _info(session: Caller) -> SessionInfo:
    return SessionInfo(session.session_id, session.user, session.remote, session.transport,
                       session.meta, session.login_time, subscriptions_of(session))


class LocalSessionRegistry:
    """Implements `contracts.SessionRegistry`."""

    def __init__(self, events: Events) -> None:
        self._events = events
        self._books: dict[str, _Book] = {}

    def _book(self, service: str) -> _Book:
        book = self._books.get(service)
        if book is None:
            book = self._books[service] = _Book()
        return book

    def _live(self, service: str, session_id: str) -> Caller:
        found = self._book(service).sessions.get(session_id)
        if found is None:
            raise ApiError(ErrorCode.session_not_found)
        return found

    # -- logging in and out ----------------------------------------------------------------

    async def claim(self, session: Caller, user: str, session_id: str, *,
                    fresh: bool = False) -> Claim:
        service = session.service.name
        claim = Claim() if fresh else self.release(service, session_id, user) or Claim()
        book = self._book(service)
        book.sessions[session_id] = session
        book.users.setdefault(user, {})[session_id] = session
        return claim

    def release(self, service: str, session_id: str, user: str) -> Claim | None:
        """Let go of `session_id` for a new login of `user` here (§3.3): `hand_over`, and
        the events kept (a parked session's) returned in the claim at once."""
        handed = self.hand_over(service, session_id, user)
        if handed is None:
            return None
        claim, kept = handed
        claim.missed_events = [data for _, data in self.let_go(kept)]
        return claim

    def hand_over(self, service: str, session_id: str, user: str
                  ) -> tuple[Claim, ParkedSession] | None:
        """Let go of `session_id` for a new login of `user`, here or on another process of
        a cluster: a live session of that user is stopped and a parked one taken out; their
        subscriptions stay, held by the returned record that keeps what they bring until
        `let_go`, and the claim names them. None when there is neither;
        `duplicated_session_id` when another user's session is live (a parked one of
        another user is dropped)."""
        book = self._book(service)
        holder = book.sessions.get(session_id)
        if holder is not None:
            if holder.user != user:
                raise ApiError(ErrorCode.duplicated_session_id)
            kept = ParkedSession(holder, max(holder.service.config.resume_buffer,
                                             HANDOVER_BUFFER), self._events.bus)
            self._events.move(holder, kept)  # before the stop: no moment without them
            holder.stop("replaced by a new login with the same session id")
            return Claim(list(kept.subscriptions.values())), kept
        parked = self._take_parked(book, session_id)
        if parked is None:
            return None
        if parked.user != user:
            self._events.drop(parked)
            return None
        return Claim(list(parked.subscriptions.values()), resumed=True), parked

    def let_go(self, kept: ParkedSession) -> list[HeldEvent]:
        """The end of a `hand_over`: the subscriptions leave, and what they brought."""
        self._events.drop(kept)
        return list(kept.buffer)

    def holds(self, service: str, session_id: str) -> bool:
        """Is this session live here?"""
        return session_id in self._book(service).sessions

    def ended(self, session: Caller) -> None:
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
        parked = ParkedSession(session, config.resume_buffer, self._events.bus)
        # Written, maybe never read; no id: no other process may have them (`resume.py`).
        parked.buffer.extend((None, data) for data in session.conn.unanswered_events())
        self._events.move(session, parked)
        parked.expiry = asyncio.get_running_loop().call_later(
            config.resume_window, self._unpark, book, parked.session_id)
        book.parked[parked.session_id] = parked

    def _unpark(self, book: _Book, session_id: str) -> None:
        """A parked session's window passed, or its service stopped: it ends."""
        parked = self._take_parked(book, session_id)
        if parked is not None:
            self._events.drop(parked)

    @staticmethod
    def _take_parked(book: _Book, session_id: str) -> ParkedSession | None:
        parked = book.parked.pop(session_id, None)
        if parked is not None and parked.expiry is not None:
            parked.expiry.cancel()
        return parked

    def forget_service(self, service: str) -> None:
        book = self._books.pop(service, None)
        if book is not None:
            for session_id in list(book.parked):
                self._unpark(book, session_id)

    def parked(self, service: str) -> list[str]:
        """The ids of the sessions parked for resuming."""
        return list(self._book(service).parked)

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
