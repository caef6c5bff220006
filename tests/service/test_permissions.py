"""Roles and permission patterns (PROTOCOL.md §4)."""

from __future__ import annotations

from nkservice.service.permissions import Role, allowed, pattern_matches


def test_permission_patterns() -> None:
    assert pattern_matches("core.user.*", "core.user.list")
    assert pattern_matches("*.*.*", "chat.room.join")
    assert not pattern_matches("core.user", "core.user.list")
    grants = {"user": ["core.user.list"], "bob": ["core.session.*"]}
    assert allowed(Role.user, Role.service_admin, permissions=grants, user="alice",
                   action=("core", "user", "list"))
    assert not allowed(Role.user, Role.service_admin, permissions=grants, user="alice",
                       action=("core", "session", "stop"))
    assert allowed(Role.user, Role.service_admin, permissions=grants, user="bob",
                   action=("core", "session", "stop"))
    assert not allowed(Role.service_admin, Role.admin, permissions={"user": ["*.*.*"]},
                       user="x", action=("core", "service", "create"))
