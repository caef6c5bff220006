"""The login chain (PROTOCOL.md §3): who decides a login, in order, first match wins.

A `LoginStep` returns a `LoginDecision` to decide, or None to pass to the next step. The
chain is built per service: the global admin, the service's admin, then the service's login
logic (plugins, the Lua script and the external `login` callback plug in here, in that
order), then the static `users` table. A step that knows the user but not the password
notes it on the attempt, so the final refusal can say `invalid_password`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from nkservice.service.config import Credentials
from nkservice.service.passwords import check_password
from nkservice.service.permissions import Role


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


@dataclass(slots=True)
class LoginDecision:
    authorized: bool
    role: Role = Role.user
    user: str | None = None  # the login logic may rename the user…
    session_id: str | None = None  # …or choose the session id (the seed's "recovery")
    meta: Any = None
    data: dict[str, Any] = field(default_factory=dict)  # merged into the ok answer
    reason: str | None = None


class LoginStep(Protocol):
    async def decide(self, attempt: LoginAttempt) -> LoginDecision | None: ...


class CredentialsLogin:
    """The global administrator, or a service's own administrator."""

    def __init__(self, credentials: Credentials, role: Role) -> None:
        self._credentials = credentials
        self._role = role

    async def decide(self, attempt: LoginAttempt) -> LoginDecision | None:
        if attempt.user != self._credentials.user:
            return None
        if check_password(attempt.password, self._credentials.password):
            return LoginDecision(True, role=self._role)
        attempt.password_mismatch = True
        return None


class StaticUsersLogin:
    """The service's `users` table: the last step before `unauthorized`."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    async def decide(self, attempt: LoginAttempt) -> LoginDecision | None:
        stored = self._users.get(attempt.user)
        if stored is None:
            return None
        if check_password(attempt.password, stored):
            return LoginDecision(True)
        attempt.password_mismatch = True
        return None


def login_chain(admin: Credentials, service_admin: Credentials | None, users: dict[str, str],
                logic: list[LoginStep], *, is_core: bool) -> list[LoginStep]:
    chain: list[LoginStep] = [CredentialsLogin(admin, Role.admin)]
    if is_core:  # only the global administrator may log in on the core service
        return chain
    if service_admin is not None and service_admin.user:
        chain.append(CredentialsLogin(service_admin, Role.service_admin))
    return [*chain, *logic, StaticUsersLogin(users)]


async def decide(chain: list[LoginStep], attempt: LoginAttempt) -> LoginDecision:
    for step in chain:
        decision = await step.decide(attempt)
        if decision is not None:
            return decision
    return LoginDecision(False)
