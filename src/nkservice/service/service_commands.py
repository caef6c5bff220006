"""The `service` commands of PROTOCOL.md §6: the global admin creates, updates, stops, lists
and reads the node's services while it runs.

The node does the work (see `Directory`); here the request's fields are checked and a
definition the node cannot use is answered as the config file would be refused: an unknown
key or a value of the wrong type is `syntax_error`, a value that cannot be used (a port in
use, a certificate that does not load, a script with an error) is `invalid_value`, each
naming the key within the definition (`listen`, `users.alice`, `tls`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nkservice.errors import ApiError, ConfigError, ErrorCode
from nkservice.protocol.messages import Request
from nkservice.service.contracts import Caller
from nkservice.service.permissions import Role
from nkservice.service.requests import Command, required


def _name(fields: dict[str, Any]) -> str:
    return required(fields, "name", str)


def _definition(fields: dict[str, Any]) -> dict[str, Any]:
    """The keys of a definition: the request's fields but `name`."""
    return {key: value for key, value in fields.items() if key != "name"}


def refused(error: ConfigError, name: str) -> ApiError:
    """The answer to a definition the node cannot use, naming the key within it."""
    key = error.key.removeprefix(f"services.{name}.")
    return ApiError(ErrorCode.syntax_error if error.syntax else ErrorCode.invalid_value,
                    f"{key}: {error.why}")


async def _define(change: Callable[[str, dict[str, Any]], Awaitable[Any]],
                  request: Request) -> Any:
    """Create or update: `change(name, the definition's keys)`, its refusal said as such."""
    fields = request.fields
    name = _name(fields)
    try:
        return await change(name, _definition(fields))
    except ConfigError as error:
        raise refused(error, name) from error


async def create(caller: Caller, request: Request) -> Any:
    return await _define(caller.service.directory.create_service, request)


async def update(caller: Caller, request: Request) -> Any:
    return await _define(caller.service.directory.update_service, request)


async def stop(caller: Caller, request: Request) -> Any:
    return await caller.service.directory.stop_service(_name(request.fields))


async def list_services(caller: Caller, request: Request) -> Any:
    return await caller.service.directory.list_services()


def get(caller: Caller, request: Request) -> Any:
    return caller.service.directory.get_service(_name(request.fields))


TABLE: dict[tuple[str, str], Command] = {
    ("service", "create"): Command(create, Role.admin),
    ("service", "update"): Command(update, Role.admin),
    ("service", "stop"): Command(stop, Role.admin),
    ("service", "list"): Command(list_services, Role.admin),
    ("service", "get"): Command(get, Role.admin),
}
