"""An example nkservice plugin: chat rooms as a class of commands of their own.

    [services.demo]
    plugins = ["chat_plugin:ChatRooms"]          # with examples/ on PYTHONPATH
    plugin.chat.max_rooms = 10                   # this plugin's own settings (optional)

It adds the class `chat` — `join`, `leave` and `say`, which any user may send — publishes
what is said as `chat/room/message/<room>` events, and refuses subscriptions to a room's
events to users who have not joined it. Everything else passes to the rest of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nkservice.errors import ApiError, ConfigError, ErrorCode
from nkservice.events.index import Topic
from nkservice.plugins.api import Plugin
from nkservice.protocol.messages import Request
from nkservice.service.config import ServiceConfig
from nkservice.service.contracts import CONTINUE, Caller
from nkservice.service.logic import Link


@dataclass
class Rooms(Link):
    service: str
    max_rooms: int
    members: dict[str, set[str]] = field(default_factory=dict)  # room → users

    core_requests = False  # only class `chat` is ours

    def command(self, caller: Caller, request: Request) -> Any:
        if request.class_ != "chat":
            return CONTINUE
        room = request.fields.get("room")
        if not isinstance(room, str) or not room:
            raise ApiError(ErrorCode.missing_field, "room")
        if request.cmd == "join":
            if room not in self.members and len(self.members) >= self.max_rooms:
                raise ApiError(ErrorCode.invalid_operation, "too many rooms")
            self.members.setdefault(room, set()).add(caller.user)
            return {"members": sorted(self.members[room])}
        if request.cmd == "leave":
            self.members.get(room, set()).discard(caller.user)
            return None
        if request.cmd == "say":
            if caller.user not in self.members.get(room, ()):
                raise ApiError(ErrorCode.unauthorized, "join the room first")
            caller.service.events.publish(
                Topic(self.service, "chat", "room", "message", room),
                {"user": caller.user, "text": request.fields.get("text", "")})
            return None
        raise ApiError(ErrorCode.unknown_command, request.cmd)

    def subscribe(self, caller: Caller, topic: Topic) -> Any:
        if topic.class_ == "chat" and caller.user not in self.members.get(topic.obj_id, ()):
            raise ApiError(ErrorCode.unauthorized, "join the room first")
        return CONTINUE


class ChatRooms(Plugin):
    name = "chat"

    def settings(self, table: dict[str, Any], where: str) -> int:
        """One key, `max_rooms` (default 100)."""
        unknown = sorted(set(table) - {"max_rooms"})
        if unknown:
            raise ConfigError(f"{where}{unknown[0]}", "unknown key", syntax=True)
        max_rooms = table.get("max_rooms", 100)
        if not isinstance(max_rooms, int) or isinstance(max_rooms, bool) or max_rooms < 1:
            raise ConfigError(f"{where}max_rooms",
                              f"expected a whole number above 0, got {max_rooms!r}")
        return max_rooms

    def link(self, service: ServiceConfig, settings: Any) -> Link:
        return Rooms(service.name, settings)
