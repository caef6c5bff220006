"""The base of every service's logic chain: the core commands of PROTOCOL.md §6, checked
against the caller's role (§4), and the session lifecycle events (§5.4)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.index import Topic
from nkservice.protocol.messages import Request
from nkservice.protocol.names import canonical
from nkservice.service import commands, event_commands
from nkservice.service.logic import Link
from nkservice.service.permissions import allowed

if TYPE_CHECKING:
    from nkservice.service.session import Session

COMMANDS = {**commands.TABLE, **event_commands.TABLE}


class CoreLogic(Link):
    """What nobody above decided: requests of another class are `unknown_class`;
    subscriptions are allowed."""

    def command(self, session: Session, request: Request) -> Any:
        if request.class_ != "core":
            raise ApiError(ErrorCode.unknown_class, request.class_)
        name = canonical(request.subclass, request.cmd)
        if name == ("user", "login"):
            raise ApiError(ErrorCode.already_authenticated)
        command = COMMANDS.get(name) if name is not None else None
        if name is None or command is None:
            raise ApiError(ErrorCode.unknown_command, request.cmd)
        if not allowed(session.role, command.least_role,
                       permissions=session.service.config.permissions, user=session.user,
                       action=("core", *name)):
            raise ApiError(ErrorCode.unauthorized)
        return command.handler(session, request)

    def subscribe(self, session: Session, topic: Topic) -> None:
        return None

    def session_start(self, session: Session) -> None:
        _publish_lifecycle(session, "start")

    def session_stop(self, session: Session) -> None:
        _publish_lifecycle(session, "stop")


def _publish_lifecycle(session: Session, what: str) -> None:
    """`core/session/start|stop` in the session's service (§5.4)."""
    session.service.events.publish(
        Topic(session.service.name, "core", "session", what, session.session_id),
        {"user": session.user, "remote": session.remote, "transport": session.transport})
