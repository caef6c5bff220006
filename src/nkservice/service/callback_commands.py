"""The callback commands of PROTOCOL.md §6 and §7: register, unregister, list.

`{"callback": "login", "class": "myservice"}` is the seed's form: for `login` and
`subscribe`, `class` names the service. The explicit form names it in `service`; for `cmd`
and `event`, `class` is the class of the requests or events to receive.
"""

from __future__ import annotations

from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.messages import Request
from nkservice.service.contracts import CALLBACK_KINDS, CallbackKey, Caller
from nkservice.service.permissions import Role
from nkservice.service.requests import Command, optional, required, target_service


def key_of(caller: Caller, fields: dict[str, Any]) -> CallbackKey:
    kind = required(fields, "callback", str)
    if kind not in CALLBACK_KINDS:
        raise ApiError(ErrorCode.invalid_value, "callback")
    class_ = optional(fields, "class", str, "") or None
    if kind in ("login", "subscribe"):
        if fields.get("service") is None and class_ is not None:
            fields = {**fields, "service": class_}  # the seed's form
        class_ = None
    elif kind == "cmd" and class_ is None:
        raise ApiError(ErrorCode.invalid_value, "class")
    return CallbackKey(target_service(caller, fields).name, kind, class_)


def register(caller: Caller, request: Request) -> Any:
    """`{}`, once every process knows of it (None or an awaitable)."""
    return caller.service.directory.callbacks.register(key_of(caller, request.fields), caller)


def unregister(caller: Caller, request: Request) -> Any:
    caller.service.directory.callbacks.unregister(key_of(caller, request.fields), caller)
    return None


async def listing(caller: Caller, request: Request) -> Any:
    """Every registration for the global admin (or those of `service`); a service admin's
    service's otherwise."""
    fields = request.fields
    everywhere = caller.role is Role.admin and fields.get("service") is None
    service = None if everywhere else target_service(caller, fields).name
    return await caller.service.directory.callbacks.listing(service)


TABLE: dict[tuple[str, str], Command] = {
    ("callback", "register"): Command(register, Role.service_admin),
    ("callback", "unregister"): Command(unregister, Role.service_admin),
    ("callback", "list"): Command(listing, Role.service_admin),
}
