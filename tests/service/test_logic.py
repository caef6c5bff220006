"""The service logic chain on a fake wire: order, pass-through, async links, every hook."""

from __future__ import annotations

from typing import Any

from nkservice.errors import ApiError, ErrorCode
from nkservice.events.index import Topic
from nkservice.protocol.messages import Request
from nkservice.service.contracts import CONTINUE, Caller, Continue, LoginAttempt, LoginDecision
from nkservice.service.logic import Link, LogicChain, settled
from tests.service.fakes import Client, FakeNode, code_of


class Recorder(Link):
    """Records each hook it sees, and answers as told."""

    def __init__(self, name: str, seen: list[str], answer: Any = CONTINUE) -> None:
        self.name = name
        self.seen = seen
        self.answer = answer

    def command(self, caller: Caller, request: Request) -> Any:
        self.seen.append(f"{self.name}:{request.cmd}")
        return self.answer


class Later(Recorder):
    """The same, answering from a coroutine."""

    def command(self, caller: Caller, request: Request) -> Any:
        super().command(caller, request)
        return self._later()

    async def _later(self) -> Any:
        return self.answer


class LoginOnly(Link):
    def login(self, attempt: LoginAttempt) -> LoginDecision | Continue:
        return CONTINUE


def test_each_hook_only_asks_the_links_that_implement_it() -> None:
    seen: list[str] = []
    chain = LogicChain([LoginOnly(), Recorder("a", seen), LoginOnly(), Recorder("b", seen, 7)])
    request = Request("chat", "join", 1)
    assert chain.command(None, request) == 7  # type: ignore[arg-type]  # no caller needed
    assert seen == ["a:join", "b:join"]
    assert chain.client_event(None, request) is CONTINUE  # type: ignore[arg-type]


async def test_an_async_link_may_pass_and_the_chain_goes_on_below_it() -> None:
    seen: list[str] = []
    chain = LogicChain([Later("top", seen), Recorder("mid", seen), Later("base", seen, "x")])
    outcome = chain.command(None, Request("chat", "join", 1))  # type: ignore[arg-type]
    assert seen == ["top:join"]  # the rest waits for the top link's answer
    assert await settled(outcome) == "x"
    assert seen == ["top:join", "mid:join", "base:join"]


async def test_the_first_decision_wins_even_when_it_is_async() -> None:
    seen: list[str] = []
    chain = LogicChain([Recorder("a", seen), Later("b", seen, {"ok": 1}), Recorder("c", seen, 2)])
    assert await settled(chain.command(None, Request("x", "y", 1))) == {"ok": 1}  # type: ignore[arg-type]
    assert seen == ["a:y", "b:y"]


class ChatPlugin(Link):
    """What a plugin will look like: its own class, a say in subscriptions and events."""

    def __init__(self) -> None:
        self.lifecycle: list[str] = []
        self.client_events: list[Any] = []

    def command(self, caller: Caller, request: Request) -> Any:
        if request.class_ != "chat":
            return CONTINUE
        return self._answer(caller, request)

    async def _answer(self, caller: Caller, request: Request) -> Any:
        return {"echo": request.data, "user": caller.user}

    def subscribe(self, caller: Caller, topic: Topic) -> Any:
        if topic.class_ == "secret":
            raise ApiError(ErrorCode.unauthorized, "not for you")
        return CONTINUE

    def client_event(self, caller: Caller, request: Request) -> None:
        self.client_events.append(request.data)

    def session_start(self, caller: Caller) -> None:
        self.lifecycle.append(f"start {caller.user}")

    def session_stop(self, caller: Caller) -> None:
        self.lifecycle.append(f"stop {caller.user}")


async def test_a_link_in_a_service_sees_every_hook() -> None:
    plugin = ChatPlugin()
    service = FakeNode().add("demo", logic=[plugin])
    alice = Client(service)
    assert (await alice.login("alice", "pw1"))["result"] == "ok"
    answer = await alice.request("join", {"room": 1}, class_="chat")
    assert answer["data"] == {"echo": {"room": 1}, "user": "alice"}
    assert code_of(await alice.request("join", class_="video")) == 100050  # nobody handles it
    refused = await alice.request("subscribe", {"class": "secret"})
    assert refused["data"] == {"code": 100030, "error": "Unauthorized: not for you"}
    assert (await alice.request("subscribe", {"class": "public"}))["result"] == "ok"
    assert (await alice.request("event", {"k": 1}, class_="chat"))["result"] == "ok"
    assert plugin.client_events == [{"k": 1}]
    assert (await alice.request("ping"))["result"] == "ok"  # core commands: the base
    alice.conn.close("bye")
    assert plugin.lifecycle == ["start alice", "stop alice"]


class Clumsy(Link):
    """Fails at everything it is told."""

    def session_start(self, caller: Caller) -> None:
        raise RuntimeError("start")

    def session_stop(self, caller: Caller) -> None:
        raise RuntimeError("stop")

    def client_event(self, caller: Caller, request: Request) -> None:
        raise RuntimeError("event")


async def test_a_failing_link_costs_no_double_answer_and_no_stuck_session() -> None:
    node = FakeNode()
    service = node.add("demo", logic=[Clumsy()])
    watcher = Client(service)
    await watcher.login("boss", "pw")
    await watcher.request("subscribe", {"class": "core", "subclass": "session"})
    clients = [Client(service) for _ in range(3)]
    for client in clients:
        assert (await client.login("alice", "pw1"))["result"] == "ok"
        assert client.wire.inbox.empty()  # one answer to the login, not two
    assert (await clients[0].request("event", class_="chat"))["result"] == "ok"
    assert clients[0].wire.inbox.empty()
    service.stop("bye")
    assert all(client.conn.closed for client in clients)
    assert await node.registry.users("demo") == {}
