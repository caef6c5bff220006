"""The session registry of a cluster: this process's sessions, and the others' through NATS.

Each process keeps its own sessions in a `LocalSessionRegistry` and answers the others'
questions about them (`cluster/rpc.py`); nothing is replicated, so a login costs no
network round trip unless its session id was chosen by the client:

- **Claiming a chosen id** (§3.3) asks every process: one that holds the id for the same
  user stops that session (or takes it out of its resume park) and names its
  subscriptions, which it keeps with what they bring; once the new session holds them
  too, it lets go and hands over those events (`service/resume.py`: none lost, none
  twice). One that holds the id for another user refuses (`duplicated_session_id`). A
  random id (UUID v4) is nobody's: no question.
  Two processes claiming the same id at the same moment each see the other's claim; the
  process with the smaller id wins, the other login gets `duplicated_session_id`.
- **Finding, listing, stopping, forwarding a request** look here first, then ask the
  others; a forwarded request's acks and answer come back the same way (§6 `session`/`cmd`).

With NATS away, every question is answered from this process alone (the cluster is
degraded: see `cluster/node.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from nkservice.cluster.rpc import Gone, Reply, Rpc
from nkservice.errors import ApiError, ErrorCode
from nkservice.events.bus import HeldEvent
from nkservice.events.index import Subscription, Topic
from nkservice.protocol.messages import Response
from nkservice.service.contracts import Caller, Claim, SessionInfo
from nkservice.service.registry import LocalSessionRegistry
from nkservice.service.resume import ParkedSession

log = logging.getLogger(__name__)

FORWARD_LIMIT = 3600.0  # a forwarded request without its own timeout: the target's rules
# How long a session handed over to another process keeps its subscriptions and events for
# it, if that process never asks for them (its login failed, or it is gone).
HANDOVER_LIMIT = 10.0


class ClusterRegistry:
    """Implements `contracts.SessionRegistry` for one process of a cluster."""

    def __init__(self, local: LocalSessionRegistry, rpc: Rpc, *,
                 question_timeout: float = 3.0) -> None:
        """`question_timeout`: how long the others may take to answer (a busy process
        pauses; one that is gone is known within 3 s and no longer waited for)."""
        self.local = local
        self.rpc = rpc
        self.timeout = question_timeout
        self._claiming: set[tuple[str, str]] = set()
        # Chosen ids other processes asked for lately: (process, user, when) by (service, id).
        self._asked: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Sessions handed over, until the new holder asks for their events: by (service,
        # id, the process that took them).
        self._handing: dict[tuple[str, str, str], ParkedSession] = {}
        for operation, handler in (("take", self._serve_take), ("handed", self._serve_handed),
                                   ("find", self._serve_find),
                                   ("users", self._serve_users),
                                   ("sessions_of", self._serve_sessions_of),
                                   ("stop", self._serve_stop), ("where", self._serve_where),
                                   ("request", self._serve_request)):
            rpc.serve(operation, handler)

    # -- logging in and out ----------------------------------------------------------------

    async def claim(self, caller: Caller, user: str, session_id: str, *,
                    fresh: bool = False) -> Claim:
        service = caller.service.name
        if fresh or self.local.holds(service, session_id):
            return await self.local.claim(caller, user, session_id, fresh=fresh)
        key = (service, session_id)
        if self._claimed_by_another(key, self.rpc.process, user):
            raise ApiError(ErrorCode.duplicated_session_id)
        self._claiming.add(key)
        try:
            answers = await self._ask_all("take", service, i=session_id, u=user)
        finally:
            self._claiming.discard(key)
        inherited = Claim()
        for answer in answers:
            if not answer:
                continue
            if answer.get("taken") or answer.get("contested", "~") < self.rpc.process:
                raise ApiError(ErrorCode.duplicated_session_id)
            if "subs" in answer:
                inherited = _claim_from_wire(answer)
                inherited.handover = partial(self._take_events, answer["p"], service,
                                             session_id)
        here = await self.local.claim(caller, user, session_id)
        return here if here.subscriptions or here.resumed else inherited

    async def _take_events(self, process: str, service: str, session_id: str
                           ) -> list[HeldEvent]:
        """The new session holds the subscriptions: the process that had them lets go and
        hands over the events it kept (`service/resume.py`)."""
        try:
            answer = await self.rpc.ask(process, "handed", {"s": service, "i": session_id},
                                        timeout=self.timeout)
        except (Gone, ApiError) as error:
            log.warning("session %s of %s: the events kept for it by process %s are lost "
                        "(%s)", session_id, service, process, error or "gone")
            return []
        return [(None if event_id is None else (event_id[0], event_id[1]), data.encode())
                for event_id, data in answer]

    def ended(self, caller: Caller) -> None:
        self.local.ended(caller)

    def forget_service(self, service: str) -> None:
        for key in [key for key in self._handing if key[0] == service]:
            self._let_go(key)
        self.local.forget_service(service)

    # -- reaching sessions -----------------------------------------------------------------

    async def find(self, service: str, session_id: str) -> SessionInfo | None:
        found = await self.local.find(service, session_id)
        if found is not None:
            return found
        for answer in await self._ask_all("find", service, i=session_id):
            if answer:
                return SessionInfo(**answer)
        return None

    async def users(self, service: str) -> dict[str, list[str]]:
        merged = await self.local.users(service)
        for answer in await self._ask_all("users", service):
            for user, ids in answer.items():
                merged.setdefault(user, []).extend(ids)
        return merged

    async def sessions_of(self, service: str, user: str) -> dict[str, SessionInfo]:
        merged = await self.local.sessions_of(service, user)
        for answer in await self._ask_all("sessions_of", service, u=user):
            merged.update({i: SessionInfo(**info) for i, info in answer.items()})
        return merged

    async def stop(self, service: str, session_id: str, reason: str) -> str:
        if self.local.holds(service, session_id):
            return await self.local.stop(service, session_id, reason)
        for answer in await self._ask_all("stop", service, i=session_id, r=reason):
            if answer:
                return str(answer)
        raise ApiError(ErrorCode.session_not_found)

    async def request(self, service: str, session_id: str, class_: str, cmd: str, data: Any,
                      *, subclass: str | None, on_ack: Callable[[], None],
                      timeout: float | None) -> Response:
        if self.local.holds(service, session_id):
            return await self.local.request(service, session_id, class_, cmd, data,
                                            subclass=subclass, on_ack=on_ack, timeout=timeout)
        holders = [a for a in await self._ask_all("where", service, i=session_id) if a]
        if not holders:
            raise ApiError(ErrorCode.session_not_found)
        try:
            answer = await self.rpc.ask(
                holders[0], "request",
                {"s": service, "i": session_id, "c": class_, "m": cmd, "d": data,
                 "sc": subclass, "t": timeout},
                timeout=timeout or FORWARD_LIMIT, on_ack=on_ack)
        except Gone:
            raise ApiError(ErrorCode.session_not_found) from None
        return Response(0, bool(answer["ok"]), answer["data"])

    async def _ask_all(self, operation: str, service: str, **data: Any) -> list[Any]:
        try:
            return await self.rpc.gather(operation, {"s": service, **data},
                                         timeout=self.timeout)
        except Gone:  # NATS is away: what this process knows is all there is
            return []

    # -- answering the others --------------------------------------------------------------

    def _claimed_by_another(self, key: tuple[str, str], process: str, user: str) -> bool:
        """Did another process claim this id for another user a moment ago? (Its claim
        may not be registered anywhere yet: the first claim wins.)"""
        asked = self._asked.get(key)
        return (asked is not None and asked[0] != process and asked[1] != user
                and time.monotonic() - asked[2] < 2 * self.timeout)

    def _serve_take(self, request: dict[str, Any], reply: Reply) -> None:
        service, session_id = request["s"], request["i"]
        key = (service, session_id)
        if key in self._claiming:
            reply.ok({"contested": self.rpc.process})
            return
        if self._claimed_by_another(key, request["from"], request["u"]):
            reply.ok({"taken": True})
            return
        now = time.monotonic()
        if len(self._asked) > 10_000:  # forget the old ones now and then
            self._asked = {k: v for k, v in self._asked.items()
                           if now - v[2] < 2 * self.timeout}
        self._asked[key] = (request["from"], request["u"], now)
        try:
            handed = self.local.hand_over(service, session_id, request["u"])
        except ApiError:
            reply.ok({"taken": True})
            return
        if handed is None:
            reply.ok(None)
            return
        claim, kept = handed
        taker = (service, session_id, request["from"])
        self._let_go(taker)  # a take before by the same process, never finished
        self._handing[taker] = kept
        kept.expiry = asyncio.get_running_loop().call_later(HANDOVER_LIMIT, self._let_go,
                                                            taker)
        reply.ok({**_claim_to_wire(claim), "p": self.rpc.process})

    def _serve_handed(self, request: dict[str, Any], reply: Reply) -> None:
        events = self._let_go((request["s"], request["i"], request["from"]))
        reply.ok([[event_id, data.decode()] for event_id, data in events])

    def _let_go(self, key: tuple[str, str, str]) -> list[HeldEvent]:
        kept = self._handing.pop(key, None)
        if kept is None:
            return []
        if kept.expiry is not None:
            kept.expiry.cancel()
        return self.local.let_go(kept)

    def _serve_find(self, request: dict[str, Any], reply: Reply) -> None:
        self._answer(reply, self.local.find(request["s"], request["i"]),
                     lambda info: None if info is None else _info_to_wire(info))

    def _serve_users(self, request: dict[str, Any], reply: Reply) -> None:
        self._answer(reply, self.local.users(request["s"]), lambda users: users)

    def _serve_sessions_of(self, request: dict[str, Any], reply: Reply) -> None:
        self._answer(reply, self.local.sessions_of(request["s"], request["u"]),
                     lambda found: {i: _info_to_wire(info) for i, info in found.items()})

    def _serve_stop(self, request: dict[str, Any], reply: Reply) -> None:
        if not self.local.holds(request["s"], request["i"]):
            reply.ok(None)
            return
        self._answer(reply, self.local.stop(request["s"], request["i"], request["r"]),
                     lambda user: user)

    def _serve_where(self, request: dict[str, Any], reply: Reply) -> None:
        reply.ok(self.rpc.process if self.local.holds(request["s"], request["i"]) else None)

    def _serve_request(self, request: dict[str, Any], reply: Reply) -> None:
        work = self.local.request(request["s"], request["i"], request["c"], request["m"],
                                  request["d"], subclass=request["sc"], on_ack=reply.ack,
                                  timeout=request["t"])
        self._answer(reply, work, lambda response: {"ok": response.ok,
                                                    "data": response.data})

    def _answer(self, reply: Reply, work: Any, wire: Callable[[Any], Any]) -> None:
        """Answer with `wire(result of work)` once it is done (errors as errors)."""
        async def run() -> None:
            try:
                reply.ok(wire(await work))
            except ApiError as error:
                reply.error(error)
            except Exception:
                log.exception("answering another process failed")
                reply.error(ApiError(ErrorCode.internal_error))

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _info_to_wire(info: SessionInfo) -> dict[str, Any]:
    return {"session_id": info.session_id, "user": info.user, **info.describe(),
            "subscriptions": info.subscriptions}


def _claim_to_wire(claim: Claim) -> dict[str, Any]:
    return {"subs": [[*_topic_fields(s.topic), s.body] for s in claim.subscriptions],
            "events": [event.decode() for event in claim.missed_events],
            "resumed": claim.resumed}


def _claim_from_wire(answer: dict[str, Any]) -> Claim:
    subscriptions = [Subscription(Topic(*fields[:5]), fields[5], order)
                     for order, fields in enumerate(answer["subs"])]
    return Claim(subscriptions, [event.encode() for event in answer["events"]],
                 resumed=bool(answer["resumed"]))


def _topic_fields(topic: Topic) -> tuple[str, str, str, str, str]:
    return topic.service, topic.class_, topic.subclass, topic.type, topic.obj_id
