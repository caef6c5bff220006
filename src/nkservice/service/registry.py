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
from nkservice.events.index import Subscription
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
        """Let go of `session_id` for a new login of `user` (§3.3): a live session of that
        user is stopped and a parked one taken out, and what they leave is returned; None
        when there is neither; `duplicated_session_id` when another user's session is
        live (a parked one of another user is dropped)."""
        book = self._book(service)
        holder = book.sessions.get(session_id)
        if holder is not None:
            if holder.user != user:
                raise ApiError(ErrorCode.duplicated_session_id)
            inherited = list(holder.subscriptions.values())
            holder.stop("replaced by a new login with the same session id")
            return Claim(inherited)
        unparked = self._unpark(book, session_id)
        if unparked is None or unparked[0].user != user:
            return None
        parked, subscriptions = unparked
        return Claim(subscriptions, [data for _, data in parked.buffer], resumed=True)

    def hand_over(self, service: str, session_id: str, user: str
                  ) -> tuple[Claim, ParkedSession] | None:
        """`release` for a login on another process of a cluster: the subscriptions stay,
        held by the returned record that keeps what they bring until `let_go`; the claim
        names them (no events: `let_go` has them)."""
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
        parked = book.parked.get(session_id)
        if parked is None or parked.user != user:
            self._unpark(book, session_id)  # another user's: dropped, as `release` does
            return None
        del book.parked[session_id]
        if parked.expiry is not None:
            parked.expiry.cancel()
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
