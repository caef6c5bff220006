"""Roles and the `permissions` table (PROTOCOL.md §4).

Each command names the least role that may run it. The admin may run everything; a service
admin everything but the admin's commands; a user what is open to users, plus what the
service's `permissions` grant: patterns over `class.subclass.cmd` with `*` for a whole
part, listed under `user` (every user) or under a user's own name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import IntEnum


class Role(IntEnum):
    user = 0
    service_admin = 1
    admin = 2


def pattern_matches(pattern: str, action: str) -> bool:
    wanted = pattern.split(".")
    parts = action.split(".")
    if len(wanted) != len(parts):
        return False
    return all(w in ("*", p) for w, p in zip(wanted, parts, strict=True))


def granted(permissions: Mapping[str, Iterable[str]], user: str, action: str) -> bool:
    patterns = [*permissions.get("user", ())]
    if user != "user":
        patterns.extend(permissions.get(user, ()))
    return any(pattern_matches(p, action) for p in patterns)


def allowed(role: Role, least: Role, *, permissions: Mapping[str, Iterable[str]], user: str,
            action: tuple[str, str, str]) -> bool:
    """May a caller of `role` run the command `action` (class, subclass, cmd), whose least
    role is `least`? Checked for every request: the permission patterns only when needed."""
    if role >= least:
        return True
    return (least is not Role.admin and role is Role.user
            and granted(permissions, user, ".".join(action)))
