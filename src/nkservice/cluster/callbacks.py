"""Callbacks of a cluster (PROTOCOL.md §7): apps registered on any process answer the
callbacks fired on every process.

Each process keeps its own apps in a `LocalCallbacks` and tells the others, on
`nks.cbreg`, how many it holds for each key (again when a process joins, so a newcomer
learns them at once; a process that is gone is forgotten with its apps). While no other
process holds an app for a key, a callback is fired as with one process. Otherwise the
firing process takes turns over every app of every process — the same round-robin as one
process's, over the whole cluster — and asks the app's process to send the request, pass
its acks back, then its answer. If that app's connection ends (or misses its deadline), or
its process is gone, the callback goes once more to the next app; with none left, the
fallback of §7 applies.

Registrations travel as messages: a process may learn of an app that went away a moment
ago only after firing at it, and then fires at the next one (or falls back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from nkservice.cluster.link import NatsLink
from nkservice.cluster.rpc import Gone, Reply, Rpc
from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.messages import Response
from nkservice.service.callbacks import CALLBACK_SUBCLASS, LocalCallbacks
from nkservice.service.contracts import CallbackKey, Caller
from nkservice.service.waiters import FutureWaiter

log = logging.getLogger(__name__)

REGISTRATIONS = "nks.cbreg"
FORWARD_LIMIT = 3600.0  # the app's own deadlines rule (§1.3); the session's ack_timeout too


class _AppWaiter:
    """The `Waiter` of a callback sent to one of our apps for another process."""

    __slots__ = ("_reply",)

    def __init__(self, reply: Reply) -> None:
        self._reply = reply

    def answered(self, response: Response) -> None:
        self._reply.ok({"ok": response.ok, "data": response.data})

    def acked(self) -> None:
        self._reply.ack()

    def failed(self, error: ApiError) -> None:
        self._reply.error(ApiError(ErrorCode.service_unavailable, "the app is gone"))


class ClusterCallbacks:
    """Implements `contracts.CallbackRegistry` for one process of a cluster."""

    def __init__(self, local: LocalCallbacks, link: NatsLink, rpc: Rpc) -> None:
        self.local = local
        self._link = link
        self._rpc = rpc
        # Each app's registration time: the cluster's apps of a key take turns in that order.
        self._since: dict[tuple[CallbackKey, Caller], float] = {}
        self._elsewhere: dict[CallbackKey, dict[str, list[float]]] = {}  # process → its apps
        self._turn: dict[CallbackKey, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        rpc.watch_members(self._member_changed)
        rpc.serve("callbacks", self._serve_listing)
        rpc.serve("cb", self._serve_callback)
        rpc.serve("registrations", self._serve_registrations)

    def start(self) -> None:
        """Once connected: hear the others' registrations."""
        self._link.subscribe(REGISTRATIONS, self._heard)

    # -- registrations ---------------------------------------------------------------------

    def register(self, key: CallbackKey, app: Caller) -> Awaitable[None] | None:
        """Register, and tell the others; done once NATS has the news (see `link.confirm`)."""
        self.local.register(key, app)
        self._since.setdefault((key, app), time.time())
        self._announce(key)
        return self._link.confirm()

    def unregister(self, key: CallbackKey, app: Caller) -> None:
        self.local.unregister(key, app)
        if self._since.pop((key, app), None) is not None:
            self._announce(key)

    def drop(self, app: Caller) -> None:
        for key in self.local.keys_of(app):
            self.unregister(key, app)

    def forget_service(self, service: str) -> None:
        for key, app in [entry for entry in self._since if entry[0].service == service]:
            self.unregister(key, app)
        self.local.forget_service(service)

    def registered(self, key: CallbackKey) -> bool:
        return self.local.registered(key) or key in self._elsewhere

    def _times(self, key: CallbackKey) -> list[float]:
        """When each of our apps for `key` registered, in their local order."""
        return [self._since[(key, app)] for app in self.local.apps(key)]

    def _announce(self, key: CallbackKey) -> None:
        self._link.publish(REGISTRATIONS, orjson.dumps(
            {"p": self._rpc.process, "k": [key.service, key.kind, key.class_],
             "t": self._times(key)}))

    def _heard(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        told = orjson.loads(data)
        process = told["p"]
        key = CallbackKey(*told["k"])
        holders = self._elsewhere.setdefault(key, {})
        if told["t"]:
            holders[process] = told["t"]
        else:
            holders.pop(process, None)
            if not holders:
                del self._elsewhere[key]

    def _member_changed(self, process: str, joined: bool) -> None:
        if joined:  # each tells the other what it holds, whoever thought the other gone
            for key in self.local.keys():  # noqa: SIM118 (a method, not a dict)
                self._announce(key)
            self._spawn(self._learn_from(process))
            return
        for key in [key for key, holders in self._elsewhere.items() if process in holders]:
            del self._elsewhere[key][process]
            if not self._elsewhere[key]:
                del self._elsewhere[key]

    async def _learn_from(self, process: str) -> None:
        """What a process that (re)joined holds, asked rather than waited for."""
        try:
            held = await self._rpc.ask(process, "registrations", {}, timeout=5.0)
        except (ApiError, Gone) as error:
            log.info("could not learn the callbacks of %s: %s", process, error)
            return
        for key in [key for key, holders in self._elsewhere.items() if process in holders]:
            del self._elsewhere[key][process]
            if not self._elsewhere[key]:
                del self._elsewhere[key]
        for fields, times in held:
            if times:
                self._elsewhere.setdefault(CallbackKey(*fields), {})[process] = times

    def _serve_registrations(self, request: dict[str, Any], reply: Reply) -> None:
        reply.ok([[[key.service, key.kind, key.class_], self._times(key)]
                  for key in self.local.keys()])  # noqa: SIM118 (a method, not a dict)

    async def listing(self, service: str | None) -> list[dict[str, Any]]:
        found = await self.local.listing(service)
        try:
            for answer in await self._rpc.gather("callbacks", {"s": service}):
                found.extend(answer)
        except Gone:
            pass
        return found

    def _serve_listing(self, request: dict[str, Any], reply: Reply) -> None:
        async def run() -> None:
            reply.ok(await self.local.listing(request["s"]))
        self._spawn(run())

    # -- firing ----------------------------------------------------------------------------

    def call(self, key: CallbackKey, cmd: str, data: Any, *,
             on_ack: Callable[[], None] | None = None,
             decide: Callable[[Response | None], Any] = lambda answer: answer
             ) -> asyncio.Future[Any]:
        if key not in self._elsewhere:  # only ours, if any: as one process
            return self.local.call(key, cmd, data, on_ack=on_ack, decide=decide)
        return self._spawn(self._call_around(key, cmd, data, on_ack, decide))

    def _apps_of(self, key: CallbackKey) -> list[tuple[str, int]]:
        """Every app of the cluster for `key`, the first registered first: (its process,
        its number there)."""
        times = {**self._elsewhere.get(key, {}), self._rpc.process: self._times(key)}
        apps = sorted((since, process, number) for process, registered in times.items()
                      for number, since in enumerate(registered))
        return [(process, number) for _, process, number in apps]

    async def _call_around(self, key: CallbackKey, cmd: str, data: Any,
                           on_ack: Callable[[], None] | None,
                           decide: Callable[[Response | None], Any]) -> Any:
        tried: list[tuple[str, int]] = []
        answer: Response | None = None
        while len(tried) < 2:  # the first app, then once more if it failed
            apps = [app for app in self._apps_of(key) if app not in tried]
            if not apps:
                break
            turn = self._turn.get(key, 0)
            self._turn[key] = turn + 1
            process, number = apps[turn % len(apps)]
            tried.append((process, number))
            try:
                if process == self._rpc.process:
                    answer = await self._ask_ours(key, number, cmd, data, on_ack)
                else:
                    got = await self._rpc.ask(process, "cb", {
                        "k": [key.service, key.kind, key.class_], "n": number, "c": cmd,
                        "d": data}, timeout=FORWARD_LIMIT, on_ack=on_ack)
                    answer = Response(0, bool(got["ok"]), got["data"])
                break
            except (ApiError, Gone) as error:
                why = error.text if isinstance(error, ApiError) else "its process is gone"
                log.warning("callback %s of %s: an app failed (%s)%s", cmd, key.service, why,
                            "; trying another" if len(tried) < 2 else "")
                if len(tried) < 2:
                    self.local.metrics.count("nkservice_callback_failovers", (key.kind,))
        return decide(answer)

    async def _ask_ours(self, key: CallbackKey, number: int, cmd: str, data: Any,
                        on_ack: Callable[[], None] | None) -> Response:
        apps = self.local.apps(key)
        if not apps:
            raise ApiError(ErrorCode.service_unavailable, "the app is gone")
        waiter = FutureWaiter(on_ack=on_ack)
        apps[number % len(apps)].conn.send_request("core", cmd, data,
                                                   subclass=CALLBACK_SUBCLASS, waiter=waiter)
        return await waiter.response()

    def _serve_callback(self, request: dict[str, Any], reply: Reply) -> None:
        """Another process chose one of our apps."""
        apps = self.local.apps(CallbackKey(*request["k"]))
        if not apps:
            reply.error(ApiError(ErrorCode.service_unavailable, "the app is gone"))
            return
        apps[request["n"] % len(apps)].conn.send_request(
            "core", request["c"], request["d"], subclass=CALLBACK_SUBCLASS,
            waiter=_AppWaiter(reply))

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
