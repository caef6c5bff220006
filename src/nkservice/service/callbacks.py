"""Callbacks to external apps (PROTOCOL.md §7): registrations, load balancing, failover, and
the link that fires them from a service's logic chain.

An app is an admin or service-admin connection that registered for a kind of callback of a
service. Each fired callback is one request to one app, chosen round-robin among the apps
registered for it; if that app drops or misses its deadline (§1.3 closes it), the request
goes once more to another one; with none left, the link applies the fallback of §7
(login: the next step of the chain; subscribe: allowed; cmd: `service_unavailable`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import perf_counter
from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.index import Topic
from nkservice.metrics import Metrics
from nkservice.protocol.messages import Request, Response
from nkservice.service.contracts import (
    CONTINUE,
    MAX_SESSION_ID_LENGTH,
    CallbackKey,
    CallbackRegistry,
    Caller,
    Continue,
    LoginAttempt,
    LoginDecision,
    caller_data,
    event_data,
    login_data,
    request_data,
    subscription_data,
)
from nkservice.service.logic import Link

log = logging.getLogger(__name__)

CALLBACK_SUBCLASS = "callback"


class LocalCallbacks:
    """The `CallbackRegistry` of one process."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._apps: dict[CallbackKey, list[Caller]] = {}
        self._turn: dict[CallbackKey, int] = {}
        self.metrics = metrics or Metrics()  # failovers are counted here

    def register(self, key: CallbackKey, app: Caller) -> None:
        apps = self._apps.setdefault(key, [])
        if app not in apps:
            apps.append(app)
        return None

    def unregister(self, key: CallbackKey, app: Caller) -> None:
        apps = self._apps.get(key)
        if apps is not None and app in apps:
            apps.remove(app)
            if not apps:
                del self._apps[key]
                self._turn.pop(key, None)

    def drop(self, app: Caller) -> None:
        for key in self.keys_of(app):
            self.unregister(key, app)

    def forget_service(self, service: str) -> None:
        for key in [key for key in self._apps if key.service == service]:
            del self._apps[key]
            self._turn.pop(key, None)

    def registered(self, key: CallbackKey) -> bool:
        return key in self._apps

    def apps(self, key: CallbackKey) -> list[Caller]:
        """The apps registered for `key`, in their order."""
        return self._apps.get(key, [])

    def keys(self) -> list[CallbackKey]:
        return list(self._apps)

    def keys_of(self, app: Caller) -> list[CallbackKey]:
        return [key for key, apps in self._apps.items() if app in apps]

    async def listing(self, service: str | None) -> list[dict[str, Any]]:
        return [{"callback": key.kind, "class": key.class_, "service": key.service,
                 "session_id": app.session_id}
                for key, apps in self._apps.items() if service in (None, key.service)
                for app in apps]

    def _next(self, key: CallbackKey, tried: list[Caller]) -> Caller | None:
        apps = self._apps.get(key, [])
        if tried:
            apps = [app for app in apps if app not in tried]
        if not apps:
            return None
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        return apps[turn % len(apps)]

    def call(self, key: CallbackKey, cmd: str, data: Any, *,
             on_ack: Callable[[], None] | None = None,
             decide: Callable[[Response | None], Any] = lambda answer: answer
             ) -> asyncio.Future[Any]:
        relay = _Relay(self, key, cmd, data, on_ack, decide)
        relay.ask_next()
        return relay.result


class _Relay:
    """One fired callback: the `Waiter` of the app's answer, which asks a second app when
    the first one's connection ends. No task: it runs from the connections' own events."""

    __slots__ = ("_callbacks", "_cmd", "_data", "_decide", "_key", "_on_ack", "result",
                 "tried")

    def __init__(self, callbacks: LocalCallbacks, key: CallbackKey, cmd: str, data: Any,
                 on_ack: Callable[[], None] | None,
                 decide: Callable[[Response | None], Any]) -> None:
        self._callbacks = callbacks
        self._decide = decide
        self._key = key
        self._cmd = cmd
        self._data = data
        self._on_ack = on_ack
        self.tried: list[Caller] = []
        self.result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def _settle(self, answer: Response | None) -> None:
        try:
            self.result.set_result(self._decide(answer))
        except Exception as exc:  # an ApiError for the user, or a bug: reported there
            self.result.set_exception(exc)

    def ask_next(self) -> None:
        app = self._callbacks._next(self._key, self.tried) if len(self.tried) < 2 else None
        if app is None:
            self._settle(None)
            return
        self.tried.append(app)
        app.conn.send_request("core", self._cmd, self._data, subclass=CALLBACK_SUBCLASS,
                              waiter=self)

    def answered(self, response: Response) -> None:
        if not self.result.done():
            self._settle(response)

    def acked(self) -> None:
        if self._on_ack is not None and not self.result.done():
            self._on_ack()

    def failed(self, error: ApiError) -> None:
        """Its connection ended (a missed deadline closes it)."""
        if self.result.done():
            return
        log.warning("callback %s of %s: app %s failed (%s)%s", self._cmd, self._key.service,
                    self.tried[-1].session_id, error.text,
                    "; trying another" if len(self.tried) < 2 else "")
        if len(self.tried) < 2:
            self._callbacks.metrics.count("nkservice_callback_failovers", (self._key.kind,))
        self.ask_next()


