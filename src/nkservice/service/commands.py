"""The core commands of PROTOCOL.md §6 that act on users and sessions, and `ping`.

Every session they act on is reached through the session registry, wherever it lives.
`TABLE` maps the subclass form (`user`/`list`, …) to each command; the seed's flat names are
mapped to these keys by `protocol.names`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.messages import Request
from nkservice.service.contracts import Caller
from nkservice.service.permissions import Role
from nkservice.service.requests import Command, optional, required, target_service

session_log = logging.getLogger("nkservice.session")

# syslog severities (GELF levels) 1-7 → Python logging levels
_LOG_LEVELS = {1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR, 4: logging.WARNING,
               5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}


def ping(caller: Caller, request: Request) -> Any:
    """`{}`; admins of a cluster also see this process and whether its NATS is there."""
    if caller.role is Role.admin:
        state = caller.service.directory.cluster_state()
        if state is not None:
            return {"cluster": state}
    return None


async def list_users(caller: Caller, request: Request) -> Any:
    service = target_service(caller, request.fields)
    return await service.registry.users(service.name)


async def get_user(caller: Caller, request: Request) -> Any:
    fields = request.fields
    user = required(fields, "user", str)
    service = target_service(caller, fields)
    sessions = await service.registry.sessions_of(service.name, user)
    if not sessions:
        raise ApiError(ErrorCode.user_not_found)
    return {session_id: info.describe() for session_id, info in sessions.items()}


async def stop_session(caller: Caller, request: Request) -> Any:
    fields = request.fields
    session_id = required(fields, "session_id", str)
    service = target_service(caller, fields)
    user = await service.registry.stop(service.name, session_id, f"stopped by {caller.user}")
    return {"user": user}


async def session_cmd(caller: Caller, request: Request) -> Any:
    """Forward a request to another session and pass its answer (or error) back."""
    fields = request.fields
    session_id = required(fields, "session_id", str)
    class_ = required(fields, "class", str)
    cmd = required(fields, "cmd", str)
    subclass = optional(fields, "subclass", str, "") or None
    timeout = optional(fields, "timeout", float, 0.0) or None
    service = target_service(caller, fields)
    response = await service.registry.request(
        service.name, session_id, class_, cmd, fields.get("data"), subclass=subclass,
        on_ack=lambda: caller.conn.ack(request.tid), timeout=timeout)
    if response.ok:
        return response.data
    raise response.error()


@dataclass(frozen=True, slots=True)
class LogEntry:
    """The fields of a `session`/`log` request, checked (wherever the entry goes)."""

    source: str
    message: str
    level: int  # a syslog severity, 1-7
    full_message: str
    meta: dict[str, Any]

    @classmethod
    def of(cls, request: Request) -> LogEntry:
        fields = request.fields
        source = required(fields, "source", str)
        message = required(fields, "message", str)
        level = optional(fields, "level", int, 6)
        if level not in _LOG_LEVELS:
            raise ApiError(ErrorCode.invalid_value, "level")
        return cls(source, message, level, optional(fields, "full_message", str, ""),
                   optional(fields, "meta", dict, {}))


def log_message(caller: Caller, request: Request) -> Any:
    entry = LogEntry.of(request)
    session_log.log(_LOG_LEVELS[entry.level], "[%s] %s: %s%s", caller.service.name,
                    entry.source, entry.message,
                    f"\n{entry.full_message}" if entry.full_message else "",
                    extra={"nk_user": caller.user, "nk_session_id": caller.session_id,
                           "nk_service": caller.service.name, "nk_meta": entry.meta})
    return None


TABLE: dict[tuple[str, str], Command] = {
    ("user", "list"): Command(list_users, Role.service_admin),
    ("user", "get"): Command(get_user, Role.service_admin),
    ("session", "stop"): Command(stop_session, Role.service_admin),
    ("session", "cmd"): Command(session_cmd, Role.service_admin),
    ("session", "log"): Command(log_message, Role.user),
    ("core", "ping"): Command(ping, Role.user),
}
