"""One client connection as the service sees it: login, then a session (PROTOCOL.md §3, §4).

`Session` is the `RequestHandler` of a `Connection`. Before login it answers only `login` and
`ping`; requests that arrive while a login is being decided wait in arrival order. After
login it routes each request: client events, other classes (the hook point for plugins and
callbacks), and the core commands of `commands.py`, each checked against the caller's role.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events import commands as event_commands
from nkservice.events.bus import automatic_topics
from nkservice.events.index import Subscription, Topic
from nkservice.protocol.connection import CloseCode, Connection, Wire
from nkservice.protocol.messages import Request
from nkservice.protocol.names import canonical
from nkservice.service import commands as session_commands
from nkservice.service.login import LoginAttempt, LoginDecision, decide
from nkservice.service.permissions import Role, allowed
from nkservice.service.requests import optional

if TYPE_CHECKING:
    from nkservice.service.service import Service

log = logging.getLogger(__name__)

MAX_LOGIN_FAILURES = 5
MAX_LOGIN_DELAY = 5.0
MAX_SESSION_ID_LENGTH = 128
COMMANDS = {**session_commands.TABLE, **event_commands.TABLE}


class Session:
    __slots__ = (
        "_backlog",
        "_failures",
        "conn",
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

    def __init__(self, service: Service, wire: Wire, clock: Callable[[], float],
                 transport: str, remote: str) -> None:
        self.service = service
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
        self.conn = Connection(service.config.limits, wire, clock, self)

    @property
    def logged_in(self) -> bool:
        return bool(self.session_id)

    def describe(self) -> dict[str, Any]:
        return {"remote": self.remote, "transport": self.transport, "meta": self.meta,
                "login_time": self.login_time}

    def stop(self, reason: str, code: CloseCode = CloseCode.normal) -> None:
        self.stopped = True
        self.conn.close(reason, code)

    # -- RequestHandler ------------------------------------------------------------------

    def on_request(self, request: Request) -> None:
        if self._backlog is not None:
            self._backlog.append(request)
            return
        try:
            self._route(request)
        except ApiError as error:
            self.conn.reply_error(request.tid, error)
        except Exception:  # a bug must cost one request, not the connection
            log.exception("request %s/%s failed", request.class_, request.cmd)
            self.conn.reply_error(request.tid, ApiError(ErrorCode.internal_error))

    def on_closed(self) -> None:
        self.service.closed(self)
        if self.logged_in:
            self.service.session_ended(self)
            self._publish_lifecycle("stop")

    def _publish_lifecycle(self, what: str) -> None:
        """`core/session/start|stop` in the session's service (§5.4)."""
        self.service.events.publish(
            Topic(self.service.name, "core", "session", what, self.session_id),
            {"user": self.user, "remote": self.remote, "transport": self.transport})

    # -- routing ---------------------------------------------------------------------------

    def _route(self, request: Request) -> None:
        is_core = request.class_ == "core"
        name = canonical(request.subclass, request.cmd) if is_core else None
        if not self.logged_in:
            if name == ("core", "ping"):
                self.conn.reply(request.tid)
            elif name == ("user", "login"):
                self._start_login(request)
            else:
                raise ApiError(ErrorCode.not_authenticated)
            return
        if request.cmd == "event":  # a client event, of any class (§5.3)
            self.conn.reply(request.tid)
            self.service.client_event(self, request)
            return
        if not is_core:
            self.conn.reply(request.tid, self.service.handle_class(self, request))
            return
        if name == ("user", "login"):
            raise ApiError(ErrorCode.already_authenticated)
        command = COMMANDS.get(name) if name is not None else None
        if name is None or command is None:
            raise ApiError(ErrorCode.unknown_command, request.cmd)
        if not allowed(self.role, command.least_role, permissions=self.service.config.permissions,
                       user=self.user, action=("core", *name)):
            raise ApiError(ErrorCode.unauthorized)
        result = command.handler(self, request)
        if command.is_async:
            self.service.spawn(self._answer_later(request, result))
        else:
            self.conn.reply(request.tid, result)

    async def _answer_later(self, request: Request, work: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(self.conn.limits.ack_timeout):
                result = await work
        except ApiError as error:
            self.conn.reply_error(request.tid, error)
        except TimeoutError:
            self.conn.reply_error(request.tid, ApiError(ErrorCode.timeout))
        except Exception:
            log.exception("request %s/%s failed", request.class_, request.cmd)
            self.conn.reply_error(request.tid, ApiError(ErrorCode.internal_error))
        else:
            self.conn.reply(request.tid, result)

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
                               transport=self.transport, remote=self.remote)
        self._backlog = deque()
        self.service.spawn(self._login(request, attempt))

    async def _login(self, request: Request, attempt: LoginAttempt) -> None:
        try:
            decision = await decide(self.service.login_chain, attempt)
            if decision.authorized:
                self._become_session(request, attempt, decision)
            else:
                await self._refuse(request, attempt, decision)
        except ApiError as error:
            self.conn.reply_error(request.tid, error)
        except Exception:
            log.exception("login failed on service %s", self.service.name)
            self.conn.reply_error(request.tid, ApiError(ErrorCode.internal_error))
        finally:
            self._run_backlog()

    def _become_session(self, request: Request, attempt: LoginAttempt,
                        decision: LoginDecision) -> None:
        if self.conn.closed:  # gone while the login logic was deciding
            return
        user = decision.user or attempt.user
        session_id = decision.session_id or attempt.session_id or str(uuid.uuid4())
        claim = self.service.claim_session_id(session_id, user)
        self.user = user
        self.session_id = session_id
        self.role = decision.role
        self.meta = decision.meta if decision.meta is not None else attempt.meta
        self.login_time = int(time.time() * 1000)
        self.seed_form = request.subclass is None
        self.service.add(self)
        events = self.service.events
        for topic in automatic_topics(self.service.name, user, session_id):
            events.subscribe(self, topic)
        for subscription in claim.subscriptions:
            events.subscribe(self, subscription.topic, subscription.body)
        self.conn.logged_in()
        answer = {**decision.data, "session_id": session_id, "user": user}
        if claim.resumed:
            answer["resumed"] = True
        self.conn.reply(request.tid, answer)
        for event in claim.missed_events:  # before anything newer (§3.3)
            self.conn.send_event(event)
        self._publish_lifecycle("start")

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
        self.conn.reply_error(request.tid, error)
        if self._failures >= MAX_LOGIN_FAILURES:
            self.conn.close("too many failed logins", CloseCode.policy)

    def _run_backlog(self) -> None:
        backlog, self._backlog = self._backlog, None
        while backlog and not self.conn.closed:
            self.on_request(backlog.popleft())
            if self._backlog is not None:  # that request started another login
                self._backlog.extend(backlog)
                return
