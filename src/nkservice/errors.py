"""The error codes of PROTOCOL.md §10 and the exceptions nkservice raises on purpose.

One root, `NkServiceError`, and below it who is at fault:
- `ClientError`: the peer's bytes (not JSON, not a message, too large);
- `ConfigError`: the configuration (a file, or later a service definition sent over the API);
- `ServerError`: the server itself or what it depends on;
- `ApiError`: a refusal to send to the peer as an error response, whoever is at fault: a
  numeric code, the code's name and a human text. The connection layer turns it into
  `{"result": "error", "tid": ..., "data": {"code": ..., "error": ...}}`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(Enum):
    """Each member's value is (code, text). Texts with `{}` take a detail (a field, a name)."""

    internal_error = (100002, "Internal error")
    timeout = (100005, "Timeout")
    not_implemented = (100006, "Not implemented")
    service_not_found = (100020, "Service not found")
    service_already_exists = (100021, "Service already exists")
    unauthorized = (100030, "Unauthorized")
    not_authenticated = (100031, "Not authenticated")
    already_authenticated = (100032, "Already authenticated")
    user_not_found = (100033, "User not found")
    duplicated_session_id = (100034, "Duplicated session id")
    invalid_session_id = (100035, "Invalid session id")
    invalid_password = (100038, "Invalid password")
    invalid_operation = (100040, "Invalid operation")
    unknown_command = (100042, "Unknown command '{}'")
    syntax_error = (100044, "Syntax error: {}")
    missing_field = (100045, "Missing field: {}")
    invalid_value = (100046, "Invalid value: {}")
    invalid_reply = (100047, "Invalid reply")
    unknown_class = (100050, "Unknown class '{}'")
    session_not_found = (100062, "Session not found")
    invalid_json = (100072, "Invalid JSON")
    invalid_message = (100076, "Invalid message")
    message_too_large = (100077, "Message too large")
    too_many_requests = (100078, "Too many requests")
    service_unavailable = (100079, "Service unavailable")
    too_many_subscriptions = (100080, "Too many subscriptions")
    connection_closed = (100081, "Connection closed")

    @property
    def code(self) -> int:
        return self.value[0]

    def text(self, detail: str | None = None) -> str:
        template: str = self.value[1]
        if "{}" in template:
            return template.format(detail if detail is not None else "")
        return f"{template}: {detail}" if detail else template


_BY_CODE = {member.code: member for member in ErrorCode}


class NkServiceError(Exception):
    """The root of every error nkservice raises on purpose."""


class ClientError(NkServiceError):
    """What the peer sent is at fault."""


class ConfigError(NkServiceError, ValueError):
    """The configuration is at fault: `key` (its full name: `services.demo.listen`) and
    why. `syntax`: the key is unknown or its value of the wrong type (the API answers
    `syntax_error`), rather than a value that cannot be used (`invalid_value`)."""

    def __init__(self, key: str, why: str, *, syntax: bool = False) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why
        self.syntax = syntax


class ServerError(NkServiceError):
    """The server, or a service it depends on, failed."""


class ApiError(NkServiceError):
    """A refusal to send to the peer as an error response.

    `detail` fills the text's placeholder (`missing_field` → "Missing field: user") or, for
    texts without one, is appended after a colon (PROTOCOL.md §10: "the text may add detail").
    """

    def __init__(self, error: ErrorCode, detail: str | None = None) -> None:
        self.error = error
        self.code = error.code
        self.text = error.text(detail)
        super().__init__(self.text)

    @classmethod
    def from_wire(cls, data: Any) -> ApiError:
        """Rebuild an error from the `data` of an error response; keeps unknown codes."""
        code = data.get("code") if isinstance(data, dict) else None
        text = data.get("error") if isinstance(data, dict) else None
        member = _BY_CODE.get(code) if isinstance(code, int) else None
        error = cls(member or ErrorCode.internal_error)
        if isinstance(code, int):
            error.code = code
        if isinstance(text, str):
            error.text = text
            error.args = (text,)
        return error

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "error": self.text}
