"""What the parts of a service see of each other: the seams of the `service` package.

Commands, logic links and the session registry are written against these protocols, never
against `Session` or `Service` themselves, so that the modules stack without cycles and a
second implementation (a cluster registry, a plugin's link) plugs in without touching them:

- `Caller`: a connection that logged in (or is logging in), as a command or a link sees it;
- `ServiceContext`: its service; `Directory`: the node around the service;
- `Logic`: the hooks of the service logic chain, which a single link and a whole chain
  both offer (see `logic.py`), with `LoginAttempt` and `LoginDecision`;
- `SessionRegistry`: every session of every service, wherever it lives (see `registry.py`);
- `CallbackRegistry`: the external apps registered for a service's callbacks (§7), and
  firing one (see `callbacks.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple, Protocol, TypeAlias, TypeVar

from nkservice.events.bus import HeldEvent
from nkservice.events.fanout import Events, Subscriber
from nkservice.events.index import Subscription, Topic
from nkservice.metrics import Metrics
from nkservice.protocol.connection import CloseCode, Connection
from nkservice.protocol.messages import Request, Response
from nkservice.service.config import Credentials, ServiceConfig
from nkservice.service.permissions import Role

# -- the logic chain's hooks -------------------------------------------------------------------


class Continue(Enum):
    CONTINUE = "continue"


CONTINUE = Continue.CONTINUE
"""What a hook returns to pass the decision to the next link (the original's `continue`)."""

T = TypeVar("T")
Outcome: TypeAlias = T | Continue | Awaitable[T | Continue]
"""A hook's answer: a decision, `CONTINUE`, or an awaitable of either."""


MAX_SESSION_ID_LENGTH = 128  # §3.3, whoever chooses the id


@dataclass(slots=True)
class LoginAttempt:
    service: str
    user: str
    password: Any
    meta: Any
    session_id: str | None
    transport: str
    remote: str
    password_mismatch: bool = False
    ack: Callable[[], None] | None = None  # acks the login request: an app is still deciding


@dataclass(slots=True)
class LoginDecision:
    authorized: bool
    role: Role = Role.user
    user: str | None = None  # the login logic may rename the user…
    session_id: str | None = None  # …or choose the session id (the seed's "recovery")
    meta: Any = None
    data: dict[str, Any] = field(default_factory=dict)  # merged into the ok answer
    reason: str | None = None


class Logic(Protocol):
    def login(self, attempt: LoginAttempt) -> Outcome[LoginDecision]:
        """Decide a login (§3): a `LoginDecision`."""

    def subscribe(self, caller: Caller, topic: Topic) -> Outcome[None]:
        """Allow a subscription (None) or refuse it (raise `ApiError`)."""

    def command(self, caller: Caller, request: Request) -> Outcome[Any]:
        """Answer a request of a logged-in session: the ok data, or raise `ApiError`."""

    def client_event(self, caller: Caller, request: Request) -> Outcome[None]:
        """See a client event (§5.3); None stops it there."""

    def session_start(self, caller: Caller) -> None:
        """A session has logged in."""

    def session_stop(self, caller: Caller) -> None:
        """A logged-in session has ended."""


# -- sessions and services ---------------------------------------------------------------------


class Caller(Subscriber, Protocol):
    """A connection of a service, logged in once `session_id` is set; it receives events."""

    user: str
    session_id: str
    role: Role
    meta: Any
    login_time: int
    seed_form: bool
    stopped: bool
    subscriptions: dict[Topic, Subscription]

    @property
    def service(self) -> ServiceContext: ...

    @property
    def conn(self) -> Connection: ...

    @property
    def remote(self) -> str: ...

    @property
    def transport(self) -> str: ...

    @property
    def home(self) -> str: ...

    def deliver(self, data: bytes) -> None: ...

    def stop(self, reason: str, code: CloseCode = CloseCode.normal) -> None:
        """End it from the server's side (not resumable), telling the client why."""


class ServiceContext(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def config(self) -> ServiceConfig: ...

    @property
    def directory(self) -> Directory: ...

    @property
    def events(self) -> Events: ...

    @property
    def registry(self) -> SessionRegistry: ...

    @property
    def logic(self) -> Logic: ...

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task of the service (cancelled when the service stops)."""

    def closed(self, caller: Caller) -> None:
        """One of its connections has ended, logged in or not."""


class Directory(Protocol):
    """What a service needs from its node."""

    @property
    def admin(self) -> Credentials: ...

    @property
    def events(self) -> Events: ...

    @property
    def registry(self) -> SessionRegistry: ...

    @property
    def callbacks(self) -> CallbackRegistry: ...

    @property
    def metrics(self) -> Metrics:
        """This process's numbers, for /metrics."""

    def find_service(self, name: str) -> ServiceContext | None: ...

    def cluster_state(self) -> dict[str, Any] | None:
        """This process in its cluster (None: a node of one process), for admins' pings."""

    # The `service` commands of §6: the node's services, changed while it runs. A
    # definition is a §11 table; what cannot be used raises `ConfigError` naming the key.

    async def create_service(self, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        """Start a new service and keep its definition; the answer's data."""

    async def update_service(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change some keys of a running service (a key set to None: back to its default)."""

    async def stop_service(self, name: str) -> dict[str, Any]:
        """Stop a service: its sessions are closed, its sockets freed, its definition gone."""

    async def list_services(self) -> list[dict[str, Any]]: ...

    def get_service(self, name: str) -> dict[str, Any]:
        """A running service's definition, without its secrets."""


# -- the session registry ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What `user`/`get` shows of a session (§6)."""

    session_id: str
    user: str
    remote: str
    transport: str
    meta: Any
    login_time: int
    # As `event`/`get_subscriptions` lists them (for an admin asking about the session).
    subscriptions: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"remote": self.remote, "transport": self.transport, "meta": self.meta,
                "login_time": self.login_time}


@dataclass(slots=True)
class Claim:
    """What a login with a chosen session id takes over (§3.3)."""

    subscriptions: list[Subscription] = field(default_factory=list)
    missed_events: list[bytes] = field(default_factory=list)
    resumed: bool = False
    # From another process of a cluster: once the new session holds the subscriptions,
    # that process lets go of them and hands over the events it kept (`resume.py`);
    # `missed_events` is empty then.
    handover: Callable[[], Awaitable[list[HeldEvent]]] | None = None


class SessionRegistry(Protocol):
    async def claim(self, caller: Caller, user: str, session_id: str, *,
                    fresh: bool = False) -> Claim:
        """Register a session that logs in as `user` under `session_id` (§3.3): a live
        session of the same user is replaced, a parked one resumed (the claim carries what
        they leave to it); another user's id raises `duplicated_session_id`. `fresh`: the
        id was just made up (a random UUID): nobody can hold it, no need to look."""

    def ended(self, caller: Caller) -> None:
        """A registered session closed: forget it, or park it for resuming."""

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


# -- callbacks to external apps ----------------------------------------------------------------


# What a hook is told (§7): the data of the callback requests sent to apps, which the Lua
# script's functions get too.

def login_data(attempt: LoginAttempt) -> dict[str, Any]:
    return {"service": attempt.service, "user": attempt.user, "password": attempt.password,
            "pass": attempt.password, "session_id": attempt.session_id, "meta": attempt.meta,
            "remote": attempt.remote, "transport": attempt.transport}


def caller_data(caller: Caller) -> dict[str, Any]:
    """Who asks: the start of the subscribe, cmd and event data."""
    return {"service": caller.service.name, "user": caller.user,
            "session_id": caller.session_id}


def subscriptions_of(caller: Caller) -> list[dict[str, Any]]:
    """A session's subscriptions, as `event`/`get_subscriptions` answers (§6)."""
    return [
        {"class": topic.class_, "subclass": topic.subclass, "type": topic.type,
         "obj_id": topic.obj_id, "service": topic.service,
         "body": {} if subscription.body is None else subscription.body}
        for topic, subscription in caller.subscriptions.items()
    ]


def subscription_data(topic: Topic) -> dict[str, Any]:
    return {"class": topic.class_, "subclass": topic.subclass, "type": topic.type,
            "obj_id": topic.obj_id}


def request_data(request: Request) -> dict[str, Any]:
    """A request of a `cmd` callback, as §7 passes it on."""
    return {"class": request.class_, "subclass": request.subclass, "cmd": request.cmd,
            "data": request.data}


def event_data(request: Request) -> dict[str, Any]:
    """A client event (§5.3), as the `event` callback passes it on."""
    return {"class": request.class_, "subclass": request.subclass, "data": request.data}


CALLBACK_KINDS = ("login", "subscribe", "cmd", "event")


def _answer(answer: Response | None) -> Response | None:
    return answer


class CallbackKey(NamedTuple):
    """What an app registers for: a kind of callback of a service (and, for `cmd` and
    `event`, a class; `None` for an `event` registration of every class). A tuple: it is
    hashed for every request of a non-core class."""

    service: str
    kind: str
    class_: str | None = None


class CallbackRegistry(Protocol):
    def register(self, key: CallbackKey, app: Caller) -> Awaitable[None] | None:
        """Register `app`; an awaitable when the registration reaches the other processes
        of a cluster later: it is done once they have it."""

    def unregister(self, key: CallbackKey, app: Caller) -> None: ...

    def drop(self, app: Caller) -> None:
        """The app's connection ended: its registrations end with it."""

    def forget_service(self, service: str) -> None:
        """The service stopped: every registration for its callbacks ends."""

    def registered(self, key: CallbackKey) -> bool:
        """Is any app registered for `key`? (Cheap: asked for every request.)"""

    async def listing(self, service: str | None) -> list[dict[str, Any]]:
        """`{callback, class, service, session_id}` of each registration (of one service)."""

    def call(self, key: CallbackKey, cmd: str, data: Any, *,
             on_ack: Callable[[], None] | None = None,
             decide: Callable[[Response | None], Any] = _answer) -> asyncio.Future[Any]:
        """Send the callback request `cmd` to one registered app, round-robin, at once; the
        future gets `decide(its answer)` (or what `decide` raised). When that app drops or
        misses its deadline, the request goes once more to another one. The answer is None
        when no app was left to answer: `decide` applies the fallback of §7."""
