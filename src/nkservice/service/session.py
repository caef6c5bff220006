"""One client connection as the service sees it: login, then a session (PROTOCOL.md §3, §4).

`Session` is the `RequestHandler` of a `Connection`. Before login it answers only `login` and
`ping`; requests that arrive while a login is being decided wait in arrival order. After
login every request goes down the service's logic chain (`logic.py`): client events to
whoever wants them, everything else to the first link that answers, the core commands at
the base.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.bus import HeldEvent
from nkservice.events.index import Subscription, Topic
from nkservice.protocol.connection import CloseCode, Connection, Wire
from nkservice.protocol.messages import Request
from nkservice.protocol.names import canonical
from nkservice.service.contracts import (
    CONTINUE,
    MAX_SESSION_ID_LENGTH,
    LoginAttempt,
    LoginDecision,
    ServiceContext,
)
from nkservice.service.event_commands import automatic_topics
from nkservice.service.logic import PLAIN, is_pending, settled
from nkservice.service.login import REFUSED
from nkservice.service.permissions import Role
from nkservice.service.requests import optional
from nkservice.service.resume import kept_then_new

log = logging.getLogger(__name__)

MAX_LOGIN_FAILURES = 5
MAX_LOGIN_DELAY = 5.0


class Session:
    __slots__ = (
        "_backlog",
        "_failures",
        "_metrics",
        "conn",
        "deliver",
        "home",
        "login_time",
        "meta",
        "remote",
        "role",
        "seed_form",
        "service",
        "session_id",
        "stopped",
        "subscriptions",
        "transport",
        "user",
    )

    def __init__(self, service: ServiceContext, wire: Wire, clock: Callable[[], float],
                 transport: str, remote: str) -> None:
        self.service = service
        self.home = service.name  # for `events/`: a plain attribute, read at every delivery
        self.transport = transport
        self.remote = remote
        self.user = ""
        self.session_id = ""
        self.meta: Any = None
        self.role = Role.user
        self.login_time = 0
        self.seed_form = False
        self.stopped = False  # ended by the server (not resumable), not by its connection
        self._failures = 0
        self._backlog: deque[Request] | None = None  # not None while a login is decided
        self.subscriptions: dict[Topic, Subscription] = {}
        self._metrics = service.directory.metrics
        self.conn = Connection(service.config.limits, wire, clock, self)
        # An event for this session (it is a `Subscriber` of `events/`): straight to its
        # connection, without a call of our own in between, once per receiver of each event.
        self.deliver: Callable[[bytes], None] = self.conn.send_event

    @property
    def logged_in(self) -> bool:
        return bool(self.session_id)

    def stop(self, reason: str, code: CloseCode = CloseCode.normal) -> None:
        self.stopped = True
        self.conn.close(reason, code)

    # -- RequestHandler ------------------------------------------------------------------

    def on_request(self, request: Request) -> None:
        metrics = self._metrics
        if metrics.time_next:  # a sample of the requests is timed (metrics.py)
            metrics.stamp(request)
        self._handle(request)

    def _handle(self, request: Request) -> None:
        if self._backlog is not None:
            self._backlog.append(request)
            return
        try:
            self._route(request)
        except ApiError as error:
            self._answer_error(request, error)
        except Exception:  # a bug must cost one request, not the connection
            log.exception("request %s/%s failed", request.class_, request.cmd)
            self._answer_error(request, ApiError(ErrorCode.internal_error))

    def _answer(self, request: Request, data: Any = None) -> None:
        self.conn.reply(request.tid, data)
        self._metrics.ok(request)

    def _answer_error(self, request: Request, error: ApiError) -> None:
        self.conn.reply_error(request.tid, error)
        self._metrics.failed(request, error.error.name)

    def on_closed(self) -> None:
        self.service.closed(self)

    # -- routing ---------------------------------------------------------------------------

    def _route(self, request: Request) -> None:
        if not self.logged_in:
            name = canonical(request.subclass, request.cmd) if request.class_ == "core" else None
            if name == ("core", "ping"):
                self._answer(request)
            elif name == ("user", "login"):
                self._start_login(request)
            else:
                raise ApiError(ErrorCode.not_authenticated)
            return
        logic = self.service.logic
        if request.cmd == "event":  # a client event, of any class (§5.3)
            self._answer(request)  # answered: a failure below is only logged
            try:
                seen = logic.client_event(self, request)
            except Exception:
                log.exception("client event %s from %s failed", request.class_,
                              self.session_id)
                return
            if is_pending(seen):
                self.service.spawn(self._see_event(request, seen))
            return
        result = logic.command(self, request)
        if type(result) in PLAIN:  # answered at once: the core commands, nearly always
            if result is CONTINUE:  # no link answered: a chain without its base
                raise ApiError(ErrorCode.unknown_class, request.class_)
            self._answer(request, result)
        elif isinstance(result, asyncio.Future):  # a decision to come: no task for it
            # The server's own work is bounded by ack_timeout (§1.3): then `timeout`.
            limit = asyncio.get_running_loop().call_later(self.conn.limits.ack_timeout,
                                                          result.cancel)
            result.add_done_callback(partial(self._answer_when_done, request, limit))
        elif is_pending(result):
            self.service.spawn(self._answer_later(request, result))
        else:
            self._answer(request, result)

    async def _answer_later(self, request: Request, work: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(self.conn.limits.ack_timeout):
                result = await work
        except ApiError as error:
            self._answer_error(request, error)
        except TimeoutError:
            self._answer_error(request, ApiError(ErrorCode.timeout))
        except Exception:
            log.exception("request %s/%s failed", request.class_, request.cmd)
            self._answer_error(request, ApiError(ErrorCode.internal_error))
        else:
            if result is CONTINUE:  # every link passed, after all
                self._answer_error(request, ApiError(ErrorCode.unknown_class, request.class_))
            else:
                self._answer(request, result)

    def _answer_when_done(self, request: Request, limit: asyncio.TimerHandle,
                          done: asyncio.Future[Any]) -> None:
        limit.cancel()
        if done.cancelled():  # by the limit
            self._answer_error(request, ApiError(ErrorCode.timeout))
        elif (error := done.exception()) is None:
            self._answer(request, done.result())
        elif isinstance(error, ApiError):
            self._answer_error(request, error)
        else:
            log.error("request %s/%s failed", request.class_, request.cmd, exc_info=error)
            self._answer_error(request, ApiError(ErrorCode.internal_error))

    async def _see_event(self, request: Request, seen: Awaitable[Any]) -> None:
        try:
            await seen
        except Exception:  # already answered ok: nobody else to tell
            log.exception("client event %s from %s failed", request.class_, self.session_id)

    # -- login -------------------------------------------------------------------------------

    def _start_login(self, request: Request) -> None:
        fields = request.fields
        user = optional(fields, "user", str, "")
        password = fields.get("password", fields.get("pass"))
        session_id = fields.get("session_id")
        if session_id is not None and not (
            isinstance(session_id, str) and 0 < len(session_id) <= MAX_SESSION_ID_LENGTH
        ):
            raise ApiError(ErrorCode.invalid_session_id)
        attempt = LoginAttempt(service=self.service.name, user=user, password=password,
                               meta=fields.get("meta"), session_id=session_id,
                               transport=self.transport, remote=self.remote,
                               ack=partial(self.conn.ack, request.tid))
        self._backlog = deque()
        self.service.spawn(self._login(request, attempt))

    async def _login(self, request: Request, attempt: LoginAttempt) -> None:
        try:
            decided = await settled(self.service.logic.login(attempt))
            decision = REFUSED if decided is CONTINUE else decided
            if decision.authorized:
                await self._become_session(request, attempt, decision)
            else:
                await self._refuse(request, attempt, decision)
        except ApiError as error:
            self._answer_error(request, error)
        except Exception:
            log.exception("login failed on service %s", self.service.name)
            self._answer_error(request, ApiError(ErrorCode.internal_error))
        finally:
            self._run_backlog()

    async def _become_session(self, request: Request, attempt: LoginAttempt,
                              decision: LoginDecision) -> None:
        if self.conn.closed:  # gone while the login logic was deciding
            return
        service = self.service
        user = decision.user or attempt.user
        chosen = decision.session_id or attempt.session_id
        session_id = chosen or str(uuid.uuid4())
        claim = await service.registry.claim(self, user, session_id, fresh=not chosen)
        self.user = user
        self.session_id = session_id
        if self.conn.closed:  # gone while the id was claimed: registered, so forget it
            service.registry.ended(self)
            return
        self.role = decision.role
        self.meta = decision.meta if decision.meta is not None else attempt.meta
        self.login_time = int(time.time() * 1000)
        self.seed_form = request.subclass is None
        events = service.events
        bus = events.bus
        held: list[HeldEvent] = []  # what arrives before the answer waits for it
        self.deliver = lambda data: held.append((bus.delivering, data))
        activating = [events.subscribe(self, topic)
                      for topic in automatic_topics(service.name, user, session_id)]
        activating += [events.subscribe(self, subscription.topic, subscription.body)
                       for subscription in claim.subscriptions]
        for active in activating:  # in a cluster: the others know of them before the answer
            if active is not None:
                await active
        # The missed before anything newer (§3.3); from another process, once this one has
        # the subscriptions, without what both got meanwhile (resume.py).
        kept: list[HeldEvent] = [(None, event) for event in claim.missed_events]
        if claim.handover is not None:
            kept = await claim.handover()
        self.deliver = self.conn.send_event
        if self.conn.closed:
            return
        self.conn.logged_in()
        answer = {**decision.data, "session_id": session_id, "user": user}
        if claim.resumed:
            answer["resumed"] = True
        self._answer(request, answer)
        for event in kept_then_new(kept, held):
            self.conn.send_event(event)
        service.logic.session_start(self)

    async def _refuse(self, request: Request, attempt: LoginAttempt,
                      decision: LoginDecision) -> None:
        self._failures += 1
        delay = self.service.config.login_failure_delay * 2 ** (self._failures - 1)
        await asyncio.sleep(min(delay, MAX_LOGIN_DELAY))
        if decision.reason:
            error = ApiError(ErrorCode.unauthorized, decision.reason)
        elif attempt.password_mismatch:
            error = ApiError(ErrorCode.invalid_password)
        else:
            error = ApiError(ErrorCode.unauthorized)
        self._answer_error(request, error)
        if self._failures >= MAX_LOGIN_FAILURES:
            self.conn.close("too many failed logins", CloseCode.policy)

    def _run_backlog(self) -> None:
        backlog, self._backlog = self._backlog, None
        while backlog and not self.conn.closed:
            self._handle(backlog.popleft())
            if self._backlog is not None:  # that request started another login
                self._backlog.extend(backlog)
                return
