"""The three kinds of message (PROTOCOL.md §1) and their JSON codec.

`decode()` turns the bytes of one message into a `Request`, `Response` or `Ack`, or raises
`BadMessage` carrying the §1.4 error and whatever tid could be salvaged for the reply.
The `encode_*` functions produce the bytes of one outgoing message, without framing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from nkservice.errors import ApiError, ClientError, ErrorCode

Tid = int | str
JsonObject = dict[str, Any]


@dataclass(slots=True)
class Request:
    class_: str
    cmd: str
    tid: Tid
    subclass: str | None = None
    data: Any = None
    received: float = 0.0  # set by whoever times its answer (the server: perf_counter())

    @property
    def fields(self) -> JsonObject:
        """`data` as an object: a missing `data` means `{}` (§1.2); anything else is kept."""
        return self.data if isinstance(self.data, dict) else {}


@dataclass(slots=True)
class Response:
    tid: Tid
    ok: bool
    data: Any = None

    def error(self) -> ApiError:
        return ApiError.from_wire(self.data)


@dataclass(slots=True)
class Ack:
    tid: Tid


Message = Request | Response | Ack


class BadMessage(ClientError):
    """Input that is not a message: answered with `error` and `tid` (None → JSON null)."""

    def __init__(self, error: ErrorCode, tid: Tid | None = None) -> None:
        super().__init__(error.name)
        self.error = error
        self.tid = tid


def is_tid(value: object) -> bool:
    # Exact types: bool is an int in Python, but `true` is not a tid in JSON.
    return type(value) is int or type(value) is str


def _loads(raw: bytes) -> Any:
    # orjson also refuses what could not be echoed back safely: invalid UTF-8 and lone
    # surrogates ("\ud800"). Integers beyond 64 bits come back as floats.
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadMessage(ErrorCode.invalid_json) from None


def decode(raw: bytes) -> Message:
    obj = _loads(raw)
    if type(obj) is not dict:
        raise BadMessage(ErrorCode.invalid_message)
    tid = obj.get("tid")
    # Exact type checks, written out: this runs for every message received.
    salvaged: Tid | None = tid if type(tid) is int or type(tid) is str else None
    if "class" in obj and "cmd" in obj and "tid" in obj:
        class_, cmd, subclass = obj["class"], obj["cmd"], obj.get("subclass")
        if (
            salvaged is None
            or type(class_) is not str
            or type(cmd) is not str
            or not (subclass is None or type(subclass) is str)
        ):
            raise BadMessage(ErrorCode.invalid_message, salvaged)
        return Request(class_, cmd, salvaged, subclass, obj.get("data"))
    if "result" in obj and "tid" in obj:
        result = obj["result"]
        if salvaged is None or not isinstance(result, str):
            raise BadMessage(ErrorCode.invalid_message, salvaged)
        return Response(salvaged, result == "ok", obj.get("data"))
    if "ack" in obj:
        ack = obj["ack"]
        if not is_tid(ack):
            raise BadMessage(ErrorCode.invalid_message)
        return Ack(ack)
    raise BadMessage(ErrorCode.invalid_message, salvaged)


def _carries(data: Any) -> bool:
    """§1.2: `data` that is missing or an empty object is left out; anything else is sent."""
    return data is not None and data != {}


def encode_request(tid: int, class_: str, cmd: str, data: Any = None,
                   subclass: str | None = None) -> bytes:
    msg: JsonObject = {"class": class_}
    if subclass is not None:
        msg["subclass"] = subclass
    msg["cmd"] = cmd
    msg["tid"] = tid
    if _carries(data):
        msg["data"] = data
    return orjson.dumps(msg)


def encode_ok(tid: Tid | None, data: Any = None) -> bytes:
    if _carries(data):
        return orjson.dumps({"result": "ok", "tid": tid, "data": data})
    return orjson.dumps({"result": "ok", "tid": tid})


def encode_error(tid: Tid | None, error: ApiError) -> bytes:
    return orjson.dumps({"result": "error", "tid": tid, "data": error.to_wire()})


def encode_ack(tid: Tid) -> bytes:
    return orjson.dumps({"ack": tid})
