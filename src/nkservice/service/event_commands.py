"""The event commands of PROTOCOL.md §6 — subscribe, unsubscribe, get_subscriptions, send,
and the user and session events — and the automatic subscriptions of §3.2."""

from __future__ import annotations

from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.index import WILDCARD, Topic
from nkservice.protocol.messages import Request
from nkservice.service.contracts import Caller, subscriptions_of
from nkservice.service.logic import settled
from nkservice.service.permissions import Role, granted
from nkservice.service.requests import Command, optional, required, target_service


def automatic_topics(service: str, user: str, session_id: str) -> tuple[Topic, Topic]:
    """What every session is subscribed to from its login (§3.2)."""
    return (Topic(service, "core", "user_event", WILDCARD, user),
            Topic(service, "core", "session_event", WILDCARD, session_id))


def _name(fields: dict[str, Any], name: str, *, default: str | None = WILDCARD) -> str:
    value = required(fields, name, str) if default is None else optional(fields, name, str,
                                                                          default)
    if not value:
        raise ApiError(ErrorCode.invalid_value, name)
    return value


def topic_of(caller: Caller, fields: dict[str, Any]) -> Topic:
    """The event keys of a request: `class`*, `subclass` (or the seed's `obj`), `type`,
    `obj_id` (each `*` when left out), in the caller's service or, for the admin, `service`."""
    subclass_field = "subclass" if fields.get("subclass") is not None else "obj"
    return Topic(service=target_service(caller, fields).name,
                 class_=_name(fields, "class", default=None),
                 subclass=_name(fields, subclass_field),
                 type=_name(fields, "type"),
                 obj_id=_name(fields, "obj_id"))


def subscribe(caller: Caller, request: Request) -> Any:
    topic = topic_of(caller, request.fields)
    service = caller.service
    if (topic.class_ == "core" and caller.role is Role.user
            and topic not in automatic_topics(service.name, caller.user, caller.session_id)
            and not granted(service.config.permissions, caller.user, "core.event.subscribe")):
        raise ApiError(ErrorCode.unauthorized)  # core events are for admins (§4, §5.4)
    _check_room(caller, topic)
    body = request.fields.get("body")
    decided = service.logic.subscribe(caller, topic)  # plugins, Lua, callbacks may refuse
    if decided is None:
        return service.events.subscribe(caller, topic, body)  # None, or active once done
    return _subscribe_when_allowed(caller, topic, body, decided)


async def _subscribe_when_allowed(caller: Caller, topic: Topic, body: Any,
                                  decided: Any) -> None:
    await settled(decided)
    if caller.conn.closed:  # it ended while the subscription was decided: nothing to add
        return
    _check_room(caller, topic)  # others may have come while it was decided
    active = caller.service.events.subscribe(caller, topic, body)
    if active is not None:
        await active


def _check_room(caller: Caller, topic: Topic) -> None:
    """§5.2: at most `max_subscriptions` per session; the same key again only replaces."""
    if (topic not in caller.subscriptions
            and len(caller.subscriptions) >= caller.service.config.max_subscriptions):
        raise ApiError(ErrorCode.too_many_subscriptions)


def unsubscribe(caller: Caller, request: Request) -> Any:
    caller.service.events.unsubscribe(caller, topic_of(caller, request.fields))
    return None


def get_subscriptions(caller: Caller, request: Request) -> Any:
    """The caller's own; an admin may name another session (`session_id`, and `service`)."""
    if "session_id" not in request.fields:
        return subscriptions_of(caller)
    return _subscriptions_of_session(caller, request.fields)


async def _subscriptions_of_session(caller: Caller, fields: dict[str, Any]) -> Any:
    if caller.role is Role.user:
        raise ApiError(ErrorCode.unauthorized, "only admins see other sessions")
    session_id = required(fields, "session_id", str)
    service = target_service(caller, fields)
    found = await service.registry.find(service.name, session_id)
    if found is None:
        raise ApiError(ErrorCode.session_not_found)
    return found.subscriptions


def send(caller: Caller, request: Request) -> Any:
    caller.service.events.publish(topic_of(caller, request.fields), request.fields.get("body"))
    return None


def _send_to(caller: Caller, fields: dict[str, Any], subclass: str, id_field: str) -> None:
    """Publish `core/<subclass>/<type>/<the id>`: what an automatic subscription receives."""
    topic = Topic(target_service(caller, fields).name, "core", subclass,
                  _name(fields, "type"), _name(fields, id_field, default=None))
    caller.service.events.publish(topic, fields.get("body"))


def send_user_event(caller: Caller, request: Request) -> Any:
    _send_to(caller, request.fields, "user_event", "user")
    return None


def send_session_event(caller: Caller, request: Request) -> Any:
    _send_to(caller, request.fields, "session_event", "session_id")
    return None


TABLE: dict[tuple[str, str], Command] = {
    ("event", "subscribe"): Command(subscribe, Role.user),
    ("event", "unsubscribe"): Command(unsubscribe, Role.user),
    ("event", "get_subscriptions"): Command(get_subscriptions, Role.user),
    ("event", "send"): Command(send, Role.service_admin),
    ("user", "send_event"): Command(send_user_event, Role.service_admin),
    ("session", "send_event"): Command(send_session_event, Role.service_admin),
}
