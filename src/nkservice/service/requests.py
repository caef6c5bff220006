"""What every core command uses: its table entry, the fields of `data`, the target service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.messages import Request
from nkservice.service.contracts import Caller, ServiceContext
from nkservice.service.permissions import Role

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Command:
    """A core command: a function of the calling session and its request that returns the
    reply's `data`, or an awaitable of it (answered when it finishes), or raises `ApiError`;
    and the least role that may run it (PROTOCOL.md §4)."""

    handler: Callable[[Caller, Request], Any]
    least_role: Role


def _of_type(value: Any, name: str, kind: type[T]) -> T:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # JSON does not tell 5 from 5.0
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(ErrorCode.syntax_error, name)
    if kind is float and value < 0:  # type: ignore[operator]
        raise ApiError(ErrorCode.invalid_value, name)
    return value


def required(fields: dict[str, Any], name: str, kind: type[T]) -> T:
    if name not in fields:
        raise ApiError(ErrorCode.missing_field, name)
    return _of_type(fields[name], name, kind)


def optional(fields: dict[str, Any], name: str, kind: type[T], default: T) -> T:
    value = fields.get(name)
    return default if value is None else _of_type(value, name, kind)


def target_service(caller: Caller, fields: dict[str, Any]) -> ServiceContext:
    """The service a command acts on: the caller's, or for the admin the one it names."""
    name = optional(fields, "service", str, caller.service.name)
    if name == caller.service.name:
        return caller.service
    if caller.role is not Role.admin:
        raise ApiError(ErrorCode.unauthorized)
    found = caller.service.directory.find_service(name)
    if found is None:
        raise ApiError(ErrorCode.service_not_found)
    return found
