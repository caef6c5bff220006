"""The protocol suite (PROTOCOL.md §1, §3, §4, §6): every test runs on tcp, tls, ws and wss.

Each test starts a node in-process on ephemeral ports and talks to it with raw JSON through
`tests.wire.Peer`, so what is checked is the wire format itself.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from nkservice.node import Node
from nkservice.service.passwords import hash_password
from tests.conftest import NodeFactory, PeerFactory
from tests.wire import Closed, Peer

pytestmark = pytest.mark.usefixtures("transport")


def error_code(response: dict[str, object]) -> object:
    assert response["result"] == "error", response
    data = response["data"]
    assert isinstance(data, dict)
    return data["code"]


async def logged_in(connect: PeerFactory, node: Node, transport: str, user: str,
                    password: str, service: str = "demo") -> Peer:
    peer = await connect(node, service, transport)
    await peer.login(user, password)
    return peer


# -- login (§3) ---------------------------------------------------------------------------------

async def test_login_as_static_user(make_node: NodeFactory, connect: PeerFactory,
                                    transport: str) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    data = await peer.login("alice", "pw1", meta={"device": "phone"})
    assert data["user"] == "alice"
    assert uuid.UUID(data["session_id"]).version == 4
    assert (await peer.request("core", "ping"))["result"] == "ok"


async def test_seed_form_login_with_pass_alias(make_node: NodeFactory, connect: PeerFactory,
                                               transport: str) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    await peer.send({"class": "core", "cmd": "login", "tid": 1,
                     "data": {"user": "bob", "pass": "pw2"}})
    response = await peer.recv()
    assert response["result"] == "ok" and response["tid"] == 1
    assert response["data"]["user"] == "bob"


async def test_global_admin_logs_in_anywhere_and_alone_on_core(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    assert (await (await connect(node, "demo", transport)).login("admin", "secret"))
    assert (await (await connect(node, "core", transport)).login("admin", "secret"))
    for user, password in [("demo-admin", "pw"), ("alice", "pw1")]:
        peer = await connect(node, "core", transport)
        response = await peer.request("core", "login", {"user": user, "password": password})
        assert error_code(response) == 100030


async def test_login_failures(make_node: NodeFactory, connect: PeerFactory,
                              transport: str) -> None:
    node = await make_node(demo={}, other={})
    peer = await connect(node, "demo", transport)
    wrong_password = await peer.request("core", "login", {"user": "alice", "password": "no"})
    assert error_code(wrong_password) == 100038
    assert wrong_password["data"]["error"] == "Invalid password"
    admin_wrong = await peer.request("core", "login", {"user": "admin", "password": "no"})
    assert error_code(admin_wrong) == 100038
    unknown = await peer.request("core", "login", {"user": "mallory", "password": "pw1"})
    assert error_code(unknown) == 100030
    assert unknown["data"]["error"] == "Unauthorized"
    no_password = await peer.request("core", "login", {"user": "alice"})
    assert error_code(no_password) == 100038
    # A service admin is nobody on another service.
    elsewhere = await connect(node, "other", transport)
    response = await elsewhere.request("core", "login", {"user": "demo-admin", "password": "no"})
    assert error_code(response) in (100030, 100038)


async def test_fifth_failure_is_answered_then_the_connection_closes(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    for _ in range(5):
        response = await peer.request("core", "login", {"user": "alice", "password": "bad"})
        assert error_code(response) == 100038
    await peer.wait_closed()


async def test_failed_logins_are_delayed_more_each_time(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"login_failure_delay": 0.05})
    peer = await connect(node, "demo", transport)
    loop = asyncio.get_running_loop()
    delays = []
    for _ in range(3):
        started = loop.time()
        await peer.request("core", "login", {"user": "alice", "password": "bad"})
        delays.append(loop.time() - started)
    # 50 ms, then doubling; uvloop's clock counts whole milliseconds, hence the slack.
    assert delays[0] >= 0.045 and delays[1] >= 0.095 and delays[2] >= 0.195, delays


async def test_second_login_is_already_authenticated(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    peer = await logged_in(connect, node, transport, "alice", "pw1")
    response = await peer.request("core", "login", {"user": "bob", "password": "pw2"})
    assert error_code(response) == 100032


async def test_requests_before_login(make_node: NodeFactory, connect: PeerFactory,
                                     transport: str) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    assert (await peer.request("core", "ping"))["result"] == "ok"
    for class_, cmd in [("core", "list_users"), ("media", "start"), ("core", "nonsense"),
                        ("media", "event")]:
        assert error_code(await peer.request(class_, cmd)) == 100031


async def test_requests_sent_behind_the_login_wait_for_it(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    await peer.send({"class": "core", "cmd": "login", "tid": 1,
                     "data": {"user": "demo-admin", "password": "pw"}})
    await peer.send({"class": "core", "cmd": "list_users", "tid": 2})
    await peer.send({"class": "core", "cmd": "subscribe", "tid": 3, "data": {"class": "m"}})
    await peer.send({"class": "core", "cmd": "send_event", "tid": 4, "data": {"class": "m"}})
    messages = [await peer.recv() for _ in range(5)]
    assert messages[0]["tid"] == 1  # the login is answered first
    answers = {m["tid"]: m for m in messages if "result" in m}
    assert all(a["result"] == "ok" for a in answers.values()), answers
    assert sorted(answers) == [1, 2, 3, 4]
    assert list(answers[2]["data"]) == ["demo-admin"]
    # Handled in arrival order: the subscription was active when the event was sent.
    assert [m["data"] for m in messages if m.get("cmd") == "event"] == [{"class": "m"}]


async def test_client_chosen_session_id(make_node: NodeFactory, connect: PeerFactory,
                                        transport: str) -> None:
    node = await make_node(demo={})
    first = await connect(node, "demo", transport)
    assert (await first.login("alice", "pw1", session_id="device-1"))["session_id"] == "device-1"
    # Another user may not take it…
    intruder = await connect(node, "demo", transport)
    response = await intruder.request("core", "login", {"user": "bob", "password": "pw2",
                                                        "session_id": "device-1"})
    assert error_code(response) == 100034
    # …the same user takes it over, and the old connection is ended.
    second = await connect(node, "demo", transport)
    assert (await second.login("alice", "pw1", session_id="device-1"))["session_id"] == "device-1"
    await first.wait_closed()
    admin = await logged_in(connect, node, transport, "demo-admin", "pw")
    users = (await admin.request("core", "list_users"))["data"]
    assert users["alice"] == ["device-1"]


@pytest.mark.parametrize("bad_id", [12, "", "x" * 129, ["a"]])
async def test_invalid_session_ids(make_node: NodeFactory, connect: PeerFactory,
                                   transport: str, bad_id: object) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    response = await peer.request("core", "login", {"user": "alice", "password": "pw1",
                                                    "session_id": bad_id})
    assert error_code(response) == 100035


async def test_login_deadline_closes_the_connection(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"login_timeout": 0.2})
    peer = await connect(node, "demo", transport)
    await peer.wait_closed(timeout=3)


# -- pings and deadlines (§1.3) ---------------------------------------------------------------

async def test_answered_pings_keep_the_session(make_node: NodeFactory, connect: PeerFactory,
                                               transport: str) -> None:
    node = await make_node(demo={"ping_interval": 0.1, "request_timeout": 0.5})
    peer = await logged_in(connect, node, transport, "alice", "pw1")
    tids = []
    for _ in range(8):  # eight intervals: well past the 0.5 s deadline
        ping = await peer.recv()
        assert ping["class"] == "core" and ping["cmd"] == "ping"
        assert ping["data"] == {"time": 0.1}
        tids.append(ping["tid"])
        await peer.send({"result": "ok", "tid": ping["tid"], "ping": True})
    assert tids == sorted(tids) and all(isinstance(t, int) for t in tids)
    assert (await peer.request("core", "ping"))["result"] == "ok"


async def test_unanswered_ping_closes_the_connection(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"ping_interval": 0.1, "request_timeout": 0.2})
    peer = await logged_in(connect, node, transport, "alice", "pw1")
    assert (await peer.recv())["cmd"] == "ping"
    await peer.wait_closed()


async def test_ack_moves_the_deadline_and_a_late_answer_arrives(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"request_timeout": 0.4, "ack_timeout": 5})
    target = await connect(node, "demo", transport)
    target_id = (await target.login("alice", "pw1"))["session_id"]
    caller = await logged_in(connect, node, transport, "demo-admin", "pw")
    await caller.send({"class": "core", "subclass": "session", "cmd": "cmd", "tid": "c1",
                       "data": {"session_id": target_id, "class": "app", "cmd": "slow"}})
    forwarded = await target.recv()
    await target.send({"ack": forwarded["tid"]})
    assert await caller.recv() == {"ack": "c1"}  # the ack is passed on to the caller
    await asyncio.sleep(0.8)  # the slow work: twice the plain deadline
    await target.send({"result": "ok", "tid": forwarded["tid"], "data": {"done": True}})
    assert await caller.recv() == {"result": "ok", "tid": "c1", "data": {"done": True}}
    assert (await target.request("core", "ping"))["result"] == "ok"


async def test_no_ack_and_no_answer_closes_the_target(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"request_timeout": 0.2})
    target = await connect(node, "demo", transport)
    target_id = (await target.login("alice", "pw1"))["session_id"]
    caller = await logged_in(connect, node, transport, "demo-admin", "pw")
    response = await caller.request("core", "cmd", {"session_id": target_id, "class": "app",
                                                    "cmd": "x"}, subclass="session")
    assert error_code(response) == 100005
    await target.wait_closed()


async def test_ack_then_silence_closes_after_the_ack_timeout(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"request_timeout": 0.3, "ack_timeout": 0.6})
    target = await connect(node, "demo", transport)
    target_id = (await target.login("alice", "pw1"))["session_id"]
    caller = await logged_in(connect, node, transport, "demo-admin", "pw")
    await caller.send({"class": "core", "cmd": "session_cmd", "tid": 7,
                       "data": {"session_id": target_id, "class": "app", "cmd": "x"}})
    await target.send({"ack": (await target.recv())["tid"]})
    assert await caller.recv() == {"ack": 7}
    assert error_code(await caller.recv()) == 100005
    await target.wait_closed()


# -- bad input (§1.4) ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{nope", b'{"class":"core"', b"\xff\xfe{}"])
async def test_invalid_json(make_node: NodeFactory, connect: PeerFactory, transport: str,
                            raw: bytes) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    # Bytes that are not UTF-8 go in a binary frame: in a text frame they are a
    # WebSocket protocol error (see the next test).
    await peer.send_raw(raw, text=raw.isascii())
    response = await peer.recv()
    assert response == {"result": "error", "tid": None,
                        "data": {"code": 100072, "error": "Invalid JSON"}}
    assert (await peer.request("core", "ping"))["result"] == "ok"


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    if transport in ("tcp", "tls"):
        pytest.skip("a WebSocket rule")
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    await peer.send_raw(b'{"class":"core","cmd":"ping","tid":"\xff"}', text=True)
    assert await peer.wait_closed() == 1007


async def test_websocket_pings_get_pongs_between_messages(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    if transport in ("tcp", "tls"):
        pytest.skip("a WebSocket rule")
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    await peer.send({"class": "core", "cmd": "ping", "tid": 1})
    await peer.websocket_ping()
    await peer.send({"class": "core", "cmd": "ping", "tid": 2})
    assert [await peer.recv(), await peer.recv()] == [{"result": "ok", "tid": 1},
                                                      {"result": "ok", "tid": 2}]


async def test_fragmented_websocket_messages(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    if transport in ("tcp", "tls"):
        pytest.skip("a WebSocket rule")
    node = await make_node(demo={"max_message_size": 100})
    peer = await connect(node, "demo", transport)
    await peer.send_fragments(['{"class":"core",', '"cmd":"ping",', '"tid":"frag"}'])
    assert await peer.recv() == {"result": "ok", "tid": "frag"}
    await peer.send_fragments(['{"class":"core","cmd":"ping","tid":1,"data":"', "x" * 60,
                               "y" * 60, '"}'])
    assert error_code(await peer.recv()) == 100077
    await peer.wait_closed()


async def test_many_messages_in_one_read_are_all_answered_in_order(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    for tid in range(200):
        await peer.send({"class": "core", "cmd": "ping", "tid": tid})
    assert [(await peer.recv())["tid"] for _ in range(200)] == list(range(200))


@pytest.mark.parametrize("size", [10, 200, 70_000])  # each WebSocket length encoding
async def test_answers_of_every_size_are_framed_right(
        make_node: NodeFactory, connect: PeerFactory, transport: str, size: int) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    await peer.login("alice", "pw1")
    body = {"pad": "x" * size}
    assert (await peer.request("core", "subscribe", {"class": "big", "body": body}))[
        "result"] == "ok"
    listed = (await peer.request("core", "get_subscriptions"))["data"]
    assert [s["body"] for s in listed if s["class"] == "big"] == [body]


async def test_json_in_a_binary_frame_is_accepted(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    await peer.send_raw(b'{"class":"core","cmd":"ping","tid":5}', text=False)
    assert await peer.recv() == {"result": "ok", "tid": 5}


@pytest.mark.parametrize(("raw", "tid"), [
    (b"[1, 2]", None),
    (b'"text"', None),
    (b"42", None),
    (b"{}", None),
    (b'{"class":"core","cmd":"ping"}', None),
    (b'{"class":"core","cmd":"ping","tid":{"a":1}}', None),
    (b'{"class":"core","cmd":"ping","tid":[1]}', None),
    (b'{"class":"core","cmd":"ping","tid":true}', None),
    (b'{"class":"core","cmd":"ping","tid":null}', None),
    (b'{"class":"core","cmd":"ping","tid":1.5}', None),
    (b'{"class":1,"cmd":"ping","tid":9}', 9),
    (b'{"class":"core","cmd":["ping"],"tid":"t"}', "t"),
    (b'{"class":"core","subclass":3,"cmd":"ping","tid":10}', 10),
    (b'{"result":7,"tid":11}', 11),
    (b'{"ack":{"x":1}}', None),
    (b'{"cmd":"ping","tid":12}', 12),
])
async def test_invalid_messages(make_node: NodeFactory, connect: PeerFactory, transport: str,
                                raw: bytes, tid: object) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    await peer.send_raw(raw)
    assert await peer.recv() == {"result": "error", "tid": tid,
                                 "data": {"code": 100076, "error": "Invalid message"}}
    assert (await peer.request("core", "ping"))["result"] == "ok"


async def test_unknown_top_level_fields_are_ignored(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    peer = await connect(node, "demo", transport)
    await peer.send({"class": "core", "cmd": "ping", "tid": 1, "extra": [1, 2]})
    assert await peer.recv() == {"result": "ok", "tid": 1}


async def test_message_too_large_is_answered_then_closed(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"max_message_size": 1000})
    peer = await connect(node, "demo", transport)
    big = {"class": "core", "cmd": "ping", "tid": 1, "data": {"pad": "x" * 2000}}
    await peer.send(big)
    assert await peer.recv() == {"result": "error", "tid": None,
                                 "data": {"code": 100077, "error": "Message too large"}}
    await peer.wait_closed()


async def test_a_message_at_the_limit_is_accepted(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"max_message_size": 1000})
    peer = await connect(node, "demo", transport)
    head = b'{"class":"core","cmd":"ping","tid":1,"data":{"pad":"'
    tail = b'"}}'
    await peer.send_raw(head + b"x" * (1000 - len(head) - len(tail)) + tail)
    assert await peer.recv() == {"result": "ok", "tid": 1}


async def test_too_many_bad_messages_close_the_connection(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"max_bad_messages": 3})
    peer = await connect(node, "demo", transport)
    for _ in range(4):
        await peer.send_raw(b"not json")
        assert error_code(await peer.recv()) == 100072
    await peer.wait_closed()


async def test_field_errors_name_the_field(make_node: NodeFactory, connect: PeerFactory,
                                           transport: str) -> None:
    node = await make_node(demo={})
    peer = await logged_in(connect, node, transport, "demo-admin", "pw")
    missing = await peer.request("core", "get_user")
    assert missing["data"] == {"code": 100045, "error": "Missing field: user"}
    wrong = await peer.request("core", "get_user", {"user": 5})
    assert wrong["data"] == {"code": 100044, "error": "Syntax error: user"}
    extra = await peer.request("core", "ping", {"unknown": "ignored"})
    assert extra["result"] == "ok"


async def test_unknown_class_and_command(make_node: NodeFactory, connect: PeerFactory,
                                         transport: str) -> None:
    node = await make_node(demo={})
    peer = await logged_in(connect, node, transport, "alice", "pw1")
    assert (await peer.request("media", "start"))["data"] == {
        "code": 100050, "error": "Unknown class 'media'"}
    assert (await peer.request("core", "fly"))["data"] == {
        "code": 100042, "error": "Unknown command 'fly'"}
    assert error_code(await peer.request("core", "fly", subclass="user")) == 100042


async def test_too_many_pending_requests(make_node: NodeFactory, connect: PeerFactory,
                                         transport: str) -> None:
    node = await make_node(demo={"max_pending_requests": 2})
    target = await connect(node, "demo", transport)
    target_id = (await target.login("alice", "pw1"))["session_id"]
    caller = await logged_in(connect, node, transport, "demo-admin", "pw")
    forward = {"session_id": target_id, "class": "app", "cmd": "wait"}
    for tid in (1, 2, 3):
        await caller.send({"class": "core", "cmd": "session_cmd", "tid": tid, "data": forward})
    assert await caller.recv() == {"result": "error", "tid": 3, "data": {
        "code": 100078, "error": "Too many requests"}}
    for _ in range(2):  # answer the two that were taken: the caller gets both answers
        await target.send({"result": "ok", "tid": (await target.recv())["tid"]})
    assert sorted([(await caller.recv())["tid"] for _ in range(2)]) == [1, 2]
    assert (await caller.request("core", "ping"))["result"] == "ok"


async def test_stray_responses_and_acks_are_ignored(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={})
    peer = await logged_in(connect, node, transport, "alice", "pw1")
    await peer.send({"result": "ok", "tid": 999})
    await peer.send({"result": "error", "tid": "abc", "data": {"code": 1, "error": "x"}})
    await peer.send({"ack": 12345})
    assert (await peer.request("core", "ping"))["result"] == "ok"


async def test_client_tids_never_collide_with_server_tids(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"ping_interval": 0.1, "request_timeout": 1})
    peer = await logged_in(connect, node, transport, "alice", "pw1")
    ping = await peer.recv()
    # A client request that reuses the server's pending tid is its own request…
    await peer.send({"class": "core", "cmd": "ping", "tid": ping["tid"]})
    assert await peer.recv() == {"result": "ok", "tid": ping["tid"]}
    # …and the server's ping is still pending until answered.
    await peer.send({"result": "ok", "tid": ping["tid"]})
    assert (await peer.recv())["cmd"] == "ping"


async def test_bad_input_does_not_affect_other_connections(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    node = await make_node(demo={"max_bad_messages": 1})
    calm = await logged_in(connect, node, transport, "bob", "pw2")
    noisy = await connect(node, "demo", transport)
    for raw in (b"\x00\x01garbage", b"[]", b"{"):
        await noisy.send_raw(raw, text=False)
    with pytest.raises(Closed):
        for _ in range(4):
            await noisy.recv()
    assert (await calm.request("core", "ping"))["result"] == "ok"


async def test_hashed_password_checks_do_not_stall_other_connections(
        make_node: NodeFactory, connect: PeerFactory, transport: str) -> None:
    """Each scrypt check costs tens of ms of CPU; on the event loop, 24 of them would hold
    every other connection for about a second."""
    if transport != "tcp":
        pytest.skip("the event loop is the same whatever the transport")
    node = await make_node(demo={"users": {"alice": hash_password("right")}})
    bystander = await connect(node, "demo", transport)
    attackers = [await connect(node, "demo", transport) for _ in range(6)]
    for n, attacker in enumerate(attackers):
        for k in range(4):  # four each: the fifth failure would close the connection
            await attacker.send({"class": "core", "cmd": "login", "tid": n * 10 + k,
                                 "data": {"user": "alice", "password": "wrong"}})
    answered = asyncio.gather(*(_answers(attacker, 4) for attacker in attackers))
    loop = asyncio.get_running_loop()
    worst = 0.0
    while not answered.done():
        started = loop.time()
        assert (await bystander.request("core", "ping"))["result"] == "ok"
        worst = max(worst, loop.time() - started)
    assert all(code == 100038 for codes in await answered for code in codes)
    # On the loop, the 24 checks would hold a ping for about a second; a busy machine (the
    # test's own scrypt threads share its cores) may still delay one by a few tens of ms.
    assert worst < 0.5, f"a ping waited {worst * 1000:.0f} ms"


async def _answers(peer: Peer, count: int) -> list[object]:
    return [error_code(await peer.recv(timeout=30)) for _ in range(count)]