def _authorized(answer: Response, what: str) -> tuple[bool, dict[str, Any]]:
    """An app's answer to a login or subscribe callback: authorized?, and its fields. Any
    other shape is a refusal (§7), logged as `invalid_reply`."""
    fields = answer.data if answer.ok and isinstance(answer.data, dict) else None
    if fields is None:
        log.warning("invalid_reply to %s: %r", what, answer.data)
        return False, {}
    authorized = fields.get("authorized")
    if authorized is True or authorized == "true":  # not `in`: 1 == True in Python
        return True, fields
    if authorized is not False and authorized != "false":
        log.warning("invalid_reply to %s: authorized is %r", what, authorized)
        return False, {}
    return False, fields


def _command_answer(answer: Response | None) -> Any:
    """The user's answer to a request of a `cmd` callback: the app's (errors included)."""
    if answer is None:
        raise ApiError(ErrorCode.service_unavailable)
    if answer.ok:
        return answer.data
    raise answer.error()


def _text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    return value if isinstance(value, str) and value else None


class CallbackLink(Link):
    """A service's callbacks in its logic chain: below plugins and Lua, above static users."""

    core_requests = False  # `cmd` callbacks are for the classes of apps

    def __init__(self, service: str, callbacks: CallbackRegistry, metrics: Metrics) -> None:
        self._service = service
        self._callbacks = callbacks
        self._metrics = metrics
        self._login = CallbackKey(service, "login")
        self._subscribe = CallbackKey(service, "subscribe")

    def login(self, attempt: LoginAttempt) -> Continue | Any:
        if not self._callbacks.registered(self._login):
            return CONTINUE
        return self._ask_login(attempt)

    async def _ask_login(self, attempt: LoginAttempt) -> LoginDecision | Continue:
        answer = await self._call(self._login, "api_server_login", login_data(attempt),
                                  on_ack=attempt.ack)
        if answer is None:
            return CONTINUE  # no app left: the next step decides
        authorized, fields = _authorized(answer, f"the login of {attempt.user!r}")
        if not authorized:
            return LoginDecision(False, reason=_text(fields, "reason"))
        extra = fields.get("data")
        session_id = _text(fields, "session_id")
        if session_id is not None and len(session_id) > MAX_SESSION_ID_LENGTH:
            log.warning("invalid_reply to the login of %r: a session id of %d characters",
                        attempt.user, len(session_id))
            return LoginDecision(False)
        return LoginDecision(True, user=_text(fields, "user"),
                             session_id=session_id, meta=fields.get("meta"),
                             data=extra if isinstance(extra, dict) else {})

    def subscribe(self, caller: Caller, topic: Topic) -> Continue | Any:
        if not self._callbacks.registered(self._subscribe):
            return CONTINUE
        return self._ask_subscribe(caller, topic)

    async def _ask_subscribe(self, caller: Caller, topic: Topic) -> Continue | None:
        answer = await self._call(self._subscribe, "api_server_subscribe", {
            **caller_data(caller), "subscription": subscription_data(topic)})
        if answer is None:
            return CONTINUE  # no app left: allowed
        authorized, fields = _authorized(answer, f"a subscription of {caller.user!r}")
        if not authorized:
            raise ApiError(ErrorCode.unauthorized, _text(fields, "reason"))
        return None

    def command(self, caller: Caller, request: Request) -> Any:
        key = CallbackKey(self._service, "cmd", request.class_)
        if not self._callbacks.registered(key):
            return CONTINUE
        # Asked at once and answered from a future's callback: no task per request, and the
        # request to the app goes out with the rest of what this read produced.
        return self._call(
            key, "api_server_cmd", {**caller_data(caller), "request": request_data(request)},
            on_ack=lambda: caller.conn.ack(request.tid), decide=_command_answer)

    def client_event(self, caller: Caller, request: Request) -> Continue | Any:
        keys = [key for key in (CallbackKey(self._service, "event", request.class_),
                                CallbackKey(self._service, "event"))
                if self._callbacks.registered(key)]
        if not keys:
            return CONTINUE
        return self._tell_event(keys, caller, request)

    async def _tell_event(self, keys: list[CallbackKey], caller: Caller,
                          request: Request) -> Continue:
        data = {**caller_data(caller), "event": event_data(request)}
        for key in keys:
            await self._call(key, "api_server_event", data)
        return CONTINUE  # plugins and Lua above have seen it; nothing below wants it

    def _call(self, key: CallbackKey, cmd: str, data: Any, *,
              on_ack: Callable[[], None] | None = None,
              decide: Callable[[Response | None], Any] = lambda answer: answer
              ) -> asyncio.Future[Any]:
        """Fire a callback, timing it until it is decided (failover included)."""
        started = perf_counter()
        decided = self._callbacks.call(key, cmd, data, on_ack=on_ack, decide=decide)
        decided.add_done_callback(lambda _: self._metrics.observe(
            "nkservice_callback_duration_seconds", (key.kind,), perf_counter() - started))
        return decided
