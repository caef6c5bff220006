"""The login chain on a fake wire (PROTOCOL.md §3): who decides, in which order."""

from __future__ import annotations

from nkservice.service.contracts import CONTINUE, Continue, LoginAttempt, LoginDecision
from nkservice.service.logic import Link
from nkservice.service.passwords import hash_password
from tests.service.fakes import Client, FakeNode, code_of


class Directory(Link):
    """An external user directory: renames users, refuses some with a reason."""

    def login(self, attempt: LoginAttempt) -> LoginDecision | Continue:
        if attempt.user == "mallory":
            return LoginDecision(False, reason="banned")
        if attempt.user.endswith("@corp") and attempt.password == "sso":
            return LoginDecision(True, user=attempt.user.removesuffix("@corp"),
                                 meta={"sso": True}, data={"welcome": 1})
        return CONTINUE


async def test_the_order_of_the_chain() -> None:
    node = FakeNode()
    service = node.add("demo", logic=[Directory()])
    assert (await Client(service).login("admin", "secret"))["data"]["user"] == "admin"
    assert (await Client(service).login("boss", "pw"))["result"] == "ok"
    sso = (await Client(service).login("carol@corp", "sso"))["data"]
    assert (sso["user"], sso["welcome"]) == ("carol", 1)
    assert (await Client(service).login("alice", "pw1"))["result"] == "ok"  # static users last
    banned = await Client(service).login("mallory", "x")
    assert banned["data"] == {"code": 100030, "error": "Unauthorized: banned"}
    assert code_of(await Client(service).login("alice", "nope")) == 100038
    assert code_of(await Client(service).login("admin", "nope")) == 100038
    assert code_of(await Client(service).login("nobody", "x")) == 100030


async def test_only_the_global_admin_logs_in_on_the_core_service() -> None:
    core = FakeNode().add("core")
    assert code_of(await Client(core).login("alice", "pw1")) == 100030
    assert code_of(await Client(core).login("boss", "pw")) == 100030
    assert (await Client(core).login("admin", "secret"))["result"] == "ok"


async def test_hashed_passwords_and_the_roles_they_give() -> None:
    service = FakeNode().add("demo", users={"dave": hash_password("hashed")})
    dave = Client(service)
    assert code_of(await dave.login("dave", "wrong")) == 100038
    assert (await dave.login("dave", "hashed"))["result"] == "ok"
    assert code_of(await dave.request("list_users")) == 100030  # a user, not an admin
    boss = Client(service)
    await boss.login("boss", "pw")
    listed = (await boss.request("list_users"))["data"]
    assert sorted(listed) == ["boss", "dave"]
