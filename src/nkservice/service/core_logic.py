"""The base of every service's logic chain: the core commands of PROTOCOL.md §6, checked
against the caller's role (§4), and the session lifecycle events (§5.4)."""

from __future__ import annotations

from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.index import Topic
from nkservice.protocol.messages import Request
from nkservice.protocol.names import canonical
from nkservice.service import callback_commands, commands, event_commands, service_commands
from nkservice.service.contracts import Caller
from nkservice.service.logic import Link
from nkservice.service.permissions import allowed

COMMANDS = {**commands.TABLE, **event_commands.TABLE, **callback_commands.TABLE,
            **service_commands.TABLE}


class CoreLogic(Link):
    """What nobody above decided: requests of another class are `unknown_class`;
    subscriptions are allowed."""

    def command(self, caller: Caller, request: Request) -> Any:
        if request.class_ != "core":
            raise ApiError(ErrorCode.unknown_class, request.class_)
        name = canonical(request.subclass, request.cmd)
        if name == ("user", "login"):
            raise ApiError(ErrorCode.already_authenticated)
        command = COMMANDS.get(name) if name is not None else None
        if name is None or command is None:
            raise ApiError(ErrorCode.unknown_command, request.cmd)
        if not allowed(caller.role, command.least_role,
                       permissions=caller.service.config.permissions, user=caller.user,
                       action=("core", *name)):
            raise ApiError(ErrorCode.unauthorized)
        return command.handler(caller, request)

    def subscribe(self, caller: Caller, topic: Topic) -> None:
        return None

    def session_start(self, caller: Caller) -> None:
        _publish_lifecycle(caller, "start")

    def session_stop(self, caller: Caller) -> None:
        _publish_lifecycle(caller, "stop")


def _publish_lifecycle(caller: Caller, what: str) -> None:
    """`core/session/start|stop` in the session's service (§5.4)."""
    caller.service.events.publish(
        Topic(caller.service.name, "core", "session", what, caller.session_id),
        {"user": caller.user, "remote": caller.remote, "transport": caller.transport})
