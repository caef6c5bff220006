"""Logins (PROTOCOL.md §3): the attempt, the decision, and the links that check passwords.

A login goes down the service's logic chain (`logic.py`), first decision wins: the global
administrator, the service's administrator (`CredentialsLogin`, at the top of the chain),
then the service's login logic (plugins, the Lua script, the external `login` callback),
then the static `users` table at the base (`StaticUsersLogin`). A link that knows the user
but not the password notes it on the attempt, so the final refusal can say
`invalid_password`.
"""

from __future__ import annotations

from collections.abc import Awaitable

from nkservice.service.config import Credentials
from nkservice.service.contracts import CONTINUE, Continue, LoginAttempt, LoginDecision
from nkservice.service.logic import Link
from nkservice.service.passwords import verify_password
from nkservice.service.permissions import Role

REFUSED = LoginDecision(False)


async def _password_decides(attempt: LoginAttempt, stored: str, role: Role
                            ) -> LoginDecision | Continue:
    if await verify_password(attempt.password, stored):
        return LoginDecision(True, role=role)
    attempt.password_mismatch = True
    return CONTINUE


class CredentialsLogin(Link):
    """The global administrator, or a service's own administrator."""

    def __init__(self, credentials: Credentials, role: Role) -> None:
        self._credentials = credentials
        self._role = role

    def login(self, attempt: LoginAttempt) -> Continue | Awaitable[LoginDecision | Continue]:
        if attempt.user != self._credentials.user:
            return CONTINUE
        return _password_decides(attempt, self._credentials.password, self._role)


class StaticUsersLogin(Link):
    """The service's `users` table: the last step before `unauthorized`."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    def login(self, attempt: LoginAttempt) -> Continue | Awaitable[LoginDecision | Continue]:
        stored = self._users.get(attempt.user)
        if stored is None:
            return CONTINUE
        return _password_decides(attempt, stored, Role.user)


def administrators(admin: Credentials, service_admin: Credentials | None, *, is_core: bool
                   ) -> list[Link]:
    """The top of a service's chain: the global admin, then the service's own admin."""
    links: list[Link] = [CredentialsLogin(admin, Role.admin)]
    if not is_core and service_admin is not None and service_admin.user:
        links.append(CredentialsLogin(service_admin, Role.service_admin))
    return links
