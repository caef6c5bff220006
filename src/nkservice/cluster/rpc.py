"""Asking other processes of the cluster: one of them (`ask`), or all of them (`gather`).

Every process listens on `nks.p.<id>` (requests to it alone) and `nks.all` (requests to
everyone), and gets its answers on `nks.r.<id>.<n>`. A request names an operation that the
other side `serve`s; the handler answers through a `Reply`, which may send acks first (a
session that acks a forwarded request, an app still deciding a callback) and then one
answer or one error. A process that is gone is known at once: NATS answers a request to a
subject nobody listens on with a "no responders" status.

Membership: each process says it is alive on `nks.hb` every `HEARTBEAT` seconds (and at
once when it sees a process it did not know, so a newcomer learns the others within one
round trip); one not heard from for `HEARTBEAT * 3` is gone. `gather` waits for an answer
from each live process but itself, or for its timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from nkservice.cluster.link import NO_RESPONDERS, NatsLink, TooLarge
from nkservice.errors import ApiError, ErrorCode

log = logging.getLogger(__name__)

HEARTBEAT = 1.0
ALL = "nks.all"
HEARTBEATS = "nks.hb"


class Gone(Exception):
    """The process asked is not there any more."""


class Reply:
    """How a served request is answered: `ack()` any number of times, then `ok` or `error`."""

    __slots__ = ("_link", "_subject", "done")

    def __init__(self, link: NatsLink, subject: str) -> None:
        self._link = link
        self._subject = subject
        self.done = False

    def ack(self) -> None:
        if not self.done:
            self._link.publish(self._subject, b'{"k":"ack"}')

    def ok(self, data: Any = None) -> None:
        if not self.done:
            self.done = True
            try:
                self._link.publish(self._subject, orjson.dumps({"k": "ok", "d": data}))
            except TooLarge as error:
                log.warning("an answer to another process is too large: %s", error)
                self.done = False
                self.error(ApiError(ErrorCode.message_too_large, "the answer"))

    def error(self, error: ApiError) -> None:
        if not self.done:
            self.done = True
            self._link.publish(self._subject, orjson.dumps({"k": "err", "e": error.to_wire()}))


Handler = Callable[[dict[str, Any], Reply], None]


class _Call:
    __slots__ = ("answers", "expected", "future", "on_ack", "target")

    def __init__(self, future: asyncio.Future[Any], expected: int,
                 on_ack: Callable[[], None] | None, target: str | None) -> None:
        self.future = future
        self.expected = expected  # answers to wait for (1 for `ask`)
        self.answers: list[Any] = []
        self.on_ack = on_ack
        self.target = target  # the one process asked, if one: its end ends the call


class Rpc:
    def __init__(self, link: NatsLink, process: str) -> None:
        self.link = link
        self.process = process
        self._handlers: dict[str, Handler] = {}
        self._calls: dict[str, _Call] = {}
        self._numbers = itertools.count(1)
        self._members: dict[str, float] = {}  # other process → when last heard of
        self._joined = asyncio.Event()  # set when a process joins
        self._watchers: list[Callable[[str, bool], None]] = []
        self._beating: asyncio.Task[None] | None = None

    def start(self) -> None:
        link = self.link
        link.subscribe(f"nks.p.{self.process}", self._served)
        link.subscribe(ALL, self._served)
        link.subscribe(f"nks.r.{self.process}.*", self._answered)
        link.subscribe(HEARTBEATS, self._heard)
        self._beat()
        self._beating = asyncio.get_running_loop().create_task(self._beat_forever())

    def stop(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
        for call in self._calls.values():
            if not call.future.done():
                call.future.set_exception(Gone())
        self._calls.clear()

    # -- membership --------------------------------------------------------------------------

    def members(self) -> list[str]:
        """The other processes heard from lately."""
        now = time.monotonic()
        return [process for process, seen in self._members.items()
                if now - seen < HEARTBEAT * 3]

    def _beat(self) -> None:
        self.link.publish(HEARTBEATS, self.process.encode())

    def watch_members(self, changed: Callable[[str, bool], None]) -> None:
        """Call `changed(process, joined)` when a process joins (True) or is gone (False)."""
        self._watchers.append(changed)

    def _tell(self, process: str, joined: bool) -> None:
        for changed in self._watchers:
            try:
                changed(process, joined)
            except Exception:
                log.exception("a membership watcher failed")

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            self._beat()
            now = time.monotonic()
            for process in [p for p, seen in self._members.items()
                            if now - seen >= HEARTBEAT * 3]:
                del self._members[process]
                log.warning("process %s is gone (not heard of for %.0f s)", process,
                            HEARTBEAT * 3)
                self._fail_calls(partial(_asked, process))
                self._tell(process, False)

    def lost_connection(self) -> None:
        """NATS went away: no answer on the way will arrive."""
        self._fail_calls(lambda call: True)

    def _fail_calls(self, which: Callable[[_Call], bool]) -> None:
        for call in self._calls.values():
            if which(call) and not call.future.done():
                call.future.set_exception(Gone())

    def _heard(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        process = data.decode()
        known = process in self._members
        self._members[process] = time.monotonic()
        if not known:
            log.info("process %s joined", process)
            self._beat()  # let the newcomer know of us now, not in a second
            self._joined.set()
            self._tell(process, True)

    async def until_members(self, count: int) -> None:
        """Until `count` other processes are known (a test, a start that waits for others)."""
        while len(self.members()) < count:
            self._joined.clear()
            await self._joined.wait()

    # -- serving -----------------------------------------------------------------------------

    def serve(self, operation: str, handler: Handler) -> None:
        self._handlers[operation] = handler

    def _served(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        request = orjson.loads(data)
        handler = self._handlers.get(request.get("op"))
        answer = Reply(self.link, reply.decode())
        if handler is None:
            answer.error(ApiError(ErrorCode.not_implemented, str(request.get("op"))))
            return
        try:
            handler(request, answer)
        except ApiError as error:
            answer.error(error)
        except Exception:
            log.exception("serving %s failed", request.get("op"))
            answer.error(ApiError(ErrorCode.internal_error))

    # -- asking ------------------------------------------------------------------------------

    async def ask(self, process: str, operation: str, data: dict[str, Any], *,
                  timeout: float, on_ack: Callable[[], None] | None = None) -> Any:
        """The answer of `process` (an `ApiError` it answered is raised here); `Gone` when
        the process is not there, or goes; `ApiError(timeout)` after `timeout` (each ack
        restarts nothing: the caller's own deadline rules)."""
        answers = await self._call(f"nks.p.{process}", operation, data, 1, timeout, on_ack,
                                   process)
        if not answers:
            raise ApiError(ErrorCode.timeout)
        return _result(answers[0])

    async def gather(self, operation: str, data: dict[str, Any], *,
                     timeout: float = 1.0) -> list[Any]:
        """The answers of every other live process (errors left out)."""
        expected = len(self.members())
        if not expected or not self.link.connected:
            return []
        answers = await self._call(ALL, operation, data, expected, timeout, None, None)
        return [answer.get("d") for answer in answers if answer.get("k") == "ok"]

    async def _call(self, subject: str, operation: str, data: dict[str, Any], expected: int,
                    timeout: float, on_ack: Callable[[], None] | None,
                    target: str | None) -> list[Any]:
        if not self.link.connected:
            raise Gone()
        token = str(next(self._numbers))
        call = _Call(asyncio.get_running_loop().create_future(), expected, on_ack, target)
        self._calls[token] = call
        try:
            self.link.publish(subject, orjson.dumps({**data, "op": operation,
                                                     "from": self.process}),
                              reply=f"nks.r.{self.process}.{token}")
        except TooLarge:
            del self._calls[token]
            raise ApiError(ErrorCode.message_too_large, "for another process") from None
        try:
            async with asyncio.timeout(timeout):
                await call.future
        except TimeoutError:
            pass
        finally:
            self._calls.pop(token, None)
        return call.answers

    def _answered(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        call = self._calls.get(subject.rsplit(b".", 1)[1].decode())
        if call is None or call.future.done():
            return
        if headers.startswith(NO_RESPONDERS):
            call.future.set_exception(Gone())
            return
        answer = orjson.loads(data)
        if answer.get("k") == "ack":
            if call.on_ack is not None:
                call.on_ack()
            return
        call.answers.append(answer)
        if len(call.answers) >= call.expected:
            call.future.set_result(None)


def _asked(process: str, call: _Call) -> bool:
    return call.target == process


def _result(answer: dict[str, Any]) -> Any:
    if answer.get("k") == "err":
        raise ApiError.from_wire(answer.get("e"))
    return answer.get("d")
