"""Plugins for the tests: each records the hooks it sees in `SEEN` and passes."""

from __future__ import annotations

from typing import Any

from nkservice.plugins.api import Plugin
from nkservice.protocol.messages import Request
from nkservice.service.config import ServiceConfig
from nkservice.service.contracts import CONTINUE, Caller, LoginAttempt
from nkservice.service.logic import Link

SEEN: list[str] = []


class Recording(Link):
    def __init__(self, name: str) -> None:
        self.name = name

    def login(self, attempt: LoginAttempt) -> Any:
        SEEN.append(f"{self.name}.login")
        return CONTINUE

    def command(self, caller: Caller, request: Request) -> Any:
        SEEN.append(f"{self.name}.{request.class_}")
        if request.class_ == self.name:  # each plugin serves the class of its name
            return {"served_by": self.name}
        return CONTINUE


class Recorder(Plugin):
    def link(self, service: ServiceConfig, settings: Any) -> Link:
        return Recording(self.name)


class Base(Recorder):
    name = "base"


class Top(Recorder):
    name = "top"
    depends = ("tests.plugins.sample:Base",)


class Other(Recorder):
    name = "other"


class Loop(Recorder):
    name = "loop"
    depends = ("tests.plugins.sample:Loop2",)


class Loop2(Recorder):
    name = "loop2"
    depends = ("tests.plugins.sample:Loop",)


NOT_A_PLUGIN = object()
