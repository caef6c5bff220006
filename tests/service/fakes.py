"""The service layer on a fake wire: no sockets, no transports, the real protocol core."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.bus import LocalBus
from nkservice.events.fanout import Events
from nkservice.metrics import Metrics
from nkservice.protocol.connection import Goodbye
from nkservice.service.callbacks import LocalCallbacks
from nkservice.service.config import Credentials, parse_service
from nkservice.service.contracts import CallbackRegistry, ServiceContext, SessionRegistry
from nkservice.service.logic import Link
from nkservice.service.registry import LocalSessionRegistry
from nkservice.service.service import Service

RECV_TIMEOUT = 5.0


class FakeWire:
    """A transport that keeps what it is given; `recv` awaits the next message."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.goodbye: Goodbye | None = None

    def send(self, data: bytes) -> None:
        self.inbox.put_nowait(json.loads(data))

    def close(self, goodbye: Goodbye) -> None:
        self.goodbye = goodbye

    def wake_at(self, when: float) -> None:
        pass  # the deadlines are the protocol core's tests' business

    def backlog(self) -> int:
        return 0

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(RECV_TIMEOUT):
            return await self.inbox.get()


class FakeNode:
    """The `Directory` of the services under test: the in-process seams."""

    def __init__(self) -> None:
        self.admin = Credentials("admin", "secret")
        self.events = Events(LocalBus())
        self.registry: SessionRegistry = LocalSessionRegistry(self.events)
        self.callbacks: CallbackRegistry = LocalCallbacks()
        self.metrics = Metrics()
        self.services: dict[str, Service] = {}

    def find_service(self, name: str) -> ServiceContext | None:
        return self.services.get(name)

    def cluster_state(self) -> dict[str, Any] | None:
        return None

    # Services changed at run time are the real node's (tests/e2e/test_services_e2e.py).

    async def create_service(self, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        raise ApiError(ErrorCode.not_implemented)

    async def update_service(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        raise ApiError(ErrorCode.not_implemented)

    async def stop_service(self, name: str) -> dict[str, Any]:
        raise ApiError(ErrorCode.not_implemented)

    async def list_services(self) -> list[dict[str, Any]]:
        raise ApiError(ErrorCode.not_implemented)

    def get_service(self, name: str) -> dict[str, Any]:
        raise ApiError(ErrorCode.not_implemented)

    def add(self, name: str, logic: list[Link] | None = None, **table: Any) -> Service:
        definition = {"admin": {"user": "boss", "password": "pw"},
                      "users": {"alice": "pw1", "bob": "pw2"}, "ping_interval": 0,
                      "login_failure_delay": 0, **table}
        service = Service(parse_service(name, definition, Path(".")), self, logic or [])
        self.services[name] = service
        return service


class Client:
    """One connection to a service, speaking JSON objects."""

    _ports = itertools.count(40000)

    def __init__(self, service: Service) -> None:
        self.wire = FakeWire()
        loop = asyncio.get_running_loop()
        self.conn = service.accept(self.wire, loop.time, "tcp", "127.0.0.1", next(self._ports))
        self._tids = itertools.count(1)

    async def request(self, cmd: str, data: Any = None, *, class_: str = "core",
                      subclass: str | None = None) -> dict[str, Any]:
        tid = next(self._tids)
        message: dict[str, Any] = {"class": class_, "cmd": cmd, "tid": tid, "data": data}
        if subclass is not None:
            message["subclass"] = subclass
        self.conn.receive(json.dumps(message).encode())
        answer = await self.wire.recv()
        assert answer.get("tid") == tid, answer
        return answer

    async def login(self, user: str, password: str, **extra: Any) -> dict[str, Any]:
        return await self.request("login", {"user": user, "password": password, **extra})


def code_of(answer: dict[str, Any]) -> int:
    assert answer["result"] == "error", answer
    code: int = answer["data"]["code"]
    return code
