"""The service logic chain (PROTOCOL.md §3, §7, §8): who decides what, in order.

A service's logic is a list of links, the top first and the core logic last (the base).
Each link may take part in any hook — a login, a subscription, a request, a client event,
a session's start and stop — and for each one either decides or passes to the next link by
returning `CONTINUE` (the original's `continue`). Callbacks to external apps, Python plugins
and Lua scripts are links; the base answers what nobody above it decided.

A link answers at once, or returns an awaitable of its answer: a coroutine, whose result
may itself be `CONTINUE` (the chain then goes on below that link), or an `asyncio.Future`,
a decision still to come, which is final (it is answered from its callback, with no task).
When every link of a hook answers at once the chain does too, so the core commands cost no
task and no await.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeGuard, TypeVar, cast

from nkservice.events.index import Topic
from nkservice.protocol.messages import Request
from nkservice.service.contracts import (
    CONTINUE,
    Caller,
    Continue,
    LoginAttempt,
    LoginDecision,
    Outcome,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


class Link:
    """A link of the chain (a `Logic`); every hook passes unless overridden."""

    core_requests = True
    """Whether `command` wants requests of class `core`; False skips it for them."""

    def login(self, attempt: LoginAttempt) -> Outcome[LoginDecision]:
        return CONTINUE

    def subscribe(self, caller: Caller, topic: Topic) -> Outcome[None]:
        return CONTINUE

    def command(self, caller: Caller, request: Request) -> Outcome[Any]:
        return CONTINUE

    def client_event(self, caller: Caller, request: Request) -> Outcome[None]:
        return CONTINUE

    def session_start(self, caller: Caller) -> None:
        """Every link is told, top first."""

    def session_stop(self, caller: Caller) -> None:
        """Every link is told, top first."""

    async def start(self) -> None:
        """The service is starting: take what the link needs (a socket, a thread)."""

    def stop(self) -> None:
        """The service has stopped: let go of it."""

def _overriding(links: Sequence[Link], hook: str) -> tuple[Link, ...]:
    base = getattr(Link, hook)
    return tuple(link for link in links if getattr(type(link), hook) is not base)


class LogicChain:
    """A service's links, top first; for each hook only the links that implement it."""

    def __init__(self, links: Sequence[Link]) -> None:
        self.links = tuple(links)
        self._login = _overriding(links, "login")
        self._subscribe = _overriding(links, "subscribe")
        self._command = _overriding(links, "command")
        self._client_event = _overriding(links, "client_event")
        self._start = _overriding(links, "session_start")
        self._stop = _overriding(links, "session_stop")
        # Core requests (nearly all of them) skip the links that serve only their own classes.
        self._core_command = tuple(link for link in self._command if link.core_requests)

    def login(self, attempt: LoginAttempt) -> Outcome[LoginDecision]:
        return _first(self._login, 0, lambda link: link.login(attempt))

    def subscribe(self, caller: Caller, topic: Topic) -> Outcome[None]:
        return _first(self._subscribe, 0, lambda link: link.subscribe(caller, topic))

    def command(self, caller: Caller, request: Request) -> Outcome[Any]:
        # Every request of every session comes here: the loop of `_first`, written out
        # without a closure until a link turns out to answer later, and no loop at all for
        # a single link (the base alone, usually), whose outcome is the chain's.
        links = self._core_command if request.class_ == "core" else self._command
        if len(links) == 1:
            return links[0].command(caller, request)
        for index, link in enumerate(links):
            outcome = link.command(caller, request)
            if outcome is CONTINUE:
                continue
            if isinstance(outcome, asyncio.Future):  # final: see the module's text
                return outcome
            if is_pending(outcome):
                return _settle(links, index + 1, lambda link: link.command(caller, request),
                               outcome)
            return outcome
        return CONTINUE

    def client_event(self, caller: Caller, request: Request) -> Outcome[None]:
        return _first(self._client_event, 0, lambda link: link.client_event(caller, request))

    # A link that fails to see a session start or stop must not keep the others from it,
    # nor undo the login or the close that called it: logged, and the chain goes on.

    def session_start(self, caller: Caller) -> None:
        for link in self._start:
            try:
                link.session_start(caller)
            except Exception:
                log.exception("session_start of %s failed", type(link).__name__)

    def session_stop(self, caller: Caller) -> None:
        for link in self._stop:
            try:
                link.session_stop(caller)
            except Exception:
                log.exception("session_stop of %s failed", type(link).__name__)

    async def start(self) -> None:
        """Start every link, top first; when one fails, those started are stopped."""
        started: list[Link] = []
        try:
            for link in self.links:
                await link.start()
                started.append(link)
        except BaseException:
            for link in reversed(started):
                link.stop()
            raise

    def stop(self) -> None:
        for link in self.links:
            link.stop()


# What answers at once is almost always one of these: no need to ask the Awaitable ABC.
PLAIN = frozenset({type(None), dict, list, str, int, float, bool, Continue})


def is_pending(outcome: object) -> TypeGuard[Awaitable[Any]]:
    """Is this outcome still to be awaited?"""
    return type(outcome) not in PLAIN and inspect.isawaitable(outcome)


def _first(links: tuple[Link, ...], start: int, call: Callable[[Link], Outcome[T]]
           ) -> Outcome[T]:
    """The first decision from `links[start:]`, at once or as an awaitable."""
    for index in range(start, len(links)):
        outcome = call(links[index])
        if outcome is CONTINUE:
            continue
        if is_pending(outcome):
            return _settle(links, index + 1, call, outcome)
        return outcome
    return CONTINUE


async def _settle(links: tuple[Link, ...], start: int, call: Callable[[Link], Outcome[T]],
                  pending: Awaitable[T | Continue]) -> T | Continue:
    outcome = await pending
    if outcome is not CONTINUE:
        return outcome
    return await settled(_first(links, start, call))


async def settled(outcome: Outcome[T]) -> T | Continue:
    """An outcome, awaited if need be."""
    if is_pending(outcome):
        return cast("T | Continue", await outcome)
    return cast("T | Continue", outcome)
